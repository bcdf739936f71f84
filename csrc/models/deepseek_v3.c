/*
 * deepseek_v3.c — the DeepSeek-V3 family (DeepSeek-V3/R1, Cogito-V2, Kimi-K2 remaps):
 * config checks, weight binding, the compressed MLA cache and the forward pass
 * (model-math §3), written once against the backend op table.
 *
 * Decoder layer:  h = x + MLA(RMSNorm_in(x));  out = h + FFN(RMSNorm_post(h)), where
 * FFN is the dense SwiGLU for layers before first_k_dense_replace (or off the
 * moe_layer_freq grid) and the noaux_tc-routed MoE with shared experts otherwise.
 *
 * MLA is computed in the absorbed form for every query, prefill and decode alike, so
 * the cache holds per position only the normalised latent c (kv_lora_rank floats) and
 * the roped shared key k_pe (qk_rope_head_dim floats), never expanded K/V:
 *   q~^h  = W_UK^h^T q_nope^h                    [kv_lora_rank]
 *   score = scale * (q~^h . c_u + q_pe^h . k_pe_u)
 *   out^h = W_UV^h (sum_u softmax_u c_u)         [v_head_dim]
 * The backend attention op runs it as one kv head with dk = kv_lora + rope and
 * dv = kv_lora whose K and V rows are the same cache rows; the per-head products
 * around it are one matmul_heads call each, over all heads.
 *
 * Not here: the MoE block, router and dense FFN (models/moe.c), expert I/O (io/),
 * snapshots and truncation (core/state.c, through the state segments below).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/json.h"
#include "models/bind.h"
#include "models/decoder.h"
#include "models/deepseek_v3.h"
#include "models/moe.h"

// Tokens per forward chunk: scratch is sized for this many, longer prompts are run in
// chunks so memory does not grow with the prompt.
#define DS_MAX_CHUNK 64

// q_a_layernorm and kv_a_layernorm use a fixed eps in mlx-lm (deepseek_v3.py), not
// rms_norm_eps.
#define DS_LORA_NORM_EPS 1e-6f

/* ==== Config ==== */

// Sizes taken from config.json once at bind (names are the config keys), plus the
// derived constants of the attention.
struct ds_hparams {
    int hidden_size;
    int num_hidden_layers;
    int num_attention_heads;
    int vocab_size;
    int intermediate_size;      // dense layers
    int q_lora_rank;            // 0: q_proj instead of q_a_proj/q_b_proj
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;
    float rms_norm_eps;
    int q_head_dim;             // nope + rope
    int kv_row;                 // kv_lora + rope: floats per cached position
    float softmax_scale;        // q_head_dim^-1/2 * m^2 (model-math §3.3 step 6)
    float rope_mscale;          // YaRN factor on the rotated dims (§3.4), else 1
    float *inv_freq;            // [qk_rope_head_dim/2] host, owned
    struct mf_moe_config moe;
};

/* ==== Weights ==== */

// A weight holding one matrix per attention head, run for all heads by one
// matmul_heads call: head h is `w` advanced by h*head_rows rows, used transposed
// (x @ W_h) when transposed is set.
struct ds_heads {
    struct mf_weight w;      // head 0's [n_out, n_in] view
    int64_t head_rows;
    int transposed;
};

struct ds_layer {
    struct mf_weight input_layernorm;          // [hidden]
    struct mf_weight post_attention_layernorm; // [hidden]
    struct mf_weight q_a_proj;                 // [q_lora, hidden] (w NULL without q_lora)
    struct mf_weight q_a_layernorm;            // [q_lora]
    struct ds_heads q_nope;                    // q_b_proj rows [h*qhd, +nope)
    struct ds_heads q_pe;                      // q_b_proj rows [h*qhd + nope, +rope)
                                               // (q_b_proj [H*q_head_dim, q_lora], or
                                               // q_proj [H*q_head_dim, hidden])
    struct mf_weight kv_a_proj_with_mqa;       // [kv_lora + rope, hidden]
    struct mf_weight kv_a_layernorm;           // [kv_lora]
    struct ds_heads w_uk;                      // q~^h[kv_lora] = W_UK^h^T q_nope^h
    struct ds_heads w_uv;                      // out^h[v] = W_UV^h latent^h [kv_lora]
    struct mf_weight o_proj;                   // [hidden, H*v]
    int is_moe;
    struct mf_ffn_layer ffn;                   // dense layers
    struct mf_moe_layer moe;                   // MoE layers
};

struct ds_model {
    struct ds_hparams hp;
    struct mf_weight embed_tokens;   // [vocab, hidden]
    struct mf_weight norm;           // [hidden]
    struct mf_weight lm_head;        // [vocab, hidden]
    struct ds_layer *layers;         // [num_hidden_layers], owned
};

/* ==== State ==== */

// Per ctx: the compressed cache of every layer and the scratch of one chunk (residual
// stream, block output and logits in dec, models/decoder.h). All buffers are device
// memory.
struct ds_state {
    struct mf_decoder dec;
    float **latent;     // [n_layer] -> [n_ctx, kv_lora + rope]: c (normalised) | k_pe
    float *inv_freq;    // [rope/2]
    float *qa;          // [T, q_lora]
    float *q_nope;      // [T, H, nope]
    float *ckv;         // [T, kv_lora + rope]
    float *qfull;       // [T, H, kv_lora + rope]: q~ | q_pe per head
    float *lat_out;     // [T, H, kv_lora] attention output in latent space
    float *o_in;        // [T, H*v] o_proj input
};

/* ==== Load: config checks and YaRN ==== */

/* ==== Config: the family's keys (mf_arch.read_config) ==== */

// original_max_position_embeddings is required (no default in DeepSeek's configs);
// other rope_scaling types are refused at bind (check_rope_type).
static int read_yarn(struct deepseek_v3_config *d, const struct mf_cfg_reader *r) {
    const char *type;
    return mf_yarn_read(&d->yarn, r, 0, &type);
}

static int read_mla(struct deepseek_v3_config *d, const struct mf_cfg_reader *r) {
    d->moe_layer_freq = 1;
    int rc;
    if ((rc = mf_cfg_int(r, "q_lora_rank", 0, &d->q_lora_rank)) ||
        (rc = mf_cfg_pos_int(r, "kv_lora_rank", 1, &d->kv_lora_rank)) ||
        (rc = mf_cfg_int(r, "qk_nope_head_dim", 1, &d->qk_nope_head_dim)) ||
        (rc = mf_cfg_pos_int(r, "qk_rope_head_dim", 1, &d->qk_rope_head_dim)) ||
        (rc = mf_cfg_pos_int(r, "v_head_dim", 1, &d->v_head_dim)) ||
        (rc = mf_cfg_pos_int(r, "moe_layer_freq", 0, &d->moe_layer_freq)))
        return rc;
    if (d->q_lora_rank < 0 || d->qk_nope_head_dim < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: q_lora_rank and qk_nope_head_dim must not be negative",
                      r->name);
    if (d->qk_rope_head_dim % 2)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: qk_rope_head_dim must be even, got %d", r->name,
                      d->qk_rope_head_dim);
    return 0;
}

// Routed experts from first_k_dense_replace on, every moe_layer_freq-th layer.
static int ds_read_config(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    struct deepseek_v3_config *d = calloc(1, sizeof *d);
    if (!d) return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    cfg->arch_cfg = d;
    int rc;
    if ((rc = read_mla(d, r)) || (rc = mf_read_noaux(cfg, r, &d->noaux)) ||
        (rc = read_yarn(d, r)))
        return rc;
    for (int i = 0; i < cfg->num_hidden_layers; i++)
        cfg->layer_is_moe[i] = cfg->num_experts > 0 &&
                               i >= d->noaux.first_k_dense_replace &&
                               i % d->moe_layer_freq == 0;
    return 0;
}

static int ds_ident(const struct mf_config *cfg, struct mf_ident_field *out, int cap) {
    const struct deepseek_v3_config *d = cfg->arch_cfg;
    int n = 0;
    mf_ident_int(out, &n, cap, "q_lora_rank", d->q_lora_rank);
    mf_ident_int(out, &n, cap, "kv_lora_rank", d->kv_lora_rank);
    mf_ident_int(out, &n, cap, "qk_nope_head_dim", d->qk_nope_head_dim);
    mf_ident_int(out, &n, cap, "qk_rope_head_dim", d->qk_rope_head_dim);
    mf_ident_int(out, &n, cap, "v_head_dim", d->v_head_dim);
    mf_ident_int(out, &n, cap, "first_k_dense_replace", d->noaux.first_k_dense_replace);
    mf_ident_int(out, &n, cap, "n_shared_experts", d->noaux.n_shared_experts);
    mf_ident_int(out, &n, cap, "n_group", d->noaux.n_group);
    mf_ident_int(out, &n, cap, "topk_group", d->noaux.topk_group);
    mf_ident_int(out, &n, cap, "moe_layer_freq", d->moe_layer_freq);
    mf_ident_float(out, &n, cap, "routed_scaling_factor", d->noaux.routed_scaling_factor);
    mf_yarn_ident(&d->yarn, out, &n, cap);
    mf_ident_float(out, &n, cap, "rope_scaling yarn", d->yarn.on);
    return n;
}

/* ==== Load: config checks ==== */

// inv_freq[d/2]: plain base^(-2j/d), or with YaRN the blend of extrapolated and
// interpolated frequencies along the linear ramp between the correction dims.
static void rope_inv_freq(float *inv_freq, const struct mf_config *c, int dim) {
    const struct deepseek_v3_config *d = c->arch_cfg;
    double low = 0, high = 0;
    if (d->yarn.on)
        mf_yarn_range(&d->yarn, dim, c->rope_theta, &low, &high);
    for (int j = 0; j < dim / 2; j++) {
        double extra = pow(c->rope_theta, -2.0 * j / dim);
        if (!d->yarn.on) {
            inv_freq[j] = (float)extra;
            continue;
        }
        double ramp = (j - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        inv_freq[j] = (float)(extra / d->yarn.factor * ramp + extra * (1.0 - ramp));
    }
}

static int check_config(const struct mf_config *c, char *err, size_t errlen) {
    const struct deepseek_v3_config *d = c->arch_cfg;
    if (d->kv_lora_rank < 1 || d->qk_nope_head_dim < 1 || d->v_head_dim < 1 ||
        d->qk_rope_head_dim < 2 || d->qk_rope_head_dim % 2 != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: deepseek_v3 needs kv_lora_rank, qk_nope_head_dim, "
                      "v_head_dim >= 1 and an even qk_rope_head_dim >= 2 (got %d, %d, "
                      "%d, %d)", d->kv_lora_rank, d->qk_nope_head_dim, d->v_head_dim,
                      d->qk_rope_head_dim);
    if (c->hidden_size < 1 || c->num_attention_heads < 1 || c->vocab_size < 1 ||
        c->num_hidden_layers < 1)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: hidden_size %d, num_attention_heads %d, vocab_size "
                      "%d, num_hidden_layers %d must all be >= 1", c->hidden_size,
                      c->num_attention_heads, c->vocab_size, c->num_hidden_layers);
    if (c->n_moe_layers > 0) {
        int n_group = d->noaux.n_group > 0 ? d->noaux.n_group : 1;
        if (c->num_experts % n_group != 0 || d->noaux.topk_group < 1 || d->noaux.topk_group > n_group ||
            c->num_experts_per_tok < 1 ||
            c->num_experts_per_tok > d->noaux.topk_group * (c->num_experts / n_group))
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "config.json: n_routed_experts %d, n_group %d, topk_group %d, "
                          "num_experts_per_tok %d do not form a valid noaux_tc router",
                          c->num_experts, d->noaux.n_group, d->noaux.topk_group,
                          c->num_experts_per_tok);
    }
    return MF_OK;
}

// read_yarn (models/yarn.c) reads a "yarn" rope_scaling block, not the others. mlx-lm
// also knows "linear", "dynamic", "llama3", "longrope" and "deepseek_yarn" scaling;
// no DeepSeek-V3 family checkpoint uses them, so they are refused here rather than
// run with plain frequencies.
static int check_rope_type(const mf_model *m, char *err, size_t errlen) {
    const char *text = m->cfg.json_text;
    if (!text) return MF_OK;
    mf_json_doc *doc = NULL;
    int rc = mf_json_parse(&doc, text, strlen(text), "config.json", err, errlen);
    if (rc) return rc;
    const mf_json *rs = mf_json_get(mf_json_root(doc), "rope_scaling");
    const char *type = NULL;
    if (rs && rs->type == MF_JSON_OBJECT && mf_json_get_str(rs, "type", &type) != 1)
        mf_json_get_str(rs, "rope_type", &type);
    if (type && strcmp(type, "yarn") != 0 && strcmp(type, "default") != 0)
        rc = mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                    "config.json: deepseek_v3 rope_scaling type \"%s\" is not supported "
                    "(expected \"yarn\" or no rope_scaling)", type);
    mf_json_free(doc);
    return rc;
}

static void fill_hparams(struct ds_hparams *hp, const struct mf_config *c) {
    const struct deepseek_v3_config *d = c->arch_cfg;
    hp->hidden_size = c->hidden_size;
    hp->num_hidden_layers = c->num_hidden_layers;
    hp->num_attention_heads = c->num_attention_heads;
    hp->vocab_size = c->vocab_size;
    hp->intermediate_size = c->intermediate_size;
    hp->q_lora_rank = d->q_lora_rank;
    hp->kv_lora_rank = d->kv_lora_rank;
    hp->qk_nope_head_dim = d->qk_nope_head_dim;
    hp->qk_rope_head_dim = d->qk_rope_head_dim;
    hp->v_head_dim = d->v_head_dim;
    hp->rms_norm_eps = c->rms_norm_eps;
    hp->q_head_dim = d->qk_nope_head_dim + d->qk_rope_head_dim;
    hp->kv_row = d->kv_lora_rank + d->qk_rope_head_dim;
    // Softmax scale carries m^2 when mscale_all_dim is set (mlx-lm and HF alike);
    // the rotated dims carry mscale / mscale_all_dim's ratio (YarnRoPE.mscale).
    double scale = 1.0 / sqrt((double)hp->q_head_dim);
    hp->rope_mscale = 1.0f;
    if (d->yarn.on) {
        if (d->yarn.mscale_all_dim != 0 && d->yarn.factor > 1) {
            double m = 0.1 * d->yarn.mscale_all_dim * log(d->yarn.factor) + 1.0;
            scale *= m * m;
        }
        hp->rope_mscale = mf_yarn_get_mscale(d->yarn.factor, d->yarn.mscale) /
                          mf_yarn_get_mscale(d->yarn.factor, d->yarn.mscale_all_dim);
    }
    hp->softmax_scale = (float)scale;

    struct mf_moe_config *mc = &hp->moe;
    mc->router = (enum mf_router_kind)c->family->router;   // declared in mf_arch
    mc->n_embd = c->hidden_size;
    mc->n_expert = c->num_experts;
    mc->n_expert_used = c->num_experts_per_tok;
    mc->n_ff_exp = c->moe_intermediate_size;
    mc->n_ff_shexp = c->moe_intermediate_size * d->noaux.n_shared_experts;
    mc->norm_topk_prob = c->norm_topk_prob;
    mc->n_group = d->noaux.n_group > 0 ? d->noaux.n_group : 1;
    mc->topk_group = d->noaux.topk_group > 0 ? d->noaux.topk_group : 1;
    mc->routed_scaling_factor = (float)d->noaux.routed_scaling_factor;
}

/* ==== Load: weight binding ==== */

// Rows [row0, row0 + n_rows) of a [n_out, n_in] weight, as a view (no copy).
static struct mf_weight rows_view(const struct mf_weight *w, int64_t row0, int64_t n_rows) {
    struct mf_weight row = *w;
    row.n_out = 1;
    struct mf_weight v = mf_weight_slice(&row, row0);
    v.n_out = n_rows;
    return v;
}

// W_UK^h / W_UV^h per head from either checkpoint form (model-math §3.3): new files
// store embed_q [H, kv_lora, nope] (= W_UK^h^T, a plain product) and unembed_out
// [H, v, kv_lora]; old files store kv_b_proj [H*(nope+v), kv_lora] whose head h holds
// W_UK^h in rows [h*(nope+v), +nope) (used transposed) and W_UV^h in the next v rows.
// mlx-lm re-quantizes the old form at load; we use the stored weights as they are.
static int bind_absorption(const mf_model *m, struct ds_layer *L, const struct ds_hparams *hp,
                           int il, char *err, size_t errlen) {
    int H = hp->num_attention_heads, nope = hp->qk_nope_head_dim, vd = hp->v_head_dim;
    int kvl = hp->kv_lora_rank;
    char name[256];
    snprintf(name, sizeof name, "model.layers.%d.self_attn.kv_b_proj.weight", il);
    if (mf_has_tensor(m, name)) {
        struct mf_weight kvb;
        int rc = mf_bind_lin_at(m, &kvb, 0, (int64_t)H * (nope + vd), kvl, err, errlen,
                                "model.layers.%d.self_attn.kv_b_proj", il);
        if (rc) return rc;
        L->w_uk = (struct ds_heads){rows_view(&kvb, 0, nope), nope + vd, 1};
        L->w_uv = (struct ds_heads){rows_view(&kvb, nope, vd), nope + vd, 0};
        return MF_OK;
    }
    struct mf_weight eq, uo;
    int rc = mf_bind_lin_at(m, &eq, H, kvl, nope, err, errlen,
                            "model.layers.%d.self_attn.embed_q", il);
    if (!rc) rc = mf_bind_lin_at(m, &uo, H, vd, kvl, err, errlen,
                                 "model.layers.%d.self_attn.unembed_out", il);
    if (rc) return rc;
    L->w_uk = (struct ds_heads){eq, kvl, 0};
    L->w_uv = (struct ds_heads){uo, vd, 0};
    return MF_OK;
}

// attention_bias = true gives q_a_proj, kv_a_proj_with_mqa and o_proj a bias in
// mlx-lm; no released DeepSeek-V3 checkpoint has one and the forward adds none, so
// such a file is refused rather than run without its biases.
static int refuse_biases(const mf_model *m, int il, char *err, size_t errlen) {
    static const char *const mods[] = {"q_a_proj", "q_proj", "kv_a_proj_with_mqa",
                                       "o_proj"};
    char name[256];
    for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
        snprintf(name, sizeof name, "model.layers.%d.self_attn.%s.bias", il, mods[i]);
        if (mf_has_tensor(m, name))
            return mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                          "deepseek_v3: %s: attention biases (attention_bias = true) "
                          "are not supported", name);
    }
    return MF_OK;
}

static int bind_attention(const mf_model *m, struct ds_layer *L, const struct ds_hparams *hp,
                          int il, char *err, size_t errlen) {
    int64_t H = hp->num_attention_heads, hid = hp->hidden_size;
    struct mf_weight q_b;
    int rc = refuse_biases(m, il, err, errlen);
    if (rc) return rc;
    if (hp->q_lora_rank > 0) {
        rc = mf_bind_lin_at(m, &L->q_a_proj, 0, hp->q_lora_rank, hid, err, errlen,
                            "model.layers.%d.self_attn.q_a_proj", il);
        if (!rc) rc = mf_bind_vec_at(m, &L->q_a_layernorm, hp->q_lora_rank, err, errlen,
                                     "model.layers.%d.self_attn.q_a_layernorm.weight", il);
        if (!rc) rc = mf_bind_lin_at(m, &q_b, 0, H * hp->q_head_dim, hp->q_lora_rank,
                                     err, errlen, "model.layers.%d.self_attn.q_b_proj", il);
    } else {
        rc = mf_bind_lin_at(m, &q_b, 0, H * hp->q_head_dim, hid, err, errlen,
                            "model.layers.%d.self_attn.q_proj", il);
    }
    if (rc) return rc;
    // Per head [nope | rope] rows: two per-head products put q_nope in its own buffer
    // and q_pe straight into its place in qfull (see mla_forward).
    L->q_nope = (struct ds_heads){rows_view(&q_b, 0, hp->qk_nope_head_dim),
                                  hp->q_head_dim, 0};
    L->q_pe = (struct ds_heads){rows_view(&q_b, hp->qk_nope_head_dim,
                                          hp->qk_rope_head_dim), hp->q_head_dim, 0};
    if (!rc) rc = mf_bind_lin_at(m, &L->kv_a_proj_with_mqa, 0, hp->kv_row, hid, err, errlen,
                                 "model.layers.%d.self_attn.kv_a_proj_with_mqa", il);
    if (!rc) rc = mf_bind_vec_at(m, &L->kv_a_layernorm, hp->kv_lora_rank, err, errlen,
                                 "model.layers.%d.self_attn.kv_a_layernorm.weight", il);
    if (!rc) rc = mf_bind_lin_at(m, &L->o_proj, 0, hid, H * hp->v_head_dim, err, errlen,
                                 "model.layers.%d.self_attn.o_proj", il);
    if (!rc) rc = bind_absorption(m, L, hp, il, err, errlen);
    return rc;
}

static int bind_ffn(mf_model *m, struct ds_layer *L, const struct ds_hparams *hp,
                    int il, char *err, size_t errlen) {
    char prefix[256];
    int hid = hp->hidden_size;
    if (!L->is_moe) {
        snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", il);
        return mf_ffn_bind(m, &L->ffn, prefix, hid, hp->intermediate_size, err, errlen);
    }
    return mf_bind_noaux_moe(m, &L->moe, &hp->moe, il, err, errlen);
}

static void ds_unbind(mf_model *m) {
    struct ds_model *M = m->arch_weights;
    if (!M) return;
    free(M->layers);
    free(M->hp.inv_freq);
    free(M);
    m->arch_weights = NULL;
}

static int ds_bind(mf_model *m, char *err, size_t errlen) {
    const struct mf_config *c = &m->cfg;
    int rc = check_config(c, err, errlen);
    if (!rc) rc = check_rope_type(m, err, errlen);
    if (rc) return rc;
    struct ds_model *M = calloc(1, sizeof *M);
    if (!M) return mf_err(err, errlen, MF_ERR_NOMEM, "deepseek_v3: out of memory");
    m->arch_weights = M;
    struct ds_hparams *hp = &M->hp;
    fill_hparams(hp, c);
    hp->inv_freq = calloc((size_t)hp->qk_rope_head_dim / 2, sizeof(float));
    M->layers = calloc((size_t)hp->num_hidden_layers, sizeof *M->layers);
    if (!hp->inv_freq || !M->layers) {
        ds_unbind(m);
        return mf_err(err, errlen, MF_ERR_NOMEM, "deepseek_v3: out of memory");
    }
    rope_inv_freq(hp->inv_freq, c, hp->qk_rope_head_dim);

    rc = mf_bind_linear(m, &M->embed_tokens, "model.embed_tokens", 0, hp->vocab_size,
                        hp->hidden_size, err, errlen);
    if (!rc) rc = mf_bind_vector(m, &M->norm, "model.norm.weight", hp->hidden_size,
                                 err, errlen);
    // mlx-lm never ties the DeepSeek head (deepseek_v3.Model has its own lm_head).
    if (!rc) rc = mf_bind_linear(m, &M->lm_head, "lm_head", 0, hp->vocab_size,
                                 hp->hidden_size, err, errlen);
    for (int il = 0; !rc && il < hp->num_hidden_layers; il++) {
        struct ds_layer *L = &M->layers[il];
        L->is_moe = c->layer_is_moe[il];
        rc = mf_bind_vec_at(m, &L->input_layernorm, hp->hidden_size, err, errlen,
                            "model.layers.%d.input_layernorm.weight", il);
        if (!rc) rc = mf_bind_vec_at(m, &L->post_attention_layernorm, hp->hidden_size, err,
                                     errlen, "model.layers.%d.post_attention_layernorm.weight", il);
        if (!rc) rc = bind_attention(m, L, hp, il, err, errlen);
        if (!rc) rc = bind_ffn(m, L, hp, il, err, errlen);
    }
    if (rc) ds_unbind(m);
    return rc;
}

/* ==== State: compressed cache and scratch ==== */

static void ds_state_free(mf_ctx *ctx) {
    struct ds_state *s = ctx->arch_state;
    if (!s) return;
    const struct ds_model *M = ctx->model->arch_weights;
    const struct mf_backend_ops *op = ctx->be->ops;
    if (s->latent)
        for (int il = 0; il < M->hp.num_hidden_layers; il++)
            if (s->latent[il]) op->dealloc(ctx->ex, s->latent[il]);
    float *bufs[] = {s->inv_freq, s->qa, s->q_nope, s->ckv, s->qfull, s->lat_out,
                     s->o_in};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) op->dealloc(ctx->ex, bufs[i]);
    mf_decoder_free(ctx, &s->dec);
    free(s->latent);
    free(s);
    ctx->arch_state = NULL;
}

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static int ds_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct ds_model *M = ctx->model->arch_weights;
    const struct ds_hparams *hp = &M->hp;
    struct ds_state *s = calloc(1, sizeof *s);
    if (!s) return mf_err(err, errlen, MF_ERR_NOMEM, "deepseek_v3: out of memory");
    ctx->arch_state = s;
    const int chunk = mf_decoder_chunk(ctx, DS_MAX_CHUNK);
    size_t T = (size_t)(ctx->n_ctx < chunk ? ctx->n_ctx : chunk);
    size_t H = (size_t)hp->num_attention_heads, kvl = (size_t)hp->kv_lora_rank;
    int fail = 0;
    s->latent = calloc((size_t)hp->num_hidden_layers, sizeof *s->latent);
    if (!s->latent) fail = 1;
    for (int il = 0; !fail && il < hp->num_hidden_layers; il++)
        s->latent[il] = mf_dev_floats(ctx, (size_t)ctx->n_ctx * (size_t)hp->kv_row, &fail);
    s->inv_freq = mf_dev_floats(ctx, (size_t)hp->qk_rope_head_dim / 2, &fail);
    s->qa = mf_dev_floats(ctx, T * (size_t)hp->q_lora_rank, &fail);
    s->q_nope = mf_dev_floats(ctx, T * H * (size_t)hp->qk_nope_head_dim, &fail);
    s->ckv = mf_dev_floats(ctx, T * (size_t)hp->kv_row, &fail);
    s->qfull = mf_dev_floats(ctx, T * H * (size_t)hp->kv_row, &fail);
    s->lat_out = mf_dev_floats(ctx, T * H * kvl, &fail);
    s->o_in = mf_dev_floats(ctx, T * H * (size_t)hp->v_head_dim, &fail);
    if (fail) {
        ds_state_free(ctx);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "deepseek_v3: out of memory for the MLA cache of %d positions "
                      "and scratch of %zu tokens", ctx->n_ctx, T);
    }
    ctx->be->ops->upload(ctx->ex, s->inv_freq, 0, hp->inv_freq,
                         (size_t)hp->qk_rope_head_dim / 2 * sizeof(float));
    s->dec = (struct mf_decoder){
        .max_tok = (int)T, .embed = &M->embed_tokens, .norm = &M->norm,
        .head = &M->lm_head, .moe_cfg = &hp->moe, .layer = layer_forward,
    };
    int rc = mf_decoder_alloc(ctx, &s->dec, "deepseek_v3", err, errlen);
    if (rc) ds_state_free(ctx);
    return rc;
}

static void ds_state_reset(mf_ctx *ctx) {
    struct ds_state *s = ctx->arch_state;
    const struct ds_model *M = ctx->model->arch_weights;
    size_t bytes = (size_t)ctx->n_ctx * (size_t)M->hp.kv_row * sizeof(float);
    for (int il = 0; il < M->hp.num_hidden_layers; il++)
        ctx->be->ops->zero(ctx->ex, s->latent[il], 0, bytes);
}

// One MF_SEG_MLA_LATENT per layer: (kv_lora + rope) f32 per position, nothing fixed,
// so truncation is exact by construction.
static int ds_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    const struct ds_state *s = ctx->arch_state;
    const struct ds_model *M = ctx->model->arch_weights;
    int n = M->hp.num_hidden_layers;
    for (int il = 0; il < n && il < cap; il++) {
        segs[il] = (struct mf_state_seg){
            .buf = s->latent[il],
            .row_bytes = (uint64_t)M->hp.kv_row * sizeof(float),
            .fixed_bytes = 0,
            .layer = il,
            .kind = MF_SEG_MLA_LATENT,
        };
    }
    return n;
}

/* ==== Blocks: multi-head latent attention ==== */

// y[t, h] = W_h x[t, h] for every head in one backend call; strides in floats.
static void heads_mul(mf_ctx *ctx, float *y, int y_tok_stride, int y_head_stride,
                      const struct ds_heads *w, const float *x, int x_tok_stride,
                      int x_head_stride, int n, int H) {
    ctx->be->ops->matmul_heads(ctx->ex, y, y_tok_stride, y_head_stride, &w->w,
                               w->head_rows, w->transposed, x, x_tok_stride,
                               x_head_stride, n, H);
}

// x[n, hidden] += MLA(RMSNorm(x) * input_layernorm), x the decoder's (its y the output
// projection's scratch), for tokens at positions pos0 .. pos0+n-1; writes their cache
// rows of layer il. Each
// per-head step is one matmul_heads call over all heads (a per-head loop of small ops
// costs a pool hand-off each: ~50k per token at 128 heads x 61 layers).
static void mla_forward(mf_ctx *ctx, struct ds_state *s, const struct ds_hparams *hp,
                        const struct ds_layer *L, int il, int n, int pos0) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_exec *ex = ctx->ex;
    const int H = hp->num_attention_heads, nope = hp->qk_nope_head_dim;
    const int rope = hp->qk_rope_head_dim, kvl = hp->kv_lora_rank, vd = hp->v_head_dim;
    const int kvr = hp->kv_row;
    const float *xq = s->dec.xn;   // input of the per-head query projections
    int xq_width = hp->hidden_size;

    // The input norm, then [n, hidden] -> [n, q_lora] and the compressed kv [n, kv_lora
    // | rope] in one call, which may take the norm inside its products; without a
    // q_lora the query heads read the normalised x.
    if (hp->q_lora_rank > 0) {
        float *const ya[2] = {s->qa, s->ckv};
        const struct mf_weight *const wa[2] = {&L->q_a_proj, &L->kv_a_proj_with_mqa};
        mf_rms_matmul_multi(op, ex, 2, ya, wa, s->dec.xn, s->dec.x, &L->input_layernorm,
                            hp->rms_norm_eps, n);
        op->rmsnorm(ex, s->qa, s->qa, &L->q_a_layernorm, n, hp->q_lora_rank,
                    DS_LORA_NORM_EPS, 1.0f);
        xq = s->qa;
        xq_width = hp->q_lora_rank;
    } else {
        op->rmsnorm(ex, s->dec.xn, s->dec.x, &L->input_layernorm, n, hp->hidden_size,
                    hp->rms_norm_eps, 1.0f);
        op->matmul(ex, s->ckv, &L->kv_a_proj_with_mqa, s->dec.xn, n);
    }
    // Queries -> q_nope [n, H, nope] and q_pe, which is written straight into its place
    // in qfull [n, H, kv_lora | rope].
    heads_mul(ctx, s->q_nope, H * nope, nope, &L->q_nope, xq, xq_width, 0, n, H);
    heads_mul(ctx, s->qfull + kvl, H * kvr, kvr, &L->q_pe, xq, xq_width, 0, n, H);

    // The latent is normalised, the shared rope key roped, and both rows go to the
    // cache as they are.
    op->rmsnorm_heads(ex, s->ckv, s->ckv, &L->kv_a_layernorm, n, kvr, 1, kvl, kvl,
                      DS_LORA_NORM_EPS, 1.0f);
    // Interleaved pairs (mlx traditional=True) for q_pe and k_pe alike, in one call.
    struct mf_rope_qk r = {.x = {s->qfull + kvl, s->ckv + kvl}, .heads = {H, 1},
                           .tok_stride = {H * kvr, kvr}, .head_stride = {kvr, kvr},
                           .n_tok = n, .head_dim = rope, .n_rot = rope, .pos0 = pos0,
                           .traditional = 1, .mscale = hp->rope_mscale,
                           .inv_freq = s->inv_freq};
    mf_rope_qk(op, ex, &r);
    MF_TAP(ctx, "model.layers.%d.self_attn.kv_latent", il, s->ckv, n * kvr);
    float *cache = s->latent[il];
    op->copy(ex, cache, (size_t)pos0 * kvr * sizeof(float), s->ckv, 0,
             (size_t)n * kvr * sizeof(float));

    // Absorbed queries: qfull[t, h, :kv_lora] = W_UK^h^T q_nope[t, h].
    heads_mul(ctx, s->qfull, H * kvr, kvr, &L->w_uk, s->q_nope, H * nope, nope, n, H);

    // One kv head: K rows are the whole cache rows (c | k_pe), V rows their first
    // kv_lora floats (c). lat_out[n, H, kv_lora].
    op->attention(ex, s->lat_out, s->qfull, cache, cache, n, H, 1, kvr, kvl, kvr, kvr,
                  pos0, hp->softmax_scale);
    MF_TAP(ctx, "model.layers.%d.self_attn.sdpa", il, s->lat_out, n * H * kvl);

    // Back from latent space: o_in[t, h] = W_UV^h lat_out[t, h], [n, H, v].
    heads_mul(ctx, s->o_in, H * vd, vd, &L->w_uv, s->lat_out, H * kvl, kvl, n, H);
    // (named for what it is, not mlx-lm's unembed_out module, whose output is this only
    // on its absorbed L == 1 path: prefill applies it to the latent keys' values)
    MF_TAP(ctx, "model.layers.%d.self_attn.o_proj_input", il, s->o_in, n * H * vd);
    // x += o_proj(o_in), dec.y the product's scratch
    mf_matmul_add(op, ex, s->dec.x, &L->o_proj, s->o_in, n, s->dec.y);
}

/* ==== Forward ==== */

// One decoder layer on the chunk in dec.x (updated in place): the MLA half, then the
// shared FFN half (models/decoder.c).
static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct ds_state *s = ctx->arch_state;
    const struct ds_model *M = ctx->model->arch_weights;
    const struct ds_hparams *hp = &M->hp;
    const struct ds_layer *L = &M->layers[il];
    (void)first_chunk;  // no recurrent state: every chunk starts alike

    mla_forward(ctx, s, hp, L, il, n, pos0);
    MF_TAP(ctx, "model.layers.%d.self_attn", il, s->dec.y, n * hp->hidden_size);
    return mf_decoder_ffn(ctx, &s->dec, NULL, &L->post_attention_layernorm, L->is_moe,
                          &L->moe, &L->ffn, il, n);
}

static int ds_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                      int all_logits) {
    struct ds_state *s = ctx->arch_state;
    return mf_decoder_run(ctx, &s->dec, tokens, n_tok, logits, all_logits);
}

/* ==== Registration ==== */

static const char *const ds_expert_components[] = {"gate_proj", "up_proj", "down_proj",
                                                  NULL};

const struct mf_arch mf_arch_deepseek_v3 = {
    .model_type = "deepseek_v3",
    // mlx-lm MODEL_REMAPPING runs Kimi-K2 checkpoints as deepseek_v3.
    .alias = "kimi_k2",
    .id = MF_ARCH_DEEPSEEK_V3,
    .experts_key = "n_routed_experts",
    .no_head_dim = 1,
    .norm_topk_default = 1,
    .read_config = ds_read_config,
    .free_config = free,
    .ident = ds_ident,
    .router = MF_ROUTER_NOAUX_TC,
    .expert_components = ds_expert_components,
    .bind = ds_bind,
    .unbind = ds_unbind,
    .state_new = ds_state_new,
    .state_free = ds_state_free,
    .state_reset = ds_state_reset,
    .forward = ds_forward,
    .state_segments = ds_state_segments,
};
