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
// (mf_dot_rows). NORM: one token of rmsnorm(x) (nm; affine codes only, mf_dot_rows1n).
template <int R, int ONE, int NORM>
MF_FN void mf_mv_rows(MF_G float *y, MF_G const float *x, MF_G const mf_u32 *w,
                      MF_G const mf_u32 *sc, MF_G const mf_u32 *bi, const struct mf_p_mv p,
                      MF_TG float *xs, struct mf_xnorm nm, int tg_x, int tg_y, int h,
                      int warp, int lane, int lt) {
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
    if (NORM)
        mf_dot_rows1n<R, NORM>(acc, xs, &rw, p.bits, p.sdtype, p.group_size, p.n_in, xt, nm,
                               lt, lane);
    else
        mf_dot_rows<R, ONE>(acc, xs, &rw, p.dtype, p.sdtype, p.bits, p.group_size, p.n_in,
                            xt, p.x_tok_stride, nt, lt, lane);
    mf_dep_wait();   // done in the row dot (after its first weights); here for n_in 0
    MF_G float *yt = y + (mf_i64)h * p.y_head_stride + (mf_i64)t0 * p.y_tok_stride + row0;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < (ONE ? 1 : MF_MV_TT); t++) {
            const float v = mf_warp_sum(acc[r * MF_MV_TT + t]);
            if (lane == 0 && r < rw.n && t < nt) {
                MF_G float *yo = yt + (mf_i64)t * p.y_tok_stride + r;
                *yo = p.acc ? *yo + v : v;   // y + v: the bits of matmul, then axpy
            }
        }
}

MF_KERNEL(mf_mv)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_rows<MF_MV_RPW, 0, 0>(y, x, w, sc, bi, p, xs, mf_xnorm_none(), MF_TG_X, MF_TG_Y,
                                MF_TG_Z, MF_WARP, MF_LANE, MF_LT);
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
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_rows<1, 1, 0>(y, x, w, sc, bi, p, xs, mf_xnorm_none(), MF_TG_X, 0, MF_TG_Z, MF_WARP,
                        MF_LANE, MF_LT);
}

// Segment s of p (s < MF_MULTI_MAX) and its first threadgroup, by selects: indexed by
// a value the compiler cannot know, a struct held by value is copied whole to local
// memory first (mf_mv_multi1n's parameters, 53 words per thread, each thread's first
// loads waiting on them).
MF_FN struct mf_p_mv mf_multi_seg(const struct mf_p_mv_multi p, int s) {
    return s == 0 ? p.seg[0] : s == 1 ? p.seg[1] : p.seg[2];
}

MF_FN int mf_multi_blk0(const struct mf_p_mv_multi p, int s) {
    return s == 0 ? p.blk0[0] : s == 1 ? p.blk0[1] : p.blk0[2];
}

// matmul_multi: threadgroup x of segment s (blk0[s] <= x < blk0[s + 1]) does what
// mf_mv does for weight s alone, so each y is the same, bit for bit, as a matmul's.
// NORM (with ONE): of rmsnorm(x), nm.
template <int ONE, int NORM>
MF_FN void mf_mv_multi_tg(MF_G float *y0, MF_G float *y1, MF_G float *y2, MF_G const float *x,
                          MF_G const mf_u32 *w0, MF_G const mf_u32 *sc0,
                          MF_G const mf_u32 *bi0, MF_G const mf_u32 *w1,
                          MF_G const mf_u32 *sc1, MF_G const mf_u32 *bi1,
                          MF_G const mf_u32 *w2, MF_G const mf_u32 *sc2,
                          MF_G const mf_u32 *bi2, const struct mf_p_mv_multi p, MF_TG float *xs,
                          struct mf_xnorm nm, int bx, int by, int warp, int lane, int lt) {
    const int s = bx >= p.blk0[2] ? 2 : bx >= p.blk0[1] ? 1 : 0;
    MF_G float *y = s == 0 ? y0 : s == 1 ? y1 : y2;
    MF_G const mf_u32 *w = s == 0 ? w0 : s == 1 ? w1 : w2;
    MF_G const mf_u32 *sc = s == 0 ? sc0 : s == 1 ? sc1 : sc2;
    MF_G const mf_u32 *bi = s == 0 ? bi0 : s == 1 ? bi1 : bi2;
    const struct mf_p_mv q = mf_multi_seg(p, s);
    const int b0 = mf_multi_blk0(p, s);
    if (ONE)
        mf_mv_rows<1, 1, NORM>(y, x, w, sc, bi, q, xs, nm, bx - b0, 0, 0, warp, lane,
                               lt);
    else
        mf_mv_rows<MF_MV_RPW, 0, 0>(y, x, w, sc, bi, q, xs, nm, bx - b0, by, 0, warp,
                                    lane, lt);
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
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_multi_tg<0, 0>(y0, y1, y2, x, w0, sc0, bi0, w1, sc1, bi1, w2, sc2, bi2, p, xs,
                         mf_xnorm_none(), MF_TG_X, MF_TG_Y, MF_WARP, MF_LANE, MF_LT);
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
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    mf_mv_multi_tg<1, 0>(y0, y1, y2, x, w0, sc0, bi0, w1, sc1, bi1, w2, sc2, bi2, p, xs,
                         mf_xnorm_none(), MF_TG_X, 0, MF_WARP, MF_LANE, MF_LT);
}

// mf_mv_multi1 of xn = rmsnorm(x) (a layer's input norm, gains g, scale 1), every
// threadgroup taking the norm of the whole x as it stages it, the first also writing
// xn: xn and each y the same bits as mf_rmsnorm then mf_mv_multi1, one launch and one
// device round trip fewer. Affine codes only (the host's choice,
// mf_rms_multi_params); MF_THREADS must be the row dots' thread count, so the sum of
// squares is reduced as mf_rmsnorm reduces it.
#if MF_THREADS != MF_MV_THREADS
#error "mf_mv_multi1n reduces its norm as mf_rmsnorm does: MF_THREADS threads"
#endif
MF_KERNEL(mf_mv_multi1n)
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
MF_BUF(13, const mf_u32, g)
MF_BUF(14, float, xn)
MF_PARAMS(15, struct mf_p_mv_norm, p) {
    alignas(16) MF_SHARED float xs[MF_XS_FLOATS];
    struct mf_xnorm nm = {g, MF_TG_X == 0 ? xn : 0, p.g_dtype, p.has_g, p.eps, 0.0f};
    mf_mv_multi_tg<1, 1>(y0, y1, y2, x, w0, sc0, bi0, w1, sc1, bi1, w2, sc2, bi2, p.mv, xs, nm,
                         MF_TG_X, 0, MF_WARP, MF_LANE, MF_LT);
}

// One thread's share of a k-step of mf_gemm as loaded from device memory: 8 columns of
// one W row (an affine row's codes in w0 / w1 with the group's scale and bias, or float
// values in f) and of one x row. Loaded a step ahead, converted after that step's sums.
struct mf_gemm_ld {
    mf_u32 w0, w1;
    float s, b;
    float f[8];
    float x[8];
};

// Columns c0 .. c0 + 7 of W's row `row` (counted over the tensor; rok: inside the tile's
// rows) and of x's row t. Out-of-range values load as the 0.0f that mf_gemm_put stores
// (an affine row's 8 columns share one group: c0 is a multiple of 8, n_in of 32).
MF_FN void mf_gemm_fetch(MF_TH struct mf_gemm_ld *q, MF_G const float *xh,
                         MF_G const mf_u32 *w, MF_G const mf_u32 *sc, MF_G const mf_u32 *bi,
                         const struct mf_p_mv p, mf_i64 row, int rok, int t, int c0) {
    q->w0 = 0u;
    q->w1 = 0u;
    q->s = 0.0f;
    q->b = 0.0f;
    if (p.dtype == MF_SH_U32) {
        if (rok && c0 < p.n_in) {
            const mf_i64 bit = (mf_i64)c0 * p.bits;
            MF_G const mf_u32 *pw = w + row * (p.n_in / 32) * p.bits + (bit >> 5);
            q->w0 = pw[0];
            if ((int)(bit & 31) + 8 * p.bits > 32)
                q->w1 = pw[1];
            const mf_i64 sg = row * (p.n_in / p.group_size) + c0 / p.group_size;
            q->s = mf_load(sc, p.sdtype, sg);
            q->b = mf_load(bi, p.sdtype, sg);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++)
            q->f[i] = rok && c0 + i < p.n_in ? mf_load(w, p.dtype, row * p.n_in + c0 + i)
                                             : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        q->x[i] = t < p.n_tok && c0 + i < p.n_in ? xh[(mf_i64)t * p.x_tok_stride + c0 + i]
                                                 : 0.0f;
}

// q's 8 columns into the k-major tiles (column lc + i of the step at [lc + i][lr]): W
// values as mf_w_at makes them (s * q + b), x as loaded. The 8 codes of c0 lie in the
// 64 bits w0 | w1 << 32 from bit (c0 * bits) % 32 on (at most 24 + 8 * 5 bits).
MF_FN void mf_gemm_put(MF_TG float *ws, MF_TG float *xs, MF_TH const struct mf_gemm_ld *q,
                       const struct mf_p_mv p, int lr, int lc, int c0) {
    const int sh = (int)(((mf_i64)c0 * p.bits) & 31);
    const mf_u64 v = (((mf_u64)q->w1 << 32) | q->w0) >> sh;
    const mf_u32 mask = (1u << p.bits) - 1u;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const mf_u32 code = (mf_u32)(v >> (i * p.bits)) & mask;
        ws[(lc + i) * MF_GEMM_TILE + lr] =
            p.dtype == MF_SH_U32 ? q->s * (float)code + q->b : q->f[i];
        xs[(lc + i) * MF_GEMM_TILE + lr] = q->x[i];
    }
}

// A 64-row x 64-token output tile per threadgroup; each thread owns 4 x 4 outputs
// (rows 4 ty + i, tokens 4 tx + j). W is dequantized into threadgroup memory once per
// 32-column step and shared by the 64 tokens; the tiles are k-major, so a thread reads
// its 4 rows and 4 tokens of a column in two 16-byte loads. Each thread loads the next
// step's 8 columns of one W row and one x row while the current step is summed. Sums
// run over k in order.
MF_KERNEL(mf_gemm)
MF_BUF(0, float, y)
MF_BUF(1, const float, x)
MF_BUF(2, const mf_u32, w)
MF_BUF(3, const mf_u32, sc)
MF_BUF(4, const mf_u32, bi)
MF_PARAMS(5, struct mf_p_mv, p) {
    MF_SHARED mf_f4 ws4[MF_GEMM_K][MF_GEMM_TILE / 4];
    MF_SHARED mf_f4 xs4[MF_GEMM_K][MF_GEMM_TILE / 4];
    mf_dep_wait();
    MF_TG float *ws = (MF_TG float *)&ws4[0][0];
    MF_TG float *xs = (MF_TG float *)&xs4[0][0];
    const int lt = MF_LT, tx = lt & 15, ty = lt >> 4;
    const int r0 = MF_TG_X * MF_GEMM_TILE, t0 = MF_TG_Y * MF_GEMM_TILE, h = MF_TG_Z;
    const int lr = lt & 63, lc = (lt >> 6) * 8;   // loader: row / token lr, 8 columns
    MF_G const float *xh = x + (mf_i64)h * p.x_head_stride;
    const mf_i64 wrow = (mf_i64)h * p.w_head_rows + r0 + lr;
    const int rok = r0 + lr < p.n_out;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            acc[i][j] = 0.0f;
    struct mf_gemm_ld q;
    mf_gemm_fetch(&q, xh, w, sc, bi, p, wrow, rok, t0 + lr, lc);
    for (int k0 = 0; k0 < p.n_in; k0 += MF_GEMM_K) {
        mf_gemm_put(ws, xs, &q, p, lr, lc, k0 + lc);
        MF_BARRIER();
        if (k0 + MF_GEMM_K < p.n_in)
            mf_gemm_fetch(&q, xh, w, sc, bi, p, wrow, rok, t0 + lr, k0 + MF_GEMM_K + lc);
        for (int k = 0; k < MF_GEMM_K; k++) {
            const mf_f4 a4 = ws4[k][ty], b4 = xs4[k][tx];
            const float a[4] = {a4.x, a4.y, a4.z, a4.w}, b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    acc[i][j] += b[j] * a[i];
        }
        MF_BARRIER();
    }
    MF_G float *yh = y + (mf_i64)h * p.y_head_stride;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int r = r0 + 4 * ty + i, t = t0 + 4 * tx + j;
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
    mf_dep_wait();
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
    mf_dep_wait();
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
