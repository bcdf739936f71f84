/*
 * config.h — the run-time model description, read from a model directory's
 * config.json (the checkpoint's own file, copied by prep).
 *
 * Field names are the config.json keys (mlx-lm ModelArgs habit) so that a reader can
 * grep a key from the file straight into the code. This struct holds the keys every
 * family shares; a family's own keys are read by its file (models/<type>.c,
 * mf_arch.read_config) into a private struct hung off arch_cfg. Layer kinds (linear
 * attention or not, MoE or dense) are derived by that reader once, at load, so the
 * forward passes never re-derive them.
 */
#ifndef MF_CONFIG_H
#define MF_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "core/json.h"

// Ids of the first four families: fixed, as snapshots of format version 1 hold them.
// A family added later picks its own number in its file (mf_arch.id).
enum mf_arch_id {
    MF_ARCH_QWEN3_5_MOE = 1,   // "qwen3_5_moe" (Qwen3.5 / Qwen3.6 MoE), text_config nested
    MF_ARCH_QWEN3_NEXT = 2,    // "qwen3_next"
    MF_ARCH_DEEPSEEK_V3 = 3,   // "deepseek_v3" (also Cogito-V2, Kimi-K2 remaps)
    MF_ARCH_QWEN3_MOE = 4,     // "qwen3_moe"
};

// A per-module quantization override from the config's "quantization" block,
// keyed by the module path as written there (e.g.
// "language_model.model.layers.0.mlp.gate").
struct mf_quant_override {
    char *path;        // owned
    int quantized;     // 0 when the entry is `false` (module kept in float)
    int bits;
    int group_size;
};

struct mf_arch;

// The reader an architecture's config hook gets (mf_arch.read_config): `lm` is the
// language-model object (text_config or the root), `root` the document root; a key
// absent from lm is looked up in root. Every mf_cfg_* getter below returns 0 or an
// MF_ERR_FORMAT naming the file (`name`) and the key.
struct mf_cfg_reader {
    const mf_json *lm, *root;
    const char *name;
    char *err;
    size_t errlen;
};

struct mf_config {
    int arch;                      // enum mf_arch_id for the first four families; a
                                   // new family's id is its own (mf_arch.id)
    const struct mf_arch *family;  // the architecture read_config dispatched to
    char model_type[32];

    // ---- shared by every family
    int hidden_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;                  // explicit or hidden/heads; 0 when the family has
                                   // none (mf_arch.no_head_dim: deepseek's MLA)
    int vocab_size;
    int max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    double partial_rotary_factor;  // 1.0 when absent (family default otherwise)
    int tie_word_embeddings;
    int bos_token_id;              // -1 when absent
    int eos_token_id;              // -1 when absent (first id if config holds a list)

    // ---- MoE basics every family has. num_experts is read from the family's key
    // (mf_arch.experts_key: num_experts or n_routed_experts).
    int num_experts;
    int num_experts_per_tok;
    int moe_intermediate_size;
    int intermediate_size;                // dense FFN width
    int norm_topk_prob;                   // family default (mf_arch), config otherwise

    // ---- quantization block
    int quant_bits;                // default bits, 0 = no quantization block
    int quant_group_size;
    int n_quant_overrides;
    struct mf_quant_override *quant_overrides;  // owned

    // ---- the family's own keys: a private struct of its file (models/<type>.h),
    // made by mf_arch.read_config and released by mf_arch.free_config.
    void *arch_cfg;

    // ---- derived per layer, [num_hidden_layers], owned; filled by read_config
    uint8_t *layer_is_linear;      // hybrid: GatedDeltaNet mixer
    uint8_t *layer_is_moe;         // routed-expert FFN (else dense SwiGLU)
    int n_moe_layers;

    char *json_text;               // the file's text, owned (for mf_model_config_json)
};

/* ==== Key getters for architecture config readers ====
 * Integer/number getters leave *out untouched when the key is absent or null and not
 * required (so a default set before stays). */
int mf_cfg_int(const struct mf_cfg_reader *r, const char *key, int required, int *out);
// mf_cfg_int, then the value (read, or the default already in *out) must be positive.
int mf_cfg_pos_int(const struct mf_cfg_reader *r, const char *key, int required,
                   int *out);
int mf_cfg_num(const struct mf_cfg_reader *r, const char *key, int required,
               double *out);
// A number key of object `obj` (a nested block such as rope_scaling).
int mf_cfg_num_in(const struct mf_cfg_reader *r, const mf_json *obj, const char *key,
                  double *out);
int mf_cfg_bool(const struct mf_cfg_reader *r, const char *key, int *out);
// The node of `key` (lm first, then root); NULL when absent.
const mf_json *mf_cfg_node(const struct mf_cfg_reader *r, const char *key);
// v must be positive; when it is not because the key is absent, the message says the
// key is missing rather than "got 0".
int mf_cfg_positive(const struct mf_cfg_reader *r, const char *key, long long v);
// The list of layer indices under `key` (e.g. mlp_only_layers) into a malloc'd array
// (*out NULL, *n 0 when absent or empty); entries must be in [0, num_hidden_layers).
int mf_cfg_layer_list(const struct mf_cfg_reader *r, const char *key, int n_layers,
                      int **out, int *n);

// Parse config.json at `path` into *cfg (zeroed first). Nested "text_config" (Qwen3.5)
// is read as the LM config; top-level keys fill what it lacks. Required keys missing,
// unknown model_type or inconsistent values give MF_ERR_FORMAT with a message naming
// the file and key. On failure *cfg holds nothing that needs freeing.
int mf_config_load(struct mf_config *cfg, const char *path, char *err, size_t errlen);

// Same from an in-memory text (for tests and fuzzing); `name` is used in messages.
int mf_config_parse(struct mf_config *cfg, const char *text, size_t len,
                    const char *name, char *err, size_t errlen);

void mf_config_free(struct mf_config *cfg);

// Quantization of module `path` (no .weight suffix) per the config's block: the
// override when one names it, else the defaults. Returns 1 and fills bits/gs when the
// module is quantized by the block's rule, 0 when the override says float.
// (Whether a module is quantized in a file is decided by the presence of .scales;
// this gives bits/group size for it.)
int mf_config_quant_for(const struct mf_config *cfg, const char *path, int *bits, int *gs);

#endif /* MF_CONFIG_H */
