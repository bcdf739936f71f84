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
#include "models/arch_config.h"
#include "models/attn_gqa.h"
#include "models/bind.h"
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
    float *inv_freq;           // [head_dim/2] host, owned: rope_theta^(-2j/head_dim)
    struct mf_gqa_dims attn;   // models/attn_gqa.h
    struct mf_moe_config moe;
};

/* ==== Weights ==== */

struct q3_layer {
    struct mf_weight input_layernorm;          // [hidden]
    struct mf_weight post_attention_layernorm; // [hidden]
    struct mf_gqa_layer attn;                  // q/k/v/o, q/k norms
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
    hp->attn = (struct mf_gqa_dims){
        .n_layer = c->num_hidden_layers, .n_head = c->num_attention_heads,
        .n_head_kv = c->num_key_value_heads, .head_dim = c->head_dim,
        .n_rot = c->head_dim, .eps = c->rms_norm_eps,
        .scale = (float)(1.0 / sqrt((double)c->head_dim)),
    };
    // mlx-lm qwen3_moe uses plain nn.RoPE(head_dim, base=rope_theta) and ignores
    // rope_scaling.
    mf_rope_inv_freq_plain(hp->inv_freq, c->head_dim, c->rope_theta);

    struct mf_moe_config *mc = &hp->moe;
    mc->router = (enum mf_router_kind)c->family->router;   // declared in mf_arch
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

static int bind_layer(mf_model *m, struct q3_layer *L, const struct q3_hparams *hp,
                      int il, char *err, size_t errlen) {
    int hid = hp->hidden_size;
    int rc = mf_bind_vec_at(m, &L->input_layernorm, hid, err, errlen,
                            "model.layers.%d.input_layernorm.weight", il);
    if (!rc) rc = mf_bind_vec_at(m, &L->post_attention_layernorm, hid, err, errlen,
                                 "model.layers.%d.post_attention_layernorm.weight", il);
    char prefix[256];
    snprintf(prefix, sizeof prefix, "model.layers.%d.self_attn", il);
    // Qwen3 always has q/k norms and no projection biases.
    if (!rc) rc = mf_gqa_bind(m, &L->attn, &hp->attn, hid, prefix, 1, 0, err, errlen);
    if (rc) return rc;
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", il);
    if (!L->is_moe)
        return mf_ffn_bind(m, &L->ffn, prefix, hid, hp->intermediate_size, err, errlen);
    L->moe.il = il;
    // The router is 8-bit in conversions after mlx-lm #349, 4-bit before; the binder
    // reads bits from the file and the config's quantization block.
    return mf_bind_lin_at(m, &L->moe.router, 0, hp->moe.n_expert, hid, err, errlen,
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

/* ==== State (models/attn_gqa.h's all-GQA decoder state) ==== */

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static const struct mf_gqa_dims *attn_dims(const mf_ctx *ctx) {
    const struct q3_model *M = ctx->model->arch_weights;
    return &M->hp.attn;
}

static void q3_state_free(mf_ctx *ctx) { mf_gqa_decoder_free(ctx, attn_dims(ctx)); }

static int q3_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct q3_model *M = ctx->model->arch_weights;
    const struct q3_hparams *hp = &M->hp;
    const struct mf_decoder dec = {.embed = &M->embed_tokens, .norm = &M->norm,
                                   .head = &M->lm_head, .moe_cfg = &hp->moe,
                                   .layer = layer_forward};
    return mf_gqa_decoder_new(ctx, &hp->attn, hp->inv_freq, 0, dec, Q3_MAX_CHUNK,
                              "qwen3_moe", err, errlen);
}

static void q3_state_reset(mf_ctx *ctx) { mf_gqa_decoder_reset(ctx, attn_dims(ctx)); }

static int q3_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    return mf_gqa_decoder_segments(ctx, attn_dims(ctx), segs, cap);
}

/* ==== Forward ==== */

// One decoder layer on the chunk in dec.x (updated in place): the attention half,
// then the shared FFN half (models/decoder.c).
static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    const struct q3_model *M = ctx->model->arch_weights;
    const struct q3_hparams *hp = &M->hp;
    const struct q3_layer *L = &M->layers[il];
    (void)first_chunk;  // no recurrent state: every chunk starts alike
    mf_gqa_decoder_attn(ctx, &hp->attn, &L->attn, &L->input_layernorm, hp->rms_norm_eps,
                        hp->hidden_size, il, n, pos0);
    return mf_decoder_ffn(ctx, &s->dec, NULL, &L->post_attention_layernorm, L->is_moe, &L->moe,
                          &L->ffn, il, n);
}

static int q3_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                      int all_logits) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    return mf_decoder_run(ctx, &s->dec, tokens, n_tok, logits, all_logits);
}

/* ==== Config: the family's keys (mf_arch.read_config) ==== */

static void q3_free_config(void *p) {
    struct mf_sparse_step_cfg *q = p;
    mf_sparse_step_free(q);
    free(q);
}

// decoder_sparse_step and mlp_only_layers (a struct mf_sparse_step_cfg at arch_cfg).
static int q3_read_config(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    struct mf_sparse_step_cfg *q = calloc(1, sizeof *q);
    if (!q) return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    cfg->arch_cfg = q;
    int rc = mf_read_sparse_step(cfg, r, q);
    if (!rc) mf_sparse_step_layers(cfg, q);
    return rc;
}

/* ==== Registration ==== */

static const char *const q3_expert_components[] = {"gate_proj", "up_proj", "down_proj",
                                                  NULL};

const struct mf_arch mf_arch_qwen3_moe = {
    .model_type = "qwen3_moe",
    .id = MF_ARCH_QWEN3_MOE,
    .experts_key = "num_experts",
    .read_config = q3_read_config,
    .free_config = q3_free_config,
    .router = MF_ROUTER_SOFTMAX,
    .expert_components = q3_expert_components,
    .bind = q3_bind,
    .unbind = q3_unbind,
    .state_new = q3_state_new,
    .state_free = q3_state_free,
    .state_reset = q3_state_reset,
    .forward = q3_forward,
    .state_segments = q3_state_segments,
};
