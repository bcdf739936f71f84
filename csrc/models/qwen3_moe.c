/*
 * qwen3_moe.c — the Qwen3-MoE family (Qwen3-30B-A3B, Qwen3-235B-A22B): config checks,
 * weight binding, KV cache and the forward pass (model-math §4), written once against
 * the backend op table.
 *
 * Decoder layer:  h = x + Attn(RMSNorm_in(x));  out = h + FFN(RMSNorm_post(h)).
 * Attention: q/k/v projections, per-head RMSNorm of q and k with plain gains (Qwen3's
 * norms are standard, no +1), full-dim rotary with rotate-half pairs, GQA, scale
 * head_dim^-1/2, no output gate. FFN: softmax-routed experts (renormalised when
 * norm_topk_prob), no shared expert; dense SwiGLU for mlp_only_layers and off the
 * decoder_sparse_step grid (decided by core/config.c).
 *
 * Not here: the MoE block and dense FFN (models/moe.c), expert I/O (io/), snapshots
 * and truncation (core/state.c, through the state segments below).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "models/decoder.h"
#include "models/moe.h"

// Tokens per forward chunk: scratch is sized for this many, longer prompts are run in
// chunks so memory does not grow with the prompt.
#define Q3_MAX_CHUNK 64

/* ==== Config ==== */

struct q3_hparams {
    int hidden_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;
    int vocab_size;
    int intermediate_size;     // dense layers
    float rms_norm_eps;
    float attn_scale;          // head_dim^-1/2
    float *inv_freq;           // [head_dim/2] host, owned: rope_theta^(-2j/head_dim)
    struct mf_moe_config moe;
};

/* ==== Weights ==== */

struct q3_layer {
    struct mf_weight input_layernorm;          // [hidden]
    struct mf_weight post_attention_layernorm; // [hidden]
    struct mf_weight q_proj;                   // [H*D, hidden]
    struct mf_weight k_proj;                   // [Hkv*D, hidden]
    struct mf_weight v_proj;                   // [Hkv*D, hidden]
    struct mf_weight o_proj;                   // [hidden, H*D]
    struct mf_weight q_norm;                   // [D]
    struct mf_weight k_norm;                   // [D]
    int is_moe;
    struct mf_ffn_layer ffn;                   // dense layers
    struct mf_moe_layer moe;                   // MoE layers
};

struct q3_model {
    struct q3_hparams hp;
    struct mf_weight embed_tokens;   // [vocab, hidden]
    struct mf_weight norm;           // [hidden]
    struct mf_weight lm_head;        // [vocab, hidden]; embed_tokens when tied
    struct q3_layer *layers;         // [num_hidden_layers], owned
};

/* ==== State ==== */

// Per ctx: the KV cache of every layer and the scratch of one chunk (device memory);
// residual stream, block output and logits live in dec (models/decoder.h).
struct q3_state {
    struct mf_decoder dec;
    float **k_cache;    // [n_layer] -> [n_ctx, Hkv, D] roped, normed keys
    float **v_cache;    // [n_layer] -> [n_ctx, Hkv, D]
    float *inv_freq;    // [D/2]
    float *q;           // [T, H, D]
    float *attn;        // [T, H, D] attention output
};

/* ==== Load ==== */

static int check_config(const struct mf_config *c, char *err, size_t errlen) {
    if (c->hidden_size < 1 || c->num_hidden_layers < 1 || c->vocab_size < 1 ||
        c->head_dim < 2 || c->head_dim % 2 != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: qwen3_moe needs hidden_size, num_hidden_layers, "
                      "vocab_size >= 1 and an even head_dim (got %d, %d, %d, %d)",
                      c->hidden_size, c->num_hidden_layers, c->vocab_size, c->head_dim);
    if (c->num_attention_heads < 1 || c->num_key_value_heads < 1 ||
        c->num_attention_heads % c->num_key_value_heads != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: num_attention_heads %d must be a multiple of "
                      "num_key_value_heads %d", c->num_attention_heads,
                      c->num_key_value_heads);
    if (c->n_moe_layers > 0 &&
        (c->num_experts_per_tok < 1 || c->num_experts_per_tok > c->num_experts))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: num_experts_per_tok %d must be in [1, num_experts "
                      "%d]", c->num_experts_per_tok, c->num_experts);
    return MF_OK;
}

static void fill_hparams(struct q3_hparams *hp, const struct mf_config *c) {
    hp->hidden_size = c->hidden_size;
    hp->num_hidden_layers = c->num_hidden_layers;
    hp->num_attention_heads = c->num_attention_heads;
    hp->num_key_value_heads = c->num_key_value_heads;
    hp->head_dim = c->head_dim;
    hp->vocab_size = c->vocab_size;
    hp->intermediate_size = c->intermediate_size;
    hp->rms_norm_eps = c->rms_norm_eps;
    hp->attn_scale = (float)(1.0 / sqrt((double)c->head_dim));
    // mlx-lm qwen3_moe uses plain nn.RoPE(head_dim, base=rope_theta) and ignores
    // rope_scaling.
    for (int j = 0; j < c->head_dim / 2; j++)
        hp->inv_freq[j] = (float)pow(c->rope_theta, -2.0 * j / c->head_dim);

    struct mf_moe_config *mc = &hp->moe;
    mc->router = MF_ROUTER_SOFTMAX;
    mc->n_embd = c->hidden_size;
    mc->n_expert = c->num_experts;
    mc->n_expert_used = c->num_experts_per_tok;
    mc->n_ff_exp = c->moe_intermediate_size;
    mc->n_ff_shexp = 0;
    mc->norm_topk_prob = c->norm_topk_prob;
    mc->n_group = 1;
    mc->topk_group = 1;
    mc->routed_scaling_factor = 1.0f;
}

static int bind_lin(const mf_model *m, struct mf_weight *out, int64_t n_out, int64_t n_in,
                    char *err, size_t errlen, const char *fmt, int il) {
    char path[256];
    snprintf(path, sizeof path, fmt, il);
    return mf_bind_linear(m, out, path, 0, n_out, n_in, err, errlen);
}

static int bind_vec(const mf_model *m, struct mf_weight *out, int64_t n, char *err,
                    size_t errlen, const char *fmt, int il) {
    char name[256];
    snprintf(name, sizeof name, fmt, il);
    return mf_bind_vector(m, out, name, n, err, errlen);
}

static int bind_layer(const mf_model *m, struct q3_layer *L, const struct q3_hparams *hp,
                      int il, char *err, size_t errlen) {
    int64_t hid = hp->hidden_size, D = hp->head_dim;
    int64_t qd = hp->num_attention_heads * D, kvd = hp->num_key_value_heads * D;
    int rc = bind_vec(m, &L->input_layernorm, hid, err, errlen,
                      "model.layers.%d.input_layernorm.weight", il);
    if (!rc) rc = bind_vec(m, &L->post_attention_layernorm, hid, err, errlen,
                           "model.layers.%d.post_attention_layernorm.weight", il);
    if (!rc) rc = bind_lin(m, &L->q_proj, qd, hid, err, errlen,
                           "model.layers.%d.self_attn.q_proj", il);
    if (!rc) rc = bind_lin(m, &L->k_proj, kvd, hid, err, errlen,
                           "model.layers.%d.self_attn.k_proj", il);
    if (!rc) rc = bind_lin(m, &L->v_proj, kvd, hid, err, errlen,
                           "model.layers.%d.self_attn.v_proj", il);
    if (!rc) rc = bind_lin(m, &L->o_proj, hid, qd, err, errlen,
                           "model.layers.%d.self_attn.o_proj", il);
    if (!rc) rc = bind_vec(m, &L->q_norm, D, err, errlen,
                           "model.layers.%d.self_attn.q_norm.weight", il);
    if (!rc) rc = bind_vec(m, &L->k_norm, D, err, errlen,
                           "model.layers.%d.self_attn.k_norm.weight", il);
    if (rc) return rc;
    char prefix[256];
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", il);
    if (!L->is_moe)
        return mf_ffn_bind(m, &L->ffn, prefix, (int)hid, hp->intermediate_size, err, errlen);
    L->moe.il = il;
    // The router is 8-bit in conversions after mlx-lm #349, 4-bit before; the binder
    // reads bits from the file and the config's quantization block.
    return bind_lin(m, &L->moe.router, hp->moe.n_expert, hid, err, errlen,
                    "model.layers.%d.mlp.gate", il);
}

static void q3_unbind(mf_model *m) {
    struct q3_model *M = m->arch_weights;
    if (!M) return;
    free(M->layers);
    free(M->hp.inv_freq);
    free(M);
    m->arch_weights = NULL;
}

static int q3_bind(mf_model *m, char *err, size_t errlen) {
    const struct mf_config *c = &m->cfg;
    int rc = check_config(c, err, errlen);
    if (rc) return rc;
    struct q3_model *M = calloc(1, sizeof *M);
    if (!M) return mf_err(err, errlen, MF_ERR_NOMEM, "qwen3_moe: out of memory");
    m->arch_weights = M;
    struct q3_hparams *hp = &M->hp;
    hp->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(float));
    M->layers = calloc((size_t)c->num_hidden_layers, sizeof *M->layers);
    if (!hp->inv_freq || !M->layers) {
        q3_unbind(m);
        return mf_err(err, errlen, MF_ERR_NOMEM, "qwen3_moe: out of memory");
    }
    fill_hparams(hp, c);

    rc = mf_bind_linear(m, &M->embed_tokens, "model.embed_tokens", 0, hp->vocab_size,
                        hp->hidden_size, err, errlen);
    if (!rc) rc = mf_bind_vector(m, &M->norm, "model.norm.weight", hp->hidden_size,
                                 err, errlen);
    // Tied: mlx-lm drops lm_head and uses embed_tokens.as_linear (model-math §2.7).
    if (!rc && c->tie_word_embeddings) M->lm_head = M->embed_tokens;
    else if (!rc) rc = mf_bind_linear(m, &M->lm_head, "lm_head", 0, hp->vocab_size,
                                      hp->hidden_size, err, errlen);
    for (int il = 0; !rc && il < hp->num_hidden_layers; il++) {
        M->layers[il].is_moe = c->layer_is_moe[il];
        rc = bind_layer(m, &M->layers[il], hp, il, err, errlen);
    }
    if (rc) q3_unbind(m);
    return rc;
}

/* ==== State: KV cache and scratch ==== */

static void q3_state_free(mf_ctx *ctx) {
    struct q3_state *s = ctx->arch_state;
    if (!s) return;
    const struct q3_model *M = ctx->model->arch_weights;
    const struct mf_backend_ops *op = ctx->be->ops;
    for (int il = 0; il < M->hp.num_hidden_layers; il++) {
        if (s->k_cache && s->k_cache[il]) op->dealloc(ctx->ex, s->k_cache[il]);
        if (s->v_cache && s->v_cache[il]) op->dealloc(ctx->ex, s->v_cache[il]);
    }
    float *bufs[] = {s->inv_freq, s->q, s->attn};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) op->dealloc(ctx->ex, bufs[i]);
    mf_decoder_free(ctx, &s->dec);
    free(s->k_cache);
    free(s->v_cache);
    free(s);
    ctx->arch_state = NULL;
}

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static int q3_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct q3_model *M = ctx->model->arch_weights;
    const struct q3_hparams *hp = &M->hp;
    struct q3_state *s = calloc(1, sizeof *s);
    if (!s) return mf_err(err, errlen, MF_ERR_NOMEM, "qwen3_moe: out of memory");
    ctx->arch_state = s;
    size_t T = (size_t)(ctx->n_ctx < Q3_MAX_CHUNK ? ctx->n_ctx : Q3_MAX_CHUNK);
    size_t qd = (size_t)hp->num_attention_heads * hp->head_dim;
    size_t kv_row = (size_t)hp->num_key_value_heads * hp->head_dim;
    int fail = 0;
    s->k_cache = calloc((size_t)hp->num_hidden_layers, sizeof *s->k_cache);
    s->v_cache = calloc((size_t)hp->num_hidden_layers, sizeof *s->v_cache);
    if (!s->k_cache || !s->v_cache) fail = 1;
    for (int il = 0; !fail && il < hp->num_hidden_layers; il++) {
        s->k_cache[il] = mf_dev_floats(ctx, (size_t)ctx->n_ctx * kv_row, &fail);
        s->v_cache[il] = mf_dev_floats(ctx, (size_t)ctx->n_ctx * kv_row, &fail);
    }
    s->inv_freq = mf_dev_floats(ctx, (size_t)hp->head_dim / 2, &fail);
    s->q = mf_dev_floats(ctx, T * qd, &fail);
    s->attn = mf_dev_floats(ctx, T * qd, &fail);
    if (fail) {
        q3_state_free(ctx);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "qwen3_moe: out of memory for the KV cache of %d positions and "
                      "scratch of %zu tokens", ctx->n_ctx, T);
    }
    ctx->be->ops->upload(ctx->ex, s->inv_freq, 0, hp->inv_freq,
                         (size_t)hp->head_dim / 2 * sizeof(float));
    s->dec = (struct mf_decoder){
        .max_tok = (int)T, .embed = &M->embed_tokens, .norm = &M->norm,
        .head = &M->lm_head, .moe_cfg = &hp->moe, .layer = layer_forward,
    };
    int rc = mf_decoder_alloc(ctx, &s->dec, "qwen3_moe", err, errlen);
    if (rc) q3_state_free(ctx);
    return rc;
}

static void q3_state_reset(mf_ctx *ctx) {
    struct q3_state *s = ctx->arch_state;
    const struct q3_hparams *hp = &((const struct q3_model *)ctx->model->arch_weights)->hp;
    size_t bytes = (size_t)ctx->n_ctx * hp->num_key_value_heads * hp->head_dim *
                   sizeof(float);
    for (int il = 0; il < hp->num_hidden_layers; il++) {
        ctx->be->ops->zero(ctx->ex, s->k_cache[il], 0, bytes);
        ctx->be->ops->zero(ctx->ex, s->v_cache[il], 0, bytes);
    }
}

// A KEY and a VALUE segment per layer, Hkv*D f32 per position each; no fixed state,
// so truncation is exact by construction.
static int q3_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    const struct q3_state *s = ctx->arch_state;
    const struct q3_hparams *hp = &((const struct q3_model *)ctx->model->arch_weights)->hp;
    uint64_t row_bytes = (uint64_t)hp->num_key_value_heads * hp->head_dim * sizeof(float);
    int n = 0;
    for (int il = 0; il < hp->num_hidden_layers; il++) {
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

/* ==== Blocks: attention ==== */

// y[n, hidden] = Attn(xn[n, hidden]) for tokens at positions pos0 .. pos0+n-1; writes
// their K/V cache rows of layer il.
static void attn_forward(mf_ctx *ctx, struct q3_state *s, const struct q3_hparams *hp,
                         const struct q3_layer *L, int il, int n, int pos0) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_exec *ex = ctx->ex;
    const int H = hp->num_attention_heads, Hkv = hp->num_key_value_heads, D = hp->head_dim;
    const int kv_row = Hkv * D;
    const float *xn = s->dec.xn;
    // K and V are projected straight into their cache rows: [n, Hkv*D] is exactly
    // rows pos0 .. pos0+n-1 of the [n_ctx, Hkv, D] cache.
    float *k = s->k_cache[il] + (size_t)pos0 * kv_row;
    float *v = s->v_cache[il] + (size_t)pos0 * kv_row;

    op->matmul(ex, s->q, &L->q_proj, xn, n);   // [n, H, D]
    op->matmul(ex, k, &L->k_proj, xn, n);      // [n, Hkv, D]
    op->matmul(ex, v, &L->v_proj, xn, n);      // [n, Hkv, D]
    // Per-head norms over D, before rotary (qwen3_moe.py Attention).
    op->rmsnorm(ex, s->q, s->q, &L->q_norm, n * H, D, hp->rms_norm_eps, 1.0f);
    op->rmsnorm(ex, k, k, &L->k_norm, n * Hkv, D, hp->rms_norm_eps, 1.0f);
    // Full-dim rotary, rotate-half pairs (j, j + D/2): mlx traditional=False.
    op->rope(ex, s->q, n, H, H * D, D, D, s->inv_freq, pos0, 0, 1.0f);
    op->rope(ex, k, n, Hkv, kv_row, D, D, s->inv_freq, pos0, 0, 1.0f);
    op->attention(ex, s->attn, s->q, s->k_cache[il], s->v_cache[il], n, H, Hkv, D, D,
                  kv_row, kv_row, pos0, hp->attn_scale);
    MF_TAP(ctx, "model.layers.%d.self_attn.sdpa", il, s->attn, n * H * D);
    op->matmul(ex, s->dec.y, &L->o_proj, s->attn, n);
}

/* ==== Forward ==== */

// One decoder layer on the chunk in dec.x (updated in place): the attention half,
// then the shared FFN half (models/decoder.c).
static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct q3_state *s = ctx->arch_state;
    const struct q3_model *M = ctx->model->arch_weights;
    const struct q3_hparams *hp = &M->hp;
    const struct q3_layer *L = &M->layers[il];
    const int hid = hp->hidden_size;
    (void)first_chunk;  // no recurrent state: every chunk starts alike

    ctx->be->ops->rmsnorm(ctx->ex, s->dec.xn, s->dec.x, &L->input_layernorm, n, hid,
                          hp->rms_norm_eps, 1.0f);
    attn_forward(ctx, s, hp, L, il, n, pos0);
    MF_TAP(ctx, "model.layers.%d.self_attn", il, s->dec.y, n * hid);
    ctx->be->ops->axpy(ctx->ex, s->dec.x, 1.0f, s->dec.y, n * hid);
    return mf_decoder_ffn(ctx, &s->dec, &L->post_attention_layernorm, L->is_moe, &L->moe,
                          &L->ffn, il, n);
}

static int q3_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                      int all_logits) {
    struct q3_state *s = ctx->arch_state;
    return mf_decoder_run(ctx, &s->dec, tokens, n_tok, logits, all_logits);
}

/* ==== Registration ==== */

const struct mf_arch mf_arch_qwen3_moe = {
    .model_type = "qwen3_moe",
    .id = MF_ARCH_QWEN3_MOE,
    .bind = q3_bind,
    .unbind = q3_unbind,
    .state_new = q3_state_new,
    .state_free = q3_state_free,
    .state_reset = q3_state_reset,
    .forward = q3_forward,
    .state_segments = q3_state_segments,
};
