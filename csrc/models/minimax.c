/*
 * minimax.c — the MiniMax-M2 family (mlx-lm minimax): its config keys, layer kinds,
 * snapshot identity, weight binding, KV cache and forward pass. Adding it touched no
 * core/ file: this file, its line in models/arch.c, the full-width q/k norm option of
 * models/attn_gqa.c, and prep's family module (prep/archs/minimax.py, with the two
 * Family fields it needed: ffn_module block_sparse_moe, alias minimax_m2).
 *
 * Decoder layer:  h = x + Attn(RMSNorm_in(x));  out = h + MoE(RMSNorm_post(h)).
 * Attention (models/attn_gqa.c): q/k/v/o projections without biases; when use_qk_norm
 * (mlx-lm's default) one RMSNorm over all of a token's query dims (q_norm [H*D]) and
 * one over all its key dims (k_norm [Hkv*D]), before rotary; rotary with rotate-half
 * pairs over the first rotary_dim dims of each head (plain nn.RoPE, base rope_theta);
 * GQA, scale head_dim^-1/2.
 * MoE (block_sparse_moe), on every layer: router logits of a linear `gate`, sigmoid
 * scores, e_score_correction_bias added for choosing the top num_experts_per_tok only,
 * the chosen unbiased scores divided by their sum; SwiGLU experts of width
 * intermediate_size (w1/w3/w2 in Hugging Face's names, gate/up/down_proj after
 * mlx-lm's sanitize). That is models/moe.c's noaux_tc router with one group, no
 * scaling and renormalisation always on; mlx-lm's model has no shared expert and
 * consults neither shared_intermediate_size nor scoring_func (always sigmoid) nor
 * norm_topk_prob, and neither does this file.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/internal.h"
#include "models/arch_config.h"
#include "models/attn_gqa.h"
#include "models/bind.h"
#include "models/decoder.h"
#include "models/moe.h"

// Tokens per forward chunk (scratch rows); longer prompts run in chunks.
#define MINIMAX_MAX_CHUNK 64
// Snapshot identity id: after glm4_moe (5) and gpt_oss (6).
#define MINIMAX_ARCH_ID 7

/* ==== Config: the family's keys (mf_arch.read_config) ==== */

struct minimax_config {
    int rotary_dim;     // rotated dims per head, required (mlx-lm ModelArgs)
    int use_qk_norm;    // default 1 (mlx-lm's default)
};

static int check_keys(const struct mf_config *cfg, const struct mf_cfg_reader *r,
                      const struct minimax_config *x) {
    if (x->rotary_dim < 2 || x->rotary_dim % 2 || x->rotary_dim > cfg->head_dim)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: rotary_dim must be even, >= 2 and at most head_dim (%d), "
                      "got %d", r->name, cfg->head_dim, x->rotary_dim);
    if (cfg->num_experts < 1)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: num_local_experts must be positive (every minimax layer "
                      "is routed experts), got %d", r->name, cfg->num_experts);
    // mlx-lm divides the chosen scores by their sum even for one expert (weight 1);
    // the shared noaux_tc router keeps a lone expert's sigmoid score instead.
    if (cfg->num_experts_per_tok < 2)
        return mf_err(r->err, r->errlen, MF_ERR_UNSUPPORTED,
                      "%s: num_experts_per_tok %d: minimax with fewer than 2 routed "
                      "experts per token is not supported", r->name,
                      cfg->num_experts_per_tok);
    return 0;
}

// Every layer is MoE; the router renormalises whatever norm_topk_prob says.
static int minimax_read_config(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    struct minimax_config *x = calloc(1, sizeof *x);
    if (!x) return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    cfg->arch_cfg = x;
    x->use_qk_norm = 1;
    int rc;
    if ((rc = mf_cfg_int(r, "rotary_dim", 1, &x->rotary_dim)) ||
        (rc = mf_cfg_bool(r, "use_qk_norm", &x->use_qk_norm)) ||
        (rc = check_keys(cfg, r, x)))
        return rc;
    cfg->norm_topk_prob = 1;
    for (int i = 0; i < cfg->num_hidden_layers; i++)
        cfg->layer_is_moe[i] = 1;
    return 0;
}

static int minimax_ident(const struct mf_config *cfg, struct mf_ident_field *out,
                         int cap) {
    const struct minimax_config *x = cfg->arch_cfg;
    int n = 0;
    mf_ident_int(out, &n, cap, "rotary_dim", x->rotary_dim);
    mf_ident_int(out, &n, cap, "use_qk_norm", x->use_qk_norm);
    return n;
}

/* ==== Weights ==== */

struct minimax_hparams {
    int hidden_size;
    int num_hidden_layers;
    int vocab_size;
    float rms_norm_eps;
    int use_qk_norm;
    float *inv_freq;           // [rotary_dim/2] host, owned
    struct mf_gqa_dims attn;
    struct mf_moe_config moe;
};

struct minimax_layer {
    struct mf_weight input_layernorm;          // [hidden]
    struct mf_weight post_attention_layernorm; // [hidden]
    struct mf_gqa_layer attn;
    struct mf_moe_layer moe;                   // block_sparse_moe
};

struct minimax_model {
    struct minimax_hparams hp;
    struct mf_weight embed_tokens;   // [vocab, hidden]
    struct mf_weight norm;           // [hidden]
    struct mf_weight lm_head;        // [vocab, hidden]; embed_tokens when tied
    struct minimax_layer *layers;    // [num_hidden_layers], owned
};

/* ==== Load ==== */

static void fill_hparams(struct minimax_hparams *hp, const struct mf_config *c) {
    const struct minimax_config *x = c->arch_cfg;
    hp->hidden_size = c->hidden_size;
    hp->num_hidden_layers = c->num_hidden_layers;
    hp->vocab_size = c->vocab_size;
    hp->rms_norm_eps = c->rms_norm_eps;
    hp->use_qk_norm = x->use_qk_norm;
    hp->attn = (struct mf_gqa_dims){
        .n_layer = c->num_hidden_layers, .n_head = c->num_attention_heads,
        .n_head_kv = c->num_key_value_heads, .head_dim = c->head_dim,
        .n_rot = x->rotary_dim, .eps = c->rms_norm_eps, .qk_norm_full = 1,
        .scale = (float)(1.0 / sqrt((double)c->head_dim)),
    };
    hp->moe = (struct mf_moe_config){
        .router = (enum mf_router_kind)c->family->router,   // declared in mf_arch
        .n_embd = c->hidden_size,
        .n_expert = c->num_experts,
        .n_expert_used = c->num_experts_per_tok,
        .n_ff_exp = c->moe_intermediate_size,   // intermediate_size (expert_ff_key)
        .norm_topk_prob = 1,
        .n_group = 1,
        .topk_group = 1,
        .routed_scaling_factor = 1.0f,
    };
}

// model.layers.<il>.block_sparse_moe: gate [n_expert, hidden] (quantized 8-bit by
// mlx-lm's quant_predicate, or float) and its f32 e_score_correction_bias.
static int bind_moe(mf_model *m, struct mf_moe_layer *w, const struct mf_moe_config *mc,
                    int il, char *err, size_t errlen) {
    w->il = il;
    int rc = mf_bind_lin_at(m, &w->router, 0, mc->n_expert, mc->n_embd, err, errlen,
                            "model.layers.%d.block_sparse_moe.gate", il);
    if (rc) return rc;
    char name[256];
    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.e_score_correction_bias",
             il);
    // read by moe_route as f32: converted once here if stored in 16 bits
    return mf_bind_vector_f32(m, &w->router_bias, name, mc->n_expert, err, errlen);
}

static int bind_layer(mf_model *m, struct minimax_layer *L,
                      const struct minimax_hparams *hp, int il, char *err,
                      size_t errlen) {
    int hid = hp->hidden_size;
    int rc = mf_bind_vec_at(m, &L->input_layernorm, hid, err, errlen,
                            "model.layers.%d.input_layernorm.weight", il);
    if (!rc) rc = mf_bind_vec_at(m, &L->post_attention_layernorm, hid, err, errlen,
                                 "model.layers.%d.post_attention_layernorm.weight", il);
    char prefix[256];
    snprintf(prefix, sizeof prefix, "model.layers.%d.self_attn", il);
    if (!rc) rc = mf_gqa_bind(m, &L->attn, &hp->attn, hid, prefix, hp->use_qk_norm, 0,
                              err, errlen);
    return rc ? rc : bind_moe(m, &L->moe, &hp->moe, il, err, errlen);
}

static void minimax_unbind(mf_model *m) {
    struct minimax_model *M = m->arch_weights;
    if (!M) return;
    free(M->layers);
    free(M->hp.inv_freq);
    free(M);
    m->arch_weights = NULL;
}

static int bind_model(mf_model *m, struct minimax_model *M, char *err, size_t errlen) {
    const struct minimax_hparams *hp = &M->hp;
    int rc = mf_bind_linear(m, &M->embed_tokens, "model.embed_tokens", 0, hp->vocab_size,
                            hp->hidden_size, err, errlen);
    if (!rc) rc = mf_bind_vector(m, &M->norm, "model.norm.weight", hp->hidden_size,
                                 err, errlen);
    // Tied: mlx-lm's minimax.Model has no lm_head and uses embed_tokens.as_linear.
    if (!rc && m->cfg.tie_word_embeddings) M->lm_head = M->embed_tokens;
    else if (!rc) rc = mf_bind_linear(m, &M->lm_head, "lm_head", 0, hp->vocab_size,
                                      hp->hidden_size, err, errlen);
    for (int il = 0; !rc && il < hp->num_hidden_layers; il++)
        rc = bind_layer(m, &M->layers[il], hp, il, err, errlen);
    return rc;
}

static int minimax_bind(mf_model *m, char *err, size_t errlen) {
    const struct mf_config *c = &m->cfg;
    struct minimax_model *M = calloc(1, sizeof *M);
    if (!M) return mf_err(err, errlen, MF_ERR_NOMEM, "minimax: out of memory");
    m->arch_weights = M;
    struct minimax_hparams *hp = &M->hp;
    fill_hparams(hp, c);
    hp->inv_freq = calloc((size_t)hp->attn.n_rot / 2, sizeof(float));
    M->layers = calloc((size_t)c->num_hidden_layers, sizeof *M->layers);
    if (!hp->inv_freq || !M->layers) {
        minimax_unbind(m);
        return mf_err(err, errlen, MF_ERR_NOMEM, "minimax: out of memory");
    }
    mf_rope_inv_freq_plain(hp->inv_freq, hp->attn.n_rot, c->rope_theta);
    int rc = bind_model(m, M, err, errlen);
    if (rc) minimax_unbind(m);
    return rc;
}

/* ==== State (models/attn_gqa.h's all-GQA decoder state) ==== */

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static const struct mf_gqa_dims *attn_dims(const mf_ctx *ctx) {
    const struct minimax_model *M = ctx->model->arch_weights;
    return &M->hp.attn;
}

static void minimax_state_free(mf_ctx *ctx) { mf_gqa_decoder_free(ctx, attn_dims(ctx)); }

static int minimax_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct minimax_model *M = ctx->model->arch_weights;
    const struct minimax_hparams *hp = &M->hp;
    const struct mf_decoder dec = {.embed = &M->embed_tokens, .norm = &M->norm,
                                   .head = &M->lm_head, .moe_cfg = &hp->moe,
                                   .layer = layer_forward};
    return mf_gqa_decoder_new(ctx, &hp->attn, hp->inv_freq, 0, dec, MINIMAX_MAX_CHUNK,
                              "minimax", err, errlen);
}

static void minimax_state_reset(mf_ctx *ctx) { mf_gqa_decoder_reset(ctx, attn_dims(ctx)); }

static int minimax_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    return mf_gqa_decoder_segments(ctx, attn_dims(ctx), segs, cap);
}

/* ==== Forward ==== */

// One decoder layer on the chunk in dec.x (updated in place): the attention half,
// then the shared FFN half (models/decoder.c) with the routed experts.
static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    const struct minimax_model *M = ctx->model->arch_weights;
    const struct minimax_hparams *hp = &M->hp;
    const struct minimax_layer *L = &M->layers[il];
    (void)first_chunk;  // no recurrent state: every chunk starts alike
    mf_gqa_decoder_attn(ctx, &hp->attn, &L->attn, &L->input_layernorm, hp->rms_norm_eps,
                        hp->hidden_size, il, n, pos0);
    return mf_decoder_ffn(ctx, &s->dec, NULL, &L->post_attention_layernorm, 1, &L->moe, NULL,
                          il, n);
}

static int minimax_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                           int all_logits) {
    struct mf_gqa_decoder_state *s = ctx->arch_state;
    return mf_decoder_run(ctx, &s->dec, tokens, n_tok, logits, all_logits);
}

/* ==== Registration ==== */

static const char *const minimax_expert_components[] = {"gate_proj", "up_proj",
                                                        "down_proj", NULL};

const struct mf_arch mf_arch_minimax = {
    .model_type = "minimax",
    .alias = "minimax_m2",   // Hugging Face's model_type; mlx-lm remaps it to minimax
    .id = MINIMAX_ARCH_ID,
    .experts_key = "num_local_experts",
    .expert_ff_key = "intermediate_size",
    .norm_topk_default = 1,
    .read_config = minimax_read_config,
    .free_config = free,
    .ident = minimax_ident,
    .router = MF_ROUTER_NOAUX_TC,
    .expert_components = minimax_expert_components,
    .bind = minimax_bind,
    .unbind = minimax_unbind,
    .state_new = minimax_state_new,
    .state_free = minimax_state_free,
    .state_reset = minimax_state_reset,
    .forward = minimax_forward,
    .state_segments = minimax_state_segments,
};
