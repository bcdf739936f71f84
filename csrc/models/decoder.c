/*
 * decoder.c — the chunked forward loop, per-ctx chunk scratch and FFN half of a layer
 * that qwen3_moe, deepseek_v3 and the qwen3_next hybrid share (see decoder.h), and the
 * layer-major prefill groups that read each routed expert once per group. Written
 * against the backend op table; owns no weights and no sequence state.
 */
#include <stdio.h>
#include <stdlib.h>

#include "models/decoder.h"

/* ==== Scratch ==== */

float *mf_dev_floats(mf_ctx *ctx, size_t n, int *fail) {
    float *p = ctx->be->ops->alloc(ctx->ex, (n ? n : 1) * sizeof(float));
    if (!p) *fail = 1;
    return p;
}

static void group_free(mf_ctx *ctx, struct mf_prefill_group *g) {
    if (!g) return;
    float *bufs[] = {g->x, g->xn, g->y};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) ctx->be->ops->dealloc(ctx->ex, bufs[i]);
    free(g);
}

void mf_decoder_free(mf_ctx *ctx, struct mf_decoder *dec) {
    group_free(ctx, dec->group);
    dec->group = NULL;
    void *bufs[] = {dec->x, dec->xn, dec->y, dec->ffn_tmp, dec->logits, dec->nonfinite};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) ctx->be->ops->dealloc(ctx->ex, bufs[i]);
    free(dec->nonfinite_host);
    dec->nonfinite = dec->nonfinite_host = NULL;
    if (dec->moe) mf_moe_scratch_free(ctx, dec->moe);
    dec->x = dec->xn = dec->y = dec->ffn_tmp = dec->logits = NULL;
    dec->moe = NULL;
}

int mf_decoder_chunk(const mf_ctx *ctx, int family_max) {
    int c = ctx->be->ops->prefill_chunk;
    c = c < ctx->n_ctx ? c : ctx->n_ctx;
    return c > family_max ? c : family_max;
}

int mf_decoder_alloc(mf_ctx *ctx, struct mf_decoder *dec, const char *arch, char *err,
                     size_t errlen) {
    const struct mf_config *c = &ctx->model->cfg;
    dec->n_layer = c->num_hidden_layers;
    dec->n_embd = c->hidden_size;
    dec->n_vocab = c->vocab_size;
    dec->n_ff_dense = c->n_moe_layers < c->num_hidden_layers ? c->intermediate_size : 0;
    dec->norm_eps = c->rms_norm_eps;
    size_t T = (size_t)dec->max_tok, hid = (size_t)dec->n_embd;
    int fail = 0;
    dec->x = mf_dev_floats(ctx, T * hid, &fail);
    dec->xn = mf_dev_floats(ctx, T * hid, &fail);
    dec->y = mf_dev_floats(ctx, T * hid, &fail);
    if (dec->n_ff_dense > 0)
        dec->ffn_tmp = mf_dev_floats(ctx, T * 2 * (size_t)dec->n_ff_dense, &fail);
    size_t TH = T < MF_HEAD_ROWS ? T : MF_HEAD_ROWS;
    dec->logits = mf_dev_floats(ctx, TH * (size_t)dec->n_vocab, &fail);
    dec->nonfinite = (int32_t *)mf_dev_floats(ctx, (size_t)dec->n_layer + 1, &fail);
    dec->nonfinite_host = calloc((size_t)dec->n_layer + 1, sizeof(int32_t));
    if (fail || !dec->nonfinite_host) {
        mf_decoder_free(ctx, dec);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "%s: out of memory for the scratch of %zu tokens", arch, T);
    }
    if (c->n_moe_layers == 0) return MF_OK;
    dec->group = calloc(1, sizeof *dec->group);   // its buffers: on the first group
    if (!dec->group) {
        mf_decoder_free(ctx, dec);
        return mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", arch);
    }
    int rc = mf_moe_scratch_new(ctx, dec->moe_cfg, dec->max_tok, &dec->moe, err, errlen);
    if (rc) mf_decoder_free(ctx, dec);
    return rc;
}

/* ==== Blocks ==== */

int mf_decoder_ffn(mf_ctx *ctx, const struct mf_decoder *dec, const float *r,
                   const struct mf_weight *norm, int is_moe, const struct mf_moe_layer *moe,
                   const struct mf_ffn_layer *ffn, int il, int n) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const int hid = dec->n_embd;
    double t0 = mf_now_s();
    struct mf_prefill_group *g = dec->group;
    if (is_moe && g && g->active) {
        // prefill group: the MoE runs over the whole group after the layer's last chunk
        mf_add_rmsnorm(op, ctx->ex, g->xn + (size_t)g->row0 * hid, dec->x, r, norm, n, hid,
                       dec->norm_eps);
        g->moe = moe;
        ctx->stats.routing_s += mf_now_s() - t0;
        return MF_OK;
    }
    if (is_moe) {
        if (r)   // else the router's call takes the norm (the add is done)
            mf_add_rmsnorm(op, ctx->ex, dec->xn, dec->x, r, norm, n, hid, dec->norm_eps);
        ctx->stats.routing_s += mf_now_s() - t0;   // the router's input norm
        // with the residual add and the layer output's NaN/inf guard (check_finite)
        struct mf_moe_norm in = {r ? NULL : norm, dec->norm_eps};
        int rc = mf_moe_forward(ctx, dec->moe, dec->moe_cfg, moe, dec->y, dec->xn, n,
                                dec->x, dec->nonfinite + il, &in);
        if (rc) return rc;   // its phases are counted inside
        MF_TAP(ctx, "model.layers.%d.mlp", il, dec->y, n * hid);
        return MF_OK;
    }
    mf_add_rmsnorm(op, ctx->ex, dec->xn, dec->x, r, norm, n, hid, dec->norm_eps);
    mf_ffn_forward(ctx, dec->y, dec->ffn_tmp, ffn, dec->xn, n, dec->n_ff_dense);
    ctx->stats.shared_s += mf_now_s() - t0;
    MF_TAP(ctx, "model.layers.%d.mlp", il, dec->y, n * hid);
    mf_axpy_flag(op, ctx->ex, dec->x, 1.0f, dec->y, n * hid, dec->nonfinite + il);
    return MF_OK;
}

/* ==== Forward ==== */

// Seconds counted so far in the phases of FFN halves.
static double ffn_seconds(const struct mf_ctx_stats *s) {
    return s->routing_s + s->io_wait_s + s->experts_s + s->shared_s;
}

// Final norm and head on the n_rows rows of residual stream at x, in blocks of the
// logits' scratch rows (MF_HEAD_ROWS, or max_tok when fewer); downloads the logits into
// dst [n_rows, n_vocab] (host).
static void head_forward(mf_ctx *ctx, const struct mf_decoder *dec, const float *x,
                         int n_rows, float *dst) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const int hid = dec->n_embd;
    const int blk = dec->max_tok < MF_HEAD_ROWS ? dec->max_tok : MF_HEAD_ROWS;
    for (int r0 = 0; r0 < n_rows; r0 += blk) {
        const int n = n_rows - r0 < blk ? n_rows - r0 : blk;
        op->rmsnorm(ctx->ex, dec->xn, x + (size_t)r0 * hid, dec->norm, n, hid,
                    dec->norm_eps, 1.0f);
        op->matmul(ctx->ex, dec->logits, dec->head, dec->xn, n);
        op->flag_nonfinite(ctx->ex, dec->nonfinite + dec->n_layer, dec->logits,
                           (int64_t)n * dec->n_vocab);
        op->download(ctx->ex, dst + (size_t)r0 * dec->n_vocab, dec->logits, 0,
                     (size_t)n * dec->n_vocab * sizeof(float));
    }
}

// NaN/inf guard: the first layer whose output was flagged, or the head (flag n_layer)
// when only the logits are non-finite. One download of the flags per eval.
static int check_finite(mf_ctx *ctx, const struct mf_decoder *dec) {
    ctx->be->ops->download(ctx->ex, dec->nonfinite_host, dec->nonfinite, 0,
                           (size_t)(dec->n_layer + 1) * sizeof(int32_t));
    for (int il = 0; il < dec->n_layer; il++)
        if (dec->nonfinite_host[il])
            return mf_ctx_fail(ctx, MF_ERR_NUMERIC,
                               "NaN or infinity first appeared in the output of layer %d of "
                               "%d: damaged weights or experts? (python -m moeflux.prep "
                               "verify finds them)", il, dec->n_layer);
    if (dec->nonfinite_host[dec->n_layer])
        return mf_ctx_fail(ctx, MF_ERR_NUMERIC,
                           "NaN or infinity in the logits (final norm or head), not in any "
                           "layer: damaged head weights?");
    return MF_OK;
}

// The chunks of one eval, each through every layer in turn (chunk-major).
static int run_chunks(mf_ctx *ctx, const struct mf_decoder *dec, const int32_t *tokens,
                      int n_tok, float *logits, int all_logits) {
    const size_t hid = (size_t)dec->n_embd;
    for (int t0 = 0; t0 < n_tok; t0 += dec->max_tok) {
        int n = n_tok - t0 < dec->max_tok ? n_tok - t0 : dec->max_tok;
        int pos0 = ctx->n_past + t0;
        double te = mf_now_s();
        ctx->be->ops->embed(ctx->ex, dec->x, dec->embed, tokens + t0, n);
        ctx->stats.head_s += mf_now_s() - te;
        for (int il = 0; il < dec->n_layer; il++) {
            // Cache rows at positions >= n_past and the working recurrent buffers are
            // dead until the caller commits, so stopping here leaves the ctx as it was.
            if (mf_ctx_should_abort(ctx))
                return mf_ctx_fail(ctx, MF_ABORTED, "evaluation aborted at layer %d", il);
            double tl = mf_now_s(), ffn0 = ffn_seconds(&ctx->stats);
            int rc = dec->layer(ctx, il, n, pos0, t0 == 0);
            // the mixer is what the layer spent outside its FFN half
            ctx->stats.attention_s += (mf_now_s() - tl) - (ffn_seconds(&ctx->stats) - ffn0);
            if (rc) return rc;   // the layer flagged its output (mf_decoder_ffn)
            MF_TAP(ctx, "model.layers.%d", il, dec->x, n * dec->n_embd);
        }
        if (!logits) continue;
        double th = mf_now_s();
        if (all_logits)
            head_forward(ctx, dec, dec->x, n, logits + (size_t)t0 * dec->n_vocab);
        else if (t0 + n == n_tok)
            head_forward(ctx, dec, dec->x + (size_t)(n - 1) * hid, 1, logits);
        ctx->stats.head_s += mf_now_s() - th;
    }
    return MF_OK;
}

/* ==== Prefill groups (decoder.h) ==== */

// Group buffers for cap rows (grown, never shrunk) and the MoE scratch to match.
static int group_reserve(mf_ctx *ctx, const struct mf_decoder *dec, int cap) {
    struct mf_prefill_group *g = dec->group;
    char err[256] = "";
    if (cap > g->cap_tok) {
        const struct mf_backend_ops *op = ctx->be->ops;
        size_t n = (size_t)cap * (size_t)dec->n_embd;
        int fail = 0;
        float *x = mf_dev_floats(ctx, n, &fail), *xn = mf_dev_floats(ctx, n, &fail);
        float *y = mf_dev_floats(ctx, n, &fail);
        float *old[] = {fail ? x : g->x, fail ? xn : g->xn, fail ? y : g->y};
        for (size_t i = 0; i < sizeof old / sizeof old[0]; i++)
            if (old[i]) op->dealloc(ctx->ex, old[i]);
        if (fail)
            return mf_ctx_fail(ctx, MF_ERR_NOMEM, "out of memory for a %d-token prefill "
                               "group (hidden %d)", cap, dec->n_embd);
        g->x = x, g->xn = xn, g->y = y, g->cap_tok = cap;
    }
    int rc = mf_moe_scratch_reserve(ctx, dec->moe, dec->moe_cfg, cap, err, sizeof err);
    return rc ? mf_ctx_fail(ctx, rc, "%s", err) : MF_OK;
}

// Layer il of a group of ng rows (the call's rows t0 ..): the layer's mixer chunk by
// chunk on a copy of the chunk's rows in dec->x, then the deferred MoE over the group.
static int group_layer(mf_ctx *ctx, const struct mf_decoder *dec, int il, int t0, int ng) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_prefill_group *g = dec->group;
    const size_t hid = (size_t)dec->n_embd, F = sizeof(float);
    g->moe = NULL;
    for (int c0 = 0; c0 < ng; c0 += dec->max_tok) {
        int n = ng - c0 < dec->max_tok ? ng - c0 : dec->max_tok;
        if (mf_ctx_should_abort(ctx))   // as in run_chunks: nothing committed yet
            return mf_ctx_fail(ctx, MF_ABORTED, "evaluation aborted at layer %d", il);
        op->copy(ctx->ex, dec->x, 0, g->x, (size_t)c0 * hid * F, (size_t)n * hid * F);
        double tl = mf_now_s(), ffn0 = ffn_seconds(&ctx->stats);
        g->active = 1, g->row0 = c0;
        int rc = dec->layer(ctx, il, n, ctx->n_past + t0 + c0, t0 + c0 == 0);
        g->active = 0;
        ctx->stats.attention_s += (mf_now_s() - tl) - (ffn_seconds(&ctx->stats) - ffn0);
        if (rc) return rc;
        op->copy(ctx->ex, g->x, (size_t)c0 * hid * F, dec->x, 0, (size_t)n * hid * F);
    }
    if (g->moe) {
        int rc = mf_moe_forward(ctx, dec->moe, dec->moe_cfg, g->moe, g->y, g->xn, ng, NULL,
                                NULL, NULL);
        if (rc) return rc;
        MF_TAP(ctx, "model.layers.%d.mlp", il, g->y, (size_t)ng * hid);
        op->axpy(ctx->ex, g->x, 1.0f, g->y, (int)((size_t)ng * hid));
    }
    op->flag_nonfinite(ctx->ex, dec->nonfinite + il, g->x, (int64_t)ng * dec->n_embd);
    MF_TAP(ctx, "model.layers.%d", il, g->x, (size_t)ng * hid);
    return MF_OK;
}

// Head of a group: every row (all_logits), or the call's last.
static void group_head(mf_ctx *ctx, const struct mf_decoder *dec, int t0, int ng,
                       int n_tok, float *logits, int all_logits) {
    const size_t hid = (size_t)dec->n_embd;
    const float *x = dec->group->x;
    double th = mf_now_s();
    if (all_logits)
        head_forward(ctx, dec, x, ng, logits + (size_t)t0 * dec->n_vocab);
    if (!all_logits && t0 + ng == n_tok)
        head_forward(ctx, dec, x + (size_t)(ng - 1) * hid, 1, logits);
    ctx->stats.head_s += mf_now_s() - th;
}

static int run_groups(mf_ctx *ctx, const struct mf_decoder *dec, const int32_t *tokens,
                      int n_tok, float *logits, int all_logits) {
    int cap = MF_PREFILL_GROUP_TOK / dec->max_tok * dec->max_tok;
    cap = cap < dec->max_tok ? dec->max_tok : cap;
    int rc = group_reserve(ctx, dec, n_tok < cap ? n_tok : cap);
    for (int t0 = 0; rc == MF_OK && t0 < n_tok; t0 += cap) {
        int ng = n_tok - t0 < cap ? n_tok - t0 : cap;
        double te = mf_now_s();
        ctx->be->ops->embed(ctx->ex, dec->group->x, dec->embed, tokens + t0, ng);
        ctx->stats.head_s += mf_now_s() - te;
        for (int il = 0; rc == MF_OK && il < dec->n_layer; il++)
            rc = group_layer(ctx, dec, il, t0, ng);
        if (rc == MF_OK && logits)
            group_head(ctx, dec, t0, ng, n_tok, logits, all_logits);
    }
    return rc;
}

int mf_decoder_run(mf_ctx *ctx, const struct mf_decoder *dec, const int32_t *tokens,
                   int n_tok, float *logits, int all_logits) {
    if (n_tok < 1 || ctx->n_past + n_tok > ctx->n_ctx)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "%d tokens at position %d exceed n_ctx %d",
                           n_tok, ctx->n_past, ctx->n_ctx);
    ctx->be->ops->zero(ctx->ex, dec->nonfinite, 0,
                       (size_t)(dec->n_layer + 1) * sizeof(int32_t));
    int grouped = dec->group && n_tok > dec->max_tok;
    int rc = grouped ? run_groups(ctx, dec, tokens, n_tok, logits, all_logits)
                     : run_chunks(ctx, dec, tokens, n_tok, logits, all_logits);
    return rc ? rc : check_finite(ctx, dec);
}
