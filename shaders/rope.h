/*
 * rope.h — rotary embedding in place: a thread per (token, head, rotated pair), both
 * pairings ((2j, 2j+1) traditional, (j, j + n_rot/2) otherwise), partial n_rot, and
 * mscale applied to the rotated values before the rotation (YaRN); and rope_qk, q and k
 * (each with an optional per-head RMSNorm first) in one launch.
 */
#ifndef MF_ROPE_H
#define MF_ROPE_H

#include "quant.h"

// Pair i of a head with n_rot rotated dims: its indices i1, i2 ((2i, 2i+1)
// traditional, else (i, i + n_rot/2)); the cosine and sine of its angle at position
// pos, as mlx computes it (an f32 position times an f32 inverse frequency); and its
// values a, b (before mscale) rotated by that angle. mf_rope and mf_rope_qk both use
// these, so they rotate alike, bit for bit.
MF_FN void mf_rope_idx(int i, int n_rot, int traditional, MF_TH int *i1, MF_TH int *i2) {
    *i1 = traditional ? 2 * i : i;
    *i2 = traditional ? 2 * i + 1 : i + n_rot / 2;
}

MF_FN void mf_rope_cs(int pos, float inv_freq, MF_TH float *c, MF_TH float *s) {
    const float theta = (float)pos * inv_freq;
    *c = mf_cos(theta);
    *s = mf_sin(theta);
}

MF_FN void mf_rope_apply(float a, float b, float c, float s, float mscale,
                         MF_TH float *o1, MF_TH float *o2) {
    a = mscale * a;
    b = mscale * b;
    *o1 = a * c - b * s;
    *o2 = a * s + b * c;
}

MF_KERNEL(mf_rope)
MF_BUF(0, float, x)
MF_BUF(1, const float, inv_freq)
MF_PARAMS(2, struct mf_p_rope, p) {
    mf_dep_wait();
    const int half = p.n_rot / 2;
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (half <= 0 || id >= (mf_i64)p.n_tok * p.n_heads * half)
        return;
    const int i = (int)(id % half);
    const mf_i64 th = id / half;
    const int hh = (int)(th % p.n_heads), t = (int)(th / p.n_heads);
    float c, s, o1, o2;
    mf_rope_cs(p.pos0 + t, inv_freq[i], &c, &s);
    int i1, i2;
    mf_rope_idx(i, p.n_rot, p.traditional, &i1, &i2);
    MF_G float *xh = x + (mf_i64)t * p.tok_stride + (mf_i64)hh * p.head_stride;
    mf_rope_apply(xh[i1], xh[i2], c, s, p.mscale, &o1, &o2);
    xh[i1] = o1;
    xh[i2] = o2;
}

// Row (tensor i, token t, head h) of rope_qk: with a norm, the row's RMSNorm as
// mf_rmsnorm computes it (the same threadgroup size, mf_rms_inv and products; scale 1)
// into threadgroup memory, then mf_rope's rotation of the normalised values: the same
// bits as rmsnorm then rope in two launches.
MF_KERNEL(mf_rope_qk)
MF_BUF(0, float, x0)
MF_BUF(1, float, x1)
MF_BUF(2, const float, inv_freq)
MF_BUF(3, const mf_u32, g0)
MF_BUF(4, const mf_u32, g1)
MF_PARAMS(5, struct mf_p_rope_qk, p) {
    MF_SHARED float row[MF_ROPE_D_MAX];
    MF_SHARED float red[MF_THREADS / 32];
    mf_dep_wait();
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
    // Ahead of the norm's reduction: this thread's first element and its gain, and its
    // first pair's angle (the loads and sin / cos off the path after the barriers).
    const int half = p.n_rot / 2;
    const float xf = lt < n ? xh[lt] : 0.0f;
    const float gf = norm && lt < n ? mf_load(g, gdt, lt) : 1.0f;
    float cf = 0.0f, sf = 0.0f;
    if (lt < half)
        mf_rope_cs(p.pos0 + t, inv_freq[lt], &cf, &sf);
    if (norm) {
        float ss = 0.0f;
        for (int i = lt; i < n; i += nt) {
            const float v = i == lt ? xf : xh[i];
            ss += v * v;
        }
        const float inv = mf_rms_inv(ss, red, lt, n, p.eps);
        for (int i = lt; i < n; i += nt)
            row[i] = (i == lt ? xf : xh[i]) * inv * (i == lt ? gf : mf_load(g, gdt, i));
        MF_BARRIER();
        for (int i = p.n_rot + lt; i < n; i += nt)   // the dims rope leaves alone
            xh[i] = row[i];
    }
    for (int i = lt; i < half; i += nt) {
        float c = cf, s = sf, o1, o2;
        if (i != lt)
            mf_rope_cs(p.pos0 + t, inv_freq[i], &c, &s);
        int i1, i2;
        mf_rope_idx(i, p.n_rot, p.traditional, &i1, &i2);
        mf_rope_apply(norm ? row[i1] : xh[i1], norm ? row[i2] : xh[i2], c, s, p.mscale, &o1,
                      &o2);
        xh[i1] = o1;
        xh[i2] = o2;
    }
}

#endif /* MF_ROPE_H */
