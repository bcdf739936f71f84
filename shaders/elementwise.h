/*
 * elementwise.h — swiglu, mul_sigmoid, axpy (also with the non-finite flag of its
 * result), row gathers (index table in device memory), the non-finite flag, and row
 * scatter-adds (a thread per destination element adds that row's sources in their
 * order, so a repeated index accumulates in a fixed order, with no atomics).
 */
#ifndef MF_ELEMENTWISE_H
#define MF_ELEMENTWISE_H

#include "mf_prelude.h"
#include "mf_params.h"

MF_KERNEL(mf_swiglu)
MF_BUF(0, float, y)
MF_BUF(1, const float, gate)
MF_BUF(2, const float, up)
MF_PARAMS(3, struct mf_p_ew, p) {
    mf_dep_wait();
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (id >= (mf_i64)p.n_rows * p.n_cols)
        return;
    const mf_i64 r = id / p.n_cols, c = id % p.n_cols;
    y[r * p.n_cols + c] = mf_silu(gate[r * p.stride + c]) * up[r * p.stride + c];
}

MF_KERNEL(mf_mul_sigmoid)
MF_BUF(0, float, y)
MF_BUF(1, const float, g)
MF_PARAMS(2, struct mf_p_ew, p) {
    mf_dep_wait();
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (id >= (mf_i64)p.n_rows * p.n_cols)
        return;
    const mf_i64 r = id / p.n_cols, c = id % p.n_cols;
    y[id] *= mf_sigmoid(g[r * p.stride + (p.g_cols == 1 ? 0 : c)]);
}

MF_KERNEL(mf_axpy)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_PARAMS(2, struct mf_p_ew, p) {
    mf_dep_wait();
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (id < p.n)
        y[id] += p.alpha * x[id];
}

// mf_axpy, then flag[0] = 1 where the sum is NaN or infinite (as mf_flag_nonfinite).
MF_KERNEL(mf_axpy_flag)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, int, flag)
MF_PARAMS(3, struct mf_p_ew, p) {
    mf_dep_wait();
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (id >= p.n)
        return;
    const float v = y[id] + p.alpha * x[id];
    y[id] = v;
    if ((mf_as_u32(v) & 0x7f800000u) == 0x7f800000u)
        flag[0] = 1;
}

MF_KERNEL(mf_gather)
MF_BUF(0, float, dst)
MF_BUF(1, const float, src)
MF_BUF(2, const int, idx)
MF_PARAMS(3, struct mf_p_rows, p) {
    mf_dep_wait();
    const int r = MF_TG_X, c = MF_TG_Y * MF_NT + MF_LT;
    if (c < p.n)
        dst[(mf_i64)r * p.n + c] = src[(mf_i64)idx[r] * p.n + c];
}

// dst[d] += w[i] * src[i] for the rows i with idx[i] = d, in ascending i: the order, and
// so the bits, of adding the rows one after another. tab (the driver's, gpu_args.h
// mf_scatter_tab): the destinations d[m], the offsets off[m + 1] of their sources in
// rows[n_rows].
MF_KERNEL(mf_scatter_add)
MF_BUF(0, float, dst)
MF_BUF(1, const float, src)
MF_BUF(2, const int, tab)
MF_BUF(3, const float, w)
MF_PARAMS(4, struct mf_p_rows, p) {
    mf_dep_wait();
    const int d = MF_TG_X, c = MF_TG_Y * MF_NT + MF_LT;
    if (c >= p.n)
        return;
    MF_G const int *off = tab + p.n_dst, *rows = off + p.n_dst + 1;
    MF_G float *yd = dst + (mf_i64)tab[d] * p.n + c;
    float acc = *yd;
    for (int j = off[d]; j < off[d + 1]; j++) {
        const int i = rows[j];
        acc += (p.has_w ? w[i] : 1.0f) * src[(mf_i64)i * p.n + c];
    }
    *yd = acc;
}

// flag[0] = 1 when any x[i] is NaN or infinite (all-ones exponent); every writer
// stores the same value, so the result does not depend on scheduling.
MF_KERNEL(mf_flag_nonfinite)
MF_BUF(0, int, flag)
MF_BUF(1, const mf_u32, x)
MF_PARAMS(2, struct mf_p_flag, p) {
    mf_dep_wait();
    const mf_i64 n = (mf_i64)p.n_hi * 4294967296 + (mf_i64)(mf_u32)p.n_lo;
    const mf_i64 step = (mf_i64)MF_NT * 4096;
    int bad = 0;
    for (mf_i64 i = (mf_i64)MF_TG_X * MF_NT + MF_LT; i < n; i += step)
        bad |= (x[i] & 0x7f800000u) == 0x7f800000u;
    if (bad)
        flag[0] = 1;
}

#endif /* MF_ELEMENTWISE_H */
