/*
 * backend.h — the backend op table. Every architecture's forward pass is written once
 * against these operations and never touches weight or activation memory itself, so
 * the same forward file runs on the CPU backend (always built, the exact oracle) and on
 * GPU backends (CUDA, Metal) that enqueue work and synchronise only in `download`.
 *
 * Memory model
 *   "device pointer": memory owned by the backend (alloc) or weight memory it mapped
 *   (map_weights). Forward code does byte-offset arithmetic on device pointers (for
 *   slices) but never dereferences them. For the CPU backend device pointers are host
 *   pointers. Host pointers appear only where named `_host`.
 *
 * Execution model
 *   A backend (struct mf_backend) is made once per model and owns what is shared
 *   (mapped weights). Each mf_ctx makes its own exec (struct mf_exec: a thread pool on
 *   the CPU, a stream on a GPU), so contexts run concurrently. All ops take the exec.
 *
 * Host arguments (API v2)
 *   Every pointer argument named `_host` is read (or, for outputs, written) before the
 *   op returns: the caller may reuse or free it at once. An enqueuing backend copies such
 *   arguments into memory of its own. Only download, sync, fence_wait and moe_route with
 *   host outputs make the host wait for queued work.
 *
 * Errors
 *   Ops return nothing; a backend that can fail while running queued work (a GPU launch,
 *   a copy) keeps the first error on the exec, and `status` reports it. Forward code
 *   checks `status` at its synchronisation points (after download, at the end of eval).
 *
 * Shapes in comments are row-major, outermost first, f32 unless said otherwise.
 */
#ifndef MF_BACKEND_H
#define MF_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/common.h"

#define MF_BACKEND_API_VERSION 10

// How the U32 codes of a quantized weight decode (struct mf_weight.qmode; a weight
// zeroed by its initializer is affine). The names are MLX's quantization modes.
enum mf_qmode {
    MF_QMODE_AFFINE = 0,   // w = s*q + b per group
    MF_QMODE_MXFP4 = 1,    // w = e2m1(q) * 2^(s - 127): 4-bit FP4 E2M1 codes (sign bit
                           // 3), group size 32, one E8M0 exponent byte per group as the
                           // scale (sdtype U8), no biases
};

// A weight matrix [n_out, n_in] (or a vector when n_out == 1 and used by norms), either
// float (dtype F32/F16/BF16) or MLX-quantized (dtype U32: codes [n_out, n_in*bits/32],
// scales (and biases when affine) [n_out, n_in/group_size] of sdtype).
struct mf_weight {
    const void *w;          // device pointer
    const void *scales;     // device pointer, NULL when float
    const void *biases;     // device pointer, NULL when float or MXFP4
    enum mf_dtype dtype;    // MF_DTYPE_U32 when quantized
    enum mf_dtype sdtype;   // dtype of scales and biases
    int bits;               // 2, 3, 4, 5, 6, 8 when quantized
    int group_size;         // 32, 64, 128 when quantized
    enum mf_qmode qmode;    // when quantized
    int64_t n_out;
    int64_t n_in;
};

// Bytes of one [n_out, n_in] slice of each part (for stacked [E, out, in] tensors).
// The most products one matmul_multi call takes (shaders/mf_params.h MF_MULTI_MAX).
#define MF_MATMUL_MULTI 3

int64_t mf_weight_w_bytes(const struct mf_weight *w);
int64_t mf_weight_s_bytes(const struct mf_weight *w);
// Slice i of a stacked weight whose leading dimension was folded away: returns a view
// whose pointers are advanced by i slices.
struct mf_weight mf_weight_slice(const struct mf_weight *w, int64_t i);
// A view whose pointers are byte offsets (expert components inside a blob) placed at
// device address base.
struct mf_weight mf_weight_at(const struct mf_weight *v, const void *base);
// "affine 4-bit group 64 (BF16 scales)" or "float BF16" into buf (for messages).
const char *mf_weight_format(const struct mf_weight *w, char *buf, size_t n);

struct mf_backend;
struct mf_exec;
struct mf_fence;
struct mf_moe_batch;

// What attention_ext adds to attention (gpt-oss's attention).
struct mf_attn_ext {
    // Float weight [n_head] (F32/F16/BF16) or NULL: head h's learned logit sinks[h]
    // joins the softmax as one more score whose value row is zero, so it only adds
    // exp(sinks[h] - max) to the denominator (mlx's scaled_dot_product_attention sinks).
    const struct mf_weight *sinks;
    // > 0: the query at position p sees positions p - window + 1 .. p (those >= 0), the
    // mask of mlx-lm's sliding-window layers; 0: all positions 0 .. p.
    int window;
    // > 0: the cache is a ring of `ring` rows, position p in row p % ring; 0: position p
    // in row p. A ring must hold every position the call's queries see while the
    // call's own tokens are in it: ring >= window + n_tok - 1 (window > 0), else
    // ring >= pos0 + n_tok. The forward keeps its chunks that short (nothing checks).
    int ring;
};

// Routers of the MoE layers (moe_route). Top-k is a repeated arg-max with strict '>',
// so ties go to the lower expert index, on every backend.
enum mf_route_kind {
    MF_ROUTE_SOFTMAX = 0,     // p = softmax(logits); k largest; renormalised if
                              // norm_topk_prob
    MF_ROUTE_NOAUX_TC = 1,    // sigmoid scores; bias steers the choice only; group top-2
                              // sums; experts of all but topk_group groups masked to 0.0;
                              // unbiased weights renormalised (norm_topk_prob, k > 1)
                              // times routed_scaling_factor
    MF_ROUTE_TOPK_SOFTMAX = 2,  // gpt-oss: logits plus bias (the router linear's own
                                // bias, NULL = none); the k largest; weights = softmax
                                // over those k alone
};

// The activation of the routed experts between gate/up and down (moe_experts).
enum mf_moe_act {
    MF_MOE_ACT_SWIGLU = 0,          // silu(gate) * up
    MF_MOE_ACT_SWIGLU_CLAMPED = 1,  // gpt-oss: swiglu_clamped with act_alpha / act_limit
};

// q and k rotated in one call (rope_qk): tensor i (0 = q, 1 = k) has heads[i] heads of
// head_dim floats, head h of token t at x[i] + t*tok_stride[i] + h*head_stride[i];
// norm[i] (a float weight of head_dim elements; NULL = none) is a per-head RMSNorm
// (eps, scale 1) applied first. The rotation is rope's: n_rot, inv_freq (device),
// pos0, traditional and mscale shared by both. The op takes a norm on heads of at
// most MF_ROPE_QK_NORM_MAX values (a GPU kernel holds the row); mf_rope_qk makes the
// separate calls for longer ones.
#define MF_ROPE_QK_NORM_MAX 1024
struct mf_rope_qk {
    float *x[2];
    int heads[2];
    int tok_stride[2];
    int head_stride[2];
    const struct mf_weight *norm[2];
    int n_tok, head_dim, n_rot, pos0, traditional;
    float eps, mscale;
    const float *inv_freq;
};

struct mf_route_params {
    enum mf_route_kind kind;
    int n_expert;                // E
    int n_used;                  // K
    int norm_topk_prob;
    int n_group;                 // noaux_tc (1 = no grouping)
    int topk_group;              // noaux_tc
    float routed_scaling_factor; // noaux_tc (1 for softmax)
};

// A group of routed experts for moe_experts. Expert i's blob starts at device address
// blob_host[i]; the component views gate/up/down hold byte offsets inside a blob
// (their pointers are offsets from address 0), each at its own format (affine bits /
// group size, or float). Optional per-expert output biases (float vectors of n_out
// elements, n_out = 1 / n_in = rows in the view; NULL = none) are added to the
// projection's output before SwiGLU (gate, up) or as the last step (down). Expert i
// owns rows row0_host[i] .. row0_host[i] + n_rows_host[i] - 1 of xg / gu / eo.
struct mf_moe_batch {
    int n;
    const void *const *blob_host;    // [n]
    const int32_t *row0_host;        // [n]
    const int32_t *n_rows_host;      // [n]
    const struct mf_weight *gate;    // [n_ff, n_embd]
    const struct mf_weight *up;      // [n_ff, n_embd]
    const struct mf_weight *down;    // [n_embd, n_ff]
    const struct mf_weight *gate_bias;   // [n_ff] or NULL
    const struct mf_weight *up_bias;     // [n_ff] or NULL
    const struct mf_weight *down_bias;   // [n_embd] or NULL
    enum mf_moe_act act;                 // zero-initialised: plain SwiGLU
    float act_alpha, act_limit;          // MF_MOE_ACT_SWIGLU_CLAMPED
};

// Routed experts whose blobs all lie in device memory (resident mode), with the routing
// left on the device by moe_route: token t's experts idx[t * k + j] (device, [n_tok, k])
// with weights w[t * k + j] (device); expert e's blob at base + e * stride (device
// address); gate/up/down are views relative to a blob as in mf_moe_batch. xg
// [n_tok * k, n_embd], gu [n_tok * k, 2 * n_ff] and eo [n_tok * k, n_embd] are scratch.
struct mf_moe_dev {
    int n_tok;
    int k;
    const int32_t *idx;
    const float *w;
    const void *base;
    int64_t stride;
    const struct mf_weight *gate;
    const struct mf_weight *up;
    const struct mf_weight *down;
    const struct mf_weight *gate_bias;   // as in mf_moe_batch (NULL = none)
    const struct mf_weight *up_bias;
    const struct mf_weight *down_bias;
    enum mf_moe_act act;                 // as in mf_moe_batch
    float act_alpha, act_limit;
    float *xg;
    float *gu;
    float *eo;
    // API v9, optional (NULL: none): after y, y[t] += shared[t] (the shared expert's
    // output), then resid[t] += y[t] with flag[0] = 1 where a sum is NaN or infinite:
    // bitwise axpy(y, 1, shared) then axpy_flag(resid, 1, y, flag), in fewer launches.
    const float *shared;   // [n_tok, n_embd] device
    float *resid;          // [n_tok, n_embd] device
    int32_t *flag;         // one int32 of device memory (NULL: no flag)
    // Optional (0: not known): idx and x were written before the op queued just ahead
    // of this call began, e.g. the shared expert's ops were queued between moe_route and
    // this call. A GPU backend may then read them, and the weights, while that op ends.
    int route_ahead;
};

struct mf_backend_ops {
    int api_version;         // MF_BACKEND_API_VERSION
    const char *name;        // "cpu", "cuda", "metal"
    // API v8: the most tokens a prefill chunk should take on this backend, or 0 for
    // each family's own (64: what the CPU's caches like; gpt_oss keeps its own, which
    // sizes its sliding-window ring). A GPU needs more tokens per product to fill its
    // multiprocessors (models/decoder.h mf_decoder_chunk).
    int prefill_chunk;

    // ---- lifecycle
    void (*free)(struct mf_backend *be);
    // Make a device view of host weight memory (the mmap of model_weights.bin).
    // CPU: returns host_ptr itself. Returns NULL on failure (message in err).
    const void *(*map_weights)(struct mf_backend *be, const void *host_ptr,
                               uint64_t bytes, char *err, size_t errlen);
    int (*exec_new)(struct mf_backend *be, int n_threads, struct mf_exec **out,
                    char *err, size_t errlen);
    void (*exec_free)(struct mf_exec *ex);
    // Release a map_weights view (device copies are freed; CPU: nothing).
    void (*unmap_weights)(struct mf_backend *be, const void *dev, uint64_t bytes);
    // Free and total bytes of the memory device allocations come from (CPU: physical
    // RAM available / installed). MF_OK or an error code with err set.
    int (*mem_info)(struct mf_backend *be, uint64_t *free_bytes, uint64_t *total_bytes,
                    char *err, size_t errlen);
    // Optional (API v4; NULL where host memory needs no locking, as on the CPU): page-lock
    // [p, p + n) of host memory the host only reads, such as a read-only mapping of the
    // expert files, so that upload_async from it is a direct device copy (CUDA:
    // cuMemHostRegister, read-only). MF_OK or an error code with err set; unpin_host
    // undoes it, before the memory is unmapped.
    int (*pin_host)(struct mf_backend *be, const void *p, size_t n, char *err,
                    size_t errlen);
    void (*unpin_host)(struct mf_backend *be, const void *p);
    // The first error of queued work since the exec was made (sticky), MF_OK if none;
    // err gets its message. CPU: always MF_OK.
    int (*status)(struct mf_exec *ex, char *err, size_t errlen);
    // 1 if host memory from alloc_host (and memory the host mapped, such as the expert
    // files) can be passed to ops as device memory (CPU, Apple unified memory); 0 if it
    // must be copied to device memory first (upload / upload_async).
    int host_is_device;

    // ---- memory (zero-filled allocations; NULL on OOM)
    void *(*alloc)(struct mf_exec *ex, size_t bytes);
    void (*dealloc)(struct mf_exec *ex, void *p);
    void (*upload)(struct mf_exec *ex, void *dst, size_t dst_off, const void *src_host,
                   size_t bytes);
    // Synchronises: when it returns, dst_host holds the bytes.
    void (*download)(struct mf_exec *ex, void *dst_host, const void *src, size_t src_off,
                     size_t bytes);
    void (*copy)(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                 size_t src_off, size_t bytes);
    void (*zero)(struct mf_exec *ex, void *dst, size_t dst_off, size_t bytes);
    // Host memory that expert reads land in and async uploads read from: CPU aligned
    // host memory, CUDA pinned staging. Zero-filled, at least 4096-byte aligned; NULL on
    // failure. Freed only by dealloc_host.
    void *(*alloc_host)(struct mf_exec *ex, size_t bytes);
    void (*dealloc_host)(struct mf_exec *ex, void *p);
    // Copy from alloc_host memory to device memory. src_host must stay unchanged until
    // `done` is reached (done may be NULL: then the caller syncs before reusing
    // src_host). The one exception to the host-argument rule. API v3: the copy runs on
    // the exec's copy queue (CUDA: a second stream), which may overtake compute queued
    // before it: a caller that overwrites memory earlier work reads first makes the
    // copy wait with fence_wait_device on a fence recorded after that work, and makes
    // the work that reads dst wait with fence_wait_device(done). A backend with one
    // queue (CPU, Metal) copies in the exec's order, where both waits are no-ops.
    void (*upload_async)(struct mf_exec *ex, void *dst, size_t dst_off,
                         const void *src_host, size_t bytes, struct mf_fence *done);

    // ---- synchronisation
    // Wait until all work queued on ex has finished.
    void (*sync)(struct mf_exec *ex);
    // API v7: start the work queued so far without waiting for it. A GPU backend may
    // hold queued work back to submit it in larger pieces (CUDA: launches replayed as
    // graphs; Metal: the open command buffer) until the host waits on the exec; a
    // caller about to block on something else (expert reads) calls this first, so the
    // device works meanwhile. Optional: NULL = nothing is held back (CPU).
    void (*submit)(struct mf_exec *ex);
    // A fence marks a point in the exec's queue: record places it after the work queued
    // so far; wait blocks the host until that work is done (a fence never recorded is
    // reached at once). CPU: work is done when an op returns, so both are no-ops.
    struct mf_fence *(*fence_new)(struct mf_exec *ex);
    void (*fence_record)(struct mf_exec *ex, struct mf_fence *f);
    void (*fence_wait)(struct mf_exec *ex, struct mf_fence *f);
    void (*fence_free)(struct mf_exec *ex, struct mf_fence *f);
    // API v3: a device-side wait. Every queue of ex (compute and copy) starts the work
    // queued after this call only once f is reached; the host does not wait. A fence
    // never recorded is reached. CUDA: cuStreamWaitEvent on both streams; CPU and
    // Metal (one in-order queue): nothing to do.
    void (*fence_wait_device)(struct mf_exec *ex, struct mf_fence *f);
    // API v3: 1 if ops may return before their work is done (GPU queues: a caller that
    // hands host memory to an op keeps it until a fence recorded after the op is
    // reached), 0 if every op has finished when it returns (CPU).
    int queues_work;

    // ---- linear algebra
    // y[n_tok, n_out] = x[n_tok, n_in] @ W^T. W float or quantized.
    void (*matmul)(struct mf_exec *ex, float *y, const struct mf_weight *w,
                   const float *x, int n_tok);
    // n (1 .. MF_MATMUL_MULTI) products of the same x in one call: y[i] = matmul of
    // w[i] (the same n_in), each equal, bit for bit, to the matmul call it replaces
    // (a GPU runs them as one launch). The arrays are host arguments. Optional (API v5
    // addition): NULL = the backend has none; callers go through mf_matmul_multi.
    void (*matmul_multi)(struct mf_exec *ex, int n, float *const *y,
                         const struct mf_weight *const *w, const float *x, int n_tok);
    // xn = rmsnorm(x) (a layer's input norm: gains g, NULL for none, scale 1; n_in of
    // every w), then matmul_multi of xn: xn and each y the same bits as those two calls
    // (a GPU takes the norm inside its one-token products). Optional (API v10
    // addition): NULL = callers go through mf_rms_matmul_multi.
    void (*rms_matmul_multi)(struct mf_exec *ex, int n, float *const *y,
                             const struct mf_weight *const *w, float *xn, const float *x,
                             const struct mf_weight *g, float eps, int n_tok);
    // y[n_tok, n_out] += x @ W^T (a layer's output projection added to the residual
    // stream): the same bits as matmul into tmp then axpy(y, 1, tmp). tmp [n_tok,
    // n_out] is scratch the call may leave unwritten (a GPU adds in its one-token
    // matvec). Optional (API v10 addition): NULL = callers go through mf_matmul_add.
    void (*matmul_add)(struct mf_exec *ex, float *y, const struct mf_weight *w,
                       const float *x, int n_tok, float *tmp);
    // y[n_tok, n_in] = x[n_tok, n_out] @ W: W [n_out, n_in] used transposed (MLA
    // absorption with an old-form kv_b_proj: q~ = W_UK^T q_nope). Float or quantized.
    void (*matmul_t)(struct mf_exec *ex, float *y, const struct mf_weight *w,
                     const float *x, int n_tok);
    // Per-head products for n_head heads in one call (MLA absorption, per-head
    // projections), head h of token t reading x + t*x_tok_stride + h*x_head_stride and
    // writing y + t*y_tok_stride + h*y_head_stride (floats; x_head_stride 0 = every head
    // reads the same row). W_h is the [n_out, n_in] view w advanced by h*w_head_rows
    // rows (a stacked [H, n_out, n_in] tensor has w_head_rows = n_out; heads inside
    // one 2-D matrix, such as kv_b_proj, the stride of their row blocks).
    //   transposed = 0: y[t, h, n_out] = x[t, h, n_in] @ W_h^T
    //   transposed = 1: y[t, h, n_in] = x[t, h, n_out] @ W_h
    // Float or quantized; y must not overlap x. Results do not depend on the thread
    // count.
    void (*matmul_heads)(struct mf_exec *ex, float *y, int y_tok_stride, int y_head_stride,
                         const struct mf_weight *w, int64_t w_head_rows, int transposed,
                         const float *x, int x_tok_stride, int x_head_stride, int n_tok,
                         int n_head);
    // y[n_tok, n_in] = rows tokens_host[i] of W (dequantized).
    void (*embed)(struct mf_exec *ex, float *y, const struct mf_weight *w,
                  const int32_t *tokens_host, int n_tok);

    // ---- normalisation
    // Per row of n: y = x / sqrt(mean(x^2) + eps) * (g ? g : 1) * scale. g is a float
    // weight of n elements. y may alias x.
    void (*rmsnorm)(struct mf_exec *ex, float *y, const float *x,
                    const struct mf_weight *g, int n_rows, int n, float eps, float scale);
    // x[n_rows, n] += r, then y = rmsnorm(x) (scale 1): the same bits as axpy(x, 1, r)
    // then rmsnorm(y, x) (the residual add before a layer's next norm). y aliases
    // neither. Optional (API v5 addition): NULL = callers go through mf_add_rmsnorm.
    void (*add_rmsnorm)(struct mf_exec *ex, float *y, float *x, const float *r,
                        const struct mf_weight *g, int n_rows, int n, float eps);
    // rmsnorm over heads inside tokens: row (t, h) of n values at x + t*tok_stride +
    // h*head_stride (the same offsets in y) for t < n_tok, h < n_head. y may alias x.
    // (GatedDeltaNet q/k heads inside conv rows, the MLA latent inside [latent | rope].)
    void (*rmsnorm_heads)(struct mf_exec *ex, float *y, const float *x,
                          const struct mf_weight *g, int n_tok, int tok_stride,
                          int n_head, int head_stride, int n, float eps, float scale);
    // Per row of n: y = rmsnorm(x) * g * silu(z). y may alias x.
    void (*rmsnorm_gated)(struct mf_exec *ex, float *y, const float *x, const float *z,
                          const struct mf_weight *g, int n_rows, int n, float eps);

    // ---- rotary embedding, in place on x[n_tok, n_heads, row_stride] (head h of token t
    // at x + t*tok_stride + h*head_stride). Rotates the first n_rot dims of each head at
    // position pos0 + t with inv_freq[n_rot/2] (device). traditional = 1 pairs (2j,
    // 2j+1) (mlx traditional=True); 0 pairs (j, j+n_rot/2). Rotated values are multiplied
    // by mscale.
    void (*rope)(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                 int head_stride, int n_rot, const float *inv_freq, int pos0,
                 int traditional, float mscale);
    // q and k (each after its optional per-head RMSNorm) in one call: the same bits as
    // the rmsnorm (rmsnorm_heads where a tensor's heads are not dense) and rope calls
    // it replaces (struct mf_rope_qk; a host argument; normalised heads of at most
    // MF_ROPE_QK_NORM_MAX values). Optional (API v6 addition): NULL = callers go
    // through mf_rope_qk.
    void (*rope_qk)(struct mf_exec *ex, const struct mf_rope_qk *r);

    // ---- attention for n_tok queries at positions pos0 .. pos0+n_tok-1 over a cache
    // holding positions 0 .. pos0+n_tok-1. q[n_tok, n_head, dk] (dense), out[n_tok,
    // n_head, dv] (dense). Key of position p for kv head g at k + p*k_stride + g*dk;
    // value at v + p*v_stride + g*dv. Query head h uses kv head h / (n_head/n_kv_head).
    // Scores scaled by `scale`, causal, softmax in f32.
    void (*attention)(struct mf_exec *ex, float *out, const float *q, const float *k,
                      const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                      int dv, int k_stride, int v_stride, int pos0, float scale);
    // attention with attention sinks, a sliding window and a ring-buffer cache (struct
    // mf_attn_ext, host memory; its sinks weight is device memory). ext all zero is
    // attention itself. Optional (API v2 addition): NULL = the backend lacks it.
    void (*attention_ext)(struct mf_exec *ex, float *out, const float *q, const float *k,
                          const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                          int dv, int k_stride, int v_stride, int pos0, float scale,
                          const struct mf_attn_ext *ext_host);

    // ---- GatedDeltaNet pieces
    // Depthwise causal conv over channels C with kernel K and SiLU:
    // y[t, c] = silu(sum_j w[c, j] * u[t-(K-1)+j, c]), history from state[K-1, C]
    // (oldest first, pre-conv inputs), which is then advanced by n_tok inputs.
    // w is a float weight [C, K] (checkpoint [C, K, 1]).
    void (*conv1d_silu)(struct mf_exec *ex, float *y, float *state, const float *u,
                        const struct mf_weight *w, int n_tok, int C, int K);
    // Gates per token and v-head: beta = sigmoid(b), g = exp(-exp(A_log) *
    // softplus(a + dt_bias)). a, b at stride ab_stride per token; out [n_tok, nv].
    void (*gdn_gates)(struct mf_exec *ex, float *g, float *beta, const float *a,
                      const float *b, int ab_stride, const struct mf_weight *A_log,
                      const struct mf_weight *dt_bias, int n_tok, int nv);
    // The delta-rule recurrence over n_tok tokens, state S[nv, dv, dk] updated in
    // place: S = g S; m = S k; S += beta (v - m) k^T; o = S q. q, k[t] at
    // qk + t*qkv_stride (+ key_dim for k), v at v + t*qkv_stride; q and k normalised
    // by the caller; kv head of v head h is h / (nv/nk). o[n_tok, nv, dv].
    void (*gdn_recurrence)(struct mf_exec *ex, float *o, float *S, const float *q,
                           const float *k, const float *v, int qkv_stride,
                           const float *g, const float *beta, int n_tok, int nk,
                           int nv, int dk, int dv);

    // Out-of-place forms of the two ops above, so an eval can read committed state
    // buffer A and write working buffer B without first copying A into B (~60 MB per
    // token at Qwen3-Next size): history / state are read from state_in / S_in and the
    // advanced ones written to state / S. state_in == state (S_in == S) is the in-place
    // op; otherwise the _in buffers are not written and must not overlap the outputs.
    void (*conv1d_silu_from)(struct mf_exec *ex, float *y, float *state,
                             const float *state_in, const float *u,
                             const struct mf_weight *w, int n_tok, int C, int K);
    void (*gdn_recurrence_from)(struct mf_exec *ex, float *o, float *S, const float *S_in,
                                const float *q, const float *k, const float *v,
                                int qkv_stride, const float *g, const float *beta,
                                int n_tok, int nk, int nv, int dk, int dv);

    // ---- elementwise
    // y[i] = silu(gate[i]) * up[i] for i < n; the rows of gate/up are at strides
    // (gate and up may be halves of one buffer): n_rows rows of n_cols.
    void (*swiglu)(struct mf_exec *ex, float *y, const float *gate, const float *up,
                   int n_rows, int n_cols, int in_stride);
    // gpt-oss's clamped SwiGLU (mlx-lm swiglu_oai), laid out as swiglu: with
    // g = min(gate, limit) and u = clip(up, -limit, limit),
    // y = (u + 1) * g * sigmoid(alpha * g). Optional (API v2 addition): NULL = the
    // backend lacks it.
    void (*swiglu_clamped)(struct mf_exec *ex, float *y, const float *gate,
                           const float *up, int n_rows, int n_cols, int in_stride,
                           float alpha, float limit);
    // y[r, c] *= sigmoid(g[r * g_stride + (g_cols == 1 ? 0 : c)]), n_rows x n_cols.
    void (*mul_sigmoid)(struct mf_exec *ex, float *y, const float *g, int n_rows,
                        int n_cols, int g_stride, int g_cols);
    // y[i] += alpha * x[i].
    void (*axpy)(struct mf_exec *ex, float *y, float alpha, const float *x, int n);
    // axpy, then flag_nonfinite(flag, y, n): the same bits and flag as the two calls (a
    // layer's residual add and its output check). Optional (API v6 addition): NULL =
    // callers go through mf_axpy_flag.
    void (*axpy_flag)(struct mf_exec *ex, float *y, float alpha, const float *x, int n,
                      int32_t *flag);
    // Rows: dst[idx_host[i]] += w_host[i] * src[i] (row length n); w_host NULL = 1.
    void (*scatter_add_rows)(struct mf_exec *ex, float *dst, const float *src,
                             const int32_t *idx_host, const float *w_host, int n_rows,
                             int n);
    // Rows: dst[i] = src[idx_host[i]] (row length n).
    void (*gather_rows)(struct mf_exec *ex, float *dst, const float *src,
                        const int32_t *idx_host, int n_rows, int n);
    // The same with the index table in device memory (tables made once per context).
    void (*gather_rows_dev)(struct mf_exec *ex, float *dst, const float *src,
                            const int32_t *idx, int n_rows, int n);

    // flag[0] = 1 if any of x[0 .. n) is NaN or infinite; otherwise flag is left as it
    // is (flag: one int32 of device memory). Cheap guard for damaged weights: the
    // forward checks each layer's output and reads the flags once per eval.
    void (*flag_nonfinite)(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n);

    // ---- mixture of experts
    // Routing of n_tok tokens: logits [n_tok, E] (device, overwritten with the scores),
    // bias [E] f32 device (noaux_tc correction; NULL = none). Writes the K chosen
    // experts and their weights per token to idx [n_tok, K] / w [n_tok, K] (device; either
    // may be NULL) and, when idx_host / w_host are not NULL, to the host too (then it
    // synchronises). Same selection and weights on every backend (tie rule above).
    void (*moe_route)(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                      const float *bias, const struct mf_route_params *p, int n_tok,
                      int32_t *idx_host, float *w_host);
    // A MoE layer's input norm, router and routing with device outputs: xn =
    // rmsnorm(x) (gains g, scale 1; n = router->n_in), logits = router product of xn,
    // then moe_route(idx, w, logits, bias, r, n_tok): xn, logits, idx and w the same
    // bits as rms_matmul_multi of the router alone then moe_route. Optional (API v10
    // addition): NULL = callers go through mf_rms_route.
    void (*rms_route)(struct mf_exec *ex, int32_t *idx, float *w, float *logits,
                      const float *bias, const struct mf_route_params *r, int n_tok,
                      const struct mf_weight *router, float *xn, const float *x,
                      const struct mf_weight *g, float eps);
    // SwiGLU experts on gathered rows: for each expert i of b and each of its rows r,
    // eo[r] = down(silu(gate xg[r]) * up xg[r]) (b->act: or the clamped SwiGLU),
    // gu [rows, 2 * n_ff] scratch. A row's
    // result does not depend on which other experts share the call, so experts may be
    // run as their bytes arrive, in any grouping, with bitwise the same eo. It may
    // depend on how many rows its expert's entry has: an entry of at least 8 rows may
    // run in tiles of rows (the GPUs' prefill kernels on tensor cores, each row's bits
    // still its own), one of fewer rows gives each row the bits it has as an entry of
    // one row (moe_experts_dev's).
    void (*moe_experts)(struct mf_exec *ex, float *eo, float *gu, const float *xg,
                        const struct mf_moe_batch *b);
    // The same experts without the host seeing the routing (struct mf_moe_dev): y[t] =
    // sum over token t's experts, in ascending expert order, of w * expert(x[t]),
    // summed from 0. Bitwise what the host-routed path gives: the pairs grouped by
    // expert (ascending, tokens in order) through moe_experts, then zero +
    // scatter_add_rows in that order; then the shared expert's and residual adds where
    // d sets them. Nothing here waits for the device. The CUDA
    // backend refuses d->k above 64, its moe_route's limit (an argument error).
    // Optional (API v2 addition): NULL = the backend has no device-routed path and
    // callers route on the host.
    void (*moe_experts_dev)(struct mf_exec *ex, float *y, const float *x,
                            const struct mf_moe_dev *d);
    // Whether moe_experts / moe_experts_dev take the expert views of b (gate, up, down
    // and biases; n and the arrays unused) of MoE layer il, asked once per layer at
    // model open: MF_OK, or MF_ERR_UNSUPPORTED with err naming the projection and its
    // format. Optional (API v2 addition): NULL = every format mf_weight describes.
    int (*moe_experts_check)(struct mf_backend *be, const struct mf_moe_batch *b, int il,
                             char *err, size_t errlen);

    // ---- parallel host work on the exec's threads (CPU: the pool). Optional: NULL
    // means the caller runs the tasks itself. Leaves the table once the expert store
    // owns its I/O threads.
    // Runs fn(arg, i) for i in [0, n_tasks) and returns when all are done.
    void (*parallel_for)(struct mf_exec *ex, void (*fn)(void *arg, int i), void *arg,
                         int n_tasks);
};

struct mf_backend {
    const struct mf_backend_ops *ops;
    void *impl;
};

// moe_experts_check of the GPU backends, whose grouped expert kernels take gate and up
// in one format and down in its own (float, affine or MXFP4 each), float biases and
// either activation: MF_ERR_UNSUPPORTED naming backend, layer, projection and formats
// otherwise.
int mf_moe_experts_gpu_check(const char *backend, const struct mf_moe_batch *b, int il,
                             char *err, size_t errlen);

// Constructors per backend. CPU always exists.
// matmul of each w[i] into y[i] with the same x: the backend's matmul_multi where it
// has one (n <= MF_MATMUL_MULTI), else one matmul per weight.
void mf_matmul_multi(const struct mf_backend_ops *op, struct mf_exec *ex, int n,
                     float *const *y, const struct mf_weight *const *w, const float *x,
                     int n_tok);

// y += x @ W^T: the backend's matmul_add where it has one, else matmul into tmp, then
// axpy (tmp: scratch of n_tok x n_out floats).
void mf_matmul_add(const struct mf_backend_ops *op, struct mf_exec *ex, float *y,
                   const struct mf_weight *w, const float *x, int n_tok, float *tmp);

// A MoE layer's input norm, router and routing into device outputs: the backend's
// rms_route where it has one, else mf_rms_matmul_multi of the router, then moe_route.
void mf_rms_route(const struct mf_backend_ops *op, struct mf_exec *ex, int32_t *idx, float *w,
                  float *logits, const float *bias, const struct mf_route_params *r,
                  int n_tok, const struct mf_weight *router, float *xn, const float *x,
                  const struct mf_weight *g, float eps);

// xn = rmsnorm(x) * g (scale 1, n = w[0]->n_in), then y[i] = w[i] applied to xn: the
// backend's rms_matmul_multi where it has one, else rmsnorm then mf_matmul_multi.
void mf_rms_matmul_multi(const struct mf_backend_ops *op, struct mf_exec *ex, int n,
                         float *const *y, const struct mf_weight *const *w, float *xn,
                         const float *x, const struct mf_weight *g, float eps, int n_tok);

// y = rmsnorm(x) * g after x += r (r NULL: no add): the backend's add_rmsnorm where
// it has one, else axpy then rmsnorm.
void mf_add_rmsnorm(const struct mf_backend_ops *op, struct mf_exec *ex, float *y, float *x,
                    const float *r, const struct mf_weight *g, int n_rows, int n,
                    float eps);

// rope_qk of the backend where it has one (and the heads to normalise are at most
// MF_ROPE_QK_NORM_MAX long), else per tensor its rmsnorm (rmsnorm_heads where its heads
// are not dense) and rope.
void mf_rope_qk(const struct mf_backend_ops *op, struct mf_exec *ex,
                const struct mf_rope_qk *r);

// y += alpha * x, then flag[0] = 1 if any y is non-finite: the backend's axpy_flag
// where it has one, else axpy then flag_nonfinite.
void mf_axpy_flag(const struct mf_backend_ops *op, struct mf_exec *ex, float *y,
                  float alpha, const float *x, int n, int32_t *flag);

int mf_backend_cpu_new(struct mf_backend **out, char *err, size_t errlen);
// The CPU backend with every exec on one kernel set ("scalar", "avx2", "avx512",
// "neon"; NULL: the best this CPU runs), for tests. MF_ERR_BACKEND if the set is
// unknown or this CPU lacks it.
int mf_backend_cpu_new_kernels(struct mf_backend **out, const char *kernels, char *err,
                               size_t errlen);
// Choose by name ("cpu"; "cuda"/"metal" where built; "cpu:<set>" forces a CPU kernel
// set, see above). MF_ERR_BACKEND if unknown.
int mf_backend_new(struct mf_backend **out, const char *name, char *err, size_t errlen);

#endif /* MF_BACKEND_H */
