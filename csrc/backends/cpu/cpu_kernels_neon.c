/*
 * cpu_kernels_neon.c — the ARM NEON kernel set (aarch64, where Advanced SIMD is always
 * present, so no run-time check). Same entries and arithmetic as the x86 sets
 * (cpu_kernels_x86.c): codes widened to one f32 lane per value in natural column
 * order, dequant as s*q then + b (bitwise equal to the scalar and reference decoders),
 * qdot_rows with s*q + b fused (one rounding) and several rows per pass. 2/4-bit codes come from a duplicated word
 * shifted per lane; 3/5/6-bit from a byte table lookup (TBL) of the run's bytes, the
 * NEON twin of the x86 byte shuffle; 8-bit by widening bytes.
 * On other ISAs this file compiles to nothing.
 */
#include "backends/cpu/cpu_internal.h"

#if defined(MF_HAVE_NEON_KERNELS)

#include <arm_neon.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

static float neon_dot(const float *a, const float *b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4)
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void neon_axpy(float *y, float alpha, const float *x, int64_t n) {
    const float32x4_t va = vdupq_n_f32(alpha);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, vld1q_f32(x + i)));
    for (; i < n; i++)
        y[i] += alpha * x[i];
}

// Byte index of the first byte of value k of a run, its bit offset, and the table-lookup
// indices of one 32-bit lane (the two bytes holding value k; 0xFF reads as zero).
#define B0(k, bits) (((k) * (bits)) >> 3)
#define SH(k, bits) (((k) * (bits)) & 7)
#define LANE(k, bits) (uint8_t)B0(k, bits), (uint8_t)(B0(k, bits) + 1), 0xFF, 0xFF

// The `bits` bytes of the run starting at column c (a multiple of 8), little-endian.
INLINE uint64_t run_bytes(const uint8_t *row, int64_t c, const int bits) {
    const uint8_t *p = row + c / 8 * bits;
    uint64_t u = 0;
    for (int i = 0; i < bits; i++)
        u |= (uint64_t)p[i] << (8 * i);
    return u;
}

// Eight codes starting at column c (a multiple of 8), as two vectors of four.
INLINE void neon_codes8(const uint8_t *row, int64_t c, const int bits, uint32x4_t *lo,
                        uint32x4_t *hi) {
    const uint32x4_t mask = vdupq_n_u32((1u << bits) - 1u);
    if (bits == 8) {
        uint16x8_t h = vmovl_u8(vld1_u8(row + c));
        *lo = vmovl_u16(vget_low_u16(h));
        *hi = vmovl_u16(vget_high_u16(h));
    } else if (bits == 4 || bits == 2) {
        uint32x4_t v = vdupq_n_u32((uint32_t)run_bytes(row, c, bits));
        const int32x4_t s0 = {0, -bits, -2 * bits, -3 * bits};
        const int32x4_t s1 = {-4 * bits, -5 * bits, -6 * bits, -7 * bits};
        *lo = vandq_u32(vshlq_u32(v, s0), mask);
        *hi = vandq_u32(vshlq_u32(v, s1), mask);
    } else {
        uint8x16_t bytes = vreinterpretq_u8_u64(vdupq_n_u64(run_bytes(row, c, bits)));
        const uint8x16_t i0 = {LANE(0, bits), LANE(1, bits), LANE(2, bits), LANE(3, bits)};
        const uint8x16_t i1 = {LANE(4, bits), LANE(5, bits), LANE(6, bits), LANE(7, bits)};
        const int32x4_t s0 = {-SH(0, bits), -SH(1, bits), -SH(2, bits), -SH(3, bits)};
        const int32x4_t s1 = {-SH(4, bits), -SH(5, bits), -SH(6, bits), -SH(7, bits)};
        *lo = vandq_u32(vshlq_u32(vreinterpretq_u32_u8(vqtbl1q_u8(bytes, i0)), s0), mask);
        *hi = vandq_u32(vshlq_u32(vreinterpretq_u32_u8(vqtbl1q_u8(bytes, i1)), s1), mask);
    }
}

/* ---- Decode matvec, QROWS rows per pass ----
 * Each x vector loaded feeds every row of the pass, two accumulator chains per row;
 * each weight is s*q + b with one FMA (rounded once). */

#define QROWS 4

// Prefetch of [a, a + n) (n a constant) and of the scales and biases of rows
// [r0, r0 + nr): a pass streams only a few KiB per row set, too short for the hardware
// prefetcher to pick the streams up before they end. A prefetch never faults, so
// addresses past the end of the weight are harmless; they are integers, as forming
// such a pointer would be undefined behaviour.
INLINE void rows_prefetch(uintptr_t a, const int n) {
    for (int o = 0; o < n; o += 64)
        __builtin_prefetch((const void *)(a + o));
}

INLINE void rows_prefetch_sb(const struct mf_weight *w, int64_t r0, const int nr) {
    const int64_t n_group = w->n_in / w->group_size;
    const size_t es = mf_dtype_size(w->sdtype), n = (size_t)(nr * n_group) * es;
    const uintptr_t s = (uintptr_t)w->scales + (uintptr_t)(r0 * n_group) * es;
    const uintptr_t b = (uintptr_t)w->biases + (uintptr_t)(r0 * n_group) * es;
    for (size_t o = 0; o < n; o += 64) {
        __builtin_prefetch((const void *)(s + o));
        __builtin_prefetch((const void *)(b + o));
    }
}

// y[t * ys + i] = row r0 + i . x[t * xs, ...) for i < nr (nr <= QROWS) and t < nt, nt
// 1 or 2, bits a constant. One token keeps two accumulator chains per row; two tokens
// share each decoded weight vector and keep one chain per row and token.
INLINE void neon_rows(float *y, int64_t ys, const float *x, int64_t xs,
                      const struct mf_weight *w, int64_t r0, const int nr, const int nt,
                      const int bits) {
    const int gs = w->group_size;
    const int64_t n_group = w->n_in / gs, rbytes = w->n_in * bits / 8;
    const uint8_t *row[QROWS];
    float32x4_t a0[QROWS], a1[QROWS];
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        row[i] = (const uint8_t *)w->w + (r0 + i) * rbytes;
        a0[i] = a1[i] = vdupq_n_f32(0.0f);
    }
    const uintptr_t next = (uintptr_t)row[0] + (uintptr_t)(nr * rbytes);   // the next pass's rows
    rows_prefetch_sb(w, r0 + nr, nr);
    for (int64_t g = 0; g < n_group; g++) {
        float32x4_t s[QROWS], b[QROWS];
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            size_t k = (size_t)((r0 + i) * n_group + g);
            s[i] = vdupq_n_f32(mf_load_f32(w->scales, w->sdtype, k));
            b[i] = vdupq_n_f32(mf_load_f32(w->biases, w->sdtype, k));
        }
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8) {
            if (c % 32 == 0)
                rows_prefetch(next + (uintptr_t)(c / 8 * bits * nr), bits * 4 * nr);
            const float32x4_t x0 = vld1q_f32(x + c), x1 = vld1q_f32(x + c + 4);
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                uint32x4_t q0, q1;
                neon_codes8(row[i], c, bits, &q0, &q1);
                float32x4_t w0 = vfmaq_f32(b[i], vcvtq_f32_u32(q0), s[i]);
                float32x4_t w1 = vfmaq_f32(b[i], vcvtq_f32_u32(q1), s[i]);
                if (nt == 1) {
                    a0[i] = vfmaq_f32(a0[i], x0, w0);
                    a1[i] = vfmaq_f32(a1[i], x1, w1);
                } else {
                    a0[i] = vfmaq_f32(vfmaq_f32(a0[i], x0, w0), x1, w1);
                    a1[i] = vfmaq_f32(vfmaq_f32(a1[i], vld1q_f32(x + xs + c), w0),
                                      vld1q_f32(x + xs + c + 4), w1);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        if (nt == 1) {
            y[i] = vaddvq_f32(vaddq_f32(a0[i], a1[i]));
        } else {
            y[i] = vaddvq_f32(a0[i]);
            y[ys + i] = vaddvq_f32(a1[i]);
        }
    }
}

// Rows [i, i + nr) for every token, two tokens per pass while two are left: the
// row set's codes stay in L1 from one pass to the next.
INLINE void neon_rows_tokens(float *y, int64_t ys, const float *x, int64_t xs, int n_tok,
                             const struct mf_weight *w, int64_t r0, const int nr,
                             const int bits) {
    int t = 0;
    for (; t + 2 <= n_tok; t += 2)
        neon_rows(y + t * ys, ys, x + t * xs, xs, w, r0, nr, 2, bits);
    if (t < n_tok)
        neon_rows(y + t * ys, ys, x + t * xs, xs, w, r0, nr, 1, bits);
}

INLINE void neon_qdot_rows_bits(float *y, int64_t ys, const float *x, int64_t xs,
                                int n_tok, const struct mf_weight *w, int64_t r0, int n_row,
                                const int bits) {
    int i = 0;
    for (; i + QROWS <= n_row; i += QROWS)
        neon_rows_tokens(y + i, ys, x, xs, n_tok, w, r0 + i, QROWS, bits);
    for (; i < n_row; i++)
        neon_rows_tokens(y + i, ys, x, xs, n_tok, w, r0 + i, 1, bits);
}

static void neon_qdot_rows(float *y, int64_t ys, const float *x, int64_t xs, int n_tok,
                           const struct mf_weight *w, int64_t r0, int n_row) {
    switch (w->bits) {
    case 2: neon_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 2); break;
    case 3: neon_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 3); break;
    case 4: neon_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 4); break;
    case 5: neon_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 5); break;
    case 6: neon_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 6); break;
    default: neon_qdot_rows_bits(y, ys, x, xs, n_tok, w, r0, n_row, 8); break;
    }
}

INLINE void neon_dequant_bits(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                              int64_t n, const int bits) {
    const int gs = w->group_size;
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in * bits / 8);
    const int64_t s0 = r * (w->n_in / gs);
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const float32x4_t s = vdupq_n_f32(mf_load_f32(w->scales, w->sdtype, (size_t)(s0 + g)));
        const float32x4_t b = vdupq_n_f32(mf_load_f32(w->biases, w->sdtype, (size_t)(s0 + g)));
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8) {
            uint32x4_t q0, q1;
            neon_codes8(row, c, bits, &q0, &q1);
            vst1q_f32(dst + (c - c0), vaddq_f32(vmulq_f32(vcvtq_f32_u32(q0), s), b));
            vst1q_f32(dst + (c - c0) + 4, vaddq_f32(vmulq_f32(vcvtq_f32_u32(q1), s), b));
        }
    }
}

static void neon_dequant(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                         int64_t n) {
    switch (w->bits) {
    case 2: neon_dequant_bits(dst, w, r, c0, n, 2); break;
    case 3: neon_dequant_bits(dst, w, r, c0, n, 3); break;
    case 4: neon_dequant_bits(dst, w, r, c0, n, 4); break;
    case 5: neon_dequant_bits(dst, w, r, c0, n, 5); break;
    case 6: neon_dequant_bits(dst, w, r, c0, n, 6); break;
    default: neon_dequant_bits(dst, w, r, c0, n, 8); break;
    }
}

// 4 rows x 2 tokens per block (8 accumulators); leftover rows and tokens go through
// neon_dot.
static void neon_gemm_tile(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                           int n_tok, const float *w, int64_t w_stride, int n_row,
                           int64_t n) {
    int t = 0;
    for (; t + 2 <= n_tok; t += 2) {
        const float *x0 = x + t * x_stride, *x1 = x0 + x_stride;
        int r = 0;
        for (; r + 4 <= n_row; r += 4) {
            const float *w0 = w + r * w_stride, *w1 = w0 + w_stride, *w2 = w1 + w_stride,
                        *w3 = w2 + w_stride;
            float32x4_t a00 = vdupq_n_f32(0.0f), a01 = a00, a02 = a00, a03 = a00;
            float32x4_t a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                float32x4_t u0 = vld1q_f32(x0 + i), u1 = vld1q_f32(x1 + i);
                float32x4_t v = vld1q_f32(w0 + i);
                a00 = vfmaq_f32(a00, u0, v);
                a10 = vfmaq_f32(a10, u1, v);
                v = vld1q_f32(w1 + i);
                a01 = vfmaq_f32(a01, u0, v);
                a11 = vfmaq_f32(a11, u1, v);
                v = vld1q_f32(w2 + i);
                a02 = vfmaq_f32(a02, u0, v);
                a12 = vfmaq_f32(a12, u1, v);
                v = vld1q_f32(w3 + i);
                a03 = vfmaq_f32(a03, u0, v);
                a13 = vfmaq_f32(a13, u1, v);
            }
            float s[2][4] = {{vaddvq_f32(a00), vaddvq_f32(a01), vaddvq_f32(a02), vaddvq_f32(a03)},
                             {vaddvq_f32(a10), vaddvq_f32(a11), vaddvq_f32(a12), vaddvq_f32(a13)}};
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
            y[t * y_stride + r] += neon_dot(x0, w + r * w_stride, n);
            y[(t + 1) * y_stride + r] += neon_dot(x1, w + r * w_stride, n);
        }
    }
    for (; t < n_tok; t++)
        for (int r = 0; r < n_row; r++)
            y[t * y_stride + r] += neon_dot(x + t * x_stride, w + r * w_stride, n);
}

static void neon_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(src + i), 16)));
    for (; i < n; i++)
        dst[i] = mf_bf16_to_f32(src[i]);
}

static float neon_scale_dot(float *row, float g, const float *k, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t r0 = vmulq_n_f32(vld1q_f32(row + i), g);
        float32x4_t r1 = vmulq_n_f32(vld1q_f32(row + i + 4), g);
        vst1q_f32(row + i, r0);
        vst1q_f32(row + i + 4, r1);
        s0 = vfmaq_f32(s0, r0, vld1q_f32(k + i));
        s1 = vfmaq_f32(s1, r1, vld1q_f32(k + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) {
        row[i] *= g;
        s += row[i] * k[i];
    }
    return s;
}

static float neon_axpy_dot(float *row, float d, const float *k, const float *q,
                           int64_t n) {
    const float32x4_t vd = vdupq_n_f32(d);
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t r0 = vfmaq_f32(vld1q_f32(row + i), vd, vld1q_f32(k + i));
        float32x4_t r1 = vfmaq_f32(vld1q_f32(row + i + 4), vd, vld1q_f32(k + i + 4));
        vst1q_f32(row + i, r0);
        vst1q_f32(row + i + 4, r1);
        s0 = vfmaq_f32(s0, r0, vld1q_f32(q + i));
        s1 = vfmaq_f32(s1, r1, vld1q_f32(q + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) {
        row[i] += d * k[i];
        s += row[i] * q[i];
    }
    return s;
}

const struct mf_cpu_kernels mf_cpu_kernels_neon = {
    .name = "neon",
    .dot = neon_dot,
    .axpy = neon_axpy,
    .qdot_rows = neon_qdot_rows,
    .qdot_max_tok = 4,
    .dequant = neon_dequant,
    .qdot_rows_mxfp4 = mf_mxfp4_qdot_rows_neon,
    .dequant_mxfp4 = mf_mxfp4_dequant_neon,
    .gemm_tile = neon_gemm_tile,
    .bf16_to_f32 = neon_bf16_to_f32,
    .scale_dot = neon_scale_dot,
    .axpy_dot = neon_axpy_dot,
};

#endif /* MF_HAVE_NEON_KERNELS */
