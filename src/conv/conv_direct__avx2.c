/* AVX2 + FMA build of conv_direct__generic.c. */
#include "conv_direct__generic.c"
