/* AVX-512 build of conv_direct__generic.c. */
#include "conv_direct__generic.c"
