/* Grouped convolution rows, AVX-512: one 16-lane accumulator per output pixel; each input
 * channel of the groups in the block is spread to its group's lanes with one permute. */
#include <immintrin.h>
#include <math.h>

#include "conv/conv_gconv.h"

void mk_gc_row__avx512(const mk_gc_row *r) {
    const __mmask16 in_mask = (__mmask16)((1u << r->span) - 1u);
    const __mmask16 out_mask = (__mmask16)((1u << r->nc) - 1u);
    int32_t lanes[16];
    for (int j = 0; j < 16; j++) lanes[j] = (j / r->cout_g) * r->cin_g;
    const __m512i idx0 = _mm512_loadu_si512(lanes), one = _mm512_set1_epi32(1);
    const __m512 bias = _mm512_maskz_loadu_ps(out_mask, r->bias);
    const __m512 lo = _mm512_set1_ps(r->lo), hi = _mm512_set1_ps(r->hi);
    const int clamp = r->lo > -INFINITY || r->hi < INFINITY;
    const int64_t tap_stride = (int64_t)r->cin_g * r->cpad;
    for (int32_t ox = 0; ox < r->out_w; ox++) {
        __m512 acc = bias;
        for (int32_t q = 0; q < r->kh; q++) {
            if (r->ys[q] < 0) continue;
            const float *row = r->a + r->ys[q] * r->ay;
            const int32_t *xs = r->xs + (int64_t)ox * r->kw;
            for (int32_t p = 0; p < r->kw; p++) {
                if (xs[p] < 0) continue;
                const __m512 in = _mm512_maskz_loadu_ps(in_mask, row + xs[p] * r->ax);
                const float *wt = r->w + (q * r->kw + p) * tap_stride;
                __m512i idx = idx0;
                for (int32_t c = 0; c < r->cin_g; c++) {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(wt + c * r->cpad),
                                          _mm512_permutexvar_ps(idx, in), acc);
                    idx = _mm512_add_epi32(idx, one);
                }
            }
        }
        if (clamp) acc = _mm512_min_ps(_mm512_max_ps(acc, lo), hi);
        _mm512_mask_storeu_ps(r->out + ox * r->ld, out_mask, acc);
    }
}
