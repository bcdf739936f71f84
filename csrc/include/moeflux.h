/*
 * moeflux.h — the public C API of moeflux.
 *
 * moeflux runs Mixture-of-Experts language models whose weights are far larger than
 * RAM by keeping the dense part resident (memory-mapped from model_weights.bin) and
 * reading only the experts the router picks, per layer and per token, from the
 * per-layer files in packed_experts/. The model is described at run time by the
 * model directory's config.json; nothing about a model is compiled in.
 *
 * This header is the specification: what is not declared here is not API.
 *
 * Objects
 *   mf_model  the loaded, read-only part: config, tensor manifest, weight mapping,
 *             expert files. Immutable after mf_model_load; any number of mf_ctx on any
 *             number of threads may share one.
 *   mf_ctx    one sequence: KV caches, linear-attention state, scratch, a thread pool.
 *             Used by one thread at a time. The one exception is mf_ctx_abort, which
 *             may be called from any thread.
 *
 * Status codes
 *   Every fallible function returns an int: 0 (MF_OK) on success, a negative MF_ERR_*
 *   on failure, or a positive code for "done, but act" (MF_ABORTED). Constructors
 *   write their message into a caller buffer (err, errlen); methods of mf_ctx leave it
 *   in mf_ctx_errmsg(ctx).
 *
 * Ownership words used below
 *   borrowed          the caller keeps it; it must stay valid for the duration stated.
 *   owned by X        valid until the next call on X or until X is freed.
 *   caller frees      with the named _free function.
 */
#ifndef MOEFLUX_H
#define MOEFLUX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

//
// Export macro and version
//

#if defined(MF_BUILDING_LIB) && defined(__GNUC__)
#define MF_API __attribute__((visibility("default")))
#else
#define MF_API
#endif

#define MF_VERSION_MAJOR 0
#define MF_VERSION_MINOR 1
#define MF_VERSION_PATCH 0

// The library version as "MAJOR.MINOR.PATCH". Static storage.
MF_API const char *mf_version(void);

//
// Status codes
//

enum mf_status {
    MF_OK = 0,                 // success
    MF_ERR_NOMEM = -1,         // an allocation failed
    MF_ERR_IO = -2,            // a file could not be opened, read, mapped or written
    MF_ERR_FORMAT = -3,        // a file's content is malformed or of an unsupported kind
    MF_ERR_SHAPE = -4,         // a tensor's shape or dtype disagrees with config.json
    MF_ERR_ARG = -5,           // a bad argument (NULL, out-of-range token, too long)
    MF_ERR_BACKEND = -6,       // the compute backend failed or is not available
    MF_ERR_STATE = -7,         // the request does not fit the ctx's state (snapshot
                               // of another model, truncation that cannot be exact)
    MF_ERR_UNSUPPORTED = -8,   // valid input this build does not support
    MF_ERR_NUMERIC = -9,       // NaN or infinity appeared in the computation (damaged
                               // weights or experts); the message names the layer
    MF_ABORTED = 1,            // mf_ctx_abort or the abort callback stopped a call;
                               // the ctx is as it was before the call
};

// A short static description of a status code ("out of memory", ...). Never NULL.
MF_API const char *mf_strerror(int status);

//
// Opaque handles
//

typedef struct mf_model mf_model;
typedef struct mf_ctx mf_ctx;

//
// Parameters
//

// Abort callback: polled between layers during evaluation. Return non-zero to stop.
// It runs on the thread that called mf_ctx_eval.
typedef int (*mf_abort_fn)(void *user);

// Log callback: receives one line at a time (no trailing newline). NULL = silent.
typedef void (*mf_log_fn)(void *user, int level, const char *line);

enum mf_log_level {
    MF_LOG_DEBUG = 0,  // diagnostic detail
    MF_LOG_INFO = 1,   // one-off facts (chosen SIMD path, I/O mode)
    MF_LOG_WARN = 2,   // something odd that does not stop the work
};

struct mf_model_params {
    const char *backend;   // "cpu" (default), "cuda", "metal" (macOS), "auto" (Metal,
                           // else CUDA, else CPU). borrowed for mf_model_load only.
    mf_log_fn log_fn;      // log callback, NULL = none (default)
    void *log_user;        // passed to log_fn
    int use_2bit;          // read packed_experts_2bit/ instead of packed_experts/;
                           // 0 = no (default), 1 = yes, -1 = only if 4-bit is absent
    const char *gpu_experts;  // where routed experts live: "stream" (read per token
                           // from the expert files), "resident" (every expert copied
                           // into device memory at load, routing stays on the device
                           // during decode), "auto" / NULL (default): resident on a
                           // backend with its own memory (CUDA) when the experts fit in
                           // 85% of its free memory less 2 GiB, else stream. Borrowed for
                           // the mf_model_load call only. mf_ctx_stats.io_note says which.
    // Device expert cache of each context when experts stream to a backend with its
    // own memory (CUDA): routed experts kept in device memory (LFRU, the policy of the
    // RAM cache), so a repeat needs no read and no copy. gpu_cache_fraction in [0, 1]
    // sizes it as that fraction of the model's routed experts (rounded down); else
    // gpu_cache_bytes >= 0 gives the bytes (rounded down to whole experts); both < 0
    // (default): as many experts as fit in 85% of the device's free memory less
    // 2 GiB, when the context is made. 0 keeps none (two staging slots, every expert
    // copied). Ignored where the device reads host memory (CPU, Metal) and when the
    // experts are resident.
    int64_t gpu_cache_bytes;     // default -1
    double gpu_cache_fraction;   // default -1
};

struct mf_ctx_params {
    int n_ctx;             // maximum tokens in the sequence; 0 = min(4096,
                           // max_position_embeddings) (default)
    int n_threads;         // compute threads; 0 = all online cores (default)
    int n_checkpoints;     // automatic checkpoints of fixed-size (linear-attention)
                           // state kept for exact mf_ctx_truncate; 0 = default (the 8
                           // most recent evaluation end points, at most 1 GiB of host
                           // RAM together), -1 = none, else that many (<= 64)
    mf_abort_fn abort_fn;  // polled between layers; NULL = none (default)
    void *abort_user;      // passed to abort_fn
    // Expert I/O (every mode gives bitwise the same results):
    const char *io_mode;   // "auto" (NULL, default): mmap when the experts fit in 3/4
                           // of RAM, else pread; when they stream to a GPU: mmap with
                           // the mappings page-locked for the device's copies when they
                           // take at most half the RAM, else pread into pinned slots
                           // (stats' io_note says which); "pread" (buffered reads into aligned
                           // slots), "mmap" (compute on the page-cache pages where they
                           // lie), "direct" (O_DIRECT / F_NOCACHE; pread if refused).
                           // The environment variable MOEFLUX_IO overrides it. Borrowed
                           // for the mf_ctx_new call only.
    int io_threads;        // expert I/O threads of this ctx; 0 = default (8)
    int64_t expert_cache_bytes;  // in-process RAM cache of experts (LFRU); 0 = off
                                 // (default)
    int prefetch;          // read each layer's previous-token experts ahead during
                           // decode: -1 = default (off), 0 = off, 1 = on
};

// Defaults for each params struct. Copy, change fields, pass by pointer.
MF_API struct mf_model_params mf_model_default_params(void);
MF_API struct mf_ctx_params mf_ctx_default_params(void);

//
// Lifecycle
//

// Load the model directory `dir` (config.json, model_weights.{bin,json},
// packed_experts/). Constructor of mf_model.
//   out     receives the model, or NULL on failure.
//   dir     borrowed for the duration of the call.
//   params  borrowed; NULL = mf_model_default_params().
//   err     caller buffer of errlen bytes for the message on failure (may be NULL).
// Returns MF_OK, MF_ERR_IO (missing/short file), MF_ERR_FORMAT (malformed JSON,
// unknown model_type, non-affine quantization), MF_ERR_SHAPE (a tensor that does not
// fit config.json: the message names the tensor, expected and actual), MF_ERR_NOMEM,
// MF_ERR_BACKEND. On failure nothing is leaked. Thread-safe.
MF_API int mf_model_load(mf_model **out, const char *dir,
                         const struct mf_model_params *params,
                         char *err, size_t errlen);

// Destructor of mf_model. NULL is a no-op. Every mf_ctx made from it must be freed
// first.
MF_API void mf_model_free(mf_model *model);

// Create a context for `model`. Constructor of mf_ctx.
//   model   borrowed; must outlive the ctx.
//   params  borrowed; NULL = mf_ctx_default_params().
// Starts the ctx's thread pool (joined in mf_ctx_free). Returns MF_OK, MF_ERR_NOMEM,
// MF_ERR_ARG (n_ctx < 1 or above the model's maximum), MF_ERR_BACKEND. Thread-safe
// with respect to other ctxs of the same model.
MF_API int mf_ctx_new(mf_ctx **out, const mf_model *model,
                      const struct mf_ctx_params *params,
                      char *err, size_t errlen);

// Destructor of mf_ctx. NULL is a no-op.
MF_API void mf_ctx_free(mf_ctx *ctx);

//
// Evaluation
//

// Evaluate n_tokens tokens, continuing from the current position. Method of mf_ctx.
//   tokens      borrowed, n_tokens ids in [0, n_vocab).
//   logits      caller buffer: n_vocab floats (all_logits = 0: the last position) or
//               n_tokens * n_vocab floats (all_logits = 1: every position, row-major
//               [n_tokens, n_vocab]). May be NULL to compute no logits.
// Returns MF_OK; MF_ERR_ARG (bad id, n_tokens < 1, the sequence would exceed n_ctx);
// MF_ERR_IO (an expert read failed); MF_ABORTED. On any non-OK return the ctx is
// unchanged: its position and state are those before the call.
MF_API int mf_ctx_eval(mf_ctx *ctx, const int32_t *tokens, int n_tokens,
                       float *logits, int all_logits);

// Ask a running mf_ctx_eval on `ctx` to stop at the next layer boundary. Callable
// from any thread; the flag is cleared when the next mf_ctx_eval starts.
MF_API void mf_ctx_abort(mf_ctx *ctx);

//
// Sequence state
//

// Forget the sequence: position 0, KV and linear-attention state zeroed, automatic
// checkpoints dropped. Equal in every observable way to a fresh ctx. Never fails.
MF_API void mf_ctx_reset(mf_ctx *ctx);

// Shorten the sequence to its first n tokens (0 <= n <= n_past). Method of mf_ctx.
// Exact for attention-only models; for models with linear attention exact only when a
// state checkpoint at n is held (one is taken automatically at the end of each
// successful mf_ctx_eval and at mf_ctx_state_load; the most recent are kept, see
// mf_ctx_params.n_checkpoints), otherwise MF_ERR_STATE, whose message lists the
// positions held, with the ctx unchanged. n = 0 is mf_ctx_reset and always works.
// Checkpoints beyond n are dropped. MF_ERR_ARG if n is out of range.
MF_API int mf_ctx_truncate(mf_ctx *ctx, int n);

// Change how many automatic checkpoints are kept (values as mf_ctx_params.n_checkpoints).
// Method of mf_ctx. Drops the checkpoints held so far. Returns MF_OK, or MF_ERR_ARG
// (n < -1 or n > 64) with the ctx unchanged.
MF_API int mf_ctx_checkpoints_set(mf_ctx *ctx, int n);

// Snapshot size in bytes for the current sequence (changes as tokens are added).
MF_API size_t mf_ctx_state_size(const mf_ctx *ctx);

// Write a snapshot (format "MFLX", versioned) into dst (capacity `cap` bytes).
// Returns the bytes written (> 0) or a negative MF_ERR_* (MF_ERR_ARG if cap is short).
MF_API int64_t mf_ctx_state_save(mf_ctx *ctx, void *dst, size_t cap);

// Restore a snapshot. The whole buffer is validated before the ctx is touched: a
// snapshot of another model (MF_ERR_STATE), truncated or corrupted (MF_ERR_FORMAT),
// or of a newer format version (MF_ERR_UNSUPPORTED) is refused, and on any error the
// ctx is unchanged. After MF_OK, evaluation continues bit-for-bit as if the
// snapshotted tokens had just been evaluated.
MF_API int mf_ctx_state_load(mf_ctx *ctx, const void *src, size_t size);

//
// Getters
//

MF_API int mf_model_n_vocab(const mf_model *model);
MF_API int mf_model_n_layer(const mf_model *model);
MF_API int mf_model_n_embd(const mf_model *model);
MF_API int mf_model_n_ctx_train(const mf_model *model);     // max_position_embeddings
MF_API const char *mf_model_arch(const mf_model *model);    // config model_type; static
MF_API const char *mf_model_backend(const mf_model *model); // "cpu"/"cuda"/"metal"; static
MF_API int mf_model_bos(const mf_model *model);             // -1 if unknown
MF_API int mf_model_eos(const mf_model *model);             // -1 if unknown
// Bytes of routed-expert data read per token when nothing is cached.
MF_API int64_t mf_model_expert_bytes_per_token(const mf_model *model);
// config.json as text (owned by model).
MF_API const char *mf_model_config_json(const mf_model *model);

MF_API int mf_ctx_n_past(const mf_ctx *ctx);
MF_API int mf_ctx_n_ctx(const mf_ctx *ctx);
MF_API const mf_model *mf_ctx_model(const mf_ctx *ctx);

// The message of the last failed call on ctx (owned by ctx; "" if none).
MF_API const char *mf_ctx_errmsg(const mf_ctx *ctx);

//
// Statistics
//

struct mf_ctx_stats {
    int64_t n_tokens_evaluated;   // tokens evaluated since creation or reset_stats
    int64_t expert_reads;         // expert blobs read from disk
    int64_t expert_bytes_read;    // bytes of those reads
    double expert_read_s;         // wall seconds spent waiting for expert reads
    double compute_s;             // wall seconds in mf_ctx_eval (reads included)
    // Wall seconds per phase of mf_ctx_eval (they add up to about compute_s). On a
    // backend that queues work (GPU) a phase counts until its work is queued, except
    // where the host waits for results (routing, expert reads, logits).
    double attention_s;           // token mixers: attention, MLA, GatedDeltaNet, norms
    double routing_s;             // router matmul, top-k, grouping by expert
    double io_wait_s;             // waiting for expert bytes (= expert_read_s)
    double experts_s;             // routed experts: gather, SwiGLU experts, combine
    double shared_s;              // shared experts and dense FFN layers
    double head_s;                // embedding, final norm, head, logits download
    // Where expert bytes came from. expert_reads / expert_bytes_read count the experts
    // fetched from the expert files (by pread, O_DIRECT or faults of the mapping);
    // bytes a slot already held (RAM cache, prefetch) are not among them.
    int64_t expert_bytes_disk;    // moved by pread / O_DIRECT
    int64_t expert_bytes_mapped;  // handed out as pointers into the mapping (mmap)
    int64_t expert_bytes_cache;   // served from a slot with no I/O (cache or prefetch)
    int64_t cache_hits;           // expert requests a slot already held
    int64_t cache_misses;         // expert requests that needed the files
    int64_t prefetch_issued;      // experts a prefetch loaded ahead
    int64_t prefetch_hits;        // requests served by a prefetched slot
    // Device expert cache (mf_model_params.gpu_cache_*; streaming on CUDA): requests a
    // device slot already held (no read, no copy), requests that needed a read and a
    // copy, bytes copied host -> device for them (over PCIe on a discrete GPU), and
    // host seconds blocked until the staging slots of landed experts could be reused
    // (a fence after their copies and compute; the device-side waits of the compute
    // queue on a copy are not host time and are not counted). 0 without the cache.
    int64_t gpu_cache_hits;
    int64_t gpu_cache_misses;
    int64_t gpu_bytes_uploaded;
    double gpu_copy_wait_s;
    char io_mode[16];             // the expert I/O mode in effect ("" without experts)
    char io_note[320];            // how it was chosen, and any fallback with its reason
};

MF_API void mf_ctx_stats_get(const mf_ctx *ctx, struct mf_ctx_stats *out);
MF_API void mf_ctx_stats_reset(mf_ctx *ctx);

#ifdef __cplusplus
}
#endif

#endif /* MOEFLUX_H */
