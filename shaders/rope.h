/*
 * rope.h — rotary embedding in place: a thread per (token, head, rotated pair), both
 * pairings ((2j, 2j+1) traditional, (j, j + n_rot/2) otherwise), partial n_rot, and
 * mscale applied to the rotated values before the rotation (YaRN); and rope_qk, q and k
 * (each with an optional per-head RMSNorm first) in one launch.
 */
#ifndef MF_ROPE_H
#define MF_ROPE_H

#include "quant.h"

MF_KERNEL(mf_rope)
MF_BUF(0, float, x)
MF_BUF(1, const float, inv_freq)
MF_PARAMS(2, struct mf_p_rope, p) {
    const int half = p.n_rot / 2;
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (half <= 0 || id >= (mf_i64)p.n_tok * p.n_heads * half)
        return;
    const int i = (int)(id % half);
    const mf_i64 th = id / half;
    const int hh = (int)(th % p.n_heads), t = (int)(th / p.n_heads);
    // f32 position times f32 inverse frequency, as mlx computes the angle.
    const float theta = (float)(p.pos0 + t) * inv_freq[i];
    const float c = mf_cos(theta), s = mf_sin(theta);
    const int i1 = p.traditional ? 2 * i : i, i2 = p.traditional ? 2 * i + 1 : i + half;
    MF_G float *xh = x + (mf_i64)t * p.tok_stride + (mf_i64)hh * p.head_stride;
    const float a = p.mscale * xh[i1], b = p.mscale * xh[i2];
    xh[i1] = a * c - b * s;
    xh[i2] = a * s + b * c;
}

// Row (tensor i, token t, head h) of rope_qk: with a norm, the row's RMSNorm as
// mf_rmsnorm computes it (the same threadgroup size, sum order and products; scale 1)
// into threadgroup memory, then the rotation as mf_rope computes it, reading the
// normalised values: the same bits as rmsnorm then rope in two launches.
MF_KERNEL(mf_rope_qk)
MF_BUF(0, float, x0)
MF_BUF(1, float, x1)
MF_BUF(2, const float, inv_freq)
MF_BUF(3, const mf_u32, g0)
MF_BUF(4, const mf_u32, g1)
MF_PARAMS(5, struct mf_p_rope_qk, p) {
    MF_SHARED float row[MF_ROPE_D_MAX];
    MF_SHARED float red[MF_THREADS / 32];
    const int lt = MF_LT, nt = MF_NT, n0 = p.n_tok * p.heads[0];
    const int k = MF_TG_X >= n0 ? 1 : 0, r = MF_TG_X - (k ? n0 : 0);
    // tensor k's fields (selected, not indexed: the params stay in registers)
    const int heads = k ? p.heads[1] : p.heads[0], n = p.head_dim;
    const int ts = k ? p.tok_stride[1] : p.tok_stride[0];
    const int hs = k ? p.head_stride[1] : p.head_stride[0];
    const int norm = k ? p.has_g[1] : p.has_g[0], gdt = k ? p.g_dtype[1] : p.g_dtype[0];
    const int t = r / heads, hh = r % heads;
    MF_G float *xh = (k ? x1 : x0) + (mf_i64)t * ts + (mf_i64)hh * hs;
    MF_G const mf_u32 *g = k ? g1 : g0;
    if (norm) {
        float ss = 0.0f;
        for (int i = lt; i < n; i += nt)
            ss += xh[i] * xh[i];
        ss = mf_block_sum(ss, red, lt);
        const float inv = 1.0f / mf_sqrt(ss / (float)n + p.eps);
        for (int i = lt; i < n; i += nt)
            row[i] = xh[i] * inv * mf_load(g, gdt, i);
        MF_BARRIER();
        for (int i = p.n_rot + lt; i < n; i += nt)   // the dims rope leaves alone
            xh[i] = row[i];
    }
    const int half = p.n_rot / 2;
    for (int i = lt; i < half; i += nt) {
        const float theta = (float)(p.pos0 + t) * inv_freq[i];
        const float c = mf_cos(theta), s = mf_sin(theta);
        const int i1 = p.traditional ? 2 * i : i, i2 = p.traditional ? 2 * i + 1 : i + half;
        const float a = p.mscale * (norm ? row[i1] : xh[i1]);
        const float b = p.mscale * (norm ? row[i2] : xh[i2]);
        xh[i1] = a * c - b * s;
        xh[i2] = a * s + b * c;
    }
}

#endif /* MF_ROPE_H */
