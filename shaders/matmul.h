/*
 * matmul.h — the linear-algebra kernels: matvec and small-batch matmul (MF_MV_RPW
 * output rows per warp, MF_MV_TT tokens in registers, x staged in threadgroup memory), the tiled
 * SIMT GEMM for many tokens, the transposed product (a thread per input column, rows
 * walked in order as the CPU does) and the embedding lookup. All take per-head strides (matmul_heads); plain
 * matmul is one head.
 */
#ifndef MF_MATMUL_H
#define MF_MATMUL_H

#include "quant.h"

// R rows per warp: MF_MV_RPW in the tile kernels (each staged x value serves four
// rows), 1 in the one-token kernels, where more, shorter warps hide memory latency
// better (p.rpw says which to grid.h). ONE: one token, one-token paths only
// (mf_dot_rows).
template <int R, int ONE>
MF_FN void mf_mv_rows(MF_G float *y, MF_G const float *x, MF_G const mf_u32 *w,
                      MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, const struct mf_p_mv p,
                      MF_TG float *xs, int tg_x, int tg_y, int h, int warp, int lane, int lt) {
    const int row0 = (tg_x * MF_MV_ROWS + warp) * R, t0 = tg_y * MF_MV_TT;
    const int nt = p.n_tok - t0 < MF_MV_TT ? p.n_tok - t0 : MF_MV_TT;
    struct mf_rows rw;
    rw.n = p.n_out - row0 < 0 ? 0 : p.n_out - row0 < R ? p.n_out - row0 : R;
    rw.vec = p.vec;
#pragma unroll
    for (int r = 0; r < R; r++)
        mf_rows_set(&rw, r, w, sc, bi, p.dtype, p.bits, p.group_size, p.n_in,
                    (mf_i64)h * p.w_head_rows + row0 + (r < rw.n ? r : 0));
    float acc[R * MF_MV_TT];
#pragma unroll
    for (int i = 0; i < R * MF_MV_TT; i++)
        acc[i] = 0.0f;
    MF_G const float *xt = x + (mf_i64)h * p.x_head_stride + (mf_i64)t0 * p.x_tok_stride;
    mf_dot_rows<R, ONE>(acc, xs, &rw, p.dtype, p.sdtype, p.bits, p.group_size, p.n_in, xt,
                        p.x_tok_stride, nt, lt, lane);
    MF_G float *yt = y + (mf_i64)h * p.y_head_stride + (mf_i64)t0 * p.y_tok_stride + row0;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < (ONE ? 1 : MF_MV_TT); t++) {
            const float v = mf_warp_sum(acc[r * MF_MV_TT + t]);
            if (lane == 0 && r < rw.n && t < nt)
                yt[(mf_i64)t * p.y_tok_stride + r] = v;
        }
}

MF_KERNEL(mf_mv)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_rows<MF_MV_RPW, 0>(y, x, w, sc, bi, p, xs, MF_TG_X, MF_TG_Y, MF_TG_Z, MF_WARP,
                             MF_LANE, MF_LT);
}

// mf_mv for one token (p.n_tok 1, p.rpw 1): the same rows, the same bits, in a kernel
// of its own whose registers are those of the one-token path (the tile paths' would
// halve the warps in flight).
MF_KERNEL(mf_mv1)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_rows<1, 1>(y, x, w, sc, bi, p, xs, MF_TG_X, 0, MF_TG_Z, MF_WARP, MF_LANE, MF_LT);
}

// matmul_multi: threadgroup x of segment s (blk0[s] <= x < blk0[s + 1]) does what
// mf_mv does for weight s alone, so each y is the same, bit for bit, as a matmul's.
template <int ONE>
MF_FN void mf_mv_multi_tg(MF_G float *y0, MF_G float *y1, MF_G float *y2, MF_G const float *x,
                          MF_G const mf_u32 *w0, MF_G const mf_u32 *sc0,
                          MF_G const mf_u32 *bi0, MF_G const mf_u32 *w1,
                          MF_G const mf_u32 *sc1, MF_G const mf_u32 *bi1,
                          MF_G const mf_u32 *w2, MF_G const mf_u32 *sc2,
                          MF_G const mf_u32 *bi2, const struct mf_p_mv_multi p, MF_TG float *xs,
                          int bx, int by, int warp, int lane, int lt) {
    const int s = bx >= p.blk0[2] ? 2 : bx >= p.blk0[1] ? 1 : 0;
    MF_G float *y = s == 0 ? y0 : s == 1 ? y1 : y2;
    MF_G const mf_u32 *w = s == 0 ? w0 : s == 1 ? w1 : w2;
    MF_G const mf_u32 *sc = s == 0 ? sc0 : s == 1 ? sc1 : sc2;
    MF_G const mf_u32 *bi = s == 0 ? bi0 : s == 1 ? bi1 : bi2;
    const struct mf_p_mv q = p.seg[s];
    if (ONE)
        mf_mv_rows<1, 1>(y, x, w, sc, bi, q, xs, bx - p.blk0[s], 0, 0, warp, lane, lt);
    else
        mf_mv_rows<MF_MV_RPW, 0>(y, x, w, sc, bi, q, xs, bx - p.blk0[s], by, 0, warp, lane, lt);
}

MF_KERNEL(mf_mv_multi)
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
    MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_multi_tg<0>(y0, y1, y2, x, w0, sc0, bi0, w1, sc1, bi1, w2, sc2, bi2, p, xs, MF_TG_X,
                      MF_TG_Y, MF_WARP, MF_LANE, MF_LT);
}

// mf_mv_multi for one token (every segment's rpw 1), as mf_mv1 is to mf_mv.
MF_KERNEL(mf_mv_multi1)
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
    MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_multi_tg<1>(y0, y1, y2, x, w0, sc0, bi0, w1, sc1, bi1, w2, sc2, bi2, p, xs, MF_TG_X,
                      0, MF_WARP, MF_LANE, MF_LT);
}

// A 64-row x 64-token output tile per threadgroup; each thread owns 4 x 4 outputs
// (rows ty + 16i, tokens tx + 16j). W is dequantized into threadgroup memory once per
// 32-column step and shared by the 64 tokens. Sums run over k in order.
MF_KERNEL(mf_gemm)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    MF_SHARED float ws[MF_GEMM_TILE][MF_GEMM_K + 1];
    MF_SHARED float xs[MF_GEMM_TILE][MF_GEMM_K + 1];
    const int lt = MF_LT, tx = lt & 15, ty = lt >> 4;
    const int r0 = MF_TG_X * MF_GEMM_TILE, t0 = MF_TG_Y * MF_GEMM_TILE, h = MF_TG_Z;
    const int lr = lt >> 2, lc = (lt & 3) * 8;   // loader: row / token lr, 8 columns
    MF_G const float *xh = x + (mf_i64)h * p.x_head_stride;
    const mf_i64 wrow0 = (mf_i64)h * p.w_head_rows;
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < p.n_in; k0 += MF_GEMM_K) {
        for (int i = 0; i < 8; i++) {
            const int c = k0 + lc + i, r = r0 + lr, t = t0 + lr;
            ws[lr][lc + i] = (r < p.n_out && c < p.n_in)
                                 ? mf_w_at(w, sc, bi, p.dtype, p.sdtype, p.bits,
                                           p.group_size, p.n_in, wrow0 + r, c)
                                 : 0.0f;
            xs[lr][lc + i] = (t < p.n_tok && c < p.n_in)
                                 ? xh[(mf_i64)t * p.x_tok_stride + c]
                                 : 0.0f;
        }
        MF_BARRIER();
        for (int k = 0; k < MF_GEMM_K; k++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a[i] = ws[ty + 16 * i][k];
                b[i] = xs[tx + 16 * i][k];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    acc[i][j] += b[j] * a[i];
        }
        MF_BARRIER();
    }
    MF_G float *yh = y + (mf_i64)h * p.y_head_stride;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            const int r = r0 + ty + 16 * i, t = t0 + tx + 16 * j;
            if (r < p.n_out && t < p.n_tok)
                yh[(mf_i64)t * p.y_tok_stride + r] = acc[i][j];
        }
}

// y[t, h, c] = sum_o x[t, h, o] * W_h[o, c]: a thread per column c, rows in order.
MF_KERNEL(mf_mt)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    const int c = MF_TG_X * MF_NT + MF_LT;
    if (c >= p.n_in)
        return;
    const int t0 = MF_TG_Y * MF_MV_TT, h = MF_TG_Z;
    const int nt = p.n_tok - t0 < MF_MV_TT ? p.n_tok - t0 : MF_MV_TT;
    MF_G const float *xh = x + (mf_i64)h * p.x_head_stride + (mf_i64)t0 * p.x_tok_stride;
    float acc[MF_MV_TT];
    for (int t = 0; t < MF_MV_TT; t++)
        acc[t] = 0.0f;
    for (int o = 0; o < p.n_out; o++) {
        const float wv = mf_w_at(w, sc, bi, p.dtype, p.sdtype, p.bits, p.group_size,
                                 p.n_in, (mf_i64)h * p.w_head_rows + o, c);
#pragma unroll
        for (int t = 0; t < MF_MV_TT; t++)
            if (t < nt)
                acc[t] += xh[(mf_i64)t * p.x_tok_stride + o] * wv;
    }
    MF_G float *yh = y + (mf_i64)h * p.y_head_stride + (mf_i64)t0 * p.y_tok_stride + c;
    for (int t = 0; t < nt; t++)
        yh[(mf_i64)t * p.y_tok_stride] = acc[t];
}

// y[t, c] = W[tokens[t], c]; an id outside the table gives a zero row.
MF_KERNEL(mf_embed)
MF_BUF(0, float, y)
MF_BUF(1, const int, tokens)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_embed, p) {
    const int c = MF_TG_X * MF_NT + MF_LT, t = MF_TG_Y;
    if (c >= p.n_in)
        return;
    const int r = tokens[t];
    y[(mf_i64)t * p.n_in + c] =
        (r < 0 || r >= p.n_out)
            ? 0.0f
            : mf_w_at(w, sc, bi, p.dtype, p.sdtype, p.bits, p.group_size, p.n_in, r, c);
}

#endif /* MF_MATMUL_H */
