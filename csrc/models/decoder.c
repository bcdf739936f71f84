/*
 * decoder.c — the chunked forward loop, per-ctx chunk scratch and FFN half of a layer
 * that qwen3_moe, deepseek_v3 and the qwen3_next hybrid share (see decoder.h). Written
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

void mf_decoder_free(mf_ctx *ctx, struct mf_decoder *dec) {
    void *bufs[] = {dec->x, dec->xn, dec->y, dec->ffn_tmp, dec->logits, dec->nonfinite};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) ctx->be->ops->dealloc(ctx->ex, bufs[i]);
    free(dec->nonfinite_host);
    dec->nonfinite = dec->nonfinite_host = NULL;
    if (dec->moe) mf_moe_scratch_free(ctx, dec->moe);
    dec->x = dec->xn = dec->y = dec->ffn_tmp = dec->logits = NULL;
    dec->moe = NULL;
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
    dec->logits = mf_dev_floats(ctx, T * (size_t)dec->n_vocab, &fail);
    dec->nonfinite = (int32_t *)mf_dev_floats(ctx, (size_t)dec->n_layer + 1, &fail);
    dec->nonfinite_host = calloc((size_t)dec->n_layer + 1, sizeof(int32_t));
    if (fail || !dec->nonfinite_host) {
        mf_decoder_free(ctx, dec);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "%s: out of memory for the scratch of %zu tokens", arch, T);
    }
    if (c->n_moe_layers == 0) return MF_OK;
    int rc = mf_moe_scratch_new(ctx, dec->moe_cfg, dec->max_tok, &dec->moe, err, errlen);
    if (rc) mf_decoder_free(ctx, dec);
    return rc;
}

/* ==== Blocks ==== */

int mf_decoder_ffn(mf_ctx *ctx, const struct mf_decoder *dec, const struct mf_weight *norm,
                   int is_moe, const struct mf_moe_layer *moe,
                   const struct mf_ffn_layer *ffn, int il, int n) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const int hid = dec->n_embd;
    double t0 = mf_now_s();
    op->rmsnorm(ctx->ex, dec->xn, dec->x, norm, n, hid, dec->norm_eps, 1.0f);
    if (is_moe) {
        ctx->stats.routing_s += mf_now_s() - t0;   // the router's input norm
        int rc = mf_moe_forward(ctx, dec->moe, dec->moe_cfg, moe, dec->y, dec->xn, n);
        if (rc) return rc;   // its phases are counted inside
    } else {
        mf_ffn_forward(ctx, dec->y, dec->ffn_tmp, ffn, dec->xn, n, dec->n_ff_dense);
        ctx->stats.shared_s += mf_now_s() - t0;
    }
    MF_TAP(ctx, "model.layers.%d.mlp", il, dec->y, n * hid);
    op->axpy(ctx->ex, dec->x, 1.0f, dec->y, n * hid);
    (void)il;
    return MF_OK;
}

/* ==== Forward ==== */

// Seconds counted so far in the phases of FFN halves.
static double ffn_seconds(const struct mf_ctx_stats *s) {
    return s->routing_s + s->io_wait_s + s->experts_s + s->shared_s;
}

// Final norm and head on rows [row0, row0 + n_rows) of the chunk; downloads the
// logits into dst [n_rows, n_vocab] (host).
static void head_forward(mf_ctx *ctx, const struct mf_decoder *dec, int row0, int n_rows,
                         float *dst) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const int hid = dec->n_embd;
    op->rmsnorm(ctx->ex, dec->xn, dec->x + (size_t)row0 * hid, dec->norm, n_rows, hid,
                dec->norm_eps, 1.0f);
    op->matmul(ctx->ex, dec->logits, dec->head, dec->xn, n_rows);
    op->flag_nonfinite(ctx->ex, dec->nonfinite + dec->n_layer, dec->logits,
                       (int64_t)n_rows * dec->n_vocab);
    op->download(ctx->ex, dst, dec->logits, 0,
                 (size_t)n_rows * dec->n_vocab * sizeof(float));
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

int mf_decoder_run(mf_ctx *ctx, const struct mf_decoder *dec, const int32_t *tokens,
                   int n_tok, float *logits, int all_logits) {
    if (n_tok < 1 || ctx->n_past + n_tok > ctx->n_ctx)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "%d tokens at position %d exceed n_ctx %d",
                           n_tok, ctx->n_past, ctx->n_ctx);
    ctx->be->ops->zero(ctx->ex, dec->nonfinite, 0,
                       (size_t)(dec->n_layer + 1) * sizeof(int32_t));
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
            if (rc) return rc;
            ctx->be->ops->flag_nonfinite(ctx->ex, dec->nonfinite + il, dec->x,
                                         (int64_t)n * dec->n_embd);
            MF_TAP(ctx, "model.layers.%d", il, dec->x, n * dec->n_embd);
        }
        if (!logits) continue;
        double th = mf_now_s();
        if (all_logits)
            head_forward(ctx, dec, 0, n, logits + (size_t)t0 * dec->n_vocab);
        else if (t0 + n == n_tok)
            head_forward(ctx, dec, n - 1, 1, logits);
        ctx->stats.head_s += mf_now_s() - th;
    }
    return check_finite(ctx, dec);
}
