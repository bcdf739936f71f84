/*
 * norm.h — RMSNorm over strided rows (plain, per head inside tokens, and gated by
 * silu(z)): a threadgroup per row, the sum of squares reduced in a fixed order.
 */
#ifndef MF_NORM_H
#define MF_NORM_H

#include "quant.h"

MF_KERNEL(mf_rmsnorm)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const float, z)
MF_BUF(3, const mf_u32, g)
MF_PARAMS(4, struct mf_p_norm, p) {
    MF_SHARED float red[MF_THREADS / 32];
    const int row = MF_TG_X, lt = MF_LT, nt = MF_NT;
    const int t = row / p.n_head, hh = row % p.n_head;
    const mf_i64 off = (mf_i64)t * p.tok_stride + (mf_i64)hh * p.head_stride;
    float ss = 0.0f;
    for (int i = lt; i < p.n; i += nt)
        ss += x[off + i] * x[off + i];
    const float inv = mf_rms_inv(ss, red, lt, p.n, p.eps);
    // y may alias x: each element is read and written by the same thread only.
    for (int i = lt; i < p.n; i += nt) {
        const float gi = p.has_g ? mf_load(g, p.g_dtype, i) : 1.0f;
        float v = x[off + i] * inv * gi * p.scale;
        if (p.has_z)
            v = mf_silu(z[(mf_i64)row * p.n + i]) * v;
        y[off + i] = v;
    }
}

// x += r (stored), then y = rmsnorm(x) as mf_rmsnorm computes it: the same bits as
// mf_axpy(x, 1, r) then mf_rmsnorm(y, x), in one launch. y must not alias x or r.
MF_KERNEL(mf_add_rmsnorm)
MF_BUF(0, float, y)
MF_BUF(1, float, x)
MF_BUF(2, const float, r)
MF_BUF(3, const mf_u32, g)
MF_PARAMS(4, struct mf_p_norm, p) {
    MF_SHARED float red[MF_THREADS / 32];
    const int lt = MF_LT, nt = MF_NT;
    const mf_i64 off = (mf_i64)MF_TG_X * p.tok_stride;
    float ss = 0.0f;
    for (int i = lt; i < p.n; i += nt) {
        const float v = x[off + i] + r[off + i];
        x[off + i] = v;
        ss += v * v;
    }
    const float inv = mf_rms_inv(ss, red, lt, p.n, p.eps);
    for (int i = lt; i < p.n; i += nt) {
        const float gi = p.has_g ? mf_load(g, p.g_dtype, i) : 1.0f;
        y[off + i] = x[off + i] * inv * gi * p.scale;
    }
}

#endif /* MF_NORM_H */
