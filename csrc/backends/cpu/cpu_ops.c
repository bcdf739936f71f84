/*
 * cpu_ops.c — the CPU backend's non-matmul ops: norms, rotary embedding, causal
 * attention, the GatedDeltaNet pieces (conv, gates, delta-rule recurrence) and the
 * elementwise ops. Math follows spec/model-math.md §2.4-2.5 and §3.3-3.4, in f32.
 *
 * Parallel work is split so that each output element belongs to one task (rows, heads,
 * v-heads, column blocks) and is computed in a fixed order: results never depend on the
 * thread count. Tiny ops run inline on the caller (one task).
 */
#include <math.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"

// Elements per task for elementwise work; below this, one task does everything.
#define ELEMS_PER_TASK 16384

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float siluf(float x) { return x * sigmoidf(x); }

static int n_tasks_for(int64_t n_elems) {
    int64_t n = (n_elems + ELEMS_PER_TASK - 1) / ELEMS_PER_TASK;
    return n < 1 ? 1 : (int)n;
}

/* ==== RMSNorm (plain and gated) ==== */

// Row r is head r % n_head of token r / n_head, at offset t*tok_stride + h*head_stride
// in x, y and z alike (plain rows: n_head 1, tok_stride n).
struct norm_job {
    float *y;
    const float *x, *z;
    const struct mf_weight *g;
    int n_rows, n, rows_per_task;
    int n_head, tok_stride, head_stride;
    float eps, scale;
};

static int64_t norm_row_off(const struct norm_job *j, int r) {
    return (int64_t)(r / j->n_head) * j->tok_stride + (int64_t)(r % j->n_head) * j->head_stride;
}

// 1 / sqrt(mean(x^2) + eps) with the sum of squares in f32.
static float rms_inv(const float *x, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)n + eps);
}

static void rmsnorm_task(void *arg, int task, int tid) {
    (void)tid;
    const struct norm_job *j = arg;
    int r1 = (task + 1) * j->rows_per_task < j->n_rows ? (task + 1) * j->rows_per_task
                                                        : j->n_rows;
    for (int r = task * j->rows_per_task; r < r1; r++) {
        int64_t off = norm_row_off(j, r);
        const float *x = j->x + off;
        float *y = j->y + off;
        float inv = rms_inv(x, j->n, j->eps);
        for (int i = 0; i < j->n; i++) {
            float gi = j->g ? mf_load_f32(j->g->w, j->g->dtype, (size_t)i) : 1.0f;
            float v = x[i] * inv * gi * j->scale;
            if (j->z) {
                // mlx-lm Qwen3NextRMSNormGated: silu(z) * rms_norm(x) * w, in f32.
                v = siluf(j->z[off + i]) * v;
            }
            y[i] = v;
        }
    }
}

static void run_norm(struct mf_exec *ex, struct norm_job *j) {
    j->rows_per_task = j->n > 0 ? ELEMS_PER_TASK / j->n : 1;
    if (j->rows_per_task < 1)
        j->rows_per_task = 1;
    int n_task = (j->n_rows + j->rows_per_task - 1) / j->rows_per_task;
    mf_pool_run(ex->pool, rmsnorm_task, j, n_task);
}

void mf_cpu_rmsnorm(struct mf_exec *ex, float *y, const float *x,
                    const struct mf_weight *g, int n_rows, int n, float eps, float scale) {
    struct norm_job j = {.y = y, .x = x, .g = g, .n_rows = n_rows, .n = n, .eps = eps,
                         .scale = scale, .n_head = 1, .tok_stride = n, .head_stride = n};
    run_norm(ex, &j);
}

void mf_cpu_rmsnorm_heads(struct mf_exec *ex, float *y, const float *x,
                          const struct mf_weight *g, int n_tok, int tok_stride, int n_head,
                          int head_stride, int n, float eps, float scale) {
    if (n_tok < 1 || n_head < 1)
        return;
    struct norm_job j = {.y = y, .x = x, .g = g, .n_rows = n_tok * n_head, .n = n,
                         .eps = eps, .scale = scale, .n_head = n_head,
                         .tok_stride = tok_stride, .head_stride = head_stride};
    run_norm(ex, &j);
}

void mf_cpu_rmsnorm_gated(struct mf_exec *ex, float *y, const float *x, const float *z,
                          const struct mf_weight *g, int n_rows, int n, float eps) {
    struct norm_job j = {.y = y, .x = x, .z = z, .g = g, .n_rows = n_rows, .n = n,
                         .eps = eps, .scale = 1.0f, .n_head = 1, .tok_stride = n,
                         .head_stride = n};
    run_norm(ex, &j);
}

/* ==== Rotary embedding ====
 * One task per token: the angles of a position are shared by all its heads. */

struct rope_job {
    float *x;
    int n_heads, tok_stride, head_stride, n_rot, pos0, traditional;
    const float *inv_freq;
    float mscale;
};

static void rope_task(void *arg, int t, int tid) {
    (void)tid;
    const struct rope_job *j = arg;
    const int half = j->n_rot / 2;
    // f32 position times f32 inverse frequency, as mlx computes the angle.
    const float pos = (float)(j->pos0 + t);
    for (int i = 0; i < half; i++) {
        float theta = pos * j->inv_freq[i];
        float c = cosf(theta), s = sinf(theta);
        int i1 = j->traditional ? 2 * i : i;
        int i2 = j->traditional ? 2 * i + 1 : i + half;
        for (int h = 0; h < j->n_heads; h++) {
            float *xh = j->x + (int64_t)t * j->tok_stride + (int64_t)h * j->head_stride;
            // mlx-lm YarnRoPE scales the rotated dims before rotating.
            float a = j->mscale * xh[i1], b = j->mscale * xh[i2];
            xh[i1] = a * c - b * s;
            xh[i2] = a * s + b * c;
        }
    }
}

void mf_cpu_rope(struct mf_exec *ex, float *x, int n_tok, int n_heads, int tok_stride,
                 int head_stride, int n_rot, const float *inv_freq, int pos0,
                 int traditional, float mscale) {
    struct rope_job j = {.x = x, .n_heads = n_heads, .tok_stride = tok_stride,
                         .head_stride = head_stride, .n_rot = n_rot, .pos0 = pos0,
                         .traditional = traditional, .inv_freq = inv_freq,
                         .mscale = mscale};
    mf_pool_run(ex->pool, rope_task, &j, n_tok);
}

/* ==== Causal attention ====
 * One task per (token, head). Keys are scored a chunk at a time into scratch with an
 * online softmax (running max, rescaled sum and accumulator), so the context length is
 * not bounded by scratch; with one chunk this is exactly max-subtracted softmax. The
 * output row itself is the accumulator. attention_ext narrows the keys to a sliding
 * window, finds them in a ring, and folds a sink logit into the max and the sum last;
 * without those it is attention, operation for operation. */

struct attn_job {
    struct mf_exec *ex;
    float *out;
    const float *q, *k, *v;
    int n_head, group, dk, dv, k_stride, v_stride, pos0;
    float scale;
    struct mf_attn_ext ext;
};

// Cache row of position p.
static inline int64_t attn_row(const struct attn_job *j, int p) {
    return j->ext.ring > 0 ? p % j->ext.ring : p;
}

// Scores of the np keys from position p0 on into score[]; returns their max.
static float attn_scores(const struct attn_job *j, float *score, const float *qh, int kvh,
                         int p0, int np) {
    float cm = -INFINITY;
    for (int p = 0; p < np; p++) {
        const float *kp = j->k + attn_row(j, p0 + p) * j->k_stride + (int64_t)kvh * j->dk;
        score[p] = j->ex->k->dot(qh, kp, j->dk) * j->scale;
        cm = score[p] > cm ? score[p] : cm;
    }
    return cm;
}

// A new running max cm: what was accumulated under the old max m is rescaled.
static void attn_rescale(float *o, int dv, float *m, float *l, float cm) {
    if (cm > *m) {
        // Nothing to rescale on the first chunk (f = 0, o and l are 0).
        float f = expf(*m - cm);
        for (int i = 0; i < dv; i++)
            o[i] *= f;
        *l *= f;
        *m = cm;
    }
}

static void attention_task(void *arg, int task, int tid) {
    const struct attn_job *j = arg;
    float *score = j->ex->scratch[tid];   // [MF_CPU_ATTN_CHUNK]
    const int t = task / j->n_head, h = task % j->n_head;
    const int kvh = h / j->group, pos = j->pos0 + t;   // causal: positions lo .. pos
    const int lo = j->ext.window > 0 && pos - j->ext.window + 1 > 0 ? pos - j->ext.window + 1
                                                                    : 0;
    const float *qh = j->q + ((int64_t)t * j->n_head + h) * j->dk;
    float *o = j->out + ((int64_t)t * j->n_head + h) * j->dv;
    memset(o, 0, (size_t)j->dv * sizeof(float));
    float m = -INFINITY, l = 0.0f;
    for (int p0 = lo; p0 <= pos; p0 += MF_CPU_ATTN_CHUNK) {
        int np = pos + 1 - p0 < MF_CPU_ATTN_CHUNK ? pos + 1 - p0 : MF_CPU_ATTN_CHUNK;
        attn_rescale(o, j->dv, &m, &l, attn_scores(j, score, qh, kvh, p0, np));
        for (int p = 0; p < np; p++) {
            float e = expf(score[p] - m);
            l += e;
            j->ex->k->axpy(o, e, j->v + attn_row(j, p0 + p) * j->v_stride +
                                      (int64_t)kvh * j->dv, j->dv);
        }
    }
    if (j->ext.sinks) {
        float sink = mf_load_f32(j->ext.sinks->w, j->ext.sinks->dtype, (size_t)h);
        attn_rescale(o, j->dv, &m, &l, sink);
        l += expf(sink - m);
    }
    float inv = 1.0f / l;
    for (int i = 0; i < j->dv; i++)
        o[i] *= inv;
}

void mf_cpu_attention_ext(struct mf_exec *ex, float *out, const float *q, const float *k,
                          const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                          int dv, int k_stride, int v_stride, int pos0, float scale,
                          const struct mf_attn_ext *ext_host) {
    if (n_tok <= 0 || n_head <= 0 || n_kv_head <= 0)
        return;
    struct attn_job j = {.ex = ex, .out = out, .q = q, .k = k, .v = v, .n_head = n_head,
                         .group = n_head / n_kv_head, .dk = dk, .dv = dv,
                         .k_stride = k_stride, .v_stride = v_stride, .pos0 = pos0,
                         .scale = scale};
    if (ext_host)
        j.ext = *ext_host;
    if (j.group < 1)
        j.group = 1;
    mf_pool_run(ex->pool, attention_task, &j, n_tok * n_head);
}

void mf_cpu_attention(struct mf_exec *ex, float *out, const float *q, const float *k,
                      const float *v, int n_tok, int n_head, int n_kv_head, int dk,
                      int dv, int k_stride, int v_stride, int pos0, float scale) {
    mf_cpu_attention_ext(ex, out, q, k, v, n_tok, n_head, n_kv_head, dk, dv, k_stride,
                         v_stride, pos0, scale, NULL);
}

/* ==== GatedDeltaNet: causal depthwise conv + SiLU ====
 * Tasks own blocks of channels; history row i of state is time i - (K-1). The history
 * is read from state_in and the advanced one written to state (the same buffer for
 * the in-place op). */

#define CONV_CH_PER_TASK 256

struct conv_job {
    float *y, *state;
    const float *state_in, *u;
    const struct mf_weight *w;
    int n_tok, C, K;
};

static void conv_task(void *arg, int task, int tid) {
    (void)tid;
    const struct conv_job *j = arg;
    const int C = j->C, K = j->K;
    int c1 = (task + 1) * CONV_CH_PER_TASK < C ? (task + 1) * CONV_CH_PER_TASK : C;
    for (int c = task * CONV_CH_PER_TASK; c < c1; c++) {
        for (int t = 0; t < j->n_tok; t++) {
            float acc = 0.0f;
            for (int i = 0; i < K; i++) {
                int tau = t - (K - 1) + i;   // input time; < 0 comes from the history
                float u = tau < 0 ? j->state_in[(int64_t)(K - 1 + tau) * C + c]
                                  : j->u[(int64_t)tau * C + c];
                acc += mf_load_f32(j->w->w, j->w->dtype, (size_t)c * K + i) * u;
            }
            j->y[(int64_t)t * C + c] = siluf(acc);
        }
        // Keep the last K-1 inputs. Row i reads row i + n_tok (or u), never one already
        // overwritten when in place, since rows are rewritten in increasing order.
        for (int i = 0; i < K - 1; i++) {
            int tau = j->n_tok - (K - 1) + i;
            j->state[(int64_t)i * C + c] = tau < 0
                                               ? j->state_in[(int64_t)(K - 1 + tau) * C + c]
                                               : j->u[(int64_t)tau * C + c];
        }
    }
}

void mf_cpu_conv1d_silu_from(struct mf_exec *ex, float *y, float *state,
                             const float *state_in, const float *u,
                             const struct mf_weight *w, int n_tok, int C, int K) {
    struct conv_job j = {.y = y, .state = state, .state_in = state_in, .u = u, .w = w,
                         .n_tok = n_tok, .C = C, .K = K};
    mf_pool_run(ex->pool, conv_task, &j, (C + CONV_CH_PER_TASK - 1) / CONV_CH_PER_TASK);
}

void mf_cpu_conv1d_silu(struct mf_exec *ex, float *y, float *state, const float *u,
                        const struct mf_weight *w, int n_tok, int C, int K) {
    mf_cpu_conv1d_silu_from(ex, y, state, state, u, w, n_tok, C, K);
}

/* ==== GatedDeltaNet: gates ==== */

// log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|), the form of mlx's
// logaddexp(x, 0) that nn.softplus uses.
static inline float softplusf(float x) {
    return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x)));
}

void mf_cpu_gdn_gates(struct mf_exec *ex, float *g, float *beta, const float *a,
                      const float *b, int ab_stride, const struct mf_weight *A_log,
                      const struct mf_weight *dt_bias, int n_tok, int nv) {
    (void)ex;   // n_tok * nv values: not worth a hand-off
    for (int t = 0; t < n_tok; t++) {
        for (int h = 0; h < nv; h++) {
            float at = a[(int64_t)t * ab_stride + h], bt = b[(int64_t)t * ab_stride + h];
            float A = expf(mf_load_f32(A_log->w, A_log->dtype, (size_t)h));
            float dt = mf_load_f32(dt_bias->w, dt_bias->dtype, (size_t)h);
            beta[(int64_t)t * nv + h] = sigmoidf(bt);
            g[(int64_t)t * nv + h] = expf(-A * softplusf(at + dt));
        }
    }
}

/* ==== GatedDeltaNet: delta-rule recurrence ====
 * One task per v-head, tokens in order. Each row i of S_h [dv, dk] evolves on its own
 * (decay, read m_i = S_i.k, write S_i += beta (v_i - m_i) k, read o_i = S_i.q), so the
 * five steps of model-math §2.5 run row by row, in two fused passes over each row.
 * Out of place, each row is copied from S_in just before its first token's passes,
 * while it is in cache, instead of in a separate pass over the whole state. */

struct gdn_job {
    struct mf_exec *ex;
    float *o, *S;
    const float *S_in, *q, *k, *v, *g, *beta;
    int qkv_stride, n_tok, nv, ratio, dk, dv;
};

static void gdn_task(void *arg, int h, int tid) {
    (void)tid;
    const struct gdn_job *j = arg;
    const struct mf_cpu_kernels *kern = j->ex->k;
    const int kh = h / j->ratio, dk = j->dk, dv = j->dv;
    float *S = j->S + (int64_t)h * dv * dk;
    const float *S_in = j->S_in + (int64_t)h * dv * dk;
    for (int t = 0; t < j->n_tok; t++) {
        const float *qt = j->q + (int64_t)t * j->qkv_stride + (int64_t)kh * dk;
        const float *kt = j->k + (int64_t)t * j->qkv_stride + (int64_t)kh * dk;
        const float *vt = j->v + (int64_t)t * j->qkv_stride + (int64_t)h * dv;
        const float gt = j->g[(int64_t)t * j->nv + h], bt = j->beta[(int64_t)t * j->nv + h];
        float *ot = j->o + ((int64_t)t * j->nv + h) * dv;
        for (int i = 0; i < dv; i++) {
            float *row = S + (int64_t)i * dk;
            if (t == 0 && S_in != S)
                memcpy(row, S_in + (int64_t)i * dk, (size_t)dk * sizeof(float));
            float m = kern->scale_dot(row, gt, kt, dk);            // decay, read with k
            ot[i] = kern->axpy_dot(row, (vt[i] - m) * bt, kt, qt, dk);   // write, read q
        }
    }
}

void mf_cpu_gdn_recurrence(struct mf_exec *ex, float *o, float *S, const float *q,
                           const float *k, const float *v, int qkv_stride, const float *g,
                           const float *beta, int n_tok, int nk, int nv, int dk, int dv) {
    mf_cpu_gdn_recurrence_from(ex, o, S, S, q, k, v, qkv_stride, g, beta, n_tok, nk, nv,
                               dk, dv);
}

void mf_cpu_gdn_recurrence_from(struct mf_exec *ex, float *o, float *S, const float *S_in,
                                const float *q, const float *k, const float *v,
                                int qkv_stride, const float *g, const float *beta,
                                int n_tok, int nk, int nv, int dk, int dv) {
    if (nk <= 0 || nv <= 0)
        return;
    if (n_tok <= 0) {   // no token: the state is carried over unchanged
        if (S != S_in)
            memcpy(S, S_in, (size_t)nv * dv * dk * sizeof(float));
        return;
    }
    struct gdn_job j = {.ex = ex, .o = o, .S = S, .S_in = S_in, .q = q, .k = k, .v = v,
                        .g = g,
                        .beta = beta, .qkv_stride = qkv_stride, .n_tok = n_tok, .nv = nv,
                        .ratio = nv / nk > 0 ? nv / nk : 1, .dk = dk, .dv = dv};
    mf_pool_run(ex->pool, gdn_task, &j, nv);
}

/* ==== Elementwise ==== */

struct ew_job {
    float *y;
    const float *a, *b;
    int n_rows, n_cols, stride, b_cols, rows_per_task;
};

static void swiglu_task(void *arg, int task, int tid) {
    (void)tid;
    const struct ew_job *j = arg;
    int r1 = (task + 1) * j->rows_per_task < j->n_rows ? (task + 1) * j->rows_per_task
                                                        : j->n_rows;
    for (int r = task * j->rows_per_task; r < r1; r++) {
        const float *gate = j->a + (int64_t)r * j->stride, *up = j->b + (int64_t)r * j->stride;
        float *y = j->y + (int64_t)r * j->n_cols;
        for (int c = 0; c < j->n_cols; c++)
            y[c] = siluf(gate[c]) * up[c];
    }
}

static void mul_sigmoid_task(void *arg, int task, int tid) {
    (void)tid;
    const struct ew_job *j = arg;
    int r1 = (task + 1) * j->rows_per_task < j->n_rows ? (task + 1) * j->rows_per_task
                                                        : j->n_rows;
    for (int r = task * j->rows_per_task; r < r1; r++) {
        const float *g = j->a + (int64_t)r * j->stride;
        float *y = j->y + (int64_t)r * j->n_cols;
        for (int c = 0; c < j->n_cols; c++)
            y[c] *= sigmoidf(g[j->b_cols == 1 ? 0 : c]);
    }
}

static int rows_per_task(int n_cols) {
    int r = n_cols > 0 ? ELEMS_PER_TASK / n_cols : 1;
    return r < 1 ? 1 : r;
}

void mf_cpu_swiglu(struct mf_exec *ex, float *y, const float *gate, const float *up,
                   int n_rows, int n_cols, int in_stride) {
    struct ew_job j = {.y = y, .a = gate, .b = up, .n_rows = n_rows, .n_cols = n_cols,
                       .stride = in_stride, .rows_per_task = rows_per_task(n_cols)};
    mf_pool_run(ex->pool, swiglu_task, &j, (n_rows + j.rows_per_task - 1) / j.rows_per_task);
}

void mf_cpu_mul_sigmoid(struct mf_exec *ex, float *y, const float *g, int n_rows,
                        int n_cols, int g_stride, int g_cols) {
    struct ew_job j = {.y = y, .a = g, .n_rows = n_rows, .n_cols = n_cols,
                       .stride = g_stride, .b_cols = g_cols,
                       .rows_per_task = rows_per_task(n_cols)};
    mf_pool_run(ex->pool, mul_sigmoid_task, &j,
                (n_rows + j.rows_per_task - 1) / j.rows_per_task);
}

void mf_cpu_axpy(struct mf_exec *ex, float *y, float alpha, const float *x, int n) {
    ex->k->axpy(y, alpha, x, n);
}

/* Rows scattered into dst may repeat an index, so tasks split columns, not rows: each
 * column block sees every row in order. */

struct rows_job {
    const struct mf_exec *ex;
    float *dst;
    const float *src, *w;
    const int32_t *idx;
    int n_rows, n, cols_per_task;
};

static void scatter_task(void *arg, int task, int tid) {
    (void)tid;
    const struct rows_job *j = arg;
    int c0 = task * j->cols_per_task;
    int nc = j->n - c0 < j->cols_per_task ? j->n - c0 : j->cols_per_task;
    for (int i = 0; i < j->n_rows; i++)
        j->ex->k->axpy(j->dst + (int64_t)j->idx[i] * j->n + c0, j->w ? j->w[i] : 1.0f,
                       j->src + (int64_t)i * j->n + c0, nc);
}

void mf_cpu_scatter_add_rows(struct mf_exec *ex, float *dst, const float *src,
                             const int32_t *idx_host, const float *w_host, int n_rows,
                             int n) {
    if (n <= 0)
        return;
    struct rows_job j = {.ex = ex, .dst = dst, .src = src, .w = w_host, .idx = idx_host,
                         .n_rows = n_rows, .n = n};
    int64_t per = (int64_t)n * (n_rows > 0 ? n_rows : 1);
    int n_task = n_tasks_for(per);
    j.cols_per_task = (n + n_task - 1) / n_task;
    mf_pool_run(ex->pool, scatter_task, &j, (n + j.cols_per_task - 1) / j.cols_per_task);
}

void mf_cpu_gather_rows(struct mf_exec *ex, float *dst, const float *src,
                        const int32_t *idx_host, int n_rows, int n) {
    (void)ex;   // memory-bound copies
    for (int i = 0; i < n_rows; i++)
        memcpy(dst + (int64_t)i * n, src + (int64_t)idx_host[i] * n,
               (size_t)n * sizeof(float));
}

/* ==== Finite check ====
 * Exponent bits all ones = NaN or infinity; an integer test the compiler vectorises. */

void mf_cpu_flag_nonfinite(struct mf_exec *ex, int32_t *flag, const float *x, int64_t n) {
    (void)ex;
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    if (bad)
        *flag = 1;
}
