/* GEMM family: dispatch and B packing (the contract of gemm.h). */
#include <stdatomic.h>
#include <string.h>

#include "gemm.h"
#include "elementwise/elementwise.h"   /* mk_ew_f16_to_f32 */

static _Atomic(const mk_gemm_ukernel *) g_ukernel;

void mk_gemm_select_isa(mk_isa isa) {
    const mk_gemm_ukernel *k = &mk_gemm_ukernel__generic;
#if MK_X86
    if (isa == MK_ISA_AVX512) k = &mk_gemm_ukernel__avx512;
    else if (isa == MK_ISA_AVX2) k = &mk_gemm_ukernel__avx2;
#else
    (void)isa;
#endif
    atomic_store_explicit(&g_ukernel, k, memory_order_release);
}

const mk_gemm_ukernel *mk_gemm_ukernel_active(void) {
    const mk_gemm_ukernel *k = atomic_load_explicit(&g_ukernel, memory_order_acquire);
    if (k == NULL) { /* nobody called mk_select_isa yet: take the best this CPU supports */
        mk_gemm_select_isa(mk_best_isa());
        k = atomic_load_explicit(&g_ukernel, memory_order_acquire);
    }
    return k;
}

mk_status mk_gemm_packed_b_floats(int64_t k, int64_t n, int64_t *floats) {
    if (k < 0 || n < 0) return MK_EINVAL;
    int64_t panels = n / MK_GEMM_NR + (n % MK_GEMM_NR != 0);
    if (k > 0 && panels > INT64_MAX / MK_GEMM_NR / k) return MK_EINVAL;
    *floats = panels * MK_GEMM_NR * k;
    return MK_OK;
}

void mk_gemm_pack_b(int64_t k, int64_t n, const void *b, int format, int64_t rs, int64_t cs,
                    float *packed) {
    for (int64_t j0 = 0; j0 < n; j0 += MK_GEMM_NR) {
        int64_t nc = n - j0 < MK_GEMM_NR ? n - j0 : MK_GEMM_NR;
        for (int64_t r = 0; r < k; r++, packed += MK_GEMM_NR) {
            int64_t at = r * rs + j0 * cs;
            if (format == MK_FMT_F16) {
                const uint16_t *src = (const uint16_t *)b + at;
                for (int64_t j = 0; j < nc; j++) packed[j] = mk_ew_f16_to_f32(src[j * cs]);
            } else if (cs == 1) {
                memcpy(packed, (const float *)b + at, (size_t)nc * sizeof(float));
            } else {
                const float *src = (const float *)b + at;
                for (int64_t j = 0; j < nc; j++) packed[j] = src[j * cs];
            }
            for (int64_t j = nc; j < MK_GEMM_NR; j++) packed[j] = 0.0f;
        }
    }
}
