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
// t < nt (<= MF_MV_TT), for a float weight: lanes stride over columns.
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

// Columns of x staged per step by the row-dot kernels, and the padded threadgroup
// tile they use: x[t] is held as 32 chunks of 32 values at stride 33, so lane l reading
// value k of its chunk l hits bank (l + k) % 32 (no conflicts).
#define MF_XS_COLS 1024
#define MF_XS_TOK (32 * 33)
#define MF_XS_FLOATS (MF_MV_TT * MF_XS_TOK)

// Quantized row dot: a lane takes 32-column chunks (BITS whole words, never split
// across groups since groups are multiples of 32), unpacked with constant shifts, x
// staged through threadgroup memory one MF_XS_COLS-column step at a time: loading x
// is coalesced and each lane reads its 32 values without bank conflicts (read from
// device memory, a lane's 32 consecutive floats touch 32 cache lines per warp load:
// 5x slower on an H200). Every thread of the threadgroup calls it (barriers); a warp
// without a row passes active = 0.
template <int BITS>
MF_FN void mf_qdot_staged(MF_TH float *acc, MF_TG float *xs, MF_G const mf_u32 *w,
                          MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, int sdtype, int gs,
                          int n_in, mf_i64 row, int active, MF_G const float *x,
                          int x_stride, int nt, int lt, int nthreads, int lane) {
    const int n_chunk = n_in >> 5;
    MF_G const mf_u32 *wr = w + row * n_chunk * BITS;
    const mf_i64 s0 = row * (n_in / gs);
    for (int c0 = 0; c0 < n_in; c0 += MF_XS_COLS) {
        // This step's codes and group parameters are loaded first, so their latency
        // overlaps the staging of x and the barrier.
        const int c = (c0 >> 5) + lane, live = active && c < n_chunk;
        mf_u32 wd[BITS];
        for (int i = 0; i < BITS; i++)
            wd[i] = live ? wr[c * BITS + i] : 0u;
        const mf_i64 g = s0 + (live ? (c << 5) / gs : 0);
        const float s = live ? mf_load(sc, sdtype, g) : 0.0f;
        const float b = live ? mf_load(bi, sdtype, g) : 0.0f;
        for (int i = lt; i < nt * MF_XS_COLS; i += nthreads) {
            const int t = i / MF_XS_COLS, k = i % MF_XS_COLS;
            xs[t * MF_XS_TOK + (k >> 5) * 33 + (k & 31)] =
                c0 + k < n_in ? x[(mf_i64)t * x_stride + c0 + k] : 0.0f;
        }
        MF_BARRIER();
        if (live) {
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
                    MF_TG const float *xt = xs + t * MF_XS_TOK + lane * 33;
                    float a = acc[t];
#pragma unroll
                    for (int k = 0; k < 32; k++)
                        a += xt[k] * wv[k];
                    acc[t] = a;
                }
            }
        }
        MF_BARRIER();
    }
}

// Row dot for a threadgroup of warps (one row each): quantized through the staged
// tile, float straight from device memory (lanes stride over columns, coalesced).
// (A word-per-lane form without threadgroup memory measured 0.69x as fast on an H200
// for 4-bit codes, 492 vs 717 GB/s.)
// The dtype is the same for the whole threadgroup, so the barriers are uniform.
MF_FN void mf_dot_block(MF_TH float *acc, MF_TG float *xs, MF_G const mf_u32 *w,
                        MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, int dtype, int sdtype,
                        int bits, int gs, int n_in, mf_i64 row, int active,
                        MF_G const float *x, int x_stride, int nt, int lt, int nthreads,
                        int lane) {
    if (dtype != MF_SH_U32) {
        if (active)
            mf_fdot_tile(acc, w, dtype, n_in, row, x, x_stride, nt, lane);
        return;
    }
#define MF_QSTAGED(B)                                                                  \
    mf_qdot_staged<B>(acc, xs, w, sc, bi, sdtype, gs, n_in, row, active, x, x_stride, nt, \
                      lt, nthreads, lane)
    switch (bits) {
    case 2: MF_QSTAGED(2); break;
    case 3: MF_QSTAGED(3); break;
    case 4: MF_QSTAGED(4); break;
    case 5: MF_QSTAGED(5); break;
    case 6: MF_QSTAGED(6); break;
    default: MF_QSTAGED(8); break;
    }
#undef MF_QSTAGED
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
