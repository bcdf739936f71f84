/*
 * cpu_kernels_x86.c — the AVX2+FMA and AVX-512 kernel sets (see struct mf_cpu_kernels).
 * Compiled for every x86-64 build with per-function target attributes and chosen at run
 * time by CPU feature (cpu_matmul.c), so the extension needs no -march flag.
 *
 * Codes of 2/4/8 bits are widened to one f32 lane per value in natural column order
 * (broadcast the packed word, shift each lane by its own amount, mask), so x is read as
 * stored and each term is x * (s*q + b) exactly as in the scalar set; only summation
 * order differs. dequant_pow2 rounds s*q and then +b separately (no FMA) so it is bitwise
 * equal to the scalar and bit-stream decoders, which the C tests check.
 * On other ISAs this file compiles to nothing; an ARM NEON set would sit beside it as
 * cpu_kernels_neon.c with the same four entries.
 */
#include "backends/cpu/cpu_internal.h"

#if defined(MF_HAVE_X86_KERNELS)

#include <immintrin.h>

/* ==== AVX2 + FMA ==== */

#define AVX2 __attribute__((target("avx2,fma,f16c")))

static inline AVX2 float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static AVX2 float avx2_dot(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static AVX2 void avx2_axpy(float *y, float alpha, const float *x, int64_t n) {
    const __m256 va = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += alpha * x[i];
}

// Eight codes starting at column c (a multiple of 8) as f32, for 2/4/8 bits.
static inline AVX2 __m256 avx2_codes8(const uint32_t *q, int bits, int64_t c) {
    if (bits == 4) {
        const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)q[c >> 3]), sh);
        return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    }
    if (bits == 8) {
        __m128i b8 = _mm_loadl_epi64((const __m128i *)((const uint8_t *)q + c));
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b8));
    }
    // 2 bits: 16 codes per word; these 8 are its low or high half.
    const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    __m256i v = _mm256_set1_epi32((int)(q[c >> 4] >> (c & 8 ? 16 : 0)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, sh),
                                               _mm256_set1_epi32(3)));
}

static AVX2 float avx2_qdot_pow2(const float *x, const struct mf_weight *w, int64_t r) {
    const int bits = w->bits, gs = w->group_size;
    const uint32_t *q = (const uint32_t *)w->w + r * (w->n_in * bits / 32);
    const int64_t n_group = w->n_in / gs, s0 = r * n_group;
    __m256 tot0 = _mm256_setzero_ps(), tot1 = tot0;
    for (int64_t g = 0; g < n_group; g++) {
        const __m256 s = _mm256_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m256 b = _mm256_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        // Two independent chains: gs >= 32 is a multiple of 16.
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 16) {
            __m256 w0 = _mm256_fmadd_ps(avx2_codes8(q, bits, c), s, b);
            __m256 w1 = _mm256_fmadd_ps(avx2_codes8(q, bits, c + 8), s, b);
            tot0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), w0, tot0);
            tot1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), w1, tot1);
        }
    }
    return hsum8(_mm256_add_ps(tot0, tot1));
}

static AVX2 void avx2_dequant_pow2(float *dst, const struct mf_weight *w, int64_t r,
                                   int64_t c0, int64_t n) {
    const int bits = w->bits, gs = w->group_size;
    const uint32_t *q = (const uint32_t *)w->w + r * (w->n_in * bits / 32);
    const int64_t s0 = r * (w->n_in / gs);
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const __m256 s = _mm256_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m256 b = _mm256_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8)
            _mm256_storeu_ps(dst + (c - c0),
                             _mm256_add_ps(_mm256_mul_ps(avx2_codes8(q, bits, c), s), b));
    }
}

const struct mf_cpu_kernels mf_cpu_kernels_avx2 = {
    .name = "avx2",
    .dot = avx2_dot,
    .axpy = avx2_axpy,
    .qdot_pow2 = avx2_qdot_pow2,
    .dequant_pow2 = avx2_dequant_pow2,
};

/* ==== AVX-512 (F + BW) ==== */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

static AVX512 float avx512_dot(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i),
                             s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

static AVX512 void avx512_axpy(float *y, float alpha, const float *x, int64_t n) {
    const __m512 va = _mm512_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i),
                                                _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}

// Sixteen codes starting at column c (a multiple of 16) as f32, for 2/4/8 bits.
static inline AVX512 __m512 avx512_codes16(const uint32_t *q, int bits, int64_t c) {
    if (bits == 4) {
        // Words c/8 and c/8+1 each spread over eight lanes, then shifted per lane.
        const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16,
                                             20, 24, 28);
        __m512i v = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(q + (c >> 3))));
        v = _mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, v), sh);
        return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
    }
    if (bits == 8) {
        __m128i b16 = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + c));
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b16));
    }
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
    __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32((int)q[c >> 4]), sh);
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(3)));
}

static AVX512 float avx512_qdot_pow2(const float *x, const struct mf_weight *w,
                                     int64_t r) {
    const int bits = w->bits, gs = w->group_size;
    const uint32_t *q = (const uint32_t *)w->w + r * (w->n_in * bits / 32);
    const int64_t n_group = w->n_in / gs, s0 = r * n_group;
    __m512 tot0 = _mm512_setzero_ps(), tot1 = tot0;
    for (int64_t g = 0; g < n_group; g++) {
        const __m512 s = _mm512_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m512 b = _mm512_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
            __m512 w0 = _mm512_fmadd_ps(avx512_codes16(q, bits, c), s, b);
            __m512 w1 = _mm512_fmadd_ps(avx512_codes16(q, bits, c + 16), s, b);
            tot0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), w0, tot0);
            tot1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), w1, tot1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1));
}

static AVX512 void avx512_dequant_pow2(float *dst, const struct mf_weight *w, int64_t r,
                                       int64_t c0, int64_t n) {
    const int bits = w->bits, gs = w->group_size;
    const uint32_t *q = (const uint32_t *)w->w + r * (w->n_in * bits / 32);
    const int64_t s0 = r * (w->n_in / gs);
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const __m512 s = _mm512_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m512 b = _mm512_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 16)
            _mm512_storeu_ps(dst + (c - c0), _mm512_add_ps(
                                 _mm512_mul_ps(avx512_codes16(q, bits, c), s), b));
    }
}

const struct mf_cpu_kernels mf_cpu_kernels_avx512 = {
    .name = "avx512",
    .dot = avx512_dot,
    .axpy = avx512_axpy,
    .qdot_pow2 = avx512_qdot_pow2,
    .dequant_pow2 = avx512_dequant_pow2,
};

#endif /* MF_HAVE_X86_KERNELS */
