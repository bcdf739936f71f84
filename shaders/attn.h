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

// Split s of query (t, h)'s keys: its partial {max, sum of exps, values' weighted sum}
// at part (the threadgroup's every thread; qs, sc, red its threadgroup arrays).
MF_FN void mf_attn_split(MF_G float *part, MF_G const float *q, MF_G const float *k,
                         MF_G const float *v, const struct mf_p_attn p, int s, int h, int t,
                         MF_TG float *qs, MF_TG float *sc, MF_TG float *red, int lt, int nt) {
    const int lane = lt & 31, n_warp = nt / 32;
    const int group = p.n_head / p.n_kv_head > 0 ? p.n_head / p.n_kv_head : 1;
    const int kvh = h / group;
    const int n_keys = p.pos0 + t + 1, c0 = p.base + s * p.chunk;
    const int lo = p.window > 0 && n_keys - p.window > 0 ? n_keys - p.window : 0;
    const int p0 = c0 > lo ? c0 : lo;   // this split's first position the query sees
    const int p1 = c0 + p.chunk < n_keys ? c0 + p.chunk : n_keys;
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
    for (int j = lt >> 5; j < np; j += n_warp) {
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
    const int s = MF_TG_X, h = MF_TG_Y, t = MF_TG_Z;
    MF_G float *part = ws + (((mf_i64)t * p.n_head + h) * p.n_split + s) * (p.dv + 2);
    mf_attn_split(part, q, k, v, p, s, h, t, qs, sc, red, MF_LT, MF_NT);
}

// ---- mf_attn_tile: mf_attn_part's partials, R query rows per threadgroup ----
//
// The rows are the (token t, head h) pairs of one kv head, t-major (row idx = t * G + g,
// h = kvh * G + g, G heads per kv head), so a threadgroup reads its split's keys and
// values once for R rows where mf_attn_part reads them once per row. The partials are
// mf_attn_part's bit for bit: the same products and sums in the same order. A score is
// the butterfly of 32 lane partials over dims lane, lane + 32, ...; here a warp holds
// the partials of 32 (row, key) scores and halves them five times, each lane keeping
// the half its bit selects and adding its partner's (the butterfly's additions, 31
// shuffles for 32 scores), so lane l ends with score l. Then each row's max, its exps,
// their sum as mf_block_sum adds them (eight 32-position warp sums, in order), and
// each output the sum over positions in ascending order.
// Row r's scores at r * MF_ATTN_TSC: one word more than a chunk, so the 16 rows a
// warp's lanes store to at once fall in 16 banks.
#define MF_ATTN_TSC (MF_ATTN_CHUNK + 1)
struct mf_attn_tsmem {
    float qs[MF_ATTN_TILE_Q];         // row r's query at r * dk
    float sc[16 * MF_ATTN_TSC];       // row r's scores, then exps
    float m[16], l[16];
    int p0[16], np[16];               // row r's first position, count (-1: no row)
};

// Row idx of kv head kvh: its token, head, first position and count of positions in
// split s (0 when it sees none there, -1 when idx is past the last row).
MF_FN void mf_attn_row(const struct mf_p_attn p, int kvh, int s, int idx, MF_TH int *t,
                       MF_TH int *h, MF_TH int *p0, MF_TH int *np) {
    const int group = p.n_head / p.n_kv_head > 0 ? p.n_head / p.n_kv_head : 1;
    *t = idx / group;
    *h = kvh * group + idx % group;
    const int n_keys = p.pos0 + *t + 1, c0 = p.base + s * p.chunk;
    const int lo = p.window > 0 && n_keys - p.window > 0 ? n_keys - p.window : 0;
    const int a = c0 > lo ? c0 : lo, b = c0 + p.chunk < n_keys ? c0 + p.chunk : n_keys;
    *p0 = a;
    *np = idx >= p.n_tok * group ? -1 : b > a ? b - a : 0;
}

// One butterfly step on 2 O lane partials: P[c] (c < O) becomes the sum of this lane's
// and lane ^ O's partials of score c or c + O, as the lane's bit O selects.
template <int O>
MF_FN void mf_attn_halve(MF_TH float *P, int lane) {
    const bool up = (lane & O) != 0;
#pragma unroll
    for (int c = 0; c < O; c++) {
        const float keep = up ? P[c + O] : P[c], send = up ? P[c] : P[c + O];
        P[c] = keep + mf_shfl_xor(send, O);
    }
}

// Scores of keys P0 + kb0 .. + 32 / R - 1 against the tile's R rows into sm->sc.
template <int R>
MF_FN void mf_attn_tile_scores(MF_TG struct mf_attn_tsmem *sm, MF_G const float *k,
                               const struct mf_p_attn p, int kvh, int P0, int P1, int kb0,
                               int lane) {
    const int KB = 32 / R, DKM = MF_ATTN_TILE_Q / R / 32;
    float kk[KB][DKM];
#pragma unroll
    for (int b = 0; b < KB; b++) {
        const int pos = P0 + kb0 + b;
        const int row = p.ring > 0 ? pos % p.ring : pos;
        MF_G const float *kp = k + (mf_i64)row * p.k_stride + (mf_i64)kvh * p.dk;
#pragma unroll
        for (int m = 0; m < DKM; m++)
            kk[b][m] = pos < P1 && lane + 32 * m < p.dk ? kp[lane + 32 * m] : 0.0f;
    }
    float P[32];   // pair c: row c % R, key c / R
#pragma unroll
    for (int c = 0; c < 32; c++) {
        P[c] = 0.0f;
#pragma unroll
        for (int m = 0; m < DKM; m++)
            if (lane + 32 * m < p.dk)
                P[c] += sm->qs[(c % R) * p.dk + lane + 32 * m] * kk[c / R][m];
    }
    mf_attn_halve<16>(P, lane);
    mf_attn_halve<8>(P, lane);
    mf_attn_halve<4>(P, lane);
    mf_attn_halve<2>(P, lane);
    mf_attn_halve<1>(P, lane);
    const int r = lane % R, j = P0 + kb0 + lane / R - sm->p0[r];
    if (j >= 0 && j < sm->np[r])
        sm->sc[r * MF_ATTN_TSC + j] = P[0] * p.scale;
}

// Row r's max, exps (in place) and their sum, by one warp.
MF_FN void mf_attn_tile_softmax(MF_TG struct mf_attn_tsmem *sm, int r, int lane) {
    const int np = sm->np[r];
    MF_TG float *sc = sm->sc + r * MF_ATTN_TSC;
    float m = -MF_INF;
    for (int j = lane; j < np; j += 32)
        m = sc[j] > m ? sc[j] : m;
    m = mf_warp_max(m);
    for (int j = lane; j < np; j += 32)
        sc[j] = mf_exp(sc[j] - m);
    float l = 0.0f;
    for (int w = 0; w < MF_THREADS / 32; w++) {
        const int j = w * 32 + lane;
        l += mf_warp_sum(j < np ? sc[j] : 0.0f);
    }
    if (lane == 0) {
        sm->m[r] = np > 0 ? m : -MF_INF;
        sm->l[r] = l;
    }
}

// Rows lt / dv + a * (MF_THREADS / dv) of the tile at column i = lt % dv (dv divides
// MF_THREADS): their outputs over positions P0 .. P1 - 1, written with m and l.
template <int R>
MF_FN void mf_attn_tile_out(MF_G float *ws, MF_TG struct mf_attn_tsmem *sm,
                            MF_G const float *v, const struct mf_p_attn p, int kvh, int s,
                            int tz, int P0, int P1, int lt) {
    const int NA = MF_ATTN_TILE_Q / MF_THREADS, step = MF_THREADS / p.dv, i = lt % p.dv;
    float acc[NA];
    int r0[NA], n0[NA];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        const int r = lt / p.dv + a * step;
        acc[a] = 0.0f;
        r0[a] = r < R ? sm->p0[r] : 0;
        n0[a] = r < R ? sm->np[r] : 0;
    }
    for (int pos = P0; pos < P1; pos++) {
        const int row = p.ring > 0 ? pos % p.ring : pos;
        const float x = v[(mf_i64)row * p.v_stride + (mf_i64)kvh * p.dv + i];
#pragma unroll
        for (int a = 0; a < NA; a++) {
            const int j = pos - r0[a];
            if (j >= 0 && j < n0[a])
                acc[a] += sm->sc[(lt / p.dv + a * step) * MF_ATTN_TSC + j] * x;
        }
    }
#pragma unroll
    for (int a = 0; a < NA; a++) {
        const int r = lt / p.dv + a * step;
        int t, h, q0, nq;
        mf_attn_row(p, kvh, s, tz * R + r, &t, &h, &q0, &nq);
        if (r >= R || nq < 0)
            continue;
        MF_G float *part = ws + (((mf_i64)t * p.n_head + h) * p.n_split + s) * (p.dv + 2);
        part[2 + i] = acc[a];
        if (i == 0) {
            part[0] = sm->m[r];
            part[1] = sm->l[r];
        }
    }
}

template <int R>
MF_FN void mf_attn_tile_run(MF_G float *ws, MF_G const float *q, MF_G const float *k,
                            MF_G const float *v, const struct mf_p_attn p,
                            MF_TG struct mf_attn_tsmem *sm, int s, int kvh, int tz, int lt) {
    const int warp = lt >> 5, lane = lt & 31, n_warp = MF_THREADS / 32;
    if (lt < R) {
        int t, h, q0, nq;
        mf_attn_row(p, kvh, s, tz * R + lt, &t, &h, &q0, &nq);
        sm->p0[lt] = q0;
        sm->np[lt] = nq;
    }
    for (int x = lt; x < R * p.dk; x += MF_THREADS) {
        int t, h, q0, nq;
        mf_attn_row(p, kvh, s, tz * R + x / p.dk, &t, &h, &q0, &nq);
        sm->qs[x] = nq < 0 ? 0.0f : q[((mf_i64)t * p.n_head + h) * p.dk + x % p.dk];
    }
    MF_BARRIER();
    int P0 = 0x7fffffff, P1 = 0;   // the positions some row sees
    for (int r = 0; r < R; r++)
        if (sm->np[r] > 0) {
            P0 = sm->p0[r] < P0 ? sm->p0[r] : P0;
            P1 = sm->p0[r] + sm->np[r] > P1 ? sm->p0[r] + sm->np[r] : P1;
        }
    for (int kb0 = warp * (32 / R); kb0 < P1 - P0; kb0 += n_warp * (32 / R))
        mf_attn_tile_scores<R>(sm, k, p, kvh, P0, P1, kb0, lane);
    MF_BARRIER();
    for (int r = warp; r < R; r += n_warp)
        mf_attn_tile_softmax(sm, r, lane);
    MF_BARRIER();
    mf_attn_tile_out<R>(ws, sm, v, p, kvh, s, tz, P0, P1, lt);
}

// For n_head a multiple of n_kv_head, dk and dv at most MF_ATTN_TILE_DMAX, dv a divisor
// of MF_THREADS; grid mf_grid_attn_tile; the partials go to mf_attn_comb.
MF_KERNEL(mf_attn_tile)
MF_BUF(0, float, ws)
MF_BUF(1, const float, q)
MF_BUF(2, const float, k)
MF_BUF(3, const float, v)
MF_PARAMS(4, struct mf_p_attn, p) {
    MF_SHARED struct mf_attn_tsmem sm;
    mf_dep_wait();
    if (MF_ATTN_TILE_ROWS(p.dk, p.dv) == 16)
        mf_attn_tile_run<16>(ws, q, k, v, p, &sm, MF_TG_X, MF_TG_Y, MF_TG_Z, MF_LT);
    else
        mf_attn_tile_run<8>(ws, q, k, v, p, &sm, MF_TG_X, MF_TG_Y, MF_TG_Z, MF_LT);
}

// The splits merged in split order; a sink logit (sinks, p.sink_dtype >= 0) joins the
// max first and the sum last, as a score whose value row is zero.
// Query (t, h)'s output from its n_split partials (and its sink, sinks' head h where
// p.sink_dtype >= 0; the partials read through mf_ldcg, as mf_attn_part1's last split
// must): the threadgroup's every thread.
MF_FN void mf_attn_merge(MF_G float *out, MF_G const float *ws, MF_G const mf_u32 *sinks,
                         const struct mf_p_attn p, int h, int t, int lt, int nt) {
    const int stride = p.dv + 2;
    MF_G const float *base = ws + ((mf_i64)t * p.n_head + h) * p.n_split * stride;
    const float sk = p.sink_dtype >= 0 ? mf_load(sinks, p.sink_dtype, h) : -MF_INF;
    float M = sk;
    for (int s = 0; s < p.n_split; s++) {
        const float ms = mf_ldcg(base + s * stride);
        M = ms > M ? ms : M;
    }
    float L = 0.0f;
    for (int s = 0; s < p.n_split; s++)
        if (mf_ldcg(base + s * stride + 1) > 0.0f)
            L += mf_ldcg(base + s * stride + 1) * mf_exp(mf_ldcg(base + s * stride) - M);
    if (p.sink_dtype >= 0)
        L += mf_exp(sk - M);
    const float inv = 1.0f / L;
    MF_G float *o = out + ((mf_i64)t * p.n_head + h) * p.dv;
    for (int i = lt; i < p.dv; i += nt) {
        float a = 0.0f;
        for (int s = 0; s < p.n_split; s++)
            if (mf_ldcg(base + s * stride + 1) > 0.0f)
                a += mf_ldcg(base + s * stride + 2 + i) *
                     mf_exp(mf_ldcg(base + s * stride) - M);
        o[i] = a * inv;
    }
}

MF_KERNEL(mf_attn_comb)
MF_BUF(0, float, out)
MF_BUF(1, const float, ws)
MF_BUF(2, const mf_u32, sinks)
MF_PARAMS(3, struct mf_p_attn, p) {
    mf_dep_wait();
    mf_attn_merge(out, ws, sinks, p, MF_TG_X, MF_TG_Y, MF_LT, MF_NT);
}

// mf_attn_part, then each query's mf_attn_comb by the last of its splits to end (each
// publishes its partial and counts itself on count[t * n_head + h], which the last sets
// back to 0 for the next launch): out the bits of the pair, in one launch.
MF_KERNEL(mf_attn_part1)
MF_BUF(0, float, ws)
MF_BUF(1, const float, q)
MF_BUF(2, const float, k)
MF_BUF(3, const float, v)
MF_BUF(4, float, out)
MF_BUF(5, const mf_u32, sinks)
MF_BUF(6, int, count)
MF_PARAMS(7, struct mf_p_attn, p) {
    MF_SHARED float qs[MF_ATTN_DK_MAX];
    MF_SHARED float sc[MF_ATTN_CHUNK];
    MF_SHARED float red[MF_THREADS / 32];
    MF_SHARED int last[1];
    mf_dep_wait();
    const int s = MF_TG_X, h = MF_TG_Y, t = MF_TG_Z, lt = MF_LT;
    MF_G float *part = ws + (((mf_i64)t * p.n_head + h) * p.n_split + s) * (p.dv + 2);
    mf_attn_split(part, q, k, v, p, s, h, t, qs, sc, red, lt, MF_NT);
    MF_G int *c = count + (mf_i64)t * p.n_head + h;
    if (!mf_last_tg(c, p.n_split, last, lt))
        return;
    mf_attn_merge(out, ws, sinks, p, h, t, lt, MF_NT);
    if (lt == 0)
        c[0] = 0;
}

#endif /* MF_ATTN_H */
