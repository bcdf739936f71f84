/*
 * cpu_kernels_x86.c — the AVX2+FMA, AVX-512 and AVX-512 VNNI kernel sets (see struct
 * mf_cpu_kernels).
 * Compiled for every x86-64 build with per-function target attributes and chosen at run
 * time by CPU feature (cpu_matmul.c), so the extension needs no -march flag.
 *
 * Codes are widened to one f32 lane per value. 2/4/8 bits: broadcast the packed word,
 * shift each lane by its own amount, mask. 3/5/6 bits: eight values fill `bits` bytes;
 * a byte shuffle puts the two bytes holding value k into lane k, then shift and mask.
 * dequant rounds s*q and then adds b (no FMA) so it is bitwise equal to the scalar and
 * reference decoders, which the C tests check; AVX-512 looks values of up to 4 bits up
 * in a per-group table of those s*q + b (see avx512_values16), which gives the same
 * values with fewer instructions.
 * qdot_rows (the decode matvec) does several rows per pass and shares each x load
 * between them; its weights are the table's (exactly dequant's) up to 4 bits on
 * AVX-512 and 3 on AVX2, and s*q + b with one FMA (one rounding) above; 4-bit codes
 * there come in a fixed non-column lane order with x permuted to match. Each term is
 * x times such a weight; only the summation order differs from the scalar set.
 * Functions taking `const int bits` are always inlined into a switch, so every width
 * gets its own constant-folded loop.
 * The AVX-512 VNNI set is the AVX-512 one plus a one-token 4-bit product on integer
 * dot products (xsplit, qdot_rows_xs; see its section).
 * On other ISAs this file compiles to nothing (aarch64 uses cpu_kernels_neon.c).
 */
#include "backends/cpu/cpu_internal.h"

#if defined(MF_HAVE_X86_KERNELS)

#include <immintrin.h>
#include <math.h>
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

// Eight codes starting at column c (a multiple of 8), one per 32-bit lane in column
// order, with other bits of the stream above them unless `masked`.
INLINE_AVX2 __m256i avx2_raw8(const uint8_t *row, int64_t c, const int bits,
                              const int masked) {
    __m256i v;
    if (bits == 8)
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + c)));
    if (bits == 4) {
        uint32_t word;
        memcpy(&word, row + c / 2, 4);
        const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        v = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), sh);
    } else if (bits == 2) {
        uint16_t half;
        memcpy(&half, row + c / 4, 2);
        const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        v = _mm256_srlv_epi32(_mm256_set1_epi32(half), sh);
    } else {
        // 3, 5, 6 bits: the run's `bits` bytes in both 128-bit halves, two bytes per
        // lane.
        uint64_t u, unused;
        load_le(row + c / 8 * bits, bits, &u, &unused);
        const __m256i shuf = _mm256_setr_epi32(SHUF(0, bits), SHUF(1, bits), SHUF(2, bits),
                                               SHUF(3, bits), SHUF(4, bits), SHUF(5, bits),
                                               SHUF(6, bits), SHUF(7, bits));
        const __m256i sh = _mm256_setr_epi32(SH(0, bits), SH(1, bits), SH(2, bits),
                                             SH(3, bits), SH(4, bits), SH(5, bits),
                                             SH(6, bits), SH(7, bits));
        v = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)u), shuf);
        v = _mm256_srlv_epi32(v, sh);
    }
    return masked ? _mm256_and_si256(v, _mm256_set1_epi32((1 << bits) - 1)) : v;
}

// Eight codes starting at column c (a multiple of 8) as f32.
INLINE_AVX2 __m256 avx2_codes8(const uint8_t *row, int64_t c, const int bits) {
    return _mm256_cvtepi32_ps(avx2_raw8(row, c, bits, 1));
}

// Prefetch of the bytes [a, a + n) (n a constant): a pass over a few rows streams only
// a few KiB per row set, too short for the hardware prefetcher to pick the streams up
// before they end, so without this a matvec over weights not in cache runs at a
// fraction of the memory bandwidth. Addresses are integers: the next pass's rows may
// lie past the end of the weight (a prefetch never faults, but forming such a pointer
// would be undefined behaviour).
static inline __attribute__((always_inline)) void rows_prefetch(uintptr_t a, const int n) {
    for (int o = 0; o < n; o += 64)
        _mm_prefetch((const char *)(a + o), _MM_HINT_T0);
}

// Prefetch of the scales and biases of rows [r0, r0 + nr) (past the end is harmless: a
// prefetch never faults).
static inline __attribute__((always_inline)) void
rows_prefetch_sb(const struct mf_weight *w, int64_t r0, const int nr) {
    const int64_t n_group = w->n_in / w->group_size;
    const size_t es = mf_dtype_size(w->sdtype), n = (size_t)(nr * n_group) * es;
    const uintptr_t s = (uintptr_t)w->scales + (uintptr_t)(r0 * n_group) * es;
    const uintptr_t b = (uintptr_t)w->biases + (uintptr_t)(r0 * n_group) * es;
    for (size_t o = 0; o < n; o += 64) {
        _mm_prefetch((const char *)(s + o), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + o), _MM_HINT_T0);
    }
}

// Groups whose scales and biases are converted to f32 at a time, ahead of the loop
// over them: keeps the dtype switch and the conversions out of the group loop.
#define SB_CHUNK 64

// dst[0, n) = elements [k, k + n) of a scale or bias array as f32 (exact).
INLINE_AVX2 void avx2_sb_f32(float *dst, const void *src, enum mf_dtype dt, size_t k,
                             int n) {
    int i = 0;
    if (dt == MF_DTYPE_BF16)
        for (; i + 8 <= n; i += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + k + i));
            __m256i v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(v));
        }
    for (; i < n; i++)
        dst[i] = mf_load_f32(src, dt, k + (size_t)i);
}

/* ---- Decode matvec, QROWS_AVX2 rows per pass ----
 * Each x vector loaded feeds every row of the pass, and every row keeps two
 * accumulator chains (one would leave the loop waiting on FMA latency). Widths up to 3 bits take each weight from the group's
 * table of the eight s*q + b (vpermps reads the low three bits of a lane, so stray
 * stream bits above a 2-bit code select an equal entry); wider ones compute s*q + b
 * with one FMA (rounded once). */

#define QROWS_AVX2 4

// The eight weights at column c of one row, bits a constant.
INLINE_AVX2 __m256 avx2_w8(const uint8_t *row, int64_t c, const int bits, __m256 s,
                           __m256 b, __m256 lut) {
    if (bits <= 3)
        return _mm256_permutevar8x32_ps(lut, avx2_raw8(row, c, bits, 0));
    return _mm256_fmadd_ps(avx2_codes8(row, c, bits), s, b);
}

// The sixteen weights at column c (a multiple of 16) of one row as two vectors: 2-bit
// codes come from one 32-bit load shifted two ways (a 16-bit load per eight codes costs
// more in moves than the lookup itself).
INLINE_AVX2 void avx2_w16(const uint8_t *row, int64_t c, const int bits, __m256 s,
                          __m256 b, __m256 lut, __m256 *w0, __m256 *w1) {
    if (bits == 2) {
        uint32_t word;
        memcpy(&word, row + c / 4, 4);
        const __m256i v = _mm256_set1_epi32((int)word);
        const __m256i lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        const __m256i hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
        *w0 = _mm256_permutevar8x32_ps(lut, _mm256_srlv_epi32(v, lo));
        *w1 = _mm256_permutevar8x32_ps(lut, _mm256_srlv_epi32(v, hi));
        return;
    }
    *w0 = avx2_w8(row, c, bits, s, b, lut);
    *w1 = avx2_w8(row, c + 8, bits, s, b, lut);
}

// s * (i mod 2^bits) + b for i < 8 (product rounded, then the sum: as dequant).
INLINE_AVX2 __m256 avx2_lut(__m256 s, __m256 b, const int bits) {
    const __m256i i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i q = _mm256_and_si256(i, _mm256_set1_epi32(bits < 3 ? (1 << bits) - 1 : 7));
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s), b);
}

// The sums of the lanes of v0..v3, in lanes 0..3, by one shared tree; a row's sum
// depends only on its own vector (as avx512_sum4).
INLINE_AVX2 __m128 avx2_sum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[k * ys + i] = sum of v[i] (k = 0) or u[i] (k = 1, when nt is 2) for i < nr.
INLINE_AVX2 void avx2_store_sums(float *y, int64_t ys, const __m256 *v, const __m256 *u,
                                 const int nr, const int nt) {
    float tmp[4];
    for (int k = 0; k < nt; k++) {
        const __m256 *p = k == 0 ? v : u;
        if (nr == 4)
            _mm_storeu_ps(tmp, avx2_sum4(p[0], p[1], p[2], p[3]));
        else if (nr == 2)
            _mm_storeu_ps(tmp, avx2_sum4(p[0], p[1], p[0], p[1]));
        else
            _mm_storeu_ps(tmp, avx2_sum4(p[0], p[0], p[0], p[0]));
        for (int i = 0; i < nr; i++)
            y[k * ys + i] = tmp[i];
    }
}

// The scales and biases of the pass's rows from group g on, as f32: row i's at
// sf[i * n_group] for all groups when `whole` (rows are contiguous in the scale array,
// one conversion), else the next SB_CHUNK groups at sf[i * SB_CHUNK].
INLINE_AVX2 void avx2_pass_sb(float *sf, float *bf, const struct mf_weight *w, int64_t r0,
                              const int nr, int64_t g, int whole) {
    const int64_t n_group = w->n_in / w->group_size;
    if (whole) {
        avx2_sb_f32(sf, w->scales, w->sdtype, (size_t)(r0 * n_group), (int)(nr * n_group));
        avx2_sb_f32(bf, w->biases, w->sdtype, (size_t)(r0 * n_group), (int)(nr * n_group));
        return;
    }
    int n = n_group - g < SB_CHUNK ? (int)(n_group - g) : SB_CHUNK;
    for (int i = 0; i < nr; i++) {
        size_t k = (size_t)((r0 + i) * n_group + g);
        avx2_sb_f32(sf + i * SB_CHUNK, w->scales, w->sdtype, k, n);
        avx2_sb_f32(bf + i * SB_CHUNK, w->biases, w->sdtype, k, n);
    }
}

// y[t * ys + i] = row r0 + i . x[t * xs, ...) for i < nr (nr <= QROWS_AVX2) and t < nt,
// nt 1 or 2, bits a constant (as avx512_rows).
INLINE_AVX2 void avx2_rows(float *y, int64_t ys, const float *x, int64_t xs,
                           const struct mf_weight *w, int64_t r0, const int nr, const int nt,
                           const int bits) {
    const int gs = w->group_size;
    const int64_t n_group = w->n_in / gs, rbytes = w->n_in * bits / 8;
    const uint8_t *row[QROWS_AVX2];
    __m256 a0[QROWS_AVX2], a1[QROWS_AVX2];
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        row[i] = (const uint8_t *)w->w + (r0 + i) * rbytes;
        a0[i] = a1[i] = _mm256_setzero_ps();
    }
    // Row i's converted scales at sf[i * sb_stride] (see avx2_pass_sb).
    float sf[QROWS_AVX2 * SB_CHUNK], bf[QROWS_AVX2 * SB_CHUNK];
    const int whole = n_group <= SB_CHUNK;
    const int64_t sb_stride = whole ? n_group : SB_CHUNK;
    const uintptr_t next = (uintptr_t)row[0] + (uintptr_t)(nr * rbytes);   // the next pass's rows
    rows_prefetch_sb(w, r0 + nr, nr);
    for (int64_t g = 0; g < n_group; g++) {
        const int64_t gi = g % SB_CHUNK;
        if (gi == 0 && (g == 0 || !whole))
            avx2_pass_sb(sf, bf, w, r0, nr, g, whole);
        __m256 s[QROWS_AVX2], b[QROWS_AVX2], lut[QROWS_AVX2];
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            s[i] = _mm256_set1_ps(sf[i * sb_stride + gi]);
            b[i] = _mm256_set1_ps(bf[i * sb_stride + gi]);
            lut[i] = bits <= 3 ? avx2_lut(s[i], b[i], bits) : s[i];
        }
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 16) {
            rows_prefetch(next + (uintptr_t)(c / 8 * bits * nr), bits * 2 * nr);
            const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                __m256 w0, w1;
                avx2_w16(row[i], c, bits, s[i], b[i], lut[i], &w0, &w1);
                if (nt == 1) {
                    a0[i] = _mm256_fmadd_ps(x0, w0, a0[i]);
                    a1[i] = _mm256_fmadd_ps(x1, w1, a1[i]);
                } else {
                    a0[i] = _mm256_fmadd_ps(x1, w1, _mm256_fmadd_ps(x0, w0, a0[i]));
                    a1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + xs + c + 8), w1,
                                            _mm256_fmadd_ps(_mm256_loadu_ps(x + xs + c), w0,
                                                            a1[i]));
                }
            }
        }
    }
    if (nt == 1) {
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++)
            a0[i] = _mm256_add_ps(a0[i], a1[i]);
    }
    avx2_store_sums(y, ys, a0, a1, nr, nt);
}

// Rows [i, i + nr) for every token, two tokens per pass (as avx512_rows_tokens).
INLINE_AVX2 void avx2_rows_tokens(float *y, int64_t ys, const float *x, int64_t xs,
                                  int n_tok, const struct mf_weight *w, int64_t r0,
                                  const int nr, const int bits) {
    int t = 0;
    for (; t + 2 <= n_tok; t += 2)
        avx2_rows(y + t * ys, ys, x + t * xs, xs, w, r0, nr, 2, bits);
    if (t < n_tok)
        avx2_rows(y + t * ys, ys, x + t * xs, xs, w, r0, nr, 1, bits);
}

INLINE_AVX2 void avx2_qdot_rows_bits(float *y, int64_t ys, const float *x, int64_t xs,
                                     int n_tok, const struct mf_weight *w, int64_t r0,
                                     int n_row, const int bits) {
    // Widths above 3 bits keep s and b per row in registers besides the accumulators:
    // four rows of them overflow the sixteen ymm registers (accumulators spilled in the
    // inner loop, 40% slower), two do not.
    const int nr = bits <= 3 ? QROWS_AVX2 : 2;
    int i = 0;
    for (; i + nr <= n_row; i += nr)
        avx2_rows_tokens(y + i, ys, x, xs, n_tok, w, r0 + i, nr, bits);
    for (; i < n_row; i++)
        avx2_rows_tokens(y + i, ys, x, xs, n_tok, w, r0 + i, 1, bits);
}

static AVX2 void avx2_qdot_rows(float *y, int64_t ys, const float *x, int64_t xs,
                                int n_tok, const struct mf_weight *w, int64_t r0,
                                int n_row) {
    switch (w->bits) {
    case 2: avx2_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 2); break;
    case 3: avx2_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 3); break;
    case 4: avx2_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 4); break;
    case 5: avx2_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 5); break;
    case 6: avx2_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 6); break;
    default: avx2_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 8); break;
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
    .qdot_rows = avx2_qdot_rows,
    .qdot_max_tok = 4,
    .dequant = avx2_dequant,
    .qdot_rows_mxfp4 = mf_mxfp4_qdot_rows_avx2,
    .dequant_mxfp4 = mf_mxfp4_dequant_avx2,
    .gemm_tile = avx2_gemm_tile,
    .bf16_to_f32 = avx2_bf16_to_f32,
    .scale_dot = avx2_scale_dot,
    .axpy_dot = avx2_axpy_dot,
};

/* ==== AVX-512 (F + BW) ==== */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define INLINE_AVX512 \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma")))

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
        // per 32-bit lane. The masked load reads exactly the runs' bytes (nothing past
        // the end of the weight) without assembling them in scalar registers.
        const __m128i runs = _mm_maskz_loadu_epi8((__mmask16)((1u << (2 * bits)) - 1u),
                                                  row + c / 8 * bits);
        const __m512i shuf = _mm512_setr_epi32(
            SHUF(0, bits), SHUF(1, bits), SHUF(2, bits), SHUF(3, bits), SHUF(4, bits),
            SHUF(5, bits), SHUF(6, bits), SHUF(7, bits), SHUF(8, bits), SHUF(9, bits),
            SHUF(10, bits), SHUF(11, bits), SHUF(12, bits), SHUF(13, bits), SHUF(14, bits),
            SHUF(15, bits));
        const __m512i sh = _mm512_setr_epi32(
            SH(0, bits), SH(1, bits), SH(2, bits), SH(3, bits), SH(4, bits), SH(5, bits),
            SH(6, bits), SH(7, bits), SH(8, bits), SH(9, bits), SH(10, bits), SH(11, bits),
            SH(12, bits), SH(13, bits), SH(14, bits), SH(15, bits));
        v = _mm512_srlv_epi32(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(runs), shuf), sh);
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

/* ---- Decode matvec, QROWS rows per pass ----
 * Each x vector loaded feeds QROWS rows, and every row keeps two accumulator chains, so
 * the loop is bound by decoding the codes, not by FMA latency or x loads. Widths up to
 * 4 bits take each weight from the group's table (exactly s*q + b, as dequant); wider
 * ones compute it with one FMA, s*q + b rounded once. 4-bit codes are unpacked into a
 * fixed lane order (rows_codes16) and x is permuted to match once per pass, for all
 * rows: cheaper than putting codes in column order row by row. */

#define QROWS 4

// Codes of one row at column c (a multiple of 16), one per lane in the order
// rows_x16 gives x, with stray stream bits above them for widths up to 4 (the table
// lookup reads only the low four bits) and masked for wider ones.
INLINE_AVX512 __m512i rows_codes16(const uint8_t *row, int64_t c, const int bits) {
    if (bits == 2) {
        uint32_t word;
        memcpy(&word, row + c / 4, 4);
        const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                             26, 28, 30);
        return _mm512_srlv_epi32(_mm512_set1_epi32((int)word), sh);
    }
    if (bits == 4) {
        // The 64-bit word in every qword lane, qword j shifted by 4j: its low dword
        // starts at code j, its high dword at code j + 8.
        uint64_t word;
        memcpy(&word, row + c / 2, 8);
        const __m512i sh = _mm512_setr_epi64(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm512_srlv_epi64(_mm512_set1_epi64((long long)word), sh);
    }
    return avx512_raw16(row, c, bits, bits > 4);
}

// x[c, c + 16) in the lane order of rows_codes16.
INLINE_AVX512 __m512 rows_x16(const float *x, const int bits) {
    if (bits != 4)
        return _mm512_loadu_ps(x);
    const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7,
                                          15);
    return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x));
}

// The weights of codes q: table lookup up to 4 bits, s*q + b (one rounding) above.
INLINE_AVX512 __m512 rows_w16(__m512i q, const int bits, __m512 s, __m512 b, __m512 lut) {
    if (bits <= 4)
        return _mm512_permutexvar_ps(q, lut);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, b);
}

// dst[0, n) = elements [k, k + n) of a scale or bias array as f32 (exact).
INLINE_AVX512 void avx512_sb_f32(float *dst, const void *src, enum mf_dtype dt, size_t k,
                                 int n) {
    if (dt != MF_DTYPE_BF16) {
        for (int i = 0; i < n; i++)
            dst[i] = mf_load_f32(src, dt, k + (size_t)i);
        return;
    }
    const uint16_t *p = (const uint16_t *)src + k;
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p + i));
        _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
}

// The sums of the lanes of v0..v3, in lanes 0..3: one shared tree (fewer shuffles
// than four separate reductions, which matter for short rows). A row's sum depends
// only on its own vector, so a row gives the same result whatever the others are.
INLINE_AVX512 __m128 avx512_sum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), \
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 h01 = _mm256_hadd_ps(HALVES(v0), HALVES(v1));
    __m256 h23 = _mm256_hadd_ps(HALVES(v2), HALVES(v3));
#undef HALVES
    __m256 h = _mm256_hadd_ps(h01, h23);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[k * ys + i] = sum of v[i] (k = 0) or u[i] (k = 1, when nt is 2) for i < nr.
INLINE_AVX512 void avx512_store_sums(float *y, int64_t ys, const __m512 *v,
                                     const __m512 *u, const int nr, const int nt) {
    float tmp[4];
    for (int k = 0; k < nt; k++) {
        const __m512 *p = k == 0 ? v : u;
        if (nr == QROWS) {
            _mm_storeu_ps(tmp, avx512_sum4(p[0], p[1], p[2], p[3]));
        } else {
            _mm_storeu_ps(tmp, avx512_sum4(p[0], p[0], p[0], p[0]));
        }
        for (int i = 0; i < nr; i++)
            y[k * ys + i] = tmp[i];
    }
}

// The scales and biases of the pass's rows from group g on, as f32: row i's at
// sf[i * n_group] for all groups when `whole` (rows are contiguous in the scale array,
// one conversion), else the next SB_CHUNK groups at sf[i * SB_CHUNK].
INLINE_AVX512 void avx512_pass_sb(float *sf, float *bf, const struct mf_weight *w, int64_t r0,
                              const int nr, int64_t g, int whole) {
    const int64_t n_group = w->n_in / w->group_size;
    if (whole) {
        avx512_sb_f32(sf, w->scales, w->sdtype, (size_t)(r0 * n_group), (int)(nr * n_group));
        avx512_sb_f32(bf, w->biases, w->sdtype, (size_t)(r0 * n_group), (int)(nr * n_group));
        return;
    }
    int n = n_group - g < SB_CHUNK ? (int)(n_group - g) : SB_CHUNK;
    for (int i = 0; i < nr; i++) {
        size_t k = (size_t)((r0 + i) * n_group + g);
        avx512_sb_f32(sf + i * SB_CHUNK, w->scales, w->sdtype, k, n);
        avx512_sb_f32(bf + i * SB_CHUNK, w->biases, w->sdtype, k, n);
    }
}

// y[t * ys + i] = row r0 + i . x[t * xs, ...) for i < nr (nr <= QROWS) and t < nt, nt
// 1 or 2, bits a constant. One token keeps two accumulator chains per row; two tokens
// share each decoded weight vector and keep one chain per row and token.
INLINE_AVX512 void avx512_rows(float *y, int64_t ys, const float *x, int64_t xs,
                               const struct mf_weight *w, int64_t r0, const int nr,
                               const int nt, const int bits) {
    const int gs = w->group_size;
    const int64_t n_group = w->n_in / gs, rbytes = w->n_in * bits / 8;
    const uint8_t *row[QROWS];
    __m512 a0[QROWS], a1[QROWS];
    // Row i's converted scales at sf[i * sb_stride] (see avx512_pass_sb).
    float sf[QROWS * SB_CHUNK], bf[QROWS * SB_CHUNK];
    const int whole = n_group <= SB_CHUNK;
    const int64_t sb_stride = whole ? n_group : SB_CHUNK;
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        row[i] = (const uint8_t *)w->w + (r0 + i) * rbytes;
        a0[i] = a1[i] = _mm512_setzero_ps();
    }
    // The next pass's rows follow these in memory: they are prefetched as these are
    // read, at the same pace (see rows_prefetch).
    const uintptr_t next = (uintptr_t)row[0] + (uintptr_t)(nr * rbytes);
    rows_prefetch_sb(w, r0 + nr, nr);
    for (int64_t g = 0; g < n_group; g++) {
        const int64_t gi = g % SB_CHUNK;
        if (gi == 0 && (g == 0 || !whole))
            avx512_pass_sb(sf, bf, w, r0, nr, g, whole);
        __m512 s[QROWS], b[QROWS], lut[QROWS];
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            s[i] = _mm512_set1_ps(sf[i * sb_stride + gi]);
            b[i] = _mm512_set1_ps(bf[i * sb_stride + gi]);
            lut[i] = bits <= 4 ? avx512_lut(s[i], b[i], bits) : s[i];
        }
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
            rows_prefetch(next + (uintptr_t)(c / 8 * bits * nr), bits * 4 * nr);
            const __m512 x0 = rows_x16(x + c, bits), x1 = rows_x16(x + c + 16, bits);
            __m512 u0 = x0, u1 = x1;   // token 1's, when there is one
            if (nt == 2) {
                u0 = rows_x16(x + xs + c, bits);
                u1 = rows_x16(x + xs + c + 16, bits);
            }
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                __m512 w0 = rows_w16(rows_codes16(row[i], c, bits), bits, s[i], b[i], lut[i]);
                __m512 w1 = rows_w16(rows_codes16(row[i], c + 16, bits), bits, s[i], b[i],
                                     lut[i]);
                if (nt == 1) {
                    a0[i] = _mm512_fmadd_ps(x0, w0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(x1, w1, a1[i]);
                } else {
                    a0[i] = _mm512_fmadd_ps(x1, w1, _mm512_fmadd_ps(x0, w0, a0[i]));
                    a1[i] = _mm512_fmadd_ps(u1, w1, _mm512_fmadd_ps(u0, w0, a1[i]));
                }
            }
        }
    }
    if (nt == 1) {
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++)
            a0[i] = _mm512_add_ps(a0[i], a1[i]);
    }
    avx512_store_sums(y, ys, a0, a1, nr, nt);
}

// Rows [i, i + nr) for every token, two tokens per pass while two are left: the
// row set's codes stay in L1 from one pass to the next.
INLINE_AVX512 void avx512_rows_tokens(float *y, int64_t ys, const float *x, int64_t xs,
                                      int n_tok, const struct mf_weight *w, int64_t r0,
                                      const int nr, const int bits) {
    int t = 0;
    for (; t + 2 <= n_tok; t += 2)
        avx512_rows(y + t * ys, ys, x + t * xs, xs, w, r0, nr, 2, bits);
    if (t < n_tok)
        avx512_rows(y + t * ys, ys, x + t * xs, xs, w, r0, nr, 1, bits);
}

INLINE_AVX512 void avx512_qdot_rows_bits(float *y, int64_t ys, const float *x, int64_t xs,
                                         int n_tok, const struct mf_weight *w, int64_t r0,
                                         int n_row, const int bits) {
    int i = 0;
    for (; i + QROWS <= n_row; i += QROWS)
        avx512_rows_tokens(y + i, ys, x, xs, n_tok, w, r0 + i, QROWS, bits);
    for (; i < n_row; i++)
        avx512_rows_tokens(y + i, ys, x, xs, n_tok, w, r0 + i, 1, bits);
}

static AVX512 void avx512_qdot_rows(float *y, int64_t ys, const float *x, int64_t xs,
                                    int n_tok, const struct mf_weight *w, int64_t r0,
                                    int n_row) {
    switch (w->bits) {
    case 2: avx512_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 2); break;
    case 3: avx512_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 3); break;
    case 4: avx512_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 4); break;
    case 5: avx512_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 5); break;
    case 6: avx512_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 6); break;
    default: avx512_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 8); break;
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

// The AVX-512 entries, shared by the VNNI set below.
#define AVX512_ENTRIES                                                                 \
    .dot = avx512_dot, .axpy = avx512_axpy, .qdot_rows = avx512_qdot_rows,            \
    .qdot_max_tok = 4, .dequant = avx512_dequant,                                      \
    .qdot_rows_mxfp4 = mf_mxfp4_qdot_rows_avx512,                                      \
    .dequant_mxfp4 = mf_mxfp4_dequant_avx512, .gemm_tile = avx512_gemm_tile,           \
    .bf16_to_f32 = avx512_bf16_to_f32, .scale_dot = avx512_scale_dot,                  \
    .axpy_dot = avx512_axpy_dot

const struct mf_cpu_kernels mf_cpu_kernels_avx512 = {.name = "avx512", AVX512_ENTRIES};

/* ==== AVX-512 VNNI: the one-token 4-bit product on integer dot products ====
 * x is split once per call (avx512vnni_xsplit, called by mf_cpu_matmul before the row
 * tasks): group g's values are integers Y times unit_g = 2^(k - 26), where 2^k <= the
 * group's largest |x| < 2^(k+1), so |Y| <= 2^27 and Y = round(x / unit_g) is within
 * 2^-27 of that largest value (below the rounding of a float product with it), and Y
 * is four base-128 digits (the top one signed), each a byte. vpdpbusd multiplies 64
 * codes (unsigned bytes) by 64 digits and adds four products a lane; two digits
 * chained with a shift make a 21-bit exact integer, two of those one float with one
 * rounding. Per group: sum_c w_c x_c = s_g unit_g sum_c q_c Y_c + b_g sum_c x_c. About
 * 0.6 of the vector instructions of avx512_rows per weight (bench/RESULTS.md). */

#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define INLINE_VNNI \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

// Digits of 16 values x (floats) scaled by 2^e into bytes d[0], d[64], d[128], d[192].
INLINE_VNNI void xsplit16(int8_t *d, __m512 x, __m512 e) {
    const __m512i y = _mm512_cvtps_epi32(_mm512_scalef_ps(x, e));   // nearest, |y| <= 2^27
    const __m512i m7 = _mm512_set1_epi32(127);
    _mm_storeu_si128((__m128i *)d, _mm512_cvtepi32_epi8(_mm512_srai_epi32(y, 21)));
    _mm_storeu_si128((__m128i *)(d + 64),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srai_epi32(y, 14), m7)));
    _mm_storeu_si128((__m128i *)(d + 128),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srai_epi32(y, 7), m7)));
    _mm_storeu_si128((__m128i *)(d + 192), _mm512_cvtepi32_epi8(_mm512_and_si512(y, m7)));
}

// One 64-column chunk: even columns to lanes 0..31, odd ones to 32..63 (the order in
// which avx512vnni_codes64 unpacks a row's codes).
INLINE_VNNI void xsplit_chunk(int8_t *d, const float *x, __m512 e) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int h = 0; h < 2; h++) {
        const __m512 a = _mm512_loadu_ps(x + 32 * h), b = _mm512_loadu_ps(x + 32 * h + 16);
        xsplit16(d + 16 * h, _mm512_permutex2var_ps(a, ev, b), e);
        xsplit16(d + 32 + 16 * h, _mm512_permutex2var_ps(a, od, b), e);
    }
}

// The group's largest |x|, or -1 when it holds a non-finite value.
INLINE_VNNI float xsplit_max(const float *x, int gs) {
    const __m512i ex = _mm512_set1_epi32(0x7f800000);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int c = 0; c < gs; c += 16) {
        const __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + c),
                                           _mm512_set1_epi32(0x7fffffff));
        bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, ex), ex);
        mx = _mm512_max_ps(mx, _mm512_castsi512_ps(v));
    }
    return bad ? -1.0f : _mm512_reduce_max_ps(mx);
}

static AVX512VNNI int avx512vnni_xsplit(struct mf_xsplit *s, const float *x) {
    const int gs = s->gs;
    for (int64_t g = 0; g < s->n_in / gs; g++) {
        const float *xg = x + g * gs;
        const float mx = xsplit_max(xg, gs);
        // Non-finite, or so small that unit_g would not be a normal float: the caller
        // takes qdot_rows instead.
        if (mx < 0.0f || (mx != 0.0f && mx < 0x1p-96f))
            return 0;
        int k = 0;
        if (mx != 0.0f)
            frexpf(mx, &k), k--;   // 2^k <= mx < 2^(k+1)
        s->unit[g] = ldexpf(1.0f, k - 26);
        const __m512 e = _mm512_set1_ps((float)(26 - k));
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < gs; c += 64) {
            xsplit_chunk(s->parts + (g * gs + c) * 4, xg + c, e);
            for (int j = 0; j < 64; j += 16)
                sum = _mm512_add_ps(sum, _mm512_loadu_ps(xg + c + j));
        }
        s->sum[g] = _mm512_reduce_add_ps(sum);
    }
    return 1;
}

// 64 codes of a row from column c (a multiple of 64) as bytes: the 32 low nibbles
// (even columns), then the 32 high ones.
INLINE_VNNI __m512i avx512vnni_codes64(const uint8_t *row, int64_t c) {
    const __m512i sh = _mm512_setr_epi64(0, 0, 0, 0, 0x0004000400040004LL,
                                         0x0004000400040004LL, 0x0004000400040004LL,
                                         0x0004000400040004LL);
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + c / 2)));
    return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(0x0f));
}

// Columns [c, c + 64) of the pass's rows: the digit products into hi, lo (set when
// `first`, else added).
INLINE_VNNI void vnni_chunk(__m512i *hi, __m512i *lo, const uint8_t *const *row,
                            const struct mf_xsplit *xs, int64_t c, uintptr_t next,
                            const int nr, const int first) {
    rows_prefetch(next + (uintptr_t)(c / 2 * nr), 32 * nr);
    const int8_t *d = xs->parts + c * 4;
    const __m512i d3 = _mm512_loadu_si512(d), d2 = _mm512_loadu_si512(d + 64);
    const __m512i d1 = _mm512_loadu_si512(d + 128), d0 = _mm512_loadu_si512(d + 192);
    const __m512i z = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        const __m512i q = avx512vnni_codes64(row[i], c);
        const __m512i h =
            _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(z, q, d3), 7), q, d2);
        const __m512i l =
            _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(z, q, d1), 7), q, d0);
        hi[i] = first ? h : _mm512_add_epi32(hi[i], h);
        lo[i] = first ? l : _mm512_add_epi32(lo[i], l);
    }
}

// For the pass's converted scales and biases of groups [g, g + min(n, SB_CHUNK)): each
// scale times the group's unit (exact: a power of two), and the rows' bias terms
// b_g sum_g x added into bsum.
INLINE_VNNI void vnni_pass_terms(float *bsum, float *sf, const float *bf,
                                 const struct mf_xsplit *xs, int64_t g, int64_t n,
                                 int64_t stride, const int nr) {
    n = n < SB_CHUNK ? n : SB_CHUNK;
    for (int i = 0; i < nr; i++)
        bsum[i] += avx512_dot(bf + i * stride, xs->sum + g, n);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __m512 u = _mm512_maskz_loadu_ps(m, xs->unit + g + j);
        for (int i = 0; i < nr; i++) {
            float *p = sf + i * stride + j;
            _mm512_mask_storeu_ps(p, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p), u));
        }
    }
}

// Rows [r0, r0 + nr) of a 4-bit weight (gs 64 or 128) against the split x.
INLINE_VNNI void avx512vnni_rows(float *y, const struct mf_xsplit *xs,
                                 const struct mf_weight *w, int64_t r0, const int nr,
                                 const int gs) {
    const int64_t n_group = w->n_in / gs, rbytes = w->n_in / 2;
    const uint8_t *row[QROWS];
    __m512 fa[QROWS];
    float bsum[QROWS], sf[QROWS * SB_CHUNK], bf[QROWS * SB_CHUNK];
    const int whole = n_group <= SB_CHUNK;
    const int64_t sb_stride = whole ? n_group : SB_CHUNK;
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        row[i] = (const uint8_t *)w->w + (r0 + i) * rbytes;
        fa[i] = _mm512_setzero_ps();
        bsum[i] = 0.0f;
    }
    const uintptr_t next = (uintptr_t)row[0] + (uintptr_t)(nr * rbytes);
    rows_prefetch_sb(w, r0 + nr, nr);
    for (int64_t g = 0; g < n_group; g++) {
        const int64_t gi = g % SB_CHUNK;
        if (gi == 0 && (g == 0 || !whole)) {
            avx512_pass_sb(sf, bf, w, r0, nr, g, whole);
            vnni_pass_terms(bsum, sf, bf, xs, g, whole ? n_group : n_group - g, sb_stride, nr);
        }
        // Per 64 columns: (sum q d3) 2^7 + sum q d2 and the same of d1, d0 (each under
        // 2^20; a group of 128 adds two chunks').
        __m512i hi[QROWS], lo[QROWS];
        vnni_chunk(hi, lo, row, xs, g * gs, next, nr, 1);
        for (int64_t c = g * gs + 64; c < (g + 1) * gs; c += 64)
            vnni_chunk(hi, lo, row, xs, c, next, nr, 0);
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[i]), _mm512_set1_ps(0x1p14f),
                                             _mm512_cvtepi32_ps(lo[i]));
            fa[i] = _mm512_fmadd_ps(f, _mm512_set1_ps(sf[i * sb_stride + gi]), fa[i]);
        }
    }
    avx512_store_sums(y, 0, fa, fa, nr, 1);
    for (int i = 0; i < nr; i++)
        y[i] += bsum[i];
}

// Rows [r0, r0 + n_row): four a pass, then one at a time. (Eight a pass measured
// faster in cache and slower from DRAM: bench/RESULTS.md, session 27.)
INLINE_VNNI void vnni_rows_gs(float *y, const struct mf_xsplit *xs,
                              const struct mf_weight *w, int64_t r0, int n_row,
                              const int gs) {
    int i = 0;
    for (; i + QROWS <= n_row; i += QROWS)
        avx512vnni_rows(y + i, xs, w, r0 + i, QROWS, gs);
    for (; i < n_row; i++)
        avx512vnni_rows(y + i, xs, w, r0 + i, 1, gs);
}

static AVX512VNNI void avx512vnni_qdot_rows_xs(float *y, const struct mf_xsplit *xs,
                                               const struct mf_weight *w, int64_t r0,
                                               int n_row) {
    if (w->group_size == 64)
        vnni_rows_gs(y, xs, w, r0, n_row, 64);
    else
        vnni_rows_gs(y, xs, w, r0, n_row, 128);
}

const struct mf_cpu_kernels mf_cpu_kernels_avx512vnni = {
    .name = "avx512vnni",
    AVX512_ENTRIES,
    .xsplit = avx512vnni_xsplit,
    .qdot_rows_xs = avx512vnni_qdot_rows_xs,
};

#endif /* MF_HAVE_X86_KERNELS */
