/*
 * glm4_moe.c — the GLM-4.5 / GLM-4.6 MoE family (mlx-lm glm4_moe): its config keys,
 * layer kinds, snapshot identity, weight binding, KV cache and forward pass. Adding
 * it touched no core/ file: this file, its line in models/arch.c, and prep's family
 * module (prep/archs/glm4_moe.py).
 *
 * Decoder layer:  h = x + Attn(RMSNorm_in(x));  out = h + FFN(RMSNorm_post(h)).
 * Attention (models/attn_gqa.c): q/k/v projections with biases when attention_bias,
 * per-head RMSNorm of q and k when use_qk_norm, rotary with rotate-half pairs over the
 * first head_dim * partial_rotary_factor dims (plain nn.RoPE: mlx-lm ignores
 * rope_scaling here), GQA, scale head_dim^-1/2, o_proj without bias.
 * FFN: dense SwiGLU on the first first_k_dense_replace layers; then noaux_tc routing
 * (sigmoid scores, e_score_correction_bias for choosing only, top-2 group sums,
 * topk_group groups, unbiased weights renormalised when norm_topk_prob and top-k > 1,
 * x routed_scaling_factor) over SwiGLU experts, plus ungated shared experts of width
 * moe_intermediate_size * n_shared_experts (models/moe.c, as deepseek_v3).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "models/arch_config.h"
#include "models/attn_gqa.h"
#include "models/bind.h"
#include "models/decoder.h"
#include "models/moe.h"

// Tokens per forward chunk (scratch rows); longer prompts run in chunks.
#define GLM_MAX_CHUNK 64
// Snapshot identity id: after the first four families (enum mf_arch_id).
#define GLM_ARCH_ID 5

/* ==== Config: the family's keys (mf_arch.read_config) ==== */

struct glm4_moe_config {
    struct mf_noaux_cfg noaux;   // routing, shared experts, first dense layers
    int use_qk_norm;             // default 0
    int attention_bias;          // default 0
};

// Dense layers before first_k_dense_replace, routed experts from there on.
static int glm_read_config(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    struct glm4_moe_config *g = calloc(1, sizeof *g);
    if (!g) return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    cfg->arch_cfg = g;
    int rc;
    if ((rc = mf_read_noaux(cfg, r, &g->noaux)) ||
        (rc = mf_cfg_bool(r, "use_qk_norm", &g->use_qk_norm)) ||
        (rc = mf_cfg_bool(r, "attention_bias", &g->attention_bias)))
        return rc;
    int n_rot = (int)(cfg->head_dim * cfg->partial_rotary_factor);
    if (n_rot < 2 || n_rot % 2)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: head_dim (%d) x partial_rotary_factor (%g) must give an even "
                      "number of rotated dims >= 2, got %d", r->name, cfg->head_dim,
                      cfg->partial_rotary_factor, n_rot);
    for (int i = 0; i < cfg->num_hidden_layers; i++)
        cfg->layer_is_moe[i] = cfg->num_experts > 0 &&
                               i >= g->noaux.first_k_dense_replace;
    return 0;
}

static int glm_ident(const struct mf_config *cfg, struct mf_ident_field *out, int cap) {
    const struct glm4_moe_config *g = cfg->arch_cfg;
    int n = 0;
    mf_ident_int(out, &n, cap, "first_k_dense_replace", g->noaux.first_k_dense_replace);
    mf_ident_int(out, &n, cap, "n_shared_experts", g->noaux.n_shared_experts);
    mf_ident_int(out, &n, cap, "n_group", g->noaux.n_group);
    mf_ident_int(out, &n, cap, "topk_group", g->noaux.topk_group);
    mf_ident_int(out, &n, cap, "use_qk_norm", g->use_qk_norm);
    mf_ident_int(out, &n, cap, "attention_bias", g->attention_bias);
    mf_ident_float(out, &n, cap, "routed_scaling_factor", g->noaux.routed_scaling_factor);
    return n;
}

/* ==== Weights ==== */

struct glm_hparams {
    int hidden_size;
    int num_hidden_layers;
    int vocab_size;
    int intermediate_size;     // dense layers
    float rms_norm_eps;
    int use_qk_norm;
    int attention_bias;
    float *inv_freq;           // [n_rot/2] host, owned
    struct mf_gqa_dims attn;
    struct mf_moe_config moe;
};

struct glm_layer {
    struct mf_weight input_layernorm;          // [hidden]
    struct mf_weight post_attention_layernorm; // [hidden]
    struct mf_gqa_layer attn;
    int is_moe;
    struct mf_ffn_layer ffn;                   // dense layers
    struct mf_moe_layer moe;                   // MoE layers
};

struct glm_model {
    struct glm_hparams hp;
    struct mf_weight embed_tokens;   // [vocab, hidden]
    struct mf_weight norm;           // [hidden]
    struct mf_weight lm_head;        // [vocab, hidden]; embed_tokens when tied
    struct glm_layer *layers;        // [num_hidden_layers], owned
};

/* ==== Load ==== */

static int check_config(const struct mf_config *c, char *err, size_t errlen) {
    const struct glm4_moe_config *g = c->arch_cfg;
    if (c->n_moe_layers == 0) return MF_OK;
    int per_group = c->num_experts / g->noaux.n_group;
    if (c->num_experts_per_tok > g->noaux.topk_group * per_group)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: n_routed_experts %d, n_group %d, topk_group %d, "
                      "num_experts_per_tok %d do not form a valid noaux_tc router",
                      c->num_experts, g->noaux.n_group, g->noaux.topk_group,
                      c->num_experts_per_tok);
    return MF_OK;
}

static void fill_hparams(struct glm_hparams *hp, const struct mf_config *c) {
    const struct glm4_moe_config *g = c->arch_cfg;
    hp->hidden_size = c->hidden_size;
    hp->num_hidden_layers = c->num_hidden_layers;
    hp->vocab_size = c->vocab_size;
    hp->intermediate_size = c->intermediate_size;
    hp->rms_norm_eps = c->rms_norm_eps;
    hp->use_qk_norm = g->use_qk_norm;
    hp->attention_bias = g->attention_bias;
    hp->attn = (struct mf_gqa_dims){
        .n_layer = c->num_hidden_layers, .n_head = c->num_attention_heads,
        .n_head_kv = c->num_key_value_heads, .head_dim = c->head_dim,
        .n_rot = (int)(c->head_dim * c->partial_rotary_factor), .eps = c->rms_norm_eps,
        .scale = (float)(1.0 / sqrt((double)c->head_dim)),
    };
    hp->moe = (struct mf_moe_config){
        .router = (enum mf_router_kind)c->family->router,   // declared in mf_arch
        .n_embd = c->hidden_size,
        .n_expert = c->num_experts,
        .n_expert_used = c->num_experts_per_tok,
        .n_ff_exp = c->moe_intermediate_size,
        .n_ff_shexp = c->moe_intermediate_size * g->noaux.n_shared_experts,
        .norm_topk_prob = c->norm_topk_prob,
        .n_group = g->noaux.n_group,
        .topk_group = g->noaux.topk_group,
        .routed_scaling_factor = (float)g->noaux.routed_scaling_factor,
    };
}

static int bind_layer(mf_model *m, struct glm_layer *L, const struct glm_hparams *hp,
                      int il, char *err, size_t errlen) {
    int hid = hp->hidden_size;
    int rc = mf_bind_vec_at(m, &L->input_layernorm, hid, err, errlen,
                            "model.layers.%d.input_layernorm.weight", il);
    if (!rc) rc = mf_bind_vec_at(m, &L->post_attention_layernorm, hid, err, errlen,
                                 "model.layers.%d.post_attention_layernorm.weight", il);
    char prefix[256];
    snprintf(prefix, sizeof prefix, "model.layers.%d.self_attn", il);
    if (!rc) rc = mf_gqa_bind(m, &L->attn, &hp->attn, hid, prefix, hp->use_qk_norm,
                              hp->attention_bias, err, errlen);
    if (rc) return rc;
    if (L->is_moe) return mf_bind_noaux_moe(m, &L->moe, &hp->moe, il, err, errlen);
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", il);
    return mf_ffn_bind(m, &L->ffn, prefix, hid, hp->intermediate_size, err, errlen);
}

static void glm_unbind(mf_model *m) {
    struct glm_model *M = m->arch_weights;
    if (!M) return;
    free(M->layers);
    free(M->hp.inv_freq);
    free(M);
    m->arch_weights = NULL;
}

static int bind_model(mf_model *m, struct glm_model *M, char *err, size_t errlen) {
    const struct glm_hparams *hp = &M->hp;
    int rc = mf_bind_linear(m, &M->embed_tokens, "model.embed_tokens", 0, hp->vocab_size,
                            hp->hidden_size, err, errlen);
    if (!rc) rc = mf_bind_vector(m, &M->norm, "model.norm.weight", hp->hidden_size,
                                 err, errlen);
    // mlx-lm's glm4_moe.Model always has its own lm_head (tie_word_embeddings is
    // not consulted), as deepseek_v3's.
    if (!rc) rc = mf_bind_linear(m, &M->lm_head, "lm_head", 0, hp->vocab_size,
                                 hp->hidden_size, err, errlen);
    for (int il = 0; !rc && il < hp->num_hidden_layers; il++) {
        M->layers[il].is_moe = m->cfg.layer_is_moe[il];
        rc = bind_layer(m, &M->layers[il], hp, il, err, errlen);
    }
    return rc;
}

static int glm_bind(mf_model *m, char *err, size_t errlen) {
    const struct mf_config *c = &m->cfg;
    int rc = check_config(c, err, errlen);
    if (rc) return rc;
    struct glm_model *M = calloc(1, sizeof *M);
    if (!M) return mf_err(err, errlen, MF_ERR_NOMEM, "glm4_moe: out of memory");
    m->arch_weights = M;
    struct glm_hparams *hp = &M->hp;
    fill_hparams(hp, c);
    hp->inv_freq = calloc((size_t)hp->attn.n_rot / 2, sizeof(float));
    M->layers = calloc((size_t)c->num_hidden_layers, sizeof *M->layers);
    if (!hp->inv_freq || !M->layers) {
        glm_unbind(m);
        return mf_err(err, errlen, MF_ERR_NOMEM, "glm4_moe: out of memory");
    }
    mf_rope_inv_freq_plain(hp->inv_freq, hp->attn.n_rot, c->rope_theta);
    rc = bind_model(m, M, err, errlen);
    if (rc) glm_unbind(m);
    return rc;
}

/* ==== State (models/attn_gqa.h's all-GQA decoder state) ==== */

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static const struct mf_gqa_dims *attn_dims(const mf_ctx *ctx) {
    const struct glm_model *M = ctx->model->arch_weights;
    return &M->hp.attn;
}

static void glm_state_free(mf_ctx *ctx) { mf_gqa_decoder_free(ctx, attn_dims(ctx)); }

static int glm_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct glm_model *M = ctx->model->arch_weights;
    const struct glm_hparams *hp = &M->hp;
    const struct mf_decoder dec = {.embed = &M->embed_tokens, .norm = &M->norm,
                                   .head = &M->lm_head, .moe_cfg = &hp->moe,
                                   .layer = layer_forward};
    return mf_gqa_decoder_new(ctx, &hp->attn, hp->inv_freq, hp->attention_bias, dec,
                              GLM_MAX_CHUNK, "glm4_moe", err, errlen);
}

static void glm_state_reset(mf_ctx *ctx) { mf_gqa_decoder_reset(ctx, attn_dims(ctx)); }

static int glm_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    return mf_gqa_decoder_segments(ctx, attn_dims(ctx), segs, cap);
}

/* ==== Forward ==== */

// One decoder layer on the chunk in dec.x (updated in place): the attention half,
// then the shared FFN half (models/decoder.c).
static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    const struct glm_model *M = ctx->model->arch_weights;
    const struct glm_hparams *hp = &M->hp;
    const struct glm_layer *L = &M->layers[il];
    (void)first_chunk;  // no recurrent state: every chunk starts alike
    mf_gqa_decoder_attn(ctx, &hp->attn, &L->attn, &L->input_layernorm, hp->rms_norm_eps,
                        hp->hidden_size, il, n, pos0);
    return mf_decoder_ffn(ctx, &s->dec, NULL, &L->post_attention_layernorm, L->is_moe, &L->moe,
                          &L->ffn, il, n);
}

static int glm_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                       int all_logits) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    return mf_decoder_run(ctx, &s->dec, tokens, n_tok, logits, all_logits);
}

/* ==== Registration ==== */

static const char *const glm_expert_components[] = {"gate_proj", "up_proj", "down_proj",
                                                   NULL};

const struct mf_arch mf_arch_glm4_moe = {
    .model_type = "glm4_moe",
    .id = GLM_ARCH_ID,
    .experts_key = "n_routed_experts",
    .norm_topk_default = 1,
    .read_config = glm_read_config,
    .free_config = free,
    .ident = glm_ident,
    .router = MF_ROUTER_NOAUX_TC,
    .expert_components = glm_expert_components,
    .bind = glm_bind,
    .unbind = glm_unbind,
    .state_new = glm_state_new,
    .state_free = glm_state_free,
    .state_reset = glm_state_reset,
    .forward = glm_forward,
    .state_segments = glm_state_segments,
};
