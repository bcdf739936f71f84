/*
 * config.c — config.json into struct mf_config, for every supported family.
 *
 * Keys are read with mlx-lm's defaults (the oracle the forward passes are checked
 * against; model-math §2.1, §3.1, §4): qwen3_5_moe nests the language model in
 * "text_config" (top-level keys fill what it lacks) and puts rope settings in
 * "rope_parameters"; qwen3_next and qwen3_moe are flat; deepseek_v3 names its experts
 * n_routed_experts and may carry a YaRN "rope_scaling" block. Layer kinds are derived
 * here once. This file reads no weights: shapes are checked against the manifest by
 * the weight binder.
 */
#include "core/config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/json.h"

/* ==== Families ==== */

static const struct {
    const char *model_type;
    enum mf_arch_id id;
} families[] = {
    {"qwen3_5_moe", MF_ARCH_QWEN3_5_MOE},
    {"qwen3_next", MF_ARCH_QWEN3_NEXT},
    {"deepseek_v3", MF_ARCH_DEEPSEEK_V3},
    {"qwen3_moe", MF_ARCH_QWEN3_MOE},
    // mlx-lm MODEL_REMAPPING runs Kimi-K2 checkpoints as deepseek_v3.
    {"kimi_k2", MF_ARCH_DEEPSEEK_V3},
};

// Far above any real model (the largest have under 100 layers); a config claiming
// billions made the loader allocate and walk gigabytes of per-layer tables.
#define MF_CONFIG_MAX_LAYERS 65536

#define N_FAMILIES ((int)(sizeof families / sizeof families[0]))
#define SUPPORTED "qwen3_5_moe, qwen3_next, deepseek_v3 (and kimi_k2), qwen3_moe"

/* ==== Key readers ====
 * `lm` is the language-model object (text_config or the root), `root` the document
 * root; a key absent from lm is looked up in root. Each reader returns 0 or an
 * MF_ERR_FORMAT naming the file and key. */

struct reader {
    const mf_json *lm, *root;
    const char *name;
    char *err;
    size_t errlen;
};

static const mf_json *rd_node(const struct reader *r, const char *key) {
    const mf_json *v = mf_json_get(r->lm, key);
    if (!v && r->lm != r->root)
        v = mf_json_get(r->root, key);
    return v;
}

// Object that holds `key` (lm first), for the typed getters of json.h.
static const mf_json *rd_holder(const struct reader *r, const char *key) {
    if (mf_json_get(r->lm, key) || r->lm == r->root)
        return r->lm;
    return r->root;
}

// Integer key: *out untouched when absent or null and !required.
static int rd_int(const struct reader *r, const char *key, int required, int *out) {
    int64_t v;
    int rc = mf_json_get_int(rd_holder(r, key), key, &v);
    if (rc < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" must be an integer", r->name, key);
    if (rc == 1 && (v < INT32_MIN || v > INT32_MAX))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" is %lld, out of the supported range [%d, %d]",
                      r->name, key, (long long)v, INT32_MIN, INT32_MAX);
    if (rc == 0) {
        if (required)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: required key \"%s\" is missing", r->name, key);
        return 0;
    }
    *out = (int)v;
    return 0;
}

static int rd_num_in(const struct reader *r, const mf_json *obj, const char *key,
                     double *out) {
    int rc = mf_json_get_num(obj, key, out);
    if (rc < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT, "%s: key \"%s\" must be a number",
                      r->name, key);
    return 0;
}

static int rd_num(const struct reader *r, const char *key, int required, double *out) {
    double v;
    int rc = mf_json_get_num(rd_holder(r, key), key, &v);
    if (rc < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT, "%s: key \"%s\" must be a number",
                      r->name, key);
    if (rc == 0) {
        if (required)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: required key \"%s\" is missing", r->name, key);
        return 0;
    }
    *out = v;
    return 0;
}

static int rd_bool(const struct reader *r, const char *key, int *out) {
    int rc = mf_json_get_bool(rd_holder(r, key), key, out);
    if (rc < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" must be true or false", r->name, key);
    return 0;
}

// A token id given as an int or a list of ints (first one); -1 when absent or empty.
static int rd_token(const struct reader *r, const char *key, int *out) {
    *out = -1;
    const mf_json *v = rd_node(r, key);
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type == MF_JSON_ARRAY) {
        if (v->n == 0)
            return 0;
        v = v->items[0];
    }
    if (v->type != MF_JSON_NUMBER || !v->num_is_int || v->inum < 0 ||
        v->inum > INT32_MAX)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" must be a token id or a list of them", r->name, key);
    *out = (int)v->inum;
    return 0;
}

// v must be positive; when it is not because the key is absent (and no default
// applies), the message says the key is missing rather than "got 0".
static int positive(const struct reader *r, const char *key, long long v) {
    const mf_json *node = rd_node(r, key);
    if (v <= 0 && (!node || node->type == MF_JSON_NULL))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: required key \"%s\" is missing", r->name, key);
    if (v <= 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" must be positive, got %lld", r->name, key, v);
    return 0;
}

// rd_int, then the value (read, or the default already in *out) must be positive.
static int rd_pos_int(const struct reader *r, const char *key, int required, int *out) {
    int rc = rd_int(r, key, required, out);
    return rc ? rc : positive(r, key, *out);
}

/* ==== Quantization block ==== */

static int valid_bits(int b) {
    return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8;
}

static int valid_gs(int g) {
    return g == 32 || g == 64 || g == 128;
}

// Checks the "mode" of a block or an override (absent = affine: older checkpoints).
static int check_mode(const struct reader *r, const mf_json *obj, const char *where) {
    const mf_json *m = mf_json_get(obj, "mode");
    if (!m || m->type == MF_JSON_NULL)
        return 0;
    if (m->type != MF_JSON_STRING)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: quantization mode of %s must be a string", r->name, where);
    if (strcmp(m->str, "affine") != 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: quantization mode \"%s\" of %s is not supported (only "
                      "\"affine\")", r->name, m->str, where);
    return 0;
}

static int read_bits_gs(const struct reader *r, const mf_json *obj, const char *where,
                        int *bits, int *gs) {
    int64_t b = 4, g = 64;   // mlx-lm / nn.quantize defaults
    if (mf_json_get_int(obj, "bits", &b) < 0 || mf_json_get_int(obj, "group_size", &g) < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: bits/group_size of %s must be integers", r->name, where);
    if (!valid_bits((int)b) || b != (int)b)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: quantization bits %lld of %s not in {2,3,4,5,6,8}", r->name,
                      (long long)b, where);
    if (!valid_gs((int)g) || g != (int)g)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: quantization group_size %lld of %s not in {32,64,128}",
                      r->name, (long long)g, where);
    *bits = (int)b;
    *gs = (int)g;
    return 0;
}

static int read_quant(struct mf_config *cfg, const struct reader *r) {
    const mf_json *q = mf_json_get(r->root, "quantization");
    if (!q || q->type == MF_JSON_NULL)
        q = mf_json_get(r->root, "quantization_config");
    if (!q || q->type == MF_JSON_NULL)
        return 0;
    if (q->type != MF_JSON_OBJECT)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"quantization\" must be an object", r->name);
    int rc = check_mode(r, q, "the quantization block");
    if (rc)
        return rc;
    if ((rc = read_bits_gs(r, q, "the quantization block", &cfg->quant_bits,
                           &cfg->quant_group_size)))
        return rc;
    size_t n_over = 0;
    for (size_t i = 0; i < q->n; i++)
        if (q->items[i]->type == MF_JSON_OBJECT || q->items[i]->type == MF_JSON_FALSE)
            n_over++;
    if (!n_over)
        return 0;
    cfg->quant_overrides = calloc(n_over, sizeof *cfg->quant_overrides);
    if (!cfg->quant_overrides)
        return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    for (size_t i = 0; i < q->n; i++) {
        const mf_json *e = q->items[i];
        if (e->type != MF_JSON_OBJECT && e->type != MF_JSON_FALSE)
            continue;
        struct mf_quant_override *o = &cfg->quant_overrides[cfg->n_quant_overrides];
        o->path = strdup(e->key);
        if (!o->path)
            return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
        cfg->n_quant_overrides++;
        if (e->type == MF_JSON_FALSE)
            continue;
        char where[160];
        snprintf(where, sizeof where, "module \"%s\"", e->key);
        if ((rc = check_mode(r, e, where)))
            return rc;
        if ((rc = read_bits_gs(r, e, where, &o->bits, &o->group_size)))
            return rc;
        o->quantized = 1;
    }
    return 0;
}

int mf_config_quant_for(const struct mf_config *cfg, const char *path, int *bits,
                        int *gs) {
    *bits = 0;
    *gs = 0;
    size_t pl = strlen(path);
    for (int i = 0; i < cfg->n_quant_overrides; i++) {
        const struct mf_quant_override *o = &cfg->quant_overrides[i];
        size_t ol = strlen(o->path);
        // Keys are written with the checkpoint's own prefix ("language_model." for
        // qwen3_5_moe) which the manifest strips: match the path as a dotted suffix.
        int match = ol == pl ? strcmp(o->path, path) == 0
                             : ol > pl && o->path[ol - pl - 1] == '.' &&
                                   strcmp(o->path + ol - pl, path) == 0;
        if (!match)
            continue;
        if (!o->quantized)
            return 0;
        *bits = o->bits;
        *gs = o->group_size;
        return 1;
    }
    if (!cfg->quant_bits)
        return 0;
    *bits = cfg->quant_bits;
    *gs = cfg->quant_group_size;
    return 1;
}

/* ==== Family-specific keys ==== */

// rope_theta / partial_rotary_factor: "rope_parameters" (qwen3_5_moe, newer HF
// configs) first, then flat keys; defaults per family.
static int read_rope(struct mf_config *cfg, const struct reader *r) {
    int qwen35 = cfg->arch == MF_ARCH_QWEN3_5_MOE;
    // mlx-lm qwen3_5 TextModelArgs defaults (rope_parameters absent): 1e5, 0.25.
    cfg->rope_theta = qwen35 ? 100000.0 : 10000.0;
    cfg->partial_rotary_factor = qwen35 ? 0.25 : 1.0;
    int rc;
    if ((rc = rd_num(r, "rope_theta", 0, &cfg->rope_theta)) ||
        (rc = rd_num(r, "partial_rotary_factor", 0, &cfg->partial_rotary_factor)))
        return rc;
    const mf_json *rp = rd_node(r, "rope_parameters");
    if (rp && rp->type == MF_JSON_OBJECT) {
        if ((rc = rd_num_in(r, rp, "rope_theta", &cfg->rope_theta)) ||
            (rc = rd_num_in(r, rp, "partial_rotary_factor", &cfg->partial_rotary_factor)))
            return rc;
    } else if (rp && rp->type != MF_JSON_NULL) {
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"rope_parameters\" must be an object", r->name);
    }
    if (!(cfg->rope_theta > 0) || !isfinite(cfg->rope_theta))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: rope_theta must be positive, got %g", r->name, cfg->rope_theta);
    if (!(cfg->partial_rotary_factor > 0 && cfg->partial_rotary_factor <= 1))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: partial_rotary_factor must be in (0, 1], got %g", r->name,
                      cfg->partial_rotary_factor);
    return 0;
}

static int read_mlp_only(struct mf_config *cfg, const struct reader *r) {
    const mf_json *v = rd_node(r, "mlp_only_layers");
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type != MF_JSON_ARRAY)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"mlp_only_layers\" must be a list of layer indices", r->name);
    if (v->n == 0)
        return 0;
    cfg->mlp_only_layers = calloc(v->n, sizeof *cfg->mlp_only_layers);
    if (!cfg->mlp_only_layers)
        return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    for (size_t i = 0; i < v->n; i++) {
        const mf_json *e = v->items[i];
        if (e->type != MF_JSON_NUMBER || !e->num_is_int || e->inum < 0 ||
            e->inum >= cfg->num_hidden_layers)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: \"mlp_only_layers\"[%zu] is not a layer index in [0, %d)",
                          r->name, i, cfg->num_hidden_layers);
        cfg->mlp_only_layers[cfg->n_mlp_only_layers++] = (int)e->inum;
    }
    return 0;
}

static int read_hybrid(struct mf_config *cfg, const struct reader *r) {
    cfg->full_attention_interval = 4;
    cfg->linear_conv_kernel_dim = 4;
    int rc;
    if ((rc = rd_pos_int(r, "full_attention_interval", 0, &cfg->full_attention_interval)) ||
        (rc = rd_pos_int(r, "linear_num_key_heads", 1, &cfg->linear_num_key_heads)) ||
        (rc = rd_pos_int(r, "linear_num_value_heads", 1, &cfg->linear_num_value_heads)) ||
        (rc = rd_pos_int(r, "linear_key_head_dim", 1, &cfg->linear_key_head_dim)) ||
        (rc = rd_pos_int(r, "linear_value_head_dim", 1, &cfg->linear_value_head_dim)) ||
        (rc = rd_pos_int(r, "linear_conv_kernel_dim", 0, &cfg->linear_conv_kernel_dim)))
        return rc;
    if (cfg->linear_num_value_heads % cfg->linear_num_key_heads != 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: linear_num_value_heads (%d) must be a multiple of "
                      "linear_num_key_heads (%d)", r->name, cfg->linear_num_value_heads,
                      cfg->linear_num_key_heads);
    return 0;
}

static int read_yarn(struct mf_config *cfg, const struct reader *r) {
    const mf_json *rs = rd_node(r, "rope_scaling");
    if (!rs || rs->type == MF_JSON_NULL)
        return 0;
    if (rs->type != MF_JSON_OBJECT)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"rope_scaling\" must be an object", r->name);
    const char *type = NULL;
    // HF wrote "type" in older configs and "rope_type" in newer ones.
    if (mf_json_get_str(rs, "type", &type) < 0 ||
        (!type && mf_json_get_str(rs, "rope_type", &type) < 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: rope_scaling type must be a string", r->name);
    if (!type || strcmp(type, "yarn") != 0)
        return 0;
    cfg->has_yarn = 1;
    cfg->yarn_beta_fast = 32;
    cfg->yarn_beta_slow = 1;
    cfg->yarn_mscale = 1;
    cfg->yarn_mscale_all_dim = 0;
    int64_t orig = 0;
    int rc;
    if ((rc = rd_num_in(r, rs, "factor", &cfg->yarn_factor)) ||
        (rc = rd_num_in(r, rs, "beta_fast", &cfg->yarn_beta_fast)) ||
        (rc = rd_num_in(r, rs, "beta_slow", &cfg->yarn_beta_slow)) ||
        (rc = rd_num_in(r, rs, "mscale", &cfg->yarn_mscale)) ||
        (rc = rd_num_in(r, rs, "mscale_all_dim", &cfg->yarn_mscale_all_dim)))
        return rc;
    if (mf_json_get_int(rs, "original_max_position_embeddings", &orig) != 1 || orig <= 0 ||
        orig > INT32_MAX)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: yarn rope_scaling needs a positive "
                      "\"original_max_position_embeddings\"", r->name);
    cfg->yarn_original_max_position_embeddings = (int)orig;
    if (!(cfg->yarn_factor > 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: yarn rope_scaling needs a positive \"factor\", got %g", r->name,
                      cfg->yarn_factor);
    return 0;
}

static int read_deepseek(struct mf_config *cfg, const struct reader *r) {
    cfg->moe_layer_freq = 1;
    cfg->n_group = 1;
    cfg->topk_group = 1;
    cfg->routed_scaling_factor = 1.0;
    int rc;
    if ((rc = rd_int(r, "n_routed_experts", 0, &cfg->num_experts)) ||
        (rc = rd_int(r, "q_lora_rank", 0, &cfg->q_lora_rank)) ||
        (rc = rd_pos_int(r, "kv_lora_rank", 1, &cfg->kv_lora_rank)) ||
        (rc = rd_int(r, "qk_nope_head_dim", 1, &cfg->qk_nope_head_dim)) ||
        (rc = rd_pos_int(r, "qk_rope_head_dim", 1, &cfg->qk_rope_head_dim)) ||
        (rc = rd_pos_int(r, "v_head_dim", 1, &cfg->v_head_dim)) ||
        (rc = rd_int(r, "n_shared_experts", 0, &cfg->n_shared_experts)) ||
        (rc = rd_pos_int(r, "n_group", 0, &cfg->n_group)) ||
        (rc = rd_pos_int(r, "topk_group", 0, &cfg->topk_group)) ||
        (rc = rd_num(r, "routed_scaling_factor", 0, &cfg->routed_scaling_factor)) ||
        (rc = rd_int(r, "first_k_dense_replace", 0, &cfg->first_k_dense_replace)) ||
        (rc = rd_pos_int(r, "moe_layer_freq", 0, &cfg->moe_layer_freq)))
        return rc;
    if (cfg->q_lora_rank < 0 || cfg->qk_nope_head_dim < 0 || cfg->n_shared_experts < 0 ||
        cfg->first_k_dense_replace < 0 || cfg->num_experts < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: q_lora_rank, qk_nope_head_dim, n_shared_experts, "
                      "first_k_dense_replace and n_routed_experts must not be negative",
                      r->name);
    if (cfg->qk_rope_head_dim % 2)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: qk_rope_head_dim must be even, got %d", r->name,
                      cfg->qk_rope_head_dim);
    if (cfg->num_experts > 0 && (cfg->num_experts % cfg->n_group != 0 ||
                                 cfg->topk_group > cfg->n_group))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: n_routed_experts (%d) must be a multiple of n_group (%d) and "
                      "topk_group (%d) at most n_group", r->name, cfg->num_experts,
                      cfg->n_group, cfg->topk_group);
    if (!(cfg->routed_scaling_factor > 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: routed_scaling_factor must be positive", r->name);
    return read_yarn(cfg, r);
}

/* ==== Layer kinds ==== */

static int derive_layers(struct mf_config *cfg, const struct reader *r) {
    int L = cfg->num_hidden_layers;
    cfg->layer_is_linear = calloc((size_t)L, 1);
    cfg->layer_is_moe = calloc((size_t)L, 1);
    if (!cfg->layer_is_linear || !cfg->layer_is_moe)
        return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    int hybrid = cfg->arch == MF_ARCH_QWEN3_5_MOE || cfg->arch == MF_ARCH_QWEN3_NEXT;
    int n_dense = 0;
    // mlp_only_layers marked in layer_is_moe first (entries were checked to be layer
    // indices): one pass over the list, not a search of it per layer, which took
    // layers x entries steps.
    for (int i = 0; i < cfg->n_mlp_only_layers; i++)
        cfg->layer_is_moe[cfg->mlp_only_layers[i]] = 2;
    for (int i = 0; i < L; i++) {
        int mlp_only = cfg->layer_is_moe[i] == 2;
        if (hybrid)
            cfg->layer_is_linear[i] = (i + 1) % cfg->full_attention_interval != 0;
        int moe = 0;
        switch (cfg->arch) {
        case MF_ARCH_QWEN3_5_MOE:
            moe = cfg->num_experts > 0;
            break;
        case MF_ARCH_QWEN3_NEXT:
        case MF_ARCH_QWEN3_MOE:
            moe = !mlp_only &&
                  cfg->num_experts > 0 && (i + 1) % cfg->decoder_sparse_step == 0;
            break;
        case MF_ARCH_DEEPSEEK_V3:
            moe = cfg->num_experts > 0 && i >= cfg->first_k_dense_replace &&
                  i % cfg->moe_layer_freq == 0;
            break;
        }
        cfg->layer_is_moe[i] = (uint8_t)moe;
        cfg->n_moe_layers += moe;
        n_dense += !moe;
    }
    if (n_dense && cfg->intermediate_size <= 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: %d layer(s) have a dense FFN but \"intermediate_size\" is "
                      "missing or not positive", r->name, n_dense);
    return 0;
}

/* ==== Parse ==== */

static int parse_root(struct mf_config *cfg, const mf_json *root, const char *name,
                      char *err, size_t errlen) {
    if (!root || root->type != MF_JSON_OBJECT)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: top level must be an object", name);
    const mf_json *tc = mf_json_get(root, "text_config");
    if (tc && tc->type != MF_JSON_OBJECT && tc->type != MF_JSON_NULL)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: \"text_config\" must be an object",
                      name);
    struct reader r = {.lm = tc && tc->type == MF_JSON_OBJECT ? tc : root, .root = root,
                       .name = name, .err = err, .errlen = errlen};
    // The top-level model_type names the checkpoint family (text_config's is
    // "qwen3_5_moe_text").
    const char *mt = NULL;
    if (mf_json_get_str(root, "model_type", &mt) < 0 ||
        (!mt && mf_json_get_str(r.lm, "model_type", &mt) < 0))
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: \"model_type\" must be a string",
                      name);
    if (!mt)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: required key \"model_type\" is missing (supported: " SUPPORTED
                      ")", name);
    int found = 0;
    for (int i = 0; i < N_FAMILIES; i++) {
        if (strcmp(mt, families[i].model_type) == 0) {
            cfg->arch = families[i].id;
            found = 1;
        }
    }
    if (!found)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: model_type \"%.64s\" is not supported (supported: " SUPPORTED ")",
                      name, mt);
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", mt);

    int rc;
    double eps = 0;
    int ds = cfg->arch == MF_ARCH_DEEPSEEK_V3;
    int hybrid = cfg->arch == MF_ARCH_QWEN3_5_MOE || cfg->arch == MF_ARCH_QWEN3_NEXT;
    if ((rc = rd_pos_int(&r, "hidden_size", 1, &cfg->hidden_size)) ||
        (rc = rd_pos_int(&r, "num_hidden_layers", 1, &cfg->num_hidden_layers)) ||
        (rc = rd_pos_int(&r, "num_attention_heads", 1, &cfg->num_attention_heads)) ||
        (rc = rd_int(&r, "num_key_value_heads", !ds, &cfg->num_key_value_heads)) ||
        (rc = rd_int(&r, "head_dim", 0, &cfg->head_dim)) ||
        (rc = rd_pos_int(&r, "vocab_size", 1, &cfg->vocab_size)) ||
        (rc = rd_pos_int(&r, "max_position_embeddings", 1, &cfg->max_position_embeddings)) ||
        (rc = rd_num(&r, "rms_norm_eps", 1, &eps)) ||
        (rc = rd_bool(&r, "tie_word_embeddings", &cfg->tie_word_embeddings)) ||
        (rc = rd_token(&r, "bos_token_id", &cfg->bos_token_id)) ||
        (rc = rd_token(&r, "eos_token_id", &cfg->eos_token_id)))
        return rc;
    // Every per-layer table is sized by it before any tensor is looked at.
    if (cfg->num_hidden_layers > MF_CONFIG_MAX_LAYERS)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: num_hidden_layers is %d, more than the %d this build supports",
                      name, cfg->num_hidden_layers, MF_CONFIG_MAX_LAYERS);
    if (!(eps > 0 && eps < 1))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: rms_norm_eps must be in (0, 1), got %g", name, eps);
    cfg->rms_norm_eps = (float)eps;
    if (ds && !cfg->num_key_value_heads)
        cfg->num_key_value_heads = cfg->num_attention_heads;
    if ((rc = positive(&r, "num_key_value_heads", cfg->num_key_value_heads)))
        return rc;
    if (cfg->num_attention_heads % cfg->num_key_value_heads != 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: num_attention_heads (%d) must be a multiple of "
                      "num_key_value_heads (%d)", name, cfg->num_attention_heads,
                      cfg->num_key_value_heads);
    if (!ds) {
        if (!cfg->head_dim) {
            if (cfg->hidden_size % cfg->num_attention_heads != 0)
                return mf_err(err, errlen, MF_ERR_FORMAT,
                              "%s: no head_dim and hidden_size (%d) is not a multiple of "
                              "num_attention_heads (%d)", name, cfg->hidden_size,
                              cfg->num_attention_heads);
            cfg->head_dim = cfg->hidden_size / cfg->num_attention_heads;
        }
        if ((rc = positive(&r, "head_dim", cfg->head_dim)))
            return rc;
    }

    // MoE keys shared by the qwen families (deepseek reads n_routed_experts below).
    cfg->decoder_sparse_step = 1;
    cfg->norm_topk_prob = cfg->arch == MF_ARCH_QWEN3_5_MOE || ds;   // mlx-lm defaults
    if ((!ds && (rc = rd_int(&r, "num_experts", 0, &cfg->num_experts))) ||
        (rc = rd_int(&r, "num_experts_per_tok", 0, &cfg->num_experts_per_tok)) ||
        (rc = rd_int(&r, "moe_intermediate_size", 0, &cfg->moe_intermediate_size)) ||
        (rc = rd_int(&r, "shared_expert_intermediate_size", 0,
                     &cfg->shared_expert_intermediate_size)) ||
        (rc = rd_int(&r, "intermediate_size", 0, &cfg->intermediate_size)) ||
        (rc = rd_bool(&r, "norm_topk_prob", &cfg->norm_topk_prob)) ||
        (rc = rd_pos_int(&r, "decoder_sparse_step", 0, &cfg->decoder_sparse_step)))
        return rc;
    if (cfg->shared_expert_intermediate_size < 0 || cfg->intermediate_size < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "%s: intermediate sizes must not be negative", name);
    if (!ds && (rc = read_mlp_only(cfg, &r)))
        return rc;
    if (hybrid && (rc = read_hybrid(cfg, &r)))
        return rc;
    if (ds && (rc = read_deepseek(cfg, &r)))
        return rc;
    if (cfg->num_experts < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: num_experts must not be negative",
                      name);
    if (cfg->num_experts > 0) {
        if (cfg->num_experts_per_tok < 1 || cfg->num_experts_per_tok > cfg->num_experts)
            return mf_err(err, errlen, MF_ERR_FORMAT,
                          "%s: num_experts_per_tok (%d) must be in [1, num_experts = %d]",
                          name, cfg->num_experts_per_tok, cfg->num_experts);
        if ((rc = positive(&r, "moe_intermediate_size", cfg->moe_intermediate_size)))
            return rc;
    }
    if ((rc = read_rope(cfg, &r)) || (rc = read_quant(cfg, &r)))
        return rc;
    return derive_layers(cfg, &r);
}

int mf_config_parse(struct mf_config *cfg, const char *text, size_t len,
                    const char *name, char *err, size_t errlen) {
    memset(cfg, 0, sizeof *cfg);
    cfg->bos_token_id = -1;
    cfg->eos_token_id = -1;
    if (!name)
        name = "config.json";
    mf_json_doc *doc = NULL;
    int rc = mf_json_parse(&doc, text, len, name, err, errlen);
    if (rc)
        return rc;
    rc = parse_root(cfg, mf_json_root(doc), name, err, errlen);
    mf_json_free(doc);
    if (!rc) {
        cfg->json_text = malloc(len + 1);
        if (!cfg->json_text) {
            rc = mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory", name);
        } else {
            memcpy(cfg->json_text, text, len);
            cfg->json_text[len] = '\0';
        }
    }
    if (rc)
        mf_config_free(cfg);
    return rc;
}

int mf_config_load(struct mf_config *cfg, const char *path, char *err, size_t errlen) {
    memset(cfg, 0, sizeof *cfg);
    char *text = NULL;
    size_t len = 0;
    int rc = mf_read_file(path, &text, &len, err, errlen);
    if (rc)
        return rc;
    rc = mf_config_parse(cfg, text, len, path, err, errlen);
    free(text);
    return rc;
}

void mf_config_free(struct mf_config *cfg) {
    if (!cfg)
        return;
    free(cfg->mlp_only_layers);
    for (int i = 0; i < cfg->n_quant_overrides; i++)
        free(cfg->quant_overrides[i].path);
    free(cfg->quant_overrides);
    free(cfg->layer_is_linear);
    free(cfg->layer_is_moe);
    free(cfg->json_text);
    memset(cfg, 0, sizeof *cfg);
    cfg->bos_token_id = -1;
    cfg->eos_token_id = -1;
}
