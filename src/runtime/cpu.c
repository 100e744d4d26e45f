/* CPU feature detection and the one place that picks the instruction set.
 * MPSKERNELS_MAX_ISA (generic | avx2 | avx512) caps the choice, read by the binding. */
#include "mpskernels.h"
#include "gemm/gemm.h"
#include "nn/nn.h"
#include "pool/pool.h"
#include "reduce/reduce.h"

#if MK_X86
#include <cpuid.h>
#endif

static mk_cpu_features features;
static int detected;
static mk_isa active = MK_ISA_GENERIC;

#if MK_X86
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

const mk_cpu_features *mk_cpu_detect(void) {
    if (detected) return &features;
#if MK_X86
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        features.sse2 = (d >> 26) & 1;
        features.fma = (c >> 12) & 1;
        features.f16c = (c >> 29) & 1;
        features.avx = (c >> 28) & 1;
        int osxsave = (c >> 27) & 1;
        if (osxsave) {
            uint64_t xcr0 = xgetbv0();
            features.os_ymm = (xcr0 & 0x6) == 0x6;            /* XMM and YMM state */
            features.os_zmm = (xcr0 & 0xe6) == 0xe6;          /* plus opmask and ZMM */
        }
    }
    if (__get_cpuid_max(0, 0) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        features.avx2 = (b >> 5) & 1;
        features.avx512f = (b >> 16) & 1;
        features.avx512dq = (b >> 17) & 1;
        features.avx512bw = (b >> 30) & 1;
        features.avx512vl = (b >> 31) & 1;
        features.avx512_vnni = (c >> 11) & 1;
        features.avx512_vpopcntdq = (c >> 14) & 1;
        __cpuid_count(7, 1, a, b, c, d);
        features.avx512_bf16 = (a >> 5) & 1;
    }
#endif
    detected = 1;
    return &features;
}

mk_isa mk_best_isa(void) {
    const mk_cpu_features *f = mk_cpu_detect();
#if MK_X86
    if (f->avx512f && f->avx512bw && f->avx512dq && f->avx512vl && f->avx2 && f->fma &&
        f->f16c && f->os_zmm)
        return MK_ISA_AVX512;
    if (f->avx2 && f->fma && f->f16c && f->os_ymm) return MK_ISA_AVX2;
#endif
    (void)f;
    return MK_ISA_GENERIC;
}

mk_isa mk_active_isa(void) { return active; }

mk_isa mk_select_isa(mk_isa isa) {
    mk_isa best = mk_best_isa();
    if (isa > best) isa = best;
    if (isa < MK_ISA_GENERIC) isa = MK_ISA_GENERIC;
    mk_elementwise_select_isa(isa);
    mk_gemm_select_isa(isa);
    mk_reduce_select_isa(isa);
    mk_pool_select_isa(isa);
    mk_nn_select_isa(isa);
    active = isa;
    return isa;
}
