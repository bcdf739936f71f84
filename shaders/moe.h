/*
 * moe.h — mixture-of-experts kernels. mf_route: a threadgroup per token, top-k by
 * rank where ties go to the lower expert index (csrc/models/moe.c's rule), softmax,
 * noaux_tc (sigmoid scores, bias steering only the choice, group top-2 sums, the
 * experts of non-kept groups masked to 0.0 as moe.c does) or gpt-oss's top-k of the
 * biased logits weighted by a softmax over the k. mf_moe_gu / mf_moe_down:
 * grouped SwiGLU experts, grid.y = expert (mf_moe_gu1 / mf_moe_down1 the same when
 * every expert has one row); gate and up rows of one output index are
 * dotted by the same warp, which writes silu(gate) * up into the first half of gu's
 * row, and down reads it back. Each row's result depends only on its own data. With
 * the routing left on the device (resident experts) the same two kernels read the
 * expert ids in place of the table (mf_p_moe.dev_k), and mf_moe_combine adds the
 * weighted rows back.
 */
#ifndef MF_MOE_H
#define MF_MOE_H

#include "matmul.h"

// Index of the largest v[e] not taken, e < n; the lowest index among equals.
MF_FN int mf_warp_argmax(MF_TG const float *v, MF_TG const int *taken, int n, int lane) {
    float bv = 0.0f;
    int bi = -1;
    for (int e = lane; e < n; e += 32)
        if (!taken[e] && (bi < 0 || v[e] > bv)) {
            bv = v[e];
            bi = e;
        }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = mf_shfl_xor(bv, o);
        const int oi = mf_shfl_xor_i(bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    return bi;
}

// noaux_tc groups: score each group by its two best biased scores (serial per thread,
// moe.c's order), keep the topk_group best (warp 0, repeated arg-max), mask the rest to
// 0.0. Every thread of the threadgroup calls it (barriers).
MF_FN void mf_route_groups(MF_TG float *bs, MF_TG float *gsc, MF_TG int *gtaken,
                           int E, int G, int topk_group, int lt, int nt) {
    const int per = E / G, lane = lt & 31;
    for (int gi = lt; gi < G; gi += nt) {
        int b1 = -1, b2 = -1;
        for (int e = gi * per; e < (gi + 1) * per; e++)
            if (b1 < 0 || bs[e] > bs[b1])
                b1 = e;
        for (int e = gi * per; e < (gi + 1) * per; e++)
            if (e != b1 && (b2 < 0 || bs[e] > bs[b2]))
                b2 = e;
        gsc[gi] = bs[b1] + (b2 >= 0 ? bs[b2] : 0.0f);
        gtaken[gi] = 0;
    }
    MF_BARRIER();
    for (int j = 0; j < topk_group; j++) {
        if (lt < 32) {
            const int b = mf_warp_argmax(gsc, gtaken, G, lane);
            if (lane == 0)
                gtaken[b] = 1;
        }
        MF_BARRIER();
    }
    for (int e = lt; e < E; e += nt)
        if (!gtaken[e / per])
            bs[e] = 0.0f;
    MF_BARRIER();
}

// The order key of a selection value: NaN sorts as -inf, so the ranks of any E values
// are a permutation (NaN routing logits are flagged by the layer's NaN guard; which
// experts they pick only has to stay in range).
MF_FN float mf_rank_key(float v) { return v != v ? -MF_INF : v; }

// sel[r] = the expert of rank r < K among bs[0 .. E) (larger first, the lower index
// first among equals: the order of K rounds of arg-max), each thread ranking its experts
// against all E at once instead of K rounds one after another.
MF_FN void mf_route_rank(MF_TG int *sel, MF_TG const float *bs, int E, int K, int lt, int nt) {
    for (int e = lt; e < E; e += nt) {
        const float me = mf_rank_key(bs[e]);
        int r = 0;
        for (int o = 0; o < E; o++) {
            const float v = mf_rank_key(bs[o]);
            r += v > me || (v == me && o < e);
        }
        if (r < K)
            sel[r] = e;
    }
}

// The scores of a token's E router logits lg (rewritten in place as moe.c keeps them;
// read through mf_ldcg, as mf_route1n's last threadgroup must): sc the weights'
// source, bs the selection values. One warp, lanes striding (the sums' order of the
// CPU-checked form).
MF_FN void mf_route_scores(MF_TG float *sc, MF_TG float *bs, MF_G float *lg,
                           MF_G const float *bias, const struct mf_p_route p, int E,
                           int lane) {
    if (p.kind == 0) {
        float mx = -MF_INF;
        for (int e = lane; e < E; e += 32)
            mx = mf_ldcg(lg + e) > mx ? mf_ldcg(lg + e) : mx;
        mx = mf_warp_max(mx);
        float sum = 0.0f;
        for (int e = lane; e < E; e += 32) {
            sc[e] = mf_exp(mf_ldcg(lg + e) - mx);
            sum += sc[e];
        }
        sum = mf_warp_sum(sum);
        for (int e = lane; e < E; e += 32) {
            const float pr = sc[e] / sum;
            sc[e] = pr;
            bs[e] = pr;
            lg[e] = pr;
        }
    } else if (p.kind == 2) {   // gpt-oss: biased logits; a softmax over the k chosen
        for (int e = lane; e < E; e += 32) {
            const float v = mf_ldcg(lg + e) + (p.has_bias ? bias[e] : 0.0f);
            sc[e] = v;
            bs[e] = v;
            lg[e] = v;
        }
    } else {
        for (int e = lane; e < E; e += 32) {
            const float s = mf_sigmoid(mf_ldcg(lg + e));
            sc[e] = s;
            lg[e] = s;
            bs[e] = s + (p.has_bias ? bias[e] : 0.0f);
        }
    }
}

// Token t's routing from its logits (the threadgroup's every thread; sc, bs, gsc,
// gtaken, sel: its threadgroup arrays of MF_ROUTE_E_MAX, _E_MAX, _G_MAX, _G_MAX and
// _K_MAX entries).
MF_FN void mf_route_tok(MF_G int *idx, MF_G float *wout, MF_G float *logits,
                        MF_G const float *bias, const struct mf_p_route p, int t,
                        MF_TG float *sc, MF_TG float *bs, MF_TG float *gsc, MF_TG int *gtaken,
                        MF_TG int *sel, int lt, int nt) {
    const int E = p.n_expert, K = p.n_used, lane = lt & 31;
    MF_G float *lg = logits + (mf_i64)t * E;
    if (lt < 32)   // warp 0 makes the scores
        mf_route_scores(sc, bs, lg, bias, p, E, lane);
    MF_BARRIER();
    if (p.kind == 1 && p.n_group > 1)
        mf_route_groups(bs, gsc, gtaken, E, p.n_group, p.topk_group, lt, nt);
    mf_route_rank(sel, bs, E, K, lt, nt);
    MF_BARRIER();
    if (lt != 0)
        return;
    if (p.kind == 2) {   // the first choice holds the largest logit
        float sum = 0.0f;
        for (int j = 0; j < K; j++)
            sum += mf_exp(sc[sel[j]] - sc[sel[0]]);
        for (int j = 0; j < K; j++) {
            idx[(mf_i64)t * K + j] = sel[j];
            wout[(mf_i64)t * K + j] = mf_exp(sc[sel[j]] - sc[sel[0]]) / sum;
        }
        return;
    }
    float wsum = 0.0f;
    for (int j = 0; j < K; j++)
        wsum += sc[sel[j]];
    for (int j = 0; j < K; j++) {
        float w = sc[sel[j]];
        if (p.norm_topk_prob && (p.kind == 0 || K > 1))
            w /= wsum;
        if (p.kind == 1)
            w *= p.scaling;
        idx[(mf_i64)t * K + j] = sel[j];
        wout[(mf_i64)t * K + j] = w;
    }
}

MF_KERNEL(mf_route)
MF_BUF(0, int, idx)
MF_BUF(1, float, wout)
MF_BUF(2, float, logits)
MF_BUF(3, const float, bias)
MF_PARAMS(4, struct mf_p_route, p) {
    MF_SHARED float sc[MF_ROUTE_E_MAX];
    MF_SHARED float bs[MF_ROUTE_E_MAX];
    MF_SHARED float gsc[MF_ROUTE_G_MAX];
    MF_SHARED int gtaken[MF_ROUTE_G_MAX];
    MF_SHARED int sel[MF_ROUTE_K_MAX];
    mf_dep_wait();
    mf_route_tok(idx, wout, logits, bias, p, MF_TG_X, sc, bs, gsc, gtaken, sel, MF_LT, MF_NT);
}

// One token's router logits of xn = rmsnorm(x) (mf_mv_multi1n's first segment: its
// threadgroups, the first writing xn), then its routing by whichever threadgroup
// finishes last (each publishes its logits, then counts itself on count[0], which the
// last sets back to 0 for the next launch): logits, xn, idx and wout the bits of
// mf_mv_multi1n then mf_route, in one launch. MF_THREADS threads, as mf_route's.
MF_KERNEL(mf_route1n)
MF_BUF(0, float, logits)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, wsc)
MF_BUF(4, const mf_u32, wbi)
MF_BUF(5, const mf_u32, g)
MF_BUF(6, float, xn)
MF_BUF(7, int, idx)
MF_BUF(8, float, wout)
MF_BUF(9, const float, bias)
MF_BUF(10, int, count)
MF_PARAMS(11, struct mf_p_route1n, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    MF_SHARED float sc[MF_ROUTE_E_MAX];
    MF_SHARED float bs[MF_ROUTE_E_MAX];
    MF_SHARED float gsc[MF_ROUTE_G_MAX];
    MF_SHARED int gtaken[MF_ROUTE_G_MAX];
    MF_SHARED int sel[MF_ROUTE_K_MAX];
    MF_SHARED int last[1];
    const int lt = MF_LT;
    struct mf_xnorm nm = {g, MF_TG_X == 0 ? xn : 0, p.mv.g_dtype, p.mv.has_g, p.mv.eps, 0.0f};
    mf_mv_rows<1, 1, 1>(logits, x, w, wsc, wbi, p.mv.mv.seg[0], xs, nm, MF_TG_X, 0, 0, MF_WARP,
                        MF_LANE, lt);
    if (!mf_last_tg(count, p.mv.mv.blk0[1], last, lt))
        return;
    mf_route_tok(idx, wout, logits, bias, p.r, 0, sc, bs, gsc, gtaken, sel, lt, MF_NT);
    if (lt == 0)
        count[0] = 0;
}

// Entry e of the grouped kernels: its blob's byte offset from base (tab[4e], tab[4e+1]:
// low, high word; or idx[e] * stride with the routing on the device), its first row
// and its row count.
MF_FN mf_i64 mf_ent_blob(MF_G const int *tab, const struct mf_p_moe p, int e) {
    if (p.dev_k > 0)
        return (mf_i64)((mf_u64)(mf_u32)tab[e] *
                        ((mf_u64)(mf_u32)p.stride_hi * 4294967296ull + (mf_u32)p.stride_lo));
    return (mf_i64)tab[4 * e + 1] * 4294967296 + (mf_i64)(mf_u32)tab[4 * e];
}
MF_FN int mf_ent_row0(MF_G const int *tab, const struct mf_p_moe p, int e) {
    return p.dev_k > 0 ? e : tab[4 * e + 2];
}
MF_FN int mf_ent_rows(MF_G const int *tab, const struct mf_p_moe p, int e) {
    return p.dev_k > 0 ? 1 : tab[4 * e + 3];
}

// The component at byte offset off of the blob at byte offset boff from base.
MF_FN MF_G const mf_u32 *mf_blob_at(MF_G const mf_u32 *base, mf_i64 boff, int off) {
    return (MF_G const mf_u32 *)((MF_G const mf_u8 *)base + boff + off);
}

// Element i of the expert's float bias vector at blob offset off (off >= 0).
MF_FN float mf_moe_bias(MF_G const mf_u32 *base, mf_i64 bo, int off, int dt, int i) {
    return mf_load(mf_blob_at(base, bo, off), dt, i);
}

// The activation written to gu: silu(g) * u, or gpt-oss's clamped SwiGLU
// (mf_swiglu_clamped's formula), after the gate / up biases where the layout has them.
MF_FN float mf_moe_act(float g, float u, const struct mf_p_moe p, MF_G const mf_u32 *base,
                       mf_i64 bo, int j) {
    if (p.gate_bias >= 0)
        g += mf_moe_bias(base, bo, p.gate_bias, p.bias_dtype, j);
    if (p.up_bias >= 0)
        u += mf_moe_bias(base, bo, p.up_bias, p.bias_dtype, j);
    if (p.act == 0)
        return mf_silu(g) * u;
    const float gc = g < p.limit ? g : p.limit;
    const float uc = u < -p.limit ? -p.limit : u > p.limit ? p.limit : u;
    return (uc + 1.0f) * (gc * mf_sigmoid(p.alpha * gc));
}

// gate/up rows of expert e for rows r0 .. r0 + nt - 1 of xg: R slots per warp (R / 2
// output indices, gate and up each), R = MF_MV_RPW, or 2 in the one-row kernel (ONE,
// every expert one row, i.e. decode; mf_dot_rows).
template <int R, int ONE>
MF_FN void mf_gu_rows(MF_G float *gu, MF_G const float *xg, MF_G const mf_u32 *base,
                      MF_G const int *tab, const struct mf_p_moe p, MF_TG float *xs, int e,
                      int tg_x, int r0, int nt, int warp, int lane, int lt) {
    const int half = R / 2, j0 = (tg_x * MF_MV_ROWS + warp) * half;
    const mf_i64 bo = mf_ent_blob(tab, p, e);
    const int xr0 = p.dev_k > 0 ? r0 / p.dev_k : r0;   // first input row (one with dev_k)
    const int nj = p.n_ff - j0 < 0 ? 0 : p.n_ff - j0 < half ? p.n_ff - j0 : half;
    // slots: gate j0, up j0, gate j0 + 1, up j0 + 1, ...: live slots are a prefix
    struct mf_rows rw;
    rw.n = 2 * nj;
    rw.vec = p.vec;
#pragma unroll
    for (int i = 0; i < half; i++) {
        const mf_i64 j = j0 + (i < nj ? i : 0);
        mf_rows_set(&rw, 2 * i, mf_blob_at(base, bo, p.gate_w),
                    mf_blob_at(base, bo, p.gate_s), mf_blob_at(base, bo, p.gate_b),
                    p.dtype, p.bits, p.group_size, p.n_embd, j);
        mf_rows_set(&rw, 2 * i + 1, mf_blob_at(base, bo, p.up_w),
                    mf_blob_at(base, bo, p.up_s), mf_blob_at(base, bo, p.up_b),
                    p.dtype, p.bits, p.group_size, p.n_embd, j);
    }
    float acc[R * MF_MV_TT];
#pragma unroll
    for (int i = 0; i < R * MF_MV_TT; i++)
        acc[i] = 0.0f;
    mf_dot_rows<R, ONE>(acc, xs, &rw, p.dtype, p.sdtype, p.bits, p.group_size, p.n_embd,
                        xg + (mf_i64)xr0 * p.n_embd, p.n_embd, nt, lt, lane);
#pragma unroll
    for (int i = 0; i < half; i++)
#pragma unroll
        for (int t = 0; t < (ONE ? 1 : MF_MV_TT); t++) {
            const float gv = mf_warp_sum(acc[2 * i * MF_MV_TT + t]);
            const float uv = mf_warp_sum(acc[(2 * i + 1) * MF_MV_TT + t]);
            if (lane == 0 && i < nj && t < nt)
                gu[(mf_i64)(r0 + t) * 2 * p.n_ff + j0 + i] = mf_moe_act(gv, uv, p, base, bo,
                                                                          j0 + i);
        }
}

// The first row and the row count of threadgroup (e, tile) of the grouped kernels; 0
// when the tile is past the expert's rows or the entry is the tensor-core pair's
// (p.mma_rows; the same for the whole threadgroup).
MF_FN int mf_moe_tile(MF_G const int *tab, const struct mf_p_moe p, int e, int tile,
                      MF_TH int *r0) {
    const int n_rows = mf_ent_rows(tab, p, e);
    *r0 = mf_ent_row0(tab, p, e) + tile;
    if (p.mma_rows > 0 && n_rows >= p.mma_rows)
        return 0;
    return tile >= n_rows ? 0 : n_rows - tile < MF_MV_TT ? n_rows - tile : MF_MV_TT;
}

MF_KERNEL(mf_moe_gu)
MF_BUF(0, float, gu)
MF_BUF(1, const float, xg)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    mf_dep_wait();
    int r0;
    const int e = MF_TG_Y, nt = mf_moe_tile(tab, p, e, MF_TG_Z * MF_MV_TT, &r0);
    if (nt == 0)
        return;
    mf_gu_rows<MF_MV_RPW, 0>(gu, xg, base, tab, p, xs, e, MF_TG_X, r0, nt, MF_WARP, MF_LANE,
                             MF_LT);
}

// mf_moe_gu where every entry has one row (p.max_rows 1, p.rpw 1: decode), with the
// one-token paths' registers (mf_mv1); the same bits. With p.route_ahead (device
// routing, the shared expert's kernels queued between mf_route and this one) the ids
// and x were written two or more kernels back: as mf_moe_down1, the row dot reads them
// and loads its first weights before it waits.
MF_KERNEL(mf_moe_gu1)
MF_BUF(0, float, gu)
MF_BUF(1, const float, xg)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    if (p.dev_k == 0 || !p.route_ahead)
        mf_dep_wait();
    int r0;
    const int e = MF_TG_Y, nt = mf_moe_tile(tab, p, e, 0, &r0);
    if (nt == 0)
        return;
    mf_gu_rows<2, 1>(gu, xg, base, tab, p, xs, e, MF_TG_X, r0, 1, MF_WARP, MF_LANE, MF_LT);
}

// down rows of expert e, R per warp: MF_MV_RPW, or MF_DOWN1_RPW in the one-token
// kernel (ONE; mf_dot_rows). With a 768-column down projection a lane has one chunk,
// and one row per warp measured slower than 4 in the shared kernel (H200, decode, 8
// experts x [2048 x 768]: 38.9 us against 24.5 us) and than 2 in the one-token kernel
// (H100: 15.1 us against 13.7 us; 4 rows 14.7 us).
template <int R, int ONE>
MF_FN void mf_down_rows(MF_G float *eo, MF_G const float *gu, MF_G const mf_u32 *base,
                        MF_G const int *tab, const struct mf_p_moe p, MF_TG float *xs, int e,
                        int tg_x, int r0, int nt, int warp, int lane, int lt) {
    const int j0 = (tg_x * MF_MV_ROWS + warp) * R;
    const mf_i64 bo = mf_ent_blob(tab, p, e);
    struct mf_rows rw;
    rw.n = p.n_embd - j0 < 0 ? 0 : p.n_embd - j0 < R ? p.n_embd - j0 : R;
    rw.vec = p.vec;
#pragma unroll
    for (int r = 0; r < R; r++)
        mf_rows_set(&rw, r, mf_blob_at(base, bo, p.down_w),
                    mf_blob_at(base, bo, p.down_s), mf_blob_at(base, bo, p.down_b),
                    p.dtype, p.bits, p.group_size, p.n_ff, j0 + (r < rw.n ? r : 0));
    float acc[R * MF_MV_TT];
#pragma unroll
    for (int i = 0; i < R * MF_MV_TT; i++)
        acc[i] = 0.0f;
    mf_dot_rows<R, ONE>(acc, xs, &rw, p.dtype, p.sdtype, p.bits, p.group_size, p.n_ff,
                        gu + (mf_i64)r0 * 2 * p.n_ff, 2 * p.n_ff, nt, lt, lane);
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < (ONE ? 1 : MF_MV_TT); t++) {
            const float v = mf_warp_sum(acc[r * MF_MV_TT + t]);
            if (lane == 0 && r < rw.n && t < nt)
                eo[(mf_i64)(r0 + t) * p.n_embd + j0 + r] =
                    p.down_bias >= 0
                        ? v + mf_moe_bias(base, bo, p.down_bias, p.bias_dtype, j0 + r)
                        : v;
        }
}

MF_KERNEL(mf_moe_down)
MF_BUF(0, float, eo)
MF_BUF(1, const float, gu)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    mf_dep_wait();
    int r0;
    const int e = MF_TG_Y, nt = mf_moe_tile(tab, p, e, MF_TG_Z * MF_MV_TT, &r0);
    if (nt == 0)
        return;
    mf_down_rows<MF_MV_RPW, 0>(eo, gu, base, tab, p, xs, e, MF_TG_X, r0, nt, MF_WARP, MF_LANE,
                               MF_LT);
}

// mf_moe_down where every entry has one row (as mf_moe_gu1). With the routing on the
// device (dev_k > 0: resident experts, immutable) the ids are mf_route's, written two
// kernels back (mf_moe_gu1 lies between; mf_prelude.h's mf_dep_wait says why those are
// visible before the wait): the row dot reads them and loads its first weights while
// mf_moe_gu1 ends, and waits only before it reads gu (H100, 48 layers of A3B shapes:
// decode 274-277 -> 278-283 tok/s). The host's table and the cache's slots are written
// just before mf_moe_gu1, so the host-routed path waits first.
MF_KERNEL(mf_moe_down1)
MF_BUF(0, float, eo)
MF_BUF(1, const float, gu)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    if (p.dev_k == 0)
        mf_dep_wait();
    int r0;
    const int e = MF_TG_Y, nt = mf_moe_tile(tab, p, e, 0, &r0);
    if (nt == 0)
        return;
    mf_down_rows<MF_DOWN1_RPW, 1>(eo, gu, base, tab, p, xs, e, MF_TG_X, r0, 1, MF_WARP,
                                  MF_LANE, MF_LT);
}

// y[t, c] = sum of w[t, j] * eo[t * K + j, c] over the token's experts in ascending
// expert order, each added to a running sum from 0: the order, and so the bits, of
// zero + scatter_add_rows over expert-grouped rows (the host-routed path). A slot
// counts when its id is >= 0 and no earlier slot holds the same id. The threadgroup
// first puts the slots in that order (mf_comb_order), then each thread loads MF_VB
// rows' values at a time and adds them in order (mf_comb_col). Then, where p asks
// (mf_moe_dev's shared and resid), the shared expert's row and the residual add with
// its NaN/inf flag: the bits of mf_axpy then mf_axpy_flag on the row (their alpha is 1,
// and 1 * v is v exactly).

// Token t's counted slots in ascending expert order: ord, m of them (returned; a slot's
// place is the number of counted slots with a smaller id). Every thread of the
// threadgroup calls it.
MF_FN int mf_comb_order(MF_TG int *sid, MF_TG int *use, MF_TG int *ord, MF_G const int *idx,
                        int t, int K, int lt) {
    if (lt < K)
        sid[lt] = idx[(mf_i64)t * K + lt];
    MF_BARRIER();
    if (lt < K) {
        int u = sid[lt] >= 0;
        for (int i = 0; i < lt; i++)
            u = u && sid[i] != sid[lt];
        use[lt] = u;
    }
    MF_BARRIER();
    int m = 0, pos = 0;
    for (int i = 0; i < K; i++) {
        m += use[i];
        pos += lt < K && use[i] && sid[i] < sid[lt];
    }
    if (lt < K && use[lt])
        ord[pos] = lt;
    MF_BARRIER();
    return m;
}

// Column c of token t, its m slots in order ord. eo is read through mf_ldcg:
// mf_moe_down1c's last threadgroup reads what the others wrote.
MF_FN void mf_comb_col(MF_G float *y, MF_G const float *eo, MF_G const float *w,
                       MF_G const float *shared, MF_G float *resid, MF_G int *flag,
                       const struct mf_p_moe_dev p, MF_TG const int *ord, int m, int t,
                       int c) {
    const int K = p.k;
    MF_G const float *wt = w + (mf_i64)t * K;
    MF_G const float *et = eo + (mf_i64)t * K * p.n_embd + c;
    float acc = 0.0f;
    for (int n0 = 0; n0 < m; n0 += MF_VB) {
        float wv[MF_VB], ev[MF_VB];
#pragma unroll
        for (int q = 0; q < MF_VB; q++) {
            const int j = n0 + q < m ? ord[n0 + q] : 0;
            wv[q] = n0 + q < m ? wt[j] : 0.0f;
            ev[q] = n0 + q < m ? mf_ldcg(et + (mf_i64)j * p.n_embd) : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < MF_VB; q++)
            if (n0 + q < m)
                acc += wv[q] * ev[q];
    }
    const mf_i64 o = (mf_i64)t * p.n_embd + c;
    if (p.has_shared)
        acc += shared[o];
    y[o] = acc;
    if (p.has_resid) {
        const float v = resid[o] + acc;
        resid[o] = v;
        if (p.has_flag && (mf_as_u32(v) & 0x7f800000u) == 0x7f800000u)
            flag[0] = 1;
    }
}

MF_KERNEL(mf_moe_combine)
MF_BUF(0, float, y)
MF_BUF(1, const float, eo)
MF_BUF(2, const int, idx)
MF_BUF(3, const float, w)
MF_BUF(4, const float, shared)
MF_BUF(5, float, resid)
MF_BUF(6, int, flag)
MF_PARAMS(7, struct mf_p_moe_dev, p) {
    MF_SHARED int sid[MF_ROUTE_K_MAX];
    MF_SHARED int use[MF_ROUTE_K_MAX];
    MF_SHARED int ord[MF_ROUTE_K_MAX];
    mf_dep_wait();
    const int t = MF_TG_Y, c = MF_TG_X * MF_NT + MF_LT;
    const int m = mf_comb_order(sid, use, ord, idx, t, p.k, MF_LT);
    if (c < p.n_embd)
        mf_comb_col(y, eo, w, shared, resid, flag, p, ord, m, t, c);
}

// mf_moe_down1 (device routing: p.m.dev_k = p.c.k) then mf_moe_combine in one launch:
// each threadgroup writes its down rows of entry e = t * K + j and counts itself on
// count[t * nblk + tg_x] (nblk threadgroups along x); the last of token t's K to end
// (mf_attn_part1's pattern, which it leaves at 0 for the next launch) combines those
// rows' columns, a thread each. The bits of the pair: the same rows, then the same sums
// in the same order.
MF_KERNEL(mf_moe_down1c)
MF_BUF(0, float, eo)
MF_BUF(1, const float, gu)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, idx)
MF_BUF(4, float, y)
MF_BUF(5, const float, w)
MF_BUF(6, const float, shared)
MF_BUF(7, float, resid)
MF_BUF(8, int, flag)
MF_BUF(9, int, count)
MF_PARAMS(10, struct mf_p_moe_dc, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    MF_SHARED int sid[MF_ROUTE_K_MAX];
    MF_SHARED int use[MF_ROUTE_K_MAX];
    MF_SHARED int ord[MF_ROUTE_K_MAX];
    MF_SHARED int last[1];
    const int rows = MF_MV_ROWS * MF_DOWN1_RPW, lt = MF_LT;
    const int e = MF_TG_Y, t = e / p.c.k, nblk = (p.m.n_embd + rows - 1) / rows;
    int r0;
    if (mf_moe_tile(idx, p.m, e, 0, &r0) > 0)
        mf_down_rows<MF_DOWN1_RPW, 1>(eo, gu, base, idx, p.m, xs, e, MF_TG_X, r0, 1, MF_WARP,
                                      MF_LANE, lt);
    MF_G int *cnt = count + (mf_i64)t * nblk + MF_TG_X;
    if (!mf_last_tg(cnt, p.c.k, last, lt))
        return;
    mf_dep_wait();   // a threadgroup with no row never waited
    const int m = mf_comb_order(sid, use, ord, idx, t, p.c.k, lt);
    const int c = MF_TG_X * rows + lt;
    if (lt < rows && c < p.c.n_embd)
        mf_comb_col(y, eo, w, shared, resid, flag, p.c, ord, m, t, c);
    if (lt == 0)
        cnt[0] = 0;
}

#endif /* MF_MOE_H */
