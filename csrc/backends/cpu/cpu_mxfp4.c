/*
 * cpu_mxfp4.c — MXFP4 weights on the CPU (qmode MF_QMODE_MXFP4, MLX's mode "mxfp4",
 * the expert weights of gpt-oss): what the kernel sets share, the value-by-value
 * reference decoder and the scalar set's entries. The SIMD sets are in
 * cpu_mxfp4_x86.c and cpu_mxfp4_neon.c.
 *
 * Format (checked against mx.quantize / mx.dequantize, MLX 0.32): per row, 4-bit codes
 * packed LSB-first in uint32 words (column c at bits 4*(c%8) of word c/8); one uint8
 * scale e per group of 32 columns; no biases. A code is FP4 E2M1: bit 3 the sign, bits
 * 2-1 the exponent, bit 0 the mantissa, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. The
 * scale is 2^(e - 127) in f32 (e = 0 gives the subnormal 2^-127, e = 255 gives +inf, as
 * MLX computes it), and w = e2m1(q) * scale. Every such product is exact in f32 (two
 * significant bits times a power of two) unless it overflows to inf, as in MLX, so
 * dequantized rows are bitwise mx.dequantize's and a matmul differs from the f32
 * reference only in summation order.
 *
 * The kernels decode a group through a table of its 16 values (the 16 E2M1 values
 * times the group's scale), so a weight costs one table lookup.
 */
#include <math.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"

const float mf_mxfp4_e2m1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                 -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float mf_mxfp4_scale(uint8_t e) {
    if (e == 255)
        return INFINITY;
    // 2^(e - 127): the exponent field itself for e >= 1; e = 0 is the subnormal with
    // only the top mantissa bit set.
    uint32_t u = e ? (uint32_t)e << 23 : 0x00400000u;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

void mf_mxfp4_dequant_ref(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                          int64_t n) {
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in / 2);
    const uint8_t *sc = (const uint8_t *)w->scales + r * (w->n_in / w->group_size);
    for (int64_t c = c0; c < c0 + n; c++) {
        unsigned q = (row[c / 2] >> (4 * (c % 2))) & 15u;
        dst[c - c0] = mf_mxfp4_e2m1[q] * mf_mxfp4_scale(sc[c / w->group_size]);
    }
}

/* ==== Scalar set ==== */

// The 16 values of group g of row r: e2m1 times the group's scale.
static void group_table(float *lut, const struct mf_weight *w, int64_t r, int64_t g) {
    const uint8_t *sc = (const uint8_t *)w->scales + r * (w->n_in / w->group_size);
    const float s = mf_mxfp4_scale(sc[g]);
    for (int i = 0; i < 16; i++)
        lut[i] = mf_mxfp4_e2m1[i] * s;
}

// Row r . x, summed per group and then over groups (the order of the affine scalar
// kernel).
static float mxfp4_dot(const float *x, const struct mf_weight *w, int64_t r) {
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in / 2);
    const int gs = w->group_size;
    float total = 0.0f, lut[16];
    for (int64_t g = 0; g < w->n_in / gs; g++) {
        group_table(lut, w, r, g);
        float acc = 0.0f;
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 2) {
            acc += x[c] * lut[row[c / 2] & 15u];
            acc += x[c + 1] * lut[row[c / 2] >> 4];
        }
        total += acc;
    }
    return total;
}

void mf_mxfp4_qdot_rows_scalar(float *y, int64_t ys, const float *x, int64_t xs,
                               int n_tok, const struct mf_weight *w, int64_t r0,
                               int n_row) {
    for (int i = 0; i < n_row; i++)
        for (int t = 0; t < n_tok; t++)
            y[t * ys + i] = mxfp4_dot(x + t * xs, w, r0 + i);
}

void mf_mxfp4_dequant_scalar(float *dst, const struct mf_weight *w, int64_t r, int64_t c0,
                             int64_t n) {
    const uint8_t *row = (const uint8_t *)w->w + r * (w->n_in / 2);
    const int gs = w->group_size;
    float lut[16];
    for (int64_t g = c0 / gs; g < (c0 + n) / gs; g++) {
        group_table(lut, w, r, g);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 2) {
            dst[c - c0] = lut[row[c / 2] & 15u];
            dst[c + 1 - c0] = lut[row[c / 2] >> 4];
        }
    }
}
