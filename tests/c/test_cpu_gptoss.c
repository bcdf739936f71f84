/*
 * test_cpu_gptoss.c — C-level checks of the CPU pieces gpt-oss needs, for every kernel
 * set this build and CPU run (kernsets.h accounting, MOEFLUX_REQUIRE_KERNELS):
 *   MXFP4 weights: the E8M0 scale of every byte and the reference decoder against a
 *   decoding written from the E2M1 definition; each set's dequant bitwise equal to the
 *   reference; matmul (matvec, small batches, tiled prefill), matmul_t and embed
 *   against a double-precision product within the rounding bound; thread-count
 *   independence (bitwise); weight views without biases.
 *   attention_ext: all-zero options bitwise equal to attention; a ring-buffer cache
 *   bitwise equal to the same keys in a linear cache; a window wider than the context
 *   bitwise equal to no window; a sink of -inf equal to no sink.
 * The numerical oracle (mlx) for all of these is tests/test_gptoss_ops.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "backends/backend.h"
#include "backends/cpu/cpu_internal.h"
#include "kernsets.h"

// xorshift: deterministic inputs without global state.
static uint32_t rnd(uint32_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}
static float rndf(uint32_t *s) { return (float)(rnd(s) >> 8) / 16777216.0f * 2.0f - 1.0f; }

/* ==== MXFP4 ==== */

// A random MXFP4 weight: random codes; scale bytes around 127 (2^-4 .. 2^3), or any
// byte but 255 when `wide` (subnormal and huge scales: the products stay exact).
struct mw {
    struct mf_weight w;
    uint8_t *codes, *scales;
};

static int mw_make(struct mw *m, int64_t n_out, int64_t n_in, int wide, uint32_t seed) {
    uint32_t s = seed;
    m->codes = malloc((size_t)(n_out * n_in / 2));
    m->scales = malloc((size_t)(n_out * n_in / 32));
    CHECK(m->codes && m->scales, "out of memory");
    if (!m->codes || !m->scales)
        return -1;
    for (int64_t i = 0; i < n_out * n_in / 2; i++)
        m->codes[i] = (uint8_t)rnd(&s);
    for (int64_t i = 0; i < n_out * n_in / 32; i++)
        m->scales[i] = (uint8_t)(wide ? rnd(&s) % 255 : 123 + rnd(&s) % 8);
    m->w = (struct mf_weight){.w = m->codes, .scales = m->scales, .dtype = MF_DTYPE_U32,
                              .sdtype = MF_DTYPE_U8, .bits = 4, .group_size = 32,
                              .qmode = MF_QMODE_MXFP4, .n_out = n_out, .n_in = n_in};
    return 0;
}

static void mw_free(struct mw *m) {
    free(m->codes);
    free(m->scales);
}

// E2M1 from its fields: sign bit 3, exponent bits 2-1, mantissa bit 0; exponent 0 is
// subnormal (m * 0.5), else 2^(e-1) * (1 + m/2).
static double e2m1_def(unsigned q) {
    unsigned e = (q >> 1) & 3u, mant = q & 1u;
    double v = e == 0 ? 0.5 * mant : ldexp(1.0 + 0.5 * mant, (int)e - 1);
    return (q & 8u) ? -v : v;
}

static void test_mxfp4_scale_and_ref(void) {
    for (int e = 0; e < 255; e++) {
        float s = mf_mxfp4_scale((uint8_t)e);
        CHECK((double)s == ldexp(1.0, e - 127), "scale of byte %d: %g", e, (double)s);
    }
    CHECK(isinf(mf_mxfp4_scale(255)) && mf_mxfp4_scale(255) > 0, "byte 255 is +inf");
    struct mw m;
    if (mw_make(&m, 3, 64, 1, 5) < 0)
        return;
    float row[64];
    for (int64_t r = 0; r < 3; r++) {
        mf_cpu_dequant_ref(row, &m.w, r, 0, 64);
        for (int c = 0; c < 64; c++) {
            unsigned q = (m.codes[r * 32 + c / 2] >> (4 * (c % 2))) & 15u;
            double want = e2m1_def(q) * ldexp(1.0, m.scales[r * 2 + c / 32] - 127);
            // In f32: products past the f32 range are inf there, as in MLX.
            CHECK(row[c] == (float)want, "ref row %lld col %d: %g, want %g", (long long)r,
                  c, (double)row[c], want);
        }
    }
    mw_free(&m);
}

// A new exec of n_threads, or NULL after a failed CHECK naming the error.
static struct mf_exec *exec_or_fail(struct mf_backend *be, int n_threads) {
    char err[256] = "";
    struct mf_exec *ex = NULL;
    int rc = be->ops->exec_new(be, n_threads, &ex, err, sizeof err);
    CHECK(rc == MF_OK, "exec_new (%d threads): %s", n_threads, err);
    return rc == MF_OK ? ex : NULL;
}

// Each set's dequant (through mf_cpu_weight_row) bitwise the reference, whole rows and
// group-aligned pieces, normal and extreme scales.
static void test_mxfp4_dequant(struct mf_backend *be, struct kernsets *ks) {
    struct mf_exec *ex = exec_or_fail(be, 1);
    if (!ex)
        return;
    for (int wide = 0; wide < 2; wide++) {
        struct mw m;
        if (mw_make(&m, 9, 32 * 13, wide, (uint32_t)(17 + wide)) < 0)
            break;
        float a[32 * 13], b[32 * 13];
        for (size_t ki = 0; ki < KS_N_SETS; ki++) {
            if (!ks_force(ks, ex, ki))
                continue;
            for (int64_t r = 0; r < 9; r++)
                for (int64_t c0 = 0; c0 < 32 * 13; c0 += 32 * (r % 3 + 1)) {
                    int64_t n = 32 * 13 - c0 < 64 ? 32 * 13 - c0 : 64;
                    mf_cpu_dequant_ref(a, &m.w, r, c0, n);
                    mf_cpu_weight_row(ex, b, &m.w, r, c0, n);
                    CHECK(memcmp(a, b, (size_t)n * sizeof(float)) == 0,
                          "dequant %s wide %d row %lld cols %lld+%lld differs from the "
                          "reference", kernel_names[ki], wide, (long long)r, (long long)c0,
                          (long long)n);
                }
        }
        mw_free(&m);
    }
    be->ops->exec_free(ex);
}

// Reference y = x @ W^T (op 0) or x @ W (op 1) in double, with the magnitude sum
// |x| |w| per output that the rounding bound scales with.
static void ref_product(double *y, double *mag, const struct mf_weight *w, const float *x,
                        int n_tok, int op) {
    float *row = malloc((size_t)w->n_in * sizeof(float));
    CHECK(row != NULL, "out of memory");
    if (!row)
        return;
    const int64_t n_y = op == 0 ? w->n_out : w->n_in, n_x = op == 0 ? w->n_in : w->n_out;
    memset(y, 0, (size_t)(n_tok * n_y) * sizeof(double));
    memset(mag, 0, (size_t)(n_tok * n_y) * sizeof(double));
    for (int64_t r = 0; r < w->n_out; r++) {
        mf_cpu_dequant_ref(row, w, r, 0, w->n_in);
        for (int t = 0; t < n_tok; t++)
            for (int64_t c = 0; c < w->n_in; c++) {
                int64_t yi = t * n_y + (op == 0 ? r : c), xi = t * n_x + (op == 0 ? c : r);
                y[yi] += (double)x[xi] * row[c];
                mag[yi] += fabs((double)x[xi] * row[c]);
            }
    }
    free(row);
}

// Largest ratio of |y - ref| to the rounding bound 8 sqrt(k) u mag + u |ref| over n
// outputs (> 1 fails), k the longest accumulation chain (n_sum / 4 + 8): the weights
// are exact, so each term carries only the product's and the sums' roundings (the
// probabilistic bound test_cpu_matmul.c explains).
static double worst_vs_bound(const float *y, const double *ref, const double *mag,
                             int64_t n, int64_t n_sum) {
    const double u = 1.0 / 16777216.0, k = (double)n_sum / 4 + 8;
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double bound = 8.0 * sqrt(k) * u * mag[i] + u * fabs(ref[i]) + 1e-30;
        double v = fabs((double)y[i] - ref[i]) / bound;
        worst = v > worst ? v : worst;
    }
    return worst;
}

// One op (0 matmul, 1 matmul_t) of n_tok tokens under set ki against the reference.
static void mxfp4_case(struct mf_backend *be, struct mf_exec *ex, const struct mw *m,
                       int op, int n_tok, size_t ki) {
    const int64_t n_x = op == 0 ? m->w.n_in : m->w.n_out, n_y = op == 0 ? m->w.n_out : m->w.n_in;
    uint32_t s = (uint32_t)(11 + n_tok);
    float *x = malloc((size_t)(n_tok * n_x) * sizeof(float));
    float *y = malloc((size_t)(n_tok * n_y) * sizeof(float));
    double *yr = malloc((size_t)(n_tok * n_y) * sizeof(double));
    double *mag = malloc((size_t)(n_tok * n_y) * sizeof(double));
    CHECK(x && y && yr && mag, "out of memory");
    if (x && y && yr && mag) {
        for (int64_t i = 0; i < n_tok * n_x; i++)
            x[i] = rndf(&s);
        ref_product(yr, mag, &m->w, x, n_tok, op);
        if (op == 0)
            be->ops->matmul(ex, y, &m->w, x, n_tok);
        else
            be->ops->matmul_t(ex, y, &m->w, x, n_tok);
        double v = worst_vs_bound(y, yr, mag, n_tok * n_y, n_x);
        CHECK(v <= 1.0, "%s %s n_tok %d: error %g x the bound", op ? "matmul_t" : "matmul",
              kernel_names[ki], n_tok, v);
    }
    free(x), free(y), free(yr), free(mag);
}

// matmul through every path (1-4 tokens: qdot_rows_mxfp4 where the set takes them;
// 5-20: dequantized tiles) and matmul_t, odd row counts, n_in over one column chunk.
static void test_mxfp4_matmul(struct mf_backend *be, struct kernsets *ks) {
    static const int n_tok_list[] = {1, 2, 3, 4, 5, 7, 20};
    struct mf_exec *ex = exec_or_fail(be, 2);
    struct mw m;
    if (!ex || mw_make(&m, 37, 32 * 37, 0, 3) < 0) {
        if (ex)
            be->ops->exec_free(ex);
        return;
    }
    for (size_t ki = 0; ki < KS_N_SETS; ki++) {
        if (!ks_force(ks, ex, ki))
            continue;
        for (size_t ti = 0; ti < sizeof n_tok_list / sizeof n_tok_list[0]; ti++)
            mxfp4_case(be, ex, &m, 0, n_tok_list[ti], ki);
        mxfp4_case(be, ex, &m, 1, 1, ki);
        mxfp4_case(be, ex, &m, 1, 3, ki);
    }
    mw_free(&m);
    be->ops->exec_free(ex);
}

// Bitwise the same output for 1 and 3 threads, per set and path; embed equals the
// reference rows bitwise.
static void test_mxfp4_threads_embed(struct mf_backend *be, struct kernsets *ks) {
    struct mf_exec *e1 = exec_or_fail(be, 1), *e3 = exec_or_fail(be, 3);
    struct mw m;
    if (e1 && e3 && mw_make(&m, 70, 32 * 8, 0, 9) == 0) {
        enum { NT = 6, NI = 32 * 8, NO = 70 };
        static float x[NT * NI], y1[NT * NO], y3[NT * NO], row[NI], emb[3 * NI];
        uint32_t s = 4;
        for (int i = 0; i < NT * NI; i++)
            x[i] = rndf(&s);
        const int32_t tok[3] = {0, 69, 33};
        for (size_t ki = 0; ki < KS_N_SETS; ki++) {
            if (!ks_force(ks, e1, ki) || !ks_force(ks, e3, ki))
                continue;
            for (int nt = 1; nt <= NT; nt += 5) {
                be->ops->matmul(e1, y1, &m.w, x, nt);
                be->ops->matmul(e3, y3, &m.w, x, nt);
                CHECK(memcmp(y1, y3, (size_t)(nt * NO) * sizeof(float)) == 0,
                      "matmul %s n_tok %d: 1 and 3 threads differ", kernel_names[ki], nt);
            }
            be->ops->embed(e3, emb, &m.w, tok, 3);
            for (int t = 0; t < 3; t++) {
                mf_cpu_dequant_ref(row, &m.w, tok[t], 0, NI);
                CHECK(memcmp(row, emb + t * NI, sizeof row) == 0, "embed %s token %d",
                      kernel_names[ki], tok[t]);
            }
        }
        mw_free(&m);
    }
    if (e1)
        be->ops->exec_free(e1);
    if (e3)
        be->ops->exec_free(e3);
}

// Views of a stacked MXFP4 tensor (no biases): slices and blob-relative views keep
// biases NULL and step codes and scales by one matrix.
static void test_mxfp4_views(void) {
    struct mf_weight w = {.w = (const void *)(uintptr_t)64, .scales = (const void *)(uintptr_t)4160,
                          .dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_U8, .bits = 4,
                          .group_size = 32, .qmode = MF_QMODE_MXFP4, .n_out = 4, .n_in = 64};
    CHECK(mf_weight_w_bytes(&w) == 4 * 32 && mf_weight_s_bytes(&w) == 4 * 2,
          "bytes %lld %lld", (long long)mf_weight_w_bytes(&w),
          (long long)mf_weight_s_bytes(&w));
    static char blob[8192];
    struct mf_weight a = mf_weight_at(&w, blob);
    CHECK(a.w == blob + 64 && a.scales == blob + 4160 && a.biases == NULL,
          "mf_weight_at of a view without biases");
    struct mf_weight s = mf_weight_slice(&a, 2);
    CHECK(s.w == blob + 64 + 256 && s.scales == blob + 4160 + 16 && s.biases == NULL,
          "mf_weight_slice of a weight without biases");
}

/* ==== attention_ext ==== */

enum { A_H = 4, A_KV = 2, A_D = 32, A_CTX = 700 };

struct attn_case {
    float *q, *kv, *ring_kv, *out_a, *out_b;
    int n_tok, pos0;
};

// Runs attention_ext on the linear cache kv ([pos, k heads | v heads]) or, with
// ext->ring, on that many rows holding the same positions at row p % ring.
static void attn_run(struct mf_backend *be, struct mf_exec *ex, const struct attn_case *c,
                     float *out, const struct mf_attn_ext *ext) {
    const int stride = A_KV * 2 * A_D;
    const float *kv = c->kv;
    if (ext && ext->ring) {
        for (int p = 0; p < c->pos0 + c->n_tok; p++)
            memcpy(c->ring_kv + (int64_t)(p % ext->ring) * stride, c->kv + (int64_t)p * stride,
                   (size_t)stride * sizeof(float));
        kv = c->ring_kv;
    }
    if (ext)
        be->ops->attention_ext(ex, out, c->q, kv, kv + A_KV * A_D, c->n_tok, A_H, A_KV, A_D,
                               A_D, stride, stride, c->pos0, 0.17f, ext);
    else
        be->ops->attention(ex, out, c->q, kv, kv + A_KV * A_D, c->n_tok, A_H, A_KV, A_D,
                           A_D, stride, stride, c->pos0, 0.17f);
}

static int attn_same(const struct attn_case *c) {
    return memcmp(c->out_a, c->out_b, (size_t)c->n_tok * A_H * A_D * sizeof(float)) == 0;
}

static void attn_checks(struct mf_backend *be, struct mf_exec *ex, struct attn_case *c,
                        size_t ki) {
    const float neg_inf[A_H] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    const struct mf_weight sinks = {.w = neg_inf, .dtype = MF_DTYPE_F32, .n_out = 1,
                                    .n_in = A_H};
    const struct mf_attn_ext zero = {0}, wide = {.window = A_CTX + 1},
                             no_sink = {.sinks = &sinks};
    attn_run(be, ex, c, c->out_a, NULL);
    attn_run(be, ex, c, c->out_b, &zero);
    CHECK(attn_same(c), "%s: attention_ext with no options differs from attention",
          kernel_names[ki]);
    attn_run(be, ex, c, c->out_b, &wide);
    CHECK(attn_same(c), "%s: a window wider than the context changes the output",
          kernel_names[ki]);
    attn_run(be, ex, c, c->out_b, &no_sink);
    CHECK(attn_same(c), "%s: sinks of -inf change the output", kernel_names[ki]);
    for (int window = 1; window <= 200; window = window * 4 + 3) {
        const struct mf_attn_ext lin = {.window = window},
                                 ring = {.window = window, .ring = window + c->n_tok - 1};
        attn_run(be, ex, c, c->out_a, &lin);
        attn_run(be, ex, c, c->out_b, &ring);
        CHECK(attn_same(c), "%s: window %d: ring of %d rows differs from the linear cache",
              kernel_names[ki], window, ring.ring);
    }
}

static void test_attention_ext(struct mf_backend *be, struct kernsets *ks) {
    struct mf_exec *ex = exec_or_fail(be, 2);
    const int stride = A_KV * 2 * A_D;
    struct attn_case c = {.n_tok = 5, .pos0 = A_CTX - 5};
    c.q = malloc((size_t)c.n_tok * A_H * A_D * sizeof(float));
    c.kv = malloc((size_t)A_CTX * stride * sizeof(float));
    c.ring_kv = malloc((size_t)A_CTX * stride * sizeof(float));
    c.out_a = malloc((size_t)c.n_tok * A_H * A_D * sizeof(float));
    c.out_b = malloc((size_t)c.n_tok * A_H * A_D * sizeof(float));
    CHECK(ex && c.q && c.kv && c.ring_kv && c.out_a && c.out_b, "setup");
    if (ex && c.q && c.kv && c.ring_kv && c.out_a && c.out_b) {
        uint32_t s = 21;
        for (int i = 0; i < c.n_tok * A_H * A_D; i++)
            c.q[i] = rndf(&s) * 2;
        for (int64_t i = 0; i < (int64_t)A_CTX * stride; i++)
            c.kv[i] = rndf(&s) * 2;
        for (size_t ki = 0; ki < KS_N_SETS; ki++) {
            if (!ks_force(ks, ex, ki))
                continue;
            for (int n_tok = 1; n_tok <= 5; n_tok += 4) {
                c.n_tok = n_tok;
                c.pos0 = A_CTX - n_tok;
                attn_checks(be, ex, &c, ki);
            }
        }
    }
    free(c.q), free(c.kv), free(c.ring_kv), free(c.out_a), free(c.out_b);
    if (ex)
        be->ops->exec_free(ex);
}

int main(void) {
    char err[256];
    struct kernsets ks = {{0}};
    struct mf_backend *be;
    if (mf_backend_new(&be, "cpu", err, sizeof err) != MF_OK) {
        fprintf(stderr, "FAIL backend: %s\n", err);
        return 1;
    }
    test_mxfp4_scale_and_ref();
    test_mxfp4_views();
    test_mxfp4_dequant(be, &ks);
    test_mxfp4_matmul(be, &ks);
    test_mxfp4_threads_embed(be, &ks);
    test_attention_ext(be, &ks);
    be->ops->free(be);
    ks_finish(&ks, "test_cpu_gptoss");
    return check_finish("test_cpu_gptoss");
}
