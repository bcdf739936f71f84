/*
 * test_cpu_matmul.c — C-level checks of the CPU backend that Python cannot reach
 * easily: every kernel set (scalar, AVX2, AVX-512 where the CPU has them) against a
 * double-precision reference on the same inputs, every set's decoder against the
 * independent value-by-value bit-stream decoder (bitwise), matvec against the tiled prefill path, odd sizes, thread-count
 * independence (bitwise, per set), sets forced through the backend name "cpu:<set>",
 * and the thread pool started and stopped many times. It prints the kernel sets it
 * exercised and fails when one listed in $MOEFLUX_REQUIRE_KERNELS did not run
 * (kernsets.h).
 * The numerical oracle (mlx) is in tests/test_kernels.py.
 */
#include <math.h>
#include <pthread.h>
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

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);   // truncation is fine: values are what they are
}

// A random quantized weight: codes, bf16 or f32 scales/biases.
struct qw {
    struct mf_weight w;
    uint32_t *codes;
    void *scales, *biases;
};

static void qw_make(struct qw *q, int64_t n_out, int64_t n_in, int bits, int gs,
                    enum mf_dtype sdt, uint32_t seed) {
    uint32_t s = seed;
    int64_t n_words = n_out * n_in * bits / 32, n_groups = n_out * n_in / gs;
    q->codes = malloc((size_t)n_words * 4);
    size_t es = sdt == MF_DTYPE_F32 ? 4 : 2;
    q->scales = malloc((size_t)n_groups * es);
    q->biases = malloc((size_t)n_groups * es);
    for (int64_t i = 0; i < n_words; i++)
        q->codes[i] = rnd(&s);
    for (int64_t i = 0; i < n_groups; i++) {
        float sc = 0.01f + 0.05f * (rndf(&s) + 1.0f), bi = 0.3f * rndf(&s);
        if (sdt == MF_DTYPE_F32) {
            ((float *)q->scales)[i] = sc;
            ((float *)q->biases)[i] = bi;
        } else {
            ((uint16_t *)q->scales)[i] = f32_to_bf16(sc);
            ((uint16_t *)q->biases)[i] = f32_to_bf16(bi);
        }
    }
    q->w = (struct mf_weight){.w = q->codes, .scales = q->scales, .biases = q->biases,
                              .dtype = MF_DTYPE_U32, .sdtype = sdt, .bits = bits,
                              .group_size = gs, .n_out = n_out, .n_in = n_in};
}

static void qw_free(struct qw *q) {
    free(q->codes);
    free(q->scales);
    free(q->biases);
}

static double max_abs(const float *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++)
        m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

static double max_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++)
        m = fabs((double)a[i] - b[i]) > m ? fabs((double)a[i] - b[i]) : m;
    return m;
}

// Reference y = x @ W^T in double from the generic (bit-stream) decoder, and for each
// output the magnitude the kernels' rounding errors scale with (see matmul_bound):
// mag = sum_c |x_c| * (|w_c| + 2 |b_c|), b_c the bias of c's group (|s q| + |b| <=
// |w| + 2 |b| bounds the size of the terms a kernel rounds while forming w).
static void ref_matmul(float *y, double *mag, const struct mf_weight *w, const float *x,
                       int n_tok) {
    float *row = malloc((size_t)w->n_in * sizeof(float));
    const int64_t n_group = w->n_in / w->group_size;
    for (int64_t r = 0; r < w->n_out; r++) {
        mf_cpu_dequant_ref(row, w, r, 0, w->n_in);
        for (int t = 0; t < n_tok; t++) {
            double acc = 0, m = 0;
            for (int64_t c = 0; c < w->n_in; c++) {
                double b = mf_load_f32(w->biases, w->sdtype,
                                       (size_t)(r * n_group + c / w->group_size));
                acc += (double)x[t * w->n_in + c] * row[c];
                m += fabs((double)x[t * w->n_in + c]) * (fabs((double)row[c]) + 2 * fabs(b));
            }
            y[t * w->n_out + r] = (float)acc;
            mag[t * w->n_out + r] = m;
        }
    }
    free(row);
}

// How far a kernel set's quantized matmul may be from the exact result, per output:
// lambda * sqrt(k) * u * mag + u * |y| (u = 2^-24, f32 unit roundoff; the last term is
// the reference's own rounding to f32). Every set forms each weight from s, q, b with at
// most two roundings, multiplies it by x (one) and accumulates in chains no longer than
// k = n/4 + 8 additions (the scalar dot's four partial sums are the longest; SIMD sets
// keep n/8..n/32 per lane, then log2(lanes) levels), so the error is a sum of at most
// k + 3 roundings per term, each at most u times a term bounded by mag. The worst case
// (k + 3) * u * mag never happens with independent roundings; the probabilistic bound
// of Higham and Mary (SIAM J. Sci. Comput. 41(5), 2019) replaces k by lambda * sqrt(k),
// which holds with probability >= 1 - 2 exp(-lambda^2 / 2) per output: lambda = 8
// leaves ~1e-14 per output. It still fails a kernel that gets one code of a row wrong
// by one step (error s * |x_c|, ~1e-2 here against bounds of ~1e-3).
static double matmul_bound(double y, double mag, int64_t n) {
    const double u = 1.0 / 16777216.0, k = (double)n / 4 + 8;
    return 8.0 * sqrt(k) * u * mag + u * fabs(y);
}

// Largest ratio of |y - ref| to matmul_bound over n_tok x n_out outputs (> 1: fails).
static double worst_vs_bound(const float *y, const float *ref, const double *mag,
                             int64_t n, int64_t n_out_all) {
    double worst = 0;
    for (int64_t i = 0; i < n_out_all; i++) {
        double r = fabs((double)y[i] - ref[i]) / matmul_bound(ref[i], mag[i], n);
        worst = r > worst ? r : worst;
    }
    return worst;
}

// A new exec of n_threads, or NULL after a failed CHECK naming the error.
static struct mf_exec *exec_or_fail(struct mf_backend *be, int n_threads) {
    char err[256] = "";
    struct mf_exec *ex = NULL;
    int rc = be->ops->exec_new(be, n_threads, &ex, err, sizeof err);
    CHECK(rc == MF_OK, "exec_new (%d threads): %s", n_threads, err);
    return rc == MF_OK ? ex : NULL;
}

static void test_matmul_paths(struct mf_backend *be, struct kernsets *ks) {
    static const int bits_list[] = {2, 3, 4, 5, 6, 8};
    static const int gs_list[] = {32, 64, 128};
    // 1 to 3 tokens: qdot_rows (two tokens per pass, then one); 5 and 17: dequantized
    // tiles and gemm.
    static const int n_tok_list[] = {1, 2, 3, 5, 17};
    double worst_ratio = 0, worst_rel = 0;
    for (int nt = 1; nt <= 3; nt += 2) {
        struct mf_exec *ex = exec_or_fail(be, nt);
        if (!ex)
            return;
        for (size_t bi = 0; bi < 6; bi++)
            for (size_t gi = 0; gi < 3; gi++) {
                int bits = bits_list[bi], gs = gs_list[gi];
                // Odd row count, n_in not a multiple of the column chunk.
                int64_t n_out = 37, n_in = gs * 19;
                struct qw q;
                qw_make(&q, n_out, n_in, bits, gs, gi == 1 ? MF_DTYPE_F32 : MF_DTYPE_BF16,
                        (uint32_t)(1 + bits * 7 + gs));
                for (size_t ti = 0; ti < 5; ti++) {
                    int n_tok = n_tok_list[ti];
                    uint32_t s = 99;
                    float *x = malloc((size_t)(n_tok * n_in) * sizeof(float));
                    float *yr = malloc((size_t)(n_tok * n_out) * sizeof(float));
                    float *y = malloc((size_t)(n_tok * n_out) * sizeof(float));
                    double *mag = malloc((size_t)(n_tok * n_out) * sizeof(double));
                    for (int64_t i = 0; i < n_tok * n_in; i++)
                        x[i] = rndf(&s);
                    ref_matmul(yr, mag, &q.w, x, n_tok);
                    double scale = max_abs(yr, n_tok * n_out);
                    for (size_t ki = 0; ki < KS_N_SETS; ki++) {
                        if (!ks_force(ks, ex, ki))
                            continue;   // CPU lacks it
                        be->ops->matmul(ex, y, &q.w, x, n_tok);
                        double v = worst_vs_bound(y, yr, mag, n_in, n_tok * n_out);
                        worst_ratio = v > worst_ratio ? v : worst_ratio;
                        CHECK(v <= 1.0, "matmul %s bits %d gs %d n_tok %d threads %d: error "
                              "%g x the bound (max diff %g)", kernel_names[ki], bits, gs,
                              n_tok, nt, v, max_diff(y, yr, n_tok * n_out));
                        // And the empirical tier these inputs have always met (random
                        // x and codes: errors far below the worst case): 2e-6 of the
                        // largest output.
                        double d = max_diff(y, yr, n_tok * n_out) / scale;
                        worst_rel = d > worst_rel ? d : worst_rel;
                        CHECK(d <= 2e-6, "matmul %s bits %d gs %d n_tok %d threads %d: max "
                              "diff %g of the largest output", kernel_names[ki], bits, gs,
                              n_tok, nt, d);
                    }
                    free(x);
                    free(yr);
                    free(y);
                    free(mag);
                }
                qw_free(&q);
            }
        be->ops->exec_free(ex);
    }
    printf("quantized matmul: worst error %.3f x the bound, %.2g of the largest output\n",
           worst_ratio, worst_rel);
}

// qdot_rows directly, three tokens (a pass of two, then one): rows in one call equal
// rows one at a time (bitwise: a row's sum does not depend on the pass it falls in),
// and rows longer than one chunk of converted scales (70 groups) are within the bound,
// for every set and width.
static void test_qdot_rows(struct kernsets *ks) {
    static const int bits_list[] = {2, 3, 4, 5, 6, 8};
    enum { N_OUT = 11, N_IN = 32 * 70, N_TOK = 3 };
    for (int bi = 0; bi < 6; bi++) {
        struct qw q;
        qw_make(&q, N_OUT, N_IN, bits_list[bi], 32, MF_DTYPE_BF16, (uint32_t)(3 + bi));
        uint32_t s = 77;
        static float x[N_TOK * N_IN];
        float yr[N_TOK * N_OUT], y[N_TOK * N_OUT], y1[N_TOK * N_OUT];
        double mag[N_TOK * N_OUT];
        for (int64_t i = 0; i < N_TOK * N_IN; i++)
            x[i] = rndf(&s);
        ref_matmul(yr, mag, &q.w, x, N_TOK);
        for (size_t ki = 0; ki < KS_N_SETS; ki++) {
            const struct mf_cpu_kernels *k = ks_find(ks, ki);
            if (!k)
                continue;
            k->qdot_rows(y, N_OUT, x, N_IN, N_TOK, &q.w, 0, N_OUT);
            for (int64_t r = 0; r < N_OUT; r++)
                k->qdot_rows(y1 + r, N_OUT, x, N_IN, N_TOK, &q.w, r, 1);
            CHECK(memcmp(y, y1, sizeof y) == 0, "qdot_rows %s bits %d: rows differ when "
                  "done one by one", k->name, bits_list[bi]);
            double v = worst_vs_bound(y, yr, mag, N_IN, N_TOK * N_OUT);
            CHECK(v <= 1.0, "qdot_rows %s bits %d: error %g x the bound", k->name,
                  bits_list[bi], v);
        }
        qw_free(&q);
    }
}

// The one-token integer path of sets that have one (xsplit + qdot_rows_xs), 4 bits,
// groups of 64 and 128, rows past a chunk of converted scales (70 groups): within the
// bound against the reference for x whose groups span 1e-20 to 1e10 (and a group of
// zeros); rows in one call equal rows one at a time; the backend's matmul of one token
// is this path, bit for bit. x with a NaN, an infinity, or a group below 2^-96 is
// refused by xsplit, and matmul then gives qdot_rows's result.
static void test_xsplit(struct mf_backend *be, struct kernsets *ks) {
    enum { N_OUT = 13 };
    static const float mags[] = {1.0f, 1e-20f, 1e10f, 0.0f, 3e-3f, 7.5f};
    for (int gs = 64; gs <= 128; gs *= 2) {
        const int64_t n_in = 64 * 70;
        struct qw q;
        qw_make(&q, N_OUT, n_in, 4, gs, gs == 64 ? MF_DTYPE_BF16 : MF_DTYPE_F16,
                (uint32_t)(11 + gs));
        float *x = malloc((size_t)n_in * sizeof(float)), yr[N_OUT], y[N_OUT], y1[N_OUT];
        double mag[N_OUT];
        uint32_t s = 5;
        for (int64_t i = 0; i < n_in; i++)
            x[i] = rndf(&s) * mags[(i / gs) % 6];
        ref_matmul(yr, mag, &q.w, x, 1);
        const int64_t n_group = n_in / gs;
        struct mf_xsplit xs = {.parts = malloc((size_t)n_in * 4),
                               .unit = malloc((size_t)n_group * sizeof(float)),
                               .sum = malloc((size_t)n_group * sizeof(float)),
                               .n_in = n_in, .gs = gs};
        for (size_t ki = 0; ki < KS_N_SETS; ki++) {
            const struct mf_cpu_kernels *k = ks_find(ks, ki);
            if (!k || !k->xsplit)
                continue;
            CHECK(k->xsplit(&xs, x) == 1, "xsplit %s gs %d refused finite x", k->name, gs);
            k->qdot_rows_xs(y, &xs, &q.w, 0, N_OUT);
            for (int r = 0; r < N_OUT; r++)
                k->qdot_rows_xs(y1 + r, &xs, &q.w, r, 1);
            CHECK(memcmp(y, y1, sizeof y) == 0, "qdot_rows_xs %s gs %d: rows differ when "
                  "done one by one", k->name, gs);
            double v = worst_vs_bound(y, yr, mag, n_in, N_OUT);
            CHECK(v <= 1.0, "qdot_rows_xs %s gs %d: error %g x the bound", k->name, gs, v);
            struct mf_exec *ex = exec_or_fail(be, 2);
            if (!ex)
                continue;
            CHECK(ks_force(ks, ex, ki), "%s found but not installed on an exec", k->name);
            be->ops->matmul(ex, y1, &q.w, x, 1);
            CHECK(memcmp(y, y1, sizeof y) == 0, "matmul %s gs %d, one token: not the "
                  "integer path", k->name, gs);
            // Refused inputs: matmul gives qdot_rows's result.
            static const float odd[] = {NAN, INFINITY, 1e-29f};
            float *x2 = malloc((size_t)n_in * sizeof(float));
            for (int o = 0; o < 3; o++) {
                memcpy(x2, x, (size_t)n_in * sizeof(float));
                for (int64_t c = gs; c < 2 * gs; c++)   // group 1: 1e-20 -> 1e-29
                    x2[c] *= o == 2 ? 1e-9f : 1.0f;
                if (o < 2)
                    x2[gs + 5] = odd[o];
                CHECK(k->xsplit(&xs, x2) == 0, "xsplit %s gs %d took x with %g", k->name,
                      gs, (double)odd[o]);
                be->ops->matmul(ex, y1, &q.w, x2, 1);
                k->qdot_rows(y, N_OUT, x2, n_in, 1, &q.w, 0, N_OUT);
                CHECK(memcmp(y, y1, sizeof y) == 0, "matmul %s gs %d with %g in x: not "
                      "qdot_rows's result", k->name, gs, (double)odd[o]);
            }
            free(x2);
            be->ops->exec_free(ex);
        }
        free(xs.parts), free(xs.unit), free(xs.sum), free(x);
        qw_free(&q);
    }
}

// Float (F32 and BF16) weights at sizes that are not multiples of any vector width: every kernel
// set, one and several tokens (the register-blocked prefill path and its tails).
static void test_matmul_float(struct mf_backend *be, struct kernsets *ks) {
    struct mf_exec *ex = exec_or_fail(be, 2);
    if (!ex)
        return;
    const int64_t n_out = 13, n_in = 301;
    const int n_tok = 7;
    uint32_t s = 21;
    float *w = malloc((size_t)(n_out * n_in) * sizeof(float));
    float *x = malloc((size_t)(n_tok * n_in) * sizeof(float));
    float *y = malloc((size_t)(n_tok * n_out) * sizeof(float));
    float *yr = malloc((size_t)(n_tok * n_out) * sizeof(float));
    for (int64_t i = 0; i < n_out * n_in; i++)
        w[i] = rndf(&s);
    for (int64_t i = 0; i < n_tok * n_in; i++)
        x[i] = rndf(&s);
    for (int t = 0; t < n_tok; t++)
        for (int64_t r = 0; r < n_out; r++) {
            double acc = 0;
            for (int64_t c = 0; c < n_in; c++)
                acc += (double)x[t * n_in + c] * w[r * n_in + c];
            yr[t * n_out + r] = (float)acc;
        }
    struct mf_weight wt = {.w = w, .dtype = MF_DTYPE_F32, .n_out = n_out, .n_in = n_in};
    double scale = max_abs(yr, n_tok * n_out);
    for (size_t ki = 0; ki < KS_N_SETS; ki++) {
        if (!ks_force(ks, ex, ki))
            continue;
        for (int nt = 1; nt <= n_tok; nt += n_tok - 1) {
            be->ops->matmul(ex, y, &wt, x, nt);
            double d = max_diff(y, yr, nt * n_out);
            CHECK(d <= 2e-6 * scale, "float matmul %s n_tok %d: max diff %g (scale %g)",
                  kernel_names[ki], nt, d, scale);
        }
    }
    // The same weights stored as BF16 (values rounded by truncation; the reference uses
    // exactly those values).
    uint16_t *wb = malloc((size_t)(n_out * n_in) * sizeof(uint16_t));
    for (int64_t i = 0; i < n_out * n_in; i++) {
        wb[i] = f32_to_bf16(w[i]);
        w[i] = mf_bf16_to_f32(wb[i]);
    }
    for (int t = 0; t < n_tok; t++)
        for (int64_t r = 0; r < n_out; r++) {
            double acc = 0;
            for (int64_t c = 0; c < n_in; c++)
                acc += (double)x[t * n_in + c] * w[r * n_in + c];
            yr[t * n_out + r] = (float)acc;
        }
    struct mf_weight wt16 = {.w = wb, .dtype = MF_DTYPE_BF16, .n_out = n_out, .n_in = n_in};
    scale = max_abs(yr, n_tok * n_out);
    for (size_t ki = 0; ki < KS_N_SETS; ki++) {
        if (!ks_force(ks, ex, ki))
            continue;
        for (int nt = 1; nt <= n_tok; nt += n_tok - 1) {
            be->ops->matmul(ex, y, &wt16, x, nt);
            double d = max_diff(y, yr, nt * n_out);
            CHECK(d <= 2e-6 * scale, "bf16 matmul %s n_tok %d: max diff %g (scale %g)",
                  kernel_names[ki], nt, d, scale);
        }
        float conv[301];
        ex->k->bf16_to_f32(conv, wb, n_in);
        CHECK(memcmp(conv, w, (size_t)n_in * sizeof(float)) == 0, "bf16_to_f32 %s inexact",
              kernel_names[ki]);
    }
    free(wb);
    free(w);
    free(x);
    free(y);
    free(yr);
    be->ops->exec_free(ex);
}

// Dequant of every kernel set against the value-by-value reference decoder: bitwise.
static void test_dequant_bitwise(struct mf_backend *be, struct kernsets *ks) {
    struct mf_exec *ex = exec_or_fail(be, 1);
    if (!ex)
        return;
    static const int bits_list[] = {2, 3, 4, 5, 6, 8};
    for (int bi = 0; bi < 6; bi++)
        for (int gs = 32; gs <= 128; gs *= 2) {
            struct qw q;
            int64_t n_in = gs * 5;
            qw_make(&q, 3, n_in, bits_list[bi], gs, MF_DTYPE_BF16, (uint32_t)(7 + gs));
            float *a = malloc((size_t)n_in * sizeof(float));
            float *b = malloc((size_t)n_in * sizeof(float));
            for (size_t ki = 0; ki < KS_N_SETS; ki++) {
                if (!ks_force(ks, ex, ki))
                    continue;
                for (int64_t r = 0; r < 3; r++) {
                    mf_cpu_dequant_ref(a, &q.w, r, gs, n_in - gs);
                    ex->k->dequant(b, &q.w, r, gs, n_in - gs);
                    CHECK(memcmp(a, b, (size_t)(n_in - gs) * sizeof(float)) == 0,
                          "dequant %s bits %d gs %d row %lld differs", kernel_names[ki],
                          bits_list[bi], gs, (long long)r);
                }
            }
            free(a);
            free(b);
            qw_free(&q);
        }
    be->ops->exec_free(ex);
}

// Kernel-level dot/axpy at odd lengths, all sets against scalar.
static void test_dot_axpy(struct kernsets *ks) {
    uint32_t s = 5;
    float a[301], b[301], y0[301], y1[301];
    for (int i = 0; i < 301; i++) {
        a[i] = rndf(&s);
        b[i] = rndf(&s);
    }
    for (size_t ki = 1; ki < KS_N_SETS; ki++) {
        const struct mf_cpu_kernels *k = ks_find(ks, ki);
        if (!k)
            continue;
        for (int n = 0; n <= 301; n += 7) {
            float d0 = mf_cpu_kernels_scalar.dot(a, b, n), d1 = k->dot(a, b, n);
            CHECK(fabsf(d0 - d1) <= 1e-5f * (1.0f + fabsf(d0)), "dot %s n %d: %g vs %g",
                  k->name, n, d0, d1);
            memcpy(y0, b, sizeof y0);
            memcpy(y1, b, sizeof y1);
            mf_cpu_kernels_scalar.axpy(y0, 0.7f, a, n);
            k->axpy(y1, 0.7f, a, n);
            CHECK(max_diff(y0, y1, 301) <= 1e-6, "axpy %s n %d", k->name, n);
            // The fused delta-rule passes: same row updates (bitwise, elementwise ops in
            // the same order) and dots within rounding.
            float c[301];
            memcpy(y0, b, sizeof y0);
            memcpy(y1, b, sizeof y1);
            for (int i = 0; i < 301; i++)
                c[i] = rndf(&s);
            float m0 = mf_cpu_kernels_scalar.scale_dot(y0, 0.9f, a, n);
            float m1 = k->scale_dot(y1, 0.9f, a, n);
            CHECK(memcmp(y0, y1, sizeof y0) == 0, "scale_dot %s n %d: rows differ", k->name,
                  n);
            CHECK(fabsf(m0 - m1) <= 1e-5f * (1.0f + fabsf(m0)), "scale_dot %s n %d: %g vs %g",
                  k->name, n, m0, m1);
            m0 = mf_cpu_kernels_scalar.axpy_dot(y0, -0.3f, a, c, n);
            m1 = k->axpy_dot(y1, -0.3f, a, c, n);
            CHECK(max_diff(y0, y1, 301) <= 1e-6, "axpy_dot %s n %d: rows differ", k->name, n);
            CHECK(fabsf(m0 - m1) <= 1e-5f * (1.0f + fabsf(m0)), "axpy_dot %s n %d: %g vs %g",
                  k->name, n, m0, m1);
        }
    }
}

// Bitwise equality of results across thread counts, for every op that threads, with
// kernel set ki (skipped if the CPU lacks it).
static void thread_independence_set(struct mf_backend *be, struct kernsets *ks, size_t ki) {
    if (!mf_cpu_kernels_find(kernel_names[ki]))
        return;
    struct qw q;
    const int n_tok = 5;
    qw_make(&q, 301, 1024, 4, 64, MF_DTYPE_BF16, 3);
    uint32_t s = 11;
    float *x = malloc((size_t)n_tok * 1024 * sizeof(float));
    for (int i = 0; i < n_tok * 1024; i++)
        x[i] = rndf(&s);
    // A KV cache of 606 positions x [k(64) | v(64)] for 2 kv heads interleaved.
    float *cache = malloc((size_t)606 * 256 * sizeof(float));
    for (int i = 0; i < 606 * 256; i++)
        cache[i] = rndf(&s);
    float *y[2], *yt[2], *att[2];
    for (int v = 0; v < 2; v++) {
        int nt = v == 0 ? 1 : 4;
        struct mf_exec *ex = exec_or_fail(be, nt);
        if (!ex)
            return;
        ks_force(ks, ex, ki);
        y[v] = malloc((size_t)n_tok * 301 * sizeof(float));
        yt[v] = malloc((size_t)n_tok * 1024 * sizeof(float));
        att[v] = malloc((size_t)n_tok * 8 * 64 * sizeof(float));
        be->ops->matmul(ex, y[v], &q.w, x, n_tok);
        // matmul_t with x [n_tok, 301]: reuse x's first values.
        be->ops->matmul_t(ex, yt[v], &q.w, x, n_tok);
        // attention: 8 heads over 2 kv heads, dk = dv = 64, over 601..605 keys (more
        // than one online-softmax chunk).
        be->ops->attention(ex, att[v], x, cache, cache + 128, n_tok, 8, 2, 64, 64, 256,
                           256, 600, 0.125f);
        be->ops->exec_free(ex);
    }
    CHECK(memcmp(y[0], y[1], (size_t)n_tok * 301 * sizeof(float)) == 0,
          "matmul differs between 1 and 4 threads (%s)", kernel_names[ki]);
    CHECK(memcmp(yt[0], yt[1], (size_t)n_tok * 1024 * sizeof(float)) == 0,
          "matmul_t differs between 1 and 4 threads (%s)", kernel_names[ki]);
    CHECK(memcmp(att[0], att[1], (size_t)n_tok * 8 * 64 * sizeof(float)) == 0,
          "attention differs between 1 and 4 threads (%s)", kernel_names[ki]);
    for (int v = 0; v < 2; v++) {
        free(y[v]);
        free(yt[v]);
        free(att[v]);
    }
    free(cache);
    free(x);
    qw_free(&q);
}

static void test_thread_independence(struct mf_backend *be, struct kernsets *ks) {
    for (size_t ki = 0; ki < KS_N_SETS; ki++)
        thread_independence_set(be, ks, ki);
}

// Two execs used from two threads at once (two contexts in one process): each must get
// exactly the single-threaded result, i.e. nothing is shared between execs.
struct conc_arg {
    struct mf_backend *be;
    const struct mf_weight *w;
    const float *x;
    const float *expect;   // [4, n_out]
    int ok;
};

static void *conc_main(void *vp) {
    struct conc_arg *a = vp;
    char err[256];
    struct mf_exec *ex;
    if (a->be->ops->exec_new(a->be, 2, &ex, err, sizeof err))
        return NULL;
    float *y = malloc((size_t)(4 * a->w->n_out) * sizeof(float));
    a->ok = y != NULL;
    for (int rep = 0; y && rep < 30; rep++) {
        a->be->ops->matmul(ex, y, a->w, a->x, 4);
        a->ok &= memcmp(y, a->expect, (size_t)(4 * a->w->n_out) * sizeof(float)) == 0;
    }
    free(y);
    a->be->ops->exec_free(ex);
    return NULL;
}

static void test_concurrent_execs(struct mf_backend *be) {
    struct qw q;
    qw_make(&q, 200, 512, 4, 64, MF_DTYPE_BF16, 17);
    uint32_t s = 3;
    float x[4 * 512], expect[4 * 200];
    for (int i = 0; i < 4 * 512; i++)
        x[i] = rndf(&s);
    struct mf_exec *ex = exec_or_fail(be, 1);
    if (!ex) {
        qw_free(&q);
        return;
    }
    be->ops->matmul(ex, expect, &q.w, x, 4);
    be->ops->exec_free(ex);
    struct conc_arg args[2] = {{be, &q.w, x, expect, 0}, {be, &q.w, x, expect, 0}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&th[i], NULL, conc_main, &args[i]) == 0, "pthread_create");
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    CHECK(args[0].ok && args[1].ok, "concurrent execs gave different results");
    qw_free(&q);
}

struct count_arg {
    int *hits;
};

static void count_fn(void *arg, int i) {
    struct count_arg *a = arg;
    a->hits[i]++;   // each index is run by exactly one thread
}

// A task that itself calls parallel_for (as a forward pass running experts in parallel
// and calling ops inside might): the inner run goes inline on the task's thread.
struct nest_arg {
    struct mf_backend *be;
    struct mf_exec *ex;
    int *hits;   // [8][50]
};

static void nest_inner(void *arg, int i) {
    int *row = arg;
    row[i]++;
}

static void nest_outer(void *arg, int i) {
    struct nest_arg *a = arg;
    a->be->ops->parallel_for(a->ex, nest_inner, a->hits + i * 50, 50);
}

static void test_pool_nested(struct mf_backend *be) {
    struct mf_exec *ex = exec_or_fail(be, 3);
    if (!ex)
        return;
    int hits[8 * 50];
    memset(hits, 0, sizeof hits);
    struct nest_arg a = {.be = be, .ex = ex, .hits = hits};
    for (int rep = 0; rep < 20; rep++)
        be->ops->parallel_for(ex, nest_outer, &a, 8);
    int ok = 1;
    for (int i = 0; i < 8 * 50; i++)
        ok &= hits[i] == 20;
    CHECK(ok, "nested parallel_for ran tasks wrong");
    be->ops->exec_free(ex);
}

static void test_pool_lifecycle(struct mf_backend *be) {
    int hits[1000];
    for (int round = 0; round < 200; round++) {
        int nt = 1 + round % 5;
        struct mf_exec *ex = exec_or_fail(be, nt);
        if (!ex)
            return;
        memset(hits, 0, sizeof hits);
        struct count_arg a = {.hits = hits};
        int n = 1 + (round * 37) % 1000;
        for (int rep = 0; rep < 3; rep++)
            be->ops->parallel_for(ex, count_fn, &a, n);
        int ok = 1;
        for (int i = 0; i < 1000; i++)
            ok &= hits[i] == (i < n ? 3 : 0);
        CHECK(ok, "parallel_for round %d (threads %d, tasks %d) ran tasks wrong", round, nt,
              n);
        be->ops->exec_free(ex);
    }
}

// The backend name "cpu:<set>" puts every exec of that backend on the set (bitwise the
// matmul of an exec forced to it directly); an unknown set, or one this CPU lacks, is
// MF_ERR_BACKEND with a message naming it.
static void backend_forced_set(struct kernsets *ks, size_t ki, const struct qw *q,
                               const float *x) {
    char err[256] = "", name[32];
    snprintf(name, sizeof name, "cpu:%s", kernel_names[ki]);
    struct mf_backend *fb = NULL;
    int rc = mf_backend_new(&fb, name, err, sizeof err);
    if (!mf_cpu_kernels_find(kernel_names[ki])) {
        CHECK(rc == MF_ERR_BACKEND && fb == NULL && strstr(err, kernel_names[ki]),
              "%s on a CPU without it: rc %d, '%s'", name, rc, err);
        return;
    }
    CHECK(rc == MF_OK, "%s: %s", name, err);
    if (rc != MF_OK)
        return;
    struct mf_exec *a = exec_or_fail(fb, 2), *b = exec_or_fail(fb, 1);
    if (a && b) {
        CHECK(strcmp(a->k->name, kernel_names[ki]) == 0, "%s gave an exec on '%s'", name,
              a->k->name);
        ks_note(ks, a->k);
        float ya[3 * 67], yb[3 * 67];
        fb->ops->matmul(a, ya, &q->w, x, 3);
        mf_cpu_exec_set_kernels(b, kernel_names[ki], err, sizeof err);
        fb->ops->matmul(b, yb, &q->w, x, 3);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "%s: matmul differs from a forced exec", name);
    }
    if (a)
        fb->ops->exec_free(a);
    if (b)
        fb->ops->exec_free(b);
    fb->ops->free(fb);
}

static void test_backend_forced(struct kernsets *ks) {
    struct qw q;
    qw_make(&q, 67, 256, 4, 64, MF_DTYPE_BF16, 17);
    uint32_t s = 3;
    float x[3 * 256];
    for (int i = 0; i < 3 * 256; i++)
        x[i] = rndf(&s);
    for (size_t ki = 0; ki < KS_N_SETS; ki++)
        backend_forced_set(ks, ki, &q, x);
    qw_free(&q);
    char err[256] = "";
    struct mf_backend *fb = NULL;
    CHECK(mf_backend_new(&fb, "cpu:sse9", err, sizeof err) == MF_ERR_BACKEND && !fb &&
              strstr(err, "'sse9'") && strstr(err, "scalar"),
          "cpu:sse9 should be MF_ERR_BACKEND naming the set and the choices: '%s'", err);
    CHECK(mf_backend_new(&fb, "cpu:", err, sizeof err) == MF_ERR_BACKEND && !fb,
          "cpu: (empty set) should be MF_ERR_BACKEND");
}

int main(void) {
    char err[256];
    struct kernsets ks = {{0}};
    struct mf_backend *be;
    if (mf_backend_new(&be, "cpu", err, sizeof err) != MF_OK) {
        fprintf(stderr, "FAIL backend: %s\n", err);
        return 1;
    }
    CHECK(mf_backend_new(&(struct mf_backend *){NULL}, "cuda", err, sizeof err) ==
              MF_ERR_BACKEND, "cuda should be MF_ERR_BACKEND");
    printf("best kernels: %s\n", mf_cpu_kernels_best()->name);
    test_dot_axpy(&ks);
    test_dequant_bitwise(be, &ks);
    test_matmul_paths(be, &ks);
    test_qdot_rows(&ks);
    test_xsplit(be, &ks);
    test_matmul_float(be, &ks);
    test_thread_independence(be, &ks);
    test_pool_lifecycle(be);
    test_pool_nested(be);
    test_concurrent_execs(be);
    test_backend_forced(&ks);
    be->ops->free(be);
    ks_finish(&ks, "test_cpu_matmul");
    return check_finish("test_cpu_matmul");
}
