/*
 * moe.c — the routed-expert MoE FFN and the dense SwiGLU FFN shared by every
 * architecture (moe.h).
 *
 * Owns: routing on the host (softmax top-k for the Qwen families, noaux_tc for
 * deepseek_v3), grouping a call's tokens by expert so that each routed expert is read
 * from the expert store ONCE per call (prefill reads each needed expert once per
 * chunk, not once per token), parallel reads of a batch of experts into per-slot
 * buffers, the per-expert SwiGLU on the gathered rows and the weighted scatter-add
 * back, and the optional (gated) shared expert.
 *
 * Does not own: the expert files (io/expert_store.c), the weights of the router and
 * shared expert (bound by each arch file), or any arithmetic on activations, which
 * goes through the backend op table so the same code runs on every backend.
 */
#include "models/moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ==== Scratch ====
 * Everything a call needs, sized once for max_tok tokens. Host arrays hold the
 * routing (the chosen experts must come to the host anyway: they say which files to
 * read). Device arrays hold activations, row r of xg / gu / eo being the r-th (token,
 * expert) pair in expert-grouped order. Expert blobs land in n_slot host buffers
 * (alloc_host); a backend whose device cannot read host memory gets them uploaded into
 * n_slot device buffers. A call with more distinct experts than slots processes them
 * in batches of n_slot, still reading each expert once. */

#define SLOT_ERR_LEN 256

struct mf_moe_scratch {
    int max_tok;
    int n_slot;
    uint64_t expert_bytes;
    struct mf_route_params route;
    // host
    int32_t *sel_idx;        // [max_tok, k] chosen experts
    float *sel_w;            // [max_tok, k] their weights
    int32_t *count;          // [n_expert] tokens routed to each expert
    int32_t *start;          // [n_expert + 1] prefix sums of count
    int32_t *tok_of;         // [max_tok * k] token index, grouped by expert
    float *w_of;             // [max_tok * k] weight, grouped like tok_of
    int32_t *used;           // [n_expert] distinct experts in this call, ascending
    int *slot_status;        // [n_slot]
    int *slot_expert;        // [n_slot]
    char *slot_err;          // [n_slot, SLOT_ERR_LEN]
    const void **blob;       // [n_slot] device addresses of the batch's blobs
    int32_t *row0;           // [n_slot] first row of each batch expert
    int32_t *n_rows;         // [n_slot] its row count
    void **slot;             // [n_slot] expert blobs (alloc_host)
    // device
    float *logits_dev;       // [max_tok, n_expert]
    float *xg;               // [max_tok * k, n_embd] gathered rows
    float *gu;               // [max_tok * k, 2 * n_ff_exp] gate | up halves per expert
    float *eo;               // [max_tok * k, n_embd] expert outputs
    float *sh_tmp;           // [max_tok, 2 * n_ff_shexp]
    float *sh_out;           // [max_tok, n_embd]
    float *sh_gate;          // [max_tok, 1]
    void **slot_dev;         // [n_slot] device copies of the slots (!host_is_device)
    // expert weight views relative to a blob at address 0 (pointers are offsets)
    struct mf_weight ex_gate, ex_up, ex_down;
    int has_store;
    double io_wait_call;     // seconds waited for reads in the current call
};

static void *dev_alloc(mf_ctx *ctx, size_t bytes) {
    return ctx->be->ops->alloc(ctx->ex, bytes ? bytes : 4);
}

static void dev_free(mf_ctx *ctx, void *p) {
    if (p)
        ctx->be->ops->dealloc(ctx->ex, p);
}

// One expert projection as a weight view whose pointers are byte offsets inside a
// blob; forward adds the slot's base address. Bits and group size come from the
// component shapes (the layout's own bits field is cross-checked by this).
static int expert_view(const mf_expert_store *st, struct mf_weight *out, const char *proj,
                       int64_t n_out, int64_t n_in, char *err, size_t errlen) {
    char name[40];
    snprintf(name, sizeof name, "%s.weight", proj);
    const struct mf_expert_component *w = mf_expert_store_component(st, name);
    snprintf(name, sizeof name, "%s.scales", proj);
    const struct mf_expert_component *s = mf_expert_store_component(st, name);
    snprintf(name, sizeof name, "%s.biases", proj);
    const struct mf_expert_component *b = mf_expert_store_component(st, name);
    if (!w)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "packed_experts/layout.json: component %s.weight missing", proj);
    memset(out, 0, sizeof *out);
    out->n_out = n_out;
    out->n_in = n_in;
    out->w = (const void *)(uintptr_t)w->offset;
    if (w->ndim != 2 || w->shape[0] != n_out)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "packed_experts/layout.json: %s.weight rows: expected %lld, got "
                      "%lld (ndim %d)", proj, (long long)n_out,
                      (long long)(w->ndim >= 1 ? w->shape[0] : -1), w->ndim);
    if (!s) {
        // float experts: a plain [n_out, n_in] matrix
        if (w->dtype == MF_DTYPE_U32 || w->shape[1] != n_in)
            return mf_err(err, errlen, MF_ERR_SHAPE,
                          "packed_experts/layout.json: %s.weight: expected float [%lld, "
                          "%lld] without scales, got %s [%lld, %lld]", proj,
                          (long long)n_out, (long long)n_in, mf_dtype_name(w->dtype),
                          (long long)w->shape[0], (long long)w->shape[1]);
        out->dtype = w->dtype;
        return MF_OK;
    }
    if (!b || w->dtype != MF_DTYPE_U32 || s->ndim != 2 || s->shape[0] != n_out ||
        s->shape[1] < 1 || n_in % s->shape[1] != 0 || (w->shape[1] * 32) % n_in != 0)
        return mf_err(err, errlen, MF_ERR_SHAPE,
                      "packed_experts/layout.json: %s: expected U32 codes with scales "
                      "and biases for [%lld, %lld], got weight %s [%lld, %lld]%s", proj,
                      (long long)n_out, (long long)n_in, mf_dtype_name(w->dtype),
                      (long long)w->shape[0], (long long)w->shape[1],
                      b ? "" : " and no biases");
    out->dtype = MF_DTYPE_U32;
    out->sdtype = s->dtype;
    out->scales = (const void *)(uintptr_t)s->offset;
    out->biases = (const void *)(uintptr_t)b->offset;
    out->bits = (int)(w->shape[1] * 32 / n_in);
    out->group_size = (int)(n_in / s->shape[1]);
    if (out->bits < 2 || out->bits > 8 || out->bits == 7 ||
        (out->group_size != 32 && out->group_size != 64 && out->group_size != 128))
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "packed_experts/layout.json: %s: inferred bits %d / group size %d "
                      "unsupported (n_in %lld)", proj, out->bits, out->group_size,
                      (long long)n_in);
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
    int rc = expert_view(st, &s->ex_gate, "gate_proj", c->n_ff_exp, c->n_embd, err, errlen);
    if (rc == MF_OK)
        rc = expert_view(st, &s->ex_up, "up_proj", c->n_ff_exp, c->n_embd, err, errlen);
    if (rc == MF_OK)
        rc = expert_view(st, &s->ex_down, "down_proj", c->n_embd, c->n_ff_exp, err, errlen);
    return rc;
}

static int alloc_host_arrays(struct mf_moe_scratch *s, const struct mf_moe_config *c) {
    size_t E = (size_t)c->n_expert, TK = (size_t)s->max_tok * (size_t)c->n_expert_used;
    size_t S = (size_t)s->n_slot;
    s->sel_idx = calloc(TK, sizeof(int32_t));
    s->sel_w = calloc(TK, sizeof(float));
    s->count = calloc(E, sizeof(int32_t));
    s->start = calloc(E + 1, sizeof(int32_t));
    s->tok_of = calloc(TK, sizeof(int32_t));
    s->w_of = calloc(TK, sizeof(float));
    s->used = calloc(E, sizeof(int32_t));
    s->slot_status = calloc(S, sizeof(int));
    s->slot_expert = calloc(S, sizeof(int));
    s->slot_err = calloc(S, SLOT_ERR_LEN);
    s->blob = calloc(S, sizeof(void *));
    s->row0 = calloc(S, sizeof(int32_t));
    s->n_rows = calloc(S, sizeof(int32_t));
    s->slot = calloc(S, sizeof(void *));
    s->slot_dev = calloc(S, sizeof(void *));
    return s->sel_idx && s->sel_w && s->count && s->start && s->tok_of && s->w_of &&
           s->used && s->slot_status && s->slot_expert && s->slot_err && s->blob &&
           s->row0 && s->n_rows && s->slot && s->slot_dev;
}

static int alloc_device(mf_ctx *ctx, struct mf_moe_scratch *s,
                        const struct mf_moe_config *c) {
    const struct mf_backend_ops *op = ctx->be->ops;
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
    for (int i = 0; ok && s->has_store && i < s->n_slot; i++) {
        s->slot[i] = op->alloc_host(ctx->ex, (size_t)s->expert_bytes);
        if (!op->host_is_device && s->slot[i])
            s->slot_dev[i] = dev_alloc(ctx, (size_t)s->expert_bytes);
        ok = s->slot[i] && (op->host_is_device || s->slot_dev[i]);
    }
    return ok;
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
        .kind = c->router == MF_ROUTER_NOAUX_TC ? MF_ROUTE_NOAUX_TC : MF_ROUTE_SOFTMAX,
        .n_expert = c->n_expert, .n_used = c->n_expert_used,
        .norm_topk_prob = c->norm_topk_prob, .n_group = c->n_group,
        .topk_group = c->topk_group, .routed_scaling_factor = c->routed_scaling_factor};
    // Enough slots to read all of one token's experts at once (decode), at least 8 so
    // prefill batches keep the read pool busy, never more than there are experts.
    s->n_slot = c->n_expert_used > 8 ? c->n_expert_used : 8;
    if (s->n_slot > c->n_expert)
        s->n_slot = c->n_expert;
    if (st && (rc = bind_views(s, st, c, err, errlen)) != MF_OK) {
        mf_moe_scratch_free(ctx, s);
        return rc;
    }
    if (!alloc_host_arrays(s, c) || !alloc_device(ctx, s, c)) {
        mf_moe_scratch_free(ctx, s);
        return mf_err(err, errlen, MF_ERR_NOMEM,
                      "moe: out of memory for scratch (%d tokens, %d experts of %llu "
                      "bytes in %d slots)", max_tok, c->n_expert,
                      (unsigned long long)s->expert_bytes, s->n_slot);
    }
    *out = s;
    return MF_OK;
}

static void free_slots(mf_ctx *ctx, struct mf_moe_scratch *s) {
    for (int i = 0; s->slot && i < s->n_slot; i++)
        if (s->slot[i])
            ctx->be->ops->dealloc_host(ctx->ex, s->slot[i]);
    for (int i = 0; s->slot_dev && i < s->n_slot; i++)
        dev_free(ctx, s->slot_dev[i]);
}

void mf_moe_scratch_free(mf_ctx *ctx, struct mf_moe_scratch *s) {
    if (!s)
        return;
    free_slots(ctx, s);
    void *host[] = {s->sel_idx, s->sel_w, s->count, s->start, s->tok_of, s->w_of, s->used,
                    s->slot_status, s->slot_expert, s->slot_err, s->blob, s->row0,
                    s->n_rows, s->slot, s->slot_dev};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        free(host[i]);
    float *dev[] = {s->logits_dev, s->xg, s->gu, s->eo, s->sh_tmp, s->sh_out, s->sh_gate};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        dev_free(ctx, dev[i]);
    free(s);
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

static int route(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_layer *w,
                 const struct mf_moe_config *c, const float *x, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    op->matmul(ctx->ex, s->logits_dev, &w->router, x, n_tok);
    const float *bias = c->router == MF_ROUTER_NOAUX_TC ? w->router_bias.w : NULL;
    op->moe_route(ctx->ex, NULL, NULL, s->logits_dev, bias, &s->route, n_tok, s->sel_idx,
                  s->sel_w);
    return group_by_expert(s, c, n_tok);
}

/* ==== Expert reads ====
 * A batch of up to n_slot experts is read in parallel on the exec's threads (pread
 * is thread-safe on the shared store). Errors are kept per slot and reported after
 * the batch so the message names the first failed expert. */

struct read_job {
    const mf_expert_store *st;
    struct mf_moe_scratch *s;
    int il;
};

static void read_one(void *arg, int i) {
    struct read_job *j = arg;
    j->s->slot_status[i] =
        mf_expert_store_read(j->st, j->il, j->s->slot_expert[i], j->s->slot[i],
                             (size_t)j->s->expert_bytes,
                             j->s->slot_err + (size_t)i * SLOT_ERR_LEN, SLOT_ERR_LEN);
}

static int read_batch(mf_ctx *ctx, struct mf_moe_scratch *s, int il, int n) {
    struct read_job job = {ctx->model->experts, s, il};
    double t0 = mf_now_s();
    if (ctx->be->ops->parallel_for)
        ctx->be->ops->parallel_for(ctx->ex, read_one, &job, n);
    else
        for (int i = 0; i < n; i++)
            read_one(&job, i);
    double dt = mf_now_s() - t0;
    ctx->stats.expert_read_s += dt;
    ctx->stats.io_wait_s += dt;
    s->io_wait_call += dt;
    for (int i = 0; i < n; i++)
        if (s->slot_status[i] != MF_OK)
            return mf_ctx_fail(ctx, s->slot_status[i], "layer %d expert %d: %s", il,
                               s->slot_expert[i], s->slot_err + (size_t)i * SLOT_ERR_LEN);
    ctx->stats.expert_reads += n;
    ctx->stats.expert_bytes_read += (int64_t)n * (int64_t)s->expert_bytes;
    return MF_OK;
}

/* ==== Expert compute ====
 * Rows of all routed pairs are gathered once (xg); each batch of experts runs as one
 * moe_experts call into its rows of eo; the weighted scatter-add into y then runs once
 * over all rows in expert order, so y sums the experts in the same order whatever the
 * batching or the order in which expert bytes arrived. */

static void run_batch(mf_ctx *ctx, struct mf_moe_scratch *s, int n) {
    const struct mf_backend_ops *op = ctx->be->ops;
    for (int i = 0; i < n; i++) {
        int e = s->slot_expert[i];
        s->row0[i] = s->start[e];
        s->n_rows[i] = s->start[e + 1] - s->start[e];
        s->blob[i] = s->slot[i];
        if (!op->host_is_device) {
            op->upload_async(ctx->ex, s->slot_dev[i], 0, s->slot[i],
                             (size_t)s->expert_bytes, NULL);
            s->blob[i] = s->slot_dev[i];
        }
    }
    struct mf_moe_batch b = {.n = n, .blob_host = s->blob, .row0_host = s->row0,
                             .n_rows_host = s->n_rows, .gate = &s->ex_gate,
                             .up = &s->ex_up, .down = &s->ex_down};
    op->moe_experts(ctx->ex, s->eo, s->gu, s->xg, &b);
    if (!op->host_is_device)
        op->sync(ctx->ex);   // the slots are refilled by the next batch's reads
}

static void shared_apply(mf_ctx *ctx, struct mf_moe_scratch *s,
                         const struct mf_moe_config *c, const struct mf_moe_layer *w,
                         float *y, const float *x, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    struct mf_ffn_layer f = {w->shared_gate, w->shared_up, w->shared_down};
    mf_ffn_forward(ctx, s->sh_out, s->sh_tmp, &f, x, n_tok, c->n_ff_shexp);
    if (w->has_shared_gate) {
        // qwen: shared output scaled per token by sigmoid(shared_expert_gate(x))
        op->matmul(ctx->ex, s->sh_gate, &w->shared_expert_gate, x, n_tok);
        op->mul_sigmoid(ctx->ex, s->sh_out, s->sh_gate, n_tok, c->n_embd, 1, 1);
    }
    op->axpy(ctx->ex, y, 1.0f, s->sh_out, n_tok * c->n_embd);
}

int mf_moe_forward(mf_ctx *ctx, struct mf_moe_scratch *s, const struct mf_moe_config *c,
                   const struct mf_moe_layer *w, float *y, const float *x, int n_tok) {
    const struct mf_backend_ops *op = ctx->be->ops;
    if (n_tok > s->max_tok)
        return mf_ctx_fail(ctx, MF_ERR_ARG, "moe: %d tokens exceed the scratch size %d",
                           n_tok, s->max_tok);
    if (!s->has_store)
        return mf_ctx_fail(ctx, MF_ERR_STATE, "layer %d: MoE layer but no expert store",
                           w->il);
    struct mf_ctx_stats *st = &ctx->stats;
    s->io_wait_call = 0.0;
    double t0 = mf_now_s();
    int n_used = route(ctx, s, w, c, x, n_tok);
    double t1 = mf_now_s();
    st->routing_s += t1 - t0;
    int n_rows = n_tok * c->n_expert_used;
    op->gather_rows(ctx->ex, s->xg, x, s->tok_of, n_rows, c->n_embd);
    for (int b0 = 0; b0 < n_used; b0 += s->n_slot) {
        int n = n_used - b0 < s->n_slot ? n_used - b0 : s->n_slot;
        for (int i = 0; i < n; i++)
            s->slot_expert[i] = s->used[b0 + i];
        int rc = read_batch(ctx, s, w->il, n);
        if (rc != MF_OK)
            return rc;
        run_batch(ctx, s, n);
    }
    op->zero(ctx->ex, y, 0, (size_t)n_tok * c->n_embd * sizeof(float));
    op->scatter_add_rows(ctx->ex, y, s->eo, s->tok_of, s->w_of, n_rows, c->n_embd);
    double t2 = mf_now_s();
    st->experts_s += (t2 - t1) - s->io_wait_call;
    if (w->has_shared && c->n_ff_shexp > 0)
        shared_apply(ctx, s, c, w, y, x, n_tok);
    st->shared_s += mf_now_s() - t2;
    return MF_OK;
}

/* ==== Dense SwiGLU FFN ==== */

void mf_ffn_forward(mf_ctx *ctx, float *y, float *tmp, const struct mf_ffn_layer *w,
                    const float *x, int n_tok, int n_ff) {
    const struct mf_backend_ops *op = ctx->be->ops;
    float *g = tmp, *u = tmp + (size_t)n_tok * n_ff;   // [n_tok, n_ff] each
    op->matmul(ctx->ex, g, &w->gate, x, n_tok);
    op->matmul(ctx->ex, u, &w->up, x, n_tok);
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
