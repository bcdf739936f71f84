/*
 * norm.h — RMSNorm over strided rows (plain, per head inside tokens, and gated by
 * silu(z)): a threadgroup per row, the sum of squares reduced in a fixed order.
 */
#ifndef MF_NORM_H
#define MF_NORM_H

#include "quant.h"

// A row of at most MF_VB * MF_THREADS values is one block (quant.h's MF_VB), and its
// values stay in registers between the sum of squares and the scaling. Thread lt's
// elements and the order of its sum are those of a plain loop i = lt, lt + MF_THREADS, ...

// A block's gains gv (1 without g) and gates zv (z[zoff + i] where p.has_z).
MF_FN void mf_norm_load(MF_TH float *gv, MF_TH float *zv, MF_G const float *z, mf_i64 zoff,
                        MF_G const mf_u32 *g, const struct mf_p_norm p, int i0, int lt,
                        int nt) {
#pragma unroll
    for (int k = 0; k < MF_VB; k++) {
        const int i = i0 + lt + k * nt;
        gv[k] = p.has_g && i < p.n ? mf_load(g, p.g_dtype, i) : 1.0f;
        zv[k] = p.has_z && i < p.n ? z[zoff + i] : 0.0f;
    }
}

// y = x * inv * g * scale (then * silu(z) where p.has_z) over a block of row elements.
MF_FN void mf_norm_store(MF_G float *y, MF_TH const float *xv, MF_TH const float *gv,
                         MF_TH const float *zv, const struct mf_p_norm p, float inv, int i0,
                         int lt, int nt) {
#pragma unroll
    for (int k = 0; k < MF_VB; k++) {
        const int i = i0 + lt + k * nt;
        float v = xv[k] * inv * gv[k] * p.scale;
        if (p.has_z)
            v = mf_silu(zv[k]) * v;
        if (i < p.n)
            y[i] = v;
    }
}

MF_KERNEL(mf_rmsnorm)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const float, z)
MF_BUF(3, const mf_u32, g)
MF_PARAMS(4, struct mf_p_norm, p) {
    MF_SHARED float red[MF_THREADS / 32];
    mf_dep_wait();
    const int row = MF_TG_X, lt = MF_LT, nt = MF_NT;
    const int t = row / p.n_head, hh = row % p.n_head, one = p.n <= MF_VB * nt;
    const mf_i64 off = (mf_i64)t * p.tok_stride + (mf_i64)hh * p.head_stride;
    const mf_i64 zoff = (mf_i64)row * p.n;
    float ss = 0.0f, xv[MF_VB], gv[MF_VB], zv[MF_VB];
    for (int i0 = 0; i0 < p.n; i0 += MF_VB * nt) {
        mf_row_load(xv, x + off, i0, lt, nt, p.n);
        if (one)   // the gains and gates too, in flight with x
            mf_norm_load(gv, zv, z, zoff, g, p, i0, lt, nt);
#pragma unroll
        for (int k = 0; k < MF_VB; k++)
            if (i0 + lt + k * nt < p.n)
                ss += xv[k] * xv[k];
    }
    const float inv = mf_rms_inv(ss, red, lt, p.n, p.eps);
    // y may alias x: each element is read and written by the same thread only.
    for (int i0 = 0; i0 < p.n; i0 += MF_VB * nt) {
        if (!one) {
            mf_row_load(xv, x + off, i0, lt, nt, p.n);
            mf_norm_load(gv, zv, z, zoff, g, p, i0, lt, nt);
        }
        mf_norm_store(y + off, xv, gv, zv, p, inv, i0, lt, nt);
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
    mf_dep_wait();
    const int lt = MF_LT, nt = MF_NT, one = p.n <= MF_VB * nt;
    const mf_i64 off = (mf_i64)MF_TG_X * p.tok_stride;
    float ss = 0.0f, xv[MF_VB], rv[MF_VB], gv[MF_VB], zv[MF_VB];
    for (int i0 = 0; i0 < p.n; i0 += MF_VB * nt) {
        mf_row_load(xv, x + off, i0, lt, nt, p.n);
        mf_row_load(rv, r + off, i0, lt, nt, p.n);
        if (one)   // the gains too, in flight with x and r (has_z is 0: r is not read)
            mf_norm_load(gv, zv, r, 0, g, p, i0, lt, nt);
#pragma unroll
        for (int k = 0; k < MF_VB; k++) {
            const int i = i0 + lt + k * nt;
            xv[k] = xv[k] + rv[k];
            if (i < p.n) {
                x[off + i] = xv[k];
                ss += xv[k] * xv[k];
            }
        }
    }
    const float inv = mf_rms_inv(ss, red, lt, p.n, p.eps);
    for (int i0 = 0; i0 < p.n; i0 += MF_VB * nt) {
        if (!one) {
            mf_row_load(xv, x + off, i0, lt, nt, p.n);
            mf_norm_load(gv, zv, r, 0, g, p, i0, lt, nt);
        }
        mf_norm_store(y + off, xv, gv, zv, p, inv, i0, lt, nt);
    }
}

#endif /* MF_NORM_H */
