/*
 * mma.h — a prefill chunk's products on tensor cores: the grouped experts (entries of
 * at least MF_MMA_MIN_ROWS rows) and the GEMM of more than MF_MV_MAX_TOK tokens. The
 * SIMT kernels (moe.h, matmul.h) spend about four instructions per code and token, or
 * dequantize a tile into threadgroup memory for 64 tokens of FMAs; here a warp feeds a
 * 16 x 16 tile of codes to bf16 matrix steps against 8 tokens at a time, each code
 * converted once per 16 tokens.
 *
 * Exactness as in tc.h: the codes enter centred, q - c (c = 8 for 4 bits, 2 for 2 bits;
 * exact in bf16), x as three bf16 parts hi + mid + lo (x to within 2^-24 |x|), each part
 * a matrix step of its own: per 16 columns the steps of lo, mid, then hi, from zero, give
 * sum((q - c) x) over them, added in f32 to the group's sum; then s * that + (b + c s) *
 * sum(x), summed over the row's groups in order. The tensor cores' own additions round
 * toward zero, so they only ever add 16 columns, and centring halves what they add; as
 * the SIMT kernels, every other addition rounds to nearest. A (row, token) is computed
 * from its row and its token alone, in one order, whatever other tokens or experts share
 * its threadgroup or call.
 *
 * Layout (mf_mma_bf16): a threadgroup takes MF_MMA_TOK tokens of one expert (or head)
 * and MF_MMA_ROWS rows (gate/up: 64 output indices, each a gate and an up row); warp w
 * takes rows 32 (w % 4) .. + 31 as two 16-row tiles and tokens 16 (w / 4) .. + 15 as
 * two 8-token tiles. Lane (g, t) holds tile rows g and g + 8 and, for each group, the
 * code words t LW .. t LW + LW - 1 of the group (LW = gs BITS / 128); step st of a word
 * takes its code pairs 2 st and 2 st + 1 (tc.h's order), against the x pairs staged in
 * the same order. A gate/up tile is gate rows j .. j + 7 over up rows j .. j + 7, so a
 * lane holds both halves of its SwiGLU.
 */
#ifndef MF_MMA_H
#define MF_MMA_H

#include "tc.h"

// x of a threadgroup's tokens, MF_MMA_KB columns at a time: part j of token u at
// xp + (j * MF_MMA_TOK + u) * MF_MMA_XS, in code-pair order; sx[u * (MF_MMA_KB / 32) +
// k]: the sum of the block's group k of token u.
struct mf_mma_smem {
    mf_u32 xp[3 * MF_MMA_TOK * MF_MMA_XS];
    float sx[MF_MMA_TOK * (MF_MMA_KB / 32)];
};

// Columns k0 .. k0 + kb - 1 of tokens 0 .. nt - 1 (rows of x, x_stride apart) into sm;
// tokens past nt keep what sm held (each token is a column of its own in every step,
// and theirs are never stored). Pair i of a token is word i / PW's pair i % PW
// (columns p and p + PW of the word, the lower in the low half), as three bf16 parts;
// a group's sum in column order within a word, then a butterfly over the group's
// words. Every thread calls it.
template <int BITS, int GS>
MF_FN void mf_mma_stage(MF_TG struct mf_mma_smem *sm, MF_G const float *x, mf_i64 x_stride,
                        int nt, int k0, int kb, int lt) {
    const int CW = 32 / BITS, PW = 16 / BITS, WB = MF_MMA_KB / CW, GW = GS / CW;
    for (int i = lt; i < MF_MMA_TOK * WB; i += MF_THREADS) {   // a multiple of MF_THREADS
        const int u = i / WB, wi = i % WB, on = u < nt && wi * CW < kb;
        MF_G const mf_f4 *src = (MF_G const mf_f4 *)(x + (mf_i64)u * x_stride + k0 + wi * CW);
        float v[32 / BITS], sum = 0.0f;
#pragma unroll
        for (int c = 0; c < CW / 4; c++) {
            if (on) {
                const mf_f4 f = src[c];
                v[4 * c] = f.x;
                v[4 * c + 1] = f.y;
                v[4 * c + 2] = f.z;
                v[4 * c + 3] = f.w;
            } else {
                v[4 * c] = v[4 * c + 1] = v[4 * c + 2] = v[4 * c + 3] = 0.0f;
            }
        }
#pragma unroll
        for (int c = 0; c < CW; c++)
            sum += v[c];
        for (int o = 1; o < GW; o <<= 1)
            sum += mf_shfl_xor(sum, o);
        if (!on)
            continue;
        if (wi % GW == 0)
            sm->sx[u * (MF_MMA_KB / 32) + wi / GW] = sum;
#pragma unroll
        for (int p = 0; p < PW; p++) {
            mf_u32 a[3], b[3];
            mf_bf_split(v[p], a);
            mf_bf_split(v[p + PW], b);
            for (int j = 0; j < 3; j++)
                sm->xp[(j * MF_MMA_TOK + u) * MF_MMA_XS + wi * PW + p] = a[j] | (b[j] << 16);
        }
    }
}

// n code words at p (zeros when off).
template <int N>
MF_FN void mf_mma_load(MF_TH mf_u32 *c, MF_G const mf_u32 *p, int on) {
    if (!on) {
        for (int i = 0; i < N; i++)
            c[i] = 0u;
    } else if (N == 4) {
        mf_ld4(c, p);
    } else if (N == 2) {
        mf_ld2(c, p);
    } else {
        c[0] = p[0];
    }
}

// This lane's codes and group parameters of the block at column k0 (ng groups): rows
// (tile m, g + 8 i) in c[m][i], s[m][i], b[m][i].
template <int BITS, int GS>
struct mf_mma_a {
    mf_u32 c[2][2][BITS];
    float s[2][2][MF_MMA_KB / GS], b[2][2][MF_MMA_KB / GS];
};

// Pair p of code word w as two centred bf16 codes q - 2^(BITS - 1) (tc.h's order).
template <int BITS>
MF_FN mf_u32 mf_mma_pair(mf_u32 w, int p) {
    const mf_u32 m = ((1u << BITS) - 1u) * 0x10001u;
    const mf_u32 c = (0xc300u | (1u << (BITS - 1))) * 0x10001u;   // -(128 + 2^(BITS - 1))
    return mf_bf2_add(((w >> (BITS * p)) & m) | 0x43004300u, c);
}

template <int BITS, int GS>
MF_FN void mf_mma_fetch(MF_TH struct mf_mma_a<BITS, GS> *A, MF_TH const struct mf_tc_rows *rw,
                        int sdtype, int k0, int ng, int t) {
    const int GW = GS * BITS / 32, LW = GW / 4, NG = MF_MMA_KB / GS;
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int q = 0; q < NG; q++) {
                const int on = q < ng, k = on ? k0 / GS + q : 0;
                mf_mma_load<LW>(&A->c[m][i][q * LW], rw[m].w[i] + k * GW + t * LW, on);
                const float sv = on ? mf_load(rw[m].sc[i], sdtype, rw[m].s0[i] + k) : 0.0f;
                const float bv = on ? mf_load(rw[m].bi[i], sdtype, rw[m].s0[i] + k) : 0.0f;
                A->s[m][i][q] = sv;
                A->b[m][i][q] = bv + (float)(1 << (BITS - 1)) * sv;   // for centred codes
            }
}

// acc[(2 m + n) * 4 + r] += the block's share of this lane's tile elements (tiles m of
// rows, n of tokens tok0 + 8 n ..; r as mma's d), group by group.
template <int BITS, int GS>
MF_FN void mf_mma_block(MF_TH float *acc, MF_TG const struct mf_mma_smem *sm,
                        MF_TH const struct mf_mma_a<BITS, GS> *A, int ng, int tok0, int lane) {
    const int t = lane & 3, g = lane >> 2, PW = 16 / BITS;
    const int GW = GS * BITS / 32, LW = GW / 4, NG = MF_MMA_KB / GS;
#pragma unroll
    for (int q = 0; q < NG; q++) {
        if (q >= ng)   // the same for the whole threadgroup
            break;
        float d[16];
#pragma unroll
        for (int r = 0; r < 16; r++)
            d[r] = 0.0f;
#pragma unroll
        for (int wd = 0; wd < LW; wd++)
#pragma unroll
            for (int st = 0; st < 8 / BITS; st++) {
                mf_u32 a[2][4];
#pragma unroll
                for (int m = 0; m < 2; m++) {
                    const mf_u32 w0 = A->c[m][0][q * LW + wd], w1 = A->c[m][1][q * LW + wd];
                    a[m][0] = mf_mma_pair<BITS>(w0, 2 * st);
                    a[m][1] = mf_mma_pair<BITS>(w1, 2 * st);
                    a[m][2] = mf_mma_pair<BITS>(w0, 2 * st + 1);
                    a[m][3] = mf_mma_pair<BITS>(w1, 2 * st + 1);
                }
                const int pi = (q * GW + t * LW + wd) * PW + 2 * st;
#pragma unroll
                for (int n = 0; n < 2; n++) {
                    mf_u32 b[3][2];
#pragma unroll
                    for (int j = 0; j < 3; j++) {
                        MF_TG const mf_u32 *xb =
                            sm->xp + (j * MF_MMA_TOK + tok0 + 8 * n + g) * MF_MMA_XS + pi;
                        b[j][0] = xb[0];
                        b[j][1] = xb[1];
                    }
#pragma unroll
                    for (int m = 0; m < 2; m++) {
                        float e[4];
                        mf_mma_bf16_0(e, a[m], b[2], lane);   // lo, mid, then hi
                        mf_mma_bf16(e, a[m], b[1], lane);
                        mf_mma_bf16(e, a[m], b[0], lane);
#pragma unroll
                        for (int r = 0; r < 4; r++)
                            d[(2 * m + n) * 4 + r] += e[r];
                    }
                }
            }
#pragma unroll
        for (int n = 0; n < 2; n++) {
            const int u = tok0 + 8 * n + 2 * t;
            const float x0 = sm->sx[u * (MF_MMA_KB / 32) + q];
            const float x1 = sm->sx[(u + 1) * (MF_MMA_KB / 32) + q];
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const float s = A->s[m][r >> 1][q], b = A->b[m][r >> 1][q];
                    const float xs = r & 1 ? x1 : x0;
                    acc[(2 * m + n) * 4 + r] += s * d[(2 * m + n) * 4 + r] + b * xs;
                }
        }
    }
}

// The whole product of this warp's tiles: n_in columns of nt tokens at x (rows
// x_stride apart), rows rw (the lane's four), into acc (16 floats, zeroed here).
template <int BITS, int GS>
MF_FN void mf_mma_run(MF_TH float *acc, MF_TG struct mf_mma_smem *sm,
                      MF_TH const struct mf_tc_rows *rw, MF_G const float *x, mf_i64 x_stride,
                      int nt, int n_in, int sdtype, int warp, int lane, int lt) {
    const int tok0 = (warp >> 2) * 16;
    for (int r = 0; r < 16; r++)
        acc[r] = 0.0f;
    for (int k0 = 0; k0 < n_in; k0 += MF_MMA_KB) {
        const int kb = n_in - k0 < MF_MMA_KB ? n_in - k0 : MF_MMA_KB, ng = kb / GS;
        struct mf_mma_a<BITS, GS> A;
        mf_mma_fetch<BITS, GS>(&A, rw, sdtype, k0, ng, lane & 3);   // in flight while staging
        MF_BARRIER();   // the previous block's steps are done with sm
        mf_mma_stage<BITS, GS>(sm, x, x_stride, nt, k0, kb, lt);
        MF_BARRIER();
        if (tok0 < nt)   // the same for the whole warp
            mf_mma_block<BITS, GS>(acc, sm, &A, ng, tok0, lane);
    }
}

// The tokens of entry e for threadgroup row z: first row in *r0, count returned (0: not
// this kernel's entry, or past its rows; the same for the whole threadgroup).
MF_FN int mf_mma_ent(MF_G const int *tab, const struct mf_p_moe p, int e, int z,
                     MF_TH int *r0) {
    const int n_rows = mf_ent_rows(tab, p, e), u0 = z * MF_MMA_TOK;
    *r0 = mf_ent_row0(tab, p, e) + u0;
    if (n_rows < p.mma_rows || u0 >= n_rows)
        return 0;
    return n_rows - u0 < MF_MMA_TOK ? n_rows - u0 : MF_MMA_TOK;
}

// gate/up of expert e: warp tile m is gate rows j .. j + 7 over up rows j .. j + 7
// (j = 64 tg + 16 (warp % 4) + 8 m); writes silu(gate) * up.
template <int BITS, int GS>
MF_FN void mf_gu_mma(MF_G float *gu, MF_G const float *xg, MF_G const mf_u32 *base,
                     MF_G const int *tab, const struct mf_p_moe p, MF_TG struct mf_mma_smem *sm,
                     int e, int tg, int z, int warp, int lane, int lt) {
    int r0;
    const int nt = mf_mma_ent(tab, p, e, z, &r0);
    if (nt == 0)
        return;
    const int g = lane >> 2, t = lane & 3, j0 = tg * (MF_MMA_ROWS / 2) + (warp & 3) * 16;
    const mf_i64 bo = mf_ent_blob(tab, p, e);
    struct mf_tc_rows rw[2];
    for (int m = 0; m < 2; m++) {
        const int j = j0 + 8 * m + g < p.n_ff ? j0 + 8 * m + g : p.n_ff - 1;
        mf_tc_row(&rw[m], 0, mf_blob_at(base, bo, p.gate_w), mf_blob_at(base, bo, p.gate_s),
                  mf_blob_at(base, bo, p.gate_b), BITS, GS, p.n_embd, j);
        mf_tc_row(&rw[m], 1, mf_blob_at(base, bo, p.up_w), mf_blob_at(base, bo, p.up_s),
                  mf_blob_at(base, bo, p.up_b), BITS, GS, p.n_embd, j);
    }
    float acc[16];
    mf_mma_run<BITS, GS>(acc, sm, rw, xg + (mf_i64)r0 * p.n_embd, p.n_embd, nt, p.n_embd,
                         p.sdtype, warp, lane, lt);
    for (int m = 0; m < 2; m++)
        for (int n = 0; n < 2; n++)
            for (int h = 0; h < 2; h++) {
                const int u = (warp >> 2) * 16 + 8 * n + 2 * t + h, j = j0 + 8 * m + g;
                const float gv = acc[(2 * m + n) * 4 + h], uv = acc[(2 * m + n) * 4 + 2 + h];
                if (u < nt && j < p.n_ff)
                    gu[(mf_i64)(r0 + u) * 2 * p.n_ff + j] = mf_silu(gv) * uv;
            }
}

// This lane's rows of a warp's two 16-row tiles, rows row0 + 16 m + 8 i + g of a weight
// of n_out rows (rows past it read the last; w_row0 its first row) into rw[m] slot i.
template <int BITS, int GS>
MF_FN void mf_mma_rows16(MF_TH struct mf_tc_rows *rw, MF_G const mf_u32 *w,
                         MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, int n_in, int n_out,
                         mf_i64 w_row0, int row0, int g) {
    for (int m = 0; m < 2; m++)
        for (int i = 0; i < 2; i++) {
            const int r = row0 + 16 * m + 8 * i + g;
            mf_tc_row(&rw[m], i, w, sc, bi, BITS, GS, n_in,
                      w_row0 + (r < n_out ? r : n_out - 1));
        }
}

// The tiles of mf_mma_rows16's rows into y: token u < nt, row r < n_out at
// y[u * y_stride + r].
MF_FN void mf_mma_store16(MF_G float *y, mf_i64 y_stride, MF_TH const float *acc, int nt,
                          int n_out, int row0, int warp, int lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int m = 0; m < 2; m++)
        for (int n = 0; n < 2; n++)
            for (int r = 0; r < 4; r++) {
                const int u = (warp >> 2) * 16 + 8 * n + 2 * t + (r & 1);
                const int row = row0 + 16 * m + 8 * (r >> 1) + g;
                if (u < nt && row < n_out)
                    y[(mf_i64)u * y_stride + row] = acc[(2 * m + n) * 4 + r];
            }
}

// down rows of expert e: warp tile m is rows 128 tg + 32 (warp % 4) + 16 m ..
template <int BITS, int GS>
MF_FN void mf_down_mma(MF_G float *eo, MF_G const float *gu, MF_G const mf_u32 *base,
                       MF_G const int *tab, const struct mf_p_moe p,
                       MF_TG struct mf_mma_smem *sm, int e, int tg, int z, int warp, int lane,
                       int lt) {
    int r0;
    const int nt = mf_mma_ent(tab, p, e, z, &r0);
    if (nt == 0)
        return;
    const int row0 = tg * MF_MMA_ROWS + (warp & 3) * 32;
    const mf_i64 bo = mf_ent_blob(tab, p, e);
    struct mf_tc_rows rw[2];
    mf_mma_rows16<BITS, GS>(rw, mf_blob_at(base, bo, p.down_w), mf_blob_at(base, bo, p.down_s),
                            mf_blob_at(base, bo, p.down_b), p.n_ff, p.n_embd, 0, row0,
                            lane >> 2);
    float acc[16];
    mf_mma_run<BITS, GS>(acc, sm, rw, gu + (mf_i64)r0 * 2 * p.n_ff, 2 * p.n_ff, nt, p.n_ff,
                         p.sdtype, warp, lane, lt);
    mf_mma_store16(eo + (mf_i64)r0 * p.n_embd, p.n_embd, acc, nt, p.n_embd, row0, warp, lane);
}

// Head h's tokens 32 tz .. of mf_gemm_mma, rows 128 tg + 32 (warp % 4) + 16 m ...
template <int BITS, int GS>
MF_FN void mf_gemm_mma_rows(MF_G float *y, MF_G const float *x, MF_G const mf_u32 *w,
                            MF_G const mf_u32 *sc, MF_G const mf_u32 *bi,
                            const struct mf_p_mv p, MF_TG struct mf_mma_smem *sm, int tg,
                            int tz, int h, int warp, int lane, int lt) {
    const int t0 = tz * MF_MMA_TOK, row0 = tg * MF_MMA_ROWS + (warp & 3) * 32;
    const int nt = p.n_tok - t0 < MF_MMA_TOK ? p.n_tok - t0 : MF_MMA_TOK;
    struct mf_tc_rows rw[2];
    mf_mma_rows16<BITS, GS>(rw, w, sc, bi, p.n_in, p.n_out, (mf_i64)h * p.w_head_rows, row0,
                            lane >> 2);
    float acc[16];
    mf_mma_run<BITS, GS>(acc, sm, rw,
                         x + (mf_i64)h * p.x_head_stride + (mf_i64)t0 * p.x_tok_stride,
                         p.x_tok_stride, nt, p.n_in, p.sdtype, warp, lane, lt);
    mf_mma_store16(y + (mf_i64)h * p.y_head_stride + (mf_i64)t0 * p.y_tok_stride,
                   p.y_tok_stride, acc, nt, p.n_out, row0, warp, lane);
}

// mf_moe_gu / mf_moe_down on tensor cores for the entries of at least p.mma_rows rows
// (2- and 4-bit codes, groups of 32 (4-bit), 64 or 128, 16-byte aligned codes and x):
// MF_MMA_ROWS rows per threadgroup along x, experts on y, MF_MMA_TOK tokens on z.
#define MF_MMA_CALL(fn, ...)                                                         \
    if (p.bits == 2 && p.group_size == 64)                                           \
        fn<2, 64>(__VA_ARGS__);                                                      \
    else if (p.bits == 2)                                                            \
        fn<2, 128>(__VA_ARGS__);                                                     \
    else if (p.group_size == 32)                                                     \
        fn<4, 32>(__VA_ARGS__);                                                      \
    else if (p.group_size == 64)                                                     \
        fn<4, 64>(__VA_ARGS__);                                                      \
    else                                                                             \
        fn<4, 128>(__VA_ARGS__)

MF_KERNEL(mf_moe_gu_mma)
MF_BUF(0, float, gu)
MF_BUF(1, const float, xg)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    MF_SHARED struct mf_mma_smem sm;
    mf_dep_wait();
    MF_MMA_CALL(mf_gu_mma, gu, xg, base, tab, p, &sm, MF_TG_Y, MF_TG_X, MF_TG_Z, MF_WARP,
                MF_LANE, MF_LT);
}

MF_KERNEL(mf_moe_down_mma)
MF_BUF(0, float, eo)
MF_BUF(1, const float, gu)
MF_BUF(2, const mf_u32, base)
MF_BUF(3, const int, tab)
MF_PARAMS(4, struct mf_p_moe, p) {
    MF_SHARED struct mf_mma_smem sm;
    mf_dep_wait();
    MF_MMA_CALL(mf_down_mma, eo, gu, base, tab, p, &sm, MF_TG_Y, MF_TG_X, MF_TG_Z, MF_WARP,
                MF_LANE, MF_LT);
}

// mf_gemm on tensor cores (its products of more than MF_MV_MAX_TOK tokens, in the
// formats above, x and its strides 16-byte aligned): y[t, h, r] = W_h[r] . x[t, h],
// MF_MMA_ROWS rows along x, MF_MMA_TOK tokens along y, heads on z.
MF_KERNEL(mf_gemm_mma)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    MF_SHARED struct mf_mma_smem sm;
    mf_dep_wait();
    MF_MMA_CALL(mf_gemm_mma_rows, y, x, w, sc, bi, p, &sm, MF_TG_X, MF_TG_Y, MF_TG_Z, MF_WARP,
                MF_LANE, MF_LT);
}

// mf_gemm_mma's rows of segment p alone (tg its row tile, tz its token tile).
MF_FN void mf_gemm_mma_seg(MF_G float *y, MF_G const float *x, MF_G const mf_u32 *w,
                           MF_G const mf_u32 *sc, MF_G const mf_u32 *bi,
                           const struct mf_p_mv p, MF_TG struct mf_mma_smem *sm, int tg,
                           int tz, int warp, int lane, int lt) {
    MF_MMA_CALL(mf_gemm_mma_rows, y, x, w, sc, bi, p, sm, tg, tz, 0, warp, lane, lt);
}

// matmul_multi of more than MF_MV_MAX_TOK tokens on tensor cores (one x, the formats of
// mf_gemm_mma in every product): threadgroup x of segment s (blk0[s] <= x < blk0[s + 1],
// row tiles of MF_MMA_ROWS) does what mf_gemm_mma does for weight s alone, so each y is
// that matmul's, bit for bit. A prefill chunk's k and v products have few row tiles
// (A3B shapes: 4 each, 64 threadgroups of 512 tokens, on 132 SMs); beside q's they share
// the GPU instead of each holding it for one threadgroup's time.
MF_KERNEL(mf_gemm_mma_multi)
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
    MF_SHARED struct mf_mma_smem sm;
    mf_dep_wait();
    const int bx = MF_TG_X, s = bx >= p.blk0[2] ? 2 : bx >= p.blk0[1] ? 1 : 0;
    mf_gemm_mma_seg(s == 0 ? y0 : s == 1 ? y1 : y2, x, s == 0 ? w0 : s == 1 ? w1 : w2,
                    s == 0 ? sc0 : s == 1 ? sc1 : sc2, s == 0 ? bi0 : s == 1 ? bi1 : bi2,
                    mf_multi_seg(p, s), &sm, bx - mf_multi_blk0(p, s), MF_TG_Y, MF_WARP,
                    MF_LANE, MF_LT);
}

#endif /* MF_MMA_H */
