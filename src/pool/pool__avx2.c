/* Pooling row loop compiled for avx2 (see pool_row.h). */
#include "pool_row.h"

const mk_pool_row_fn mk_pool_row__avx2 = pool_row;
