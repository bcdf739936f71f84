/*
 * qwen3_next.c — the hybrid decoder of qwen3_5_moe (Qwen3.5 / Qwen3.6 MoE) and
 * qwen3_next (Qwen3-Next): GatedDeltaNet linear-attention layers interleaved with
 * gated full-attention layers (every full_attention_interval-th layer), each followed
 * by a routed MoE FFN with a gated shared expert (or, for qwen3_next mlp_only_layers,
 * a dense SwiGLU). Math: spec/model-math.md §2; oracle: mlx-lm qwen3_next.py /
 * qwen3_5.py in float32.
 *
 * The two families differ only in how the GatedDeltaNet input projections are laid
 * out (qwen3_5: split in_proj_qkv/z/b/a; qwen3_next: fused in_proj_qkvz/ba grouped by
 * key head), in the tensor-name prefix and in which layers are dense. All of that is
 * resolved once, at bind: each projection carries either a destination buffer it
 * writes straight into, or a list of column segments that scatter its output into
 * the canonical [q|k|v], z, b, a buffers. The forward never asks which family it runs.
 *
 * Owns: config-derived dims, weight binding, the sequence state (KV caches of the
 * attention layers; conv history and delta-rule state of the linear layers, double
 * buffered so a failed or aborted eval leaves the committed state untouched), the
 * blocks and the forward. Does not own: the MoE block (moe.c), the arithmetic
 * (backend op table), file formats (core/, io/).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/json.h"
#include "models/decoder.h"
#include "models/moe.h"
#include "models/qwen3_next.h"

// Tokens per forward chunk: scratch is sized for this; longer evals run in chunks.
// 64 keeps prefill scratch small while each chunk still reads every needed expert
// once for 64 tokens.
#define HY_MAX_TOK 64

/* ==== Config and derived dims ====
 * Names follow config.json (model-math §2.1). r = nv / nk v-heads share a key head. */

struct hy_dims {
    int n_layer, n_embd, n_vocab;
    int n_head, n_head_kv, head_dim, n_rot;   // gated attention
    float eps, attn_scale;
    double rope_theta;
    int nk, nv, dk, dv, conv_K;               // GatedDeltaNet
    int key_dim, value_dim, conv_dim;         // nk*dk, nv*dv, 2*key_dim + value_dim
    int n_ff_dense;                           // intermediate_size (dense layers)
    int has_dense, has_linear;
};

/* ==== Per-layer weights ====
 * A GatedDeltaNet input projection writes into the canonical buffers below. The
 * split layout (qwen3_5) maps each projection onto one buffer; the grouped layout
 * (qwen3_next, §2.5: qkvz viewed as [nk, 2dk + 2r*dv], ba as [nk, 2r]) scatters
 * column segments of each token's output. */

enum hy_dst { DST_QKV = 0, DST_Z = 1, DST_B = 2, DST_A = 3, N_DST = 4 };

struct gdn_seg {
    int src_col, dst, dst_col, len;   // floats
};

struct gdn_proj {
    struct mf_weight w;
    int dst;              // enum hy_dst when written directly, -1 when segmented
    int seg0, n_seg;      // segments in hy_model.segs
};

struct hy_layer {
    int is_linear, is_moe;
    struct mf_weight attn_norm;   // input_layernorm [n_embd] (already 1+w in MLX files)
    struct mf_weight ffn_norm;    // post_attention_layernorm [n_embd]
    // gated full attention
    struct mf_weight wq;          // q_proj [n_head * 2 * head_dim, n_embd]: per head q | gate
    struct mf_weight wk, wv;      // [n_head_kv * head_dim, n_embd]
    struct mf_weight wo;          // [n_embd, n_head * head_dim]
    struct mf_weight q_norm, k_norm;   // [head_dim]
    // GatedDeltaNet
    int n_proj;
    struct gdn_proj proj[4];
    struct mf_weight conv1d;      // [conv_dim, K] (checkpoint [conv_dim, K, 1])
    struct mf_weight A_log, dt_bias;   // [nv]
    struct mf_weight gdn_norm;    // linear_attn.norm [dv], plain gain shared by heads
    struct mf_weight out_proj;    // [n_embd, value_dim]
    // FFN
    struct mf_moe_layer moe;
    struct mf_ffn_layer ffn;
};

struct hy_model {
    struct hy_dims d;
    struct mf_moe_config moe_cfg;
    struct mf_weight embed;       // embed_tokens [n_vocab, n_embd]
    struct mf_weight norm;        // model.norm [n_embd]
    struct mf_weight head;        // lm_head [n_vocab, n_embd] (= embed when tied)
    struct hy_layer *layers;      // [n_layer]
    int n_seg;
    struct gdn_seg *segs;         // grouped-layout segments shared by all layers
    int raw_width;                // floats per token of segmented projection outputs
};

/* ==== Sequence state and scratch ====
 * Committed state: kc/vc [n_ctx, n_head_kv, head_dim] f32 per attention layer;
 * conv[cur] [K-1, conv_dim] and rec[cur] [nv, dv, dk] f32 per linear layer. An eval
 * reads conv[cur]/rec[cur] on its first chunk and writes the other buffer (out of
 * place, no copy), works there, and flips cur only when it succeeds. KV rows written past n_past by a failed eval
 * are never read (the next eval overwrites them). */

struct hy_state {
    struct mf_decoder dec;        // residual stream, block output, logits, chunk loop
    int cur;                      // index of the committed linear-state buffers
    float **kc, **vc;             // [n_layer], NULL for linear layers
    float **conv[2], **rec[2];    // [n_layer], NULL for attention layers
    float *inv_freq;              // [n_rot / 2] rope frequencies
    int32_t *q_rows;              // host [max_tok * n_head]: row 2i of q_proj output
    // Grouped layout: per destination buffer, the source row (of seg_unit floats) in
    // raw of each of its rows of seg_unit floats, for max_tok tokens; NULL when no
    // segment writes that buffer. One gather_rows per buffer then moves a whole chunk.
    int32_t *seg_rows[N_DST];     // host [max_tok * width / seg_unit]
    int32_t *q_rows_dev;          // device copies of the tables, for gather_rows_dev
    int32_t *seg_rows_dev[N_DST];
    int seg_unit[N_DST];
    // scratch [max_tok, ...]
    float *qg;                    // [n_head, 2, head_dim]
    float *q;                     // [n_head, head_dim]
    float *att;                   // [n_head, head_dim]
    float *buf[N_DST];            // qkv [conv_dim], z [value_dim], b [nv], a [nv]
    float *raw;                   // [raw_width]
    float *conv_out;              // [conv_dim]
    float *g, *beta;              // [nv]
    float *o;                     // [nv, dv]
};

static size_t conv_bytes(const struct hy_dims *d) {
    return (size_t)(d->conv_K - 1) * (size_t)d->conv_dim * sizeof(float);
}

static size_t rec_bytes(const struct hy_dims *d) {
    return (size_t)d->nv * (size_t)d->dv * (size_t)d->dk * sizeof(float);
}

static size_t kv_row_bytes(const struct hy_dims *d) {
    return (size_t)d->n_head_kv * (size_t)d->head_dim * sizeof(float);
}

/* ==== Bind ====
 * Every tensor is resolved and shape-checked here; messages name the tensor. */

static int dims_from_config(struct hy_dims *d, const struct mf_config *c, char *err,
                            size_t errlen) {
    memset(d, 0, sizeof *d);
    d->n_layer = c->num_hidden_layers;
    d->n_embd = c->hidden_size;
    d->n_vocab = c->vocab_size;
    d->n_head = c->num_attention_heads;
    d->n_head_kv = c->num_key_value_heads;
    d->head_dim = c->head_dim;
    d->n_rot = (int)(c->head_dim * c->partial_rotary_factor);
    d->eps = c->rms_norm_eps;
    d->attn_scale = 1.0f / sqrtf((float)c->head_dim);
    d->rope_theta = c->rope_theta;
    const struct qwen3_next_config *qc = c->arch_cfg;
    d->nk = qc->linear_num_key_heads;
    d->nv = qc->linear_num_value_heads;
    d->dk = qc->linear_key_head_dim;
    d->dv = qc->linear_value_head_dim;
    d->conv_K = qc->linear_conv_kernel_dim;
    d->key_dim = d->nk * d->dk;
    d->value_dim = d->nv * d->dv;
    d->conv_dim = 2 * d->key_dim + d->value_dim;
    d->n_ff_dense = c->intermediate_size;
    for (int il = 0; il < d->n_layer; il++) {
        d->has_linear |= c->layer_is_linear[il];
        d->has_dense |= !c->layer_is_moe[il];
    }
    if (d->n_layer < 1 || d->n_embd < 1 || d->n_vocab < 1 || d->n_head < 1 ||
        d->n_head_kv < 1 || d->n_head % d->n_head_kv || d->head_dim < 2 ||
        d->n_rot < 0 || d->n_rot > d->head_dim || d->n_rot % 2)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: bad attention dims (hidden_size %d, layers %d, vocab "
                      "%d, heads %d / kv heads %d, head_dim %d, rotary dims %d)",
                      d->n_embd, d->n_layer, d->n_vocab, d->n_head, d->n_head_kv,
                      d->head_dim, d->n_rot);
    if (d->has_linear && (d->nk < 1 || d->nv < 1 || d->nv % d->nk || d->dk < 1 ||
                          d->dv < 1 || d->conv_K < 1))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: bad linear-attention dims (linear_num_key_heads %d, "
                      "linear_num_value_heads %d must be a multiple of it, "
                      "linear_key_head_dim %d, linear_value_head_dim %d, "
                      "linear_conv_kernel_dim %d)", d->nk, d->nv, d->dk, d->dv,
                      d->conv_K);
    if (d->has_dense && d->n_ff_dense < 1)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "config.json: dense FFN layers need intermediate_size (got %d)",
                      d->n_ff_dense);
    return MF_OK;
}

// Only plain rope is implemented. mlx-lm would apply any other scaling it finds
// (qwen3_5: rope_parameters doubles as rope_scaling; qwen3_next: rope_scaling), so a
// config asking for one is refused rather than silently computed differently. No
// released Qwen3.5/3.6/Next config uses one.
static int check_rope_type(const mf_model *m, char *err, size_t errlen) {
    const char *text = m->cfg.json_text;
    if (!text)
        return MF_OK;
    mf_json_doc *doc = NULL;
    int rc = mf_json_parse(&doc, text, strlen(text), "config.json", err, errlen);
    if (rc != MF_OK)
        return rc;
    const mf_json *root = mf_json_root(doc), *lm = mf_json_get(root, "text_config");
    if (!lm || lm->type != MF_JSON_OBJECT)
        lm = root;
    static const char *const keys[2] = {"rope_parameters", "rope_scaling"};
    for (int i = 0; i < 2 && rc == MF_OK; i++) {
        const mf_json *rs = mf_json_get(lm, keys[i]);
        const char *type = NULL;
        if (!rs || rs->type != MF_JSON_OBJECT)
            continue;
        if (mf_json_get_str(rs, "type", &type) <= 0)
            mf_json_get_str(rs, "rope_type", &type);
        if (type && strcmp(type, "default") != 0)
            rc = mf_err(err, errlen, MF_ERR_UNSUPPORTED,
                        "config.json: %s type \"%s\" is not supported for %s (only "
                        "\"default\" rope)", keys[i], type, m->cfg.model_type);
    }
    mf_json_free(doc);
    return rc;
}

struct binder {
    const mf_model *m;
    const char *pfx;      // "" or "language_model." when prep kept the prefix
    char *err;
    size_t errlen;
};

static int bind_lin(struct binder *b, struct mf_weight *w, int il, const char *what,
                    int64_t n_out, int64_t n_in) {
    char path[256];
    if (il >= 0)
        snprintf(path, sizeof path, "%smodel.layers.%d.%s", b->pfx, il, what);
    else
        snprintf(path, sizeof path, "%s%s", b->pfx, what);
    return mf_bind_linear(b->m, w, path, 0, n_out, n_in, b->err, b->errlen);
}

static int bind_vec(struct binder *b, struct mf_weight *w, int il, const char *what,
                    int64_t n) {
    char name[256];
    if (il >= 0)
        snprintf(name, sizeof name, "%smodel.layers.%d.%s", b->pfx, il, what);
    else
        snprintf(name, sizeof name, "%s%s", b->pfx, what);
    int rc = mf_bind_vector(b->m, w, name, n, b->err, b->errlen);
    if (rc == MF_OK) {
        w->n_out = 1;
        w->n_in = n;
    }
    return rc;
}

static int has_layer_tensor(struct binder *b, int il, const char *what) {
    char name[256];
    snprintf(name, sizeof name, "%smodel.layers.%d.%s", b->pfx, il, what);
    return mf_has_tensor(b->m, name);
}

static int bind_attention(struct binder *b, const struct hy_dims *d, struct hy_layer *L,
                          int il) {
    int64_t hd = d->head_dim, E = d->n_embd;
    // attention_bias is false in every released config; biases would be ignored
    // silently by the matmuls, so refuse them.
    if (has_layer_tensor(b, il, "self_attn.q_proj.bias") ||
        has_layer_tensor(b, il, "self_attn.o_proj.bias"))
        return mf_err(b->err, b->errlen, MF_ERR_UNSUPPORTED,
                      "%smodel.layers.%d.self_attn: projection biases "
                      "(attention_bias = true) are not supported", b->pfx, il);
    int rc = bind_lin(b, &L->wq, il, "self_attn.q_proj", 2 * d->n_head * hd, E);
    if (rc == MF_OK)
        rc = bind_lin(b, &L->wk, il, "self_attn.k_proj", d->n_head_kv * hd, E);
    if (rc == MF_OK)
        rc = bind_lin(b, &L->wv, il, "self_attn.v_proj", d->n_head_kv * hd, E);
    if (rc == MF_OK)
        rc = bind_lin(b, &L->wo, il, "self_attn.o_proj", E, d->n_head * hd);
    if (rc == MF_OK)
        rc = bind_vec(b, &L->q_norm, il, "self_attn.q_norm.weight", hd);
    if (rc == MF_OK)
        rc = bind_vec(b, &L->k_norm, il, "self_attn.k_norm.weight", hd);
    return rc;
}

// The grouped (qwen3_next) layout as segments, made once per model: per key head g
// the qkvz row block is q(dk) | k(dk) | v(r*dv) | z(r*dv) and the ba block b(r) | a(r);
// q/k/v land head-major in the conv input, z/b/a head-major in theirs (§2.5).
static int make_grouped_segments(struct hy_model *hm) {
    const struct hy_dims *d = &hm->d;
    int nk = d->nk, dk = d->dk, r = d->nv / d->nk, rdv = r * d->dv;
    hm->segs = calloc((size_t)nk * 6, sizeof *hm->segs);
    if (!hm->segs)
        return MF_ERR_NOMEM;
    int wg = 2 * dk + 2 * rdv, n = 0;
    for (int g = 0; g < nk; g++) {   // in_proj_qkvz
        hm->segs[n++] = (struct gdn_seg){g * wg, DST_QKV, g * dk, dk};
        hm->segs[n++] = (struct gdn_seg){g * wg + dk, DST_QKV, d->key_dim + g * dk, dk};
        hm->segs[n++] = (struct gdn_seg){g * wg + 2 * dk, DST_QKV, 2 * d->key_dim + g * rdv,
                                         rdv};
        hm->segs[n++] = (struct gdn_seg){g * wg + 2 * dk + rdv, DST_Z, g * rdv, rdv};
    }
    for (int g = 0; g < nk; g++) {   // in_proj_ba
        hm->segs[n++] = (struct gdn_seg){g * 2 * r, DST_B, g * r, r};
        hm->segs[n++] = (struct gdn_seg){g * 2 * r + r, DST_A, g * r, r};
    }
    hm->n_seg = n;
    hm->raw_width = 2 * d->key_dim + 2 * d->value_dim + 2 * d->nv;
    return MF_OK;
}

static int bind_gdn_proj(struct binder *b, struct hy_model *hm, struct hy_layer *L,
                         int il) {
    const struct hy_dims *d = &hm->d;
    int64_t E = d->n_embd;
    int rc;
    if (has_layer_tensor(b, il, "linear_attn.in_proj_qkvz.weight")) {
        if (!hm->segs && (rc = make_grouped_segments(hm)) != MF_OK)
            return mf_err(b->err, b->errlen, rc, "out of memory");
        L->n_proj = 2;
        L->proj[0] = (struct gdn_proj){.dst = -1, .seg0 = 0, .n_seg = 4 * d->nk};
        L->proj[1] = (struct gdn_proj){.dst = -1, .seg0 = 4 * d->nk, .n_seg = 2 * d->nk};
        rc = bind_lin(b, &L->proj[0].w, il, "linear_attn.in_proj_qkvz",
                      2 * d->key_dim + 2 * d->value_dim, E);
        if (rc == MF_OK)
            rc = bind_lin(b, &L->proj[1].w, il, "linear_attn.in_proj_ba", 2 * d->nv, E);
        return rc;
    }
    static const char *const names[4] = {"linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                                         "linear_attn.in_proj_b", "linear_attn.in_proj_a"};
    int64_t n_out[4] = {d->conv_dim, d->value_dim, d->nv, d->nv};
    L->n_proj = 4;
    for (int p = 0; p < 4; p++) {
        L->proj[p] = (struct gdn_proj){.dst = p, .seg0 = 0, .n_seg = 0};
        rc = bind_lin(b, &L->proj[p].w, il, names[p], n_out[p], E);
        if (rc != MF_OK)
            return rc;
    }
    return MF_OK;
}

// conv1d weight must be in MLX layout [C, K, 1]; a raw HF [C, 1, K] tensor means the
// checkpoint never went through mlx-lm's sanitize (so its norms also lack the +1).
static int check_conv_layout(struct binder *b, const struct hy_dims *d, int il) {
    char name[256];
    snprintf(name, sizeof name, "%smodel.layers.%d.linear_attn.conv1d.weight", b->pfx, il);
    const struct mf_tensor_info *t = mf_manifest_find(&b->m->manifest, name);
    if (t && t->ndim == 3 && d->conv_K > 1 && t->shape[1] == 1 && t->shape[2] == d->conv_K)
        return mf_err(b->err, b->errlen, MF_ERR_FORMAT,
                      "%s: shape [%lld, 1, %lld] is the raw Hugging Face layout; expected "
                      "the MLX layout [%d, %d, 1] (convert the checkpoint with mlx-lm "
                      "first)", name, (long long)t->shape[0], (long long)t->shape[2],
                      d->conv_dim, d->conv_K);
    return MF_OK;
}

static int bind_gdn(struct binder *b, struct hy_model *hm, struct hy_layer *L, int il) {
    const struct hy_dims *d = &hm->d;
    int rc = bind_gdn_proj(b, hm, L, il);
    if (rc == MF_OK)
        rc = check_conv_layout(b, d, il);
    if (rc == MF_OK)
        rc = bind_vec(b, &L->conv1d, il, "linear_attn.conv1d.weight",
                      (int64_t)d->conv_dim * d->conv_K);
    L->conv1d.n_out = d->conv_dim;
    L->conv1d.n_in = d->conv_K;
    if (rc == MF_OK)
        rc = bind_vec(b, &L->A_log, il, "linear_attn.A_log", d->nv);
    if (rc == MF_OK)
        rc = bind_vec(b, &L->dt_bias, il, "linear_attn.dt_bias", d->nv);
    if (rc == MF_OK)
        rc = bind_vec(b, &L->gdn_norm, il, "linear_attn.norm.weight", d->dv);
    if (rc == MF_OK)
        rc = bind_lin(b, &L->out_proj, il, "linear_attn.out_proj", d->n_embd, d->value_dim);
    return rc;
}

static int bind_ffn(struct binder *b, const struct hy_model *hm, struct hy_layer *L,
                    int il) {
    const struct hy_dims *d = &hm->d;
    char prefix[256];
    if (!L->is_moe) {
        snprintf(prefix, sizeof prefix, "%smodel.layers.%d.mlp", b->pfx, il);
        return mf_ffn_bind(b->m, &L->ffn, prefix, d->n_embd, d->n_ff_dense, b->err,
                           b->errlen);
    }
    struct mf_moe_layer *w = &L->moe;
    w->il = il;
    int rc = bind_lin(b, &w->router, il, "mlp.gate", hm->moe_cfg.n_expert, d->n_embd);
    if (rc != MF_OK || hm->moe_cfg.n_ff_shexp <= 0)
        return rc;
    w->has_shared = 1;
    snprintf(prefix, sizeof prefix, "%smodel.layers.%d.mlp.shared_expert", b->pfx, il);
    struct mf_ffn_layer sh;
    rc = mf_ffn_bind(b->m, &sh, prefix, d->n_embd, hm->moe_cfg.n_ff_shexp, b->err,
                     b->errlen);
    if (rc != MF_OK)
        return rc;
    w->shared_gate = sh.gate;
    w->shared_up = sh.up;
    w->shared_down = sh.down;
    if (!has_layer_tensor(b, il, "mlp.shared_expert_gate.weight"))
        return MF_OK;
    w->has_shared_gate = 1;
    return bind_lin(b, &w->shared_expert_gate, il, "mlp.shared_expert_gate", 1, d->n_embd);
}

static int bind_layer(struct binder *b, struct hy_model *hm, int il) {
    const struct mf_config *c = &b->m->cfg;
    struct hy_layer *L = &hm->layers[il];
    L->is_linear = c->layer_is_linear[il];
    L->is_moe = c->layer_is_moe[il];
    int rc = bind_vec(b, &L->attn_norm, il, "input_layernorm.weight", hm->d.n_embd);
    if (rc == MF_OK)
        rc = bind_vec(b, &L->ffn_norm, il, "post_attention_layernorm.weight", hm->d.n_embd);
    if (rc == MF_OK)
        rc = L->is_linear ? bind_gdn(b, hm, L, il) : bind_attention(b, &hm->d, L, il);
    if (rc == MF_OK)
        rc = bind_ffn(b, hm, L, il);
    return rc;
}

static void hy_unbind(mf_model *m) {
    struct hy_model *hm = m->arch_weights;
    if (!hm)
        return;
    free(hm->layers);
    free(hm->segs);
    free(hm);
    m->arch_weights = NULL;
}

static int hy_bind(mf_model *m, char *err, size_t errlen) {
    const struct mf_config *c = &m->cfg;
    struct hy_model *hm = calloc(1, sizeof *hm);
    if (!hm)
        return mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    m->arch_weights = hm;
    int rc = dims_from_config(&hm->d, c, err, errlen);
    if (rc == MF_OK)
        rc = check_rope_type(m, err, errlen);
    if (rc != MF_OK)
        goto fail;
    hm->moe_cfg = (struct mf_moe_config){
        .router = (enum mf_router_kind)c->family->router,   // declared in mf_arch
        .n_embd = c->hidden_size,
        .n_expert = c->num_experts,
        .n_expert_used = c->num_experts_per_tok,
        .n_ff_exp = c->moe_intermediate_size,
        .n_ff_shexp = ((const struct qwen3_next_config *)c->arch_cfg)
                          ->shared_expert_intermediate_size,
        .norm_topk_prob = c->norm_topk_prob,
        .routed_scaling_factor = 1.0f,
    };
    hm->layers = calloc((size_t)hm->d.n_layer, sizeof *hm->layers);
    if (!hm->layers) {
        rc = mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
        goto fail;
    }
    // prep strips qwen3_5_moe's "language_model." prefix; accept files that kept it.
    struct binder b = {m, "", err, errlen};
    if (!mf_has_tensor(m, "model.embed_tokens.weight") &&
        mf_has_tensor(m, "language_model.model.embed_tokens.weight"))
        b.pfx = "language_model.";
    rc = bind_lin(&b, &hm->embed, -1, "model.embed_tokens", hm->d.n_vocab, hm->d.n_embd);
    if (rc == MF_OK)
        rc = bind_vec(&b, &hm->norm, -1, "model.norm.weight", hm->d.n_embd);
    if (rc == MF_OK) {
        // tied: the (quantized) embedding doubles as the head (mlx-lm as_linear)
        if (c->tie_word_embeddings)
            hm->head = hm->embed;
        else
            rc = bind_lin(&b, &hm->head, -1, "lm_head", hm->d.n_vocab, hm->d.n_embd);
    }
    for (int il = 0; rc == MF_OK && il < hm->d.n_layer; il++)
        rc = bind_layer(&b, hm, il);
    if (rc == MF_OK)
        return MF_OK;
fail:
    hy_unbind(m);
    return rc;
}

/* ==== State lifecycle ==== */

static void *st_alloc(mf_ctx *ctx, size_t bytes, int *ok) {
    void *p = ctx->be->ops->alloc(ctx->ex, bytes ? bytes : 4);
    if (!p)
        *ok = 0;
    return p;
}

static void hy_state_free(mf_ctx *ctx) {
    struct hy_state *st = ctx->arch_state;
    if (!st)
        return;
    const struct hy_model *hm = ctx->model->arch_weights;
    const struct mf_backend_ops *op = ctx->be->ops;
    float **per_layer[6] = {st->kc, st->vc, st->conv[0], st->conv[1], st->rec[0],
                            st->rec[1]};
    for (int a = 0; a < 6; a++) {
        for (int il = 0; per_layer[a] && il < hm->d.n_layer; il++)
            if (per_layer[a][il])
                op->dealloc(ctx->ex, per_layer[a][il]);
        free(per_layer[a]);
    }
    float *bufs[] = {st->inv_freq, st->qg, st->q, st->att, st->buf[0], st->buf[1],
                     st->buf[2], st->buf[3], st->raw, st->conv_out, st->g, st->beta, st->o};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i])
            op->dealloc(ctx->ex, bufs[i]);
    free(st->q_rows);
    if (st->q_rows_dev)
        op->dealloc(ctx->ex, st->q_rows_dev);
    for (int k = 0; k < N_DST; k++) {
        free(st->seg_rows[k]);
        if (st->seg_rows_dev[k])
            op->dealloc(ctx->ex, st->seg_rows_dev[k]);
    }
    mf_decoder_free(ctx, &st->dec);
    free(st);
    ctx->arch_state = NULL;
}

static int alloc_layer_state(mf_ctx *ctx, struct hy_state *st, const struct hy_model *hm) {
    const struct hy_dims *d = &hm->d;
    int ok = 1, n = d->n_layer;
    st->kc = calloc((size_t)n, sizeof(float *));
    st->vc = calloc((size_t)n, sizeof(float *));
    for (int k = 0; k < 2; k++) {
        st->conv[k] = calloc((size_t)n, sizeof(float *));
        st->rec[k] = calloc((size_t)n, sizeof(float *));
        ok = ok && st->conv[k] && st->rec[k];
    }
    if (!ok || !st->kc || !st->vc)
        return 0;
    for (int il = 0; ok && il < n; il++) {
        if (!hm->layers[il].is_linear) {
            st->kc[il] = st_alloc(ctx, (size_t)ctx->n_ctx * kv_row_bytes(d), &ok);
            st->vc[il] = st_alloc(ctx, (size_t)ctx->n_ctx * kv_row_bytes(d), &ok);
            continue;
        }
        for (int k = 0; k < 2; k++) {
            st->conv[k][il] = st_alloc(ctx, conv_bytes(d), &ok);
            st->rec[k][il] = st_alloc(ctx, rec_bytes(d), &ok);
        }
    }
    return ok;
}

static int gcd_int(int a, int b) {
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// Widths [floats per token] of the four GatedDeltaNet projection buffers (enum hy_dst).
static void dst_widths(const struct hy_dims *d, int width[N_DST]) {
    width[DST_QKV] = d->conv_dim;
    width[DST_Z] = d->value_dim;
    width[DST_B] = d->nv;
    width[DST_A] = d->nv;
}

// The gather tables of the grouped layout (hy_state.seg_rows). A segmented projection
// p writes its [n, n_out_p] output at raw + max_tok * (sum of n_out of the segmented
// projections before it), so a source row does not depend on the chunk length. The
// row unit of a buffer is the gcd of every offset and length that touches it. Returns
// 0 when out of memory or when the segments do not cover a buffer exactly.
static int make_seg_rows(struct hy_state *st, const struct hy_model *hm) {
    const struct hy_layer *L = NULL;
    for (int il = 0; !L && il < hm->d.n_layer; il++)
        if (hm->layers[il].is_linear && hm->segs)
            for (int p = 0; p < hm->layers[il].n_proj; p++)
                if (hm->layers[il].proj[p].dst < 0) L = &hm->layers[il];
    if (!L) return 1;
    int width[N_DST], covered[N_DST] = {0};
    dst_widths(&hm->d, width);
    size_t T = (size_t)st->dec.max_tok;
    for (int k = 0; k < N_DST; k++) st->seg_unit[k] = width[k];
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;   // floats, max_tok-based (see above)
        for (int p = 0; p < L->n_proj; p++) {
            const struct gdn_proj *P = &L->proj[p];
            if (P->dst >= 0) continue;
            int n_out = (int)P->w.n_out;
            for (int q = 0; q < P->n_seg; q++) {
                const struct gdn_seg *s = &hm->segs[P->seg0 + q];
                int *u = &st->seg_unit[s->dst];
                if (pass == 0) {
                    *u = gcd_int(gcd_int(gcd_int(*u, s->len), s->src_col), s->dst_col);
                    *u = gcd_int(gcd_int(*u, n_out), (int)(off % (size_t)*u));
                    covered[s->dst] += s->len;
                    continue;
                }
                size_t wu = (size_t)(width[s->dst] / *u);
                for (size_t t = 0; t < T; t++)
                    for (int j = 0; j < s->len / *u; j++)
                        st->seg_rows[s->dst][t * wu + (size_t)(s->dst_col / *u + j)] =
                            (int32_t)((off + t * (size_t)n_out + (size_t)s->src_col) /
                                          (size_t)*u + (size_t)j);
            }
            off += T * (size_t)n_out;
        }
        if (pass == 1) break;
        for (int k = 0; k < N_DST; k++) {
            if (!covered[k]) continue;
            if (covered[k] != width[k]) return 0;
            st->seg_rows[k] = calloc(T * (size_t)(width[k] / st->seg_unit[k]),
                                     sizeof(int32_t));
            if (!st->seg_rows[k]) return 0;
        }
    }
    return 1;
}

// A device copy of a host index table of n entries (tables are made once per context).
static int32_t *table_to_device(mf_ctx *ctx, const int32_t *host, size_t n, int *ok) {
    int32_t *dev = st_alloc(ctx, n * sizeof(int32_t), ok);
    if (dev)
        ctx->be->ops->upload(ctx->ex, dev, 0, host, n * sizeof(int32_t));
    return dev;
}

static int alloc_scratch(mf_ctx *ctx, struct hy_state *st, const struct hy_model *hm) {
    const struct hy_dims *d = &hm->d;
    size_t T = (size_t)st->dec.max_tok, F = sizeof(float);
    size_t HD = (size_t)d->n_head * d->head_dim;
    int ok = 1;
    st->qg = st_alloc(ctx, T * 2 * HD * F, &ok);
    st->q = st_alloc(ctx, T * HD * F, &ok);
    st->att = st_alloc(ctx, T * HD * F, &ok);
    if (d->has_linear) {
        st->buf[DST_QKV] = st_alloc(ctx, T * (size_t)d->conv_dim * F, &ok);
        st->buf[DST_Z] = st_alloc(ctx, T * (size_t)d->value_dim * F, &ok);
        st->buf[DST_B] = st_alloc(ctx, T * (size_t)d->nv * F, &ok);
        st->buf[DST_A] = st_alloc(ctx, T * (size_t)d->nv * F, &ok);
        st->raw = st_alloc(ctx, T * (size_t)hm->raw_width * F, &ok);
        st->conv_out = st_alloc(ctx, T * (size_t)d->conv_dim * F, &ok);
        st->g = st_alloc(ctx, T * (size_t)d->nv * F, &ok);
        st->beta = st_alloc(ctx, T * (size_t)d->nv * F, &ok);
        st->o = st_alloc(ctx, T * (size_t)d->value_dim * F, &ok);
    }
    st->inv_freq = st_alloc(ctx, (size_t)(d->n_rot / 2) * F, &ok);
    st->q_rows = calloc(T * (size_t)d->n_head, sizeof(int32_t));
    if (!ok || !st->q_rows)
        return 0;
    for (size_t i = 0; i < T * (size_t)d->n_head; i++)
        st->q_rows[i] = (int32_t)(2 * i);
    if (!make_seg_rows(st, hm))
        return 0;
    int width[N_DST];
    dst_widths(d, width);
    st->q_rows_dev = table_to_device(ctx, st->q_rows, T * (size_t)d->n_head, &ok);
    for (int k = 0; k < N_DST; k++)
        if (st->seg_rows[k])
            st->seg_rows_dev[k] = table_to_device(
                ctx, st->seg_rows[k], T * (size_t)(width[k] / st->seg_unit[k]), &ok);
    if (!ok)
        return 0;
    // mlx nn.RoPE: inv_freq_j = base^(-2j / n_rot) = base^(-j / (n_rot/2))
    float inv[512];
    int half = d->n_rot / 2;
    for (int j = 0; j < half && j < 512; j++)
        inv[j] = (float)exp(-(double)j * log(d->rope_theta) / (double)half);
    if (half > 0)
        ctx->be->ops->upload(ctx->ex, st->inv_freq, 0, inv, (size_t)half * F);
    return 1;
}

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk);

static int hy_state_new(mf_ctx *ctx, char *err, size_t errlen) {
    const struct hy_model *hm = ctx->model->arch_weights;
    if (hm->d.n_rot / 2 > 512)
        return mf_err(err, errlen, MF_ERR_UNSUPPORTED, "rotary dims %d > 1024",
                      hm->d.n_rot);
    struct hy_state *st = calloc(1, sizeof *st);
    if (!st)
        return mf_err(err, errlen, MF_ERR_NOMEM, "out of memory");
    ctx->arch_state = st;
    st->dec = (struct mf_decoder){
        .max_tok = mf_decoder_chunk(ctx, HY_MAX_TOK), .embed = &hm->embed, .norm = &hm->norm, .head = &hm->head,
        .moe_cfg = &hm->moe_cfg, .layer = layer_forward,
    };
    if (!alloc_layer_state(ctx, st, hm) || !alloc_scratch(ctx, st, hm)) {
        hy_state_free(ctx);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "out of memory for the sequence state (n_ctx %d)", ctx->n_ctx);
    }
    int rc = mf_decoder_alloc(ctx, &st->dec, ctx->model->cfg.model_type, err, errlen);
    if (rc != MF_OK)
        hy_state_free(ctx);
    return rc;
}

// Zeroes KV caches, both conv and recurrent buffers, and the commit index: equal to a
// freshly made state.
static void hy_state_reset(mf_ctx *ctx) {
    struct hy_state *st = ctx->arch_state;
    const struct hy_model *hm = ctx->model->arch_weights;
    const struct mf_backend_ops *op = ctx->be->ops;
    for (int il = 0; il < hm->d.n_layer; il++) {
        if (st->kc[il]) {
            op->zero(ctx->ex, st->kc[il], 0, (size_t)ctx->n_ctx * kv_row_bytes(&hm->d));
            op->zero(ctx->ex, st->vc[il], 0, (size_t)ctx->n_ctx * kv_row_bytes(&hm->d));
        }
        for (int k = 0; k < 2; k++) {
            if (st->conv[k][il])
                op->zero(ctx->ex, st->conv[k][il], 0, conv_bytes(&hm->d));
            if (st->rec[k][il])
                op->zero(ctx->ex, st->rec[k][il], 0, rec_bytes(&hm->d));
        }
    }
    st->cur = 0;
}

// Committed state for core/state.c: KEY/VALUE rows per attention layer, CONV and
// RECURRENT (fixed size) per linear layer, from the committed buffer index.
static int hy_state_segments(const mf_ctx *ctx, struct mf_state_seg *segs, int cap) {
    const struct hy_state *st = ctx->arch_state;
    const struct hy_model *hm = ctx->model->arch_weights;
    int n = 0;
    for (int il = 0; il < hm->d.n_layer; il++) {
        struct mf_state_seg s[2];
        if (hm->layers[il].is_linear) {
            s[0] = (struct mf_state_seg){.buf = st->conv[st->cur][il],
                                         .fixed_bytes = conv_bytes(&hm->d), .layer = il,
                                         .kind = MF_SEG_CONV};
            s[1] = (struct mf_state_seg){.buf = st->rec[st->cur][il],
                                         .fixed_bytes = rec_bytes(&hm->d), .layer = il,
                                         .kind = MF_SEG_RECURRENT};
        } else {
            s[0] = (struct mf_state_seg){.buf = st->kc[il], .row_bytes = kv_row_bytes(&hm->d),
                                         .layer = il, .kind = MF_SEG_KEY};
            s[1] = (struct mf_state_seg){.buf = st->vc[il], .row_bytes = kv_row_bytes(&hm->d),
                                         .layer = il, .kind = MF_SEG_VALUE};
        }
        for (int k = 0; k < 2; k++, n++)
            if (n < cap)
                segs[n] = s[k];
    }
    return n;
}

/* ==== Gated full attention (§2.4) ====
 * The layer's input norm taken with the q/k/v products (mf_rms_matmul_multi, into
 * xn). q_proj gives per head [q(D) | gate(D)]; q goes through q_norm and partial
 * rope, k/v are projected straight into the cache rows of their positions; the output
 * projection is added into the residual stream x (mf_matmul_add, out its scratch). */

static void attn_block(mf_ctx *ctx, struct hy_state *st, const struct hy_dims *d,
                       const struct hy_layer *L, int il, float *out, float *xn, float *x,
                       int n, int pos0) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_exec *ex = ctx->ex;
    int H = d->n_head, Hkv = d->n_head_kv, D = d->head_dim;
    size_t row = (size_t)Hkv * D;
    float *kc = st->kc[il] + (size_t)pos0 * row;   // [n, Hkv, D] rows of this call
    float *vc = st->vc[il] + (size_t)pos0 * row;
    float *const qkv[3] = {st->qg, kc, vc};   // q: [n, H, 2, D]
    const struct mf_weight *const wqkv[3] = {&L->wq, &L->wk, &L->wv};
    mf_rms_matmul_multi(op, ex, 3, qkv, wqkv, xn, x, &L->attn_norm, d->eps, n);
    op->gather_rows_dev(ex, st->q, st->qg, st->q_rows_dev, n * H, D);   // -> [n, H, D]
    struct mf_rope_qk r = {.x = {st->q, kc}, .heads = {H, Hkv},
                           .tok_stride = {H * D, Hkv * D}, .head_stride = {D, D},
                           .norm = {&L->q_norm, &L->k_norm}, .n_tok = n, .head_dim = D,
                           .n_rot = d->n_rot, .pos0 = pos0, .eps = d->eps, .mscale = 1.0f,
                           .inv_freq = st->inv_freq};
    mf_rope_qk(op, ex, &r);   // per-head q/k norms, then rotate-half pairs
    op->attention(ex, st->att, st->q, st->kc[il], st->vc[il], n, H, Hkv, D, D,
                  (int)row, (int)row, pos0, d->attn_scale);
    MF_TAP(ctx, "model.layers.%d.self_attn.sdpa", il, st->att, n * H * D);
    // output gate: [n, H, D] *= sigmoid(gate half of each head's q_proj row)
    op->mul_sigmoid(ex, st->att, st->qg + D, n * H, D, 2 * D, D);
    mf_matmul_add(op, ex, x, &L->wo, st->att, n, out);
}

/* ==== GatedDeltaNet (§2.5) ====
 * Projections of the normalised input (each group of products takes the layer's
 * input norm itself, mf_rms_matmul_multi, into xn) into canonical buffers; causal
 * conv + SiLU over [q|k|v] with the K-1 previous pre-conv inputs; q/k RMS-normalised
 * without weight (mlx-lm normalize_qk: eps 1e-6 on the L2 sum becomes 1e-6/dk on the
 * mean, q scaled 1/dk, k dk^-1/2); gates; the delta-rule recurrence; gated RMSNorm
 * with SiLU(z); out_proj added into the residual stream (mf_matmul_add). */

static void gdn_project(mf_ctx *ctx, struct hy_state *st, const struct hy_model *hm,
                        const struct hy_layer *L, float *xn, const float *x, int n) {
    const struct mf_backend_ops *op = ctx->be->ops;
    int width[N_DST], direct[N_DST] = {0}, segmented = 0;
    dst_widths(&hm->d, width);
    size_t raw_off = 0, T = (size_t)st->dec.max_tok;
    float *y[sizeof L->proj / sizeof L->proj[0]];
    const struct mf_weight *w[sizeof L->proj / sizeof L->proj[0]];
    for (int p = 0; p < L->n_proj; p++) {
        const struct gdn_proj *P = &L->proj[p];
        w[p] = &P->w;
        if (P->dst >= 0) {
            y[p] = st->buf[P->dst];
            direct[P->dst] = 1;
            continue;
        }
        // [n, n_out] at a max_tok-based offset: the rows in seg_rows do not depend on n
        y[p] = st->raw + raw_off;
        raw_off += T * (size_t)P->w.n_out;
        segmented = 1;
    }
    for (int p = 0; p < L->n_proj; p += MF_MATMUL_MULTI)
        mf_rms_matmul_multi(op, ctx->ex, L->n_proj - p < MF_MATMUL_MULTI ? L->n_proj - p
                                                                          : MF_MATMUL_MULTI,
                            y + p, w + p, xn, x, &L->attn_norm, hm->d.eps, n);
    // The segments of the whole chunk, one gather per buffer (make_seg_rows).
    for (int k = 0; segmented && k < N_DST; k++)
        if (st->seg_rows[k] && !direct[k])
            op->gather_rows_dev(ctx->ex, st->buf[k], st->raw, st->seg_rows_dev[k],
                            n * (width[k] / st->seg_unit[k]), st->seg_unit[k]);
}

static void gdn_block(mf_ctx *ctx, struct hy_state *st, const struct hy_model *hm,
                      const struct hy_layer *L, int il, float *out, float *xn, float *x,
                      int n, int first_chunk) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const struct hy_dims *d = &hm->d;
    struct mf_exec *ex = ctx->ex;
    int C = d->conv_dim, dk = d->dk;
    gdn_project(ctx, st, hm, L, xn, x, n);
    // The first chunk reads the committed state and writes the working buffers (the
    // out-of-place ops: no copy of the committed state); later chunks of the same call
    // go on in place in the working buffers (see "Sequence state" above).
    float *conv = st->conv[!st->cur][il], *S = st->rec[!st->cur][il];
    const float *conv_in = first_chunk ? st->conv[st->cur][il] : conv;
    const float *S_in = first_chunk ? st->rec[st->cur][il] : S;
    op->conv1d_silu_from(ex, st->conv_out, conv, conv_in, st->buf[DST_QKV], &L->conv1d, n,
                         C, d->conv_K);
    float eps_qk = 1e-6f / (float)dk;
    float *q = st->conv_out, *k = q + d->key_dim;   // nk heads of dk in each conv row
    op->rmsnorm_heads(ex, q, q, NULL, n, C, d->nk, dk, dk, eps_qk, 1.0f / (float)dk);
    op->rmsnorm_heads(ex, k, k, NULL, n, C, d->nk, dk, dk, eps_qk, 1.0f / sqrtf((float)dk));
    op->gdn_gates(ex, st->g, st->beta, st->buf[DST_A], st->buf[DST_B], d->nv, &L->A_log,
                  &L->dt_bias, n, d->nv);
    op->gdn_recurrence_from(ex, st->o, S, S_in, st->conv_out, st->conv_out + d->key_dim,
                            st->conv_out + 2 * d->key_dim, C, st->g, st->beta, n, d->nk,
                            d->nv, dk, d->dv);
    MF_TAP(ctx, "model.layers.%d.linear_attn.gated_delta", il, st->o, n * d->value_dim);
    op->rmsnorm_gated(ex, st->o, st->o, st->buf[DST_Z], &L->gdn_norm, n * d->nv, d->dv,
                      d->eps);
    mf_matmul_add(op, ex, x, &L->out_proj, st->o, n, out);
}

/* ==== Forward ====
 * h = x + Mixer(norm_in(x)); x = h + FFN(norm_post(h)); logits = head(norm(x)). The
 * chunk loop, FFN half and head are models/decoder.c's. */

static int layer_forward(mf_ctx *ctx, int il, int n, int pos0, int first_chunk) {
    struct hy_state *st = ctx->arch_state;
    const struct hy_model *hm = ctx->model->arch_weights;
    const struct hy_layer *L = &hm->layers[il];
    struct mf_decoder *dec = &st->dec;
    if (L->is_linear)
        gdn_block(ctx, st, hm, L, il, dec->y, dec->xn, dec->x, n, first_chunk);
    else
        attn_block(ctx, st, &hm->d, L, il, dec->y, dec->xn, dec->x, n, pos0);
    return mf_decoder_ffn(ctx, dec, NULL, &L->ffn_norm, L->is_moe, &L->moe, &L->ffn, il, n);
}

static int hy_forward(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                      int all_logits) {
    struct hy_state *st = ctx->arch_state;
    int rc = mf_decoder_run(ctx, &st->dec, tokens, n_tok, logits, all_logits);
    if (rc == MF_OK)
        st->cur = !st->cur;   // commit the linear-attention state written this call
    return rc;
}

/* ==== Config: the family's keys (mf_arch.read_config) ==== */

static int read_hybrid(struct qwen3_next_config *q, const struct mf_cfg_reader *r) {
    q->full_attention_interval = 4;
    q->linear_conv_kernel_dim = 4;
    int rc;
    if ((rc = mf_cfg_pos_int(r, "full_attention_interval", 0, &q->full_attention_interval)) ||
        (rc = mf_cfg_pos_int(r, "linear_num_key_heads", 1, &q->linear_num_key_heads)) ||
        (rc = mf_cfg_pos_int(r, "linear_num_value_heads", 1, &q->linear_num_value_heads)) ||
        (rc = mf_cfg_pos_int(r, "linear_key_head_dim", 1, &q->linear_key_head_dim)) ||
        (rc = mf_cfg_pos_int(r, "linear_value_head_dim", 1, &q->linear_value_head_dim)) ||
        (rc = mf_cfg_pos_int(r, "linear_conv_kernel_dim", 0, &q->linear_conv_kernel_dim)) ||
        (rc = mf_cfg_int(r, "shared_expert_intermediate_size", 0,
                         &q->shared_expert_intermediate_size)))
        return rc;
    if (q->shared_expert_intermediate_size < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: intermediate sizes must not be negative", r->name);
    if (q->linear_num_value_heads % q->linear_num_key_heads != 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: linear_num_value_heads (%d) must be a multiple of "
                      "linear_num_key_heads (%d)", r->name, q->linear_num_value_heads,
                      q->linear_num_key_heads);
    return 0;
}

static void hy_free_config(void *p) {
    struct qwen3_next_config *q = p;
    mf_sparse_step_free(&q->sparse);
    free(q);
}

// Linear attention except every full_attention_interval-th layer; routed experts on
// every layer (qwen3_5_moe) or by the sparse-step rule (qwen3_next).
static int hy_read_config(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    struct qwen3_next_config *q = calloc(1, sizeof *q);
    if (!q) return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    cfg->arch_cfg = q;
    int rc;
    if ((rc = mf_read_sparse_step(cfg, r, &q->sparse)) || (rc = read_hybrid(q, r)))
        return rc;
    int every_layer = cfg->family->id == MF_ARCH_QWEN3_5_MOE;
    if (every_layer)
        memset(cfg->layer_is_moe, cfg->num_experts > 0, (size_t)cfg->num_hidden_layers);
    else
        mf_sparse_step_layers(cfg, &q->sparse);
    for (int i = 0; i < cfg->num_hidden_layers; i++)
        cfg->layer_is_linear[i] = (i + 1) % q->full_attention_interval != 0;
    return 0;
}

static int hy_ident(const struct mf_config *cfg, struct mf_ident_field *out, int cap) {
    const struct qwen3_next_config *q = cfg->arch_cfg;
    int n = 0;
    mf_ident_int(out, &n, cap, "shared_expert_intermediate_size",
                 q->shared_expert_intermediate_size);
    mf_ident_int(out, &n, cap, "full_attention_interval", q->full_attention_interval);
    mf_ident_int(out, &n, cap, "linear_num_key_heads", q->linear_num_key_heads);
    mf_ident_int(out, &n, cap, "linear_num_value_heads", q->linear_num_value_heads);
    mf_ident_int(out, &n, cap, "linear_key_head_dim", q->linear_key_head_dim);
    mf_ident_int(out, &n, cap, "linear_value_head_dim", q->linear_value_head_dim);
    mf_ident_int(out, &n, cap, "linear_conv_kernel_dim", q->linear_conv_kernel_dim);
    return n;
}

/* ==== Registration ====
 * Same code for both families; bind decides the per-layer projection layout. */

static const char *const hy_expert_components[] = {"gate_proj", "up_proj", "down_proj",
                                                  NULL};

const struct mf_arch mf_arch_qwen3_5_moe = {
    .model_type = "qwen3_5_moe",
    .id = MF_ARCH_QWEN3_5_MOE,
    .experts_key = "num_experts",
    .norm_topk_default = 1,
    // mlx-lm qwen3_5 TextModelArgs defaults (rope_parameters absent).
    .rope_theta_default = 100000.0,
    .partial_rotary_default = 0.25,
    .read_config = hy_read_config,
    .free_config = hy_free_config,
    .ident = hy_ident,
    .router = MF_ROUTER_SOFTMAX,
    .expert_components = hy_expert_components,
    .bind = hy_bind,
    .unbind = hy_unbind,
    .state_new = hy_state_new,
    .state_free = hy_state_free,
    .state_reset = hy_state_reset,
    .forward = hy_forward,
    .state_segments = hy_state_segments,
};

const struct mf_arch mf_arch_qwen3_next = {
    .model_type = "qwen3_next",
    .id = MF_ARCH_QWEN3_NEXT,
    .experts_key = "num_experts",
    .read_config = hy_read_config,
    .free_config = hy_free_config,
    .ident = hy_ident,
    .router = MF_ROUTER_SOFTMAX,
    .expert_components = hy_expert_components,
    .bind = hy_bind,
    .unbind = hy_unbind,
    .state_new = hy_state_new,
    .state_free = hy_state_free,
    .state_reset = hy_state_reset,
    .forward = hy_forward,
    .state_segments = hy_state_segments,
};
