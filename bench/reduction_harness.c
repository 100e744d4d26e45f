/* The reduction kernels against the read probe in C, without Python: one thread, thread CPU
 * time. Per round and kernel, a block of probe calls over the source, then a block of kernel
 * calls (each pays for writing its own results back, as in a loop of calls); the share of the
 * probe's rate is the ratio of the two blocks' medians, and the median over rounds is shown.
 * (Pairs of single calls, probe then kernel, were biased: the probe paid for writing back the
 * kernel before's results.) docs/reduction.md records what it gave. *
 * From the repository root, after building the extension:
 *   LIBDIR=$(python -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
 *   gcc -O2 -Isrc bench/reduction_harness.c mpskernels/_native.cpython-311-x86_64-linux-gnu.so \
 *       -L$LIBDIR -lpython3.11 -Wl,-rpath,$LIBDIR -o /tmp/reduction_harness
 *   /tmp/reduction_harness 56 56 256 40      # height width channels rounds: 1x256x56x56
 *   /tmp/reduction_harness 256 256 256 10    # 64 MiB
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mpskernels.h"
#include "reduce/reduce.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s height width channels rounds\n", argv[0]);
        return 2;
    }
    const int H = atoi(argv[1]), W = atoi(argv[2]), C = atoi(argv[3]), R = atoi(argv[4]);
    mk_pool *pool = mk_pool_create(1);
    mk_select_isa(mk_best_isa());
    const size_t n = (size_t)H * W * C;
    float *x = aligned_alloc(64, n * 4);
    float *d = aligned_alloc(64, (size_t)H * W * 64 + (size_t)W * C * 4);
    for (size_t i = 0; i < n; i++) x[i] = (float)((i * 7919) % 1000) * 0.001f - 0.5f;
    memset(d, 0, (size_t)H * W * 64);
    /* as the Python classes pass them: a one-channel result image has a channel stride of 16 */
    mk_operand src = {x, MK_FMT_F32, (int64_t)n, (int64_t)W * C, C, 1};
    mk_operand pixels = {d, MK_FMT_F32, (int64_t)H * W * 16, (int64_t)W * 16, 16, 1};
    mk_operand rows = {d, MK_FMT_F32, (int64_t)H * C, C, C, 1};
    mk_operand columns = {d, MK_FMT_F32, (int64_t)W * C, (int64_t)W * C, C, 1};
    const mk_extent e = {1, H, W, C};
    enum { K = 5 };
    const char *name[K] = {"channels sum", "channels max", "channels argmax", "row sum", "column sum"};
    const int op[K] = {MK_REDUCE_SUM, MK_REDUCE_MAX, MK_REDUCE_ARGMAX, MK_REDUCE_SUM, MK_REDUCE_SUM};
    const int axis[K] = {MK_REDUCE_FEATURE_CHANNELS, MK_REDUCE_FEATURE_CHANNELS,
                         MK_REDUCE_FEATURE_CHANNELS, MK_REDUCE_ROW, MK_REDUCE_COLUMN};
    const mk_operand *dst[K] = {&pixels, &pixels, &pixels, &rows, &columns};
    const int B = n * 4 < (64 << 20) ? 20 : 3;   /* calls per block */
    double *t[K], *share[K], *probe = malloc((size_t)R * K * sizeof(double));
    double pb[20], kb[20];
    for (int k = 0; k < K; k++) {
        t[k] = malloc((size_t)R * sizeof(double));
        share[k] = malloc((size_t)R * sizeof(double));
    }
    volatile uint64_t sink = 0;
    for (int r = 0; r < R; r++) {
        for (int k = 0; k < K; k++) {
            mk_reduce_params p = {op[k], axis[k], 1.0f, 0, axis[k] == MK_REDUCE_FEATURE_CHANNELS};
            for (int i = 0; i < B; i++) {
                const double t0 = now();
                sink += mk_reduce_read_probe(x, (int64_t)n * 4, pool);
                pb[i] = now() - t0;
            }
            for (int i = 0; i < B; i++) {
                const double t0 = now();
                mk_reduce(&p, &src, NULL, dst[k], e, pool);
                kb[i] = now() - t0;
            }
            qsort(pb, (size_t)B, sizeof(double), by_value);
            qsort(kb, (size_t)B, sizeof(double), by_value);
            probe[r * K + k] = pb[B / 2];
            t[k][r] = kb[B / 2];
            share[k][r] = pb[B / 2] / kb[B / 2];
        }
    }
    qsort(probe, (size_t)R * K, sizeof(double), by_value);
    printf("1x%dx%dx%d fp32, one thread: probe %.1f us (median)\n", C, H, W, probe[R * K / 2] * 1e6);
    for (int k = 0; k < K; k++) {
        qsort(t[k], (size_t)R, sizeof(double), by_value);
        qsort(share[k], (size_t)R, sizeof(double), by_value);
        printf("%-16s %9.1f us  %3.0f%% of the probe's rate (quartiles %3.0f-%3.0f%%)\n", name[k],
               t[k][R / 2] * 1e6, 100 * share[k][R / 2], 100 * share[k][R / 4],
               100 * share[k][3 * R / 4]);
    }
    return 0;
}
