/*
 * mf_params.h — one plain-old-data params struct per kernel (kernels.def names which),
 * shared by the kernels and the C drivers, and the launch constants both sides must
 * agree on. Only 32-bit ints and floats, no pointers: the layout is then the same in
 * C, CUDA C++ and MSL (`constant T &`). Buffers are passed separately, in the order
 * of the kernel's MF_BUF list.
 */
#ifndef MF_PARAMS_H
#define MF_PARAMS_H

// Element types of weights, the values of enum mf_dtype (core/common.h; the CUDA
// driver checks they agree at compile time).
#define MF_SH_F32 0
#define MF_SH_F16 1
#define MF_SH_BF16 2
#define MF_SH_U32 3
#define MF_SH_U8 4   // as a scale dtype: MXFP4 (E8M0 exponents, no biases)

// Matvec: warps per threadgroup, output rows per warp (each staged x value serves
// them all from a register; small decode products use 1 for more warps), tokens per
// register tile. The grouped experts' gate/up kernel gives a warp MF_MV_RPW / 2 rows of
// gate and the same rows of up (1 and 1 with one row per warp).
#define MF_MV_ROWS 8
#define MF_MV_RPW 4
#define MF_MV_TT 4
// Rows per warp of the one-token grouped down kernel (mf_moe_down1).
#define MF_DOWN1_RPW 2
// Tiled GEMM: a 64-row x 64-token output tile, 256 threads, k steps of 32 columns.
#define MF_GEMM_TILE 64
#define MF_GEMM_K 32
// Output tiles below which a product of many tokens takes mf_mv's row dots instead (a
// router's 128 rows make 16 tiles of a 512-token chunk: 16 of an H100's 132 SMs).
#define MF_GEMM_MIN_TG 32
// Threads of the one-dimensional and row kernels.
#define MF_THREADS 256
// Attention: keys per split (one threadgroup), the longest head dimension.
#define MF_ATTN_CHUNK 256
#define MF_ATTN_DK_MAX 1024
// Prefill attention in tiles (mf_attn_tile): query values per tile, and query rows per
// tile for head dimensions dk, dv (16 up to 128, 8 up to MF_ATTN_TILE_DMAX).
#define MF_ATTN_TILE_Q 2048
#define MF_ATTN_TILE_DMAX 256
#define MF_ATTN_TILE_ROWS(dk, dv) ((dk) <= 128 && (dv) <= 128 ? 16 : 8)
// GatedDeltaNet recurrence: state rows (warps) per threadgroup, the longest dk.
#define MF_GDN_ROWS 4
#define MF_GDN_DK_MAX 256
// Router: the most experts and groups one threadgroup holds.
#define MF_ROUTE_E_MAX 1024
#define MF_ROUTE_G_MAX 64
#define MF_ROUTE_K_MAX 64

// A weight matrix W [n_out, n_in] (per head: rows h*w_head_rows ..), float or MLX
// affine-quantized; shared by matvec, GEMM, transposed matvec and embed. vec: the codes
// are 16-byte aligned (the row dots then use wide loads); rpw: matvec rows per warp, 1
// (the one-token kernels) or MF_MV_RPW (grid.h and the kernel agree through it).
// y[t, h, r] (or y[t, h, c] transposed) for t < n_tok, h < n_head; acc (the matvec
// kernels): y[t, h, r] += the product instead (matmul_add).
struct mf_p_mv {
    int n_in, n_out, n_tok, n_head;
    int w_head_rows;
    int x_tok_stride, x_head_stride, y_tok_stride, y_head_stride;
    int dtype, sdtype, bits, group_size;
    int vec, rpw, acc;
};

// Up to MF_MULTI_MAX products of one x in one launch (matmul_multi): segment s is the
// matvec seg[s] (one head) on threadgroups blk0[s] .. blk0[s + 1] - 1 along x; unused
// segments have no threadgroups (blk0[s + 1] == blk0[s]).
#define MF_MULTI_MAX 3
struct mf_p_mv_multi {
    struct mf_p_mv seg[MF_MULTI_MAX];
    int n_seg;
    int blk0[MF_MULTI_MAX + 1];
};

// mf_mv_multi1n: the one-token mv of rmsnorm(x) (x / sqrt(mean(x^2) + eps) * g, g
// where has_g, of dtype g_dtype; n = mv.seg[0].n_in).
struct mf_p_mv_norm {
    struct mf_p_mv_multi mv;
    int has_g, g_dtype;
    float eps;
};

// Tensor-core matvec (tc.h, mf_mv_tc, mf_p_mv_multi): 16-row tiles of one token,
// seg[s].rpw tiles per threadgroup (1, 2, 4 or 8) and MF_MV_ROWS / rpw warps per tile;
// n_in <= MF_TC_MAX_IN (x is staged whole, as three bf16 parts of MF_TC_XP words).
#define MF_TC_ROWS 16
#define MF_TC_MAX_IN 4096
#define MF_TC_XP (3 * (MF_TC_MAX_IN / 2 + 48))
// Tokens a tensor-core threadgroup stages at once for n_in columns: two while both fit.
#define MF_TC_TOK(n_in) (2 * (n_in) <= MF_TC_MAX_IN ? 2 : 1)

// Prefill experts on tensor cores (mma.h): the entries of a grouped call with at least
// MF_MMA_MIN_ROWS rows (more than the few tokens that route on the device, whose rows
// must get the one-row kernels' bits) go in threadgroups of MF_MMA_ROWS rows (gate/up:
// half gate, half up) x MF_MMA_TOK tokens, which stage x MF_MMA_KB columns at a time,
// MF_MMA_XS words a token and part.
#define MF_MMA_MIN_ROWS 8
#define MF_MMA_ROWS 128
#define MF_MMA_TOK 32
#define MF_MMA_KB 128
#define MF_MMA_XS (MF_MMA_KB / 2 + 2)

struct mf_p_embed {
    int n_in, n_out, n_tok;
    int dtype, sdtype, bits, group_size;
};

// RMSNorm over rows (t, h) of n values at t*tok_stride + h*head_stride; gated by z
// ([n_tok*n_head, n] dense) when has_z.
struct mf_p_norm {
    int n_tok, tok_stride, n_head, head_stride, n;
    int has_g, g_dtype, has_z;
    float eps, scale;
};

struct mf_p_rope {
    int n_tok, n_heads, tok_stride, head_stride, n_rot, pos0, traditional;
    float mscale;
};

// rope_qk: two tensors (0 = q, 1 = k) of heads[i] heads of head_dim floats (head h of
// token t at t * tok_stride[i] + h * head_stride[i]), each with an optional per-head
// RMSNorm (has_g[i]; g_dtype[i] its weight's dtype) before the rotation; a threadgroup
// per (tensor, token, head), q's rows first. head_dim <= MF_ROPE_D_MAX with a norm.
#define MF_ROPE_D_MAX 1024
struct mf_p_rope_qk {
    int n_tok, head_dim, n_rot, pos0, traditional;
    int heads[2];
    int tok_stride[2];
    int head_stride[2];
    int has_g[2];
    int g_dtype[2];
    float eps, mscale;
};

// Split attention: n_split partials of `chunk` keys (at most MF_ATTN_CHUNK) per (token,
// head), then a combine in split order. Split s covers positions base + s * chunk on;
// window > 0: a query at p sees p - window + 1 .. p; ring > 0: position p in cache
// row p % ring; sink_dtype: the dtype of the per-head sink logits, -1 for none.
struct mf_p_attn {
    int n_tok, n_head, n_kv_head, dk, dv, k_stride, v_stride, pos0, n_split, chunk;
    float scale;
    int window, ring, base, sink_dtype;
};

struct mf_p_conv {
    int n_tok, C, K, w_dtype;
};

struct mf_p_gates {
    int n_tok, nv, ab_stride, a_dtype, dt_dtype;
};

struct mf_p_gdn {
    int n_tok, nk, nv, dk, dv, qkv_stride;
};

// Elementwise: swiglu / mul_sigmoid over n_rows x n_cols, axpy over n.
struct mf_p_ew {
    int n_rows, n_cols, stride, g_cols, n;
    float alpha;
};

// Row gathers and scatter-adds: n_rows rows of n floats.
struct mf_p_rows {
    int n_rows, n, has_w, n_dst;
};

// Non-finite check over n = n_hi * 2^32 + n_lo floats (grid-stride).
struct mf_p_flag {
    int n_lo, n_hi;
};

struct mf_p_route {
    int n_tok, n_expert, n_used, kind, norm_topk_prob, n_group, topk_group, has_bias;
    float scaling;
};

// mf_route1n: one token's router rows with its input norm (mv, one segment), then the
// routing r of its logits.
struct mf_p_route1n {
    struct mf_p_mv_norm mv;
    struct mf_p_route r;
};

// Grouped experts: n_exp experts, each with a table entry {blob byte offset from the
// base buffer (lo, hi), row0, n_rows}; component weights at byte offsets in a blob.
// vec: every blob and code offset is 16-byte aligned (wide loads); rpw: 1 for the
// one-row kernels (gate/up one row of each per warp, down MF_DOWN1_RPW rows) or
// MF_MV_RPW. dev_k > 0: routing
// left on the device (moe_experts_dev) and no table: the table buffer is the expert ids
// idx[n_tok * dev_k], entry r is expert idx[r] at byte offset idx[r] * stride
// (stride_hi * 2^32 + stride_lo) with one row, row r of gu / eo, whose input is row
// r / dev_k of x (passed as xg). gpt-oss: per-expert output biases at blob offsets
// gate_bias / up_bias / down_bias (-1 for none; floats of bias_dtype) and the clamped
// SwiGLU (act 1, with alpha and limit). mma_rows > 0: the entries of at least that
// many rows are the tensor-core pair's (mma.h) and mf_moe_gu / mf_moe_down skip them.
// route_ahead (with dev_k): the ids and x were written two or more kernels before
// mf_moe_gu1 (mf_moe_dev's route_ahead).
struct mf_p_moe {
    int n_exp, n_embd, n_ff, max_rows;
    int dtype, sdtype, bits, group_size;
    int gate_w, gate_s, gate_b, up_w, up_s, up_b, down_w, down_s, down_b;
    int vec, rpw;
    int dev_k, stride_lo, stride_hi;
    int gate_bias, up_bias, down_bias, bias_dtype, act;
    float alpha, limit;
    int mma_rows;
    int route_ahead;
};

// Resident experts routed on the device: n_tok tokens x k experts, blobs stride bytes
// apart (stride_hi * 2^32 + stride_lo).
struct mf_p_moe_dev {
    int n_tok, k, n_embd, stride_lo, stride_hi;
    int has_shared, has_resid, has_flag;
};

// mf_moe_down1c: mf_moe_down1's params (m) and the combine's (c) for one launch.
struct mf_p_moe_dc {
    struct mf_p_moe m;
    struct mf_p_moe_dev c;
};

// gpt-oss (gptoss.h): an MXFP4 matvec y[t, r] = x[t] . W[r] over n_tok tokens (rows of x
// and y at their strides), and the clamped SwiGLU over n_rows x n_cols.
struct mf_p_mxfp4 {
    int n_in, n_out, n_tok, x_stride, y_stride;
};

struct mf_p_swiglu_clamped {
    int n_rows, n_cols, stride;
    float alpha, limit;
};

#endif /* MF_PARAMS_H */
