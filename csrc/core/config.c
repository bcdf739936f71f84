/*
 * config.c — config.json into struct mf_config: the keys every family shares, then
 * the family's own reader (mf_arch.read_config, in its models/<type>.c), found by
 * model_type through the architecture table. No family is named here.
 *
 * Keys are read with mlx-lm's defaults (the oracle the forward passes are checked
 * against; model-math §2.1, §3.1, §4), the family-dependent ones (expert-count key,
 * norm_topk_prob, rope defaults, MLA's missing head_dim) taken from the family's
 * mf_arch. A nested "text_config" (qwen3_5_moe) is read as the language model, the
 * top-level keys filling what it lacks; rope settings may sit in "rope_parameters".
 * The getters are exported (config.h) for the family readers. This file reads no
 * weights: shapes are checked against the manifest by the weight binder.
 */
#include "core/config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/internal.h"
#include "core/json.h"

// Far above any real model (the largest have under 100 layers); a config claiming
// billions made the loader allocate and walk gigabytes of per-layer tables.
#define MF_CONFIG_MAX_LAYERS 65536

/* ==== Key readers ====
 * `lm` is the language-model object (text_config or the root), `root` the document
 * root; a key absent from lm is looked up in root. Each reader returns 0 or an
 * MF_ERR_FORMAT naming the file and key. */

const mf_json *mf_cfg_node(const struct mf_cfg_reader *r, const char *key) {
    const mf_json *v = mf_json_get(r->lm, key);
    if (!v && r->lm != r->root)
        v = mf_json_get(r->root, key);
    return v;
}

// Object that holds `key` (lm first), for the typed getters of json.h.
static const mf_json *rd_holder(const struct mf_cfg_reader *r, const char *key) {
    if (mf_json_get(r->lm, key) || r->lm == r->root)
        return r->lm;
    return r->root;
}

// Integer key: *out untouched when absent or null and !required.
int mf_cfg_int(const struct mf_cfg_reader *r, const char *key, int required, int *out) {
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

int mf_cfg_num_in(const struct mf_cfg_reader *r, const mf_json *obj, const char *key,
                     double *out) {
    int rc = mf_json_get_num(obj, key, out);
    if (rc < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT, "%s: key \"%s\" must be a number",
                      r->name, key);
    return 0;
}

int mf_cfg_num(const struct mf_cfg_reader *r, const char *key, int required, double *out) {
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

int mf_cfg_bool(const struct mf_cfg_reader *r, const char *key, int *out) {
    int rc = mf_json_get_bool(rd_holder(r, key), key, out);
    if (rc < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" must be true or false", r->name, key);
    return 0;
}

// A token id given as an int or a list of ints (first one); -1 when absent or empty.
static int rd_token(const struct mf_cfg_reader *r, const char *key, int *out) {
    *out = -1;
    const mf_json *v = mf_cfg_node(r, key);
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
int mf_cfg_positive(const struct mf_cfg_reader *r, const char *key, long long v) {
    const mf_json *node = mf_cfg_node(r, key);
    if (v <= 0 && (!node || node->type == MF_JSON_NULL))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: required key \"%s\" is missing", r->name, key);
    if (v <= 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: key \"%s\" must be positive, got %lld", r->name, key, v);
    return 0;
}

// rd_int, then the value (read, or the default already in *out) must be positive.
int mf_cfg_pos_int(const struct mf_cfg_reader *r, const char *key, int required, int *out) {
    int rc = mf_cfg_int(r, key, required, out);
    return rc ? rc : mf_cfg_positive(r, key, *out);
}

/* ==== Quantization block ==== */

static int valid_bits(int b) {
    return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8;
}

static int valid_gs(int g) {
    return g == 32 || g == 64 || g == 128;
}

// Checks the "mode" of a block or an override (absent = affine: older checkpoints).
// A module override may say "mxfp4" (gpt-oss's routed experts, which the expert store
// reads; a linear bound from model_weights.bin in that mode fails at bind, naming it).
static int check_mode(const struct mf_cfg_reader *r, const mf_json *obj, const char *where,
                      int allow_mxfp4) {
    const mf_json *m = mf_json_get(obj, "mode");
    if (!m || m->type == MF_JSON_NULL)
        return 0;
    if (m->type != MF_JSON_STRING)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: quantization mode of %s must be a string", r->name, where);
    if (strcmp(m->str, "affine") != 0 && !(allow_mxfp4 && strcmp(m->str, "mxfp4") == 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: quantization mode \"%s\" of %s is not supported (only "
                      "\"affine\")", r->name, m->str, where);
    return 0;
}

static int read_bits_gs(const struct mf_cfg_reader *r, const mf_json *obj, const char *where,
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

static int read_quant(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    const mf_json *q = mf_json_get(r->root, "quantization");
    if (!q || q->type == MF_JSON_NULL)
        q = mf_json_get(r->root, "quantization_config");
    if (!q || q->type == MF_JSON_NULL)
        return 0;
    if (q->type != MF_JSON_OBJECT)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"quantization\" must be an object", r->name);
    int rc = check_mode(r, q, "the quantization block", 0);
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
        if ((rc = check_mode(r, e, where, 1)))
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
// configs) first, then flat keys; defaults per family (mf_arch).
static int read_rope(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    const struct mf_arch *a = cfg->family;
    cfg->rope_theta = a->rope_theta_default > 0 ? a->rope_theta_default : 10000.0;
    cfg->partial_rotary_factor = a->partial_rotary_default > 0 ? a->partial_rotary_default
                                                              : 1.0;
    int rc;
    if ((rc = mf_cfg_num(r, "rope_theta", 0, &cfg->rope_theta)) ||
        (rc = mf_cfg_num(r, "partial_rotary_factor", 0, &cfg->partial_rotary_factor)))
        return rc;
    const mf_json *rp = mf_cfg_node(r, "rope_parameters");
    if (rp && rp->type == MF_JSON_OBJECT) {
        if ((rc = mf_cfg_num_in(r, rp, "rope_theta", &cfg->rope_theta)) ||
            (rc = mf_cfg_num_in(r, rp, "partial_rotary_factor", &cfg->partial_rotary_factor)))
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

int mf_cfg_layer_list(const struct mf_cfg_reader *r, const char *key, int n_layers,
                      int **out, int *n) {
    *out = NULL;
    *n = 0;
    const mf_json *v = mf_cfg_node(r, key);
    if (!v || v->type == MF_JSON_NULL)
        return 0;
    if (v->type != MF_JSON_ARRAY)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"%s\" must be a list of layer indices", r->name, key);
    if (v->n == 0)
        return 0;
    *out = calloc(v->n, sizeof **out);
    if (!*out)
        return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    for (size_t i = 0; i < v->n; i++) {
        const mf_json *e = v->items[i];
        if (e->type != MF_JSON_NUMBER || !e->num_is_int || e->inum < 0 ||
            e->inum >= n_layers)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: \"%s\"[%zu] is not a layer index in [0, %d)", r->name,
                          key, i, n_layers);
        (*out)[(*n)++] = (int)e->inum;
    }
    return 0;
}

/* ==== Layer kinds ==== */

// The family's reader filled the tables; count them and check the dense width.
static int count_layers(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    int n_dense = 0;
    for (int i = 0; i < cfg->num_hidden_layers; i++) {
        cfg->n_moe_layers += cfg->layer_is_moe[i] != 0;
        n_dense += !cfg->layer_is_moe[i];
    }
    if (n_dense && cfg->intermediate_size <= 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: %d layer(s) have a dense FFN but \"intermediate_size\" is "
                      "missing or not positive", r->name, n_dense);
    return 0;
}

// The family's keys, then its layer kinds (tables allocated here, zeroed).
static int read_family(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    size_t L = (size_t)cfg->num_hidden_layers;
    cfg->layer_is_linear = calloc(L, 1);
    cfg->layer_is_moe = calloc(L, 1);
    if (!cfg->layer_is_linear || !cfg->layer_is_moe)
        return mf_err(r->err, r->errlen, MF_ERR_NOMEM, "%s: out of memory", r->name);
    int rc = cfg->family->read_config ? cfg->family->read_config(cfg, r) : 0;
    return rc ? rc : count_layers(cfg, r);
}

/* ==== Parse ==== */

// model_type -> the family (models/arch.c). The top-level model_type names the
// checkpoint family (text_config's is "qwen3_5_moe_text").
static int find_family(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    const char *mt = NULL;
    char names[256];
    mf_arch_names(names, sizeof names);
    if (mf_json_get_str(r->root, "model_type", &mt) < 0 ||
        (!mt && mf_json_get_str(r->lm, "model_type", &mt) < 0))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: \"model_type\" must be a string", r->name);
    if (!mt)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: required key \"model_type\" is missing (supported: %s)",
                      r->name, names);
    cfg->family = mf_arch_by_type(mt);
    if (!cfg->family)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: model_type \"%.64s\" is not supported (supported: %s)",
                      r->name, mt, names);
    cfg->arch = cfg->family->id;
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", mt);
    return 0;
}

static int read_shape(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    double eps = 0;
    int mla = cfg->family->no_head_dim;
    int rc;
    if ((rc = mf_cfg_pos_int(r, "hidden_size", 1, &cfg->hidden_size)) ||
        (rc = mf_cfg_pos_int(r, "num_hidden_layers", 1, &cfg->num_hidden_layers)) ||
        (rc = mf_cfg_pos_int(r, "num_attention_heads", 1, &cfg->num_attention_heads)) ||
        (rc = mf_cfg_int(r, "num_key_value_heads", !mla, &cfg->num_key_value_heads)) ||
        (rc = mf_cfg_int(r, "head_dim", 0, &cfg->head_dim)) ||
        (rc = mf_cfg_pos_int(r, "vocab_size", 1, &cfg->vocab_size)) ||
        (rc = mf_cfg_pos_int(r, "max_position_embeddings", 1,
                             &cfg->max_position_embeddings)) ||
        (rc = mf_cfg_num(r, "rms_norm_eps", 1, &eps)) ||
        (rc = mf_cfg_bool(r, "tie_word_embeddings", &cfg->tie_word_embeddings)) ||
        (rc = rd_token(r, "bos_token_id", &cfg->bos_token_id)) ||
        (rc = rd_token(r, "eos_token_id", &cfg->eos_token_id)))
        return rc;
    // Every per-layer table is sized by it before any tensor is looked at.
    if (cfg->num_hidden_layers > MF_CONFIG_MAX_LAYERS)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: num_hidden_layers is %d, more than the %d this build supports",
                      r->name, cfg->num_hidden_layers, MF_CONFIG_MAX_LAYERS);
    if (!(eps > 0 && eps < 1))
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: rms_norm_eps must be in (0, 1), got %g", r->name, eps);
    cfg->rms_norm_eps = (float)eps;
    return 0;
}

static int check_heads(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    int rc;
    if (cfg->family->no_head_dim && !cfg->num_key_value_heads)
        cfg->num_key_value_heads = cfg->num_attention_heads;
    if ((rc = mf_cfg_positive(r, "num_key_value_heads", cfg->num_key_value_heads)))
        return rc;
    if (cfg->num_attention_heads % cfg->num_key_value_heads != 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: num_attention_heads (%d) must be a multiple of "
                      "num_key_value_heads (%d)", r->name, cfg->num_attention_heads,
                      cfg->num_key_value_heads);
    if (cfg->family->no_head_dim)
        return 0;
    if (!cfg->head_dim) {
        if (cfg->hidden_size % cfg->num_attention_heads != 0)
            return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                          "%s: no head_dim and hidden_size (%d) is not a multiple of "
                          "num_attention_heads (%d)", r->name, cfg->hidden_size,
                          cfg->num_attention_heads);
        cfg->head_dim = cfg->hidden_size / cfg->num_attention_heads;
    }
    return mf_cfg_positive(r, "head_dim", cfg->head_dim);
}

// The MoE keys every family has; the expert count under the family's key.
static int read_moe(struct mf_config *cfg, const struct mf_cfg_reader *r) {
    const struct mf_arch *a = cfg->family;
    const char *ff_key = a->expert_ff_key ? a->expert_ff_key : "moe_intermediate_size";
    cfg->norm_topk_prob = a->norm_topk_default;
    int rc;
    if ((a->experts_key && (rc = mf_cfg_int(r, a->experts_key, 0, &cfg->num_experts))) ||
        (rc = mf_cfg_int(r, "num_experts_per_tok", 0, &cfg->num_experts_per_tok)) ||
        (rc = mf_cfg_int(r, ff_key, 0, &cfg->moe_intermediate_size)) ||
        (rc = mf_cfg_int(r, "intermediate_size", 0, &cfg->intermediate_size)) ||
        (rc = mf_cfg_bool(r, "norm_topk_prob", &cfg->norm_topk_prob)))
        return rc;
    if (cfg->intermediate_size < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: intermediate sizes must not be negative", r->name);
    if (cfg->num_experts < 0)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: %s must not be negative", r->name, a->experts_key);
    if (cfg->num_experts == 0)
        return 0;
    if (cfg->num_experts_per_tok < 1 || cfg->num_experts_per_tok > cfg->num_experts)
        return mf_err(r->err, r->errlen, MF_ERR_FORMAT,
                      "%s: num_experts_per_tok (%d) must be in [1, num_experts = %d]",
                      r->name, cfg->num_experts_per_tok, cfg->num_experts);
    return mf_cfg_positive(r, ff_key, cfg->moe_intermediate_size);
}

static int parse_root(struct mf_config *cfg, const mf_json *root, const char *name,
                      char *err, size_t errlen) {
    if (!root || root->type != MF_JSON_OBJECT)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: top level must be an object", name);
    const mf_json *tc = mf_json_get(root, "text_config");
    if (tc && tc->type != MF_JSON_OBJECT && tc->type != MF_JSON_NULL)
        return mf_err(err, errlen, MF_ERR_FORMAT, "%s: \"text_config\" must be an object",
                      name);
    struct mf_cfg_reader r = {.lm = tc && tc->type == MF_JSON_OBJECT ? tc : root,
                              .root = root, .name = name, .err = err, .errlen = errlen};
    int rc;
    if ((rc = find_family(cfg, &r)) || (rc = read_shape(cfg, &r)) ||
        (rc = check_heads(cfg, &r)) || (rc = read_moe(cfg, &r)) ||
        (rc = read_rope(cfg, &r)) || (rc = read_quant(cfg, &r)))
        return rc;
    return read_family(cfg, &r);
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
    if (cfg->arch_cfg && cfg->family && cfg->family->free_config)
        cfg->family->free_config(cfg->arch_cfg);
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
