/*
 * cpu_mxfp4_neon.c — the MXFP4 entries of the NEON kernel set (format and exactness:
 * cpu_mxfp4.c). A group's 16 values (64 bytes) sit in four table registers and one TBL
 * of four registers gathers the four bytes of each lane's value: byte index 4*q + j for
 * byte j of code q. Up to four tokens share each decoded weight vector. Weights are
 * the exact products, so only the summation order differs from the scalar set.
 * On other ISAs this file compiles to nothing.
 */
#include "backends/cpu/cpu_internal.h"

#if defined(MF_HAVE_NEON_KERNELS)

#include <arm_neon.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

// Tokens that share one decode of a row.
#define MX_TOK 4

// The 16 values of a group with scale byte e, as a 64-byte table.
INLINE uint8x16x4_t neon_lut(uint8_t e) {
    const float32x4_t s = vdupq_n_f32(mf_mxfp4_scale(e));
    uint8x16x4_t t;
    t.val[0] = vreinterpretq_u8_f32(vmulq_f32(vld1q_f32(mf_mxfp4_e2m1), s));
    t.val[1] = vreinterpretq_u8_f32(vmulq_f32(vld1q_f32(mf_mxfp4_e2m1 + 4), s));
    t.val[2] = vreinterpretq_u8_f32(vmulq_f32(vld1q_f32(mf_mxfp4_e2m1 + 8), s));
    t.val[3] = vreinterpretq_u8_f32(vmulq_f32(vld1q_f32(mf_mxfp4_e2m1 + 12), s));
    return t;
}

// Four codes (one per lane, 0..15) to their values.
INLINE float32x4_t neon_look(uint8x16x4_t lut, uint32x4_t q) {
    const uint32x4_t idx = vaddq_u32(vmulq_n_u32(q, 0x04040404u), vdupq_n_u32(0x03020100u));
    return vreinterpretq_f32_u8(vqtbl4q_u8(lut, vreinterpretq_u8_u32(idx)));
}

// The eight weights at column c (a multiple of 8) of a row, as two vectors of four.
INLINE void neon_w8(const uint8_t *row, int64_t c, uint8x16x4_t lut, float32x4_t *lo,
                    float32x4_t *hi) {
    uint32_t word;
    memcpy(&word, row + c / 2, 4);
    const uint32x4_t v = vdupq_n_u32(word), m = vdupq_n_u32(15u);
    const int32x4_t s0 = {0, -4, -8, -12}, s1 = {-16, -20, -24, -28};
    *lo = neon_look(lut, vandq_u32(vshlq_u32(v, s0), m));
    *hi = neon_look(lut, vandq_u32(vshlq_u32(v, s1), m));
}

static inline const uint8_t *row_scales(const struct mf_weight *w, int64_t r) {
    return (const uint8_t *)w->scales + r * (w->n_in / w->group_size);
}

static inline const uint8_t *row_codes(const struct mf_weight *w, int64_t r) {
    return (const uint8_t *)w->w + r * (w->n_in / 2);
}

// y[t * ys] = row r . x[t * xs, ...) for t < nt (a constant, 1..MX_TOK).
INLINE void neon_row(float *y, int64_t ys, const float *x, int64_t xs, const int nt,
                     const struct mf_weight *w, int64_t r) {
    const uint8_t *row = row_codes(w, r), *sc = row_scales(w, r);
    const int gs = w->group_size;
    float32x4_t a0[MX_TOK], a1[MX_TOK];
    for (int t = 0; t < MX_TOK; t++)
        a0[t] = a1[t] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < w->n_in / gs; g++) {
        const uint8x16x4_t lut = neon_lut(sc[g]);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8) {
            float32x4_t lo, hi;
            neon_w8(row, c, lut, &lo, &hi);
            for (int t = 0; t < nt; t++) {
                a0[t] = vfmaq_f32(a0[t], vld1q_f32(x + t * xs + c), lo);
                a1[t] = vfmaq_f32(a1[t], vld1q_f32(x + t * xs + c + 4), hi);
            }
        }
    }
    for (int t = 0; t < nt; t++)
        y[t * ys] = vaddvq_f32(vaddq_f32(a0[t], a1[t]));
}

static void neon_rows(float *y, int64_t ys, const float *x, int64_t xs, int nt,
                      const struct mf_weight *w, int64_t r) {
    switch (nt) {
    case 1: neon_row(y, ys, x, xs, 1, w, r); break;
    case 2: neon_row(y, ys, x, xs, 2, w, r); break;
    case 3: neon_row(y, ys, x, xs, 3, w, r); break;
    default: neon_row(y, ys, x, xs, 4, w, r); break;
    }
}

void mf_mxfp4_qdot_rows_neon(float *y, int64_t ys, const float *x, int64_t xs, int n_tok,
                             const struct mf_weight *w, int64_t r0, int n_row) {
    for (int t0 = 0; t0 < n_tok; t0 += MX_TOK) {
        const int nt = n_tok - t0 < MX_TOK ? n_tok - t0 : MX_TOK;
        for (int i = 0; i < n_row; i++)
            neon_rows(y + t0 * ys + i, ys, x + t0 * xs, xs, nt, w, r0 + i);
    }
}

void mf_mxfp4_dequant_neon(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                           int64_t n) {
    const uint8_t *row = row_codes(w, r), *sc = row_scales(w, r);
    const int gs = w->group_size;
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        const uint8x16x4_t lut = neon_lut(sc[g]);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 8) {
            float32x4_t lo, hi;
            neon_w8(row, c, lut, &lo, &hi);
            vst1q_f32(dst + c - c0, lo);
            vst1q_f32(dst + c + 4 - c0, hi);
        }
    }
}

#endif /* MF_HAVE_NEON_KERNELS */
