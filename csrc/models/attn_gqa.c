/*
 * attn_gqa.c — grouped-query attention with a KV cache (attn_gqa.h), written once
 * against the backend op table for the families that share it.
 */
#include "models/attn_gqa.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "models/decoder.h"

void mf_rope_inv_freq_plain(float *inv_freq, int n_rot, double theta) {
    for (int j = 0; j < n_rot / 2; j++)
        inv_freq[j] = (float)pow(theta, -2.0 * j / n_rot);
}

/* ==== Bind ==== */

static int bind_proj(mf_model *m, struct mf_weight *w, struct mf_weight *bias,
                     const char *prefix, const char *proj, int64_t n_out, int64_t n_in,
                     char *err, size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "%s.%s", prefix, proj);
    int rc = mf_bind_linear(m, w, path, 0, n_out, n_in, err, errlen);
    if (rc || !bias) return rc;
    snprintf(path, sizeof path, "%s.%s.bias", prefix, proj);
    // added to f32 activations by axpy: converted once here if stored in 16 bits
    return mf_bind_vector_f32(m, bias, path, n_out, err, errlen);
}

static int bind_norm(mf_model *m, struct mf_weight *w, const char *prefix,
                     const char *name, int64_t n, char *err, size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "%s.%s.weight", prefix, name);
    return mf_bind_vector(m, w, path, n, err, errlen);
}

int mf_gqa_bind(mf_model *m, struct mf_gqa_layer *L, const struct mf_gqa_dims *d,
                int n_embd, const char *prefix, int qk_norm, int bias, char *err,
                size_t errlen) {
    int64_t D = d->head_dim, qd = (int64_t)d->n_head * D, kvd = (int64_t)d->n_head_kv * D;
    int rc = bind_proj(m, &L->q_proj, bias ? &L->q_bias : NULL, prefix, "q_proj", qd,
                       n_embd, err, errlen);
    if (!rc) rc = bind_proj(m, &L->k_proj, bias ? &L->k_bias : NULL, prefix, "k_proj",
                            kvd, n_embd, err, errlen);
    if (!rc) rc = bind_proj(m, &L->v_proj, bias ? &L->v_bias : NULL, prefix, "v_proj",
                            kvd, n_embd, err, errlen);
    if (!rc) rc = bind_proj(m, &L->o_proj, NULL, prefix, "o_proj", n_embd, qd, err,
                            errlen);
    if (rc || !qk_norm) return rc;
    rc = bind_norm(m, &L->q_norm, prefix, "q_norm", d->qk_norm_full ? qd : D, err, errlen);
    return rc ? rc : bind_norm(m, &L->k_norm, prefix, "k_norm", d->qk_norm_full ? kvd : D,
                               err, errlen);
}

/* ==== State ==== */

void mf_gqa_state_free(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d) {
    const struct mf_backend_ops *op = ctx->be->ops;
    for (int il = 0; il < d->n_layer; il++) {
        if (s->k_cache && s->k_cache[il]) op->dealloc(ctx->ex, s->k_cache[il]);
        if (s->v_cache && s->v_cache[il]) op->dealloc(ctx->ex, s->v_cache[il]);
    }
    float *bufs[] = {s->inv_freq, s->q, s->attn, s->bias_rows};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) op->dealloc(ctx->ex, bufs[i]);
    free(s->k_cache);
    free(s->v_cache);
    free(s->zero_idx);
    *s = (struct mf_gqa_state){0};
}

int mf_gqa_state_new(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d,
                     int T, const float *inv_freq_host, int with_bias, const char *arch,
                     char *err, size_t errlen) {
    size_t qd = (size_t)d->n_head * d->head_dim;
    size_t kv_row = (size_t)d->n_head_kv * d->head_dim;
    int fail = 0;
    s->k_cache = calloc((size_t)d->n_layer, sizeof *s->k_cache);
    s->v_cache = calloc((size_t)d->n_layer, sizeof *s->v_cache);
    if (!s->k_cache || !s->v_cache) fail = 1;
    for (int il = 0; !fail && il < d->n_layer; il++) {
        s->k_cache[il] = mf_dev_floats(ctx, (size_t)ctx->n_ctx * kv_row, &fail);
        s->v_cache[il] = mf_dev_floats(ctx, (size_t)ctx->n_ctx * kv_row, &fail);
    }
    s->inv_freq = mf_dev_floats(ctx, (size_t)d->n_rot / 2, &fail);
    s->q = mf_dev_floats(ctx, (size_t)T * qd, &fail);
    s->attn = mf_dev_floats(ctx, (size_t)T * qd, &fail);
    if (with_bias) {
        s->bias_rows = mf_dev_floats(ctx, (size_t)T * qd, &fail);
        s->zero_idx = calloc((size_t)T, sizeof *s->zero_idx);
        fail |= !s->zero_idx;
    }
    if (fail) {
        mf_gqa_state_free(ctx, s, d);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "%s: out of memory for the KV cache of %d positions and scratch of "
                      "%d tokens", arch, ctx->n_ctx, T);
    }
    ctx->be->ops->upload(ctx->ex, s->inv_freq, 0, inv_freq_host,
                         (size_t)d->n_rot / 2 * sizeof(float));
    return MF_OK;
}

void mf_gqa_state_reset(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d) {
    size_t bytes = (size_t)ctx->n_ctx * d->n_head_kv * d->head_dim * sizeof(float);
    for (int il = 0; il < d->n_layer; il++) {
        ctx->be->ops->zero(ctx->ex, s->k_cache[il], 0, bytes);
        ctx->be->ops->zero(ctx->ex, s->v_cache[il], 0, bytes);
    }
}

// Hkv*D f32 per position each; no fixed state, so truncation is exact by construction.
int mf_gqa_state_segments(const struct mf_gqa_state *s, const struct mf_gqa_dims *d,
                          struct mf_state_seg *segs, int cap) {
    uint64_t row_bytes = (uint64_t)d->n_head_kv * d->head_dim * sizeof(float);
    int n = 0;
    for (int il = 0; il < d->n_layer; il++) {
        if (n < cap)
            segs[n] = (struct mf_state_seg){.buf = s->k_cache[il], .row_bytes = row_bytes,
                                            .layer = il, .kind = MF_SEG_KEY};
        n++;
        if (n < cap)
            segs[n] = (struct mf_state_seg){.buf = s->v_cache[il], .row_bytes = row_bytes,
                                            .layer = il, .kind = MF_SEG_VALUE};
        n++;
    }
    return n;
}

/* ==== Forward ==== */

// RMSNorm of q or k in place: per head over D, or (qk_norm_full) over each token's
// heads x D at once.
static void qk_norm(mf_ctx *ctx, float *x, const struct mf_weight *g, int n, int heads,
                    const struct mf_gqa_dims *d) {
    int full = d->qk_norm_full;
    ctx->be->ops->rmsnorm(ctx->ex, x, x, g, full ? n : n * heads,
                          full ? heads * d->head_dim : d->head_dim, d->eps, 1.0f);
}

// y[n, dim] += bias (a row repeated n times through the zero gather index).
static void add_bias(mf_ctx *ctx, struct mf_gqa_state *s, float *y,
                     const struct mf_weight *bias, int n, int dim) {
    if (!bias->w) return;
    const struct mf_backend_ops *op = ctx->be->ops;
    op->gather_rows(ctx->ex, s->bias_rows, bias->w, s->zero_idx, n, dim);
    op->axpy(ctx->ex, y, 1.0f, s->bias_rows, n * dim);
}

void mf_gqa_forward(mf_ctx *ctx, struct mf_gqa_state *s, const struct mf_gqa_dims *d,
                    const struct mf_gqa_layer *L, int il, float *y, float *xn, float *x,
                    const struct mf_weight *norm, float eps, int n, int pos0) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_exec *ex = ctx->ex;
    const int H = d->n_head, Hkv = d->n_head_kv, D = d->head_dim;
    const int kv_row = Hkv * D;
    // K and V are projected straight into their cache rows: [n, Hkv*D] is exactly
    // rows pos0 .. pos0+n-1 of the [n_ctx, Hkv, D] cache.
    float *k = s->k_cache[il] + (size_t)pos0 * kv_row;
    float *v = s->v_cache[il] + (size_t)pos0 * kv_row;

    float *const qkv[3] = {s->q, k, v};   // [n, H, D], [n, Hkv, D] twice
    const struct mf_weight *const wqkv[3] = {&L->q_proj, &L->k_proj, &L->v_proj};
    mf_rms_matmul_multi(op, ex, 3, qkv, wqkv, xn, x, norm, eps, n);
    add_bias(ctx, s, s->q, &L->q_bias, n, H * D);
    add_bias(ctx, s, k, &L->k_bias, n, kv_row);
    add_bias(ctx, s, v, &L->v_bias, n, kv_row);
    // q/k norms before rotary: per head inside the rope_qk call, or over all heads
    // (qk_norm_full) before it. Rotate-half pairs (j, j + n_rot/2) over the first n_rot
    // dims: traditional=False.
    const int full = d->qk_norm_full;
    if (full && L->q_norm.w) qk_norm(ctx, s->q, &L->q_norm, n, H, d);
    if (full && L->k_norm.w) qk_norm(ctx, k, &L->k_norm, n, Hkv, d);
    struct mf_rope_qk r = {
        .x = {s->q, k}, .heads = {H, Hkv}, .tok_stride = {H * D, kv_row},
        .head_stride = {D, D},
        .norm = {!full && L->q_norm.w ? &L->q_norm : NULL,
                 !full && L->k_norm.w ? &L->k_norm : NULL},
        .n_tok = n, .head_dim = D, .n_rot = d->n_rot, .pos0 = pos0, .eps = d->eps,
        .mscale = 1.0f, .inv_freq = s->inv_freq};
    mf_rope_qk(op, ex, &r);
    op->attention(ex, s->attn, s->q, s->k_cache[il], s->v_cache[il], n, H, Hkv, D, D,
                  kv_row, kv_row, pos0, d->scale);
    MF_TAP(ctx, "model.layers.%d.self_attn.sdpa", il, s->attn, n * H * D);
    mf_matmul_add(op, ex, x, &L->o_proj, s->attn, n, y);
}

/* ==== The state of an all-GQA decoder ==== */

void mf_gqa_decoder_free(mf_ctx *ctx, const struct mf_gqa_dims *d) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    if (!s)
        return;
    mf_gqa_state_free(ctx, &s->gqa, d);
    mf_decoder_free(ctx, &s->dec);
    free(s);
    ctx->arch_state = NULL;
}

int mf_gqa_decoder_new(mf_ctx *ctx, const struct mf_gqa_dims *d, const float *inv_freq_host,
                       int with_bias, struct mf_decoder dec, int max_chunk, const char *arch,
                       char *err, size_t errlen) {
    struct mf_gqa_decoder_state *s = calloc(1, sizeof *s);
    if (!s)
        return mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", arch);
    ctx->arch_state = s;
    max_chunk = mf_decoder_chunk(ctx, max_chunk);
    dec.max_tok = ctx->n_ctx < max_chunk ? ctx->n_ctx : max_chunk;
    int rc = mf_gqa_state_new(ctx, &s->gqa, d, dec.max_tok, inv_freq_host, with_bias, arch,
                              err, errlen);
    if (rc == MF_OK) {
        s->dec = dec;
        rc = mf_decoder_alloc(ctx, &s->dec, arch, err, errlen);
    }
    if (rc != MF_OK)
        mf_gqa_decoder_free(ctx, d);
    return rc;
}

void mf_gqa_decoder_reset(mf_ctx *ctx, const struct mf_gqa_dims *d) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    mf_gqa_state_reset(ctx, &s->gqa, d);
}

int mf_gqa_decoder_segments(const mf_ctx *ctx, const struct mf_gqa_dims *d,
                            struct mf_state_seg *segs, int cap) {
    const struct mf_gqa_decoder_state *s = ctx->arch_state;
    return mf_gqa_state_segments(&s->gqa, d, segs, cap);
}

void mf_gqa_decoder_attn(mf_ctx *ctx, const struct mf_gqa_dims *d,
                         const struct mf_gqa_layer *L, const struct mf_weight *norm,
                         float eps, int hid, int il, int n, int pos0) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    (void)hid;   // read by MF_TAP only (the q/k/v weights give the norm its length)
    mf_gqa_forward(ctx, &s->gqa, d, L, il, s->dec.y, s->dec.xn, s->dec.x, norm, eps, n, pos0);
    MF_TAP(ctx, "model.layers.%d.self_attn", il, s->dec.y, n * hid);
}
