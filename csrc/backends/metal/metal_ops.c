/*
 * metal_ops.c — the compute ops of the Metal op table: the twins of the CUDA ops
 * (cuda_ops.c), filling the same params structs for the same kernels, so the only
 * Metal-specific code is the glue they call (metal_backend.m). Each op checks what
 * its kernels cannot, copies host arguments into shared buffers and encodes kernels
 * on the exec's command buffer. Plain C; nothing waits for the GPU except moe_route
 * with host outputs (moe_experts on reader slots does not: see there).
 */
#include "backends/metal/metal_internal.h"

#include <stdlib.h>

_Static_assert(MF_SH_F32 == MF_DTYPE_F32 && MF_SH_F16 == MF_DTYPE_F16 &&
                   MF_SH_BF16 == MF_DTYPE_BF16 && MF_SH_U32 == MF_DTYPE_U32,
               "shaders/mf_params.h dtype codes must equal enum mf_dtype");

const char *const mf_metal_kernel_names[MF_MKID_COUNT] = {
#define K(name, params, n_buf, grid) #name,
#include "../../../shaders/kernels.def"
#undef K
};

const int mf_metal_kernel_n_buf[MF_MKID_COUNT] = {
#define K(name, params, n_buf, grid) n_buf,
#include "../../../shaders/kernels.def"
#undef K
};

// Typed launchers: launch_<kernel>(ex, &params, bufs, op), geometry from grid.h.
#define K(name, params, n_buf, grid)                                                   \
    static inline void launch_##name(struct mf_exec *ex, const struct params *p,       \
                                     const void *const bufs[n_buf], const char *op) {  \
        unsigned g[3], b[3];                                                           \
        grid(p, g, b);                                                                 \
        mf_metal_launch(ex, MF_MKID_##name, g, b, p, sizeof *p, bufs, n_buf, op);      \
    }
#include "../../../shaders/kernels.def"
#undef K

/* ==== Weights ==== */

static int check_weight(struct mf_exec *ex, const struct mf_weight *w, const char *op) {
    if (mf_gpu_weight_ok(w))
        return 1;
    mf_metal_fail(ex, MF_ERR_ARG,
                  "metal backend: %s: weight [%lld, %lld] dtype %s bits %d group %d: "
                  "expected F32/F16/BF16 or affine U32 codes (MXFP4: matmul only) "
                  "with bits 2-6/8, group 32/64/128 dividing n_in, float scales and biases",
                  op, (long long)w->n_out, (long long)w->n_in, mf_dtype_name(w->dtype),
                  w->bits, w->group_size);
    return 0;
}

/* ==== Linear algebra ==== */

// gpt-oss's MXFP4 weights (shaders/gptoss.h, the CUDA driver's rule; never run): the
// plain product x @ W^T of 4-bit codes in groups of 32 with U8 scales, one head.
static void matmul_mxfp4(struct mf_exec *ex, float *y, int y_stride,
                         const struct mf_weight *w, int transposed, const float *x,
                         int x_stride, int n_tok, int n_head) {
    if (transposed || n_head != 1 || w->dtype != MF_DTYPE_U32 || w->bits != 4 ||
        w->group_size != 32 || w->sdtype != MF_DTYPE_U8 || !w->scales || w->n_in % 32) {
        mf_metal_fail(ex, MF_ERR_ARG,
                      "metal backend: matmul: MXFP4 weight [%lld, %lld] bits %d group %d: "
                      "only x @ W^T of one head, 4-bit codes, groups of 32, U8 scales",
                      (long long)w->n_out, (long long)w->n_in, w->bits, w->group_size);
        return;
    }
    struct mf_p_mxfp4 p = {.n_in = (int)w->n_in, .n_out = (int)w->n_out, .n_tok = n_tok,
                           .x_stride = x_stride, .y_stride = y_stride};
    const void *const b[4] = {y, w->w, w->scales, x};
    launch_mf_mv_mxfp4(ex, &p, b, "matmul");
}

// The buffers of mf_mv_multi and mf_mv_tc: each segment's y, x, then each weight's
// codes, scales and biases; unused segments repeat the first.
static void multi_bufs(int n, float *const *y, const struct mf_weight *const *w,
                       const float *x, const void **b) {
    b[3] = x;
    for (int s = 0; s < MF_MULTI_MAX; s++) {
        const struct mf_weight *ws = w[s < n ? s : 0];
        b[s] = y[s < n ? s : 0];
        b[4 + 3 * s] = ws->w;
        b[5 + 3 * s] = ws->scales;
        b[6 + 3 * s] = ws->biases;
    }
}

void mf_metal_matmul_heads(struct mf_exec *ex, float *y, int y_tok_stride,
                           int y_head_stride, const struct mf_weight *w,
                           int64_t w_head_rows, int transposed, const float *x,
                           int x_tok_stride, int x_head_stride, int n_tok, int n_head) {
    if (n_tok <= 0 || n_head <= 0 || w->n_out <= 0 || w->n_in <= 0 || mf_metal_failed(ex))
        return;
    if (w->qmode == MF_QMODE_MXFP4) {
        matmul_mxfp4(ex, y, y_tok_stride, w, transposed, x, x_tok_stride, n_tok, n_head);
        return;
    }
    if (!check_weight(ex, w, "matmul"))
        return;
    struct mf_p_mv p = mf_mv_params(w);
    p.n_tok = n_tok;
    p.n_head = n_head;
    p.w_head_rows = (int)w_head_rows;
    p.x_tok_stride = x_tok_stride;
    p.x_head_stride = x_head_stride;
    p.y_tok_stride = y_tok_stride;
    p.y_head_stride = y_head_stride;
    const void *const b[5] = {y, x, w->w, w->scales, w->biases};
    p.rpw = mf_mv_rpw(n_tok);
    struct mf_p_mv_multi t;
    if (mf_mv_tc_heads(&p, w, transposed, mf_metal_tc(ex), &t)) {
        const void *bt[4 + 3 * MF_MULTI_MAX];
        multi_bufs(1, &y, &w, x, bt);
        launch_mf_mv_tc(ex, &t, bt, "matmul");
    } else if (transposed)
        launch_mf_mt(ex, &p, b, "matmul_t");
    else if (n_tok == 1)
        launch_mf_mv1(ex, &p, b, "matmul");
    else if (n_tok <= MF_MV_MAX_TOK)
        launch_mf_mv(ex, &p, b, "matmul");
    else if (mf_gemm_mma_ok(&p, w, (uintptr_t)x, mf_metal_mma(ex)))
        launch_mf_gemm_mma(ex, &p, b, "matmul");
    else if (mf_gemm_few(&p))
        launch_mf_mv(ex, &p, b, "matmul");
    else
        launch_mf_gemm(ex, &p, b, "matmul");
}

void mf_metal_matmul(struct mf_exec *ex, float *y, const struct mf_weight *w,
                     const float *x, int n_tok) {
    mf_metal_matmul_heads(ex, y, (int)w->n_out, 0, w, 0, 0, x, (int)w->n_in, 0, n_tok, 1);
}

// One mf_mv_multi dispatch, as the CUDA driver launches it.
void mf_metal_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                           const struct mf_weight *const *w, const float *x, int n_tok) {
    struct mf_p_mv_multi p;
    const int mma = mf_metal_mma(ex) && (mf_metal_fuse(ex) & MF_FUSE_GEMM);
    const enum mf_multi_plan plan =
        mf_matmul_multi_plan(n, w, n_tok, mf_metal_tc(ex), mma, (uintptr_t)x, &p);
    if (plan == MF_MULTI_SEPARATE) {
        for (int i = 0; i < n; i++)
            mf_metal_matmul(ex, y[i], w[i], x, n_tok);
        return;
    }
    if (mf_metal_failed(ex))
        return;
    for (int i = 0; i < n; i++)
        if (!check_weight(ex, w[i], "matmul_multi"))
            return;
    const void *b[4 + 3 * MF_MULTI_MAX];
    multi_bufs(n, y, w, x, b);
    if (plan == MF_MULTI_TC)
        launch_mf_mv_tc(ex, &p, b, "matmul_multi");
    else if (plan == MF_MULTI_MMA)
        launch_mf_gemm_mma_multi(ex, &p, b, "matmul_multi");
    else if (plan == MF_MULTI_MV1)
        launch_mf_mv_multi1(ex, &p, b, "matmul_multi");
    else
        launch_mf_mv_multi(ex, &p, b, "matmul_multi");
}

// One mf_mv1 dispatch adding into y, as the CUDA driver launches it.
void mf_metal_matmul_add(struct mf_exec *ex, float *y, const struct mf_weight *w,
                         const float *x, int n_tok, float *tmp) {
    struct mf_p_mv p;
    if (!mf_matmul_add_params(w, n_tok, mf_metal_tc(ex), mf_metal_fuse(ex) & MF_FUSE_ADD, &p)) {
        mf_metal_matmul(ex, tmp, w, x, n_tok);
        mf_metal_axpy(ex, y, 1.0f, tmp, n_tok * (int)w->n_out);
        return;
    }
    if (mf_metal_failed(ex) || !check_weight(ex, w, "matmul_add"))
        return;
    const void *const b[5] = {y, x, w->w, w->scales, w->biases};
    launch_mf_mv1(ex, &p, b, "matmul_add");
}

// One mf_mv_multi1n dispatch, as the CUDA driver launches it.
void mf_metal_rms_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                               const struct mf_weight *const *w, float *xn, const float *x,
                               const struct mf_weight *g, float eps, int n_tok) {
    struct mf_p_mv_norm p;
    if (g && g->dtype == MF_DTYPE_U32) {
        mf_metal_fail(ex, MF_ERR_ARG,
                      "metal backend: rms_matmul_multi: a quantized norm weight");
        return;
    }
    if (!mf_rms_multi_params(n, w, n_tok, mf_metal_tc(ex), g, eps,
                             mf_metal_fuse(ex) & MF_FUSE_NORM, &p)) {
        mf_metal_rmsnorm(ex, xn, x, g, n_tok, (int)w[0]->n_in, eps, 1.0f);
        mf_metal_matmul_multi(ex, n, y, w, xn, n_tok);
        return;
    }
    if (mf_metal_failed(ex))
        return;
    for (int i = 0; i < n; i++)
        if (!check_weight(ex, w[i], "rms_matmul_multi"))
            return;
    const void *b[6 + 3 * MF_MULTI_MAX];
    multi_bufs(n, y, w, x, b);
    b[4 + 3 * MF_MULTI_MAX] = g ? g->w : NULL;
    b[5 + 3 * MF_MULTI_MAX] = xn;
    launch_mf_mv_multi1n(ex, &p, b, "rms_matmul_multi");
}

void mf_metal_matmul_t(struct mf_exec *ex, float *y, const struct mf_weight *w,
                       const float *x, int n_tok) {
    mf_metal_matmul_heads(ex, y, (int)w->n_in, 0, w, 0, 1, x, (int)w->n_out, 0, n_tok, 1);
}

void mf_metal_embed(struct mf_exec *ex, float *y, const struct mf_weight *w,
                    const int32_t *tokens_host, int n_tok) {
    if (n_tok <= 0 || mf_metal_failed(ex) || !check_weight(ex, w, "embed"))
        return;
    const void *tok = mf_metal_host_arg(ex, tokens_host, (size_t)n_tok * 4, "embed");
    if (!tok)
        return;
    struct mf_p_embed p = {.n_in = (int)w->n_in, .n_out = (int)w->n_out, .n_tok = n_tok,
                           .dtype = (int)w->dtype, .sdtype = (int)w->sdtype,
                           .bits = w->bits,
                           .group_size = w->group_size > 0 ? w->group_size : 32};
    const void *const b[5] = {y, tok, w->w, w->scales, w->biases};
    launch_mf_embed(ex, &p, b, "embed");
}

/* ==== Norms and rope ==== */

// rmsnorm, gated by z; or (add) x += z first (kernel mf_add_rmsnorm).
static void norm(struct mf_exec *ex, float *y, const float *x, const float *z, int add,
                 const struct mf_weight *g, struct mf_p_norm p, const char *op) {
    if (p.n_tok <= 0 || p.n_head <= 0 || p.n <= 0 || mf_metal_failed(ex))
        return;
    if (g && g->dtype == MF_DTYPE_U32) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: %s: a quantized norm weight", op);
        return;
    }
    p.has_g = g != NULL;
    p.g_dtype = g ? (int)g->dtype : 0;
    p.has_z = z != NULL && !add;
    const void *const b[4] = {y, x, z, g ? g->w : NULL};
    if (add)
        launch_mf_add_rmsnorm(ex, &p, b, op);
    else
        launch_mf_rmsnorm(ex, &p, b, op);
}

void mf_metal_rmsnorm(struct mf_exec *ex, float *y, const float *x,
                      const struct mf_weight *g, int n_rows, int n, float eps, float scale) {
    struct mf_p_norm p = {.n_tok = n_rows, .tok_stride = n, .n_head = 1, .n = n,
                          .eps = eps, .scale = scale};
    norm(ex, y, x, NULL, 0, g, p, "rmsnorm");
}

void mf_metal_add_rmsnorm(struct mf_exec *ex, float *y, float *x, const float *r,
                          const struct mf_weight *g, int n_rows, int n, float eps) {
    struct mf_p_norm p = {.n_tok = n_rows, .tok_stride = n, .n_head = 1, .n = n,
                          .eps = eps, .scale = 1.0f};
    norm(ex, y, x, r, 1, g, p, "add_rmsnorm");
}

void mf_metal_rmsnorm_heads(struct mf_exec *ex, float *y, const float *x,
                            const struct mf_weight *g, int n_tok, int tok_stride,
                            int n_head, int head_stride, int n, float eps, float scale) {
    struct mf_p_norm p = {.n_tok = n_tok, .tok_stride = tok_stride, .n_head = n_head,
                          .head_stride = head_stride, .n = n, .eps = eps, .scale = scale};
    norm(ex, y, x, NULL, 0, g, p, "rmsnorm_heads");
}

void mf_metal_rmsnorm_gated(struct mf_exec *ex, float *y, const float *x, const float *z,
                            const struct mf_weight *g, int n_rows, int n, float eps) {
    struct mf_p_norm p = {.n_tok = n_rows, .tok_stride = n, .n_head = 1, .n = n,
                          .eps = eps, .scale = 1.0f};
    norm(ex, y, x, z, 0, g, p, "rmsnorm_gated");
}

void mf_metal_rope(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                   int head_stride, int n_rot, const float *inv_freq, int pos0,
                   int traditional, float mscale) {
    if (n_tok <= 0 || n_heads <= 0 || n_rot < 2 || mf_metal_failed(ex))
        return;
    struct mf_p_rope p = {.n_tok = n_tok, .n_heads = n_heads, .tok_stride = tok_stride,
                          .head_stride = head_stride, .n_rot = n_rot, .pos0 = pos0,
                          .traditional = traditional, .mscale = mscale};
    const void *const b[2] = {x, inv_freq};
    launch_mf_rope(ex, &p, b, "rope");
}

// q and k (each after its optional per-head RMSNorm) in one mf_rope_qk dispatch, as
// the CUDA driver launches it (gpu_args.h).
void mf_metal_rope_qk(struct mf_exec *ex, const struct mf_rope_qk *r) {
    struct mf_p_rope_qk p;
    if (mf_metal_failed(ex))
        return;
    switch (mf_rope_qk_plan(r, &p)) {
    case MF_ROPE_QK_NONE:
        return;
    case MF_ROPE_QK_BAD:
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: rope_qk: a quantized norm weight, or "
                      "normalised heads of %d values (at most %d)", r->head_dim,
                      MF_ROPE_QK_NORM_MAX);
        return;
    case MF_ROPE_QK_FUSED:
        break;
    }
    const void *const b[5] = {r->x[0], r->x[1], r->inv_freq,
                              r->norm[0] ? r->norm[0]->w : NULL,
                              r->norm[1] ? r->norm[1]->w : NULL};
    launch_mf_rope_qk(ex, &p, b, "rope_qk");
}

/* ==== Attention ==== */

void mf_metal_attention_ext(struct mf_exec *ex, float *out, const float *q, const float *k,
                            const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                            int dv, int k_stride, int v_stride, int pos0, float scale,
                            const struct mf_attn_ext *ext) {
    if (n_tok <= 0 || n_head <= 0 || n_kv_head <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_attn p;
    const char *why;
    if (!mf_attn_params(&p, n_tok, n_head, n_kv_head, dk, dv, k_stride, v_stride, pos0,
                        scale, ext, &why)) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: attention: bad %s: dk %d (at most "
                      "%d), n_tok %d, n_head %d (at most 65535), window %d, ring %d, pos0 "
                      "%d", why, dk, MF_ATTN_DK_MAX, n_tok, n_head, p.window, p.ring, pos0);
        return;
    }
    const int nb = mf_attn_qblock(&p, mf_metal_attn_block(ex));
    size_t bytes = (size_t)nb * n_head * p.n_split * (size_t)(dv + 2) * sizeof(float);
    void *ws = mf_metal_scratch(ex, 0, bytes, "attention");
    if (!ws)
        return;
    for (int t0 = 0; t0 < n_tok; t0 += nb) {
        struct mf_p_attn pb = mf_attn_block(&p, t0, nb);
        const float *qb = q + (size_t)t0 * n_head * dk;
        float *o = out + (size_t)t0 * n_head * dv;
        const void *sk = ext && ext->sinks ? ext->sinks->w : NULL;
        const int tile = mf_attn_tile_ok(&pb, mf_metal_attn_tile(ex));
        if (mf_attn_fuse_ok(&pb, mf_metal_fuse(ex) & MF_FUSE_ATTN, tile)) {
            int *count = mf_metal_counter(ex, "attention");
            if (!count)
                return;
            const void *const b[7] = {ws, qb, k, v, o, sk, count + MF_COUNT_ATTN};
            launch_mf_attn_part1(ex, &pb, b, "attention");
            continue;
        }
        const void *const b1[4] = {ws, qb, k, v};
        if (tile)
            launch_mf_attn_tile(ex, &pb, b1, "attention");
        else
            launch_mf_attn_part(ex, &pb, b1, "attention");
        const void *const b2[3] = {o, ws, sk};
        launch_mf_attn_comb(ex, &pb, b2, "attention");
    }
}

void mf_metal_attention(struct mf_exec *ex, float *out, const float *q, const float *k,
                        const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                        int dv, int k_stride, int v_stride, int pos0, float scale) {
    mf_metal_attention_ext(ex, out, q, k, v, n_tok, n_head, n_kv_head, dk, dv, k_stride,
                           v_stride, pos0, scale, NULL);
}

/* ==== GatedDeltaNet ==== */

void mf_metal_conv1d_silu_from(struct mf_exec *ex, float *y, float *state,
                               const float *state_in, const float *u,
                               const struct mf_weight *w, int n_tok, int C, int K) {
    if (C <= 0 || K <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_conv p = {.n_tok = n_tok > 0 ? n_tok : 0, .C = C, .K = K,
                          .w_dtype = (int)w->dtype};
    const void *const b[5] = {y, state, state_in, u, w->w};
    launch_mf_conv1d(ex, &p, b, "conv1d_silu");
}

void mf_metal_conv1d_silu(struct mf_exec *ex, float *y, float *state, const float *u,
                          const struct mf_weight *w, int n_tok, int C, int K) {
    mf_metal_conv1d_silu_from(ex, y, state, state, u, w, n_tok, C, K);
}

void mf_metal_gdn_gates(struct mf_exec *ex, float *g, float *beta, const float *a,
                        const float *b, int ab_stride, const struct mf_weight *A_log,
                        const struct mf_weight *dt_bias, int n_tok, int nv) {
    if (n_tok <= 0 || nv <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_gates p = {.n_tok = n_tok, .nv = nv, .ab_stride = ab_stride,
                           .a_dtype = (int)A_log->dtype, .dt_dtype = (int)dt_bias->dtype};
    const void *const bufs[6] = {g, beta, a, b, A_log->w, dt_bias->w};
    launch_mf_gdn_gates(ex, &p, bufs, "gdn_gates");
}

void mf_metal_gdn_recurrence_from(struct mf_exec *ex, float *o, float *S,
                                  const float *S_in, const float *q, const float *k,
                                  const float *v, int qkv_stride, const float *g,
                                  const float *beta, int n_tok, int nk, int nv, int dk,
                                  int dv) {
    if (nk <= 0 || nv <= 0 || dk <= 0 || dv <= 0 || mf_metal_failed(ex))
        return;
    if (n_tok <= 0) {   // no token: the state is carried over unchanged
        if (S != S_in)
            mf_metal_copy(ex, S, 0, S_in, 0, (size_t)nv * dv * dk * sizeof(float));
        return;
    }
    if (dk > MF_GDN_DK_MAX) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: gdn_recurrence: dk %d, at most %d",
                      dk, MF_GDN_DK_MAX);
        return;
    }
    struct mf_p_gdn p = {.n_tok = n_tok, .nk = nk, .nv = nv, .dk = dk, .dv = dv,
                         .qkv_stride = qkv_stride};
    const void *const b[8] = {o, S, S_in, q, k, v, g, beta};
    launch_mf_gdn_rec(ex, &p, b, "gdn_recurrence");
}

void mf_metal_gdn_recurrence(struct mf_exec *ex, float *o, float *S, const float *q,
                             const float *k, const float *v, int qkv_stride,
                             const float *g, const float *beta, int n_tok, int nk, int nv,
                             int dk, int dv) {
    mf_metal_gdn_recurrence_from(ex, o, S, S, q, k, v, qkv_stride, g, beta, n_tok, nk, nv,
                                 dk, dv);
}

/* ==== Elementwise and rows ==== */

void mf_metal_swiglu(struct mf_exec *ex, float *y, const float *gate, const float *up,
                     int n_rows, int n_cols, int in_stride) {
    if (n_rows <= 0 || n_cols <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_ew p = {.n_rows = n_rows, .n_cols = n_cols, .stride = in_stride};
    const void *const b[3] = {y, gate, up};
    launch_mf_swiglu(ex, &p, b, "swiglu");
}

void mf_metal_swiglu_clamped(struct mf_exec *ex, float *y, const float *gate,
                             const float *up, int n_rows, int n_cols, int in_stride,
                             float alpha, float limit) {
    if (n_rows <= 0 || n_cols <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_swiglu_clamped p = {.n_rows = n_rows, .n_cols = n_cols, .stride = in_stride,
                                    .alpha = alpha, .limit = limit};
    const void *const b[3] = {y, gate, up};
    launch_mf_swiglu_clamped(ex, &p, b, "swiglu_clamped");
}

void mf_metal_mul_sigmoid(struct mf_exec *ex, float *y, const float *g, int n_rows,
                          int n_cols, int g_stride, int g_cols) {
    if (n_rows <= 0 || n_cols <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_ew p = {.n_rows = n_rows, .n_cols = n_cols, .stride = g_stride,
                        .g_cols = g_cols};
    const void *const b[2] = {y, g};
    launch_mf_mul_sigmoid(ex, &p, b, "mul_sigmoid");
}

void mf_metal_axpy(struct mf_exec *ex, float *y, float alpha, const float *x, int n) {
    if (n <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_ew p = {.n = n, .alpha = alpha};
    const void *const b[2] = {y, x};
    launch_mf_axpy(ex, &p, b, "axpy");
}

void mf_metal_axpy_flag(struct mf_exec *ex, float *y, float alpha, const float *x, int n,
                        int32_t *flag) {
    if (n <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_ew p = {.n = n, .alpha = alpha};
    const void *const b[3] = {y, x, flag};
    launch_mf_axpy_flag(ex, &p, b, "axpy_flag");
}

void mf_metal_scatter_add_rows(struct mf_exec *ex, float *dst, const float *src,
                               const int32_t *idx_host, const float *w_host, int n_rows,
                               int n) {
    if (n_rows <= 0 || n <= 0 || mf_metal_failed(ex))
        return;
    struct mf_scatter_buf sb;
    if (!mf_scatter_buf_new(&sb, n_rows)) {
        mf_metal_fail(ex, MF_ERR_NOMEM, "metal backend: scatter_add_rows: out of memory for "
                      "the table of %d rows", n_rows);
        return;
    }
    for (int i0 = 0; i0 < n_rows && !mf_metal_failed(ex); i0 += sb.part) {
        int nr;
        size_t bytes;
        const int m = mf_scatter_part(&sb, idx_host, i0, n_rows, &nr, &bytes);
        const void *t = mf_metal_host_arg(ex, sb.tab, bytes, "scatter_add_rows");
        const void *w = w_host && t ? mf_metal_host_arg(ex, w_host + i0, (size_t)nr * 4,
                                                        "scatter_add_rows")
                                    : NULL;
        if (!t || (w_host && !w))
            break;
        struct mf_p_rows p = {.n_rows = nr, .n = n, .has_w = w_host != NULL, .n_dst = m};
        const void *const b[4] = {dst, src + (size_t)i0 * n, t, w};
        launch_mf_scatter_add(ex, &p, b, "scatter_add_rows");
    }
    mf_scatter_buf_free(&sb);
}

void mf_metal_gather_rows_dev(struct mf_exec *ex, float *dst, const float *src,
                              const int32_t *idx, int n_rows, int n) {
    if (n_rows <= 0 || n <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_rows p = {.n_rows = n_rows, .n = n};
    const void *const b[3] = {dst, src, idx};
    launch_mf_gather(ex, &p, b, "gather_rows");
}

void mf_metal_gather_rows(struct mf_exec *ex, float *dst, const float *src,
                          const int32_t *idx_host, int n_rows, int n) {
    if (n_rows <= 0 || n <= 0 || mf_metal_failed(ex))
        return;
    const void *idx = mf_metal_host_arg(ex, idx_host, (size_t)n_rows * 4, "gather_rows");
    if (idx)
        mf_metal_gather_rows_dev(ex, dst, src, idx, n_rows, n);
}

void mf_metal_flag_nonfinite(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n) {
    if (n <= 0 || mf_metal_failed(ex))
        return;
    struct mf_p_flag p = {.n_lo = (int)(uint32_t)((uint64_t)n & 0xffffffffu),
                          .n_hi = (int)((uint64_t)n >> 32)};
    const void *const b[2] = {flag, x};
    launch_mf_flag_nonfinite(ex, &p, b, "flag_nonfinite");
}

/* ==== Mixture of experts ==== */

static int route_ok(struct mf_exec *ex, const struct mf_route_params *r) {
    int G = r->kind == MF_ROUTE_NOAUX_TC && r->n_group > 1 ? r->n_group : 1;
    if (r->n_expert >= 1 && r->n_expert <= MF_ROUTE_E_MAX && r->n_used >= 1 &&
        r->n_used <= r->n_expert && r->n_used <= MF_ROUTE_K_MAX && G <= MF_ROUTE_G_MAX &&
        r->n_expert % G == 0 && (G == 1 || (r->topk_group >= 1 && r->topk_group <= G)))
        return 1;
    mf_metal_fail(ex, MF_ERR_ARG,
                  "metal backend: moe_route: %d experts, %d used, %d groups (top %d): "
                  "expected at most %d experts, %d used, %d groups dividing the experts",
                  r->n_expert, r->n_used, r->n_group, r->topk_group, MF_ROUTE_E_MAX,
                  MF_ROUTE_K_MAX, MF_ROUTE_G_MAX);
    return 0;
}

void mf_metal_moe_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                        const float *bias, const struct mf_route_params *r, int n_tok,
                        int32_t *idx_host, float *w_host) {
    if (n_tok <= 0 || mf_metal_failed(ex) || !route_ok(ex, r))
        return;
    const size_t n = (size_t)n_tok * r->n_used * 4;
    void *d_idx = idx, *d_w = w;
    if (!idx || !w) {   // outputs the caller did not give live in scratch
        char *s = mf_metal_scratch(ex, 1, 2 * n, "moe_route");
        if (!s)
            return;
        d_idx = idx ? d_idx : s;
        d_w = w ? d_w : s + n;
    }
    const struct mf_p_route p = mf_route_p(r, n_tok, bias != NULL);
    const void *const b[4] = {d_idx, d_w, logits, bias};
    launch_mf_route(ex, &p, b, "moe_route");
    if (idx_host)
        mf_metal_download(ex, idx_host, d_idx, 0, n);
    if (w_host)
        mf_metal_download(ex, w_host, d_w, 0, n);
}

// One mf_route1n dispatch, as the CUDA driver launches it.
void mf_metal_rms_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                        const float *bias, const struct mf_route_params *r, int n_tok,
                        const struct mf_weight *router, float *xn, const float *x,
                        const struct mf_weight *g, float eps) {
    struct mf_p_route1n p;
    if (g && g->dtype == MF_DTYPE_U32) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: rms_route: a quantized norm weight");
        return;
    }
    if (!idx || !w || !(mf_metal_fuse(ex) & MF_FUSE_ROUTE) ||
        !mf_rms_multi_params(1, &router, n_tok, mf_metal_tc(ex), g, eps, 1, &p.mv)) {
        mf_metal_rms_matmul_multi(ex, 1, &logits, &router, xn, x, g, eps, n_tok);
        mf_metal_moe_route(ex, idx, w, logits, bias, r, n_tok, NULL, NULL);
        return;
    }
    if (mf_metal_failed(ex) || !route_ok(ex, r) || !check_weight(ex, router, "rms_route"))
        return;
    int *count = mf_metal_counter(ex, "rms_route");
    if (!count)
        return;
    p.r = mf_route_p(r, n_tok, bias != NULL);
    const void *const b[11] = {logits, x, router->w, router->scales, router->biases,
                               g ? g->w : NULL, xn, idx, w, bias, count};
    launch_mf_route1n(ex, &p, b, "rms_route");
}

// Gate and up must share a format (one kernel dots both); down may have its own;
// biases are float vectors of the projection's rows.
static int experts_ok(struct mf_exec *ex, const struct mf_moe_batch *b) {
    char why[512];
    if (mf_moe_batch_ok(b, why, sizeof why))
        return 1;
    mf_metal_fail(ex, MF_ERR_ARG, "metal backend: moe_experts: %s", why);
    return 0;
}

static int32_t off32(const void *p) { return (int32_t)(uintptr_t)p; }

// Bytes of a blob the kernels read: the end of its last component.
static size_t blob_extent(const struct mf_moe_batch *b) {
    const struct mf_weight *v[6] = {b->gate, b->up, b->down,
                                    b->gate_bias, b->up_bias, b->down_bias};
    uint64_t end = 0;
    for (int i = 0; i < 6; i++) {
        if (!v[i])
            continue;
        uint64_t e = (uint64_t)(uintptr_t)v[i]->w + (uint64_t)mf_weight_w_bytes(v[i]);
        end = e > end ? e : end;
        if (v[i]->scales) {
            uint64_t s = (uint64_t)mf_weight_s_bytes(v[i]);
            e = (uint64_t)(uintptr_t)v[i]->scales + s;
            end = e > end ? e : end;
        }
        if (v[i]->biases) {
            uint64_t s = (uint64_t)mf_weight_s_bytes(v[i]);
            e = (uint64_t)(uintptr_t)v[i]->biases + s;
            end = e > end ? e : end;
        }
    }
    return (size_t)end;
}

static struct mf_p_moe moe_params(const struct mf_moe_batch *b, int n) {
    const struct mf_weight *g = b->gate, *u = b->up, *d = b->down;
    struct mf_p_moe p = {
        .n_exp = n, .n_embd = (int)g->n_in, .n_ff = (int)g->n_out, .max_rows = 0,
        .dtype = (int)g->dtype, .sdtype = (int)g->sdtype, .bits = g->bits,
        .group_size = g->group_size > 0 ? g->group_size : 32,
        .gate_w = off32(g->w), .gate_s = off32(g->scales), .gate_b = off32(g->biases),
        .up_w = off32(u->w), .up_s = off32(u->scales), .up_b = off32(u->biases),
        .down_w = off32(d->w), .down_s = off32(d->scales), .down_b = off32(d->biases),
        .vec = mf_aligned16((uintptr_t)g->w) && mf_aligned16((uintptr_t)u->w) &&
               mf_aligned16((uintptr_t)d->w)};
    for (int i = 0; i < b->n; i++)   // over the whole batch, as the CUDA driver
        p.vec &= mf_aligned16((uintptr_t)b->blob_host[i]);
    mf_moe_extras(&p, b->gate_bias, b->up_bias, b->down_bias, (int)b->act, b->act_alpha,
                  b->act_limit);
    return p;
}

// One pair of grouped expert kernels (mf_moe_plan's): gate/up, then down.
static void launch_pair(struct mf_exec *ex, enum mf_moe_kernels kind,
                        const struct mf_p_moe *gp, const struct mf_p_moe *dp,
                        const void *const b1[4], const void *const b2[4]) {
    switch (kind) {
    case MF_MOE_TC:
        launch_mf_moe_gu_tc(ex, gp, b1, "moe_experts");
        launch_mf_moe_down_tc(ex, dp, b2, "moe_experts");
        break;
    case MF_MOE_MMA:
        launch_mf_moe_gu_mma(ex, gp, b1, "moe_experts");
        launch_mf_moe_down_mma(ex, dp, b2, "moe_experts");
        break;
    case MF_MOE_SIMT1:
        launch_mf_moe_gu1(ex, gp, b1, "moe_experts");
        launch_mf_moe_down1(ex, dp, b2, "moe_experts");
        break;
    default:
        launch_mf_moe_gu(ex, gp, b1, "moe_experts");
        launch_mf_moe_down(ex, dp, b2, "moe_experts");
    }
}

// Experts at[0 .. m) of b, whose blobs lie in the buffer region starting at base:
// launched with that region as the base buffer and the blobs as offsets into it (the
// CUDA driver's table, which there spans all of device memory).
static void launch_group(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                         const struct mf_moe_batch *b, const int *at, int m,
                         uintptr_t base) {
    int32_t tab[4 * 256];
    for (int i0 = 0; i0 < m && !mf_metal_failed(ex); i0 += 256) {
        int n = m - i0 < 256 ? m - i0 : 256;
        struct mf_p_moe p = moe_params(b, n);
        for (int i = 0; i < n; i++) {
            int e = at[i0 + i];
            uint64_t off = (uint64_t)((uintptr_t)b->blob_host[e] - base);
            tab[4 * i] = (int32_t)(uint32_t)off;
            tab[4 * i + 1] = (int32_t)(uint32_t)(off >> 32);
            tab[4 * i + 2] = b->row0_host[e];
            tab[4 * i + 3] = b->n_rows_host[e];
            p.max_rows = b->n_rows_host[e] > p.max_rows ? b->n_rows_host[e] : p.max_rows;
        }
        if (p.max_rows <= 0)
            continue;
        const void *t = mf_metal_host_arg(ex, tab, (size_t)n * 16, "moe_experts");
        if (!t)
            return;
        const void *const b1[4] = {gu, xg, (const void *)base, t};
        const void *const b2[4] = {eo, gu, (const void *)base, t};
        struct mf_moe_plan pl;
        mf_moe_plan(&p, tab, n, b->gate, b->up, b->down, mf_metal_tc(ex), mf_metal_mma(ex),
                    mf_aligned16((uintptr_t)gu) && mf_aligned16((uintptr_t)xg), &pl);
        for (int k = 0; k < pl.n; k++)
            launch_pair(ex, pl.kind[k], &pl.gp[k], &pl.dp[k], b1, b2);
    }
}

// Groups b's experts by the buffer region their blobs lie in (each run of kernels
// binds one buffer).
static void launch_by_region(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                             const struct mf_moe_batch *b, const void **region, int *at) {
    const size_t need = blob_extent(b);
    for (int i = 0; i < b->n; i++) {
        region[i] = mf_metal_region(ex, b->blob_host[i], need, "moe_experts");
        if (!region[i])
            return;
    }
    for (int i = 0; i < b->n; i++) {
        if (!region[i])
            continue;
        int m = 0;
        const void *r = region[i];
        for (int j = i; j < b->n; j++)
            if (region[j] == r) {
                at[m++] = j;
                region[j] = NULL;
            }
        launch_group(ex, eo, gu, xg, b, at, m, (uintptr_t)r);
    }
}

// Reader slots (alloc_host memory) may be read by the queued kernels: this op does not
// wait for them. models/moe.c (queues_work = 1) keeps each slot's ticket until a fence
// recorded after the expert's kernels is reached, checked before the slot is reused,
// so a layer's expert work stays in the command buffer the next host sync commits.
int mf_metal_moe_experts_check(struct mf_backend *be, const struct mf_moe_batch *b, int il,
                          char *err, size_t errlen) {
    (void)be;
    return mf_moe_experts_gpu_check("metal", b, il, err, errlen);
}

void mf_metal_moe_experts(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                          const struct mf_moe_batch *b) {
    if (b->n <= 0 || mf_metal_failed(ex) || !experts_ok(ex, b))
        return;
    if (b->n > 65535) {
        mf_metal_fail(ex, MF_ERR_ARG, "metal backend: moe_experts: %d experts in one "
                      "call, at most 65535", b->n);
        return;
    }
    const void **region = malloc((size_t)b->n * sizeof *region);
    int *at = malloc((size_t)b->n * sizeof *at);
    if (region && at)
        launch_by_region(ex, eo, gu, xg, b, region, at);
    else
        mf_metal_fail(ex, MF_ERR_NOMEM, "metal backend: moe_experts: out of memory for "
                      "%d experts", b->n);
    free(region);
    free(at);
}
