/*
 * grid.h — launch geometry of every kernel as plain C, shared by the drivers so that
 * CUDA and Metal cannot launch a kernel differently. g = threadgroups per grid
 * (x, y, z), b = threads per threadgroup. Not part of the kernel source.
 */
#ifndef MF_GRID_H
#define MF_GRID_H

#include "mf_params.h"

static inline unsigned mf_cdiv(long long n, long long d) {
    return n <= 0 ? 1u : (unsigned)((n + d - 1) / d);
}

static inline void mf_grid_set(unsigned g[3], unsigned b[3], unsigned gx, unsigned gy,
                               unsigned gz, unsigned bx) {
    g[0] = gx;
    g[1] = gy;
    g[2] = gz;
    b[0] = bx;
    b[1] = 1;
    b[2] = 1;
}

// p->rpw output rows per warp, MF_MV_TT tokens per threadgroup row, heads on z.
static inline void mf_grid_mv(const struct mf_p_mv *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_out, MF_MV_ROWS * p->rpw), mf_cdiv(p->n_tok, MF_MV_TT),
                (unsigned)p->n_head, 32 * MF_MV_ROWS);
}

// The segments' matvec threadgroups one after another along x (their token count is
// the same).
static inline void mf_grid_mv_multi(const struct mf_p_mv_multi *p, unsigned g[3],
                                    unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->blk0[MF_MULTI_MAX], mf_cdiv(p->seg[0].n_tok, MF_MV_TT), 1,
                32 * MF_MV_ROWS);
}

// mf_mv_multi1n: mf_mv_multi1's grid.
static inline void mf_grid_mv_norm(const struct mf_p_mv_norm *p, unsigned g[3],
                                   unsigned b[3]) {
    mf_grid_mv_multi(&p->mv, g, b);
}

// mf_route1n: its router rows' grid (mf_mv_multi1n's).
static inline void mf_grid_route1n(const struct mf_p_route1n *p, unsigned g[3],
                                   unsigned b[3]) {
    mf_grid_mv_norm(&p->mv, g, b);
}

// The segments' 16-row-tile threadgroups one after another along x, heads on z.
static inline void mf_grid_mv_tc(const struct mf_p_mv_multi *p, unsigned g[3],
                                 unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->blk0[MF_MULTI_MAX], 1, (unsigned)p->seg[0].n_head,
                32 * MF_MV_ROWS);
}

static inline void mf_grid_gemm(const struct mf_p_mv *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_out, MF_GEMM_TILE), mf_cdiv(p->n_tok, MF_GEMM_TILE),
                (unsigned)p->n_head, 256);
}

// mf_gemm on tensor cores (mma.h): MF_MMA_ROWS rows, MF_MMA_TOK tokens, heads on z.
static inline void mf_grid_gemm_mma(const struct mf_p_mv *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_out, MF_MMA_ROWS), mf_cdiv(p->n_tok, MF_MMA_TOK),
                (unsigned)p->n_head, MF_THREADS);
}

// mf_gemm_mma_multi: every segment's row tiles on x (blk0), token tiles on y.
static inline void mf_grid_gemm_mma_multi(const struct mf_p_mv_multi *p, unsigned g[3],
                                          unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->blk0[MF_MULTI_MAX], mf_cdiv(p->seg[0].n_tok, MF_MMA_TOK),
                1, MF_THREADS);
}

// A thread per input column, MF_MV_TT tokens each.
static inline void mf_grid_mt(const struct mf_p_mv *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_in, MF_THREADS), mf_cdiv(p->n_tok, MF_MV_TT),
                (unsigned)p->n_head, MF_THREADS);
}

static inline void mf_grid_embed(const struct mf_p_embed *p, unsigned g[3],
                                 unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_in, MF_THREADS), (unsigned)p->n_tok, 1, MF_THREADS);
}

// A threadgroup per row.
static inline void mf_grid_norm(const struct mf_p_norm *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)(p->n_tok * p->n_head), 1, 1, MF_THREADS);
}

static inline void mf_grid_rope(const struct mf_p_rope *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv((long long)p->n_tok * p->n_heads * (p->n_rot / 2), MF_THREADS),
                1, 1, MF_THREADS);
}

// A threadgroup per (tensor, token, head) row.
static inline void mf_grid_rope_qk(const struct mf_p_rope_qk *p, unsigned g[3],
                                   unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)(p->n_tok * (p->heads[0] + p->heads[1])), 1, 1, MF_THREADS);
}

static inline void mf_grid_attn_part(const struct mf_p_attn *p, unsigned g[3],
                                     unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->n_split, (unsigned)p->n_head, (unsigned)p->n_tok,
                MF_THREADS);
}

// Splits on x, kv heads on y, tiles of MF_ATTN_TILE_ROWS (token, head) rows on z.
static inline void mf_grid_attn_tile(const struct mf_p_attn *p, unsigned g[3],
                                     unsigned b[3]) {
    const int group = p->n_head / p->n_kv_head > 0 ? p->n_head / p->n_kv_head : 1;
    mf_grid_set(g, b, (unsigned)p->n_split, (unsigned)p->n_kv_head,
                mf_cdiv((long long)p->n_tok * group, MF_ATTN_TILE_ROWS(p->dk, p->dv)),
                MF_THREADS);
}

static inline void mf_grid_attn_comb(const struct mf_p_attn *p, unsigned g[3],
                                     unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->n_head, (unsigned)p->n_tok, 1, MF_THREADS);
}

static inline void mf_grid_conv(const struct mf_p_conv *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->C, MF_THREADS), 1, 1, MF_THREADS);
}

static inline void mf_grid_gates(const struct mf_p_gates *p, unsigned g[3],
                                 unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv((long long)p->n_tok * p->nv, MF_THREADS), 1, 1, MF_THREADS);
}

// A warp per state row, rows of one v-head per grid column.
static inline void mf_grid_gdn(const struct mf_p_gdn *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->dv, MF_GDN_ROWS), (unsigned)p->nv, 1, 32 * MF_GDN_ROWS);
}

static inline void mf_grid_ew(const struct mf_p_ew *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv((long long)p->n_rows * p->n_cols, MF_THREADS), 1, 1,
                MF_THREADS);
}

static inline void mf_grid_axpy(const struct mf_p_ew *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n, MF_THREADS), 1, 1, MF_THREADS);
}

// A row per grid column x, column blocks on y.
static inline void mf_grid_gather(const struct mf_p_rows *p, unsigned g[3],
                                  unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->n_rows, mf_cdiv(p->n, MF_THREADS), 1, MF_THREADS);
}

// A destination row per grid column x, column blocks on y.
static inline void mf_grid_scatter(const struct mf_p_rows *p, unsigned g[3],
                                   unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->n_dst, mf_cdiv(p->n, MF_THREADS), 1, MF_THREADS);
}

// Grid-stride: at most 4096 threadgroups.
static inline void mf_grid_flag(const struct mf_p_flag *p, unsigned g[3], unsigned b[3]) {
    long long n = (long long)p->n_hi * 4294967296LL + (long long)(unsigned)p->n_lo;
    unsigned gx = mf_cdiv(n, MF_THREADS);
    mf_grid_set(g, b, gx < 4096 ? gx : 4096, 1, 1, MF_THREADS);
}

// A threadgroup per token.
static inline void mf_grid_route(const struct mf_p_route *p, unsigned g[3],
                                 unsigned b[3]) {
    mf_grid_set(g, b, (unsigned)p->n_tok, 1, 1, MF_THREADS);
}

// Warps over output rows (gate/up: one row of each when p->rpw == 1, else MF_MV_RPW /
// 2; down: MF_MV_RPW rows), experts on y, MF_MV_TT-row tiles of each expert on z.
static inline void mf_grid_moe_gu(const struct mf_p_moe *p, unsigned g[3], unsigned b[3]) {
    const int per = p->rpw == 1 ? 1 : MF_MV_RPW / 2;
    mf_grid_set(g, b, mf_cdiv(p->n_ff, MF_MV_ROWS * per), (unsigned)p->n_exp,
                mf_cdiv(p->max_rows, MF_MV_TT), 32 * MF_MV_ROWS);
}

// rpw 1: the one-token kernel (mf_moe_down1) and its rows per warp.
static inline void mf_grid_moe_down(const struct mf_p_moe *p, unsigned g[3],
                                    unsigned b[3]) {
    const int rows = p->rpw == 1 ? MF_DOWN1_RPW : MF_MV_RPW;
    mf_grid_set(g, b, mf_cdiv(p->n_embd, MF_MV_ROWS * rows), (unsigned)p->n_exp,
                mf_cdiv(p->max_rows, MF_MV_TT), 32 * MF_MV_ROWS);
}

// Tensor cores: p->rpw tiles (gate/up: 8 indices, down: 16 rows) per threadgroup
// along x, experts on y, MF_TC_TOK tokens per threadgroup row z.
static inline void mf_grid_moe_gu_tc(const struct mf_p_moe *p, unsigned g[3], unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(mf_cdiv(p->n_ff, MF_TC_ROWS / 2), p->rpw), (unsigned)p->n_exp,
                mf_cdiv(p->max_rows, MF_TC_TOK(p->n_embd)), 32 * MF_MV_ROWS);
}

// Prefill experts on tensor cores (mma.h): MF_MMA_ROWS rows (gate/up: half as many
// output indices) along x, experts on y, MF_MMA_TOK tokens on z.
static inline void mf_grid_moe_gu_mma(const struct mf_p_moe *p, unsigned g[3],
                                      unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_ff, MF_MMA_ROWS / 2), (unsigned)p->n_exp,
                mf_cdiv(p->max_rows, MF_MMA_TOK), MF_THREADS);
}

static inline void mf_grid_moe_down_mma(const struct mf_p_moe *p, unsigned g[3],
                                        unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_embd, MF_MMA_ROWS), (unsigned)p->n_exp,
                mf_cdiv(p->max_rows, MF_MMA_TOK), MF_THREADS);
}

static inline void mf_grid_moe_down_tc(const struct mf_p_moe *p, unsigned g[3],
                                       unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(mf_cdiv(p->n_embd, MF_TC_ROWS), p->rpw), (unsigned)p->n_exp,
                mf_cdiv(p->max_rows, MF_TC_TOK(p->n_ff)), 32 * MF_MV_ROWS);
}

// mf_moe_down1's grid: the combine rides on it.
static inline void mf_grid_moe_down1c(const struct mf_p_moe_dc *p, unsigned g[3],
                                      unsigned b[3]) {
    mf_grid_moe_down(&p->m, g, b);
}

// A thread per column, tokens on y.
static inline void mf_grid_moe_combine(const struct mf_p_moe_dev *p, unsigned g[3],
                                       unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_embd, MF_THREADS), (unsigned)p->n_tok, 1, MF_THREADS);
}

// gpt-oss: a warp per MXFP4 row, MF_MV_TT tokens per threadgroup row; a thread per
// element of the clamped SwiGLU.
static inline void mf_grid_mv_mxfp4(const struct mf_p_mxfp4 *p, unsigned g[3],
                                    unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv(p->n_out, MF_MV_ROWS), mf_cdiv(p->n_tok, MF_MV_TT), 1,
                32 * MF_MV_ROWS);
}

static inline void mf_grid_swiglu_clamped(const struct mf_p_swiglu_clamped *p, unsigned g[3],
                                          unsigned b[3]) {
    mf_grid_set(g, b, mf_cdiv((long long)p->n_rows * p->n_cols, MF_THREADS), 1, 1,
                MF_THREADS);
}

#endif /* MF_GRID_H */
