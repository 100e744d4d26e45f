/* Pooling row loop compiled for generic (see pool_row.h). */
#include "pool_row.h"

const mk_pool_row_fn mk_pool_row__generic = pool_row;
