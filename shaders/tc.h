/*
 * tc.h — the one-token matvec on tensor cores, for 2- and 4-bit affine weights. The
 * SIMT row dots (quant.h) spend about four instructions per code (extract, make it a
 * float, one fused multiply-add per row); here a warp takes a 16-row tile and feeds
 * codes to a bf16 matrix step 2 at a time, so that the decode products are no longer
 * bound by instruction issue.
 *
 * Exactness: the codes q (0..15) are exact in bf16; x, which is not, enters as three
 * bf16 parts hi + mid + lo (the first two exact truncations, the last rounded: x to
 * within 2^-24 |x|), as three columns of the step's 16 x 8 right-hand tile. The step
 * multiplies exactly and sums in f32, so per group of gs columns and row the tile gives
 * sum(x q) as the SIMT form does up to the order of additions; then, as there,
 * s * sum(x q) + b * sum(x), summed over the row's groups.
 *
 * Layout (mf_mma_bf16 in mf_prelude.h): lane (g, t) of a warp (g = lane / 4, t =
 * lane % 4) holds tile rows g and g + 8. Within a group the four lanes of a quad take
 * consecutive quarters of the row (LW = gs * BITS / 128 words each). Pair p of a code
 * word is codes p and p + 16 / BITS (one mask of the shifted word gives both, in the
 * two bf16 halves); step st of a word uses pairs 2 st and 2 st + 1, and the matching x
 * values are staged pairwise in the same order, so the step's k order is a permutation
 * of the columns that A and b agree on. Right-hand columns 4 u .. 4 u + 3 are token u's
 * hi, mid, lo and a zero column (u = 0, 1: up to two tokens a step), so lanes t = 2 u
 * and 2 u + 1 hold token u's shares. A token's columns, and so its bits, are the same
 * whether or not another token shares its steps: a row gets the same bits however
 * tokens are grouped (the experts' host- and device-routed paths rely on it).
 */
#ifndef MF_TC_H
#define MF_TC_H

#include "moe.h"

// u32 of one part of the staged x: the split of n_in columns (n_in / 2 pairs), padded
// so that the lanes of a quarter-warp reading parts 0 and 1 hit distinct banks.
MF_FN int mf_tc_stride(int n_in, int gs, int bits) {
    const int pad = gs * bits / 128 == 1 ? 16 : 4;
    return ((n_in / 2 + 31) & ~31) + pad;
}

// Three bf16 parts of v, exact but for the last rounding: hi and mid truncated, lo
// rounded to nearest even.
MF_FN void mf_bf_split(float v, MF_TH mf_u32 *h) {
    const mf_u32 u0 = mf_as_u32(v) & 0xffff0000u;
    const float r1 = v - mf_as_float(u0);
    const mf_u32 u1 = mf_as_u32(r1) & 0xffff0000u;
    const mf_u32 u2 = mf_as_u32(r1 - mf_as_float(u1));
    h[0] = u0 >> 16;
    h[1] = u1 >> 16;
    h[2] = (u2 + 0x7fffu + ((u2 >> 16) & 1u)) >> 16;
}

// x (n_in floats) into xp as three parts, in code-pair order (pair p of word i: columns
// i * 32 / BITS + p and that + 16 / BITS, lower column in the low half), part j at
// xp + j * S; sx[k]: the sum of x over group k (in column order within a thread's word,
// then a butterfly over the group's words). Every thread calls it.
template <int BITS>
MF_FN void mf_tc_stage(MF_TG mf_u32 *xp, MF_TG float *sx, MF_G const float *x, int n_in,
                       int gs, int S, int lt) {
    const int CW = 32 / BITS, PW = 16 / BITS, nw = n_in / CW, gw = gs / CW;
    for (int base = 0; base < nw; base += MF_MV_THREADS) {
        const int wi = base + lt, on = wi < nw;
        float v[32 / BITS], sum = 0.0f;
#pragma unroll
        for (int i = 0; i < CW; i++) {
            v[i] = on ? x[(mf_i64)wi * CW + i] : 0.0f;
            sum += v[i];
        }
#pragma unroll
        for (int p = 0; p < PW; p++) {
            mf_u32 a[3], b[3];
            mf_bf_split(v[p], a);
            mf_bf_split(v[p + PW], b);
            if (on)
                for (int j = 0; j < 3; j++)
                    xp[j * S + wi * PW + p] = a[j] | (b[j] << 16);
        }
        for (int o = 1; o < gw; o <<= 1)
            sum += mf_shfl_xor(sum, o);
        if (on && wi % gw == 0)
            sx[wi / gw] = sum;
    }
}

// Pair p of code word w as two bf16 codes.
template <int BITS>
MF_FN mf_u32 mf_tc_pair(mf_u32 w, int p) {
    const mf_u32 m = ((1u << BITS) - 1u) * 0x10001u;
    return mf_bf2_sub128(((w >> (BITS * p)) & m) | 0x43004300u);
}

// n (1, 2 or 4) code words at p, zeros when off.
MF_FN void mf_tc_load(MF_TH mf_u32 *c, MF_G const mf_u32 *p, int n, int on) {
    if (!on) {
        for (int i = 0; i < 4; i++)
            c[i] = 0u;
    } else if (n == 4) {
        mf_ld4(c, p);
    } else if (n == 2) {
        mf_ld2(c, p);
    } else {
        c[0] = p[0];
    }
}

// Groups loaded per round of a warp's loop (all their loads before any step).
#define MF_TC_U 4

// One tile row of each of this lane's two rows (g and g + 8): codes from w, group
// parameters from element s0 of sc / bi.
struct mf_tc_rows {
    MF_G const mf_u32 *w[2];
    MF_G const mf_u32 *sc[2];
    MF_G const mf_u32 *bi[2];
    mf_i64 s0[2];
};

// acc[i] += this lane's share of row (g + 8 i) . x_u over groups kw, kw + ks, ..., for
// the nt (1 or 2) tokens staged in xp (token u's part j at xp + (3 u + j) S) and sx
// (token u's group sums at sx + u n_in / gs). Lanes t = 2 u and 2 u + 1 end with token
// u's shares (the row's dot is their sum; t = 2 u has the bias terms); lanes of a token
// u >= nt, with zeros. The whole warp calls it.
template <int BITS>
MF_FN void mf_tc_dot(MF_TH float *acc, MF_TG const mf_u32 *xp, int S, MF_TG const float *sx,
                     MF_TH const struct mf_tc_rows *rw, int sdtype, int gs, int n_in, int nt,
                     int kw, int ks, int lane) {
    const int t = lane & 3, g = lane >> 2, PW = 16 / BITS;
    const int GW = gs * BITS / 32, LW = GW / 4, n_grp = n_in / gs;
    const int bon = (g & 3) < 3 && (g >> 2) < nt;   // this lane's b column: a staged part
    MF_TG const mf_u32 *xb = xp + (bon ? 3 * (g >> 2) + (g & 3) : 0) * S;
    const int ut = t >> 1, uon = (t & 1) == 0 && ut < nt;   // token of the d columns
    for (int j0 = kw; j0 < n_grp; j0 += ks * MF_TC_U) {
        mf_u32 ca[MF_TC_U][4], cb[MF_TC_U][4];
        float s_a[MF_TC_U], s_b[MF_TC_U], b_a[MF_TC_U], b_b[MF_TC_U];
#pragma unroll
        for (int u = 0; u < MF_TC_U; u++) {
            const int j = j0 + u * ks, on = j < n_grp;
            const mf_i64 off = (mf_i64)(on ? j : 0) * GW + t * LW;
            mf_tc_load(ca[u], rw->w[0] + off, LW, on);
            mf_tc_load(cb[u], rw->w[1] + off, LW, on);
            s_a[u] = on ? mf_load(rw->sc[0], sdtype, rw->s0[0] + j) : 0.0f;
            s_b[u] = on ? mf_load(rw->sc[1], sdtype, rw->s0[1] + j) : 0.0f;
            b_a[u] = on ? mf_load(rw->bi[0], sdtype, rw->s0[0] + j) : 0.0f;
            b_b[u] = on ? mf_load(rw->bi[1], sdtype, rw->s0[1] + j) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < MF_TC_U; u++) {
            const int j = j0 + u * ks;
            if (j >= n_grp)   // the same for the whole warp
                break;
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int wd = 0; wd < 4; wd++) {
                if (wd >= LW)
                    break;
                mf_u32 xv[16 / BITS];
                MF_TG const mf_u32 *xw = xb + (j * GW + t * LW + wd) * PW;
#pragma unroll
                for (int p = 0; p < PW; p++)
                    xv[p] = bon ? xw[p] : 0u;
#pragma unroll
                for (int st = 0; st < 8 / BITS; st++) {
                    mf_u32 a[4], b[2];
                    a[0] = mf_tc_pair<BITS>(ca[u][wd], 2 * st);
                    a[1] = mf_tc_pair<BITS>(cb[u][wd], 2 * st);
                    a[2] = mf_tc_pair<BITS>(ca[u][wd], 2 * st + 1);
                    a[3] = mf_tc_pair<BITS>(cb[u][wd], 2 * st + 1);
                    b[0] = xv[2 * st];
                    b[1] = xv[2 * st + 1];
                    mf_mma_bf16(d, a, b, lane);
                }
            }
            const float xs = uon ? sx[ut * n_grp + j] : 0.0f;
            acc[0] += s_a[u] * (d[0] + d[1]) + b_a[u] * xs;
            acc[1] += s_b[u] * (d[2] + d[3]) + b_b[u] * xs;
        }
    }
}

// Row r of a weight whose codes start at w (n_in columns) into slot i of rw.
MF_FN void mf_tc_row(MF_TH struct mf_tc_rows *rw, int i, MF_G const mf_u32 *w,
                     MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, int bits, int gs,
                     int n_in, mf_i64 r) {
    rw->w[i] = w + r * (n_in / 32) * bits;
    rw->sc[i] = sc;
    rw->bi[i] = bi;
    rw->s0[i] = r * (n_in / gs);
}

// A tile's row dots from the lanes' shares: lanes 2 u and 2 u + 1 of a quad added,
// then the ks warps of the tile in warp order. Row i (0..15) of token u is returned to
// lane 16 u + i of the tile's first warp (warp % ks == 0), 0 elsewhere. Every thread
// calls it (a barrier).
MF_FN float mf_tc_sum(MF_TH float *acc, MF_TG float *red, int warp, int lane, int ks) {
    for (int i = 0; i < 2; i++)
        acc[i] += mf_shfl_xor(acc[i], 1);
    if ((lane & 1) == 0) {
        MF_TG float *r = red + (2 * warp + ((lane >> 1) & 1)) * MF_TC_ROWS + (lane >> 2);
        r[0] = acc[0];
        r[8] = acc[1];
    }
    MF_BARRIER();
    float v = 0.0f;
    if (warp % ks == 0)
        for (int i = 0; i < ks; i++)
            v += red[2 * (warp + i) * MF_TC_ROWS + lane];
    return v;
}

// The shared memory of a tensor-core threadgroup.
struct mf_tc_smem {
    mf_u32 xp[MF_TC_XP];
    float sx[MF_TC_MAX_IN / 32];
    float red[MF_MV_ROWS * 2 * MF_TC_ROWS];
};

// Stages nt tokens (rows x, x + x_stride) for the tensor-core tiles and waits for them.
template <int BITS>
MF_FN void mf_tc_stage_tok(MF_TG struct mf_tc_smem *sm, MF_G const float *x, mf_i64 x_stride,
                           int nt, int n_in, int gs, int S, int lt) {
    for (int u = 0; u < nt; u++)
        mf_tc_stage<BITS>(sm->xp + 3 * u * S, sm->sx + u * (n_in / gs), x + u * x_stride,
                          n_in, gs, S, lt);
    MF_BARRIER();
}

// Segment q of mf_mv_tc on threadgroup tg of it: rt = q.rpw 16-row tiles, MF_MV_ROWS /
// rt warps per tile, each over every (MF_MV_ROWS / rt)-th group.
template <int BITS>
MF_FN void mf_mv_tc_rows(MF_G float *y, MF_G const float *x, MF_G const mf_u32 *w,
                         MF_G const mf_u32 *sc, MF_G const mf_u32 *bi,
                         const struct mf_p_mv q, MF_TG struct mf_tc_smem *sm, int tg, int h,
                         int warp, int lane, int lt) {
    const int S = mf_tc_stride(q.n_in, q.group_size, BITS);
    mf_tc_stage_tok<BITS>(sm, x + (mf_i64)h * q.x_head_stride, 0, 1, q.n_in, q.group_size, S,
                          lt);
    const int ks = MF_MV_ROWS / q.rpw, row0 = (tg * q.rpw + warp / ks) * MF_TC_ROWS;
    struct mf_tc_rows rw;
    for (int i = 0; i < 2; i++) {
        const int r = row0 + (lane >> 2) + 8 * i;
        mf_tc_row(&rw, i, w, sc, bi, BITS, q.group_size, q.n_in,
                  (mf_i64)h * q.w_head_rows + (r < q.n_out ? r : q.n_out - 1));
    }
    float acc[2] = {0.0f, 0.0f};
    if (row0 < q.n_out)   // the same for the whole warp
        mf_tc_dot<BITS>(acc, sm->xp, S, sm->sx, &rw, q.sdtype, q.group_size, q.n_in, 1,
                        warp % ks, ks, lane);
    const float v = mf_tc_sum(acc, sm->red, warp, lane, ks);
    if (warp % ks == 0 && lane < MF_TC_ROWS && row0 + lane < q.n_out)
        y[(mf_i64)h * q.y_head_stride + row0 + lane] = v;
}

// One token through up to MF_MULTI_MAX weights of one n_in (segments as mf_mv_multi's,
// heads on z for one segment): y = W x on tensor cores.
MF_KERNEL(mf_mv_tc)
MF_BUF(0, float, y0)
MF_BUF(1, float, y1)
MF_BUF(2, float, y2)
MF_BUF(3, const float, x)
MF_BUF(4, const mf_u32, w0)
MF_BUF(5, const mf_u32, sc0)
MF_BUF(6, const mf_u32, bi0)
MF_BUF(7, const mf_u32, w1)
MF_BUF(8, const mf_u32, sc1)
MF_BUF(9, const mf_u32, bi1)
MF_BUF(10, const mf_u32, w2)
MF_BUF(11, const mf_u32, sc2)
MF_BUF(12, const mf_u32, bi2)
MF_PARAMS(13, struct mf_p_mv_multi, p) {
    MF_SHARED struct mf_tc_smem sm;
    mf_dep_wait();
    const int bx = MF_TG_X, s = bx >= p.blk0[2] ? 2 : bx >= p.blk0[1] ? 1 : 0;
    MF_G float *y = s == 0 ? y0 : s == 1 ? y1 : y2;
    MF_G const mf_u32 *w = s == 0 ? w0 : s == 1 ? w1 : w2;
    MF_G const mf_u32 *sc = s == 0 ? sc0 : s == 1 ? sc1 : sc2;
    MF_G const mf_u32 *bi = s == 0 ? bi0 : s == 1 ? bi1 : bi2;
    const struct mf_p_mv q = mf_multi_seg(p, s);
    const int b0 = mf_multi_blk0(p, s);
    if (q.bits == 2)
        mf_mv_tc_rows<2>(y, x, w, sc, bi, q, &sm, bx - b0, MF_TG_Z, MF_WARP, MF_LANE,
                         MF_LT);
    else
        mf_mv_tc_rows<4>(y, x, w, sc, bi, q, &sm, bx - b0, MF_TG_Z, MF_WARP, MF_LANE,
                         MF_LT);
}

// The tokens of entry e that threadgroup row z takes: the first (row of gu / eo) in
// *r0, the count (0 when none, or when the entry is mma.h's: p.mma_rows) returned;
// n_in: the product's input width.
MF_FN int mf_tc_ent(MF_G const int *tab, const struct mf_p_moe p, int e, int z, int n_in,
                    MF_TH int *r0) {
    const int T = MF_TC_TOK(n_in), n_rows = mf_ent_rows(tab, p, e), u0 = z * T;
    *r0 = mf_ent_row0(tab, p, e) + u0;
    if (p.mma_rows > 0 && n_rows >= p.mma_rows)
        return 0;
    return n_rows - u0 <= 0 ? 0 : n_rows - u0 < T ? n_rows - u0 : T;
}

// gate/up of expert e on tensor cores: a 16-row tile is gate rows j0 .. j0 + 7 (tile
// rows 0..7) and up rows j0 .. j0 + 7 (8..15), so lane i < 8 of a token's half-warp
// gets gate j0 + i and, from lane i + 8, its up.
template <int BITS>
MF_FN void mf_gu_tc(MF_G float *gu, MF_G const float *xg, MF_G const mf_u32 *base,
                    MF_G const int *tab, const struct mf_p_moe p, MF_TG struct mf_tc_smem *sm,
                    int e, int tg, int z, int warp, int lane, int lt) {
    int r0;
    const int nt = mf_tc_ent(tab, p, e, z, p.n_embd, &r0), gs = p.group_size;
    if (nt == 0)   // the same for the whole threadgroup
        return;
    const int S = mf_tc_stride(p.n_embd, gs, BITS);
    const int xr0 = p.dev_k > 0 ? r0 / p.dev_k : r0;   // first input row (one with dev_k)
    mf_tc_stage_tok<BITS>(sm, xg + (mf_i64)xr0 * p.n_embd, p.n_embd, nt, p.n_embd, gs, S, lt);
    const int ks = MF_MV_ROWS / p.rpw, j0 = (tg * p.rpw + warp / ks) * 8;
    const int jr = j0 + (lane >> 2) < p.n_ff ? j0 + (lane >> 2) : p.n_ff - 1;
    const mf_i64 bo = mf_ent_blob(tab, p, e);
    struct mf_tc_rows rw;
    mf_tc_row(&rw, 0, mf_blob_at(base, bo, p.gate_w), mf_blob_at(base, bo, p.gate_s),
              mf_blob_at(base, bo, p.gate_b), BITS, gs, p.n_embd, jr);
    mf_tc_row(&rw, 1, mf_blob_at(base, bo, p.up_w), mf_blob_at(base, bo, p.up_s),
              mf_blob_at(base, bo, p.up_b), BITS, gs, p.n_embd, jr);
    float acc[2] = {0.0f, 0.0f};
    if (j0 < p.n_ff)   // the same for the whole warp
        mf_tc_dot<BITS>(acc, sm->xp, S, sm->sx, &rw, p.sdtype, gs, p.n_embd, nt, warp % ks,
                        ks, lane);
    const float v = mf_tc_sum(acc, sm->red, warp, lane, ks), u = mf_shfl_xor(v, 8);
    const int i = lane & 15, ti = lane >> 4;
    if (warp % ks == 0 && i < 8 && ti < nt && j0 + i < p.n_ff)
        gu[(mf_i64)(r0 + ti) * 2 * p.n_ff + j0 + i] = mf_silu(v) * u;
}

// down rows of expert e on tensor cores, 16-row tiles over its n_embd rows.
template <int BITS>
MF_FN void mf_down_tc(MF_G float *eo, MF_G const float *gu, MF_G const mf_u32 *base,
                      MF_G const int *tab, const struct mf_p_moe p, MF_TG struct mf_tc_smem *sm,
                      int e, int tg, int z, int warp, int lane, int lt) {
    int r0;
    const int nt = mf_tc_ent(tab, p, e, z, p.n_ff, &r0), gs = p.group_size;
    if (nt == 0)   // the same for the whole threadgroup
        return;
    const int S = mf_tc_stride(p.n_ff, gs, BITS);
    mf_tc_stage_tok<BITS>(sm, gu + (mf_i64)r0 * 2 * p.n_ff, 2 * p.n_ff, nt, p.n_ff, gs, S, lt);
    const int ks = MF_MV_ROWS / p.rpw, row0 = (tg * p.rpw + warp / ks) * MF_TC_ROWS;
    const mf_i64 bo = mf_ent_blob(tab, p, e);
    struct mf_tc_rows rw;
    for (int i = 0; i < 2; i++) {
        const int r = row0 + (lane >> 2) + 8 * i;
        mf_tc_row(&rw, i, mf_blob_at(base, bo, p.down_w), mf_blob_at(base, bo, p.down_s),
                  mf_blob_at(base, bo, p.down_b), BITS, gs, p.n_ff,
                  r < p.n_embd ? r : p.n_embd - 1);
    }
    float acc[2] = {0.0f, 0.0f};
    if (row0 < p.n_embd)   // the same for the whole warp
        mf_tc_dot<BITS>(acc, sm->xp, S, sm->sx, &rw, p.sdtype, gs, p.n_ff, nt, warp % ks, ks,
                        lane);
    const float v = mf_tc_sum(acc, sm->red, warp, lane, ks);
    const int i = lane & 15, ti = lane >> 4;
    if (warp % ks == 0 && ti < nt && row0 + i < p.n_embd)
        eo[(mf_i64)(r0 + ti) * p.n_embd + row0 + i] = v;
}

// mf_moe_gu / mf_moe_down on tensor cores (2- and 4-bit experts in mf_mv_tc's formats,
// code offsets 16-byte aligned): p.rpw tiles per threadgroup along x, experts on y,
// MF_TC_TOK(n_in) tokens of an expert per threadgroup row z.
MF_KERNEL(mf_moe_gu_tc)
MF_BUF(0, float, gu)
MF_BUF(1, const float, xg)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    MF_SHARED struct mf_tc_smem sm;
    mf_dep_wait();
    if (p.bits == 2)
        mf_gu_tc<2>(gu, xg, base, tab, p, &sm, MF_TG_Y, MF_TG_X, MF_TG_Z, MF_WARP, MF_LANE,
                    MF_LT);
    else
        mf_gu_tc<4>(gu, xg, base, tab, p, &sm, MF_TG_Y, MF_TG_X, MF_TG_Z, MF_WARP, MF_LANE,
                    MF_LT);
}

MF_KERNEL(mf_moe_down_tc)
MF_BUF(0, float, eo)
MF_BUF(1, const float, gu)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    MF_SHARED struct mf_tc_smem sm;
    mf_dep_wait();
    if (p.bits == 2)
        mf_down_tc<2>(eo, gu, base, tab, p, &sm, MF_TG_Y, MF_TG_X, MF_TG_Z, MF_WARP, MF_LANE,
                      MF_LT);
    else
        mf_down_tc<4>(eo, gu, base, tab, p, &sm, MF_TG_Y, MF_TG_X, MF_TG_Z, MF_WARP, MF_LANE,
                      MF_LT);
}

#endif /* MF_TC_H */
