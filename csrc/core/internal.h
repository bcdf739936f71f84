/*
 * internal.h — the definitions behind the opaque mf_model and mf_ctx, and the
 * architecture table through which core/ reaches the forward files in models/.
 *
 * Ownership: an mf_model owns its config, manifest, weight mapping, backend and expert
 * store, plus the architecture's bound weights (arch_weights). An mf_ctx owns its exec
 * (thread pool / stream), its architecture state (KV caches, linear-attention state,
 * scratch: arch_state) and its error message. Nothing here is global.
 */
#ifndef MF_INTERNAL_H
#define MF_INTERNAL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "backends/backend.h"
#include "core/config.h"
#include "core/manifest.h"
#include "io/expert_reader.h"
#include "io/expert_store.h"
#include "moeflux.h"

#define MF_ERRMSG_LEN 1024

// One piece of sequence state. Position-indexed state (KV caches, MLA latent cache)
// has row_bytes > 0: rows [0, n_past) of row_bytes each are live. Fixed-size state
// (conv history, delta-rule recurrence) has row_bytes == 0 and fixed_bytes > 0; it
// cannot be rewound by position, which is why truncation of hybrid models needs
// checkpoints of it.
// A positional segment may be a ring (sliding-window attention): ring_rows > 0 rows,
// position p in row p % ring_rows, of which only the last ring_keep positions before
// n_past matter; a snapshot holds those (min(n_past, ring_keep) rows, oldest first),
// and truncation is exact while the ring still holds them.
struct mf_state_seg {
    void *buf;                 // device pointer (owned by the arch state)
    uint64_t row_bytes;        // bytes per position, 0 for fixed state
    uint64_t fixed_bytes;      // bytes of fixed state, 0 for positional state
    int layer;                 // model layer index
    int kind;                  // MF_SEG_* below
    int ring_rows;             // 0: position p in row p (not a ring)
    int ring_keep;             // ring: live positions before n_past (<= ring_rows)
};

enum mf_seg_kind {
    MF_SEG_KEY = 1,            // attention keys [n_ctx, n_kv_head, head_dim] f32
    MF_SEG_VALUE = 2,          // attention values
    MF_SEG_MLA_LATENT = 3,     // MLA cache [n_ctx, kv_lora_rank + qk_rope_head_dim] f32
    MF_SEG_CONV = 4,           // GatedDeltaNet conv history [K-1, conv_dim] f32
    MF_SEG_RECURRENT = 5,      // GatedDeltaNet state [nv, dv, dk] f32
};

// One identity field of a snapshot (core/state.c): a config value that must agree
// between the model that wrote a snapshot and the one that reads it.
struct mf_ident_field {
    const char *name;   // config.json key, so a refusal can be grepped into the config
    int is_float;       // 1: a real constant (hashed with the others), 0: an integer
    int64_t i;
    double f;
};

// Most identity fields a family may add to the shared ones.
#define MF_IDENT_ARCH_MAX 40

// One architecture family, registered from its own file (models/<type>.c) through the
// table in models/arch.c: its config keys, layer kinds, snapshot identity, weights,
// state and forward pass.
struct mf_arch {
    const char *model_type;     // config.json model_type
    const char *alias;          // another model_type run as this family, or NULL
    int id;                     // snapshot identity: enum mf_arch_id for the first four,
                                // a new family's own unique number after them

    /* ---- config (core/config.c reads the shared keys, then calls read_config) */
    const char *experts_key;    // key of the routed expert count (num_experts,
                                // n_routed_experts); NULL: the family has none
    const char *expert_ff_key;  // key of the routed experts' width (gpt_oss:
                                // intermediate_size); NULL: moe_intermediate_size
    int no_head_dim;            // MLA: no head_dim, num_key_value_heads defaults to
                                // num_attention_heads
    int norm_topk_default;      // norm_topk_prob when the key is absent
    double rope_theta_default;  // rope_theta when absent (0: 10000)
    double partial_rotary_default;  // partial_rotary_factor when absent (0: 1)
    // Reads the family's own keys into a private struct at cfg->arch_cfg and fills
    // cfg->layer_is_linear / layer_is_moe (allocated, zeroed, by the caller). Returns 0
    // or an MF_ERR_* with a message naming the file and key (through r).
    int (*read_config)(struct mf_config *cfg, const struct mf_cfg_reader *r);
    void (*free_config)(void *arch_cfg);   // releases what read_config made
    // The family's snapshot identity fields after the shared ones (core/state.c):
    // fills up to cap entries, returns the count. NULL: none.
    int (*ident)(const struct mf_config *cfg, struct mf_ident_field *out, int cap);

    /* ---- MoE */
    int router;                 // enum mf_router_kind (models/moe.h) of routed layers
    const char *const *expert_components;  // names of the expert FFN's projections in
                                           // layout.json, NULL-terminated

    /* ---- run */
    // Resolve and validate every tensor the forward needs into m->arch_weights.
    // Messages name the tensor, expected and actual shape/dtype.
    int (*bind)(mf_model *m, char *err, size_t errlen);
    void (*unbind)(mf_model *m);
    // Allocate ctx->arch_state (caches sized for ctx->n_ctx, scratch for the largest
    // batch) through ctx->be / ctx->ex. The forward pass allocates nothing.
    int (*state_new)(mf_ctx *ctx, char *err, size_t errlen);
    void (*state_free)(mf_ctx *ctx);
    // Zero every piece of sequence state (KV, conv, recurrence, checkpoints).
    void (*state_reset)(mf_ctx *ctx);
    // Evaluate tokens at positions ctx->n_past .. +n_tok-1. Must leave the committed
    // state untouched unless it returns MF_OK (see ctx state double-buffering in the
    // arch file). Does not advance n_past; the caller does on MF_OK.
    int (*forward)(mf_ctx *ctx, const int32_t *tokens, int n_tok, float *logits,
                   int all_logits);
    // The sequence state as a list of segments (device buffers), so core/state.c can
    // snapshot, restore and checkpoint any architecture generically. Fills up to cap
    // entries and returns the total count. Buffers must be the COMMITTED state.
    int (*state_segments)(const mf_ctx *ctx, struct mf_state_seg *segs, int cap);
};

// Find an architecture by its snapshot id / by a config model_type (or its alias);
// NULL if unsupported.
const struct mf_arch *mf_arch_find(int id);
const struct mf_arch *mf_arch_by_type(const char *model_type);
// The supported model_type names, comma-separated, into buf (for error messages).
void mf_arch_names(char *buf, size_t n);

struct mf_model {
    char *dir;                        // owned copy of the model directory path
    struct mf_model_params params;    // log callback etc. (backend name not kept)
    struct mf_config cfg;
    struct mf_manifest manifest;
    int weights_fd;                   // -1 when not open
    void *weights_map;                // mmap of model_weights.bin, NULL when none
    uint64_t weights_bytes;
    int64_t weights_mtime_ns;         // of model_weights.bin at open (mf_weights_check)
    struct mf_backend *be;            // owned
    const void *weights_dev;          // be->ops->map_weights view of weights_map
    struct mf_derived *derived;       // f32 copies made at bind (mf_bind_vector_f32)
    mf_expert_store *experts;         // owned; NULL for models without routed experts
    const struct mf_arch *arch;
    void *arch_weights;               // owned by the arch (unbind frees)
    int64_t expert_bytes_per_token;
    // Resident experts (mf_model_params.gpu_experts): per layer, the device view of
    // its expert file (map_weights of the file's mapping), NULL for non-MoE layers;
    // the array itself NULL when the experts stream. Shared by the model's contexts.
    const void **experts_dev;
    uint64_t experts_dev_layer_bytes;
};

struct mf_ctx {
    const mf_model *model;            // borrowed
    struct mf_ctx_params params;
    struct mf_backend *be;            // borrowed from model
    struct mf_exec *ex;               // owned
    int n_ctx;
    int n_past;
    atomic_int abort_flag;            // set by mf_ctx_abort from any thread
    void *arch_state;                 // owned by the arch (state_free frees)
    struct mf_ctx_stats stats;
    enum mf_io_mode io_mode;          // asked for (params.io_mode parsed)
    char io_mode_in_effect[16];       // set by the expert reader (models/moe.c)
    char io_note[320];
    int64_t n_evals;                  // eval calls made (debug tap index)
    int tap_failed;                   // debug tap: a write failed, stop tapping
    void *checkpoints;                // owned by core/state.c (automatic checkpoints)
    char errmsg[MF_ERRMSG_LEN];
};

// Bind helpers used by every arch file (core/weights.c).
// A linear/embedding module `path` (no suffix) of logical shape [n_out, n_in]: float
// when `path.weight` has no `path.scales`, else quantized with bits/group size from the
// manifest or inferred from shapes and cross-checked. When n_stack > 0 the tensors
// carry a leading [n_stack] dimension (MultiLinear / stacked). Returns MF_ERR_SHAPE /
// MF_ERR_FORMAT with a message naming the tensor, expected and actual.
int mf_bind_linear(const mf_model *m, struct mf_weight *out, const char *path,
                   int64_t n_stack, int64_t n_out, int64_t n_in, char *err,
                   size_t errlen);
// A float tensor `name` (full name, with suffix) of n elements (any shape with that
// element count). F32/F16/BF16 accepted.
int mf_bind_vector(const mf_model *m, struct mf_weight *out, const char *name,
                   int64_t n, char *err, size_t errlen);
// mf_bind_vector, converted to F32 once at bind when stored as F16/BF16 (a copy owned
// by the model and mapped through the backend; an F32 tensor is viewed in place), for
// vectors an op reads as f32 (the noaux_tc router bias).
int mf_bind_vector_f32(mf_model *m, struct mf_weight *out, const char *name, int64_t n,
                       char *err, size_t errlen);
// Release what mf_bind_vector_f32 made (mf_model_free, before the backend).
void mf_derived_free(mf_model *m);
// Device memory that experts may take of free_b free bytes: 85% of it less 2 GiB kept
// for the contexts' KV caches, state and scratch (may be negative). The one rule of
// gpu_experts="auto" (resident when they fit) and the device expert cache's default.
double mf_device_usable_bytes(uint64_t free_b);
// 1 if the manifest has `name`.
int mf_has_tensor(const mf_model *m, const char *name);

// MF_ERR_IO if model_weights.bin was truncated or rewritten since it was mapped (its
// size or mtime changed): reading the mapping then could raise SIGBUS or see other
// bytes. Checked before every eval; a change during an eval is not caught.
int mf_weights_check(const mf_model *m, char *err, size_t errlen);

// Logging through the model's callback (no-op without one).
void mf_log(const mf_model *m, int level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

// Set ctx->errmsg and return status.
int mf_ctx_fail(mf_ctx *ctx, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

// Called by mf_ctx_eval after a successful forward (core/state.c): lets the state
// module take automatic checkpoints of fixed-size state for exact truncation.
void mf_state_after_eval(mf_ctx *ctx);
// Called by mf_ctx_reset (core/state.c): drops checkpoints.
void mf_state_on_reset(mf_ctx *ctx);

// Debug tap (core/tap.c): append n floats of device buffer buf, named fmt % il, to
// $MOEFLUX_TAP_DIR. Reached only through MF_TAP in a -DMF_TAP_ENABLED build.
void mf_tap(mf_ctx *ctx, const char *fmt, int il, const float *buf, int64_t n);

// Poll abort flag and abort callback; 1 if the eval must stop.
int mf_ctx_should_abort(mf_ctx *ctx);

#endif /* MF_INTERNAL_H */
