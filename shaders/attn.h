/*
 * attn.h — causal GQA attention, f32 softmax, split over key positions: mf_attn_part
 * scores one chunk of p.chunk keys per (token, head, split) and writes its max
 * m, sum l of exp(s - m) and unnormalised output; mf_attn_comb merges the splits in
 * split order. Long decode contexts then use many threadgroups, and the result does
 * not depend on scheduling. Partials: ws[((t*n_head + h)*n_split + s)*(dv + 2)] =
 * {m, l, acc[dv]}. gpt-oss's attention (attention_ext) is the same pair: a sliding
 * window narrows each query's positions, a ring cache maps position p to row
 * p % ring, and a per-head sink logit joins the max and the sum when the splits merge.
 */
#ifndef MF_ATTN_H
#define MF_ATTN_H

#include "quant.h"

MF_KERNEL(mf_attn_part)
MF_BUF(0, float, ws)
MF_BUF(1, const float, q)
MF_BUF(2, const float, k)
MF_BUF(3, const float, v)
MF_PARAMS(4, struct mf_p_attn, p) {
    MF_SHARED float qs[MF_ATTN_DK_MAX];
    MF_SHARED float sc[MF_ATTN_CHUNK];
    MF_SHARED float red[MF_THREADS / 32];
    mf_dep_wait();
    const int s = MF_TG_X, h = MF_TG_Y, t = MF_TG_Z, lt = MF_LT, nt = MF_NT;
    const int lane = MF_LANE, n_warp = nt / 32;
    const int group = p.n_head / p.n_kv_head > 0 ? p.n_head / p.n_kv_head : 1;
    const int kvh = h / group;
    const int n_keys = p.pos0 + t + 1, c0 = p.base + s * p.chunk;
    const int lo = p.window > 0 && n_keys - p.window > 0 ? n_keys - p.window : 0;
    const int p0 = c0 > lo ? c0 : lo;   // this split's first position the query sees
    const int p1 = c0 + p.chunk < n_keys ? c0 + p.chunk : n_keys;
    MF_G float *part = ws + (((mf_i64)t * p.n_head + h) * p.n_split + s) * (p.dv + 2);
    if (p0 >= p1) {   // outside this token's causal horizon or window: an empty partial
        if (lt == 0) {
            part[0] = -MF_INF;
            part[1] = 0.0f;
        }
        for (int i = lt; i < p.dv; i += nt)
            part[2 + i] = 0.0f;
        return;
    }
    const int np = p1 - p0;
    MF_G const float *qh = q + ((mf_i64)t * p.n_head + h) * p.dk;
    for (int i = lt; i < p.dk; i += nt)
        qs[i] = qh[i];
    MF_BARRIER();
    for (int j = MF_WARP; j < np; j += n_warp) {
        const int row = p.ring > 0 ? (p0 + j) % p.ring : p0 + j;
        MF_G const float *kp = k + (mf_i64)row * p.k_stride + (mf_i64)kvh * p.dk;
        float d = 0.0f;
        for (int i = lane; i < p.dk; i += 32)
            d += qs[i] * kp[i];
        d = mf_warp_sum(d);
        if (lane == 0)
            sc[j] = d * p.scale;
    }
    MF_BARRIER();
    float m = -MF_INF;
    for (int j = lt; j < np; j += nt)
        m = sc[j] > m ? sc[j] : m;
    m = mf_block_max(m, red, lt);
    float l = 0.0f;
    for (int j = lt; j < np; j += nt) {
        const float e = mf_exp(sc[j] - m);
        sc[j] = e;
        l += e;
    }
    l = mf_block_sum(l, red, lt);   // its barriers also publish sc
    for (int i = lt; i < p.dv; i += nt) {
        MF_G const float *vp = v + (mf_i64)kvh * p.dv + i;
        float a = 0.0f;
        for (int j = 0; j < np; j++) {
            const int row = p.ring > 0 ? (p0 + j) % p.ring : p0 + j;
            a += sc[j] * vp[(mf_i64)row * p.v_stride];
        }
        part[2 + i] = a;
    }
    if (lt == 0) {
        part[0] = m;
        part[1] = l;
    }
}

// The splits merged in split order; a sink logit (sinks, p.sink_dtype >= 0) joins the
// max first and the sum last, as a score whose value row is zero.
MF_KERNEL(mf_attn_comb)
MF_BUF(0, float, out)
MF_BUF(1, const float, ws)
MF_BUF(2, const mf_u32, sinks)
MF_PARAMS(3, struct mf_p_attn, p) {
    mf_dep_wait();
    const int h = MF_TG_X, t = MF_TG_Y, lt = MF_LT, nt = MF_NT, stride = p.dv + 2;
    MF_G const float *base = ws + ((mf_i64)t * p.n_head + h) * p.n_split * stride;
    const float sk = p.sink_dtype >= 0 ? mf_load(sinks, p.sink_dtype, h) : -MF_INF;
    float M = sk;
    for (int s = 0; s < p.n_split; s++)
        M = base[s * stride] > M ? base[s * stride] : M;
    float L = 0.0f;
    for (int s = 0; s < p.n_split; s++)
        if (base[s * stride + 1] > 0.0f)
            L += base[s * stride + 1] * mf_exp(base[s * stride] - M);
    if (p.sink_dtype >= 0)
        L += mf_exp(sk - M);
    const float inv = 1.0f / L;
    MF_G float *o = out + ((mf_i64)t * p.n_head + h) * p.dv;
    for (int i = lt; i < p.dv; i += nt) {
        float a = 0.0f;
        for (int s = 0; s < p.n_split; s++)
            if (base[s * stride + 1] > 0.0f)
                a += base[s * stride + 2 + i] * mf_exp(base[s * stride] - M);
        o[i] = a * inv;
    }
}

#endif /* MF_ATTN_H */
