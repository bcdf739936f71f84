/*
 * gpt_oss.c — the gpt-oss family (mlx-lm gpt_oss): its config keys, layer kinds,
 * snapshot identity, weight binding, KV caches and forward pass. Adding it touched
 * core/ only where the shared reader named moe_intermediate_size and refused every
 * non-affine quantization override (core/config.c, core/internal.h: the expert width
 * key and the "mxfp4" module mode); the rest is this file, its line in models/arch.c,
 * the MXFP4 expert mode (io/expert_store.c), the router kind and the experts'
 * activation (models/moe.c, backends/backend.h, backends/cpu/cpu_moe.c) and prep's
 * family module (prep/archs/gpt_oss.py); and core/state.c learned ring segments
 * (below), which no earlier family had.
 *
 * Decoder layer:  h = x + Attn(RMSNorm_in(x));  out = h + MoE(RMSNorm_post(h)).
 * Attention: q/k/v/o projections with biases, rotary over the whole head (rotate-half
 * pairs; YaRN frequencies and the YaRN scale on q and k when rope_scaling says yarn,
 * as mlx-lm's YarnRoPE), GQA, scale head_dim^-1/2, and per head a learned sink logit
 * in the softmax (attention_ext). Layers of layer_types "sliding_attention" see the
 * last sliding_window positions only and keep them in a ring buffer of GPTOSS_RING_EXTRA
 * rows more than the window; "full_attention" layers see every position and keep a
 * cache of n_ctx rows.
 * MoE on every layer: logits = router(x) + its bias, the num_experts_per_tok largest,
 * weights softmax over those alone; experts in MXFP4 with per-expert biases and the
 * clamped SwiGLU (alpha 1.702, limit 7.0: mlx-lm's SwigluOAI() defaults, which
 * gpt_oss.py uses whatever swiglu_limit says).
 *
 * State: the full layers' caches are positional segments; each sliding layer's ring
 * is a ring segment (core/state.c): a snapshot holds its last min(n_past,
 * sliding_window) positions oldest first, and truncation by up to GPTOSS_RING_EXTRA -
 * tokens (the ring rows beyond the window) is exact, deeper is refused with the reason.
 * An eval overwrites ring rows of positions it does not own (the oldest ones): their
 * bytes are copied aside first and put back when the eval fails, so a failed eval
 * leaves the committed state as it was.
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
#include "models/yarn.h"

// Tokens per forward chunk (scratch rows); longer prompts run in chunks.
#define GPTOSS_MAX_CHUNK 64
// Ring rows beyond the window: at least GPTOSS_MAX_CHUNK - 1 (attention_ext: a chunk's
// queries and the window before them), the rest the depth of exact truncation.
#define GPTOSS_RING_EXTRA (2 * GPTOSS_MAX_CHUNK - 1)
// Snapshot identity id: after glm4_moe (5).
#define GPTOSS_ARCH_ID 6
// mlx-lm activations.SwigluOAI() defaults (gpt_oss.py passes none).
#define GPTOSS_SWIGLU_ALPHA 1.702f
#define GPTOSS_SWIGLU_LIMIT 7.0f

/* ==== Config: the family's keys (mf_arch.read_config) ==== */

struct gptoss_config {
    int sliding_window;       // default 128 (mlx-lm ModelArgs)
    uint8_t *is_sliding;      // [num_hidden_layers], owned
    int64_t layer_kinds_hash; // snapshot identity of the layer kinds
    struct mf_yarn yarn;
};

static void gptoss_free_config(void *p) {
    struct gptoss_config *g = p;
    if (!g) return;
    free(g->is_sliding);
    free(g);
}

// layer_types, else mlx-lm's default: sliding, full, sliding, ... (an even count).
static int read_layer_types(struct gptoss_config *g, const struct mf_config *cfg,
                            const struct mf_cfg_reader *r) {
    int n = cfg->num_hidden_layers;
    const mf_json *lt = mf_cfg_node(r, "layer_types");
    if (!lt || lt->type == MF_JSON_NULL) {
        if (n % 2)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: no layer_types and an odd num_hidden_layers (%d): mlx-lm's "
                          "default alternates sliding/full over pairs", r->name, n);
        for (int i = 0; i < n; i++) g->is_sliding[i] = i % 2 == 0;
        return 0;
    }
    if (lt->type != MF_JSON_ARRAY || (int)lt->n != n)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: layer_types must list num_hidden_layers (%d) kinds", r->name, n);
    for (int i = 0; i < n; i++) {
        const mf_json *v = lt->items[i];
        int sl = v->type == MF_JSON_STRING && strcmp(v->str, "sliding_attention") == 0;
        int fu = v->type == MF_JSON_STRING && strcmp(v->str, "full_attention") == 0;
        if (!sl && !fu)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: layer_types[%d]: expected \"sliding_attention\" or "
                          "\"full_attention\"", r->name, i);
        g->is_sliding[i] = (uint8_t)sl;
    }
    return 0;
}

// original_max_position_embeddings defaults to mlx-lm YarnRoPE's 4096; rope_scaling
// types other than yarn are refused (mlx-lm's gpt_oss builds a YarnRoPE or none).
static int read_yarn(struct mf_yarn *y, const struct mf_cfg_reader *r) {
    const char *type;
    int rc = mf_yarn_read(y, r, 4096, &type);
    if (rc == 0 && type && !y->on && strcmp(type, "default") != 0)
        return mf_err(r->err, r->errlen, MF_ERR_UNSUPPORTED,
                      "%s: rope_scaling type \"%s\" is not supported for gpt_oss (yarn or "
                      "none)", r->name, type);
    return rc;
}

static int64_t kinds_hash(const uint8_t *is_sliding, int n) {
    uint64_t h = 1469598103934665603ull;   // FNV-1a over the kinds
    for (int i = 0; i < n; i++) h = (h ^ is_sliding[i]) * 1099511628211ull;
    return (int64_t)(h >> 1);
}

static int gptoss_read_config(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    struct gptoss_config *g = calloc(1, sizeof *g);
    if (!g) return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    cfg->arch_cfg = g;
    g->sliding_window = 128;
    g->is_sliding = calloc((size_t)cfg->num_hidden_layers, 1);
    if (!g->is_sliding)
        return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    int rc;
    if ((rc = mf_cfg_pos_int(r, "sliding_window", 0, &g->sliding_window)) ||
        (rc = read_layer_types(g, cfg, r)) || (rc = read_yarn(&g->yarn, r)))
        return rc;
    if (cfg->head_dim % 2)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT, "%s: head_dim must be even, got %d",
                      r->name, cfg->head_dim);
    g->layer_kinds_hash = kinds_hash(g->is_sliding, cfg->num_hidden_layers);
    for (int i = 0; i < cfg->num_hidden_layers; i++)
        cfg->layer_is_moe[i] = cfg->num_experts > 0;
    return 0;
}

static int gptoss_ident(const struct mf_config *cfg, struct mf_ident_field *out, int cap) {
    const struct gptoss_config *g = cfg->arch_cfg;
    int n = 0;
    mf_ident_int(out, &n, cap, "sliding_window", g->sliding_window);
    mf_ident_int(out, &n, cap, "layer_types", g->layer_kinds_hash);
    mf_ident_float(out, &n, cap, "rope_scaling yarn", g->yarn.on);
    mf_yarn_ident(&g->yarn, out, &n, cap);
    return n;
}

/* ==== Rope: mlx-lm's YarnRoPE frequencies, in its f32 arithmetic ==== */

// inv_freq[j] = 1 / freqs[j] of YarnRoPE: the blend of base^(2j/d) and factor times
// it over the ramp between the beta_fast and beta_slow correction dims.
static void yarn_inv_freq(float *inv_freq, const struct mf_yarn *y, int dims,
                          double base) {
    double low, high;
    mf_yarn_range(y, dims, base, &low, &high);
    for (int j = 0; j < dims / 2; j++) {
        float fe = powf((float)base, (float)(2 * j) / (float)dims);
        float fi = (float)y->factor * fe;
        float ramp = ((float)j - (float)low) / (float)(high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float mask = 1.0f - ramp;
        float freq = (fi * fe) / (fi * mask + fe * (1.0f - mask));
        inv_freq[j] = 1.0f / freq;
    }
}

/* ==== Weights ==== */

struct gptoss_hparams {
    int hidden_size;
    int num_hidden_layers;
    int vocab_size;
    float rms_norm_eps;
    int window;                // sliding_window
    int ring_rows;             // rows of a sliding layer's ring
    float rope_mscale;         // YaRN scale of q and k (1 without yarn)
    float *inv_freq;           // [head_dim/2] host, owned
    struct mf_gqa_dims attn;
    struct mf_moe_config moe;
};

struct gptoss_layer {
    struct mf_weight input_layernorm;          // [hidden]
    struct mf_weight post_attention_layernorm; // [hidden]
    struct mf_gqa_layer attn;                  // q/k/v/o and the q/k/v biases
    struct mf_weight o_bias;                   // f32 [hidden]
    struct mf_weight sinks;                    // [n_head] float
    int sliding;
    struct mf_moe_layer moe;
};

struct gptoss_model {
    struct gptoss_hparams hp;
    struct mf_weight embed_tokens;   // [vocab, hidden]
    struct mf_weight norm;           // [hidden]
    struct mf_weight lm_head;        // [vocab, hidden]
    struct gptoss_layer *layers;     // [num_hidden_layers], owned
};

static void fill_hparams(struct gptoss_hparams *hp, const struct mf_config *c) {
    const struct gptoss_config *g = c->arch_cfg;
    hp->hidden_size = c->hidden_size;
    hp->num_hidden_layers = c->num_hidden_layers;
    hp->vocab_size = c->vocab_size;
    hp->rms_norm_eps = c->rms_norm_eps;
    hp->window = g->sliding_window;
    hp->ring_rows = g->sliding_window + GPTOSS_RING_EXTRA;
    hp->rope_mscale = g->yarn.on ? mf_yarn_get_mscale(g->yarn.factor, g->yarn.mscale) /
                                       mf_yarn_get_mscale(g->yarn.factor, g->yarn.mscale_all_dim)
                                 : 1.0f;
    hp->attn = (struct mf_gqa_dims){
        .n_layer = c->num_hidden_layers, .n_head = c->num_attention_heads,
        .n_head_kv = c->num_key_value_heads, .head_dim = c->head_dim,
        .n_rot = c->head_dim, .eps = c->rms_norm_eps,
        .scale = (float)(1.0 / sqrt((double)c->head_dim)),
    };
    hp->moe = (struct mf_moe_config){
        .router = (enum mf_router_kind)c->family->router,   // declared in mf_arch
        .n_embd = c->hidden_size, .n_expert = c->num_experts,
        .n_expert_used = c->num_experts_per_tok, .n_ff_exp = c->moe_intermediate_size,
        .routed_scaling_factor = 1.0f, .act = MF_MOE_ACT_SWIGLU_CLAMPED,
        .act_alpha = GPTOSS_SWIGLU_ALPHA, .act_limit = GPTOSS_SWIGLU_LIMIT,
    };
}

static int bind_moe(mf_model *m, struct mf_moe_layer *w, const struct gptoss_hparams *hp,
                    int il, char *err, size_t errlen) {
    w->il = il;
    int rc = mf_bind_lin_at(m, &w->router, 0, hp->moe.n_expert, hp->hidden_size, err,
                            errlen, "model.layers.%d.mlp.router", il);
    char name[128];
    snprintf(name, sizeof name, "model.layers.%d.mlp.router.bias", il);
    return rc ? rc : mf_bind_vector_f32(m, &w->router_bias, name, hp->moe.n_expert, err,
                                        errlen);
}

static int bind_layer(mf_model *m, struct gptoss_layer *L, const struct gptoss_hparams *hp,
                      int il, char *err, size_t errlen) {
    int hid = hp->hidden_size;
    int rc = mf_bind_vec_at(m, &L->input_layernorm, hid, err, errlen,
                            "model.layers.%d.input_layernorm.weight", il);
    if (!rc) rc = mf_bind_vec_at(m, &L->post_attention_layernorm, hid, err, errlen,
                                 "model.layers.%d.post_attention_layernorm.weight", il);
    char prefix[128], name[160];
    snprintf(prefix, sizeof prefix, "model.layers.%d.self_attn", il);
    if (!rc) rc = mf_gqa_bind(m, &L->attn, &hp->attn, hid, prefix, 0, 1, err, errlen);
    snprintf(name, sizeof name, "%s.o_proj.bias", prefix);
    if (!rc) rc = mf_bind_vector_f32(m, &L->o_bias, name, hid, err, errlen);
    snprintf(name, sizeof name, "%s.sinks", prefix);
    if (!rc) rc = mf_bind_vector(m, &L->sinks, name, hp->attn.n_head, err, errlen);
    return rc ? rc : bind_moe(m, &L->moe, hp, il, err, errlen);
}

static void gptoss_unbind(mf_model *m) {
    struct gptoss_model *M = m->arch_weights;
    if (!M) return;
    free(M->layers);
    free(M->hp.inv_freq);
    free(M);
    m->arch_weights = NULL;
}

static int bind_model(mf_model *m, struct gptoss_model *M, char *err, size_t errlen) {
    const struct gptoss_hparams *hp = &M->hp;
    const struct gptoss_config *g = m->cfg.arch_cfg;
    int rc = mf_bind_linear(m, &M->embed_tokens, "model.embed_tokens", 0, hp->vocab_size,
                            hp->hidden_size, err, errlen);
    if (!rc) rc = mf_bind_vector(m, &M->norm, "model.norm.weight", hp->hidden_size,
                                 err, errlen);
    // gpt_oss.Model always has its own lm_head (tie_word_embeddings not consulted).
    if (!rc) rc = mf_bind_linear(m, &M->lm_head, "lm_head", 0, hp->vocab_size,
                                 hp->hidden_size, err, errlen);
    for (int il = 0; !rc && il < hp->num_hidden_layers; il++) {
        M->layers[il].sliding = g->is_sliding[il];
        rc = bind_layer(m, &M->layers[il], hp, il, err, errlen);
    }
    return rc;
}

// The optional op the family needs (attention sinks and the sliding window over a
// ring cache); its experts (MXFP4 with biases, clamped SwiGLU) are checked per layer
// by the backend's moe_experts_check.
static int check_backend(const mf_model *m, char *err, size_t errlen) {
    const struct mf_backend_ops *op = m->be->ops;
    if (op->attention_ext)
        return MF_OK;
    return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                  "gpt_oss: backend '%s' cannot run it: it has no attention_ext (attention "
                  "sinks, sliding window)", op->name);
}

static int gptoss_bind(mf_model *m, char *err, size_t errlen) {
    const struct mf_config *c = &m->cfg;
    int rc = check_backend(m, err, errlen);
    if (rc) return rc;
    if (c->n_moe_layers != c->num_hidden_layers)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: gpt_oss needs routed experts (num_local_experts > 0)");
    struct gptoss_model *M = calloc(1, sizeof *M);
    if (!M) return mf_err(err, errlen, MF_ERR_NOMEM, "gpt_oss: out of memory");
    m->arch_weights = M;
    struct gptoss_hparams *hp = &M->hp;
    fill_hparams(hp, c);
    hp->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(float));
    M->layers = calloc((size_t)c->num_hidden_layers, sizeof *M->layers);
    if (!hp->inv_freq || !M->layers) {
        gptoss_unbind(m);
        return mf_err(err, errlen, MF_ERR_NOMEM, "gpt_oss: out of memory");
    }
    const struct gptoss_config *g = c->arch_cfg;
    if (g->yarn.on)
        yarn_inv_freq(hp->inv_freq, &g->yarn, c->head_dim, c->rope_theta);
    else
        mf_rope_inv_freq_plain(hp->inv_freq, c->head_dim, c->rope_theta);
    rc = bind_model(m, M, err, errlen);
    if (rc) gptoss_unbind(m);
    return rc;
}

/* ==== State ==== */

// Per ctx: the decoder's chunk buffers, every layer's cache (full: n_ctx rows; sliding:
// a ring of ring_rows rows, position p in row p % ring_rows) and one chunk's scratch.
struct gptoss_state {
    struct mf_decoder dec;
    float **k_cache, **v_cache;   // [n_layer] -> [rows, Hkv, D]
    float **k_save, **v_save;     // [n_layer] -> [ring_rows, Hkv, D] sliding layers'
                                  // rows an eval overwrites (NULL for full layers)
    float *inv_freq;              // [D/2]
    float *q, *k, *v;             // [T, H*D], [T, Hkv*D], [T, Hkv*D]
    float *attn;                  // [T, H*D]
    float *bias_rows;             // [T, max(H*D, hidden)]
    int32_t *zero_idx;            // [T] host zeros (gather index of bias_rows)
};

static int cache_rows(const mf_ctx *ctx, const struct gptoss_model *M, int il) {
    return M->layers[il].sliding ? M->hp.ring_rows : ctx->n_ctx;
}

static void gptoss_state_free(mf_ctx *ctx) {
    struct gptoss_state *s = ctx->arch_state;
    if (!s) return;
    const struct gptoss_model *M = ctx->model->arch_weights;
    const struct mf_backend_ops *op = ctx->be->ops;
    float **lists[] = {s->k_cache, s->v_cache, s->k_save, s->v_save};
    for (size_t j = 0; j < sizeof lists / sizeof lists[0]; j++)
        for (int il = 0; lists[j] && il < M->hp.num_hidden_layers; il++)
            if (lists[j][il]) op->dealloc(ctx->ex, lists[j][il]);
    float *bufs[] = {s->inv_freq, s->q, s->k, s->v, s->attn, s->bias_rows};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) op->dealloc(ctx->ex, bufs[i]);
    free(s->k_cache);
    free(s->v_cache);
    free(s->k_save);
    free(s->v_save);
    free(s->zero_idx);
    mf_decoder_free(ctx, &s->dec);
    free(s);
    ctx->arch_state = NULL;
}

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static int alloc_buffers(mf_ctx *ctx, struct gptoss_state *s, const struct gptoss_model *M,
                         int T) {
    const struct gptoss_hparams *hp = &M->hp;
    size_t qd = (size_t)hp->attn.n_head * hp->attn.head_dim;
    size_t kvd = (size_t)hp->attn.n_head_kv * hp->attn.head_dim;
    size_t brow = qd > (size_t)hp->hidden_size ? qd : (size_t)hp->hidden_size;
    int fail = 0, L = hp->num_hidden_layers;
    s->k_cache = calloc((size_t)L, sizeof *s->k_cache);
    s->v_cache = calloc((size_t)L, sizeof *s->v_cache);
    s->k_save = calloc((size_t)L, sizeof *s->k_save);
    s->v_save = calloc((size_t)L, sizeof *s->v_save);
    s->zero_idx = calloc((size_t)T, sizeof *s->zero_idx);
    if (!s->k_cache || !s->v_cache || !s->k_save || !s->v_save || !s->zero_idx) return 0;
    for (int il = 0; !fail && il < L; il++) {
        size_t rows = (size_t)cache_rows(ctx, M, il);
        s->k_cache[il] = mf_dev_floats(ctx, rows * kvd, &fail);
        s->v_cache[il] = mf_dev_floats(ctx, rows * kvd, &fail);
        if (!M->layers[il].sliding) continue;
        s->k_save[il] = mf_dev_floats(ctx, rows * kvd, &fail);
        s->v_save[il] = mf_dev_floats(ctx, rows * kvd, &fail);
    }
    s->inv_freq = mf_dev_floats(ctx, (size_t)hp->attn.head_dim / 2, &fail);
    s->q = mf_dev_floats(ctx, (size_t)T * qd, &fail);
    s->k = mf_dev_floats(ctx, (size_t)T * kvd, &fail);
    s->v = mf_dev_floats(ctx, (size_t)T * kvd, &fail);
    s->attn = mf_dev_floats(ctx, (size_t)T * qd, &fail);
    s->bias_rows = mf_dev_floats(ctx, (size_t)T * brow, &fail);
    return !fail;
}

static int gptoss_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct gptoss_model *M = ctx->model->arch_weights;
    const struct gptoss_hparams *hp = &M->hp;
    struct gptoss_state *s = calloc(1, sizeof *s);
    if (!s) return mf_err(err, errlen, MF_ERR_NOMEM, "gpt_oss: out of memory");
    ctx->arch_state = s;
    int T = ctx->n_ctx < GPTOSS_MAX_CHUNK ? ctx->n_ctx : GPTOSS_MAX_CHUNK;
    if (!alloc_buffers(ctx, s, M, T)) {
        gptoss_state_free(ctx);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "gpt_oss: out of memory for the KV caches of %d positions and "
                      "scratch of %d tokens", ctx->n_ctx, T);
    }
    ctx->be->ops->upload(ctx->ex, s->inv_freq, 0, hp->inv_freq,
                         (size_t)hp->attn.head_dim / 2 * sizeof(float));
    s->dec = (struct mf_decoder){
        .max_tok = T, .embed = &M->embed_tokens, .norm = &M->norm,
        .head = &M->lm_head, .moe_cfg = &hp->moe, .layer = layer_forward,
    };
    int rc = mf_decoder_alloc(ctx, &s->dec, "gpt_oss", err, errlen);
    if (rc) gptoss_state_free(ctx);
    return rc;
}

static uint64_t kv_row_bytes(const struct gptoss_hparams *hp) {
    return (uint64_t)hp->attn.n_head_kv * hp->attn.head_dim * sizeof(float);
}

static void gptoss_state_reset(mf_ctx *ctx) {
    struct gptoss_state *s = ctx->arch_state;
    const struct gptoss_model *M = ctx->model->arch_weights;
    for (int il = 0; il < M->hp.num_hidden_layers; il++) {
        size_t bytes = (size_t)cache_rows(ctx, M, il) * kv_row_bytes(&M->hp);
        ctx->be->ops->zero(ctx->ex, s->k_cache[il], 0, bytes);
        ctx->be->ops->zero(ctx->ex, s->v_cache[il], 0, bytes);
    }
}

// A KEY and a VALUE segment per layer: positional on full layers, rings keeping the
// last sliding_window positions on sliding layers.
static int gptoss_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    const struct gptoss_state *s = ctx->arch_state;
    const struct gptoss_model *M = ctx->model->arch_weights;
    int n = 0;
    for (int il = 0; il < M->hp.num_hidden_layers; il++) {
        int sl = M->layers[il].sliding;
        float *bufs[2] = {s->k_cache[il], s->v_cache[il]};
        for (int kv = 0; kv < 2; kv++, n++)
            if (n < cap)
                segs[n] = (struct mf_state_seg){
                    .buf = bufs[kv], .row_bytes = kv_row_bytes(&M->hp), .layer = il,
                    .kind = kv ? MF_SEG_VALUE : MF_SEG_KEY,
                    .ring_rows = sl ? M->hp.ring_rows : 0,
                    .ring_keep = sl ? M->hp.window : 0};
    }
    return n;
}

/* ==== Forward ==== */

// y[n, dim] += bias (a row repeated n times through the zero gather index).
static void add_bias(mf_ctx *ctx, struct gptoss_state *s, float *y,
                     const struct mf_weight *bias, int n, int dim) {
    const struct mf_backend_ops *op = ctx->be->ops;
    op->gather_rows(ctx->ex, s->bias_rows, bias->w, s->zero_idx, n, dim);
    op->axpy(ctx->ex, y, 1.0f, s->bias_rows, n * dim);
}

// Copies n rows between a dense buffer and the rows of positions pos0 .. pos0+n-1 of a
// cache of `rows` rows (position p in row p % rows: a ring wraps in at most two
// pieces; a full cache never wraps). to_cache: dense -> cache, else cache -> dense.
static void cache_rows_copy(mf_ctx *ctx, float *cache, int rows, float *dense, int n,
                            int pos0, uint64_t row_bytes, int to_cache) {
    const struct mf_backend_ops *op = ctx->be->ops;
    for (int done = 0; done < n;) {
        int row = (pos0 + done) % rows, run = n - done < rows - row ? n - done : rows - row;
        size_t c_off = (size_t)row * row_bytes, d_off = (size_t)done * row_bytes;
        if (to_cache) op->copy(ctx->ex, cache, c_off, dense, d_off, (size_t)run * row_bytes);
        else op->copy(ctx->ex, dense, d_off, cache, c_off, (size_t)run * row_bytes);
        done += run;
    }
}

static void cache_put(mf_ctx *ctx, float *cache, int rows, float *src, int n, int pos0,
                      uint64_t row_bytes) {
    cache_rows_copy(ctx, cache, rows, src, n, pos0, row_bytes, 1);
}

// y[n, hidden] = Attn(xn), xn = RMSNorm(x) * input_layernorm (written by the q/k/v
// products' call), for positions pos0 .. pos0+n-1; writes their cache rows.
static void attention(mf_ctx *ctx, struct gptoss_state *s, const struct gptoss_model *M,
                      int il, float *y, float *xn, const float *x, int n, int pos0) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const struct gptoss_hparams *hp = &M->hp;
    const struct gptoss_layer *L = &M->layers[il];
    const int H = hp->attn.n_head, Hkv = hp->attn.n_head_kv, D = hp->attn.head_dim;
    const int kvd = Hkv * D, rows = cache_rows(ctx, M, il);
    float *const qkv[3] = {s->q, s->k, s->v};
    const struct mf_weight *const wqkv[3] = {&L->attn.q_proj, &L->attn.k_proj,
                                             &L->attn.v_proj};
    mf_rms_matmul_multi(op, ctx->ex, 3, qkv, wqkv, xn, x, &L->input_layernorm,
                        hp->rms_norm_eps, n);
    add_bias(ctx, s, s->q, &L->attn.q_bias, n, H * D);
    add_bias(ctx, s, s->k, &L->attn.k_bias, n, kvd);
    add_bias(ctx, s, s->v, &L->attn.v_bias, n, kvd);
    struct mf_rope_qk r = {.x = {s->q, s->k}, .heads = {H, Hkv}, .tok_stride = {H * D, kvd},
                           .head_stride = {D, D}, .n_tok = n, .head_dim = D, .n_rot = D,
                           .pos0 = pos0, .mscale = hp->rope_mscale,
                           .inv_freq = s->inv_freq};
    mf_rope_qk(op, ctx->ex, &r);
    cache_put(ctx, s->k_cache[il], rows, s->k, n, pos0, kv_row_bytes(hp));
    cache_put(ctx, s->v_cache[il], rows, s->v, n, pos0, kv_row_bytes(hp));
    struct mf_attn_ext ext = {.sinks = &L->sinks, .window = L->sliding ? hp->window : 0,
                              .ring = L->sliding ? rows : 0};
    op->attention_ext(ctx->ex, s->attn, s->q, s->k_cache[il], s->v_cache[il], n, H, Hkv, D,
                      D, kvd, kvd, pos0, hp->attn.scale, &ext);
    MF_TAP(ctx, "model.layers.%d.self_attn.sdpa", il, s->attn, n * H * D);
    op->matmul(ctx->ex, y, &L->attn.o_proj, s->attn, n);
    add_bias(ctx, s, y, &L->o_bias, n, hp->hidden_size);
}

// One decoder layer on the chunk in dec.x (updated in place): the attention half,
// then the shared FFN half (models/decoder.c).
static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct gptoss_state *s = ctx->arch_state;
    const struct gptoss_model *M = ctx->model->arch_weights;
    const struct gptoss_layer *L = &M->layers[il];
    (void)first_chunk;  // no recurrent state: every chunk starts alike

    attention(ctx, s, M, il, s->dec.y, s->dec.xn, s->dec.x, n, pos0);
    MF_TAP(ctx, "model.layers.%d.self_attn", il, s->dec.y, n * M->hp.hidden_size);
    return mf_decoder_ffn(ctx, &s->dec, s->dec.y, &L->post_attention_layernorm, 1, &L->moe,
                          NULL, il, n);
}

// The ring rows the eval of n_tok tokens from n_past on will overwrite (those of its
// own positions: at most the whole ring) into or out of the save buffers.
static void rings_save(mf_ctx *ctx, struct gptoss_state *s, const struct gptoss_model *M,
                       int n_tok, int restore) {
    int R = M->hp.ring_rows, n = n_tok < R ? n_tok : R;
    uint64_t row = kv_row_bytes(&M->hp);
    for (int il = 0; il < M->hp.num_hidden_layers; il++) {
        if (!M->layers[il].sliding) continue;
        int from = ctx->n_past;   // rows of positions from, from+1, ... (mod R)
        cache_rows_copy(ctx, s->k_cache[il], R, s->k_save[il], n, from, row, restore);
        cache_rows_copy(ctx, s->v_cache[il], R, s->v_save[il], n, from, row, restore);
    }
}

static int gptoss_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                          int all_logits) {
    struct gptoss_state *s = ctx->arch_state;
    const struct gptoss_model *M = ctx->model->arch_weights;
    rings_save(ctx, s, M, n_tok, 0);
    int rc = mf_decoder_run(ctx, &s->dec, tokens, n_tok, logits, all_logits);
    if (rc != MF_OK) rings_save(ctx, s, M, n_tok, 1);
    return rc;
}

/* ==== Registration ==== */

static const char *const gptoss_expert_components[] = {"gate_proj", "up_proj",
                                                      "down_proj", NULL};

const struct mf_arch mf_arch_gpt_oss = {
    .model_type = "gpt_oss",
    .id = GPTOSS_ARCH_ID,
    .experts_key = "num_local_experts",
    .expert_ff_key = "intermediate_size",
    .rope_theta_default = 150000,
    .read_config = gptoss_read_config,
    .free_config = gptoss_free_config,
    .ident = gptoss_ident,
    .router = MF_ROUTER_TOPK_SOFTMAX,
    .expert_components = gptoss_expert_components,
    .bind = gptoss_bind,
    .unbind = gptoss_unbind,
    .state_new = gptoss_state_new,
    .state_free = gptoss_state_free,
    .state_reset = gptoss_state_reset,
    .forward = gptoss_forward,
    .state_segments = gptoss_state_segments,
};
