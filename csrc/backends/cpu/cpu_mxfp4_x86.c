/*
 * cpu_mxfp4_x86.c — the MXFP4 entries of the AVX2 and AVX-512 kernel sets (format and
 * exactness: cpu_mxfp4.c). Each group's values come from a table of that group: AVX-512
 * looks all 16 up with one vpermps (its index is the low four bits of a lane, so the
 * codes need no mask); AVX2's vpermps reads three bits, so it looks up the magnitude
 * and sets the sign from code bit 3. Up to four tokens share each decoded weight
 * vector; one token keeps two accumulator chains. Weights are the exact products, so
 * only the summation order differs from the scalar set.
 * On other ISAs this file compiles to nothing.
 */
#include "backends/cpu/cpu_internal.h"

#if defined(MF_HAVE_X86_KERNELS)

#include <immintrin.h>
#include <string.h>

// Tokens that share one decode of a row.
#define MX_TOK 4

// The group scales of row r.
static inline const uint8_t *row_scales(const struct mf_weight *w, int64_t r) {
    return (const uint8_t *)w->scales + r * (w->n_in / w->group_size);
}

static inline const uint8_t *row_codes(const struct mf_weight *w, int64_t r) {
    return (const uint8_t *)w->w + r * (w->n_in / 2);
}

/* ==== AVX2 + FMA ==== */

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

INLINE_AVX2 float mx_hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

// The eight magnitudes of a group with scale byte e.
INLINE_AVX2 __m256 avx2_mag(uint8_t e) {
    return _mm256_mul_ps(_mm256_loadu_ps(mf_mxfp4_e2m1), _mm256_set1_ps(mf_mxfp4_scale(e)));
}

// The eight weights at column c (a multiple of 8) of a row: the magnitude by the low
// three bits of each code, code bit 3 moved to the sign bit.
INLINE_AVX2 __m256 avx2_w8(const uint8_t *row, int64_t c, __m256 mag) {
    uint32_t word;
    memcpy(&word, row + c / 2, 4);
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), sh);
    const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(q, 28),
                                          _mm256_set1_epi32((int)0x80000000u));
    return _mm256_xor_ps(_mm256_permutevar8x32_ps(mag, q), _mm256_castsi256_ps(sign));
}

// y[t * ys] = row r . x[t * xs, ...) for t < nt (a constant, 1..MX_TOK).
INLINE_AVX2 void avx2_row(float *y, int64_t ys, const float *x, int64_t xs, const int nt,
                          const struct mf_weight *w, int64_t r) {
    const uint8_t *row = row_codes(w, r), *sc = row_scales(w, r);
    const int gs = w->group_size;
    __m256 acc[MX_TOK], acc1 = _mm256_setzero_ps();
    for (int t = 0; t < MX_TOK; t++)
        acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w->n_in / gs; g++) {
        const __m256 mag = avx2_mag(sc[g]);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 16) {
            const __m256 w0 = avx2_w8(row, c, mag), w1 = avx2_w8(row, c + 8, mag);
            if (nt == 1) {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), w0, acc[0]);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), w1, acc1);
                continue;
            }
            for (int t = 0; t < nt; t++) {
                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * xs + c), w0, acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * xs + c + 8), w1, acc[t]);
            }
        }
    }
    acc[0] = _mm256_add_ps(acc[0], acc1);
    for (int t = 0; t < nt; t++)
        y[t * ys] = mx_hsum8(acc[t]);
}

static AVX2 void avx2_rows(float *y, int64_t ys, const float *x, int64_t xs, int nt,
                           const struct mf_weight *w, int64_t r) {
    switch (nt) {
    case 1: avx2_row(y, ys, x, xs, 1, w, r); break;
    case 2: avx2_row(y, ys, x, xs, 2, w, r); break;
    case 3: avx2_row(y, ys, x, xs, 3, w, r); break;
    default: avx2_row(y, ys, x, xs, 4, w, r); break;
    }
}

AVX2 void mf_mxfp4_qdot_rows_avx2(float *y, int64_t ys, const float *x, int64_t xs,
                                  int n_tok, const struct mf_weight *w, int64_t r0,
                                  int n_row) {
    for (int t0 = 0; t0 < n_tok; t0 += MX_TOK) {
        const int nt = n_tok - t0 < MX_TOK ? n_tok - t0 : MX_TOK;
        for (int i = 0; i < n_row; i++)
            avx2_rows(y + t0 * ys + i, ys, x + t0 * xs, xs, nt, w, r0 + i);
    }
}

AVX2 void mf_mxfp4_dequant_avx2(float *dst, const struct mf_weight *w, int64_t r,
                                int64_t c0, int64_t n) {
    const uint8_t *row = row_codes(w, r), *sc = row_scales(w, r);
    const int gs = w->group_size;
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const __m256 mag = avx2_mag(sc[g]);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8)
            _mm256_storeu_ps(dst + c - c0, avx2_w8(row, c, mag));
    }
}

/* ==== AVX-512 ==== */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define INLINE_AVX512 \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma")))

// The sixteen values of a group with scale byte e.
INLINE_AVX512 __m512 avx512_lut(uint8_t e) {
    return _mm512_mul_ps(_mm512_loadu_ps(mf_mxfp4_e2m1), _mm512_set1_ps(mf_mxfp4_scale(e)));
}

// The sixteen weights at column c (a multiple of 16): the eight code bytes as two
// words, word 0 in lanes 0-7 and word 1 in lanes 8-15, each lane shifted to its code.
INLINE_AVX512 __m512 avx512_w16(const uint8_t *row, int64_t c, __m512 lut) {
    uint64_t u;
    memcpy(&u, row + c / 2, 8);
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20,
                                         24, 28);
    __m512i q = _mm512_permutexvar_epi32(sel, _mm512_set1_epi64((long long)u));
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh), lut);
}

// y[t * ys] = row r . x[t * xs, ...) for t < nt (a constant, 1..MX_TOK).
INLINE_AVX512 void avx512_row(float *y, int64_t ys, const float *x, int64_t xs,
                              const int nt, const struct mf_weight *w, int64_t r) {
    const uint8_t *row = row_codes(w, r), *sc = row_scales(w, r);
    const int gs = w->group_size;
    __m512 acc[MX_TOK], acc1 = _mm512_setzero_ps();
    for (int t = 0; t < MX_TOK; t++)
        acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w->n_in / gs; g++) {
        const __m512 lut = avx512_lut(sc[g]);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
            const __m512 w0 = avx512_w16(row, c, lut), w1 = avx512_w16(row, c + 16, lut);
            if (nt == 1) {
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), w0, acc[0]);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), w1, acc1);
                continue;
            }
            for (int t = 0; t < nt; t++) {
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * xs + c), w0, acc[t]);
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * xs + c + 16), w1, acc[t]);
            }
        }
    }
    acc[0] = _mm512_add_ps(acc[0], acc1);
    for (int t = 0; t < nt; t++)
        y[t * ys] = _mm512_reduce_add_ps(acc[t]);
}

static AVX512 void avx512_rows(float *y, int64_t ys, const float *x, int64_t xs, int nt,
                               const struct mf_weight *w, int64_t r) {
    switch (nt) {
    case 1: avx512_row(y, ys, x, xs, 1, w, r); break;
    case 2: avx512_row(y, ys, x, xs, 2, w, r); break;
    case 3: avx512_row(y, ys, x, xs, 3, w, r); break;
    default: avx512_row(y, ys, x, xs, 4, w, r); break;
    }
}

AVX512 void mf_mxfp4_qdot_rows_avx512(float *y, int64_t ys, const float *x, int64_t xs,
                                      int n_tok, const struct mf_weight *w, int64_t r0,
                                      int n_row) {
    for (int t0 = 0; t0 < n_tok; t0 += MX_TOK) {
        const int nt = n_tok - t0 < MX_TOK ? n_tok - t0 : MX_TOK;
        for (int i = 0; i < n_row; i++)
            avx512_rows(y + t0 * ys + i, ys, x + t0 * xs, xs, nt, w, r0 + i);
    }
}

AVX512 void mf_mxfp4_dequant_avx512(float *dst, const struct mf_weight *w, int64_t r,
                                    int64_t c0, int64_t n) {
    const uint8_t *row = row_codes(w, r), *sc = row_scales(w, r);
    const int gs = w->group_size;
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const __m512 lut = avx512_lut(sc[g]);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 16)
            _mm512_storeu_ps(dst + c - c0, avx512_w16(row, c, lut));
    }
}

#endif /* MF_HAVE_X86_KERNELS */
