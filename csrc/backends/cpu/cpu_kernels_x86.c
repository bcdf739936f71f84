/*
 * cpu_kernels_x86.c — the AVX2+FMA and AVX-512 kernel sets (see struct mf_cpu_kernels).
 * Compiled for every x86-64 build with per-function target attributes and chosen at run
 * time by CPU feature (cpu_matmul.c), so the extension needs no -march flag.
 *
 * Codes are widened to one f32 lane per value in natural column order, so x is read as
 * stored and each term is x * (s*q + b) exactly as in the scalar set; only summation
 * order differs. 2/4/8 bits: broadcast the packed word, shift each lane by its own
 * amount, mask. 3/5/6 bits: eight values fill `bits` bytes; a byte shuffle puts the two
 * bytes holding value k into lane k, then shift and mask. dequant rounds s*q and then
 * adds b (no FMA) so it is bitwise equal to the scalar and reference decoders, which the
 * C tests check. AVX-512 looks values of up to 4 bits up in a per-group table instead
 * (see avx512_values16), which gives the same s*q + b values with fewer instructions. Functions taking `const int bits` are always inlined into a switch, so
 * every width gets its own constant-folded loop.
 * On other ISAs this file compiles to nothing (aarch64 uses cpu_kernels_neon.c).
 */
#include "backends/cpu/cpu_internal.h"

#if defined(MF_HAVE_X86_KERNELS)

#include <immintrin.h>
#include <string.h>

/* ==== AVX2 + FMA ==== */

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

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

// n little-endian bytes at p (n <= 12) as two integers, loaded in registers: building
// them through a small buffer on the stack stalls on store forwarding.
static inline __attribute__((always_inline)) void load_le(const uint8_t *p, const int n,
                                                         uint64_t *lo, uint64_t *hi) {
    uint64_t q = 0;
    uint32_t d = 0;
    uint16_t h = 0;
    *hi = 0;
    switch (n) {
    case 3: memcpy(&h, p, 2); *lo = h | (uint64_t)p[2] << 16; break;
    case 5: memcpy(&d, p, 4); *lo = d | (uint64_t)p[4] << 32; break;
    case 6: memcpy(&d, p, 4); memcpy(&h, p + 4, 2); *lo = d | (uint64_t)h << 32; break;
    case 10: memcpy(&q, p, 8); memcpy(&h, p + 8, 2); *lo = q; *hi = h; break;
    default: memcpy(&q, p, 8); memcpy(&d, p + 8, 4); *lo = q; *hi = d; break;   // 12
    }
}

// Byte index of the first byte holding value k of a run, and its bit offset there.
#define B0(k, bits) (((k) * (bits)) >> 3)
#define SH(k, bits) (((k) * (bits)) & 7)
// Shuffle control of one 32-bit lane: bytes B0, B0+1 of the run, then zeros.
#define SHUF(k, bits) ((int)(0x80800000u | (uint32_t)B0(k, bits) | ((uint32_t)(B0(k, bits) + 1) << 8)))

// Eight codes starting at column c (a multiple of 8) as f32.
INLINE_AVX2 __m256 avx2_codes8(const uint8_t *row, int64_t c, const int bits) {
    if (bits == 4) {
        uint32_t word;
        memcpy(&word, row + c / 2, 4);
        const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), sh);
        return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    }
    if (bits == 8) {
        __m128i b8 = _mm_loadl_epi64((const __m128i *)(row + c));
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b8));
    }
    if (bits == 2) {
        uint16_t half;
        memcpy(&half, row + c / 4, 2);
        const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(half), sh);
        return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(3)));
    }
    // 3, 5, 6 bits: the run's `bits` bytes in both 128-bit halves, two bytes per lane.
    uint64_t u, unused;
    load_le(row + c / 8 * bits, bits, &u, &unused);
    const __m256i shuf = _mm256_setr_epi32(SHUF(0, bits), SHUF(1, bits), SHUF(2, bits),
                                           SHUF(3, bits), SHUF(4, bits), SHUF(5, bits),
                                           SHUF(6, bits), SHUF(7, bits));
    const __m256i sh = _mm256_setr_epi32(SH(0, bits), SH(1, bits), SH(2, bits), SH(3, bits),
                                         SH(4, bits), SH(5, bits), SH(6, bits), SH(7, bits));
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)u), shuf);
    v = _mm256_srlv_epi32(v, sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << bits) - 1)));
}

INLINE_AVX2 float avx2_qdot_bits(const float *x, const struct mf_weight *w, int64_t r,
                                 const int bits) {
    const int gs = w->group_size;
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int64_t n_group = w->n_in / gs, s0 = r * n_group;
    __m256 tot0 = _mm256_setzero_ps(), tot1 = tot0, tot2 = tot0, tot3 = tot0;
    for (int64_t g = 0; g < n_group; g++) {
        const __m256 s = _mm256_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m256 b = _mm256_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        // Four independent chains (gs >= 32): one chain would wait on FMA latency.
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
            __m256 w0 = _mm256_fmadd_ps(avx2_codes8(row, c, bits), s, b);
            __m256 w1 = _mm256_fmadd_ps(avx2_codes8(row, c + 8, bits), s, b);
            __m256 w2 = _mm256_fmadd_ps(avx2_codes8(row, c + 16, bits), s, b);
            __m256 w3 = _mm256_fmadd_ps(avx2_codes8(row, c + 24, bits), s, b);
            tot0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), w0, tot0);
            tot1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), w1, tot1);
            tot2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 16), w2, tot2);
            tot3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 24), w3, tot3);
        }
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(tot0, tot1), _mm256_add_ps(tot2, tot3)));
}

static AVX2 float avx2_qdot(const float *x, const struct mf_weight *w, int64_t r) {
    switch (w->bits) {
    case 2: return avx2_qdot_bits(x, w, r, 2);
    case 3: return avx2_qdot_bits(x, w, r, 3);
    case 4: return avx2_qdot_bits(x, w, r, 4);
    case 5: return avx2_qdot_bits(x, w, r, 5);
    case 6: return avx2_qdot_bits(x, w, r, 6);
    default: return avx2_qdot_bits(x, w, r, 8);
    }
}

INLINE_AVX2 void avx2_dequant_bits(float *dst, const struct mf_weight *w, int64_t r,
                                   int64_t c0, int64_t n, const int bits) {
    const int gs = w->group_size;
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int64_t s0 = r * (w->n_in / gs);
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const __m256 s = _mm256_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m256 b = _mm256_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8)
            _mm256_storeu_ps(dst + (c - c0),
                             _mm256_add_ps(_mm256_mul_ps(avx2_codes8(row, c, bits), s), b));
    }
}

static AVX2 void avx2_dequant(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                              int64_t n) {
    switch (w->bits) {
    case 2: avx2_dequant_bits(dst, w, r, c0, n, 2); break;
    case 3: avx2_dequant_bits(dst, w, r, c0, n, 3); break;
    case 4: avx2_dequant_bits(dst, w, r, c0, n, 4); break;
    case 5: avx2_dequant_bits(dst, w, r, c0, n, 5); break;
    case 6: avx2_dequant_bits(dst, w, r, c0, n, 6); break;
    default: avx2_dequant_bits(dst, w, r, c0, n, 8); break;
    }
}

// 4 rows x 2 tokens per block (8 accumulators of the 16 ymm registers); leftover rows
// and tokens go through avx2_dot.
static AVX2 void avx2_gemm_tile(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                                int n_tok, const float *w, int64_t w_stride, int n_row,
                                int64_t n) {
    int t = 0;
    for (; t + 2 <= n_tok; t += 2) {
        const float *x0 = x + t * x_stride, *x1 = x0 + x_stride;
        int r = 0;
        for (; r + 4 <= n_row; r += 4) {
            const float *w0 = w + r * w_stride, *w1 = w0 + w_stride, *w2 = w1 + w_stride,
                        *w3 = w2 + w_stride;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                __m256 u0 = _mm256_loadu_ps(x0 + i), u1 = _mm256_loadu_ps(x1 + i);
                __m256 v = _mm256_loadu_ps(w0 + i);
                a00 = _mm256_fmadd_ps(u0, v, a00);
                a10 = _mm256_fmadd_ps(u1, v, a10);
                v = _mm256_loadu_ps(w1 + i);
                a01 = _mm256_fmadd_ps(u0, v, a01);
                a11 = _mm256_fmadd_ps(u1, v, a11);
                v = _mm256_loadu_ps(w2 + i);
                a02 = _mm256_fmadd_ps(u0, v, a02);
                a12 = _mm256_fmadd_ps(u1, v, a12);
                v = _mm256_loadu_ps(w3 + i);
                a03 = _mm256_fmadd_ps(u0, v, a03);
                a13 = _mm256_fmadd_ps(u1, v, a13);
            }
            float s[2][4] = {{hsum8(a00), hsum8(a01), hsum8(a02), hsum8(a03)},
                             {hsum8(a10), hsum8(a11), hsum8(a12), hsum8(a13)}};
            for (; i < n; i++)
                for (int k = 0; k < 4; k++) {
                    s[0][k] += x0[i] * w[(r + k) * w_stride + i];
                    s[1][k] += x1[i] * w[(r + k) * w_stride + i];
                }
            for (int k = 0; k < 4; k++) {
                y[t * y_stride + r + k] += s[0][k];
                y[(t + 1) * y_stride + r + k] += s[1][k];
            }
        }
        for (; r < n_row; r++) {
            y[t * y_stride + r] += avx2_dot(x0, w + r * w_stride, n);
            y[(t + 1) * y_stride + r] += avx2_dot(x1, w + r * w_stride, n);
        }
    }
    for (; t < n_tok; t++)
        for (int r = 0; r < n_row; r++)
            y[t * y_stride + r] += avx2_dot(x + t * x_stride, w + r * w_stride, n);
}

static AVX2 void avx2_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++)
        dst[i] = mf_bf16_to_f32(src[i]);
}

static AVX2 float avx2_scale_dot(float *row, float g, const float *k, int64_t n) {
    const __m256 vg = _mm256_set1_ps(g);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 r0 = _mm256_mul_ps(_mm256_loadu_ps(row + i), vg);
        __m256 r1 = _mm256_mul_ps(_mm256_loadu_ps(row + i + 8), vg);
        _mm256_storeu_ps(row + i, r0);
        _mm256_storeu_ps(row + i + 8, r1);
        s0 = _mm256_fmadd_ps(r0, _mm256_loadu_ps(k + i), s0);
        s1 = _mm256_fmadd_ps(r1, _mm256_loadu_ps(k + i + 8), s1);
    }
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) {
        row[i] *= g;
        s += row[i] * k[i];
    }
    return s;
}

static AVX2 float avx2_axpy_dot(float *row, float d, const float *k, const float *q,
                                int64_t n) {
    const __m256 vd = _mm256_set1_ps(d);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 r0 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(k + i), _mm256_loadu_ps(row + i));
        __m256 r1 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(k + i + 8),
                                    _mm256_loadu_ps(row + i + 8));
        _mm256_storeu_ps(row + i, r0);
        _mm256_storeu_ps(row + i + 8, r1);
        s0 = _mm256_fmadd_ps(r0, _mm256_loadu_ps(q + i), s0);
        s1 = _mm256_fmadd_ps(r1, _mm256_loadu_ps(q + i + 8), s1);
    }
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) {
        row[i] += d * k[i];
        s += row[i] * q[i];
    }
    return s;
}

const struct mf_cpu_kernels mf_cpu_kernels_avx2 = {
    .name = "avx2",
    .dot = avx2_dot,
    .axpy = avx2_axpy,
    .qdot = avx2_qdot,
    .dequant = avx2_dequant,
    .gemm_tile = avx2_gemm_tile,
    .bf16_to_f32 = avx2_bf16_to_f32,
    .scale_dot = avx2_scale_dot,
    .axpy_dot = avx2_axpy_dot,
};

/* ==== AVX-512 (F + BW) ==== */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma")))
#define INLINE_AVX512 \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx2,fma")))

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

// Sixteen codes starting at column c (a multiple of 16), one per 32-bit lane, with
// other bits of the stream above them unless `masked` (8-bit codes are always exact).
INLINE_AVX512 __m512i avx512_raw16(const uint8_t *row, int64_t c, const int bits,
                                   const int masked) {
    __m512i v;
    if (bits == 8)
        return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c)));
    if (bits == 4) {
        // Two words, each spread over eight lanes, then shifted per lane.
        const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16,
                                             20, 24, 28);
        v = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(row + c / 2)));
        v = _mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, v), sh);
    } else if (bits == 2) {
        uint32_t word;
        memcpy(&word, row + c / 4, 4);
        const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                             26, 28, 30);
        v = _mm512_srlv_epi32(_mm512_set1_epi32((int)word), sh);
    } else {
        // 3, 5, 6 bits: two runs (2*bits <= 12 bytes) in every 128-bit lane, two bytes
        // per 32-bit lane.
        uint64_t lo, hi;
        load_le(row + c / 8 * bits, 2 * bits, &lo, &hi);
        const __m512i shuf = _mm512_setr_epi32(
            SHUF(0, bits), SHUF(1, bits), SHUF(2, bits), SHUF(3, bits), SHUF(4, bits),
            SHUF(5, bits), SHUF(6, bits), SHUF(7, bits), SHUF(8, bits), SHUF(9, bits),
            SHUF(10, bits), SHUF(11, bits), SHUF(12, bits), SHUF(13, bits), SHUF(14, bits),
            SHUF(15, bits));
        const __m512i sh = _mm512_setr_epi32(
            SH(0, bits), SH(1, bits), SH(2, bits), SH(3, bits), SH(4, bits), SH(5, bits),
            SH(6, bits), SH(7, bits), SH(8, bits), SH(9, bits), SH(10, bits), SH(11, bits),
            SH(12, bits), SH(13, bits), SH(14, bits), SH(15, bits));
        v = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)hi, (long long)lo));
        v = _mm512_srlv_epi32(_mm512_shuffle_epi8(v, shuf), sh);
    }
    return masked ? _mm512_and_si512(v, _mm512_set1_epi32((1 << bits) - 1)) : v;
}

// The sixteen dequantized values starting at column c. Widths up to 4 bits look the
// values up in a table of the group's 16 possible s*q + b (lut): vpermps reads only the
// low four bits of each lane, and lut[i] = s*(i mod 2^bits) + b, so stray stream bits
// above a code select an equal entry and no mask or int->float conversion is needed.
INLINE_AVX512 __m512 avx512_values16(const uint8_t *row, int64_t c, const int bits,
                                     __m512 s, __m512 b, __m512 lut) {
    if (bits <= 4)
        return _mm512_permutexvar_ps(avx512_raw16(row, c, bits, 0), lut);
    __m512 q = _mm512_cvtepi32_ps(avx512_raw16(row, c, bits, 1));
    return _mm512_add_ps(_mm512_mul_ps(q, s), b);
}

// s * (i mod 2^bits) + b for i < 16 (product rounded, then the sum: as the scalar set).
INLINE_AVX512 __m512 avx512_lut(__m512 s, __m512 b, const int bits) {
    const __m512i i = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int m = bits < 4 ? (1 << bits) - 1 : 15;
    __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(i, _mm512_set1_epi32(m)));
    return _mm512_add_ps(_mm512_mul_ps(q, s), b);
}

INLINE_AVX512 float avx512_qdot_bits(const float *x, const struct mf_weight *w, int64_t r,
                                     const int bits) {
    const int gs = w->group_size;
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int64_t n_group = w->n_in / gs, s0 = r * n_group;
    __m512 tot0 = _mm512_setzero_ps(), tot1 = tot0;
    for (int64_t g = 0; g < n_group; g++) {
        const __m512 s = _mm512_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m512 b = _mm512_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        const __m512 lut = avx512_lut(s, b, bits);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
            __m512 w0 = avx512_values16(row, c, bits, s, b, lut);
            __m512 w1 = avx512_values16(row, c + 16, bits, s, b, lut);
            tot0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), w0, tot0);
            tot1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), w1, tot1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1));
}

static AVX512 float avx512_qdot(const float *x, const struct mf_weight *w, int64_t r) {
    switch (w->bits) {
    case 2: return avx512_qdot_bits(x, w, r, 2);
    case 3: return avx512_qdot_bits(x, w, r, 3);
    case 4: return avx512_qdot_bits(x, w, r, 4);
    case 5: return avx512_qdot_bits(x, w, r, 5);
    case 6: return avx512_qdot_bits(x, w, r, 6);
    default: return avx512_qdot_bits(x, w, r, 8);
    }
}

INLINE_AVX512 void avx512_dequant_bits(float *dst, const struct mf_weight *w, int64_t r,
                                       int64_t c0, int64_t n, const int bits) {
    const int gs = w->group_size;
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int64_t s0 = r * (w->n_in / gs);
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const __m512 s = _mm512_set1_ps(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const __m512 b = _mm512_set1_ps(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        const __m512 lut = avx512_lut(s, b, bits);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 16)
            _mm512_storeu_ps(dst + (c - c0), avx512_values16(row, c, bits, s, b, lut));
    }
}

static AVX512 void avx512_dequant(float *dst, const struct mf_weight *w, int64_t r,
                                  int64_t c0, int64_t n) {
    switch (w->bits) {
    case 2: avx512_dequant_bits(dst, w, r, c0, n, 2); break;
    case 3: avx512_dequant_bits(dst, w, r, c0, n, 3); break;
    case 4: avx512_dequant_bits(dst, w, r, c0, n, 4); break;
    case 5: avx512_dequant_bits(dst, w, r, c0, n, 5); break;
    case 6: avx512_dequant_bits(dst, w, r, c0, n, 6); break;
    default: avx512_dequant_bits(dst, w, r, c0, n, 8); break;
    }
}

// 4 rows x 4 tokens per block: 16 accumulators, named one by one so they stay in the
// 32 zmm registers (arrays of vectors get spilled at -O2). The column tail uses masked
// loads; leftover rows and tokens go through avx512_dot.
#define FMA4(a, k, v)                                                                  \
    do {                                                                               \
        a##0##k = _mm512_fmadd_ps(u0, v, a##0##k);                                     \
        a##1##k = _mm512_fmadd_ps(u1, v, a##1##k);                                     \
        a##2##k = _mm512_fmadd_ps(u2, v, a##2##k);                                     \
        a##3##k = _mm512_fmadd_ps(u3, v, a##3##k);                                     \
    } while (0)

static AVX512 void avx512_gemm_tile(float *y, int64_t y_stride, const float *x,
                                    int64_t x_stride, int n_tok, const float *w,
                                    int64_t w_stride, int n_row, int64_t n) {
    int t = 0;
    for (; t + 4 <= n_tok; t += 4) {
        const float *x0 = x + t * x_stride, *x1 = x0 + x_stride, *x2 = x1 + x_stride,
                    *x3 = x2 + x_stride;
        int r = 0;
        for (; r + 4 <= n_row; r += 4) {
            const float *w0 = w + r * w_stride, *w1 = w0 + w_stride, *w2 = w1 + w_stride,
                        *w3 = w2 + w_stride;
            __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
            __m512 a30 = a00, a31 = a00, a32 = a00, a33 = a00;
            for (int64_t i = 0; i < n; i += 16) {
                __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF
                                          : (__mmask16)((1u << (n - i)) - 1u);
                __m512 u0 = _mm512_maskz_loadu_ps(m, x0 + i);
                __m512 u1 = _mm512_maskz_loadu_ps(m, x1 + i);
                __m512 u2 = _mm512_maskz_loadu_ps(m, x2 + i);
                __m512 u3 = _mm512_maskz_loadu_ps(m, x3 + i);
                __m512 v = _mm512_maskz_loadu_ps(m, w0 + i);
                FMA4(a, 0, v);
                v = _mm512_maskz_loadu_ps(m, w1 + i);
                FMA4(a, 1, v);
                v = _mm512_maskz_loadu_ps(m, w2 + i);
                FMA4(a, 2, v);
                v = _mm512_maskz_loadu_ps(m, w3 + i);
                FMA4(a, 3, v);
            }
            float *y0 = y + t * y_stride + r, *y1 = y0 + y_stride, *y2 = y1 + y_stride,
                  *y3 = y2 + y_stride;
            y0[0] += _mm512_reduce_add_ps(a00), y0[1] += _mm512_reduce_add_ps(a01);
            y0[2] += _mm512_reduce_add_ps(a02), y0[3] += _mm512_reduce_add_ps(a03);
            y1[0] += _mm512_reduce_add_ps(a10), y1[1] += _mm512_reduce_add_ps(a11);
            y1[2] += _mm512_reduce_add_ps(a12), y1[3] += _mm512_reduce_add_ps(a13);
            y2[0] += _mm512_reduce_add_ps(a20), y2[1] += _mm512_reduce_add_ps(a21);
            y2[2] += _mm512_reduce_add_ps(a22), y2[3] += _mm512_reduce_add_ps(a23);
            y3[0] += _mm512_reduce_add_ps(a30), y3[1] += _mm512_reduce_add_ps(a31);
            y3[2] += _mm512_reduce_add_ps(a32), y3[3] += _mm512_reduce_add_ps(a33);
        }
        for (; r < n_row; r++) {
            y[t * y_stride + r] += avx512_dot(x0, w + r * w_stride, n);
            y[(t + 1) * y_stride + r] += avx512_dot(x1, w + r * w_stride, n);
            y[(t + 2) * y_stride + r] += avx512_dot(x2, w + r * w_stride, n);
            y[(t + 3) * y_stride + r] += avx512_dot(x3, w + r * w_stride, n);
        }
    }
    for (; t < n_tok; t++)
        for (int r = 0; r < n_row; r++)
            y[t * y_stride + r] += avx512_dot(x + t * x_stride, w + r * w_stride, n);
}

static AVX512 void avx512_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    for (; i < n; i++)
        dst[i] = mf_bf16_to_f32(src[i]);
}

static AVX512 float avx512_scale_dot(float *row, float g, const float *k, int64_t n) {
    const __m512 vg = _mm512_set1_ps(g);
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 r = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + i), vg);
        _mm512_mask_storeu_ps(row + i, m, r);
        s0 = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(m, k + i), s0);
    }
    return _mm512_reduce_add_ps(s0);
}

static AVX512 float avx512_axpy_dot(float *row, float d, const float *k, const float *q,
                                    int64_t n) {
    const __m512 vd = _mm512_set1_ps(d);
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 r = _mm512_fmadd_ps(vd, _mm512_maskz_loadu_ps(m, k + i),
                                   _mm512_maskz_loadu_ps(m, row + i));
        _mm512_mask_storeu_ps(row + i, m, r);
        s0 = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(m, q + i), s0);
    }
    return _mm512_reduce_add_ps(s0);
}

const struct mf_cpu_kernels mf_cpu_kernels_avx512 = {
    .name = "avx512",
    .dot = avx512_dot,
    .axpy = avx512_axpy,
    .qdot = avx512_qdot,
    .dequant = avx512_dequant,
    .gemm_tile = avx512_gemm_tile,
    .bf16_to_f32 = avx512_bf16_to_f32,
    .scale_dot = avx512_scale_dot,
    .axpy_dot = avx512_axpy_dot,
};

#endif /* MF_HAVE_X86_KERNELS */
