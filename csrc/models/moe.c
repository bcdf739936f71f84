/*
 * moe.c — the routed-expert MoE FFN and the dense SwiGLU FFN shared by every
 * architecture (moe.h).
 *
 * Owns: routing through the backend's moe_route (softmax top-k for the Qwen families,
 * noaux_tc for deepseek_v3 and glm4_moe, top-k then softmax for gpt_oss), grouping a call's tokens by expert so that each routed
 * expert is read ONCE per call (prefill reads each needed expert once per chunk, not
 * once per token), the ctx's expert reader (its own I/O threads; reads overlap the
 * shared expert and the other experts' compute), the grouped SwiGLU experts on the
 * gathered rows and the weighted scatter-add back, the optional (gated) shared expert,
 * decode prefetch of the next layer's previous-token experts, the I/O counters, and the
 * resident-expert paths (all experts in device memory: routing left on the device for
 * a few tokens, one grouped call per layer for a prefill chunk).
 *
 * The expert views are made per MoE layer from the store's validated layout (each
 * projection at its own format: affine, float or MXFP4; optional per-expert biases, a
 * fused gate_up_proj as two row blocks, a table per layer where a recipe changes with
 * the layer) and checked against config.json and the backend's moe_experts_check when
 * the model opens; the experts' activation (SwiGLU, or gpt_oss's clamped SwiGLU) comes
 * from the family's mf_moe_config.
 *
 * Does not own: the expert files (io/expert_store.c), the weights of the router and
 * shared expert (bound by each arch file), or any arithmetic on activations, which
 * goes through the backend op table so the same code runs on every backend.
 */
#include "models/moe.h"

#include "models/dev_cache.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ==== Scratch ====
 * Everything a call needs, sized once for max_tok tokens. Host arrays hold the
 * routing (the chosen experts must come to the host anyway: they say which files to
 * read). Device arrays hold activations, row r of xg / gu / eo being the r-th (token,
 * expert) pair in expert-grouped order. Expert bytes come from the ctx's expert reader
 * (io/expert_reader.h: its own I/O threads, slots from alloc_host, or pointers into
 * the mapping in mmap mode); a backend whose device cannot read host memory gets each
 * blob copied into a slot of the device expert cache (models/dev_cache.h) first. */

#define ERR_LEN 512
#define MF_MOE_PREFETCH_MAX_K 32   // prefill-group prefetch: at most 2 x this experts

struct mf_moe_scratch {
    int max_tok;
    uint64_t expert_bytes;
    struct mf_route_params route;
    mf_expert_reader *reader;
    struct mf_expert_reader_stats seen;   // reader counters already added to ctx stats
    char err[ERR_LEN];
    // host
    int32_t *sel_idx;        // [max_tok, k] chosen experts
    float *sel_w;            // [max_tok, k] their weights
    int32_t *count;          // [n_expert] tokens routed to each expert
    int32_t *start;          // [n_expert + 1] prefix sums of count
    int32_t *tok_of;         // [max_tok * k] token index, grouped by expert
    float *w_of;             // [max_tok * k] weight, grouped like tok_of
    int32_t *used;           // [n_expert] distinct experts in this call, ascending
    const void **res_blob;   // [n_expert] resident: blob, first row and rows of each
    int32_t *res_row0;       //   used expert (one moe_experts call per layer)
    int32_t *res_rows;
    // decode prefetch: each MoE layer's experts of the previous token
    int prefetch;
    int n_layer;
    const uint8_t *is_moe;   // [n_layer], the model's
    int32_t *prev;           // [n_layer, k]
    uint8_t *prev_ok;        // [n_layer]
    // device
    float *logits_dev;       // [max_tok, n_expert]
    float *xg;               // [max_tok * k, n_embd] gathered rows
    float *gu;               // [max_tok * k, 2 * n_ff_exp] gate | up halves per expert
    float *eo;               // [max_tok * k, n_embd] expert outputs
    float *sh_tmp;           // [max_tok, 2 * n_ff_shexp]
    float *sh_out;           // [max_tok, n_embd]
    float *sh_gate;          // [max_tok, 1]
    // device expert cache (!host_is_device, or MOEFLUX_TEST_DEV_CACHE on the CPU)
    struct mf_dev_cache *dc;
    struct mf_dev_cache_stats dc_seen;   // its counters already added to ctx stats
    int32_t *fifo_tk;        // [n_expert] the call's misses in submission order: ticket
    int32_t *fifo_slot;      //   and device slot; [fifo_head, fifo_n) not yet run
    int fifo_head, fifo_n;
    int32_t *run_ie;         // [n_expert] experts to run from device slots run_slot
    int32_t *run_slot;
    int32_t *miss_ie;        // [n_expert] the call's misses before their slots
    // Deferred release (queues_work, or the cache): tickets whose slots queued work may
    // still read, released once pend_fence, recorded after that work, is reached.
    int defer;
    struct mf_fence *pend_fence;
    int32_t *pend;           // [reader tickets]
    int32_t *pend_slot;      // [reader tickets] the device slot its copy filled, or -1
    int n_pend;
    int32_t *idx_dev;        // [max_tok, k] routing left on the device (resident)
    float *w_dev;            // [max_tok, k]
    const void *const *resident;   // the model's experts_dev (NULL: streaming)
    // expert weight views of each MoE layer relative to a blob at address 0
    // (pointers are offsets) [n_layer]
    struct mf_moe_views *views;
    int has_store;
};

static void *dev_alloc(mf_ctx *ctx, size_t bytes) {
    return ctx->be->ops->alloc(ctx->ex, bytes ? bytes : 4);
}

static void dev_free(mf_ctx *ctx, void *p) {
    if (p)
        ctx->be->ops->dealloc(ctx->ex, p);
}

// Rows [row0, row0 + n_out) of projection p of layer il as a weight view whose
// pointers are byte offsets inside a blob (forward adds the slot's base address);
// the bias view (has_bias set) likewise. Format and shape from the validated layout
// (io/expert_store.c), checked here against config.json's sizes.
static int proj_view(const struct mf_expert_proj *p, int il, const char *proj,
                     int64_t rows, int64_t row0, int64_t n_out, int64_t n_in,
                     struct mf_weight *out, struct mf_weight *bias, int *has_bias,
                     char *err, size_t errlen) {
    if (p->rows != rows || p->n_in != n_in)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "packed_experts/layout.json: layer %d %s is [%lld, %lld] (%s), "
                      "config.json gives [%lld, %lld]", il, proj, (long long)p->rows,
                      (long long)p->n_in, p->mode == MF_EXPERT_MODE_AFFINE  ? "affine"
                                          : p->mode == MF_EXPERT_MODE_MXFP4 ? "mxfp4"
                                                                            : "float",
                      (long long)rows, (long long)n_in);
    memset(out, 0, sizeof *out);
    out->n_out = n_out;
    out->n_in = n_in;
    out->dtype = p->weight->dtype;
    uint64_t wrow = p->weight->size / (uint64_t)rows;
    out->w = (const void *)(uintptr_t)(p->weight->offset + (uint64_t)row0 * wrow);
    if (p->mode == MF_EXPERT_MODE_AFFINE || p->mode == MF_EXPERT_MODE_MXFP4) {
        uint64_t srow = p->scales->size / (uint64_t)rows;
        out->sdtype = p->scales->dtype;
        out->scales = (const void *)(uintptr_t)(p->scales->offset + (uint64_t)row0 * srow);
        out->bits = p->bits;
        out->group_size = p->group_size;
        out->qmode = p->mode == MF_EXPERT_MODE_MXFP4 ? MF_QMODE_MXFP4 : MF_QMODE_AFFINE;
    }
    if (p->mode == MF_EXPERT_MODE_AFFINE) {
        uint64_t srow = p->biases->size / (uint64_t)rows;
        out->biases = (const void *)(uintptr_t)(p->biases->offset + (uint64_t)row0 * srow);
    }
    *has_bias = p->bias != NULL;
    memset(bias, 0, sizeof *bias);
    if (p->bias) {
        size_t esz = mf_dtype_size(p->bias->dtype);
        bias->dtype = p->bias->dtype;
        bias->n_out = 1;
        bias->n_in = n_out;
        bias->w = (const void *)(uintptr_t)(p->bias->offset + (uint64_t)row0 * esz);
    }
    return MF_OK;
}

// gate and up of layer il: two projections, or one fused gate_up_proj whose rows are
// the gate's then the up's (two row blocks of one matrix: views at two offsets).
static int gate_up_views(const mf_expert_store *st, int il, int n_embd, int n_ff,
                         struct mf_moe_views *v, char *err, size_t errlen) {
    struct mf_expert_proj g, u, f;
    int has_g = mf_expert_store_proj(st, il, "gate_proj", &g);
    int has_u = mf_expert_store_proj(st, il, "up_proj", &u);
    int has_f = mf_expert_store_proj(st, il, "gate_up_proj", &f);
    if (has_f && !has_g && !has_u) {
        int rc = proj_view(&f, il, "gate_up_proj", 2 * (int64_t)n_ff, 0, n_ff, n_embd,
                           &v->gate, &v->bias[0], &v->has_bias[0], err, errlen);
        return rc ? rc : proj_view(&f, il, "gate_up_proj", 2 * (int64_t)n_ff, n_ff, n_ff,
                                   n_embd, &v->up, &v->bias[1], &v->has_bias[1], err,
                                   errlen);
    }
    if (!has_g || !has_u || has_f)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "packed_experts/layout.json: layer %d: experts need gate_proj and "
                      "up_proj, or gate_up_proj alone (have gate %d, up %d, gate_up %d)",
                      il, has_g, has_u, has_f);
    int rc = proj_view(&g, il, "gate_proj", n_ff, 0, n_ff, n_embd, &v->gate, &v->bias[0],
                       &v->has_bias[0], err, errlen);
    return rc ? rc : proj_view(&u, il, "up_proj", n_ff, 0, n_ff, n_embd, &v->up,
                               &v->bias[1], &v->has_bias[1], err, errlen);
}

int mf_moe_layer_views(const mf_expert_store *st, int il, int n_embd, int n_ff,
                       struct mf_moe_views *v, char *err, size_t errlen) {
    memset(v, 0, sizeof *v);
    struct mf_expert_proj d;
    if (!mf_expert_store_proj(st, il, "down_proj", &d))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "packed_experts/layout.json: layer %d: component down_proj.weight "
                      "missing", il);
    int rc = gate_up_views(st, il, n_embd, n_ff, v, err, errlen);
    return rc ? rc : proj_view(&d, il, "down_proj", n_embd, 0, n_embd, n_ff, &v->down,
                               &v->bias[2], &v->has_bias[2], err, errlen);
}

struct mf_moe_batch mf_moe_views_batch(const struct mf_moe_views *v) {
    struct mf_moe_batch b = {.gate = &v->gate, .up = &v->up, .down = &v->down,
                             .gate_bias = v->has_bias[0] ? &v->bias[0] : NULL,
                             .up_bias = v->has_bias[1] ? &v->bias[1] : NULL,
                             .down_bias = v->has_bias[2] ? &v->bias[2] : NULL,
                             .act = v->act, .act_alpha = v->act_alpha,
                             .act_limit = v->act_limit};
    return b;
}

int mf_moe_check_experts(const mf_model *m, int n_embd, int n_ff, char *err,
                         size_t errlen) {
    for (int il = 0; il < m->cfg.num_hidden_layers; il++) {
        if (!m->cfg.layer_is_moe[il])
            continue;
        struct mf_moe_views v;
        int rc = mf_moe_layer_views(m->experts, il, n_embd, n_ff, &v, err, errlen);
        struct mf_moe_batch b = mf_moe_views_batch(&v);
        if (rc == MF_OK && m->be->ops->moe_experts_check)
            rc = m->be->ops->moe_experts_check(m->be, &b, il, err, errlen);
        if (rc)
            return rc;
    }
    return MF_OK;
}

static int check_config(const struct mf_moe_config *c, int max_tok, char *err,
                        size_t errlen) {
    if (c->n_expert < 1 || c->n_expert > MF_MOE_MAX_EXPERTS || c->n_expert_used < 1 ||
        c->n_expert_used > c->n_expert || max_tok < 1)
        return mf_err(err, errlen, MF_ERR_ARG,
                      "moe: bad sizes (num_experts %d (at most %d), num_experts_per_tok "
                      "%d, max_tok %d)", c->n_expert, MF_MOE_MAX_EXPERTS, c->n_expert_used,
                      max_tok);
    if (c->router == MF_ROUTER_NOAUX_TC &&
        (c->n_group < 1 || c->n_group > 256 || c->n_expert % c->n_group ||
         c->topk_group < 1 ||
         c->topk_group > c->n_group || c->n_expert / c->n_group < 2 ||
         c->n_expert_used > c->topk_group * (c->n_expert / c->n_group)))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "moe: noaux_tc router needs n_group dividing %d experts into groups "
                      "of >= 2 and topk_group in [1, n_group] holding >= %d experts "
                      "(n_group %d, topk_group %d)", c->n_expert, c->n_expert_used,
                      c->n_group, c->topk_group);
    return MF_OK;
}

static int bind_views(struct mf_moe_scratch *s, const mf_expert_store *st,
                      const struct mf_moe_config *c, char *err, size_t errlen) {
    s->has_store = 1;
    s->expert_bytes = mf_expert_store_layout(st)->expert_size;
    s->views = calloc((size_t)s->n_layer, sizeof *s->views);
    if (!s->views)
        return mf_err(err, errlen, MF_ERR_NOMEM, "moe: out of memory");
    for (int il = 0; il < s->n_layer; il++) {
        if (!s->is_moe[il])
            continue;
        int rc = mf_moe_layer_views(st, il, c->n_embd, c->n_ff_exp, &s->views[il], err,
                                    errlen);
        if (rc)
            return rc;
        s->views[il].act = c->act;
        s->views[il].act_alpha = c->act_alpha;
        s->views[il].act_limit = c->act_limit;
    }
    return MF_OK;
}

static int alloc_host_arrays(struct mf_moe_scratch *s, const struct mf_moe_config *c,
                             int n_layer) {
    size_t E = (size_t)c->n_expert, K = (size_t)c->n_expert_used;
    size_t TK = (size_t)s->max_tok * K;
    s->sel_idx = calloc(TK, sizeof(int32_t));
    s->sel_w = calloc(TK, sizeof(float));
    s->count = calloc(E, sizeof(int32_t));
    s->start = calloc(E + 1, sizeof(int32_t));
    s->tok_of = calloc(TK, sizeof(int32_t));
    s->w_of = calloc(TK, sizeof(float));
    s->used = calloc(E, sizeof(int32_t));
    s->prev = calloc((size_t)n_layer * K, sizeof(int32_t));
    s->prev_ok = calloc((size_t)n_layer, 1);
    s->res_blob = calloc(E, sizeof(void *));
    s->res_row0 = calloc(E, sizeof(int32_t));
    s->res_rows = calloc(E, sizeof(int32_t));
    return s->sel_idx && s->sel_w && s->count && s->start && s->tok_of && s->w_of &&
           s->used && s->prev && s->prev_ok && s->res_blob && s->res_row0 && s->res_rows;
}

static int alloc_device(mf_ctx *ctx, struct mf_moe_scratch *s,
                        const struct mf_moe_config *c) {
    size_t F = sizeof(float), H = (size_t)c->n_embd, T = (size_t)s->max_tok;
    size_t TK = T * (size_t)c->n_expert_used;
    s->logits_dev = dev_alloc(ctx, T * (size_t)c->n_expert * F);
    s->xg = dev_alloc(ctx, TK * H * F);
    s->gu = dev_alloc(ctx, TK * 2 * (size_t)c->n_ff_exp * F);
    s->eo = dev_alloc(ctx, TK * H * F);
    int ok = s->logits_dev && s->xg && s->gu && s->eo;
    if (c->n_ff_shexp > 0) {
        s->sh_tmp = dev_alloc(ctx, T * 2 * (size_t)c->n_ff_shexp * F);
        s->sh_out = dev_alloc(ctx, T * H * F);
        s->sh_gate = dev_alloc(ctx, T * F);
        ok = ok && s->sh_tmp && s->sh_out && s->sh_gate;
    }
    if (ok && s->resident) {
        s->idx_dev = dev_alloc(ctx, TK * sizeof(int32_t));
        s->w_dev = dev_alloc(ctx, TK * F);
        ok = s->idx_dev && s->w_dev;
    }
    return ok;
}

// Reader slots come from the backend's host memory (pinned staging on a GPU).
static void *slot_alloc(void *user, size_t bytes) {
    mf_ctx *ctx = user;
    return ctx->be->ops->alloc_host(ctx->ex, bytes);
}

static void slot_free(void *user, void *p) {
    mf_ctx *ctx = user;
    ctx->be->ops->dealloc_host(ctx->ex, p);
}

// Page-locking of the expert mappings by the model's backend (shared by its contexts).
static int pin_cb(void *user, const void *p, size_t n, char *err, size_t errlen) {
    struct mf_backend *be = user;
    return be->ops->pin_host(be, p, n, err, errlen);
}

static void unpin_cb(void *user, const void *p) {
    struct mf_backend *be = user;
    be->ops->unpin_host(be, p);
}

static int reader_new(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                      char *err, size_t errlen) {
    struct mf_expert_reader_params p = mf_expert_reader_default_params();
    p.mode = ctx->io_mode;
    p.to_device = !ctx->be->ops->host_is_device;
    if (p.to_device && ctx->be->ops->pin_host && ctx->be->ops->unpin_host)
        p.pin = (struct mf_expert_pin){.pin = pin_cb, .unpin = unpin_cb, .user = ctx->be};
    if (ctx->params.io_threads > 0)
        p.n_workers = ctx->params.io_threads;
    // a layer's K reads and the next layer's prefetch in flight together
    if (p.n_slots < 2 * c->n_expert_used)
        p.n_slots = 2 * c->n_expert_used;
    // RAM cache, default 0 (off). Measured: over pread and mmap it only duplicates the
    // page cache (cold decode 9.5 -> 8.3 and 10.5 -> 8.5 tokens/s with 256 MiB); over
    // direct, which bypasses the page cache, it is the only cache and pays (12.7 ->
    // 17.4 tokens/s cold): give direct mode a cache (bench/RESULTS.md).
    p.cache_bytes = (uint64_t)ctx->params.expert_cache_bytes;
    p.alloc_fn = slot_alloc;
    p.free_fn = slot_free;
    p.alloc_user = ctx;
    int rc = mf_expert_reader_new(&s->reader, ctx->model->experts, &p, err, errlen);
    if (rc != MF_OK)
        return rc;
    mf_expert_reader_stats(s->reader, &s->seen);
    snprintf(ctx->io_mode_in_effect, sizeof ctx->io_mode_in_effect, "%s",
             mf_io_mode_name(s->seen.mode));
    snprintf(ctx->io_note, sizeof ctx->io_note, "%s", s->seen.mode_note);
    mf_log(ctx->model, MF_LOG_INFO, "expert I/O: %s (%s), %d threads, %d slots",
           ctx->io_mode_in_effect, ctx->io_note, s->seen.n_workers, s->seen.n_slots);
    return MF_OK;
}

// Slots of the device expert cache (mf_model_params.gpu_cache_*), at most the model's
// routed experts.
static int dev_cache_slots(mf_ctx *ctx, const struct mf_moe_scratch *s,
                           const struct mf_moe_config *c) {
    const struct mf_model_params *p = &ctx->model->params;
    int64_t total = 0, n = 0;
    for (int il = 0; il < s->n_layer; il++)
        total += s->is_moe[il] ? c->n_expert : 0;
    if (p->gpu_cache_fraction >= 0.0) {
        n = (int64_t)(p->gpu_cache_fraction * (double)total);
    } else if (p->gpu_cache_bytes >= 0) {
        n = p->gpu_cache_bytes / (int64_t)s->expert_bytes;
    } else {   // auto: what the resident rule leaves to experts
        uint64_t free_b = 0, total_b = 0;
        char e[256];
        if (ctx->be->ops->mem_info(ctx->be, &free_b, &total_b, e, sizeof e) != MF_OK)
            free_b = 0;
        double usable = mf_device_usable_bytes(free_b);
        n = usable > 0.0 ? (int64_t)(usable / (double)s->expert_bytes) : 0;
    }
    n = n > total ? total : n;
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

// The deferred release of reader tickets and, where the device cannot read host memory
// (or MOEFLUX_TEST_DEV_CACHE=1 asks for it on the CPU, for tests), the device cache.
static int stream_setup(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                        char *err, size_t errlen) {
    const struct mf_backend_ops *op = ctx->be->ops;
    const char *hook = getenv("MOEFLUX_TEST_DEV_CACHE");
    int use_dc = !op->host_is_device || (hook && strcmp(hook, "1") == 0);
    s->defer = op->queues_work || use_dc;
    if (s->defer) {
        size_t n_tk = (size_t)mf_expert_reader_n_tickets(s->reader);
        s->pend = calloc(n_tk, sizeof *s->pend);
        s->pend_slot = calloc(n_tk, sizeof *s->pend_slot);
        s->pend_fence = op->fence_new(ctx->ex);
        if (!s->pend || !s->pend_slot || !s->pend_fence)
            return mf_err(err, errlen, MF_ERR_NOMEM, "moe: out of memory (release fence)");
    }
    if (!use_dc)
        return MF_OK;
    s->fifo_tk = calloc((size_t)c->n_expert, sizeof *s->fifo_tk);
    s->fifo_slot = calloc((size_t)c->n_expert, sizeof *s->fifo_slot);
    s->run_ie = calloc((size_t)c->n_expert, sizeof *s->run_ie);
    s->run_slot = calloc((size_t)c->n_expert, sizeof *s->run_slot);
    s->miss_ie = calloc((size_t)c->n_expert, sizeof *s->miss_ie);
    if (!s->fifo_tk || !s->fifo_slot || !s->run_ie || !s->run_slot || !s->miss_ie)
        return mf_err(err, errlen, MF_ERR_NOMEM, "moe: out of memory (device cache)");
    int n = dev_cache_slots(ctx, s, c);
    int rc = mf_dev_cache_new(op, ctx->ex, s->n_layer, c->n_expert, s->expert_bytes, n,
                              &s->dc, err, errlen);
    if (rc == MF_OK)
        mf_log(ctx->model, MF_LOG_INFO, "device expert cache: %d experts (%.3f GB) in %s "
               "memory", n, (double)n * (double)s->expert_bytes / 1e9, op->name);
    return rc;
}

static enum mf_route_kind route_kind(enum mf_router_kind r) {
    return r == MF_ROUTER_NOAUX_TC       ? MF_ROUTE_NOAUX_TC
           : r == MF_ROUTER_TOPK_SOFTMAX ? MF_ROUTE_TOPK_SOFTMAX
                                         : MF_ROUTE_SOFTMAX;
}

int mf_moe_scratch_new(mf_ctx *ctx, const struct mf_moe_config *c, int max_tok,
                       struct mf_moe_scratch **out, char *err, size_t errlen) {
    *out = NULL;
    int rc = check_config(c, max_tok, err, errlen);
    if (rc != MF_OK)
        return rc;
    struct mf_moe_scratch *s = calloc(1, sizeof *s);
    if (!s)
        return mf_err(err, errlen, MF_ERR_NOMEM, "moe: out of memory");
    const mf_expert_store *st = ctx->model->experts;
    s->max_tok = max_tok;
    s->route = (struct mf_route_params){
        .kind = route_kind(c->router),
        .n_expert = c->n_expert, .n_used = c->n_expert_used,
        .norm_topk_prob = c->norm_topk_prob, .n_group = c->n_group,
        .topk_group = c->topk_group, .routed_scaling_factor = c->routed_scaling_factor};
    s->n_layer = ctx->model->cfg.num_hidden_layers;
    s->is_moe = ctx->model->cfg.layer_is_moe;
    // Decode prefetch, default (-1) off: measured (bench/RESULTS.md, streaming section)
    // the previous token's experts served 2% of the next token's (54.0 -> 52.9
    // MiB/token read), and the extra reads cost more than they saved (cold decode
    // pread 9.5 -> 6.4 tokens/s, direct 12.7 -> 10.0). Routing of a trained model
    // repeats more than the bench's random weights; turn it on where that is measured.
    s->prefetch = ctx->params.prefetch == 1;
    s->resident = ctx->model->experts_dev;
    if (st && (rc = bind_views(s, st, c, err, errlen)) != MF_OK) {
        mf_moe_scratch_free(ctx, s);
        return rc;
    }
    if (!alloc_host_arrays(s, c, s->n_layer) || !alloc_device(ctx, s, c)) {
        // The message first: it reads s, which the free releases.
        rc = mf_err(err, errlen, MF_ERR_NOMEM,
                    "moe: out of memory for scratch (%d tokens, %d experts of %llu bytes)",
                    max_tok, c->n_expert, (unsigned long long)s->expert_bytes);
        mf_moe_scratch_free(ctx, s);
        return rc;
    }
    if (s->resident) {
        snprintf(ctx->io_mode_in_effect, sizeof ctx->io_mode_in_effect, "resident");
        snprintf(ctx->io_note, sizeof ctx->io_note, "experts resident in %s memory",
                 ctx->be->ops->name);
    }
    else if (st && ((rc = reader_new(ctx, s, c, err, errlen)) != MF_OK ||
                    (rc = stream_setup(ctx, s, c, err, errlen)) != MF_OK)) {
        mf_moe_scratch_free(ctx, s);
        return rc;
    }
    *out = s;
    return MF_OK;
}

void mf_moe_scratch_free(mf_ctx *ctx, struct mf_moe_scratch *s) {
    if (!s)
        return;
    if (s->defer)   // queued copies and experts may still read reader slots
        ctx->be->ops->sync(ctx->ex);
    mf_dev_cache_free(s->dc);
    if (s->pend_fence)
        ctx->be->ops->fence_free(ctx->ex, s->pend_fence);
    mf_expert_reader_free(s->reader);   // before the slots' backend goes
    void *host[] = {s->sel_idx, s->sel_w, s->count, s->start, s->tok_of, s->w_of, s->used,
                    s->prev, s->prev_ok, (void *)s->res_blob, s->res_row0, s->res_rows,
                    s->fifo_tk, s->fifo_slot, s->run_ie, s->run_slot, s->miss_ie,
                    s->pend, s->pend_slot};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        free(host[i]);
    void *dev[] = {s->logits_dev, s->xg, s->gu, s->eo, s->sh_tmp, s->sh_out, s->sh_gate,
                   s->idx_dev, s->w_dev};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        dev_free(ctx, dev[i]);
    free(s->views);
    free(s);
}

/* ==== Larger token counts (prefill groups) ====
 * decoder.c runs the MoE of a long prompt over a group of chunks at once, so each
 * expert is read once per group instead of once per chunk; the token-sized arrays
 * grow to the group on its first use (a ctx that never sees a long prompt never pays
 * for them). The reader, its slots and the decode prefetch history stay. */

static void free_token_arrays(mf_ctx *ctx, struct mf_moe_scratch *s) {
    void *host[] = {s->sel_idx, s->sel_w, s->tok_of, s->w_of};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        free(host[i]);
    void *dev[] = {s->logits_dev, s->xg, s->gu, s->eo, s->sh_tmp, s->sh_out, s->sh_gate};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        dev_free(ctx, dev[i]);
}

int mf_moe_scratch_reserve(mf_ctx *ctx, struct mf_moe_scratch *s,
                           const struct mf_moe_config *c, int max_tok, char *err,
                           size_t errlen) {
    if (max_tok <= s->max_tok)
        return MF_OK;
    struct mf_moe_scratch g = {.max_tok = max_tok};
    size_t TK = (size_t)max_tok * (size_t)c->n_expert_used;
    g.sel_idx = calloc(TK, sizeof(int32_t));
    g.sel_w = calloc(TK, sizeof(float));
    g.tok_of = calloc(TK, sizeof(int32_t));
    g.w_of = calloc(TK, sizeof(float));
    int ok = g.sel_idx && g.sel_w && g.tok_of && g.w_of;
    if (!ok || !alloc_device(ctx, &g, c)) {
        free_token_arrays(ctx, &g);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "moe: out of memory for the scratch of a %d-token prefill group "
                      "(%d experts per token, hidden %d)", max_tok, c->n_expert_used,
                      c->n_embd);
    }
    free_token_arrays(ctx, s);
    s->max_tok = max_tok;
    s->sel_idx = g.sel_idx, s->sel_w = g.sel_w, s->tok_of = g.tok_of, s->w_of = g.w_of;
    s->logits_dev = g.logits_dev, s->xg = g.xg, s->gu = g.gu, s->eo = g.eo;
    s->sh_tmp = g.sh_tmp, s->sh_out = g.sh_out, s->sh_gate = g.sh_gate;
    return MF_OK;
}

/* ==== Routing ====
 * The router matmul and moe_route (softmax top-k or noaux_tc, the backend's op: the
 * same tie rule everywhere) give each token's experts and weights on the host; the
 * (token, expert) pairs are then grouped by expert. */

// Group the call's (token, expert) pairs by expert: tok_of/w_of hold, for expert e,
// entries start[e] .. start[e+1]-1 in token order; used lists distinct experts.
static int group_by_expert(struct mf_moe_scratch *s, const struct mf_moe_config *c,
                           int n_tok) {
    int E = c->n_expert, K = c->n_expert_used;
    memset(s->count, 0, (size_t)E * sizeof(int32_t));
    for (int i = 0; i < n_tok * K; i++)
        s->count[s->sel_idx[i]]++;
    int n_used = 0;
    s->start[0] = 0;
    for (int e = 0; e < E; e++) {
        s->start[e + 1] = s->start[e] + s->count[e];
        if (s->count[e])
            s->used[n_used++] = e;
        s->count[e] = 0;   // reused as fill cursor below
    }
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < K; j++) {
            int e = s->sel_idx[t * K + j];
            int at = s->start[e] + s->count[e]++;
            s->tok_of[at] = t;
            s->w_of[at] = s->sel_w[t * K + j];
        }
    return n_used;
}

// The router's logits of x; with in->g, of x = rmsnorm(resid) * g, which the same call
// writes (mf_rms_matmul_multi).
static void router_logits(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_layer *w,
                          float *x, const float *resid, const struct mf_moe_norm *in,
                          int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    if (!in || !in->g) {
        op->matmul(ctx->ex, s->logits_dev, &w->router, x, n_tok);
        return;
    }
    float *const y[1] = {s->logits_dev};
    const struct mf_weight *const wr[1] = {&w->router};
    mf_rms_matmul_multi(op, ctx->ex, 1, y, wr, x, resid, in->g, in->eps, n_tok);
}

static int route(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_layer *w,
                 const struct mf_moe_config *c, float *x, const float *resid,
                 const struct mf_moe_norm *in, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    router_logits(ctx, s, w, x, resid, in, n_tok);
    const float *bias = c->router != MF_ROUTER_SOFTMAX ? w->router_bias.w : NULL;
    op->moe_route(ctx->ex, NULL, NULL, s->logits_dev, bias, &s->route, n_tok, s->sel_idx,
                  s->sel_w);
    return group_by_expert(s, c, n_tok);
}

/* ==== Expert reads and compute ====
 * The layer's distinct experts are submitted to the reader the moment routing is
 * known (its I/O threads start at once); the shared expert computes while they are in
 * flight; then each routed expert runs as its bytes land (moe_experts on its rows of
 * xg, into its rows of eo). The weighted scatter-add into y runs once over all rows in
 * expert order afterwards, so y sums the experts in the same order whatever the I/O
 * mode, cache, prefetch or arrival order: results are bitwise the same. Prefill
 * chunks with more experts than slots compute arrived experts to free slots. */

// Experts ie[0..n) of layer il, whose blobs are at res_blob[0..n), in one moe_experts
// call over their rows of the grouped scratch.
static void run_batch(mf_ctx *ctx, struct mf_moe_scratch *s, int il, const int32_t *ie,
                      int n) {
    if (n <= 0)
        return;
    for (int i = 0; i < n; i++) {
        s->res_row0[i] = s->start[ie[i]];
        s->res_rows[i] = s->start[ie[i] + 1] - s->start[ie[i]];
    }
    struct mf_moe_batch b = mf_moe_views_batch(&s->views[il]);
    b.n = n;
    b.blob_host = s->res_blob;
    b.row0_host = s->res_row0;
    b.n_rows_host = s->res_rows;
    ctx->be->ops->moe_experts(ctx->ex, s->eo, s->gu, s->xg, &b);
}

static void run_expert(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int ie,
                       const void *blob) {
    s->res_blob[0] = blob;
    run_batch(ctx, s, il, &ie, 1);
}

// Deferred release: a ticket whose slot queued work may still read is kept, not
// released. Its last reader is the copy into device slot `slot` where there is a
// device cache (the copy's fence says when it is done), else the expert's kernels
// (slot -1: a fence recorded after the work queued so far). release_kept waits for
// those fences (usually reached already: the routing that comes before each call
// synchronises) and releases the kept tickets.
static void keep_or_release(struct mf_moe_scratch *s, int tk, int slot) {
    if (!s->defer) {
        mf_expert_reader_release(s->reader, tk);
        return;
    }
    s->pend_slot[s->n_pend] = slot;
    s->pend[s->n_pend++] = tk;
}

static void release_kept(mf_ctx *ctx, struct mf_moe_scratch *s) {
    if (!s->n_pend)
        return;
    const struct mf_backend_ops *op = ctx->be->ops;
    double t = mf_now_s();
    int after_work = 0;
    for (int i = 0; i < s->n_pend; i++) {
        if (s->pend_slot[i] >= 0)
            mf_dev_cache_wait_copy(s->dc, s->pend_slot[i]);
        else
            after_work = 1;
    }
    if (after_work) {
        op->fence_record(ctx->ex, s->pend_fence);
        op->fence_wait(ctx->ex, s->pend_fence);
    }
    if (s->dc)
        ctx->stats.gpu_copy_wait_s += mf_now_s() - t;
    for (int i = 0; i < s->n_pend; i++)
        mf_expert_reader_release(s->reader, s->pend[i]);
    s->n_pend = 0;
}

// Before the host blocks on expert reads: the device starts what is queued (the shared
// expert, experts already run), so it computes while the host waits.
static void submit_queued(mf_ctx *ctx) {
    if (ctx->be->ops->submit)
        ctx->be->ops->submit(ctx->ex);
}

// Wait for whichever submitted expert lands first, run it, release (or keep) its slot.
static int run_one_ready(mf_ctx *ctx, struct mf_moe_scratch *s, int *outstanding) {
    const void *data = NULL;
    int tk = -1, il = -1, ie = -1;
    submit_queued(ctx);
    int rc = mf_expert_reader_wait_any(s->reader, &tk, &data, s->err, sizeof s->err);
    mf_expert_reader_ticket_expert(s->reader, tk, &il, &ie);
    (*outstanding)--;
    if (rc != MF_OK) {
        mf_expert_reader_release(s->reader, tk);
        return mf_ctx_fail(ctx, rc, "layer %d expert %d: %s", il, ie, s->err);
    }
    run_expert(ctx, s, il, ie, data);
    keep_or_release(s, tk, -1);
    return MF_OK;
}

// The reader is full: release kept tickets, else run a landed expert.
static int make_room(mf_ctx *ctx, struct mf_moe_scratch *s, int *outstanding) {
    if (s->n_pend) {
        release_kept(ctx, s);
        return MF_OK;
    }
    return run_one_ready(ctx, s, outstanding);
}

// Submit every expert of the call (making room while all slots are held).
static int submit_all(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int n_used,
                      int *outstanding) {
    for (int j = 0; j < n_used;) {
        int tk;
        int rc = mf_expert_reader_submit(s->reader, il, s->used[j], &tk, s->err,
                                         sizeof s->err);
        if (rc == MF_OK) {
            (*outstanding)++;
            j++;
        } else if (rc == MF_EXPERT_READER_FULL && (*outstanding > 0 || s->n_pend > 0)) {
            if ((rc = make_room(ctx, s, outstanding)) != MF_OK)
                return rc;
        } else {
            return mf_ctx_fail(ctx, rc < 0 ? rc : MF_ERR_STATE,
                               "layer %d: expert reader refused expert %d: %s", il,
                               s->used[j], s->err);
        }
    }
    return MF_OK;
}

/* ==== Device expert cache ====
 * Every expert of the call is looked up first, in the order of used[]; the hits then
 * run from their device slots in one call (no read, no copy). Each miss then gets a
 * slot (so the cache's choices depend only on the routing; a copy into a slot a hit
 * of this call holds waits for that call, through the slot's `used` fence) and its
 * read submitted. The misses run in submission order: wait for the bytes, queue the
 * copy into the slot on the copy queue (the copy of one overlaps the compute of the one
 * before; a slot reused within the call, as by the ring without retention, is copied
 * after its earlier expert's kernels, through the same fence), run. A miss that never
 * landed (a failed read, an error before it) leaves the cache. */

// The experts run_ie[0..n) from the device slots run_slot[], in one call; their slots
// are then marked used (a later copy into one waits for this work).
static void run_slots(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int n) {
    for (int i = 0; i < n; i++)
        s->res_blob[i] = mf_dev_cache_slot_blob(s->dc, s->run_slot[i]);
    run_batch(ctx, s, il, s->run_ie, n);
    for (int i = 0; i < n; i++)
        mf_dev_cache_used(s->dc, s->run_slot[i]);
}

// The oldest submitted miss: wait for its bytes, queue their copy into its slot, run it.
static int run_oldest(mf_ctx *ctx, struct mf_moe_scratch *s, int il) {
    int tk = s->fifo_tk[s->fifo_head], slot = s->fifo_slot[s->fifo_head], ie = -1;
    s->fifo_head++;
    const void *data = NULL;
    submit_queued(ctx);
    int rc = mf_expert_reader_wait(s->reader, tk, &data, s->err, sizeof s->err);
    mf_expert_reader_ticket_expert(s->reader, tk, NULL, &ie);
    if (rc != MF_OK) {
        mf_expert_reader_release(s->reader, tk);
        mf_dev_cache_forget(s->dc, slot);
        return mf_ctx_fail(ctx, rc, "layer %d expert %d: %s", il, ie, s->err);
    }
    // Asynchronous copy from a slot, or from a page-locked mapping (which outlives the
    // ticket); a plain mapping's pages are copied by the time upload returns.
    const int slot_copy = s->seen.mode != MF_IO_MMAP;
    mf_dev_cache_fill(s->dc, slot, data, slot_copy || s->seen.pinned);
    if (slot_copy)
        keep_or_release(s, tk, slot);   // until the copy that reads it is done
    else
        mf_expert_reader_release(s->reader, tk);
    s->run_ie[0] = ie;
    s->run_slot[0] = slot;
    run_slots(ctx, s, il, 1);
    return MF_OK;
}

static int submit_miss(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int ie, int slot) {
    for (;;) {
        int tk;
        int rc = mf_expert_reader_submit(s->reader, il, ie, &tk, s->err, sizeof s->err);
        if (rc == MF_OK) {
            s->fifo_tk[s->fifo_n] = tk;
            s->fifo_slot[s->fifo_n++] = slot;
            return MF_OK;
        }
        if (rc == MF_EXPERT_READER_FULL && s->n_pend > 0)
            release_kept(ctx, s);
        else if (rc == MF_EXPERT_READER_FULL && s->fifo_head < s->fifo_n)
            rc = run_oldest(ctx, s, il);
        else
            rc = mf_ctx_fail(ctx, rc < 0 ? rc : MF_ERR_STATE,
                             "layer %d: expert reader refused expert %d: %s", il, ie,
                             s->err);
        if (rc != MF_OK && rc != MF_EXPERT_READER_FULL) {
            mf_dev_cache_forget(s->dc, slot);
            return rc;
        }
    }
}

// Run every submitted miss as it lands: its kernels queue behind its own copy while the
// next copy is in flight. (Landing them all and running them in one call measured
// slower on the H200: 0.68 against 0.72 of the streaming bound, bench/RESULTS.md.)
static int run_misses(mf_ctx *ctx, struct mf_moe_scratch *s, int il) {
    int rc = MF_OK;
    while (rc == MF_OK && s->fifo_head < s->fifo_n)
        rc = run_oldest(ctx, s, il);
    return rc;
}

static int submit_dev(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int n_used) {
    int n_hit = 0, n_miss = 0;
    s->fifo_head = s->fifo_n = 0;
    for (int j = 0; j < n_used; j++) {
        int ie = s->used[j], slot = mf_dev_cache_lookup(s->dc, il, ie);
        if (slot >= 0) {
            s->run_ie[n_hit] = ie;
            s->run_slot[n_hit++] = slot;
        } else {
            s->miss_ie[n_miss++] = ie;
        }
    }
    run_slots(ctx, s, il, n_hit);
    for (int j = 0; j < n_miss; j++) {
        int ie = s->miss_ie[j], slot = mf_dev_cache_reserve(s->dc, il, ie);
        if (slot < 0)
            return mf_ctx_fail(ctx, MF_ERR_STATE, "layer %d expert %d: no device cache "
                               "slot", il, ie);
        int rc = submit_miss(ctx, s, il, ie, slot);
        if (rc != MF_OK)
            return rc;
    }
    return MF_OK;
}

static void take_dev_cache_stats(mf_ctx *ctx, struct mf_moe_scratch *s) {
    struct mf_dev_cache_stats now, *was = &s->dc_seen;
    mf_dev_cache_stats(s->dc, &now);
    ctx->stats.gpu_cache_hits += now.hits - was->hits;
    ctx->stats.gpu_cache_misses += now.misses - was->misses;
    ctx->stats.gpu_bytes_uploaded += now.bytes_uploaded - was->bytes_uploaded;
    *was = now;
}

// Decode: start reading the next MoE layer's previous-token experts, and remember
// this layer's for the next token.
static void prefetch_next(struct mf_moe_scratch *s, int il, int K) {
    int next = il + 1;
    while (next < s->n_layer && !s->is_moe[next])
        next++;
    if (next < s->n_layer && s->prev_ok[next])
        mf_expert_reader_prefetch(s->reader, next, s->prev + (size_t)next * K, K);
    memcpy(s->prev + (size_t)il * K, s->sel_idx, (size_t)K * sizeof(int32_t));
    s->prev_ok[il] = 1;
}

// Add what the reader did since the last call to the ctx's counters.
static void take_reader_stats(mf_ctx *ctx, struct mf_moe_scratch *s) {
    struct mf_expert_reader_stats now, *was = &s->seen;
    mf_expert_reader_stats(s->reader, &now);
    struct mf_ctx_stats *st = &ctx->stats;
    int64_t misses = now.misses - was->misses;
    double wait = now.wait_s - was->wait_s;
    st->expert_reads += misses;
    st->expert_bytes_read += misses * (int64_t)s->expert_bytes;
    st->expert_read_s += wait;
    st->io_wait_s += wait;
    st->expert_bytes_disk += now.bytes_disk - was->bytes_disk;
    st->expert_bytes_mapped += now.bytes_mmap - was->bytes_mmap;
    st->expert_bytes_cache += now.bytes_cache - was->bytes_cache;
    st->cache_hits += now.hits - was->hits;
    st->cache_misses += misses;
    st->prefetch_issued += now.prefetch_issued - was->prefetch_issued;
    st->prefetch_hits += now.prefetch_hits - was->prefetch_hits;
    *was = now;
}

static void shared_compute(mf_ctx *ctx, struct mf_moe_scratch *s,
                           const struct mf_moe_config *c, const struct mf_moe_layer *w,
                           const float *x, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_ffn_layer f = {w->shared_gate, w->shared_up, w->shared_down};
    mf_ffn_forward(ctx, s->sh_out, s->sh_tmp, &f, x, n_tok, c->n_ff_shexp);
    if (w->has_shared_gate) {
        // qwen: shared output scaled per token by sigmoid(shared_expert_gate(x))
        op->matmul(ctx->ex, s->sh_gate, &w->shared_expert_gate, x, n_tok);
        op->mul_sigmoid(ctx->ex, s->sh_out, s->sh_gate, n_tok, c->n_embd, 1, 1);
    }
}

// A prefill group routes so many tokens that nearly every expert of the next MoE
// layer will be wanted (512 tokens x 8 of 256 experts: each is unused with
// probability (1 - 8/256)^512 < 1e-7): start reading its lowest-numbered experts, the
// ones that layer submits first, into the working slots now, so the reads overlap the
// next layer's mixer instead of starting after it. Only for calls routing at least 4
// picks per expert (then each is unused with probability below 2%).
static void prefetch_next_group(struct mf_moe_scratch *s, const struct mf_moe_config *c,
                                int il, int n_tok) {
    if ((int64_t)n_tok * c->n_expert_used < 4 * (int64_t)c->n_expert)
        return;
    int next = il + 1;
    while (next < s->n_layer && !s->is_moe[next])
        next++;
    if (next >= s->n_layer)
        return;
    int32_t ids[2 * MF_MOE_PREFETCH_MAX_K];
    int n = 2 * c->n_expert_used;   // the reader's working slots (reader_new)
    n = n > (int)(sizeof ids / sizeof ids[0]) ? (int)(sizeof ids / sizeof ids[0]) : n;
    n = n > c->n_expert ? c->n_expert : n;
    for (int i = 0; i < n; i++)
        ids[i] = i;
    mf_expert_reader_prefetch(s->reader, next, ids, n);
}

// Every routed expert of the call: reads submitted at once, the shared expert while
// they are in flight, each expert run as it lands (from the device cache where there
// is one). Slots the queued work reads are released after the next call's routing
// (release_kept in mf_moe_forward).
static int experts_forward(mf_ctx *ctx, struct mf_moe_scratch *s,
                           const struct mf_moe_config *c, const struct mf_moe_layer *w,
                           const float *x, int n_tok, int n_used, double *shared_s) {
    int outstanding = 0, has_shared = w->has_shared && c->n_ff_shexp > 0;
    int rc = s->dc ? submit_dev(ctx, s, w->il, n_used)
                   : submit_all(ctx, s, w->il, n_used, &outstanding);
    if (rc == MF_OK && s->prefetch && n_tok == 1)
        prefetch_next(s, w->il, c->n_expert_used);
    double t = mf_now_s();
    if (rc == MF_OK && has_shared)
        shared_compute(ctx, s, c, w, x, n_tok);   // while the reads are in flight
    *shared_s = mf_now_s() - t;
    while (rc == MF_OK && outstanding > 0)
        rc = run_one_ready(ctx, s, &outstanding);
    if (rc == MF_OK && s->dc)
        rc = run_misses(ctx, s, w->il);
    if (rc == MF_OK && n_tok > 1)
        prefetch_next_group(s, c, w->il, n_tok);
    if (rc != MF_OK) {
        while (s->dc && s->fifo_head < s->fifo_n)   // reserved, never filled
            mf_dev_cache_forget(s->dc, s->fifo_slot[s->fifo_head++]);
        ctx->be->ops->sync(ctx->ex);   // nothing queued may read a slot released below
        s->n_pend = 0;
        mf_expert_reader_release_all(s->reader);
    }
    take_reader_stats(ctx, s);
    if (s->dc)
        take_dev_cache_stats(ctx, s);
    return rc;
}

/* ==== Resident experts ====
 * Every expert of the model lies in device memory (the model's experts_dev, one region
 * per MoE layer, expert e at e * expert_bytes). A few tokens route on the device and
 * run through moe_experts_dev: no host synchronisation in the layer. A prefill chunk
 * routes on the host as in streaming, so each needed expert is read once per chunk,
 * and runs every expert in one moe_experts call. Both give the bits of the streaming
 * path (moe_experts_dev's contract, and the same per-expert rows and combine order). */

// Tokens up to which a resident layer routes on the device. Below the rows from which
// a GPU's grouped call may take an expert's rows in tiles (MF_MMA_MIN_ROWS, 8, in
// shaders/mf_params.h), so that both paths give those rows the one-row kernels' bits.
#define MOE_DEV_MAX_TOK 4

static void resident_dev(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                         const struct mf_moe_layer *w, float *y, float *x, int n_tok,
                         float *resid, int32_t *flag, const struct mf_moe_norm *in) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_ctx_stats *st = &ctx->stats;
    double t0 = mf_now_s();
    const float *bias = c->router != MF_ROUTER_SOFTMAX ? w->router_bias.w : NULL;
    if (in && in->g) {   // the input norm, router and routing in one call
        mf_rms_route(op, ctx->ex, s->idx_dev, s->w_dev, s->logits_dev, bias, &s->route,
                     n_tok, &w->router, x, resid, in->g, in->eps);
    } else {
        op->matmul(ctx->ex, s->logits_dev, &w->router, x, n_tok);
        op->moe_route(ctx->ex, s->idx_dev, s->w_dev, s->logits_dev, bias, &s->route, n_tok,
                      NULL, NULL);
    }
    double t1 = mf_now_s();
    if (w->has_shared && c->n_ff_shexp > 0)
        shared_compute(ctx, s, c, w, x, n_tok);
    double t2 = mf_now_s();
    struct mf_moe_dev d = {.n_tok = n_tok, .k = c->n_expert_used, .idx = s->idx_dev,
                           .w = s->w_dev, .base = s->resident[w->il],
                           .stride = (int64_t)s->expert_bytes, .xg = s->xg, .gu = s->gu,
                           .eo = s->eo};
    struct mf_moe_batch v = mf_moe_views_batch(&s->views[w->il]);
    d.gate = v.gate;
    d.up = v.up;
    d.down = v.down;
    d.gate_bias = v.gate_bias;
    d.up_bias = v.up_bias;
    d.down_bias = v.down_bias;
    d.act = v.act;
    d.act_alpha = v.act_alpha;
    d.act_limit = v.act_limit;
    d.shared = w->has_shared && c->n_ff_shexp > 0 ? s->sh_out : NULL;
    d.route_ahead = d.shared != NULL;   // the shared expert's ops ran after moe_route
    d.resid = resid;
    d.flag = flag;
    op->moe_experts_dev(ctx->ex, y, x, &d);
    st->routing_s += t1 - t0;
    st->shared_s += t2 - t1;
    st->experts_s += mf_now_s() - t2;
}

// The call's experts (used[], ascending) in one moe_experts call on their resident blobs.
static void run_resident_experts(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int n_used) {
    const uint8_t *base = s->resident[il];
    for (int i = 0; i < n_used; i++)
        s->res_blob[i] = base + (uint64_t)s->used[i] * s->expert_bytes;
    run_batch(ctx, s, il, s->used, n_used);
}

static void resident_host(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                          const struct mf_moe_layer *w, float *y, float *x, int n_tok,
                          const float *resid, const struct mf_moe_norm *in) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_ctx_stats *st = &ctx->stats;
    double t0 = mf_now_s();
    int n_used = route(ctx, s, w, c, x, resid, in, n_tok);
    int n_rows = n_tok * c->n_expert_used;
    double t1 = mf_now_s();
    op->gather_rows(ctx->ex, s->xg, x, s->tok_of, n_rows, c->n_embd);
    double t2 = mf_now_s();
    if (w->has_shared && c->n_ff_shexp > 0)
        shared_compute(ctx, s, c, w, x, n_tok);
    double t3 = mf_now_s();
    run_resident_experts(ctx, s, w->il, n_used);
    op->zero(ctx->ex, y, 0, (size_t)n_tok * c->n_embd * sizeof(float));
    op->scatter_add_rows(ctx->ex, y, s->eo, s->tok_of, s->w_of, n_rows, c->n_embd);
    if (w->has_shared && c->n_ff_shexp > 0)
        op->axpy(ctx->ex, y, 1.0f, s->sh_out, n_tok * c->n_embd);
    st->routing_s += t1 - t0;
    st->shared_s += t3 - t2;
    st->experts_s += (t2 - t1) + (mf_now_s() - t3);
}

int mf_moe_forward(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                   const struct mf_moe_layer *w, float *y, float *x, int n_tok,
                   float *resid, int32_t *flag, const struct mf_moe_norm *in) {
    const struct mf_backend_ops *op = ctx->be->ops;
    if (n_tok > s->max_tok)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "moe: %d tokens exceed the scratch size %d",
                           n_tok, s->max_tok);
    if (in && in->g && !resid)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "moe: the input norm needs the residual rows");
    if (!s->has_store)
        return mf_ctx_fail(ctx, MF_ERR_STATE, "layer %d: MoE layer but no expert store",
                           w->il);
    if (s->resident && s->resident[w->il]) {
        if (op->moe_experts_dev && n_tok <= MOE_DEV_MAX_TOK) {
            resident_dev(ctx, s, c, w, y, x, n_tok, resid, flag, in);
            return MF_OK;
        }
        resident_host(ctx, s, c, w, y, x, n_tok, resid, in);
        if (resid)
            mf_axpy_flag(op, ctx->ex, resid, 1.0f, y, n_tok * c->n_embd, flag);
        return MF_OK;
    }
    struct mf_ctx_stats *st = &ctx->stats;
    double t0 = mf_now_s(), wait0 = st->io_wait_s, shared_s = 0.0;
    int n_used = route(ctx, s, w, c, x, resid, in, n_tok);
    release_kept(ctx, s);   // the routing just synchronised: the work on them is done
    double t1 = mf_now_s();
    st->routing_s += t1 - t0;
    int n_rows = n_tok * c->n_expert_used;
    op->gather_rows(ctx->ex, s->xg, x, s->tok_of, n_rows, c->n_embd);
    int rc = experts_forward(ctx, s, c, w, x, n_tok, n_used, &shared_s);
    if (rc == MF_OK) {
        op->zero(ctx->ex, y, 0, (size_t)n_tok * c->n_embd * sizeof(float));
        op->scatter_add_rows(ctx->ex, y, s->eo, s->tok_of, s->w_of, n_rows, c->n_embd);
        if (w->has_shared && c->n_ff_shexp > 0)
            op->axpy(ctx->ex, y, 1.0f, s->sh_out, n_tok * c->n_embd);
        if (resid)
            mf_axpy_flag(op, ctx->ex, resid, 1.0f, y, n_tok * c->n_embd, flag);
    }
    st->shared_s += shared_s;
    st->experts_s += (mf_now_s() - t1) - shared_s - (st->io_wait_s - wait0);
    return rc;
}

/* ==== Dense SwiGLU FFN ==== */

void mf_ffn_forward(mf_ctx *ctx, float *y, float *tmp, const struct mf_ffn_layer *w,
                    const float *x, int n_tok, int n_ff) {
    const struct mf_backend_ops *op = ctx->be->ops;
    float *g = tmp, *u = tmp + (size_t)n_tok * n_ff;   // [n_tok, n_ff] each
    float *const gu[2] = {g, u};
    const struct mf_weight *const wgu[2] = {&w->gate, &w->up};
    mf_matmul_multi(op, ctx->ex, 2, gu, wgu, x, n_tok);
    op->swiglu(ctx->ex, u, g, u, n_tok, n_ff, n_ff);
    op->matmul(ctx->ex, y, &w->down, u, n_tok);
}

int mf_ffn_bind(const mf_model *m, struct mf_ffn_layer *out, const char *prefix,
                int n_embd, int n_ff, char *err, size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "%s.gate_proj", prefix);
    int rc = mf_bind_linear(m, &out->gate, path, 0, n_ff, n_embd, err, errlen);
    if (rc != MF_OK)
        return rc;
    snprintf(path, sizeof path, "%s.up_proj", prefix);
    rc = mf_bind_linear(m, &out->up, path, 0, n_ff, n_embd, err, errlen);
    if (rc != MF_OK)
        return rc;
    snprintf(path, sizeof path, "%s.down_proj", prefix);
    return mf_bind_linear(m, &out->down, path, 0, n_embd, n_ff, err, errlen);
}
