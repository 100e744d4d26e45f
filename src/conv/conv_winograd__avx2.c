/* AVX2 + FMA build of conv_winograd__generic.c. */
#include "conv_winograd__generic.c"
