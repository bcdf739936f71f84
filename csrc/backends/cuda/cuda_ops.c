/*
 * cuda_ops.c — the compute ops of the CUDA op table: each checks what its kernels
 * cannot (quantization parameters, the limits of mf_params.h), copies host arguments
 * through the argument ring and launches kernels of shaders/ on the exec's stream.
 * Nothing here waits for the device except moe_route with host outputs.
 */
#include "backends/cuda/cuda_internal.h"

_Static_assert(MF_SH_F32 == MF_DTYPE_F32 && MF_SH_F16 == MF_DTYPE_F16 &&
                   MF_SH_BF16 == MF_DTYPE_BF16 && MF_SH_U32 == MF_DTYPE_U32 &&
                   MF_SH_U8 == MF_DTYPE_U8,
               "shaders/mf_params.h dtype codes must equal enum mf_dtype");

/* ==== Weights ==== */

static int check_weight(struct mf_exec *ex, const struct mf_weight *w, const char *op) {
    if (mf_gpu_weight_ok(w))
        return 1;
    mf_cuda_fail(ex, MF_ERR_ARG,
                 "cuda backend: %s: weight [%lld, %lld] dtype %s bits %d group %d: "
                 "expected F32/F16/BF16 or affine U32 codes (MXFP4: matmul only) with "
                 "bits 2-6/8, group 32/64/128 dividing n_in, float scales and biases",
                 op, (long long)w->n_out, (long long)w->n_in, mf_dtype_name(w->dtype),
                 w->bits, w->group_size);
    return 0;
}

/* ==== Linear algebra ==== */

// gpt-oss's MXFP4 weights (shaders/gptoss.h, tested against the CPU): the plain product
// x @ W^T of 4-bit codes in groups of 32 with U8 scales, one head; others are refused.
static void matmul_mxfp4(struct mf_exec *ex, float *y, int y_stride,
                         const struct mf_weight *w, int transposed, const float *x,
                         int x_stride, int n_tok, int n_head) {
    if (transposed || n_head != 1 || w->dtype != MF_DTYPE_U32 || w->bits != 4 ||
        w->group_size != 32 || w->sdtype != MF_DTYPE_U8 || !w->scales || w->n_in % 32) {
        mf_cuda_fail(ex, MF_ERR_ARG,
                     "cuda backend: matmul: MXFP4 weight [%lld, %lld] bits %d group %d: "
                     "only x @ W^T of one head, 4-bit codes, groups of 32, U8 scales",
                     (long long)w->n_out, (long long)w->n_in, w->bits, w->group_size);
        return;
    }
    mf_cuda_enter(ex);
    struct mf_p_mxfp4 p = {.n_in = (int)w->n_in, .n_out = (int)w->n_out, .n_tok = n_tok,
                           .x_stride = x_stride, .y_stride = y_stride};
    const CUdeviceptr b[4] = {mf_dp(y), mf_dp(w->w), mf_dp(w->scales), mf_dp(x)};
    launch_mf_mv_mxfp4(ex, &p, b, "matmul");
}

// The buffers of mf_mv_multi and mf_mv_tc: each segment's y, x, then each weight's
// codes, scales and biases; unused segments repeat the first.
static void multi_bufs(int n, float *const *y, const struct mf_weight *const *w,
                       const float *x, CUdeviceptr *b) {
    b[3] = mf_dp(x);
    for (int s = 0; s < MF_MULTI_MAX; s++) {
        const struct mf_weight *ws = w[s < n ? s : 0];
        b[s] = mf_dp(y[s < n ? s : 0]);
        b[4 + 3 * s] = mf_dp(ws->w);
        b[5 + 3 * s] = mf_dp(ws->scales);
        b[6 + 3 * s] = mf_dp(ws->biases);
    }
}

void mf_cuda_matmul_heads(struct mf_exec *ex, float *y, int y_tok_stride,
                          int y_head_stride, const struct mf_weight *w,
                          int64_t w_head_rows, int transposed, const float *x,
                          int x_tok_stride, int x_head_stride, int n_tok, int n_head) {
    if (n_tok <= 0 || n_head <= 0 || w->n_out <= 0 || w->n_in <= 0)
        return;
    if (w->qmode == MF_QMODE_MXFP4) {
        matmul_mxfp4(ex, y, y_tok_stride, w, transposed, x, x_tok_stride, n_tok, n_head);
        return;
    }
    if (!check_weight(ex, w, "matmul"))
        return;
    mf_cuda_enter(ex);
    struct mf_p_mv p = mf_mv_params(w);
    p.n_tok = n_tok;
    p.n_head = n_head;
    p.w_head_rows = (int)w_head_rows;
    p.x_tok_stride = x_tok_stride;
    p.x_head_stride = x_head_stride;
    p.y_tok_stride = y_tok_stride;
    p.y_head_stride = y_head_stride;
    const CUdeviceptr b[5] = {mf_dp(y), mf_dp(x), mf_dp(w->w), mf_dp(w->scales),
                              mf_dp(w->biases)};
    p.rpw = mf_mv_rpw(n_tok);
    struct mf_p_mv_multi t;
    if (mf_mv_tc_heads(&p, w, transposed, ex->cb->tc, &t)) {
        CUdeviceptr bt[4 + 3 * MF_MULTI_MAX];
        multi_bufs(1, &y, &w, x, bt);
        launch_mf_mv_tc(ex, &t, bt, "matmul");
    } else if (transposed)
        launch_mf_mt(ex, &p, b, "matmul_t");
    else if (n_tok == 1)
        launch_mf_mv1(ex, &p, b, "matmul");
    else if (n_tok <= MF_MV_MAX_TOK)
        launch_mf_mv(ex, &p, b, "matmul");
    else if (mf_gemm_mma_ok(&p, w, (uintptr_t)x, ex->cb->mma))
        launch_mf_gemm_mma(ex, &p, b, "matmul");
    else if (mf_gemm_few(&p))
        launch_mf_mv(ex, &p, b, "matmul");
    else
        launch_mf_gemm(ex, &p, b, "matmul");
}

void mf_cuda_matmul(struct mf_exec *ex, float *y, const struct mf_weight *w,
                    const float *x, int n_tok) {
    mf_cuda_matmul_heads(ex, y, (int)w->n_out, 0, w, 0, 0, x, (int)w->n_in, 0, n_tok, 1);
}

// One launch of mf_mv_multi when every product would be an mf_mv (affine or float
// weights, n_tok <= MF_MV_MAX_TOK), else one matmul each. Unused segments repeat the
// buffers of the first (they have no threadgroups).
void mf_cuda_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                          const struct mf_weight *const *w, const float *x, int n_tok) {
    struct mf_p_mv_multi p;
    const int mma = ex->cb->mma && (ex->fuse & MF_FUSE_GEMM);
    const enum mf_multi_plan plan =
        mf_matmul_multi_plan(n, w, n_tok, ex->cb->tc, mma, (uintptr_t)x, &p);
    if (plan == MF_MULTI_SEPARATE) {
        for (int i = 0; i < n; i++)
            mf_cuda_matmul(ex, y[i], w[i], x, n_tok);
        return;
    }
    for (int i = 0; i < n; i++)
        if (!check_weight(ex, w[i], "matmul_multi"))
            return;
    mf_cuda_enter(ex);
    CUdeviceptr b[4 + 3 * MF_MULTI_MAX];
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

// One mf_mv1 launch adding into y where mf_matmul_add_params takes the call, else
// matmul into tmp and axpy.
void mf_cuda_matmul_add(struct mf_exec *ex, float *y, const struct mf_weight *w,
                        const float *x, int n_tok, float *tmp) {
    struct mf_p_mv p;
    if (!mf_matmul_add_params(w, n_tok, ex->cb->tc, ex->fuse & MF_FUSE_ADD, &p)) {
        mf_cuda_matmul(ex, tmp, w, x, n_tok);
        mf_cuda_axpy(ex, y, 1.0f, tmp, n_tok * (int)w->n_out);
        return;
    }
    if (!check_weight(ex, w, "matmul_add"))
        return;
    mf_cuda_enter(ex);
    const CUdeviceptr b[5] = {mf_dp(y), mf_dp(x), mf_dp(w->w), mf_dp(w->scales),
                              mf_dp(w->biases)};
    launch_mf_mv1(ex, &p, b, "matmul_add");
}

// One mf_mv_multi1n launch where mf_rms_multi_params takes the call, else rmsnorm
// into xn and matmul_multi of xn.
void mf_cuda_rms_matmul_multi(struct mf_exec *ex, int n, float *const *y,
                              const struct mf_weight *const *w, float *xn, const float *x,
                              const struct mf_weight *g, float eps, int n_tok) {
    struct mf_p_mv_norm p;
    if (g && g->dtype == MF_DTYPE_U32) {
        mf_cuda_fail(ex, MF_ERR_ARG,
                     "cuda backend: rms_matmul_multi: a quantized norm weight");
        return;
    }
    if (!mf_rms_multi_params(n, w, n_tok, ex->cb->tc, g, eps, ex->fuse & MF_FUSE_NORM, &p)) {
        mf_cuda_rmsnorm(ex, xn, x, g, n_tok, (int)w[0]->n_in, eps, 1.0f);
        mf_cuda_matmul_multi(ex, n, y, w, xn, n_tok);
        return;
    }
    for (int i = 0; i < n; i++)
        if (!check_weight(ex, w[i], "rms_matmul_multi"))
            return;
    mf_cuda_enter(ex);
    CUdeviceptr b[6 + 3 * MF_MULTI_MAX];
    multi_bufs(n, y, w, x, b);
    b[4 + 3 * MF_MULTI_MAX] = g ? mf_dp(g->w) : 0;
    b[5 + 3 * MF_MULTI_MAX] = mf_dp(xn);
    launch_mf_mv_multi1n(ex, &p, b, "rms_matmul_multi");
}

void mf_cuda_matmul_t(struct mf_exec *ex, float *y, const struct mf_weight *w,
                      const float *x, int n_tok) {
    mf_cuda_matmul_heads(ex, y, (int)w->n_in, 0, w, 0, 1, x, (int)w->n_out, 0, n_tok, 1);
}

void mf_cuda_embed(struct mf_exec *ex, float *y, const struct mf_weight *w,
                   const int32_t *tokens_host, int n_tok) {
    if (n_tok <= 0 || !check_weight(ex, w, "embed"))
        return;
    mf_cuda_enter(ex);
    CUdeviceptr tok = mf_cuda_ring_put(ex, tokens_host, (size_t)n_tok * 4, "embed");
    if (!tok)
        return;
    struct mf_p_embed p = {.n_in = (int)w->n_in, .n_out = (int)w->n_out, .n_tok = n_tok,
                           .dtype = (int)w->dtype, .sdtype = (int)w->sdtype,
                           .bits = w->bits,
                           .group_size = w->group_size > 0 ? w->group_size : 32};
    const CUdeviceptr b[5] = {mf_dp(y), tok, mf_dp(w->w), mf_dp(w->scales),
                              mf_dp(w->biases)};
    launch_mf_embed(ex, &p, b, "embed");
}

/* ==== Norms and rope ==== */

// rmsnorm, gated by z; or (add) x += z first (kernel mf_add_rmsnorm).
static void norm(struct mf_exec *ex, float *y, const float *x, const float *z, int add,
                 const struct mf_weight *g, struct mf_p_norm p, const char *op) {
    if (p.n_tok <= 0 || p.n_head <= 0 || p.n <= 0)
        return;
    if (g && g->dtype == MF_DTYPE_U32) {
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: %s: a quantized norm weight", op);
        return;
    }
    mf_cuda_enter(ex);
    p.has_g = g != NULL;
    p.g_dtype = g ? (int)g->dtype : 0;
    p.has_z = z != NULL && !add;
    const CUdeviceptr b[4] = {mf_dp(y), mf_dp(x), mf_dp(z), g ? mf_dp(g->w) : 0};
    if (add)
        launch_mf_add_rmsnorm(ex, &p, b, op);
    else
        launch_mf_rmsnorm(ex, &p, b, op);
}

void mf_cuda_rmsnorm(struct mf_exec *ex, float *y, const float *x,
                     const struct mf_weight *g, int n_rows, int n, float eps, float scale) {
    struct mf_p_norm p = {.n_tok = n_rows, .tok_stride = n, .n_head = 1, .n = n,
                          .eps = eps, .scale = scale};
    norm(ex, y, x, NULL, 0, g, p, "rmsnorm");
}

void mf_cuda_add_rmsnorm(struct mf_exec *ex, float *y, float *x, const float *r,
                         const struct mf_weight *g, int n_rows, int n, float eps) {
    struct mf_p_norm p = {.n_tok = n_rows, .tok_stride = n, .n_head = 1, .n = n,
                          .eps = eps, .scale = 1.0f};
    norm(ex, y, x, r, 1, g, p, "add_rmsnorm");
}

void mf_cuda_rmsnorm_heads(struct mf_exec *ex, float *y, const float *x,
                           const struct mf_weight *g, int n_tok, int tok_stride,
                           int n_head, int head_stride, int n, float eps, float scale) {
    struct mf_p_norm p = {.n_tok = n_tok, .tok_stride = tok_stride, .n_head = n_head,
                          .head_stride = head_stride, .n = n, .eps = eps, .scale = scale};
    norm(ex, y, x, NULL, 0, g, p, "rmsnorm_heads");
}

void mf_cuda_rmsnorm_gated(struct mf_exec *ex, float *y, const float *x, const float *z,
                           const struct mf_weight *g, int n_rows, int n, float eps) {
    struct mf_p_norm p = {.n_tok = n_rows, .tok_stride = n, .n_head = 1, .n = n,
                          .eps = eps, .scale = 1.0f};
    norm(ex, y, x, z, 0, g, p, "rmsnorm_gated");
}

void mf_cuda_rope(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                  int head_stride, int n_rot, const float *inv_freq, int pos0,
                  int traditional, float mscale) {
    if (n_tok <= 0 || n_heads <= 0 || n_rot < 2)
        return;
    mf_cuda_enter(ex);
    struct mf_p_rope p = {.n_tok = n_tok, .n_heads = n_heads, .tok_stride = tok_stride,
                          .head_stride = head_stride, .n_rot = n_rot, .pos0 = pos0,
                          .traditional = traditional, .mscale = mscale};
    const CUdeviceptr b[2] = {mf_dp(x), mf_dp(inv_freq)};
    launch_mf_rope(ex, &p, b, "rope");
}

// q and k (each after its optional per-head RMSNorm) in one mf_rope_qk launch
// (gpu_args.h).
void mf_cuda_rope_qk(struct mf_exec *ex, const struct mf_rope_qk *r) {
    struct mf_p_rope_qk p;
    switch (mf_rope_qk_plan(r, &p)) {
    case MF_ROPE_QK_NONE:
        return;
    case MF_ROPE_QK_BAD:
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: rope_qk: a quantized norm weight, or "
                     "normalised heads of %d values (at most %d)", r->head_dim,
                     MF_ROPE_QK_NORM_MAX);
        return;
    case MF_ROPE_QK_FUSED:
        break;
    }
    mf_cuda_enter(ex);
    const CUdeviceptr b[5] = {mf_dp(r->x[0]), mf_dp(r->x[1]), mf_dp(r->inv_freq),
                              r->norm[0] ? mf_dp(r->norm[0]->w) : 0,
                              r->norm[1] ? mf_dp(r->norm[1]->w) : 0};
    launch_mf_rope_qk(ex, &p, b, "rope_qk");
}

/* ==== Attention ==== */

void mf_cuda_attention_ext(struct mf_exec *ex, float *out, const float *q, const float *k,
                           const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                           int dv, int k_stride, int v_stride, int pos0, float scale,
                           const struct mf_attn_ext *ext) {
    if (n_tok <= 0 || n_head <= 0 || n_kv_head <= 0)
        return;
    struct mf_p_attn p;
    const char *why;
    if (!mf_attn_params(&p, n_tok, n_head, n_kv_head, dk, dv, k_stride, v_stride, pos0,
                        scale, ext, &why)) {
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: attention: bad %s: dk %d (at most %d), "
                     "n_tok %d, n_head %d (at most 65535), window %d, ring %d, pos0 %d",
                     why, dk, MF_ATTN_DK_MAX, n_tok, n_head, p.window, p.ring, pos0);
        return;
    }
    mf_cuda_enter(ex);
    const int nb = mf_attn_qblock(&p, ex->attn_block);
    size_t bytes = (size_t)nb * n_head * p.n_split * (size_t)(dv + 2) * sizeof(float);
    CUdeviceptr ws = mf_cuda_scratch(ex, &ex->ws, &ex->ws_bytes, bytes, "attention");
    if (!ws)
        return;
    for (int t0 = 0; t0 < n_tok; t0 += nb) {
        struct mf_p_attn pb = mf_attn_block(&p, t0, nb);
        const float *qb = q + (size_t)t0 * n_head * dk;
        const CUdeviceptr o = mf_dp(out + (size_t)t0 * n_head * dv);
        const CUdeviceptr sk = ext && ext->sinks ? mf_dp(ext->sinks->w) : 0;
        const int tile = mf_attn_tile_ok(&pb, ex->attn_tile);
        if (mf_attn_fuse_ok(&pb, ex->fuse & MF_FUSE_ATTN, tile)) {
            const CUdeviceptr b[7] = {ws, mf_dp(qb), mf_dp(k), mf_dp(v), o, sk,
                                      ex->count_dev + MF_COUNT_ATTN * sizeof(int)};
            launch_mf_attn_part1(ex, &pb, b, "attention");
            continue;
        }
        const CUdeviceptr b1[4] = {ws, mf_dp(qb), mf_dp(k), mf_dp(v)};
        if (tile)
            launch_mf_attn_tile(ex, &pb, b1, "attention");
        else
            launch_mf_attn_part(ex, &pb, b1, "attention");
        const CUdeviceptr b2[3] = {o, ws, sk};
        launch_mf_attn_comb(ex, &pb, b2, "attention");
    }
}

void mf_cuda_attention(struct mf_exec *ex, float *out, const float *q, const float *k,
                       const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                       int dv, int k_stride, int v_stride, int pos0, float scale) {
    mf_cuda_attention_ext(ex, out, q, k, v, n_tok, n_head, n_kv_head, dk, dv, k_stride,
                          v_stride, pos0, scale, NULL);
}

/* ==== GatedDeltaNet ==== */

void mf_cuda_conv1d_silu_from(struct mf_exec *ex, float *y, float *state,
                              const float *state_in, const float *u,
                              const struct mf_weight *w, int n_tok, int C, int K) {
    if (C <= 0 || K <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_conv p = {.n_tok = n_tok > 0 ? n_tok : 0, .C = C, .K = K,
                          .w_dtype = (int)w->dtype};
    const CUdeviceptr b[5] = {mf_dp(y), mf_dp(state), mf_dp(state_in), mf_dp(u),
                              mf_dp(w->w)};
    launch_mf_conv1d(ex, &p, b, "conv1d_silu");
}

void mf_cuda_conv1d_silu(struct mf_exec *ex, float *y, float *state, const float *u,
                         const struct mf_weight *w, int n_tok, int C, int K) {
    mf_cuda_conv1d_silu_from(ex, y, state, state, u, w, n_tok, C, K);
}

void mf_cuda_gdn_gates(struct mf_exec *ex, float *g, float *beta, const float *a,
                       const float *b, int ab_stride, const struct mf_weight *A_log,
                       const struct mf_weight *dt_bias, int n_tok, int nv) {
    if (n_tok <= 0 || nv <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_gates p = {.n_tok = n_tok, .nv = nv, .ab_stride = ab_stride,
                           .a_dtype = (int)A_log->dtype, .dt_dtype = (int)dt_bias->dtype};
    const CUdeviceptr bufs[6] = {mf_dp(g), mf_dp(beta), mf_dp(a), mf_dp(b),
                                 mf_dp(A_log->w), mf_dp(dt_bias->w)};
    launch_mf_gdn_gates(ex, &p, bufs, "gdn_gates");
}

void mf_cuda_gdn_recurrence_from(struct mf_exec *ex, float *o, float *S,
                                 const float *S_in, const float *q, const float *k,
                                 const float *v, int qkv_stride, const float *g,
                                 const float *beta, int n_tok, int nk, int nv, int dk,
                                 int dv) {
    if (nk <= 0 || nv <= 0 || dk <= 0 || dv <= 0)
        return;
    mf_cuda_enter(ex);
    if (n_tok <= 0) {   // no token: the state is carried over unchanged
        if (S != S_in)
            mf_cuda_ck(ex, ex->cb->cu.MemcpyDtoDAsync(mf_dp(S), mf_dp(S_in),
                                                      (size_t)nv * dv * dk * sizeof(float),
                                                      mf_cuda_stream(ex)),
                       "gdn_recurrence", "cuMemcpyDtoDAsync");
        return;
    }
    if (dk > MF_GDN_DK_MAX) {
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: gdn_recurrence: dk %d, at most %d", dk,
                     MF_GDN_DK_MAX);
        return;
    }
    struct mf_p_gdn p = {.n_tok = n_tok, .nk = nk, .nv = nv, .dk = dk, .dv = dv,
                         .qkv_stride = qkv_stride};
    const CUdeviceptr b[8] = {mf_dp(o), mf_dp(S), mf_dp(S_in), mf_dp(q), mf_dp(k),
                              mf_dp(v), mf_dp(g), mf_dp(beta)};
    launch_mf_gdn_rec(ex, &p, b, "gdn_recurrence");
}

void mf_cuda_gdn_recurrence(struct mf_exec *ex, float *o, float *S, const float *q,
                            const float *k, const float *v, int qkv_stride,
                            const float *g, const float *beta, int n_tok, int nk, int nv,
                            int dk, int dv) {
    mf_cuda_gdn_recurrence_from(ex, o, S, S, q, k, v, qkv_stride, g, beta, n_tok, nk, nv,
                                dk, dv);
}

/* ==== Elementwise and rows ==== */

void mf_cuda_swiglu(struct mf_exec *ex, float *y, const float *gate, const float *up,
                    int n_rows, int n_cols, int in_stride) {
    if (n_rows <= 0 || n_cols <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_ew p = {.n_rows = n_rows, .n_cols = n_cols, .stride = in_stride};
    const CUdeviceptr b[3] = {mf_dp(y), mf_dp(gate), mf_dp(up)};
    launch_mf_swiglu(ex, &p, b, "swiglu");
}

void mf_cuda_swiglu_clamped(struct mf_exec *ex, float *y, const float *gate,
                            const float *up, int n_rows, int n_cols, int in_stride,
                            float alpha, float limit) {
    if (n_rows <= 0 || n_cols <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_swiglu_clamped p = {.n_rows = n_rows, .n_cols = n_cols, .stride = in_stride,
                                    .alpha = alpha, .limit = limit};
    const CUdeviceptr b[3] = {mf_dp(y), mf_dp(gate), mf_dp(up)};
    launch_mf_swiglu_clamped(ex, &p, b, "swiglu_clamped");
}

void mf_cuda_mul_sigmoid(struct mf_exec *ex, float *y, const float *g, int n_rows,
                         int n_cols, int g_stride, int g_cols) {
    if (n_rows <= 0 || n_cols <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_ew p = {.n_rows = n_rows, .n_cols = n_cols, .stride = g_stride,
                        .g_cols = g_cols};
    const CUdeviceptr b[2] = {mf_dp(y), mf_dp(g)};
    launch_mf_mul_sigmoid(ex, &p, b, "mul_sigmoid");
}

void mf_cuda_axpy(struct mf_exec *ex, float *y, float alpha, const float *x, int n) {
    if (n <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_ew p = {.n = n, .alpha = alpha};
    const CUdeviceptr b[2] = {mf_dp(y), mf_dp(x)};
    launch_mf_axpy(ex, &p, b, "axpy");
}

void mf_cuda_axpy_flag(struct mf_exec *ex, float *y, float alpha, const float *x, int n,
                       int32_t *flag) {
    if (n <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_ew p = {.n = n, .alpha = alpha};
    const CUdeviceptr b[3] = {mf_dp(y), mf_dp(x), mf_dp(flag)};
    launch_mf_axpy_flag(ex, &p, b, "axpy_flag");
}

void mf_cuda_scatter_add_rows(struct mf_exec *ex, float *dst, const float *src,
                              const int32_t *idx_host, const float *w_host, int n_rows,
                              int n) {
    if (n_rows <= 0 || n <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_scatter_buf sb;
    if (!mf_scatter_buf_new(&sb, n_rows)) {
        mf_cuda_fail(ex, MF_ERR_NOMEM, "cuda backend: scatter_add_rows: out of memory for "
                     "the table of %d rows", n_rows);
        return;
    }
    for (int i0 = 0; i0 < n_rows && ex->status == MF_OK; i0 += sb.part) {
        int nr;
        size_t bytes;
        const int m = mf_scatter_part(&sb, idx_host, i0, n_rows, &nr, &bytes);
        CUdeviceptr t = mf_cuda_ring_put(ex, sb.tab, bytes, "scatter_add_rows");
        CUdeviceptr w = w_host && t ? mf_cuda_ring_put(ex, w_host + i0, (size_t)nr * 4,
                                                       "scatter_add_rows")
                                    : 0;
        if (!t || (w_host && !w))
            break;
        struct mf_p_rows p = {.n_rows = nr, .n = n, .has_w = w_host != NULL, .n_dst = m};
        const CUdeviceptr b[4] = {mf_dp(dst), mf_dp(src) + (CUdeviceptr)i0 * n * 4, t, w};
        launch_mf_scatter_add(ex, &p, b, "scatter_add_rows");
    }
    mf_scatter_buf_free(&sb);
}

void mf_cuda_gather_rows_dev(struct mf_exec *ex, float *dst, const float *src,
                             const int32_t *idx, int n_rows, int n) {
    if (n_rows <= 0 || n <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_rows p = {.n_rows = n_rows, .n = n};
    const CUdeviceptr b[3] = {mf_dp(dst), mf_dp(src), mf_dp(idx)};
    launch_mf_gather(ex, &p, b, "gather_rows");
}

void mf_cuda_gather_rows(struct mf_exec *ex, float *dst, const float *src,
                         const int32_t *idx_host, int n_rows, int n) {
    if (n_rows <= 0 || n <= 0)
        return;
    mf_cuda_enter(ex);
    CUdeviceptr idx = mf_cuda_ring_put(ex, idx_host, (size_t)n_rows * 4, "gather_rows");
    if (idx)
        mf_cuda_gather_rows_dev(ex, dst, src, (const int32_t *)(uintptr_t)idx, n_rows, n);
}

void mf_cuda_flag_nonfinite(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n) {
    if (n <= 0)
        return;
    mf_cuda_enter(ex);
    struct mf_p_flag p = {.n_lo = (int)(uint32_t)((uint64_t)n & 0xffffffffu),
                          .n_hi = (int)((uint64_t)n >> 32)};
    const CUdeviceptr b[2] = {mf_dp(flag), mf_dp(x)};
    launch_mf_flag_nonfinite(ex, &p, b, "flag_nonfinite");
}

/* ==== Mixture of experts ==== */

static int route_ok(struct mf_exec *ex, const struct mf_route_params *r) {
    int G = r->kind == MF_ROUTE_NOAUX_TC && r->n_group > 1 ? r->n_group : 1;
    if (r->n_expert >= 1 && r->n_expert <= MF_ROUTE_E_MAX && r->n_used >= 1 &&
        r->n_used <= r->n_expert && r->n_used <= MF_ROUTE_K_MAX && G <= MF_ROUTE_G_MAX &&
        r->n_expert % G == 0 && (G == 1 || (r->topk_group >= 1 && r->topk_group <= G)))
        return 1;
    mf_cuda_fail(ex, MF_ERR_ARG,
                 "cuda backend: moe_route: %d experts, %d used, %d groups (top %d): "
                 "expected at most %d experts, %d used, %d groups dividing the experts",
                 r->n_expert, r->n_used, r->n_group, r->topk_group, MF_ROUTE_E_MAX,
                 MF_ROUTE_K_MAX, MF_ROUTE_G_MAX);
    return 0;
}

void mf_cuda_moe_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                       const float *bias, const struct mf_route_params *r, int n_tok,
                       int32_t *idx_host, float *w_host) {
    if (n_tok <= 0 || !route_ok(ex, r))
        return;
    mf_cuda_enter(ex);
    const size_t n = (size_t)n_tok * r->n_used * 4;
    CUdeviceptr d_idx = mf_dp(idx), d_w = mf_dp(w);
    if (!idx || !w) {   // outputs the caller did not give live in scratch
        CUdeviceptr s = mf_cuda_scratch(ex, &ex->route_ws, &ex->route_bytes, 2 * n,
                                        "moe_route");
        if (!s)
            return;
        d_idx = idx ? d_idx : s;
        d_w = w ? d_w : s + n;
    }
    const struct mf_p_route p = mf_route_p(r, n_tok, bias != NULL);
    const CUdeviceptr b[4] = {d_idx, d_w, mf_dp(logits), mf_dp(bias)};
    launch_mf_route(ex, &p, b, "moe_route");
    if (idx_host)
        mf_cuda_ck(ex, ex->cb->cu.MemcpyDtoHAsync(idx_host, d_idx, n, mf_cuda_stream(ex)),
                   "moe_route", "cuMemcpyDtoHAsync");
    if (w_host)
        mf_cuda_ck(ex, ex->cb->cu.MemcpyDtoHAsync(w_host, d_w, n, mf_cuda_stream(ex)),
                   "moe_route", "cuMemcpyDtoHAsync");
    if (idx_host || w_host) {
        mf_cuda_ck(ex, ex->cb->cu.StreamSynchronize(mf_cuda_stream(ex)), "moe_route",
                   "cuStreamSynchronize");
        mf_cuda_prof_flush(ex);
    }
}

// One mf_route1n launch (the router's threadgroups, the last routing) where the
// router takes mf_mv_multi1n for one token and the outputs are the caller's, else
// rms_matmul_multi of the router, then moe_route.
void mf_cuda_rms_route(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                       const float *bias, const struct mf_route_params *r, int n_tok,
                       const struct mf_weight *router, float *xn, const float *x,
                       const struct mf_weight *g, float eps) {
    struct mf_p_route1n p;
    if (g && g->dtype == MF_DTYPE_U32) {
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: rms_route: a quantized norm weight");
        return;
    }
    if (!idx || !w || !(ex->fuse & MF_FUSE_ROUTE) ||
        !mf_rms_multi_params(1, &router, n_tok, ex->cb->tc, g, eps, 1, &p.mv)) {
        mf_cuda_rms_matmul_multi(ex, 1, &logits, &router, xn, x, g, eps, n_tok);
        mf_cuda_moe_route(ex, idx, w, logits, bias, r, n_tok, NULL, NULL);
        return;
    }
    if (!route_ok(ex, r) || !check_weight(ex, router, "rms_route"))
        return;
    mf_cuda_enter(ex);
    p.r = mf_route_p(r, n_tok, bias != NULL);
    const CUdeviceptr b[11] = {mf_dp(logits), mf_dp(x), mf_dp(router->w),
                               mf_dp(router->scales), mf_dp(router->biases),
                               g ? mf_dp(g->w) : 0, mf_dp(xn), mf_dp(idx), mf_dp(w),
                               mf_dp(bias), ex->count_dev};
    launch_mf_route1n(ex, &p, b, "rms_route");
}

// Gate and up must share a format (one kernel dots both); down may have its own;
// biases are float vectors of the projection's rows.
static int experts_ok(struct mf_exec *ex, const struct mf_moe_batch *b) {
    char why[512];
    if (mf_moe_batch_ok(b, why, sizeof why))
        return 1;
    mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: moe_experts: %s", why);
    return 0;
}

static int experts_ok_dev(struct mf_exec *ex, const struct mf_moe_dev *d) {
    struct mf_moe_batch b = {.gate = d->gate, .up = d->up, .down = d->down,
                             .gate_bias = d->gate_bias, .up_bias = d->up_bias,
                             .down_bias = d->down_bias};
    if (!experts_ok(ex, &b))
        return 0;
    if (d->n_tok <= 65535 / d->k && d->k <= MF_ROUTE_K_MAX && d->stride > 0)
        return 1;   // the combine orders a token's k slots in threadgroup memory
    mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: moe_experts_dev: %d tokens x %d experts "
                 "(at most 65535 entries, %d experts a token), blob stride %lld", d->n_tok,
                 d->k, MF_ROUTE_K_MAX, (long long)d->stride);
    return 0;
}

static int32_t off32(const void *p) { return (int32_t)(uintptr_t)p; }

// The kernels' params for one set of expert views (byte offsets inside a blob); vec
// when every code offset is 16-byte aligned (blob alignment is checked by the caller).
static struct mf_p_moe moe_params(const struct mf_weight *g, const struct mf_weight *u,
                                  const struct mf_weight *d) {
    struct mf_p_moe p = {
        .n_embd = (int)g->n_in, .n_ff = (int)g->n_out,
        .dtype = (int)g->dtype, .sdtype = (int)g->sdtype, .bits = g->bits,
        .group_size = g->group_size > 0 ? g->group_size : 32,
        .gate_w = off32(g->w), .gate_s = off32(g->scales), .gate_b = off32(g->biases),
        .up_w = off32(u->w), .up_s = off32(u->scales), .up_b = off32(u->biases),
        .down_w = off32(d->w), .down_s = off32(d->scales), .down_b = off32(d->biases),
        .vec = mf_aligned16((uintptr_t)g->w) && mf_aligned16((uintptr_t)u->w) &&
               mf_aligned16((uintptr_t)d->w)};
    return p;
}

// The grouped expert kernels of plan pl: each pair's gate/up (buffers b1: gu, x, ...),
// then its down (b2).
static void launch_plan(struct mf_exec *ex, const struct mf_moe_plan *pl,
                        const CUdeviceptr b1[4], const CUdeviceptr b2[4], const char *op) {
    for (int i = 0; i < pl->n; i++) {
        const struct mf_p_moe *gp = &pl->gp[i], *dp = &pl->dp[i];
        switch (pl->kind[i]) {
        case MF_MOE_TC:
            launch_mf_moe_gu_tc(ex, gp, b1, op);
            launch_mf_moe_down_tc(ex, dp, b2, op);
            break;
        case MF_MOE_MMA:
            launch_mf_moe_gu_mma(ex, gp, b1, op);
            launch_mf_moe_down_mma(ex, dp, b2, op);
            break;
        case MF_MOE_SIMT1:
            launch_mf_moe_gu1(ex, gp, b1, op);
            launch_mf_moe_down1(ex, dp, b2, op);
            break;
        default:
            launch_mf_moe_gu(ex, gp, b1, op);
            launch_mf_moe_down(ex, dp, b2, op);
        }
    }
}

// The plan of p over the n entries of tab (mf_moe_plan) for gu and x at b1.
static void plan_experts(struct mf_exec *ex, const struct mf_p_moe *p, const int32_t *tab,
                         int n, const struct mf_weight *g, const struct mf_weight *u,
                         const struct mf_weight *d, const CUdeviceptr b1[4],
                         struct mf_moe_plan *pl) {
    mf_moe_plan(p, tab, n, g, u, d, ex->cb->tc, ex->cb->mma,
                mf_aligned16(b1[0]) && mf_aligned16(b1[1]), pl);
}

int mf_cuda_moe_experts_check(struct mf_backend *be, const struct mf_moe_batch *b, int il,
                          char *err, size_t errlen) {
    (void)be;
    return mf_moe_experts_gpu_check("cuda", b, il, err, errlen);
}

void mf_cuda_moe_experts(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                         const struct mf_moe_batch *b) {
    if (b->n <= 0 || !experts_ok(ex, b))
        return;
    if (b->n > 65535) {
        mf_cuda_fail(ex, MF_ERR_ARG, "cuda backend: moe_experts: %d experts in one call, "
                     "at most 65535", b->n);
        return;
    }
    mf_cuda_enter(ex);
    // Blob addresses as offsets from the lowest one, which is passed as a buffer.
    uintptr_t base = (uintptr_t)b->blob_host[0];
    for (int i = 1; i < b->n; i++)
        base = (uintptr_t)b->blob_host[i] < base ? (uintptr_t)b->blob_host[i] : base;
    int32_t tab[4 * 256];
    int vec = 1;
    for (int i = 0; i < b->n; i++)
        vec &= mf_aligned16((uintptr_t)b->blob_host[i]);
    for (int i0 = 0; i0 < b->n; i0 += 256) {   // the table goes through the ring in parts
        int n = b->n - i0 < 256 ? b->n - i0 : 256;
        for (int i = 0; i < n; i++) {
            uint64_t off = (uint64_t)((uintptr_t)b->blob_host[i0 + i] - base);
            tab[4 * i] = (int32_t)(uint32_t)off;
            tab[4 * i + 1] = (int32_t)(uint32_t)(off >> 32);
            tab[4 * i + 2] = b->row0_host[i0 + i];
            tab[4 * i + 3] = b->n_rows_host[i0 + i];
        }
        CUdeviceptr t = mf_cuda_ring_put(ex, tab, (size_t)n * 16, "moe_experts");
        if (!t)
            return;
        struct mf_p_moe p = moe_params(b->gate, b->up, b->down);
        mf_moe_extras(&p, b->gate_bias, b->up_bias, b->down_bias, (int)b->act, b->act_alpha,
                      b->act_limit);
        p.n_exp = n;
        p.vec &= vec;
        for (int i = 0; i < n; i++)
            p.max_rows = tab[4 * i + 3] > p.max_rows ? tab[4 * i + 3] : p.max_rows;
        if (p.max_rows <= 0)
            continue;
        const CUdeviceptr b1[4] = {mf_dp(gu), mf_dp(xg), (CUdeviceptr)base, t};
        const CUdeviceptr b2[4] = {mf_dp(eo), mf_dp(gu), (CUdeviceptr)base, t};
        struct mf_moe_plan pl;
        plan_experts(ex, &p, tab, n, b->gate, b->up, b->down, b1, &pl);
        launch_plan(ex, &pl, b1, b2, "moe_experts");
    }
}

// Resident experts routed on the device: the grouped kernels read the expert ids in
// place of a table (entry r = t * K + j is expert idx[r] at base + idx[r] * stride,
// row r of gu / eo, input row t of x: p.dev_k), then the weighted sum in ascending
// expert order (the host-routed path's order), with the shared expert's and the
// residual adds where d asks. Three launches, or two with the combine inside the down
// kernel (mf_comb_fuse_ok); d->xg is not used.
void mf_cuda_moe_experts_dev(struct mf_exec *ex, float *y, const float *x,
                             const struct mf_moe_dev *d) {
    const int n = d->n_tok * d->k;
    if (d->n_tok <= 0 || d->k <= 0 || !experts_ok_dev(ex, d))
        return;
    mf_cuda_enter(ex);
    const uint64_t stride = (uint64_t)d->stride;
    struct mf_p_moe_dev pd = {.n_tok = d->n_tok, .k = d->k, .n_embd = (int)d->gate->n_in,
                              .stride_lo = (int)(uint32_t)stride,
                              .stride_hi = (int)(uint32_t)(stride >> 32)};
    struct mf_p_moe p = moe_params(d->gate, d->up, d->down);
    mf_moe_extras(&p, d->gate_bias, d->up_bias, d->down_bias, (int)d->act, d->act_alpha,
                  d->act_limit);
    p.n_exp = n;
    p.max_rows = 1;
    p.vec &= mf_aligned16((uintptr_t)d->base) && mf_aligned16((uintptr_t)stride);
    p.dev_k = d->k;
    p.route_ahead = d->route_ahead != 0;
    p.stride_lo = pd.stride_lo;
    p.stride_hi = pd.stride_hi;
    const CUdeviceptr b1[4] = {mf_dp(d->gu), mf_dp(x), mf_dp(d->base), mf_dp(d->idx)};
    const CUdeviceptr b2[4] = {mf_dp(d->eo), mf_dp(d->gu), mf_dp(d->base), mf_dp(d->idx)};
    pd.has_shared = d->shared != NULL;
    pd.has_resid = d->resid != NULL;
    pd.has_flag = d->resid && d->flag;
    struct mf_moe_plan pl;
    plan_experts(ex, &p, NULL, 0, d->gate, d->up, d->down, b1, &pl);
    if (mf_comb_fuse_ok(&pl, d->n_tok, ex->fuse & MF_FUSE_COMB)) {
        const struct mf_p_moe_dc pc = {.m = pl.dp[0], .c = pd};
        const CUdeviceptr b[10] = {mf_dp(d->eo), mf_dp(d->gu), mf_dp(d->base), mf_dp(d->idx),
                                   mf_dp(y), mf_dp(d->w), mf_dp(d->shared), mf_dp(d->resid),
                                   mf_dp(d->flag), ex->count_dev + MF_COUNT_COMB * sizeof(int)};
        launch_mf_moe_gu1(ex, &pl.gp[0], b1, "moe_experts_dev");
        launch_mf_moe_down1c(ex, &pc, b, "moe_experts_dev");
        return;
    }
    launch_plan(ex, &pl, b1, b2, "moe_experts_dev");
    const CUdeviceptr b3[7] = {mf_dp(y), mf_dp(d->eo), mf_dp(d->idx), mf_dp(d->w),
                               mf_dp(d->shared), mf_dp(d->resid), mf_dp(d->flag)};
    launch_mf_moe_combine(ex, &pd, b3, "moe_experts_dev");
}
