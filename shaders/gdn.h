/*
 * gdn.h — the GatedDeltaNet pieces: causal depthwise conv + SiLU (a thread per
 * channel, tokens in order, history read from state_in and advanced into state),
 * the gates (a thread per token and v-head), and the delta-rule recurrence (a warp per
 * row of S_h [dv, dk], the row in registers, tokens in order; dk <= MF_GDN_DK_MAX).
 */
#ifndef MF_GDN_H
#define MF_GDN_H

#include "quant.h"

MF_KERNEL(mf_conv1d)
MF_BUF(0, float, y)
MF_BUF(1, float, state)
MF_BUF(2, const float, state_in)
MF_BUF(3, const float, u)
MF_BUF(4, const mf_u32, w)
MF_PARAMS(5, struct mf_p_conv, p) {
    mf_dep_wait();
    const int c = MF_TG_X * MF_NT + MF_LT, C = p.C, K = p.K;
    if (c >= C)
        return;
    for (int t = 0; t < p.n_tok; t++) {
        float acc = 0.0f;
        for (int i = 0; i < K; i++) {
            const int tau = t - (K - 1) + i;   // input time; < 0 comes from the history
            const float uv = tau < 0 ? state_in[(mf_i64)(K - 1 + tau) * C + c]
                                     : u[(mf_i64)tau * C + c];
            acc += mf_load(w, p.w_dtype, (mf_i64)c * K + i) * uv;
        }
        y[(mf_i64)t * C + c] = mf_silu(acc);
    }
    // Row i reads row i + n_tok (or u): never one already rewritten when in place.
    for (int i = 0; i < K - 1; i++) {
        const int tau = p.n_tok - (K - 1) + i;
        state[(mf_i64)i * C + c] = tau < 0 ? state_in[(mf_i64)(K - 1 + tau) * C + c]
                                           : u[(mf_i64)tau * C + c];
    }
}

MF_KERNEL(mf_gdn_gates)
MF_BUF(0, float, g)
MF_BUF(1, float, beta)
MF_BUF(2, const float, a)
MF_BUF(3, const float, b)
MF_BUF(4, const mf_u32, A_log)
MF_BUF(5, const mf_u32, dt_bias)
MF_PARAMS(6, struct mf_p_gates, p) {
    mf_dep_wait();
    const mf_i64 id = (mf_i64)MF_TG_X * MF_NT + MF_LT;
    if (id >= (mf_i64)p.n_tok * p.nv)
        return;
    const int t = (int)(id / p.nv), h = (int)(id % p.nv);
    const float at = a[(mf_i64)t * p.ab_stride + h], bt = b[(mf_i64)t * p.ab_stride + h];
    const float A = mf_exp(mf_load(A_log, p.a_dtype, h));
    const float x = at + mf_load(dt_bias, p.dt_dtype, h);
    // softplus as max(x, 0) + log1p(e^-|x|), the CPU's (and mlx's) overflow-free form
    const float sp = (x > 0.0f ? x : 0.0f) + mf_log1p(mf_exp(-mf_fabs(x)));
    beta[id] = mf_sigmoid(bt);
    g[id] = mf_exp(-A * sp);
}

MF_KERNEL(mf_gdn_rec)
MF_BUF(0, float, o)
MF_BUF(1, float, S)
MF_BUF(2, const float, S_in)
MF_BUF(3, const float, q)
MF_BUF(4, const float, k)
MF_BUF(5, const float, v)
MF_BUF(6, const float, g)
MF_BUF(7, const float, beta)
MF_PARAMS(8, struct mf_p_gdn, p) {
    mf_dep_wait();
    const int NPER = MF_GDN_DK_MAX / 32;
    const int h = MF_TG_Y, i = MF_TG_X * MF_GDN_ROWS + MF_WARP, lane = MF_LANE;
    if (i >= p.dv)
        return;
    const int ratio = p.nv / p.nk > 0 ? p.nv / p.nk : 1, kh = h / ratio;
    const mf_i64 roff = ((mf_i64)h * p.dv + i) * p.dk;
    float row[NPER];
#pragma unroll
    for (int m = 0; m < NPER; m++) {
        const int j = lane + 32 * m;
        row[m] = j < p.dk ? S_in[roff + j] : 0.0f;
    }
    for (int t = 0; t < p.n_tok; t++) {
        const mf_i64 qo = (mf_i64)t * p.qkv_stride + (mf_i64)kh * p.dk;
        const float gt = g[(mf_i64)t * p.nv + h], bt = beta[(mf_i64)t * p.nv + h];
        float kk[NPER];
        float d = 0.0f;
#pragma unroll
        for (int m = 0; m < NPER; m++) {
            const int j = lane + 32 * m;
            kk[m] = j < p.dk ? k[qo + j] : 0.0f;
            row[m] *= gt;                       // decay
            d += row[m] * kk[m];                // read with k
        }
        const float mk = mf_warp_sum(d);
        const float delta = (v[(mf_i64)t * p.qkv_stride + (mf_i64)h * p.dv + i] - mk) * bt;
        float e = 0.0f;
#pragma unroll
        for (int m = 0; m < NPER; m++) {
            const int j = lane + 32 * m;
            row[m] += delta * kk[m];            // write
            e += row[m] * (j < p.dk ? q[qo + j] : 0.0f);   // read with q
        }
        e = mf_warp_sum(e);
        if (lane == 0)
            o[((mf_i64)t * p.nv + h) * p.dv + i] = e;
    }
#pragma unroll
    for (int m = 0; m < NPER; m++) {
        const int j = lane + 32 * m;
        if (j < p.dk)
            S[roff + j] = row[m];
    }
}

#endif /* MF_GDN_H */
