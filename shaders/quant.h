/*
 * quant.h — reading weights: float tensors of any dtype, MLX affine-quantized codes
 * (model-math §1: w = s*q + b per group of group_size columns, codes packed LSB-first
 * as one bit stream per row), and the per-warp row dots that matvec-shaped kernels
 * share. Every term is x * (s*q + b) in f32, as the CPU backend computes it; only the
 * summation order differs.
 */
#ifndef MF_QUANT_H
#define MF_QUANT_H

#include "mf_prelude.h"
#include "mf_params.h"

// Element i of a float tensor of dtype dt (F32, F16 or BF16) as f32.
MF_FN float mf_load(MF_G const mf_u32 *p, int dt, mf_i64 i) {
    if (dt == MF_SH_F32)
        return mf_as_float(p[i]);
    mf_u32 h = ((MF_G const mf_u16 *)p)[i];
    return dt == MF_SH_BF16 ? mf_bf16_to_f32(h) : mf_f16_to_f32(h);
}

// Code c of the quantized row whose bit stream starts at word row_word; a code of 3,
// 5 or 6 bits may straddle two words.
MF_FN mf_u32 mf_code_at(MF_G const mf_u32 *w, mf_i64 row_word, int bits, int c) {
    mf_i64 bit = (mf_i64)c * bits;
    MF_G const mf_u32 *p = w + row_word + (bit >> 5);
    int sh = (int)(bit & 31);
    mf_u32 v = p[0] >> sh;
    if (sh + bits > 32)
        v |= p[1] << (32 - sh);
    return v & ((1u << bits) - 1u);
}

// W[row, c] as f32 (row counted over the whole tensor).
MF_FN float mf_w_at(MF_G const mf_u32 *w, MF_G const mf_u32 *sc, MF_G const mf_u32 *bi,
                    int dtype, int sdtype, int bits, int gs, int n_in, mf_i64 row, int c) {
    if (dtype != MF_SH_U32)
        return mf_load(w, dtype, row * n_in + c);
    mf_i64 sg = row * (n_in / gs) + c / gs;
    float s = mf_load(sc, sdtype, sg), b = mf_load(bi, sdtype, sg);
    return s * (float)mf_code_at(w, row * (n_in / 32) * bits, bits, c) + b;
}

// acc[t] += sum_c x[t*x_stride + c] * W[row, c] over this lane's share of the row, for
// t < nt (<= MF_MV_TT). Quantized: a lane takes 32-column chunks (BITS whole words,
// never split across groups since groups are multiples of 32), unpacked with constant
// shifts.
template <int BITS>
MF_FN void mf_qdot_tile(MF_TH float *acc, MF_G const mf_u32 *w, MF_G const mf_u32 *sc,
                        MF_G const mf_u32 *bi, int sdtype, int gs, int n_in, mf_i64 row,
                        MF_G const float *x, int x_stride, int nt, int lane) {
    const int n_chunk = n_in >> 5;
    MF_G const mf_u32 *wr = w + row * n_chunk * BITS;
    const mf_i64 s0 = row * (n_in / gs);
    for (int c = lane; c < n_chunk; c += 32) {
        mf_u32 wd[BITS];
        for (int i = 0; i < BITS; i++)
            wd[i] = wr[c * BITS + i];
        const mf_i64 g = s0 + (c << 5) / gs;
        const float s = mf_load(sc, sdtype, g), b = mf_load(bi, sdtype, g);
        float wv[32];
#pragma unroll
        for (int k = 0; k < 32; k++) {
            const int bit = k * BITS, wi = bit >> 5, sh = bit & 31;
            mf_u32 v = wd[wi] >> sh;
            if (sh + BITS > 32)
                v |= wd[wi + 1] << (32 - sh);
            wv[k] = s * (float)(v & ((1u << BITS) - 1u)) + b;
        }
#pragma unroll
        for (int t = 0; t < MF_MV_TT; t++) {
            if (t < nt) {
                MF_G const float *xt = x + (mf_i64)t * x_stride + (c << 5);
                float a = acc[t];
#pragma unroll
                for (int k = 0; k < 32; k++)
                    a += xt[k] * wv[k];
                acc[t] = a;
            }
        }
    }
}

// The same for a float weight: lanes stride over columns.
MF_FN void mf_fdot_tile(MF_TH float *acc, MF_G const mf_u32 *w, int dtype, int n_in,
                        mf_i64 row, MF_G const float *x, int x_stride, int nt, int lane) {
    for (int i = lane; i < n_in; i += 32) {
        const float wv = mf_load(w, dtype, row * n_in + i);
#pragma unroll
        for (int t = 0; t < MF_MV_TT; t++)
            if (t < nt)
                acc[t] += x[(mf_i64)t * x_stride + i] * wv;
    }
}

MF_FN void mf_dot_tile(MF_TH float *acc, MF_G const mf_u32 *w, MF_G const mf_u32 *sc,
                       MF_G const mf_u32 *bi, int dtype, int sdtype, int bits, int gs,
                       int n_in, mf_i64 row, MF_G const float *x, int x_stride, int nt,
                       int lane) {
    if (dtype != MF_SH_U32) {
        mf_fdot_tile(acc, w, dtype, n_in, row, x, x_stride, nt, lane);
        return;
    }
    switch (bits) {
    case 2: mf_qdot_tile<2>(acc, w, sc, bi, sdtype, gs, n_in, row, x, x_stride, nt, lane); break;
    case 3: mf_qdot_tile<3>(acc, w, sc, bi, sdtype, gs, n_in, row, x, x_stride, nt, lane); break;
    case 4: mf_qdot_tile<4>(acc, w, sc, bi, sdtype, gs, n_in, row, x, x_stride, nt, lane); break;
    case 5: mf_qdot_tile<5>(acc, w, sc, bi, sdtype, gs, n_in, row, x, x_stride, nt, lane); break;
    case 6: mf_qdot_tile<6>(acc, w, sc, bi, sdtype, gs, n_in, row, x, x_stride, nt, lane); break;
    default: mf_qdot_tile<8>(acc, w, sc, bi, sdtype, gs, n_in, row, x, x_stride, nt, lane); break;
    }
}

// Sum / max over a threadgroup of MF_THREADS threads: warp butterflies, then the
// warps' results in warp order, so every thread gets the same value in a fixed order.
// red holds MF_THREADS / 32 floats; both end with a barrier so red can be reused.
MF_FN float mf_block_sum(float v, MF_TG float *red, int lt) {
    v = mf_warp_sum(v);
    if ((lt & 31) == 0)
        red[lt >> 5] = v;
    MF_BARRIER();
    float s = 0.0f;
    for (int i = 0; i < MF_THREADS / 32; i++)
        s += red[i];
    MF_BARRIER();
    return s;
}

MF_FN float mf_block_max(float v, MF_TG float *red, int lt) {
    v = mf_warp_max(v);
    if ((lt & 31) == 0)
        red[lt >> 5] = v;
    MF_BARRIER();
    float m = red[0];
    for (int i = 1; i < MF_THREADS / 32; i++)
        m = red[i] > m ? red[i] : m;
    MF_BARRIER();
    return m;
}

#endif /* MF_QUANT_H */
