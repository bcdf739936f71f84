/*
 * test_backend_ops.c — every op of the CUDA backend against the CPU backend (the
 * oracle), on fresh random inputs each run: non-tile-multiple shapes, in_dim > 4096,
 * every bits x group x scale dtype for the quantized products, GQA attention with
 * pos0 > 0 and long contexts, noaux_tc routing with groups; plus memory, copies,
 * fences, weight mapping, the sticky status and the cubin cache. Outputs are poisoned
 * (NaN) before each run. Bounds, per op (gpu-design §7.2):
 *   float ops            max|d| <= 1e-5 * max|ref|
 *   attention, GDN       3e-5: long loops of exp/rescale or of state updates in another
 *                        summation order (split-K softmax, warp-reduced dots) add a few
 *                        roundings per step on top of the float tier
 *   quantized / float    per output, |d| <= c * eps * sum_i |w_i x_i|, eps = 2^-23,
 *   products             c = 4 log2(reduction length): pure reordering error
 *   routing              ids equal, weights within 1e-6; a near-tie (K-th vs next
 *                        margin < 1e-5 relative) is reported as skipped
 * Without a CUDA driver it prints "SKIP: no CUDA driver" and exits 0. With
 * MOEFLUX_OPS_AGAINST=cpu it runs every case with the CPU backend in the GPU's place
 * (a check of the harness itself on machines without a GPU).
 */
#include <dlfcn.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backends/backend.h"
#include "backends/cpu/cpu_internal.h"
#include "backends/cuda/cuda_backend.h"
#include "../../shaders/mf_params.h"
#include "check.h"

#define EPS (1.0 / 8388608.0)   // 2^-23
#define RTOL 1e-5
#define RTOL_LONG 3e-5

struct env {
    struct mf_backend *cb, *gb;
    struct mf_exec *cx, *gx;      // gx made with MOEFLUX_GPU_FUSE=all
    struct mf_exec *gx_untiled;   // made with MOEFLUX_GPU_ATTN_TILE=0,
                                  // MOEFLUX_GPU_FUSE=0 and MOEFLUX_GPU_ATTN_BLOCK=64
                                  // (NULL against the CPU)
    int progress;                 // MOEFLUX_OPS_PROGRESS: each group's time as it ends
    double t_start;
    const struct mf_backend_ops *co, *go;
    uint64_t rng;
    int n_case, n_skip;
    int against_cpu;   // the harness check: the "device" is a second CPU backend
};

static struct env E;

/* ==== Random data and host helpers ==== */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float urand(float lo, float hi) {
    return lo + (hi - lo) * (float)((check_rand(&E.rng) >> 40) * (1.0 / 16777216.0));
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static float *frand(size_t n, float lo, float hi) {
    float *p = xmalloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = urand(lo, hi);
    return p;
}

static float *fpoison(size_t n) {
    float *p = xmalloc(n * sizeof *p);
    memset(p, 0xff, n * sizeof *p);   // NaN
    return p;
}

// f32 -> f16 bits for |values| below 65504 (truncating the mantissa; tiny ones to 0).
static uint16_t f16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, ex = (u >> 23) & 0xffu;
    if (ex < 113)   // below the smallest normal f16: zero
        return (uint16_t)sign;
    return (uint16_t)(sign | ((ex - 112u) << 10) | ((u >> 13) & 0x3ffu));
}

// n values of dtype dt whose f32 values are urand(lo, hi) rounded into dt.
static void *encode(enum mf_dtype dt, size_t n, float lo, float hi) {
    void *p = xmalloc(n * mf_dtype_size(dt));
    for (size_t i = 0; i < n; i++) {
        float f = urand(lo, hi);
        uint32_t u;
        memcpy(&u, &f, 4);
        if (dt == MF_DTYPE_F32)
            ((float *)p)[i] = f;
        else if (dt == MF_DTYPE_BF16)
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        else
            ((uint16_t *)p)[i] = f16_bits(f);
    }
    return p;
}

/* ==== Device helpers (the backend under test) ==== */

static void *gput(const void *host, size_t bytes) {
    void *p = E.go->alloc(E.gx, bytes);
    CHECK(p != NULL, "alloc of %zu bytes", bytes);
    if (p && bytes)
        E.go->upload(E.gx, p, 0, host, bytes);
    return p;
}

// A device buffer filled with NaN.
static void *gpoison(size_t bytes) {
    void *h = xmalloc(bytes);
    memset(h, 0xff, bytes);
    void *p = gput(h, bytes);
    free(h);
    return p;
}

static float *gget(const void *dev, size_t n_floats) {
    float *h = xmalloc(n_floats * sizeof *h);
    E.go->download(E.gx, h, dev, 0, n_floats * sizeof *h);
    return h;
}

static void gfree(void *p) { E.go->dealloc(E.gx, p); }

static void status_ok(const char *what) {
    char err[1024] = "";
    int rc = E.go->status ? E.go->status(E.gx, err, sizeof err) : MF_OK;
    CHECK(rc == MF_OK, "%s: backend status %d: %s", what, rc, err);
    if (E.progress)
        printf("%s: done at %.1f s\n", what, now_s() - E.t_start);
}

/* ==== Comparisons ==== */

// max|got - ref| <= rel * max|ref|; NaN in got fails.
static void cmp_rel(const char *what, const float *ref, const float *got, size_t n,
                    double rel) {
    double mx = 0, md = 0;
    size_t at = 0, bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (isnan(got[i]) && !isnan(ref[i]))
            bad++;
        mx = fabs(ref[i]) > mx ? fabs(ref[i]) : mx;
        if (d > md) {
            md = d;
            at = i;
        }
    }
    E.n_case++;
    CHECK(bad == 0 && md <= rel * mx,
          "%s: %zu NaN, max|d| %.3g at %zu (ref %.9g got %.9g) > %.1e * max|ref| %.4g", what,
          bad, md, at, n ? ref[at] : 0.0f, n ? got[at] : 0.0f, rel, mx);
}

// Per output i: |got - ref| <= 4 log2(len) eps absdot[i] (+ extra[i] when given).
static void cmp_dot(const char *what, const float *ref, const float *got,
                    const double *absdot, const double *extra, size_t n, int64_t len) {
    const double c = 4.0 * log2((double)(len > 2 ? len : 2));
    size_t worst = 0, bad = 0;
    double wr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        double bound = c * EPS * absdot[i] + (extra ? extra[i] : 0.0);
        if (!(d <= bound))
            bad++;
        double r = bound > 0 ? d / bound : (d > 0 ? INFINITY : 0);
        if (r > wr || isnan(got[i])) {
            wr = isnan(got[i]) ? INFINITY : r;
            worst = i;
        }
    }
    E.n_case++;
    CHECK(bad == 0, "%s: %zu of %zu outputs beyond c*eps*sum|w x| (worst %zu: ref %.9g got "
          "%.9g bound %.3g)", what, bad, n, worst, ref[worst], got[worst],
          c * EPS * absdot[worst] + (extra ? extra[worst] : 0.0));
}

/* ==== Weights on both backends ==== */

struct tw {
    struct mf_weight c, g;   // host view (CPU), device view (under test)
    void *hw, *hs, *hb;      // host bytes
    float *deq;              // [n_out, n_in] as f32, from the reference dequantizer
};

static void tw_make(struct tw *t, enum mf_dtype dt, enum mf_dtype sdt, int bits, int gs,
                    int64_t n_out, int64_t n_in) {
    memset(t, 0, sizeof *t);
    struct mf_weight w = {.dtype = dt, .sdtype = sdt, .bits = bits, .group_size = gs,
                          .n_out = n_out, .n_in = n_in};
    size_t wb = (size_t)mf_weight_w_bytes(&w), sb = (size_t)mf_weight_s_bytes(&w);
    if (dt == MF_DTYPE_U32) {
        t->hw = xmalloc(wb);
        for (size_t i = 0; i < wb; i++)
            ((uint8_t *)t->hw)[i] = (uint8_t)(check_rand(&E.rng) >> 56);
        float half = (float)(1 << (bits - 1));
        t->hs = encode(sdt, sb / mf_dtype_size(sdt), 0.004f, 0.012f);
        t->hb = encode(sdt, sb / mf_dtype_size(sdt), -0.012f * half, -0.004f * half);
    } else {
        t->hw = encode(dt, (size_t)(n_out * n_in), -0.1f, 0.1f);
    }
    w.w = t->hw;
    w.scales = t->hs;
    w.biases = t->hb;
    t->c = w;
    t->deq = xmalloc((size_t)(n_out * n_in) * sizeof(float));
    for (int64_t r = 0; r < n_out; r++) {
        if (dt == MF_DTYPE_U32)
            mf_cpu_dequant_ref(t->deq + r * n_in, &w, r, 0, n_in);
        else
            for (int64_t c = 0; c < n_in; c++)
                t->deq[r * n_in + c] = mf_load_f32(t->hw, dt, (size_t)(r * n_in + c));
    }
    t->g = w;
    t->g.w = gput(t->hw, wb);
    t->g.scales = t->hs ? gput(t->hs, sb) : NULL;
    t->g.biases = t->hb ? gput(t->hb, sb) : NULL;
}

static void tw_free(struct tw *t) {
    gfree((void *)t->g.w);
    if (t->g.scales) {
        gfree((void *)t->g.scales);
        gfree((void *)t->g.biases);
    }
    free(t->hw);
    free(t->hs);
    free(t->hb);
    free(t->deq);
}

static const char *wname(const struct tw *t, char *buf, size_t n) {
    if (t->c.dtype == MF_DTYPE_U32)
        snprintf(buf, n, "q%d g%d %s [%lld,%lld]", t->c.bits, t->c.group_size,
                 mf_dtype_name(t->c.sdtype), (long long)t->c.n_out, (long long)t->c.n_in);
    else
        snprintf(buf, n, "%s [%lld,%lld]", mf_dtype_name(t->c.dtype), (long long)t->c.n_out,
                 (long long)t->c.n_in);
    return buf;
}

/* ==== Products ==== */

// x on the device xoff floats into its buffer (1: x not 16-byte aligned).
// Per output of x[nt, N] @ W^T: sum |x * w| (the dot's absolute sum, the reordering
// bound's scale), plus |y0| where y0 (the values added to) is given.
static double *abs_dots(const struct tw *t, const float *x, int nt, const float *y0) {
    const int64_t N = t->c.n_in, R = t->c.n_out;
    double *ad = xmalloc((size_t)(nt * R) * sizeof *ad);
    for (int tt = 0; tt < nt; tt++)
        for (int64_t r = 0; r < R; r++) {
            double s = y0 ? fabs((double)y0[tt * R + r]) : 0.0;
            for (int64_t c = 0; c < N; c++)
                s += fabs((double)x[tt * N + c] * t->deq[r * N + c]);
            ad[tt * R + r] = s;
        }
    return ad;
}

static void test_matmul(const struct tw *t, int nt, int xoff) {
    const int64_t N = t->c.n_in, R = t->c.n_out;
    float *x = frand((size_t)(nt * N + xoff), -1, 1), *yc = fpoison((size_t)(nt * R));
    E.co->matmul(E.cx, yc, &t->c, x + xoff, nt);
    float *gxb = gput(x, (size_t)(nt * N + xoff) * 4), *gy = gpoison((size_t)(nt * R) * 4);
    E.go->matmul(E.gx, gy, &t->g, gxb + xoff, nt);
    float *yg = gget(gy, (size_t)(nt * R));
    double *ad = abs_dots(t, x + xoff, nt, NULL);
    char nm[128], what[200];
    snprintf(what, sizeof what, "matmul %s n_tok %d x offset %d", wname(t, nm, sizeof nm),
             nt, xoff);
    cmp_dot(what, yc, yg, ad, NULL, (size_t)(nt * R), N);
    free(x), free(yc), free(yg), free(ad), gfree(gxb), gfree(gy);
}

static void test_matmul_t(const struct tw *t, int nt) {
    const int64_t N = t->c.n_in, R = t->c.n_out;
    float *x = frand((size_t)(nt * R), -1, 1), *yc = fpoison((size_t)(nt * N));
    E.co->matmul_t(E.cx, yc, &t->c, x, nt);
    float *gxb = gput(x, (size_t)(nt * R) * 4), *gy = gpoison((size_t)(nt * N) * 4);
    E.go->matmul_t(E.gx, gy, &t->g, gxb, nt);
    float *yg = gget(gy, (size_t)(nt * N));
    double *ad = xmalloc((size_t)(nt * N) * sizeof *ad);
    for (int tt = 0; tt < nt; tt++)
        for (int64_t c = 0; c < N; c++) {
            double s = 0;
            for (int64_t o = 0; o < R; o++)
                s += fabs((double)x[tt * R + o] * t->deq[o * N + c]);
            ad[tt * N + c] = s;
        }
    char nm[128], what[200];
    snprintf(what, sizeof what, "matmul_t %s n_tok %d", wname(t, nm, sizeof nm), nt);
    cmp_dot(what, yc, yg, ad, NULL, (size_t)(nt * N), R);
    free(x), free(yc), free(yg), free(ad), gfree(gxb), gfree(gy);
}

// H heads of RH rows each inside the weight, strided x and y (x_head_stride 0: every
// head reads the same row).
static void test_heads_of(const struct tw *t, int transposed, int shared_x, int nt, int H,
                          int RH, int xpad) {
    const int N = (int)t->c.n_in;
    const int in = transposed ? RH : N, out = transposed ? N : RH;
    const int xts = H * in + xpad, xhs = shared_x ? 0 : in, yts = H * (out + 1), yhs = out + 1;
    struct mf_weight wc = t->c, wg = t->g;
    wc.n_out = wg.n_out = RH;
    float *x = frand((size_t)nt * xts, -1, 1), *yc = fpoison((size_t)nt * yts);
    E.co->matmul_heads(E.cx, yc, yts, yhs, &wc, RH, transposed, x, xts, xhs, nt, H);
    float *gxb = gput(x, (size_t)nt * xts * 4), *gy = gpoison((size_t)nt * yts * 4);
    E.go->matmul_heads(E.gx, gy, yts, yhs, &wg, RH, transposed, gxb, xts, xhs, nt, H);
    float *yg = gget(gy, (size_t)nt * yts);
    size_t n = (size_t)nt * H * out, k = 0;
    float *rc = xmalloc(n * 4), *rg = xmalloc(n * 4);
    double *ad = xmalloc(n * sizeof *ad);
    for (int tt = 0; tt < nt; tt++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < out; i++, k++) {
                rc[k] = yc[tt * yts + h * yhs + i];
                rg[k] = yg[tt * yts + h * yhs + i];
                const float *xr = x + tt * xts + h * xhs;
                double s = 0;
                for (int j = 0; j < in; j++)
                    s += fabs((double)xr[j] * (transposed ? t->deq[(size_t)(h * RH + j) * N + i]
                                                          : t->deq[(size_t)(h * RH + i) * N + j]));
                ad[k] = s;
            }
    char nm[128], what[200];
    snprintf(what, sizeof what, "matmul_heads%s%s %s n_tok %d", transposed ? " transposed" : "",
             shared_x ? " shared x" : "", wname(t, nm, sizeof nm), nt);
    cmp_dot(what, rc, rg, ad, NULL, n, in);
    free(x), free(yc), free(yg), free(rc), free(rg), free(ad), gfree(gxb), gfree(gy);
}

static void test_heads(const struct tw *t, int transposed, int shared_x, int nt) {
    test_heads_of(t, transposed, shared_x, nt, 3, 25, 5);
}

static void test_embed(const struct tw *t) {
    const int64_t N = t->c.n_in, R = t->c.n_out;
    int32_t tok[6] = {5, 0, (int32_t)R - 1, -3, (int32_t)R + 7, 42 % (int32_t)R};
    float *yc = fpoison((size_t)(6 * N));
    E.co->embed(E.cx, yc, &t->c, tok, 6);
    float *gy = gpoison((size_t)(6 * N) * 4);
    E.go->embed(E.gx, gy, &t->g, tok, 6);
    memset(tok, 0x7f, sizeof tok);   // host arguments are consumed before return
    float *yg = gget(gy, (size_t)(6 * N));
    char nm[128], what[200];
    snprintf(what, sizeof what, "embed %s", wname(t, nm, sizeof nm));
    cmp_rel(what, yc, yg, (size_t)(6 * N), RTOL);
    free(yc), free(yg), gfree(gy);
}

// Products gy[i] of the device (i < n, x [nt, n_in] on the host) against the CPU's matmul
// of each (the reordering bound) and bit for bit against gs[i], the same products made
// the other way (`apart`); frees gy and gs.
static void check_products(const char *op, const char *tag, const char *apart,
                           struct tw *const *t, int n, int nt, const float *x,
                           float *const *gy, float *const *gs) {
    for (int i = 0; i < n; i++) {
        const int64_t R = t[i]->c.n_out;
        float *yc = fpoison((size_t)(nt * R)), *yg = gget(gy[i], (size_t)(nt * R));
        float *ys = gget(gs[i], (size_t)(nt * R));
        E.co->matmul(E.cx, yc, &t[i]->c, x, nt);
        double *ad = abs_dots(t[i], x, nt, NULL);
        char nm[128], what[256];
        snprintf(what, sizeof what, "%s %d of %d %s n_tok %d%s", op, i, n,
                 wname(t[i], nm, sizeof nm), nt, tag);
        cmp_dot(what, yc, yg, ad, NULL, (size_t)(nt * R), t[i]->c.n_in);
        E.n_case++;
        CHECK(memcmp(yg, ys, (size_t)(nt * R) * 4) == 0, "%s: differs from %s", what, apart);
        free(yc), free(yg), free(ys), free(ad), gfree(gy[i]), gfree(gs[i]);
    }
}

// matmul_multi of n weights against the CPU's matmul of each (the reordering bound),
// and bit for bit against the backend's own matmul of each: one launch must compute
// what separate launches compute.
static void test_multi(struct tw *const *t, int n, int nt) {
    const int64_t N = t[0]->c.n_in;
    float *x = frand((size_t)(nt * N), -1, 1), *gxb = gput(x, (size_t)(nt * N) * 4);
    float *gy[MF_MATMUL_MULTI], *gs[MF_MATMUL_MULTI];
    const struct mf_weight *wg[MF_MATMUL_MULTI];
    for (int i = 0; i < n; i++) {
        gy[i] = gpoison((size_t)(nt * t[i]->c.n_out) * 4);
        gs[i] = gpoison((size_t)(nt * t[i]->c.n_out) * 4);
        wg[i] = &t[i]->g;
        E.go->matmul(E.gx, gs[i], &t[i]->g, gxb, nt);
    }
    mf_matmul_multi(E.go, E.gx, n, gy, wg, gxb, nt);
    check_products("matmul_multi", "", "matmul", t, n, nt, x, gy, gs);
    free(x), gfree(gxb);
}

static void test_multis(void) {
    struct tw a, b, c, d, e, f;
    tw_make(&a, MF_DTYPE_U32, MF_DTYPE_BF16, 4, 64, 4096, 2048);   // q_proj-like
    tw_make(&b, MF_DTYPE_U32, MF_DTYPE_F16, 8, 32, 130, 2048);
    tw_make(&c, MF_DTYPE_BF16, MF_DTYPE_F32, 0, 0, 77, 2048);
    // With a: three one-token products for the tensor cores (one mf_mv_tc launch).
    tw_make(&d, MF_DTYPE_U32, MF_DTYPE_F32, 2, 128, 130, 2048);
    tw_make(&e, MF_DTYPE_U32, MF_DTYPE_F16, 4, 32, 77, 2048);
    // Prefill chunks in the formats of mf_gemm_mma: one mf_gemm_mma_multi launch.
    tw_make(&f, MF_DTYPE_U32, MF_DTYPE_BF16, 4, 64, 300, 2048);
    struct tw *const t[3] = {&a, &b, &c}, *const r[3] = {&c, &a, &b};
    struct tw *const q[3] = {&e, &a, &d}, *const m[3] = {&e, &f, &d}, *const m2[2] = {&d, &e};
    const int nts[] = {1, 3, 8, 9};
    for (int n = 1; n <= 3; n++) {
        for (size_t i = 0; i < sizeof nts / sizeof nts[0]; i++) {
            test_multi(t, n, nts[i]);
            test_multi(r, n, nts[i]);
        }
        test_multi(q, n, 1);
        test_multi(q, n, 2);
        test_multi(m, n, 40);
    }
    test_multi(m2, 2, 33);
    tw_free(&a), tw_free(&b), tw_free(&c), tw_free(&d), tw_free(&e), tw_free(&f);
    status_ok("matmul_multi");
}

// The one-token products of the tensor-core kernel (2 and 4-bit codes, n_in <= 4096):
// every group size and scale type, rows not a multiple of its 16-row tiles, fewer
// groups than warps per tile (1152 = 9 groups of 128), an lm_head-like weight (8 tiles
// per threadgroup), heads, and an x one float into its buffer.
static void test_tc_products(void) {
    const enum mf_dtype sdts[] = {MF_DTYPE_BF16, MF_DTYPE_F16, MF_DTYPE_F32};
    const int bitsv[] = {2, 4}, gss[] = {32, 64, 128};
    for (size_t b = 0; b < 2; b++)
        for (size_t g = 0; g < 3; g++)
            for (size_t s = 0; s < 3; s++) {
                struct tw t;
                tw_make(&t, MF_DTYPE_U32, sdts[s], bitsv[b], gss[g], 77, s == 1 ? 1152 : 4096);
                test_matmul(&t, 1, 0);
                test_matmul(&t, 1, 1);
                test_heads(&t, 0, 0, 1);
                test_heads(&t, 0, 1, 1);
                if (s == 0) {   // the prefill GEMM on tensor cores (mma.h): 3 token tiles;
                    test_matmul(&t, 70, 0);   // heads of x at 16-byte strides
                    test_heads_of(&t, 0, 0, 40, 3, 25, 4);
                    test_heads_of(&t, 0, 1, 40, 3, 25, 4);
                }
                tw_free(&t);
            }
    struct tw t;
    tw_make(&t, MF_DTYPE_U32, MF_DTYPE_BF16, 4, 64, 40000, 2048);
    test_matmul(&t, 1, 0);
    tw_free(&t);
    status_ok("tensor-core products");
}

static void test_weight_ops(const struct tw *t) {
    const int nts[] = {1, 3, 8, 37};
    for (size_t i = 0; i < sizeof nts / sizeof nts[0]; i++)
        test_matmul(t, nts[i], 0);
    test_matmul(t, 1, 1);
    if (t->c.bits == 0 || t->c.bits == 3 || t->c.bits == 4)   // GEMM token tiles, x unaligned
        test_matmul(t, 130, 1);
    test_matmul_t(t, 1);
    test_matmul_t(t, 6);
    test_heads(t, 0, 0, 1);
    test_heads(t, 0, 1, 11);
    test_heads(t, 1, 0, 1);
    test_heads(t, 1, 1, 6);
    test_embed(t);
    status_ok("products");
}

// Products of many tokens in formats outside mf_gemm_mma with enough rows for mf_gemm's
// tiles (MF_GEMM_MIN_TG; the 77-row products above take mf_mv's row dots), a partial
// row and token tile, x aligned and not.
static void test_gemm_tiles(void) {
    const int bitsv[] = {3, 8};
    for (size_t b = 0; b < 2; b++) {
        struct tw t;
        tw_make(&t, MF_DTYPE_U32, MF_DTYPE_BF16, bitsv[b], 64, 2050, 640);
        test_matmul(&t, 70, 0);
        test_matmul(&t, 70, 1);
        tw_free(&t);
    }
    status_ok("gemm tiles");
}

// Large one-token products (thousands of threadgroups, as an lm_head), one with a row
// count no multiple of anything, and 16 heads of 4096 rows.
static void test_large_one_token(void) {
    const int64_t rows[] = {40000, 70000, 140000, 140001};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        struct tw t;
        const int odd = rows[i] & 1;
        tw_make(&t, MF_DTYPE_U32, odd ? MF_DTYPE_F16 : MF_DTYPE_BF16, odd ? 8 : 4,
                odd ? 32 : 64, rows[i], 256);
        test_matmul(&t, 1, 0);
        test_matmul(&t, 1, 1);
        tw_free(&t);
    }
    struct tw t;
    tw_make(&t, MF_DTYPE_U32, MF_DTYPE_BF16, 4, 64, 16 * 4096, 128);
    test_heads_of(&t, 0, 0, 1, 16, 4096, 5);
    test_heads_of(&t, 0, 1, 1, 16, 4096, 5);
    tw_free(&t);
    status_ok("large one-token products");
}

static void test_products(void) {
    const enum mf_dtype sdts[] = {MF_DTYPE_BF16, MF_DTYPE_F16, MF_DTYPE_F32};
    const int bitsv[] = {2, 3, 4, 5, 6, 8}, gss[] = {32, 64, 128};
    for (size_t b = 0; b < 6; b++)
        for (size_t g = 0; g < 3; g++)
            for (size_t s = 0; s < 3; s++) {
                struct tw t;
                // 4224 = 33 * 128: a multiple of every group size, above 4096.
                tw_make(&t, MF_DTYPE_U32, sdts[s], bitsv[b], gss[g], 77, 4224);
                test_weight_ops(&t);
                tw_free(&t);
                // 3968 = 31 * 128: the last 1024-column step of x partly filled
                tw_make(&t, MF_DTYPE_U32, sdts[s], bitsv[b], gss[g], 77, 3968);
                test_matmul(&t, 1, 0);
                test_matmul(&t, 1, 1);
                test_heads(&t, 0, 0, 1);
                test_heads(&t, 0, 1, 1);
                tw_free(&t);
            }
    const enum mf_dtype fdts[] = {MF_DTYPE_F32, MF_DTYPE_F16, MF_DTYPE_BF16};
    for (size_t d = 0; d < 3; d++) {
        struct tw t;
        tw_make(&t, fdts[d], MF_DTYPE_F32, 0, 0, 77, 4100);
        test_weight_ops(&t);
        tw_free(&t);
    }
    test_tc_products();
    test_multis();
    test_large_one_token();
    test_gemm_tiles();
    printf("products: %d cases\n", E.n_case);
}

/* ==== Norms, rope ==== */

// A float weight vector of n values on both backends (g.w device, c.w host).
struct vw {
    struct mf_weight c, g;
};

static struct vw vw_make(enum mf_dtype dt, int n, float lo, float hi) {
    struct vw v;
    struct mf_weight w = {.dtype = dt, .sdtype = MF_DTYPE_F32, .n_out = 1, .n_in = n};
    w.w = encode(dt, (size_t)n, lo, hi);
    v.c = w;
    v.g = w;
    v.g.w = gput(w.w, (size_t)n * mf_dtype_size(dt));
    return v;
}

static void vw_free(struct vw *v) {
    free((void *)v->c.w);
    gfree((void *)v->g.w);
}

// Runs an in-place op on a copy of buf on both backends and compares whole buffers.
typedef void (*inplace_fn)(const struct mf_backend_ops *op, struct mf_exec *ex, float *buf,
                           const void *arg, int cpu);

static void run_inplace(const char *what, const float *init, size_t n, inplace_fn fn,
                        const void *arg, double rel) {
    float *c = xmalloc(n * 4);
    memcpy(c, init, n * 4);
    fn(E.co, E.cx, c, arg, 1);
    float *g = gput(init, n * 4);
    fn(E.go, E.gx, g, arg, 0);
    float *gh = gget(g, n);
    cmp_rel(what, c, gh, n, rel);
    free(c), free(gh), gfree(g);
}

struct heads_arg {
    const struct vw *g;
    int n_tok, ts, nh, hs, n;
};

static void heads_fn(const struct mf_backend_ops *op, struct mf_exec *ex, float *buf,
                     const void *arg, int cpu) {
    const struct heads_arg *a = arg;
    op->rmsnorm_heads(ex, buf, buf, a->g ? (cpu ? &a->g->c : &a->g->g) : NULL, a->n_tok,
                      a->ts, a->nh, a->hs, a->n, 1e-6f, 1.0f);
}

// rms_matmul_multi (a layer's input norm with its products): xn and y bit for bit
// against the backend's own rmsnorm then matmul_multi (one token of affine products
// takes the norm inside the row dots), and y against the CPU's rmsnorm then matmul of
// each weight (the reordering bound, on the CPU's normalised x).
static void test_rms_multi(struct tw *const *t, int n, int nt, const struct vw *g) {
    const int64_t N = t[0]->c.n_in;
    const size_t xs = (size_t)(nt * N);
    const struct mf_weight *gg = g ? &g->g : NULL, *gc = g ? &g->c : NULL;
    float *x = frand(xs, -2, 2), *gxb = gput(x, xs * 4), *xnc = fpoison(xs);
    float *gxn = gpoison(xs * 4), *gxs = gpoison(xs * 4);
    float *gy[MF_MATMUL_MULTI], *gs[MF_MATMUL_MULTI];
    const struct mf_weight *wg[MF_MATMUL_MULTI];
    for (int i = 0; i < n; i++) {
        gy[i] = gpoison((size_t)(nt * t[i]->c.n_out) * 4);
        gs[i] = gpoison((size_t)(nt * t[i]->c.n_out) * 4);
        wg[i] = &t[i]->g;
    }
    mf_rms_matmul_multi(E.go, E.gx, n, gy, wg, gxn, gxb, gg, 1e-5f, nt);
    E.go->rmsnorm(E.gx, gxs, gxb, gg, nt, (int)N, 1e-5f, 1.0f);
    mf_matmul_multi(E.go, E.gx, n, gs, wg, gxs, nt);
    E.co->rmsnorm(E.cx, xnc, x, gc, nt, (int)N, 1e-5f, 1.0f);
    float *xng = gget(gxn, xs), *xns = gget(gxs, xs);
    E.n_case++;
    CHECK(memcmp(xng, xns, xs * 4) == 0, "rms_matmul_multi %d products n_tok %d g %s: xn "
          "differs from rmsnorm", n, nt, g ? mf_dtype_name(g->c.dtype) : "none");
    free(xng), free(xns);
    char tag[64];
    snprintf(tag, sizeof tag, " g %s", g ? mf_dtype_name(g->c.dtype) : "none");
    check_products("rms_matmul_multi", tag, "rmsnorm + matmul_multi", t, n, nt, xnc, gy, gs);
    free(x), free(xnc), gfree(gxb), gfree(gxn), gfree(gxs);
}

// matmul_add (an output projection added to the residual stream): bit for bit against
// the backend's own matmul then axpy (one token takes the add in the matvec), and
// against the CPU's (the reordering bound, |y| added to the dot's absolute sum).
static void test_matmul_add(const struct tw *t, int nt) {
    const int64_t N = t->c.n_in, R = t->c.n_out;
    const size_t xs = (size_t)(nt * N), ys = (size_t)(nt * R);
    float *x = frand(xs, -1, 1), *y0 = frand(ys, -3, 3), *yc = xmalloc(ys * 4);
    float *gxb = gput(x, xs * 4), *gy = gput(y0, ys * 4), *gy2 = gput(y0, ys * 4);
    float *gt = gpoison(ys * 4), *gt2 = gpoison(ys * 4), *tc = fpoison(ys);
    mf_matmul_add(E.go, E.gx, gy, &t->g, gxb, nt, gt);
    E.go->matmul(E.gx, gt2, &t->g, gxb, nt);
    E.go->axpy(E.gx, gy2, 1.0f, gt2, (int)ys);
    memcpy(yc, y0, ys * 4);
    mf_matmul_add(E.co, E.cx, yc, &t->c, x, nt, tc);
    float *yg = gget(gy, ys), *yg2 = gget(gy2, ys);
    double *ad = abs_dots(t, x, nt, y0);
    char nm[128], what[200];
    snprintf(what, sizeof what, "matmul_add %s n_tok %d", wname(t, nm, sizeof nm), nt);
    cmp_dot(what, yc, yg, ad, NULL, ys, N);
    E.n_case++;
    CHECK(memcmp(yg, yg2, ys * 4) == 0, "%s: differs from matmul + axpy", what);
    free(x), free(y0), free(yc), free(tc), free(yg), free(yg2), free(ad);
    gfree(gxb), gfree(gy), gfree(gy2), gfree(gt), gfree(gt2);
}

static void test_rms_multis(void) {
    struct tw a, b, c, e, h, k;
    tw_make(&a, MF_DTYPE_U32, MF_DTYPE_BF16, 4, 64, 4096, 2048);   // q_proj-like
    tw_make(&b, MF_DTYPE_U32, MF_DTYPE_F16, 8, 32, 130, 2048);
    tw_make(&c, MF_DTYPE_BF16, MF_DTYPE_F32, 0, 0, 77, 2048);      // float: norm apart
    tw_make(&e, MF_DTYPE_U32, MF_DTYPE_F32, 3, 32, 77, 2048);
    // 2880 columns: the norm over two blocks of a thread's values, a short last step
    tw_make(&h, MF_DTYPE_U32, MF_DTYPE_BF16, 4, 64, 300, 2880);
    tw_make(&k, MF_DTYPE_U32, MF_DTYPE_F32, 6, 64, 40, 2880);
    struct vw g16 = vw_make(MF_DTYPE_BF16, 2048, 0.5f, 1.5f);
    struct vw g32 = vw_make(MF_DTYPE_F32, 2048, 0.5f, 1.5f);
    struct vw g28 = vw_make(MF_DTYPE_F16, 2880, 0.5f, 1.5f);
    struct tw *const q[3] = {&a, &b, &e}, *const f[3] = {&b, &c, &a};
    struct tw *const w[2] = {&h, &k};
    for (int n = 1; n <= 3; n++) {
        test_rms_multi(q, n, 1, &g16);
        test_rms_multi(f, n, 1, &g16);
    }
    test_rms_multi(q, 3, 1, &g32);
    test_rms_multi(q, 3, 1, NULL);
    test_rms_multi(q, 2, 3, &g16);
    test_rms_multi(w, 2, 1, &g28);
    test_rms_multi(w, 1, 1, NULL);
    test_rms_multi(w, 2, 2, &g28);
    const struct tw *const ma[4] = {&a, &c, &e, &h};
    for (int i = 0; i < 4; i++) {
        test_matmul_add(ma[i], 1);
        test_matmul_add(ma[i], i == 0 ? 5 : 2);
    }
    tw_free(&a), tw_free(&b), tw_free(&c), tw_free(&e), tw_free(&h), tw_free(&k);
    vw_free(&g16), vw_free(&g32), vw_free(&g28);
    status_ok("rms_matmul_multi, matmul_add");
}

static void test_norms(void) {
    const int rows = 7, n = 4133;
    const enum mf_dtype dts[] = {MF_DTYPE_F32, MF_DTYPE_BF16, MF_DTYPE_F16};
    float *x = frand((size_t)rows * n, -3, 3), *z = frand((size_t)rows * n, -4, 4);
    float *gx = gput(x, (size_t)rows * n * 4), *gz = gput(z, (size_t)rows * n * 4);
    for (int d = 0; d < 4; d++) {
        struct vw g = vw_make(dts[d < 3 ? d : 0], n, 0.5f, 1.5f);
        const struct mf_weight *gc = d < 3 ? &g.c : NULL, *gg = d < 3 ? &g.g : NULL;
        float *yc = fpoison((size_t)rows * n), *gy = gpoison((size_t)rows * n * 4);
        E.co->rmsnorm(E.cx, yc, x, gc, rows, n, 1e-5f, 1.7f);
        E.go->rmsnorm(E.gx, gy, gx, gg, rows, n, 1e-5f, 1.7f);
        float *yg = gget(gy, (size_t)rows * n);
        char what[96];
        snprintf(what, sizeof what, "rmsnorm g %s", d < 3 ? mf_dtype_name(dts[d]) : "none");
        cmp_rel(what, yc, yg, (size_t)rows * n, RTOL);
        free(yg);
        // gated; then y aliasing x (on a copy)
        E.co->rmsnorm_gated(E.cx, yc, x, z, gc, rows, n, 1e-6f);
        E.go->rmsnorm_gated(E.gx, gy, gx, gz, gg, rows, n, 1e-6f);
        yg = gget(gy, (size_t)rows * n);
        snprintf(what, sizeof what, "rmsnorm_gated g %s", d < 3 ? mf_dtype_name(dts[d]) : "none");
        cmp_rel(what, yc, yg, (size_t)rows * n, RTOL);
        free(yg);
        E.co->rmsnorm(E.cx, yc, x, gc, rows, n, 1e-5f, 1.0f);
        E.go->copy(E.gx, gy, 0, gx, 0, (size_t)rows * n * 4);
        E.go->rmsnorm(E.gx, gy, gy, gg, rows, n, 1e-5f, 1.0f);
        yg = gget(gy, (size_t)rows * n);
        cmp_rel("rmsnorm y aliasing x", yc, yg, (size_t)rows * n, RTOL);
        free(yg), free(yc), gfree(gy), vw_free(&g);
    }
    // The residual add and the norm in one op: x and y against the CPU's axpy +
    // rmsnorm, and bit for bit against the backend's own axpy + rmsnorm.
    for (int d = 0; d < 2; d++) {
        struct vw g = vw_make(MF_DTYPE_BF16, n, 0.5f, 1.5f);
        const struct mf_weight *gc = d ? &g.c : NULL, *gg = d ? &g.g : NULL;
        const size_t rn = (size_t)rows * n;
        float *xc = xmalloc(rn * 4), *yc = fpoison(rn), *gy = gpoison(rn * 4);
        float *gy2 = gpoison(rn * 4), *gx1 = gput(x, rn * 4), *gx2 = gput(x, rn * 4);
        memcpy(xc, x, rn * 4);
        mf_add_rmsnorm(E.co, E.cx, yc, xc, z, gc, rows, n, 1e-6f);
        mf_add_rmsnorm(E.go, E.gx, gy, gx1, gz, gg, rows, n, 1e-6f);
        E.go->axpy(E.gx, gx2, 1.0f, gz, rows * n);
        E.go->rmsnorm(E.gx, gy2, gx2, gg, rows, n, 1e-6f, 1.0f);
        float *yg = gget(gy, rn), *xg = gget(gx1, rn);
        float *yg2 = gget(gy2, rn), *xg2 = gget(gx2, rn);
        cmp_rel("add_rmsnorm x", xc, xg, rn, RTOL);
        cmp_rel("add_rmsnorm y", yc, yg, rn, RTOL);
        E.n_case++;
        CHECK(memcmp(yg, yg2, rn * 4) == 0 && memcmp(xg, xg2, rn * 4) == 0,
              "add_rmsnorm (g %s): differs from axpy + rmsnorm", d ? "bf16" : "none");
        free(xc), free(yc), free(yg), free(xg), free(yg2), free(xg2);
        gfree(gy), gfree(gy2), gfree(gx1), gfree(gx2), vw_free(&g);
    }
    // Heads inside tokens: 4 heads of 128 at stride 130 in rows of 590, in place.
    struct vw g = vw_make(MF_DTYPE_BF16, 128, 0.5f, 1.5f);
    const int ts = 4 * 130 + 70;
    float *buf = frand((size_t)5 * ts, -2, 2);
    struct heads_arg a = {&g, 5, ts, 4, 130, 128};
    run_inplace("rmsnorm_heads", buf, (size_t)5 * ts, heads_fn, &a, RTOL);
    a.g = NULL;
    run_inplace("rmsnorm_heads no g", buf, (size_t)5 * ts, heads_fn, &a, RTOL);
    free(buf), vw_free(&g), free(x), free(z), gfree(gx), gfree(gz);
    status_ok("norms");
}

struct rope_arg {
    const float *inv_c, *inv_g;
    int n_tok, nh, ts, hs, n_rot, pos0, trad;
    float mscale;
};

static void rope_fn(const struct mf_backend_ops *op, struct mf_exec *ex, float *buf,
                    const void *arg, int cpu) {
    const struct rope_arg *a = arg;
    op->rope(ex, buf, a->n_tok, a->nh, a->ts, a->hs, a->n_rot, cpu ? a->inv_c : a->inv_g,
             a->pos0, a->trad, a->mscale);
}

static void test_rope(void) {
    const int n_rot = 48, nh = 6, hs = 70, ts = nh * hs + 9, n_tok = 5;
    float inv[24];
    for (int i = 0; i < 24; i++)
        inv[i] = powf(10000.0f, -2.0f * (float)i / (float)n_rot);
    float *ginv = gput(inv, sizeof inv), *buf = frand((size_t)n_tok * ts, -2, 2);
    for (int v = 0; v < 4; v++) {
        struct rope_arg a = {inv, ginv, n_tok, nh, ts, hs, n_rot, v & 1 ? 1000 : 0, v >> 1,
                             v & 1 ? 1.3f : 1.0f};
        char what[64];
        snprintf(what, sizeof what, "rope traditional %d pos0 %d", a.trad, a.pos0);
        run_inplace(what, buf, (size_t)n_tok * ts, rope_fn, &a, RTOL);
    }
    free(buf), gfree(ginv);
    status_ok("rope");
}

// rope_qk: q [n_tok, hq heads at stride hs] and k [n_tok, hk heads] of head_dim d
// (rows ts apart), norms (bf16 weights) on the tensors of mask `norms` (bit 0 q, bit
// 1 k): the fused call against the CPU's (its fallback: rmsnorm + rope), and bit for
// bit against the device's own rmsnorm / rmsnorm_heads and rope launches.
struct rqk_case {
    int n_tok, hq, hk, hs, d, n_rot, norms, trad;
    float mscale;
};

static void rqk_run(const struct mf_backend_ops *op, struct mf_exec *ex, float *q, float *k,
                    const struct rqk_case *c, const struct mf_weight *gq,
                    const struct mf_weight *gk, const float *inv, int fused) {
    const int ts[2] = {c->hq * c->hs + 3, c->hk * c->hs + 1};
    struct mf_rope_qk r = {.x = {q, k}, .heads = {c->hq, c->hk}, .tok_stride = {ts[0], ts[1]},
                           .head_stride = {c->hs, c->hs},
                           .norm = {c->norms & 1 ? gq : NULL, c->norms & 2 ? gk : NULL},
                           .n_tok = c->n_tok, .head_dim = c->d, .n_rot = c->n_rot,
                           .pos0 = 77, .traditional = c->trad, .eps = 1e-6f,
                           .mscale = c->mscale, .inv_freq = inv};
    if (fused) {
        mf_rope_qk(op, ex, &r);
        return;
    }
    for (int i = 0; i < 2; i++)
        if (r.norm[i])
            op->rmsnorm_heads(ex, r.x[i], r.x[i], r.norm[i], c->n_tok, ts[i], r.heads[i],
                              c->hs, c->d, 1e-6f, 1.0f);
    for (int i = 0; i < 2; i++)
        op->rope(ex, r.x[i], c->n_tok, r.heads[i], ts[i], c->hs, c->n_rot, inv, 77, c->trad,
                 c->mscale);
}

static void test_rope_qk_case(const struct rqk_case *c) {
    const size_t nq = (size_t)c->n_tok * (c->hq * c->hs + 3);
    const size_t nk = (size_t)c->n_tok * (c->hk * c->hs + 1);
    float *inv = xmalloc((size_t)(c->n_rot / 2 + 1) * 4);
    for (int i = 0; i < c->n_rot / 2; i++)
        inv[i] = powf(10000.0f, -2.0f * (float)i / (float)c->n_rot);
    float *ginv = gput(inv, (size_t)(c->n_rot / 2 + 1) * 4);
    struct vw gq = vw_make(MF_DTYPE_BF16, c->d, 0.5f, 1.5f);
    struct vw gk = vw_make(MF_DTYPE_F32, c->d, 0.5f, 1.5f);
    float *q = frand(nq, -2, 2), *k = frand(nk, -2, 2);
    float *qc = xmalloc(nq * 4), *kc = xmalloc(nk * 4);
    memcpy(qc, q, nq * 4), memcpy(kc, k, nk * 4);
    rqk_run(E.co, E.cx, qc, kc, c, &gq.c, &gk.c, inv, 1);
    float *q1 = gput(q, nq * 4), *k1 = gput(k, nk * 4), *q2 = gput(q, nq * 4);
    float *k2 = gput(k, nk * 4);
    rqk_run(E.go, E.gx, q1, k1, c, &gq.g, &gk.g, ginv, 1);
    rqk_run(E.go, E.gx, q2, k2, c, &gq.g, &gk.g, ginv, 0);
    float *hq1 = gget(q1, nq), *hk1 = gget(k1, nk), *hq2 = gget(q2, nq), *hk2 = gget(k2, nk);
    char what[160];
    snprintf(what, sizeof what, "rope_qk q %dx%d k %dx%d (head stride %d) n_rot %d norms %d "
             "traditional %d", c->hq, c->d, c->hk, c->d, c->hs, c->n_rot, c->norms, c->trad);
    cmp_rel(what, qc, hq1, nq, RTOL);
    cmp_rel(what, kc, hk1, nk, RTOL);
    E.n_case++;
    CHECK(memcmp(hq1, hq2, nq * 4) == 0 && memcmp(hk1, hk2, nk * 4) == 0,
          "%s: differs from the separate rmsnorm and rope calls", what);
    free(inv), free(q), free(k), free(qc), free(kc), free(hq1), free(hk1), free(hq2);
    free(hk2), gfree(ginv), gfree(q1), gfree(k1), gfree(q2), gfree(k2);
    vw_free(&gq), vw_free(&gk);
}

static void test_rope_qk(void) {
    static const struct rqk_case cs[] = {
        {3, 8, 2, 128, 128, 128, 3, 0, 1.0f},   // qwen3-style q/k norms, dense heads
        {2, 6, 2, 128, 128, 64, 3, 0, 1.0f},    // partial rotary
        {1, 5, 1, 64, 64, 64, 1, 1, 1.3f},      // q norm only, traditional, mscale
        {4, 4, 4, 96, 64, 64, 0, 1, 1.0f},      // no norms; heads inside wider rows
        {2, 3, 2, 70, 64, 32, 2, 0, 1.0f},      // k norm on strided heads
        {2, 2, 1, 1040, 1040, 64, 3, 0, 1.0f},  // longer than MF_ROPE_QK_NORM_MAX: split
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        test_rope_qk_case(&cs[i]);
    status_ok("rope_qk");
}

/* ==== Attention ==== */

// The attention again on the exec made with MOEFLUX_GPU_ATTN_TILE=0,
// MOEFLUX_GPU_FUSE=0 and MOEFLUX_GPU_ATTN_BLOCK=64, whose query blocks of 64 take
// mf_attn_part then mf_attn_comb: the same bits as mf_attn_tile's (a prefill's blocks,
// as large as their scratch allows on E.gx) or mf_attn_part1's (og) are required.
static void check_untiled(const char *what, const float *og, const float *gq,
                          const float *gk, const float *gv, int nt, int nh, int nkv, int dk,
                          int dv, int ks, int vs, int pos0, float scale,
                          const struct mf_attn_ext *ext) {
    if (!E.gx_untiled)
        return;
    const size_t n = (size_t)nt * nh * dv;
    float *go = gpoison(n * 4), *oh = xmalloc(n * 4);
    E.go->sync(E.gx);   // the inputs and the poison are in place
    E.go->attention_ext(E.gx_untiled, go, gq, gk, gv, nt, nh, nkv, dk, dv, ks, vs, pos0,
                        scale, ext);
    E.go->download(E.gx_untiled, oh, go, 0, n * 4);
    char err[512] = "";
    const int rc = E.go->status(E.gx_untiled, err, sizeof err);
    CHECK(rc == MF_OK, "%s untiled: %s", what, err);
    CHECK(memcmp(og, oh, n * 4) == 0, "%s: differs from mf_attn_part + mf_attn_comb",
          what);
    E.n_case++;
    free(oh), gfree(go);
}

static void test_attention_case(int nt, int nh, int nkv, int dk, int dv, int pos0) {
    const int P = pos0 + nt, ks = nkv * dk + 16, vs = nkv * dv + 8;
    float *q = frand((size_t)nt * nh * dk, -1, 1), *k = frand((size_t)P * ks, -1, 1);
    float *v = frand((size_t)P * vs, -1, 1), *oc = fpoison((size_t)nt * nh * dv);
    const float scale = 1.0f / sqrtf((float)dk);
    E.co->attention(E.cx, oc, q, k, v, nt, nh, nkv, dk, dv, ks, vs, pos0, scale);
    float *gq = gput(q, (size_t)nt * nh * dk * 4), *gk = gput(k, (size_t)P * ks * 4);
    float *gv = gput(v, (size_t)P * vs * 4), *go = gpoison((size_t)nt * nh * dv * 4);
    E.go->attention(E.gx, go, gq, gk, gv, nt, nh, nkv, dk, dv, ks, vs, pos0, scale);
    float *og = gget(go, (size_t)nt * nh * dv);
    char what[128];
    snprintf(what, sizeof what, "attention n_tok %d heads %d/%d dk %d dv %d pos0 %d", nt, nh,
             nkv, dk, dv, pos0);
    cmp_rel(what, oc, og, (size_t)nt * nh * dv, RTOL_LONG);
    check_untiled(what, og, gq, gk, gv, nt, nh, nkv, dk, dv, ks, vs, pos0, scale, NULL);
    free(q), free(k), free(v), free(oc), free(og);
    gfree(gq), gfree(gk), gfree(gv), gfree(go);
}

// attention_ext (gpt-oss): a sliding window over a ring cache of `ring` rows (0: a
// plain cache of pos0 + nt rows) and per-head sinks of dtype sdt (MF_DTYPE_U32: none).
// With every extension off it must give attention's bits on the device.
static void test_attention_ext_case(int nt, int nh, int nkv, int d, int pos0, int window,
                                    int ring, enum mf_dtype sdt) {
    const int rows = ring > 0 ? ring : pos0 + nt, kvd = nkv * d;
    float *q = frand((size_t)nt * nh * d, -1, 1), *k = frand((size_t)rows * kvd, -1, 1);
    float *v = frand((size_t)rows * kvd, -1, 1), *oc = fpoison((size_t)nt * nh * d);
    const float scale = 1.0f / sqrtf((float)d);
    void *sk = sdt == MF_DTYPE_U32 ? NULL : encode(sdt, (size_t)nh, -2.0f, 3.0f);
    struct mf_weight sw = {.w = sk, .dtype = sdt, .n_out = nh, .n_in = 1};
    struct mf_attn_ext ext = {.sinks = sk ? &sw : NULL, .window = window, .ring = ring};
    E.co->attention_ext(E.cx, oc, q, k, v, nt, nh, nkv, d, d, kvd, kvd, pos0, scale, &ext);
    float *gq = gput(q, (size_t)nt * nh * d * 4), *gk = gput(k, (size_t)rows * kvd * 4);
    float *gv = gput(v, (size_t)rows * kvd * 4), *go = gpoison((size_t)nt * nh * d * 4);
    void *gs = sk ? gput(sk, (size_t)nh * mf_dtype_size(sdt)) : NULL;
    struct mf_weight gw = sw;
    gw.w = gs;
    ext.sinks = sk ? &gw : NULL;
    E.go->attention_ext(E.gx, go, gq, gk, gv, nt, nh, nkv, d, d, kvd, kvd, pos0, scale, &ext);
    float *og = gget(go, (size_t)nt * nh * d);
    char what[256];
    snprintf(what, sizeof what, "attention_ext n_tok %d heads %d/%d d %d pos0 %d window %d "
             "ring %d sinks %s", nt, nh, nkv, d, pos0, window, ring,
             sk ? mf_dtype_name(sdt) : "none");
    cmp_rel(what, oc, og, (size_t)nt * nh * d, RTOL_LONG);
    check_untiled(what, og, gq, gk, gv, nt, nh, nkv, d, d, kvd, kvd, pos0, scale, &ext);
    if (!sk && window == 0 && ring == 0) {
        float *go2 = gpoison((size_t)nt * nh * d * 4);
        E.go->attention(E.gx, go2, gq, gk, gv, nt, nh, nkv, d, d, kvd, kvd, pos0, scale);
        float *og2 = gget(go2, (size_t)nt * nh * d);
        CHECK(memcmp(og, og2, (size_t)nt * nh * d * 4) == 0,
              "%s: differs from attention", what);
        free(og2), gfree(go2);
    }
    free(q), free(k), free(v), free(oc), free(og), free(sk);
    gfree(gq), gfree(gk), gfree(gv), gfree(go);
    if (gs)
        gfree(gs);
}

static void test_attention_ext(void) {
    if (!E.go->attention_ext)
        return;
    test_attention_ext_case(3, 8, 2, 64, 500, 0, 0, MF_DTYPE_U32);      // = attention
    test_attention_ext_case(1, 8, 2, 64, 500, 0, 0, MF_DTYPE_BF16);     // sinks only
    test_attention_ext_case(1, 8, 2, 64, 3000, 128, 131, MF_DTYPE_F32); // decode, wrapped
    test_attention_ext_case(17, 4, 4, 64, 250, 128, 144, MF_DTYPE_BF16);  // chunk in a ring
    test_attention_ext_case(40, 4, 1, 64, 0, 16, 0, MF_DTYPE_F16);     // window, no ring
    test_attention_ext_case(130, 4, 2, 64, 250, 128, 260, MF_DTYPE_F32); // blocks in a ring
    test_attention_ext_case(5, 4, 2, 64, 90, 0, 128, MF_DTYPE_U32);    // ring, full view
    status_ok("attention_ext");
}

static void test_attention(void) {
    test_attention_case(1, 8, 2, 128, 128, 3000);
    test_attention_case(19, 8, 2, 64, 96, 300);
    test_attention_case(70, 4, 4, 128, 128, 0);
    test_attention_case(200, 8, 2, 64, 64, 700);    // 64-query blocks at an offset
    test_attention_case(33, 16, 2, 256, 256, 290);  // head dim 256: 8-row tiles
    test_attention_case(21, 6, 6, 80, 64, 3);       // one head per kv head, dk 80
    test_attention_case(2, 16, 1, 576, 512, 700);   // MLA latent shape
    test_attention_case(1, 6, 3, 80, 80, 40000);    // long context: 157 splits
    test_attention_case(1, 32, 4, 128, 128, 200);   // decode: 64-key splits, 4
    test_attention_case(4, 8, 2, 128, 128, 2045);   // 128-key splits from 2049 keys on
    status_ok("attention");
}

/* ==== GatedDeltaNet ==== */

static void test_conv(int nt, enum mf_dtype wdt, int from) {
    const int C = 1000, K = 4;
    float *u = frand((size_t)nt * C, -2, 2), *st = frand((size_t)(K - 1) * C, -2, 2);
    struct vw w = vw_make(wdt, C * K, -0.5f, 0.5f);
    w.c.n_out = w.g.n_out = C;
    w.c.n_in = w.g.n_in = K;
    float *yc = fpoison((size_t)nt * C), *sc = xmalloc((size_t)(K - 1) * C * 4);
    float *sc_out = from ? fpoison((size_t)(K - 1) * C) : sc;
    memcpy(sc, st, (size_t)(K - 1) * C * 4);
    E.co->conv1d_silu_from(E.cx, yc, sc_out, sc, u, &w.c, nt, C, K);
    float *gu = gput(u, (size_t)nt * C * 4), *gs = gput(st, (size_t)(K - 1) * C * 4);
    float *gso = from ? gpoison((size_t)(K - 1) * C * 4) : gs, *gy = gpoison((size_t)nt * C * 4);
    if (from)
        E.go->conv1d_silu_from(E.gx, gy, gso, gs, gu, &w.g, nt, C, K);
    else
        E.go->conv1d_silu(E.gx, gy, gs, gu, &w.g, nt, C, K);
    float *yg = gget(gy, (size_t)nt * C), *sg = gget(gso, (size_t)(K - 1) * C);
    char what[96];
    snprintf(what, sizeof what, "conv1d_silu%s n_tok %d w %s", from ? "_from" : "", nt,
             mf_dtype_name(wdt));
    cmp_rel(what, yc, yg, (size_t)nt * C, RTOL);
    cmp_rel("conv1d_silu state", sc_out, sg, (size_t)(K - 1) * C, 0.0);
    if (from) {
        float *sin_g = gget(gs, (size_t)(K - 1) * C);
        cmp_rel("conv1d_silu_from state_in untouched", st, sin_g, (size_t)(K - 1) * C, 0.0);
        free(sin_g), free(sc_out), gfree(gso);
    }
    free(u), free(st), free(yc), free(sc), free(yg), free(sg);
    gfree(gu), gfree(gs), gfree(gy), vw_free(&w);
}

static void test_gates(void) {
    const int nt = 5, nv = 32, abs_ = 70;
    float *a = frand((size_t)nt * abs_, -4, 4), *b = frand((size_t)nt * abs_, -4, 4);
    struct vw al = vw_make(MF_DTYPE_F32, nv, -1, 1), dt = vw_make(MF_DTYPE_BF16, nv, -1, 1);
    float *gc = fpoison((size_t)nt * nv), *bc = fpoison((size_t)nt * nv);
    E.co->gdn_gates(E.cx, gc, bc, a, b, abs_, &al.c, &dt.c, nt, nv);
    float *ga = gput(a, (size_t)nt * abs_ * 4), *gb = gput(b, (size_t)nt * abs_ * 4);
    float *gg = gpoison((size_t)nt * nv * 4), *gbeta = gpoison((size_t)nt * nv * 4);
    E.go->gdn_gates(E.gx, gg, gbeta, ga, gb, abs_, &al.g, &dt.g, nt, nv);
    float *g1 = gget(gg, (size_t)nt * nv), *b1 = gget(gbeta, (size_t)nt * nv);
    cmp_rel("gdn_gates g", gc, g1, (size_t)nt * nv, RTOL);
    cmp_rel("gdn_gates beta", bc, b1, (size_t)nt * nv, RTOL);
    free(a), free(b), free(gc), free(bc), free(g1), free(b1);
    gfree(ga), gfree(gb), gfree(gg), gfree(gbeta), vw_free(&al), vw_free(&dt);
}

// q and k heads of unit length (the caller normalises them), q scaled by 1/sqrt(dk).
static float *gdn_qkv(int nt, int nk, int nv, int dk, int dv, int stride) {
    float *x = frand((size_t)nt * stride, -1, 1);
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < 2 * nk; h++) {
            float *p = x + (size_t)t * stride + (size_t)h * dk, ss = 0;
            for (int i = 0; i < dk; i++)
                ss += p[i] * p[i];
            float f = 1.0f / sqrtf(ss) * (h < nk ? 1.0f / sqrtf((float)dk) : 1.0f);
            for (int i = 0; i < dk; i++)
                p[i] *= f;
        }
    (void)nv, (void)dv;
    return x;
}

static void test_gdn_case(int nt, int from) {
    const int nk = 4, nv = 8, dk = 128, dv = 96, stride = 2 * nk * dk + nv * dv + 13;
    const size_t ns = (size_t)nv * dv * dk, no = (size_t)(nt > 0 ? nt : 1) * nv * dv;
    float *qkv = gdn_qkv(nt > 0 ? nt : 1, nk, nv, dk, dv, stride);
    float *g = frand((size_t)(nt > 0 ? nt : 1) * nv, 0.5f, 1.0f);
    float *beta = frand((size_t)(nt > 0 ? nt : 1) * nv, 0.0f, 1.0f);
    float *S0 = frand(ns, -0.5f, 0.5f), *Sc = xmalloc(ns * 4), *oc = fpoison(no);
    float *Sc_out = from ? fpoison(ns) : Sc;
    memcpy(Sc, S0, ns * 4);
    const float *q = qkv, *k = qkv + nk * dk, *v = qkv + 2 * nk * dk;
    E.co->gdn_recurrence_from(E.cx, oc, Sc_out, Sc, q, k, v, stride, g, beta, nt, nk, nv, dk,
                              dv);
    size_t nq = (size_t)(nt > 0 ? nt : 1) * stride;
    float *gq = gput(qkv, nq * 4), *gS = gput(S0, ns * 4);
    float *gSo = from ? gpoison(ns * 4) : gS, *go = gpoison(no * 4);
    float *gg = gput(g, (size_t)(nt > 0 ? nt : 1) * nv * 4);
    float *gb = gput(beta, (size_t)(nt > 0 ? nt : 1) * nv * 4);
    if (from)
        E.go->gdn_recurrence_from(E.gx, go, gSo, gS, gq, gq + nk * dk, gq + 2 * nk * dk, stride,
                                  gg, gb, nt, nk, nv, dk, dv);
    else
        E.go->gdn_recurrence(E.gx, go, gS, gq, gq + nk * dk, gq + 2 * nk * dk, stride, gg, gb,
                             nt, nk, nv, dk, dv);
    float *Sg = gget(gSo, ns);
    char what[96];
    snprintf(what, sizeof what, "gdn_recurrence%s n_tok %d state", from ? "_from" : "", nt);
    cmp_rel(what, Sc_out, Sg, ns, RTOL_LONG);
    if (nt > 0) {
        float *og = gget(go, no);
        snprintf(what, sizeof what, "gdn_recurrence%s n_tok %d output", from ? "_from" : "", nt);
        cmp_rel(what, oc, og, no, RTOL_LONG);
        free(og);
    }
    if (from)
        free(Sc_out), gfree(gSo);
    free(qkv), free(g), free(beta), free(S0), free(Sc), free(oc), free(Sg);
    gfree(gq), gfree(gS), gfree(go), gfree(gg), gfree(gb);
}

static void test_gdn(void) {
    for (int i = 0; i < 3; i++) {
        const int nts[] = {1, 2, 9};
        test_conv(nts[i], i == 1 ? MF_DTYPE_BF16 : MF_DTYPE_F32, 0);
        test_conv(nts[i], MF_DTYPE_F32, 1);
    }
    test_gates();
    test_gdn_case(1, 0);
    test_gdn_case(40, 0);
    test_gdn_case(40, 1);
    test_gdn_case(0, 1);
    status_ok("gdn");
}

/* ==== Elementwise and rows ==== */

static void test_elementwise(void) {
    const int R = 7, C = 1000;
    float *gu = frand((size_t)R * 2 * C, -4, 4), *yc = fpoison((size_t)R * C);
    E.co->swiglu(E.cx, yc, gu, gu + C, R, C, 2 * C);
    float *ggu = gput(gu, (size_t)R * 2 * C * 4), *gy = gpoison((size_t)R * C * 4);
    E.go->swiglu(E.gx, gy, ggu, ggu + C, R, C, 2 * C);
    float *yg = gget(gy, (size_t)R * C);
    cmp_rel("swiglu strided", yc, yg, (size_t)R * C, RTOL);
    free(yg);
    for (int v = 0; v < 2; v++) {   // one gate per row, then one per element
        int gcols = v ? C : 1, gstride = v ? C + 5 : 3;
        float *y0 = frand((size_t)R * C, -2, 2), *g = frand((size_t)R * (C + 5), -4, 4);
        float *gg = gput(g, (size_t)R * (C + 5) * 4), *gy0 = gput(y0, (size_t)R * C * 4);
        E.co->mul_sigmoid(E.cx, y0, g, R, C, gstride, gcols);
        E.go->mul_sigmoid(E.gx, gy0, gg, R, C, gstride, gcols);
        float *r = gget(gy0, (size_t)R * C);
        cmp_rel(v ? "mul_sigmoid per element" : "mul_sigmoid per row", y0, r, (size_t)R * C, RTOL);
        free(y0), free(g), free(r), gfree(gg), gfree(gy0);
    }
    const int n = 100003;
    float *ay = frand(n, -1, 1), *ax = frand(n, -1, 1);
    float *gay = gput(ay, (size_t)n * 4), *gax = gput(ax, (size_t)n * 4);
    E.co->axpy(E.cx, ay, -0.7f, ax, n);
    E.go->axpy(E.gx, gay, -0.7f, gax, n);
    float *r = gget(gay, n);
    cmp_rel("axpy", ay, r, n, RTOL);
    free(ay), free(ax), free(r), gfree(gay), gfree(gax), free(gu), free(yc), gfree(ggu), gfree(gy);
    status_ok("elementwise");
}

// scatter_add_rows over more rows than one GPU launch takes (gpu_args.h
// MF_SCATTER_PART, 16384): the parts must add in order, each destination's sources too.
static void test_scatter_parts(void) {
    const int nd = 37, ns = 40000, n = 5;
    int32_t *idx = xmalloc((size_t)ns * sizeof *idx);
    for (int i = 0; i < ns; i++)
        idx[i] = (int32_t)(check_rand(&E.rng) % nd);
    float *w = frand((size_t)ns, -1, 1), *src = frand((size_t)ns * n, -1, 1);
    float *gsrc = gput(src, (size_t)ns * n * 4);
    float *dst = frand((size_t)nd * n, -1, 1), *gdst = gput(dst, (size_t)nd * n * 4);
    E.co->scatter_add_rows(E.cx, dst, src, idx, w, ns, n);
    E.go->scatter_add_rows(E.gx, gdst, gsrc, idx, w, ns, n);
    float *r = gget(gdst, (size_t)nd * n);
    cmp_rel("scatter_add_rows in parts", dst, r, (size_t)nd * n, RTOL);
    free(r), free(dst), free(src), free(w), free(idx), gfree(gdst), gfree(gsrc);
}

static void test_rows(void) {
    const int nd = 10, ns = 23, n = 777;
    int32_t idx[23];
    for (int i = 0; i < ns; i++)
        idx[i] = (int32_t)(check_rand(&E.rng) % nd);   // repeats
    float w[23];
    for (int i = 0; i < ns; i++)
        w[i] = urand(-1, 1);
    float *src = frand((size_t)ns * n, -1, 1), *gsrc = gput(src, (size_t)ns * n * 4);
    for (int v = 0; v < 2; v++) {
        float *dst = frand((size_t)nd * n, -1, 1), *gdst = gput(dst, (size_t)nd * n * 4);
        E.co->scatter_add_rows(E.cx, dst, src, idx, v ? w : NULL, ns, n);
        E.go->scatter_add_rows(E.gx, gdst, gsrc, idx, v ? w : NULL, ns, n);
        float *r = gget(gdst, (size_t)nd * n);
        cmp_rel(v ? "scatter_add_rows weighted" : "scatter_add_rows", dst, r, (size_t)nd * n, RTOL);
        free(dst), free(r), gfree(gdst);
    }
    test_scatter_parts();
    float *dc = fpoison((size_t)ns * n), *gd = gpoison((size_t)ns * n * 4);
    int32_t gidx[23];
    for (int i = 0; i < ns; i++)
        gidx[i] = (int32_t)(check_rand(&E.rng) % ns);
    E.co->gather_rows(E.cx, dc, src, gidx, ns, n);
    E.go->gather_rows(E.gx, gd, gsrc, gidx, ns, n);
    float *r = gget(gd, (size_t)ns * n);
    cmp_rel("gather_rows", dc, r, (size_t)ns * n, 0.0);
    free(r);
    int32_t *didx = gput(gidx, sizeof gidx);
    float *gd2 = gpoison((size_t)ns * n * 4);
    E.go->gather_rows_dev(E.gx, gd2, gsrc, didx, ns, n);
    r = gget(gd2, (size_t)ns * n);
    cmp_rel("gather_rows_dev", dc, r, (size_t)ns * n, 0.0);
    free(r), free(dc), free(src), gfree(gd), gfree(gd2), gfree(didx), gfree(gsrc);
    status_ok("rows");
}

static void test_flag(void) {
    const int64_t n = 1000003;
    float *x = frand((size_t)n, -1, 1);
    float *gxp = gput(x, (size_t)n * 4);
    int32_t init = 0, five = 5, got = -1;
    int32_t *flag = gput(&init, 4);
    E.go->flag_nonfinite(E.gx, flag, gxp, n);
    E.go->download(E.gx, &got, flag, 0, 4);
    CHECK(got == 0, "flag_nonfinite on finite data: %d", got);
    E.go->upload(E.gx, flag, 0, &five, 4);
    E.go->flag_nonfinite(E.gx, flag, gxp, n);
    E.go->download(E.gx, &got, flag, 0, 4);
    CHECK(got == 5, "flag_nonfinite leaves the flag alone: %d", got);
    const float bad[2] = {INFINITY, NAN};
    for (int i = 0; i < 2; i++) {
        E.go->upload(E.gx, flag, 0, &init, 4);
        E.go->upload(E.gx, gxp, 0, x, (size_t)n * 4);
        E.go->upload(E.gx, gxp, (size_t)(n - 1 - i * 500000) * 4, &bad[i], 4);
        E.go->flag_nonfinite(E.gx, flag, gxp, n);
        E.go->download(E.gx, &got, flag, 0, 4);
        CHECK(got == 1, "flag_nonfinite finds %s: %d", i ? "NaN" : "inf", got);
    }
    free(x), gfree(gxp), gfree(flag);
    status_ok("flag_nonfinite");
}

// axpy_flag: bit for bit the device's axpy, and flag_nonfinite's flag (set on an inf
// made by the sum itself, left alone on finite sums).
static void test_axpy_flag(void) {
    const int n = 300007;
    float *y = frand((size_t)n, -1, 1), *x = frand((size_t)n, -1, 1);
    float *gy1 = gput(y, (size_t)n * 4), *gy2 = gput(y, (size_t)n * 4);
    float *gxp = gput(x, (size_t)n * 4);
    int32_t five = 5, zero = 0, got = -1;
    int32_t *flag = gput(&five, 4);
    mf_axpy_flag(E.go, E.gx, gy1, 0.75f, gxp, n, flag);
    E.go->axpy(E.gx, gy2, 0.75f, gxp, n);
    float *h1 = gget(gy1, (size_t)n), *h2 = gget(gy2, (size_t)n);
    E.go->download(E.gx, &got, flag, 0, 4);
    E.n_case++;
    CHECK(memcmp(h1, h2, (size_t)n * 4) == 0, "axpy_flag: differs from axpy");
    CHECK(got == 5, "axpy_flag on finite sums changed the flag: %d", got);
    const float big = 3e38f;   // finite, but big + big overflows
    E.go->upload(E.gx, flag, 0, &zero, 4);
    E.go->upload(E.gx, gy1, (size_t)(n - 2) * 4, &big, 4);
    E.go->upload(E.gx, gxp, (size_t)(n - 2) * 4, &big, 4);
    mf_axpy_flag(E.go, E.gx, gy1, 1.0f, gxp, n, flag);
    E.go->download(E.gx, &got, flag, 0, 4);
    CHECK(got == 1, "axpy_flag misses a sum that overflowed: %d", got);
    free(y), free(x), free(h1), free(h2), gfree(gy1), gfree(gy2), gfree(gxp), gfree(flag);
    status_ok("axpy_flag");
}

/* ==== Routing ==== */

// Selection values the CPU's choice was made on (its scores, plus bias and the group
// mask for noaux_tc, recomputed in its f32 order): is the choice of token t a near-tie
// (a chosen value within 1e-5 relative of the next one, or of the best unchosen; for
// groups, the kept groups' last score within 1e-5 of the next)?
static int near_tie(const struct mf_route_params *p, const float *score, const float *bias,
                    const int32_t *idx) {
    const int E_ = p->n_expert, K = p->n_used;
    float *v = xmalloc((size_t)E_ * 4), mx = 0;
    int tie = 0;
    for (int e = 0; e < E_; e++)
        v[e] = score[e] + (p->kind == MF_ROUTE_NOAUX_TC && bias ? bias[e] : 0.0f);
    if (p->kind == MF_ROUTE_NOAUX_TC && p->n_group > 1) {
        int G = p->n_group, per = E_ / G;
        float gs[256];
        for (int g = 0; g < G; g++) {
            float a = -INFINITY, b = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                if (v[e] > a) {
                    b = a;
                    a = v[e];
                } else if (v[e] > b) {
                    b = v[e];
                }
            }
            gs[g] = a + b;
        }
        // the topk_group-th best and the next
        float kth = INFINITY, next = -INFINITY;
        for (int g = 0; g < G; g++) {
            int above = 0;
            for (int h = 0; h < G; h++)
                above += gs[h] > gs[g] || (gs[h] == gs[g] && h < g);
            if (above < p->topk_group)
                kth = gs[g] < kth ? gs[g] : kth;
            else
                next = gs[g] > next ? gs[g] : next;
        }
        tie |= kth - next < 1e-5f * fabsf(kth);
        for (int g = 0; g < G; g++) {
            int above = 0;
            for (int h = 0; h < G; h++)
                above += gs[h] > gs[g] || (gs[h] == gs[g] && h < g);
            if (above >= p->topk_group)
                for (int e = g * per; e < (g + 1) * per; e++)
                    v[e] = 0.0f;
        }
    }
    for (int e = 0; e < E_; e++)
        mx = fabsf(v[e]) > mx ? fabsf(v[e]) : mx;
    float best_out = -INFINITY;
    for (int e = 0; e < E_; e++) {
        int chosen = 0;
        for (int j = 0; j < K; j++)
            chosen |= idx[j] == e;
        if (!chosen)
            best_out = v[e] > best_out ? v[e] : best_out;
    }
    for (int j = 0; j < K; j++) {
        float nxt = j + 1 < K ? v[idx[j + 1]] : best_out;
        tie |= v[idx[j]] - nxt < 1e-5f * mx;
    }
    free(v);
    return tie;
}

// The scores' bound against the CPU, relative to the largest. A softmax divides by a
// sum of E positive exps that the CPU adds in index order and the device in 32
// lane-strided partial sums and a butterfly: each sum is within (E - 1) u of the exact
// one (u = 2^-24), so the two may differ by 2 (E - 1) u, and a score by that plus an
// exp's and a division's few u (E = 512: 6.1e-5; measured up to 1.1e-6 in one run of
// the E = 512 case, seed 4628698117339645693 on the CPU kernel executor). Sigmoid and
// biased scores are elementwise: a few u.
static double route_scores_rtol(const struct mf_route_params *p) {
    const double u = EPS / 2;
    return p->kind == MF_ROUTE_SOFTMAX ? (2.0 * (p->n_expert - 1) + 8.0) * u : 1e-6;
}

static void test_route_case(struct mf_route_params p, int with_bias, int nt) {
    const int E_ = p.n_expert, K = p.n_used;
    float *lg = frand((size_t)nt * E_, -4, 4), *bias = frand((size_t)E_, -0.05f, 0.05f);
    float *lc = xmalloc((size_t)nt * E_ * 4);
    memcpy(lc, lg, (size_t)nt * E_ * 4);
    int32_t *ic = xmalloc((size_t)nt * K * 4), *ig = xmalloc((size_t)nt * K * 4);
    float *wc = fpoison((size_t)nt * K), *wg = fpoison((size_t)nt * K);
    E.co->moe_route(E.cx, ic, wc, lc, with_bias ? bias : NULL, &p, nt, NULL, NULL);
    float *glg = gput(lg, (size_t)nt * E_ * 4), *gbias = gput(bias, (size_t)E_ * 4);
    int32_t *gidx = gpoison((size_t)nt * K * 4);
    float *gw = gpoison((size_t)nt * K * 4);
    for (int mode = 0; mode < 3; mode++) {
        // 0: device and host outputs; 1: host only; 2: device only, downloaded after
        memset(ig, 0xff, (size_t)nt * K * 4);
        E.go->upload(E.gx, glg, 0, lg, (size_t)nt * E_ * 4);
        E.go->moe_route(E.gx, mode == 1 ? NULL : gidx, mode == 1 ? NULL : gw, glg,
                        with_bias ? gbias : NULL, &p, nt, mode == 2 ? NULL : ig,
                        mode == 2 ? NULL : wg);
        if (mode == 2) {
            E.go->download(E.gx, ig, gidx, 0, (size_t)nt * K * 4);
            E.go->download(E.gx, wg, gw, 0, (size_t)nt * K * 4);
        }
        int skipped = 0;
        for (int t = 0; t < nt; t++) {
            if (near_tie(&p, lc + (size_t)t * E_, with_bias ? bias : NULL, ic + t * K)) {
                if (getenv("MF_TIE_DEBUG"))
                    fprintf(stderr, "tie token %d\n", t);
                skipped++;
                continue;
            }
            for (int j = 0; j < K; j++) {
                int i = t * K + j;
                CHECK(ic[i] == ig[i], "moe_route kind %d mode %d token %d slot %d: id cpu %d "
                      "cuda %d", p.kind, mode, t, j, ic[i], ig[i]);
                CHECK(fabsf(wc[i] - wg[i]) <= 1e-6f * fmaxf(1.0f, fabsf(wc[i])),
                      "moe_route kind %d mode %d token %d slot %d: weight cpu %.9g cuda %.9g",
                      p.kind, mode, t, j, wc[i], wg[i]);
            }
        }
        E.n_case++;
        E.n_skip += skipped;
        if (skipped)
            printf("moe_route kind %d: %d of %d tokens near-ties, skipped\n", p.kind, skipped,
                   nt);
        float *sg = gget(glg, (size_t)nt * E_);
        cmp_rel("moe_route scores", lc, sg, (size_t)nt * E_, route_scores_rtol(&p));
        free(sg);
    }
    free(lg), free(bias), free(lc), free(ic), free(ig), free(wc), free(wg);
    gfree(glg), gfree(gbias), gfree(gidx), gfree(gw);
}

// rms_route (a MoE layer's input norm, router and routing in one call): xn, the
// scores, ids and weights bit for bit against the backend's own rms_matmul_multi of the
// router then moe_route (both tested against the CPU above), twice in a row (the fused
// kernel's last threadgroup resets its counter for the next launch).
static void test_rms_route_case(struct mf_route_params p, const struct tw *rt, int with_bias,
                                int nt) {
    const int64_t N = rt->c.n_in;
    const int E_ = p.n_expert, K = p.n_used;
    const size_t xs = (size_t)nt * N, ls = (size_t)nt * E_, ks = (size_t)nt * K;
    struct vw g = vw_make(MF_DTYPE_BF16, (int)N, 0.5f, 1.5f);
    float *x = frand(xs, -2, 2), *bias = frand((size_t)E_, -0.05f, 0.05f);
    float *gx = gput(x, xs * 4), *gb = with_bias ? gput(bias, (size_t)E_ * 4) : NULL;
    float *xn[2], *lg[2], *wt[2];
    int32_t *id[2];
    for (int v = 0; v < 2; v++) {
        xn[v] = gpoison(xs * 4), lg[v] = gpoison(ls * 4), wt[v] = gpoison(ks * 4);
        id[v] = gpoison(ks * 4);
    }
    float *const y1[1] = {lg[1]};
    const struct mf_weight *const w1[1] = {&rt->g};
    mf_rms_matmul_multi(E.go, E.gx, 1, y1, w1, xn[1], gx, &g.g, 1e-6f, nt);
    E.go->moe_route(E.gx, id[1], wt[1], lg[1], gb, &p, nt, NULL, NULL);
    float *want[3] = {gget(xn[1], xs), gget(lg[1], ls), gget(wt[1], ks)};
    int32_t *want_id = (int32_t *)gget(id[1], ks);
    for (int rep = 0; rep < 2; rep++) {
        if (rep) {   // poison the outputs again: the second call must write them all
            float *pz = fpoison(xs > ls ? xs : ls);
            E.go->upload(E.gx, xn[0], 0, pz, xs * 4);
            E.go->upload(E.gx, lg[0], 0, pz, ls * 4);
            E.go->upload(E.gx, wt[0], 0, pz, ks * 4);
            E.go->upload(E.gx, id[0], 0, pz, ks * 4);
            free(pz);
        }
        mf_rms_route(E.go, E.gx, id[0], wt[0], lg[0], gb, &p, nt, &rt->g, xn[0], gx, &g.g,
                     1e-6f);
        float *got[3] = {gget(xn[0], xs), gget(lg[0], ls), gget(wt[0], ks)};
        int32_t *got_id = (int32_t *)gget(id[0], ks);
        const size_t sz[3] = {xs, ls, ks};
        const char *what[3] = {"xn", "scores", "weights"};
        for (int k = 0; k < 3; k++) {
            E.n_case++;
            CHECK(memcmp(got[k], want[k], sz[k] * 4) == 0, "rms_route kind %d E %d n_in %lld "
                  "n_tok %d call %d: %s differ from rms_matmul_multi + moe_route", p.kind, E_,
                  (long long)N, nt, rep + 1, what[k]);
            free(got[k]);
        }
        E.n_case++;
        CHECK(memcmp(got_id, want_id, ks * 4) == 0, "rms_route kind %d E %d n_tok %d call %d: "
              "ids differ from rms_matmul_multi + moe_route", p.kind, E_, nt, rep + 1);
        free(got_id);
    }
    for (int k = 0; k < 3; k++)
        free(want[k]);
    for (int v = 0; v < 2; v++)
        gfree(xn[v]), gfree(lg[v]), gfree(wt[v]), gfree(id[v]);
    free(want_id), free(x), free(bias), gfree(gx), gfree(gb), vw_free(&g);
}

static void test_rms_route(void) {
    struct tw r128, r256, r32, f64;
    tw_make(&r128, MF_DTYPE_U32, MF_DTYPE_BF16, 8, 64, 128, 2048);
    tw_make(&r256, MF_DTYPE_U32, MF_DTYPE_F16, 4, 32, 256, 1024);
    tw_make(&r32, MF_DTYPE_U32, MF_DTYPE_F32, 6, 64, 32, 2880);
    tw_make(&f64, MF_DTYPE_BF16, MF_DTYPE_F32, 0, 0, 64, 1024);   // float: apart
    struct mf_route_params soft = {.kind = MF_ROUTE_SOFTMAX, .n_expert = 128, .n_used = 8,
                                   .norm_topk_prob = 1, .n_group = 1, .topk_group = 1,
                                   .routed_scaling_factor = 1.0f};
    struct mf_route_params noaux = {.kind = MF_ROUTE_NOAUX_TC, .n_expert = 256, .n_used = 8,
                                    .norm_topk_prob = 1, .n_group = 8, .topk_group = 4,
                                    .routed_scaling_factor = 2.5f};
    struct mf_route_params gpt = {.kind = MF_ROUTE_TOPK_SOFTMAX, .n_expert = 32, .n_used = 4,
                                  .n_group = 1, .topk_group = 1,
                                  .routed_scaling_factor = 1.0f};
    test_rms_route_case(soft, &r128, 0, 1);
    test_rms_route_case(soft, &r128, 0, 3);   // more tokens: apart
    test_rms_route_case(noaux, &r256, 1, 1);
    test_rms_route_case(gpt, &r32, 1, 1);
    soft.n_expert = 64;
    test_rms_route_case(soft, &f64, 0, 1);
    tw_free(&r128), tw_free(&r256), tw_free(&r32), tw_free(&f64);
    status_ok("rms_route");
}

static void test_route(void) {
    struct mf_route_params sm = {.kind = MF_ROUTE_SOFTMAX, .n_expert = 128, .n_used = 8,
                                 .norm_topk_prob = 0, .n_group = 1, .topk_group = 1,
                                 .routed_scaling_factor = 1.0f};
    test_route_case(sm, 0, 9);
    sm.norm_topk_prob = 1;
    sm.n_expert = 512;
    sm.n_used = 10;
    test_route_case(sm, 0, 33);
    struct mf_route_params nt = {.kind = MF_ROUTE_NOAUX_TC, .n_expert = 256, .n_used = 8,
                                 .norm_topk_prob = 1, .n_group = 8, .topk_group = 4,
                                 .routed_scaling_factor = 2.5f};
    test_route_case(nt, 1, 9);
    nt.n_group = 1;
    nt.n_expert = 64;
    nt.n_used = 6;
    test_route_case(nt, 0, 7);
    nt.n_used = 1;   // K = 1: no renormalisation
    test_route_case(nt, 1, 5);
    struct mf_route_params ts = {.kind = MF_ROUTE_TOPK_SOFTMAX, .n_expert = 128,
                                 .n_used = 4, .n_group = 1, .topk_group = 1,
                                 .routed_scaling_factor = 1.0f};   // gpt-oss
    test_route_case(ts, 1, 9);
    ts.n_expert = 32;
    test_route_case(ts, 0, 17);
    status_ok("moe_route");
}

/* ==== Grouped experts ==== */

// Component views inside a blob (pointers are byte offsets) and the blob size.
struct blob_layout {
    struct mf_weight gate, up, down;
    struct mf_weight bias[3];   // gpt-oss: float biases of gate, up, down (has_bias)
    int has_bias;
    enum mf_moe_act act;        // and its clamped SwiGLU
    float alpha, limit;
    size_t bytes;
};

// The batch of n experts at blobs (host or device) with L's views.
static struct mf_moe_batch layout_batch(const struct blob_layout *L, int n,
                                        const void *const *blobs, const int32_t *row0,
                                        const int32_t *rows) {
    struct mf_moe_batch b = {.n = n, .blob_host = blobs, .row0_host = row0,
                             .n_rows_host = rows, .gate = &L->gate, .up = &L->up,
                             .down = &L->down, .act = L->act, .act_alpha = L->alpha,
                             .act_limit = L->limit};
    if (L->has_bias) {
        b.gate_bias = &L->bias[0];
        b.up_bias = &L->bias[1];
        b.down_bias = &L->bias[2];
    }
    return b;
}

// gate and up in format f, down in format fd (affine codes, or a float dtype with no
// scales), each component 16-byte aligned.
static struct blob_layout layout_fmt(int H, int I, const struct mf_weight *f,
                                     const struct mf_weight *fd) {
    struct blob_layout L;
    memset(&L, 0, sizeof L);
    struct mf_weight *v[3] = {&L.gate, &L.up, &L.down};
    size_t off = 0;
    for (int i = 0; i < 3; i++) {
        *v[i] = i < 2 ? *f : *fd;
        v[i]->n_out = i < 2 ? I : H;
        v[i]->n_in = i < 2 ? H : I;
        size_t wb = (size_t)mf_weight_w_bytes(v[i]), sb = (size_t)mf_weight_s_bytes(v[i]);
        const int q = v[i]->dtype == MF_DTYPE_U32;
        v[i]->w = (const void *)(uintptr_t)off;
        const int nb = q && v[i]->qmode == MF_QMODE_AFFINE;   // MXFP4: no biases
        v[i]->scales = q ? (const void *)(uintptr_t)(off + wb) : NULL;
        v[i]->biases = nb ? (const void *)(uintptr_t)(off + wb + sb) : NULL;
        off = (off + wb + (nb ? 2 : 1) * sb + 15) & ~(size_t)15;
    }
    L.bytes = (off + 255) & ~(size_t)255;
    return L;
}

// gpt-oss's experts: MXFP4 gate, up and down, BF16 biases after them, the clamped
// SwiGLU.
static struct blob_layout layout_gptoss(int H, int I) {
    const struct mf_weight f = {.dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_U8, .bits = 4,
                                .group_size = 32, .qmode = MF_QMODE_MXFP4};
    struct blob_layout L = layout_fmt(H, I, &f, &f);
    size_t off = L.bytes;
    for (int i = 0; i < 3; i++) {
        const int n = i < 2 ? I : H;
        L.bias[i] = (struct mf_weight){.w = (const void *)(uintptr_t)off,
                                       .dtype = MF_DTYPE_BF16, .n_out = 1, .n_in = n};
        off += ((size_t)n * 2 + 15) & ~(size_t)15;
    }
    L.has_bias = 1;
    L.act = MF_MOE_ACT_SWIGLU_CLAMPED;
    L.alpha = 1.702f;
    L.limit = 7.0f;
    L.bytes = (off + 255) & ~(size_t)255;
    return L;
}

static struct blob_layout layout(int H, int I, int bits, int gs, enum mf_dtype sdt) {
    struct mf_weight w = {.dtype = MF_DTYPE_U32, .sdtype = sdt, .bits = bits,
                          .group_size = gs};
    return layout_fmt(H, I, &w, &w);
}

static void fill_blob(uint8_t *blob, const struct blob_layout *L) {
    const struct mf_weight *v[3] = {&L->gate, &L->up, &L->down};
    for (int i = 0; i < 3; i++) {
        size_t wb = (size_t)mf_weight_w_bytes(v[i]), sb = (size_t)mf_weight_s_bytes(v[i]);
        uint8_t *w = blob + (uintptr_t)v[i]->w;
        if (v[i]->dtype != MF_DTYPE_U32) {   // float: values of a 4-bit weight's range
            void *f = encode(v[i]->dtype, wb / mf_dtype_size(v[i]->dtype), -0.1f, 0.1f);
            memcpy(w, f, wb);
            free(f);
            continue;
        }
        size_t ns = sb / mf_dtype_size(v[i]->sdtype);
        for (size_t j = 0; j < wb; j++)
            w[j] = (uint8_t)(check_rand(&E.rng) >> 56);
        if (v[i]->qmode == MF_QMODE_MXFP4) {   // E8M0 bytes 118..125: 2^-9 .. 2^-2
            uint8_t *sc = blob + (uintptr_t)v[i]->scales;
            for (size_t j = 0; j < sb; j++)
                sc[j] = (uint8_t)(118 + check_rand(&E.rng) % 8);
            continue;
        }
        float half = (float)(1 << (v[i]->bits - 1));
        void *s = encode(v[i]->sdtype, ns, 0.004f, 0.012f);
        void *b = encode(v[i]->sdtype, ns, -0.012f * half, -0.004f * half);
        memcpy(blob + (uintptr_t)v[i]->scales, s, sb);
        memcpy(blob + (uintptr_t)v[i]->biases, b, sb);
        free(s), free(b);
    }
    for (int i = 0; L->has_bias && i < 3; i++) {
        const size_t n = (size_t)L->bias[i].n_in;
        void *f = encode(MF_DTYPE_BF16, n, -0.5f, 0.5f);
        memcpy(blob + (uintptr_t)L->bias[i].w, f, n * 2);
        free(f);
    }
}

// Row r of a weight (affine codes or float) as f32, straight from its definition.
static void row_values(float *dst, const struct mf_weight *w, int64_t r) {
    if (w->dtype == MF_DTYPE_U32) {
        mf_cpu_dequant_ref(dst, w, r, 0, w->n_in);
        return;
    }
    for (int64_t c = 0; c < w->n_in; c++)
        dst[c] = mf_load_f32(w->w, w->dtype, (size_t)(r * w->n_in + c));
}

// y[r] = W x as double, and sum |w x|, for one row of a weight at a host blob.
static void ref_row(const struct mf_weight *v, const uint8_t *blob, int64_t r, const float *x,
                    float *tmp, double *y, double *ad) {
    struct mf_weight w = mf_weight_at(v, blob);
    row_values(tmp, &w, r);
    *y = 0;
    *ad = 0;
    for (int64_t c = 0; c < w.n_in; c++) {
        *y += (double)tmp[c] * x[c];
        *ad += fabs((double)tmp[c] * x[c]);
    }
}

// The experts' activation of gate g and up u in double (silu(g) * u, or the clamped
// SwiGLU).
static double act_ref(const struct blob_layout *L, double g, double u) {
    if (L->act != MF_MOE_ACT_SWIGLU_CLAMPED)
        return g / (1.0 + exp(-g)) * u;
    const double gc = g < L->limit ? g : L->limit;
    const double uc = u < -L->limit ? -L->limit : u > L->limit ? L->limit : u;
    return (uc + 1.0) * gc / (1.0 + exp(-(double)L->alpha * gc));
}

// Element i of bias p of a host blob (0 without biases).
static double bias_ref(const struct blob_layout *L, const uint8_t *blob, int p, int64_t i) {
    if (!L->has_bias)
        return 0.0;
    struct mf_weight w = mf_weight_at(&L->bias[p], blob);
    return mf_load_f32(w.w, w.dtype, (size_t)i);
}

// Bounds for eo of one row: the down product's reordering bound plus what the error
// of each activation can move it: the gate/up bounds (and their bias additions) pushed
// through the activation by evaluating it at the corners of the error box, plus a
// few roundings of the activation itself, and the down bias addition.
static void expert_bounds(const struct blob_layout *L, const uint8_t *blob, const float *x,
                          int H, int I, double *absd, double *extra) {
    float *tmp = xmalloc((size_t)(H > I ? H : I) * 4), *act = xmalloc((size_t)I * 4);
    double *da = xmalloc((size_t)I * sizeof *da);
    const double cg = 4.0 * log2((double)H) * EPS;
    for (int j = 0; j < I; j++) {
        double g, ag, u, au;
        ref_row(&L->gate, blob, j, x, tmp, &g, &ag);
        ref_row(&L->up, blob, j, x, tmp, &u, &au);
        g += bias_ref(L, blob, 0, j);
        u += bias_ref(L, blob, 1, j);
        const double eg = cg * ag + 2 * EPS * fabs(g), eu = cg * au + 2 * EPS * fabs(u);
        const double a = act_ref(L, g, u);
        double worst = 0;
        for (int c = 0; c < 4; c++) {
            const double d = fabs(act_ref(L, g + (c & 1 ? eg : -eg), u + (c & 2 ? eu : -eu)) - a);
            worst = d > worst ? d : worst;
        }
        act[j] = (float)a;
        da[j] = 1.1 * worst + 8 * EPS * fabs(a);
    }
    for (int r = 0; r < H; r++) {
        double y;
        ref_row(&L->down, blob, r, act, tmp, &y, &absd[r]);
        struct mf_weight w = mf_weight_at(&L->down, blob);
        row_values(tmp, &w, r);
        double e = 0;
        for (int j = 0; j < I; j++)
            e += fabs((double)tmp[j]) * da[j];
        const double b = bias_ref(L, blob, 2, r);
        extra[r] = e + (L->has_bias ? 2 * EPS * (fabs(y) + fabs(b)) : 0.0);
    }
    free(tmp), free(act), free(da);
}

// "q4 g64 BF16" for a uniform layout, else both formats, for messages.
static void layout_name(char *buf, size_t n, const struct blob_layout *L) {
    const struct mf_weight *g = &L->gate, *d = &L->down;
    char a[64], b[64];
    if (g->dtype == d->dtype && g->bits == d->bits && g->group_size == d->group_size &&
        g->sdtype == d->sdtype && g->dtype == MF_DTYPE_U32 && g->qmode == MF_QMODE_AFFINE)
        snprintf(buf, n, "q%d g%d %s", g->bits, g->group_size, mf_dtype_name(g->sdtype));
    else
        snprintf(buf, n, "gate/up %s, down %s%s", mf_weight_format(g, a, sizeof a),
                 mf_weight_format(d, b, sizeof b),
                 L->has_bias ? ", biases, clamped SwiGLU" : "");
}

// Entries of an expert's rows: each expert of at least 2 * MF_MMA_MIN_ROWS rows split
// in two of at least MF_MMA_MIN_ROWS (one = 0), or every row an entry (one = 1) of the
// experts below MF_MMA_MIN_ROWS rows (the others kept whole). Returns the entry count.
static int regroup(const void *const *bg, const int32_t *row0, const int32_t *nrows, int ne,
                   int one, const void **eb, int32_t *er0, int32_t *ern) {
    int n = 0;
    for (int i = 0; i < ne; i++) {
        const int r = nrows[i], parts = one ? (r < MF_MMA_MIN_ROWS ? r : 1)
                                            : (r >= 2 * MF_MMA_MIN_ROWS ? 2 : 1);
        for (int k = 0, done = 0; k < parts; k++, n++) {
            const int take = k == parts - 1 ? r - done : one ? 1 : MF_MMA_MIN_ROWS + 3;
            eb[n] = bg[i];
            er0[n] = row0[i] + done;
            ern[n] = take;
            done += take;
        }
    }
    return n;
}

// ne experts of rows[i] rows each through moe_experts on both backends. On the GPU, a
// row's bits must not depend on the call: experts split over two calls, experts of
// fewer than MF_MMA_MIN_ROWS rows as one-row entries (the device-routed path's form;
// the prefill tensor-core pair takes the others), the others' rows regrouped.
static void test_experts_run(const struct blob_layout *lay, int H, int I, const int *rows,
                             int ne) {
    enum { NE_MAX = 8, ENT_MAX = 128 };
    const struct blob_layout L = *lay;
    const int nA = ne - 2;   // slots 0 .. nA - 1 in one allocation, the rest in another
    int32_t row0[NE_MAX], nrows[NE_MAX];
    int total = 0;
    for (int i = 0; i < ne; i++) {
        row0[i] = total;
        nrows[i] = rows[i];
        total += rows[i];
    }
    uint8_t *host = xmalloc(ne * L.bytes);
    for (int i = 0; i < ne; i++)
        fill_blob(host + i * L.bytes, &L);
    // Device: expert i in slot (i + nA - 1) % nA of the first allocation, or i.
    uint8_t *devA = E.go->alloc(E.gx, nA * L.bytes), *devB = E.go->alloc(E.gx, 2 * L.bytes);
    const void *bc[NE_MAX], *bg[NE_MAX];
    for (int i = 0; i < ne; i++) {
        bc[i] = host + i * L.bytes;
        bg[i] = i < nA ? devA + (i + nA - 1) % nA * L.bytes : devB + (i - nA) * L.bytes;
        E.go->upload(E.gx, (void *)bg[i], 0, bc[i], L.bytes);
    }
    float *xg = frand((size_t)total * H, -1, 1), *eoc = fpoison((size_t)total * H);
    float *guc = fpoison((size_t)total * 2 * I);
    struct mf_moe_batch b = layout_batch(&L, ne, bc, row0, nrows);
    E.co->moe_experts(E.cx, eoc, guc, xg, &b);
    float *gxg = gput(xg, (size_t)total * H * 4), *geo = gpoison((size_t)total * H * 4);
    float *ggu = gpoison((size_t)total * 2 * I * 4), *geo2 = gpoison((size_t)total * H * 4);
    b.blob_host = bg;
    E.go->moe_experts(E.gx, geo, ggu, gxg, &b);
    // The same experts in two calls: bitwise the same rows.
    struct mf_moe_batch b1 = b, b2 = b;
    b1.n = 2;
    b2.n = ne - 2;
    b2.blob_host = bg + 2;
    b2.row0_host = row0 + 2;
    b2.n_rows_host = nrows + 2;
    E.go->moe_experts(E.gx, geo2, ggu, gxg, &b1);
    E.go->moe_experts(E.gx, geo2, ggu, gxg, &b2);
    // The rows regrouped, each way (the CPU's grouped kernels sum differently).
    const void *eb[ENT_MAX];
    int32_t er0[ENT_MAX], ern[ENT_MAX];
    float *geo3 = gpoison((size_t)total * H * 4), *geo4 = gpoison((size_t)total * H * 4);
    struct mf_moe_batch b3 = b, b4 = b;
    b3.n = regroup(bg, row0, nrows, ne, 1, eb, er0, ern);
    b3.blob_host = eb;
    b3.row0_host = er0;
    b3.n_rows_host = ern;
    E.go->moe_experts(E.gx, geo3, ggu, gxg, &b3);
    const void *eb4[ENT_MAX];
    int32_t er04[ENT_MAX], ern4[ENT_MAX];
    b4.n = regroup(bg, row0, nrows, ne, 0, eb4, er04, ern4);
    b4.blob_host = eb4;
    b4.row0_host = er04;
    b4.n_rows_host = ern4;
    E.go->moe_experts(E.gx, geo4, ggu, gxg, &b4);
    float *eog = gget(geo, (size_t)total * H), *eog2 = gget(geo2, (size_t)total * H);
    float *eog3 = gget(geo3, (size_t)total * H), *eog4 = gget(geo4, (size_t)total * H);
    double *absd = xmalloc((size_t)total * H * sizeof *absd);
    double *extra = xmalloc((size_t)total * H * sizeof *extra);
    for (int i = 0; i < ne; i++)
        for (int r = 0; r < nrows[i]; r++)
            expert_bounds(&L, host + i * L.bytes, xg + (size_t)(row0[i] + r) * H, H, I,
                          absd + (size_t)(row0[i] + r) * H, extra + (size_t)(row0[i] + r) * H);
    char what[320], fmt[192];
    layout_name(fmt, sizeof fmt, &L);
    snprintf(what, sizeof what, "moe_experts %s %dx%d, %d rows", fmt, H, I, total);
    cmp_dot(what, eoc, eog, absd, extra, (size_t)total * H, I);
    CHECK(memcmp(eog, eog2, (size_t)total * H * 4) == 0,
          "%s: experts split over two calls differ from one call", what);
    CHECK(E.against_cpu || memcmp(eog, eog3, (size_t)total * H * 4) == 0,
          "%s: rows as entries of their own differ from grouped rows", what);
    CHECK(E.against_cpu || memcmp(eog, eog4, (size_t)total * H * 4) == 0,
          "%s: experts split into entries of many rows differ from whole ones", what);
    free(host), free(xg), free(eoc), free(guc), free(eog), free(eog2), free(absd), free(extra);
    free(eog3), free(eog4);
    gfree(devA), gfree(devB), gfree(gxg), gfree(geo), gfree(ggu), gfree(geo2), gfree(geo3);
    gfree(geo4);
    status_ok("moe_experts");
}

// The rows of the expert tests: a few each (the one-row kernels' bits), and experts of
// many (the prefill tensor-core pair's where the format is one of its: one token tile
// of 32, a partial second one, the least rows it takes, a tile of 9 whose second warp
// row has no tokens) beside a few.
static const int FEW_ROWS[] = {1, 3, 0, 6, 2};
static const int MANY_ROWS[] = {1, 9, 0, 37, MF_MMA_MIN_ROWS, 3};
#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static void test_experts_case(int bits, int gs, enum mf_dtype sdt, int H, int I) {
    const struct blob_layout L = layout(H, I, bits, gs, sdt);
    test_experts_run(&L, H, I, FEW_ROWS, N_OF(FEW_ROWS));
}

// The same with experts of many rows.
static void test_experts_many(int bits, int gs, enum mf_dtype sdt, int H, int I) {
    const struct blob_layout L = layout(H, I, bits, gs, sdt);
    test_experts_run(&L, H, I, MANY_ROWS, N_OF(MANY_ROWS));
}

// Mixed recipes: gate and up in one format, down in another (affine or float).
static struct blob_layout layout_mixed(int H, int I, int bits, int gs, int dbits, int dgs,
                                       enum mf_dtype ddt) {
    const struct mf_weight f = {.dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_BF16,
                                .bits = bits, .group_size = gs};
    const struct mf_weight fd = {.dtype = ddt, .sdtype = MF_DTYPE_BF16, .bits = dbits,
                                 .group_size = dgs};
    return layout_fmt(H, I, &f, &fd);
}

// gpt-oss's experts: MXFP4 codes, per-expert biases, the clamped SwiGLU (gate/up
// rows of 2880 = 90 words of codes: lanes take uneven shares).
static void test_gptoss_experts(void) {
    struct blob_layout L = layout_gptoss(256, 192);
    test_experts_run(&L, 256, 192, FEW_ROWS, N_OF(FEW_ROWS));
    L = layout_gptoss(2880, 64);
    test_experts_run(&L, 2880, 64, MANY_ROWS, N_OF(MANY_ROWS));
}

static void test_mixed_experts(void) {
    static const struct { int bits, gs, dbits, dgs; enum mf_dtype ddt; int I; } C[] = {
        {3, 64, 6, 64, MF_DTYPE_U32, 192},    // mlx-lm's mixed_3_6: 6-bit down
        {3, 64, 0, 0, MF_DTYPE_BF16, 192},    // 3-bit gate/up, float down
        {4, 64, 0, 0, MF_DTYPE_F16, 96},      // the group-size rule: a 96-wide down in float
        {4, 64, 2, 32, MF_DTYPE_U32, 192},    // tensor-core formats of different widths
        {2, 128, 8, 64, MF_DTYPE_U32, 192}};
    for (size_t i = 0; i < sizeof C / sizeof C[0]; i++) {
        const struct blob_layout L = layout_mixed(256, C[i].I, C[i].bits, C[i].gs,
                                                  C[i].dbits, C[i].dgs, C[i].ddt);
        test_experts_run(&L, 256, C[i].I, i % 2 ? MANY_ROWS : FEW_ROWS,
                         i % 2 ? N_OF(MANY_ROWS) : N_OF(FEW_ROWS));
    }
}

// The formats and widths of the tensor-core expert kernels: 4-bit gs64 (as the
// others), the other group sizes and 2 bits, inputs above MF_TC_MAX_IN / 2 (one token
// per pass: gate/up at 2304, down at 2112) and 3 groups a row for 8 warps a tile.
static void test_tc_experts(void) {
    test_experts_case(4, 64, MF_DTYPE_BF16, 256, 192);
    test_experts_case(4, 32, MF_DTYPE_F32, 256, 192);
    test_experts_case(2, 128, MF_DTYPE_F16, 256, 384);
    test_experts_case(2, 64, MF_DTYPE_BF16, 2304, 192);
    test_experts_case(4, 64, MF_DTYPE_BF16, 256, 2112);
}

// The formats and edges of the prefill tensor-core pair (mma.h): each group size and
// width, x staged in blocks of MF_MMA_KB with a partial last one (192, 96, 2112, 320
// columns), gate/up indices and down rows past a full threadgroup (96 and 2112 of 64;
// 320 of MF_MMA_ROWS), inputs wider than the other tensor-core kernels take.
static void test_mma_experts(void) {
    test_experts_many(4, 64, MF_DTYPE_BF16, 256, 192);
    test_experts_many(4, 32, MF_DTYPE_F32, 320, 96);
    test_experts_many(4, 128, MF_DTYPE_F16, 256, 384);
    test_experts_many(2, 128, MF_DTYPE_F16, 256, 384);
    test_experts_many(2, 64, MF_DTYPE_BF16, 2304, 192);
    test_experts_many(4, 64, MF_DTYPE_BF16, 320, 2112);
    test_experts_many(4, 64, MF_DTYPE_BF16, 8192, 128);
    test_experts_many(3, 64, MF_DTYPE_BF16, 256, 192);   // not its format: SIMT alone
}

static void test_experts(void) {
    test_experts_case(3, 32, MF_DTYPE_F16, 256, 192);
    test_experts_case(6, 64, MF_DTYPE_F32, 256, 192);
    test_tc_experts();
    test_mma_experts();
    test_mixed_experts();
    test_gptoss_experts();
}

/* ==== Device-routed resident experts ====
 * NE experts back to back (stride = blob size) on both backends; n_tok tokens with K
 * distinct random experts and random weights each; idx / w in device memory. The bound
 * per output: the weighted sum of the experts' bounds plus K roundings of the sum. With
 * one token the result must equal, bit for bit, the host-routed path (moe_experts on
 * the token's rows, zero, scatter_add_rows in ascending expert order). */

static void pick_experts(int32_t *idx, float *w, int n_tok, int K, int NE) {
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < K; j++) {
            int e, dup;
            do {
                e = (int)(check_rand(&E.rng) % (uint64_t)NE);
                dup = 0;
                for (int i = 0; i < j; i++)
                    dup |= idx[t * K + i] == e;
            } while (dup);
            idx[t * K + j] = e;
            w[t * K + j] = 0.05f + (float)(check_rand(&E.rng) % 1000) / 1000.0f;
        }
}

// The host-routed path on the device backend for one token: y = 0 + rows in ascending
// expert order.
static void host_routed_one(float *gy, const float *gx, const int32_t *idx, const float *w,
                            int K, const uint8_t *gbase, const struct blob_layout *L,
                            int H) {
    int32_t order[16], row0[16], one[16], tok[16];
    const void *blob[16];
    float wo[16];
    for (int j = 0; j < K; j++)
        order[j] = j;
    for (int a = 1; a < K; a++)   // insertion sort of the slots by expert id
        for (int b = a; b > 0 && idx[order[b]] < idx[order[b - 1]]; b--) {
            int32_t t = order[b];
            order[b] = order[b - 1];
            order[b - 1] = t;
        }
    for (int j = 0; j < K; j++) {
        blob[j] = gbase + (size_t)idx[order[j]] * L->bytes;
        row0[j] = j;
        one[j] = 1;
        tok[j] = 0;
        wo[j] = w[order[j]];
    }
    float *xg = gpoison((size_t)K * H * 4), *gu = gpoison((size_t)K * 2 * L->gate.n_out * 4);
    float *eo = gpoison((size_t)K * H * 4);
    E.go->gather_rows(E.gx, xg, gx, tok, K, H);
    struct mf_moe_batch b = layout_batch(L, K, blob, row0, one);
    E.go->moe_experts(E.gx, eo, gu, xg, &b);
    E.go->zero(E.gx, gy, 0, (size_t)H * 4);
    E.go->scatter_add_rows(E.gx, gy, eo, tok, wo, K, H);
    gfree(xg), gfree(gu), gfree(eo);
}

// d (with the shared expert's and the residual adds, the residual starting at rs) again
// on the exec made with MOEFLUX_GPU_FUSE=0, whose down kernel and combine are two
// launches (mf_moe_down1, mf_moe_combine): y (y1), the residual (r1) and the flag (f1)
// of E.gx's (every fusion on: mf_moe_down1c) bit for bit.
static void experts_dev_apart(const struct mf_moe_dev *d0, const float *gxx, const float *y1,
                              const float *r1, int f1, const float *rs, size_t n,
                              const char *what) {
    if (!E.gx_untiled)
        return;
    int32_t zero = 0, f = -1;
    float *gy = gpoison(n * 4), *gr = gput(rs, n * 4);
    int32_t *gf = gput(&zero, 4);
    struct mf_moe_dev d = *d0;
    d.resid = gr;
    d.flag = gf;
    E.go->sync(E.gx);   // the inputs and the poison are in place
    E.go->moe_experts_dev(E.gx_untiled, gy, gxx, &d);
    float *y = xmalloc(n * 4), *r = xmalloc(n * 4);
    E.go->download(E.gx_untiled, y, gy, 0, n * 4);
    E.go->download(E.gx_untiled, r, gr, 0, n * 4);
    E.go->download(E.gx_untiled, &f, gf, 0, 4);
    char err[512] = "";
    const int rc = E.go->status(E.gx_untiled, err, sizeof err);
    E.n_case++;
    CHECK(rc == MF_OK, "%s apart: %s", what, err);
    CHECK(memcmp(y, y1, n * 4) == 0, "%s: y differs from mf_moe_down1 + mf_moe_combine's",
          what);
    CHECK(memcmp(r, r1, n * 4) == 0,
          "%s: the residual differs from mf_moe_down1 + mf_moe_combine's", what);
    CHECK(f == f1, "%s: flag %d, apart %d", what, f1, f);
    free(y), free(r), gfree(gy), gfree(gr), gfree(gf);
}

// moe_experts_dev with the shared expert's and the residual adds (d's shared, resid,
// flag; and route_ahead, as moe.c passes it with the shared expert) against the same
// call without them, then axpy and mf_axpy_flag, on the device backend: y, the residual
// and the flag bit for bit; inf: one residual value is infinite, so the flag must go up
// (and stay down otherwise).
static void experts_dev_adds(const struct mf_moe_dev *d0, const float *gxx, int n_tok, int H,
                             int inf, const char *what) {
    const size_t n = (size_t)n_tok * H;
    float *sh = frand(n, -1, 1), *rs = frand(n, -4, 4);
    if (inf)
        rs[n / 2] = INFINITY;
    int32_t zero = 0, f1 = -1, f2 = -1;
    float *gsh = gput(sh, n * 4), *gr1 = gput(rs, n * 4), *gr2 = gput(rs, n * 4);
    float *gy1 = gpoison(n * 4), *gy2 = gpoison(n * 4);
    int32_t *gf1 = gput(&zero, 4), *gf2 = gput(&zero, 4);
    struct mf_moe_dev d = *d0;
    d.shared = gsh;
    d.resid = gr1;
    d.flag = gf1;
    d.route_ahead = 1;   // idx and x were uploaded before the last op (as moe.c's shared)
    E.go->moe_experts_dev(E.gx, gy1, gxx, &d);
    E.go->moe_experts_dev(E.gx, gy2, gxx, d0);
    E.go->axpy(E.gx, gy2, 1.0f, gsh, (int)n);
    mf_axpy_flag(E.go, E.gx, gr2, 1.0f, gy2, (int)n, gf2);
    float *y1 = gget(gy1, n), *y2 = gget(gy2, n), *r1 = gget(gr1, n), *r2 = gget(gr2, n);
    E.go->download(E.gx, &f1, gf1, 0, 4);
    E.go->download(E.gx, &f2, gf2, 0, 4);
    E.n_case++;
    CHECK(memcmp(y1, y2, n * 4) == 0, "%s: y with the shared add differs from axpy's", what);
    CHECK(memcmp(r1, r2, n * 4) == 0, "%s: the residual add differs from axpy_flag's", what);
    CHECK(f1 == inf && f2 == inf, "%s: flag %d (axpy_flag %d), expected %d", what, f1, f2,
          inf);
    experts_dev_apart(&d, gxx, y1, r1, f1, rs, n, what);
    free(sh), free(rs), free(y1), free(y2), free(r1), free(r2);
    gfree(gsh), gfree(gr1), gfree(gr2), gfree(gy1), gfree(gy2), gfree(gf1), gfree(gf2);
}

static void test_experts_dev_run(const struct blob_layout *lay, int n_tok) {
    enum { NE = 12, K = 4, H = 256 };
    const struct blob_layout L = *lay;
    const int I = (int)L.gate.n_out;
    uint8_t *host = xmalloc(NE * L.bytes);
    for (int i = 0; i < NE; i++)
        fill_blob(host + i * L.bytes, &L);
    uint8_t *gbase = gput(host, NE * L.bytes);
    int32_t idx[8 * K];
    float w[8 * K];
    pick_experts(idx, w, n_tok, K, NE);
    const size_t nr = (size_t)n_tok * K;
    float *x = frand((size_t)n_tok * H, -1, 1), *yc = fpoison((size_t)n_tok * H);
    float *xg = fpoison(nr * H), *gu = fpoison(nr * 2 * I), *eo = fpoison(nr * H);
    const struct mf_moe_batch lb = layout_batch(&L, 0, NULL, NULL, NULL);
    struct mf_moe_dev d = {.n_tok = n_tok, .k = K, .idx = idx, .w = w, .base = host,
                           .stride = (int64_t)L.bytes, .gate = &L.gate, .up = &L.up,
                           .down = &L.down, .gate_bias = lb.gate_bias, .up_bias = lb.up_bias,
                           .down_bias = lb.down_bias, .act = L.act, .act_alpha = L.alpha,
                           .act_limit = L.limit, .xg = xg, .gu = gu, .eo = eo};
    E.co->moe_experts_dev(E.cx, yc, x, &d);
    float *gxx = gput(x, (size_t)n_tok * H * 4), *gy = gpoison((size_t)n_tok * H * 4);
    d.idx = gput(idx, nr * 4);
    d.w = gput(w, nr * 4);
    d.base = gbase;
    d.xg = gpoison(nr * H * 4);
    d.gu = gpoison(nr * 2 * I * 4);
    d.eo = gpoison(nr * H * 4);
    E.go->moe_experts_dev(E.gx, gy, gxx, &d);
    float *yg = gget(gy, (size_t)n_tok * H);
    double *absd = xmalloc((size_t)H * sizeof *absd), *extra = xmalloc((size_t)H * sizeof *extra);
    double *ab = xmalloc((size_t)n_tok * H * sizeof *ab), *ex = xmalloc((size_t)n_tok * H * sizeof *ex);
    for (size_t i = 0; i < (size_t)n_tok * H; i++)
        ab[i] = ex[i] = 0;
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < K; j++) {
            const uint8_t *blob = host + (size_t)idx[t * K + j] * L.bytes;
            expert_bounds(&L, blob, x + (size_t)t * H, H, I, absd, extra);
            const double aw = fabs(w[t * K + j]);
            for (int r = 0; r < H; r++) {   // the sum's own roundings: K of |w eo|
                const float *e = eo + ((size_t)t * K + j) * H;
                ab[(size_t)t * H + r] += aw * absd[r];
                ex[(size_t)t * H + r] += aw * extra[r] + 2.0 * K * EPS * aw * fabs((double)e[r]);
            }
        }
    char what[320], fmt[192];
    layout_name(fmt, sizeof fmt, &L);
    snprintf(what, sizeof what, "moe_experts_dev %s n_tok %d", fmt, n_tok);
    cmp_dot(what, yc, yg, ab, ex, (size_t)n_tok * H, I);
    experts_dev_adds(&d, gxx, n_tok, H, n_tok == 2, what);
    if (n_tok == 1) {
        float *gy2 = gpoison((size_t)H * 4);
        host_routed_one(gy2, gxx, idx, w, K, gbase, &L, H);
        float *y2 = gget(gy2, H);
        CHECK(memcmp(yg, y2, (size_t)H * 4) == 0,
              "%s: device-routed and host-routed experts differ", what);
        free(y2), gfree(gy2);
    }
    gfree((void *)d.idx), gfree((void *)d.w), gfree(d.xg), gfree(d.gu), gfree(d.eo);
    gfree(gbase), gfree(gxx), gfree(gy);
    free(host), free(x), free(yc), free(xg), free(gu), free(eo), free(yg), free(absd);
    free(extra), free(ab), free(ex);
    status_ok("moe_experts_dev");
}

static void test_experts_dev_case(int bits, int gs, enum mf_dtype sdt, int n_tok) {
    const struct blob_layout L = layout(256, 192, bits, gs, sdt);
    test_experts_dev_run(&L, n_tok);
}

static void test_experts_dev(void) {
    test_experts_dev_case(4, 64, MF_DTYPE_BF16, 1);
    test_experts_dev_case(4, 64, MF_DTYPE_BF16, 3);
    test_experts_dev_case(3, 32, MF_DTYPE_F16, 1);
    test_experts_dev_case(8, 64, MF_DTYPE_F32, 2);
    test_experts_dev_case(2, 64, MF_DTYPE_BF16, 1);
    struct blob_layout L = layout_mixed(256, 192, 3, 64, 6, 64, MF_DTYPE_U32);
    test_experts_dev_run(&L, 1);
    L = layout_mixed(256, 192, 4, 64, 0, 0, MF_DTYPE_BF16);
    test_experts_dev_run(&L, 2);
    L = layout_gptoss(256, 192);
    test_experts_dev_run(&L, 1);
    test_experts_dev_run(&L, 3);
}

/* ==== Memory, copies, fences, weights, status ==== */

// API v3: upload_async runs on the copy queue; fence_wait_device orders it both ways
// against the compute queue (models/dev_cache.c's fill): work after the wait reads the
// copied bytes, and a copy after a wait on a fence behind queued work overwrites only
// after that work. h is the reference, pin holds n bytes of staging, d n device bytes.
static void copy_queue_order(uint8_t *d, uint8_t *pin, const uint8_t *h, uint8_t *back,
                             size_t n, struct mf_fence *f) {
    uint8_t *d2 = E.go->alloc(E.gx, n);
    struct mf_fence *u = E.go->fence_new(E.gx);
    if (!d2 || !u || !E.go->fence_wait_device) {
        CHECK(0, "copy queue: alloc / fence_new / fence_wait_device missing");
        E.go->dealloc(E.gx, d2);
        E.go->fence_free(E.gx, u);
        return;
    }
    for (size_t i = 0; i < n; i++)
        pin[i] = (uint8_t)(h[i] ^ 0x5a);
    E.go->upload_async(E.gx, d, 0, pin, n, f);
    E.go->fence_wait_device(E.gx, f);        // read after write
    E.go->copy(E.gx, d2, 0, d, 0, n);
    E.go->fence_record(E.gx, u);
    E.go->fence_wait_device(E.gx, u);        // write after read: the copy below waits
    E.go->download(E.gx, back, d2, 0, n);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += back[i] != (uint8_t)(h[i] ^ 0x5a);
    CHECK(bad == 0, "copy queue: %zu bytes read before the copy landed", bad);
    E.go->zero(E.gx, d, 0, n);               // queued compute writes d ...
    E.go->fence_record(E.gx, u);
    E.go->fence_wait_device(E.gx, u);
    E.go->upload_async(E.gx, d, 0, pin, n, f);   // ... then the copy overwrites it
    E.go->fence_wait(E.gx, f);
    E.go->download(E.gx, back, d, 0, n);
    bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += back[i] != pin[i];
    CHECK(bad == 0, "copy queue: %zu bytes of a zero queued before the copy won", bad);
    E.go->sync(E.gx);
    E.go->fence_free(E.gx, u);
    E.go->dealloc(E.gx, d2);
}

static void test_memory(void) {
    const size_t n = (size_t)7 << 19;   // 3.5 MiB: more than one argument-ring segment
    uint8_t *h = xmalloc(n), *back = xmalloc(n);
    for (size_t i = 0; i < n; i++)
        h[i] = (uint8_t)(check_rand(&E.rng) >> 56);
    uint8_t *d = E.go->alloc(E.gx, n);
    CHECK(d != NULL, "alloc %zu", n);
    E.go->download(E.gx, back, d, 0, n);
    size_t nz = 0;
    for (size_t i = 0; i < n; i++)
        nz += back[i] != 0;
    CHECK(nz == 0, "alloc is zero-filled: %zu nonzero bytes", nz);
    uint8_t keep[1000];
    memcpy(keep, h + 100, sizeof keep);
    E.go->upload(E.gx, d, 0, h, n);
    memset(h + 100, 0x5a, sizeof keep);   // consumed before return: must not reach the device
    memcpy(h + 100, keep, sizeof keep);
    memset(keep, 0x5a, sizeof keep);
    E.go->download(E.gx, back, d, 0, n);
    CHECK(memcmp(back, h, n) == 0, "upload/download round trip");
    // copy and zero at offsets, against the same edits on the host
    memcpy(h, back, n);
    E.go->copy(E.gx, d, 1000003, d, 17, 500000);
    memmove(h + 1000003, h + 17, 500000);
    E.go->zero(E.gx, d, 3, 77777);
    memset(h + 3, 0, 77777);
    E.go->download(E.gx, back, d, 0, n);
    CHECK(memcmp(back, h, n) == 0, "copy / zero at offsets");
    E.go->dealloc(E.gx, d);
    d = E.go->alloc(E.gx, n - 4096);   // reuses the pooled block, zero-filled again
    E.go->download(E.gx, back, d, 0, n - 4096);
    nz = 0;
    for (size_t i = 0; i < n - 4096; i++)
        nz += back[i] != 0;
    CHECK(nz == 0, "a reused allocation is zero-filled: %zu nonzero bytes", nz);
    // pinned host memory, async upload, fences
    uint8_t *pin = E.go->alloc_host(E.gx, n);
    CHECK(pin != NULL && ((uintptr_t)pin & 4095) == 0, "alloc_host aligned");
    struct mf_fence *f = E.go->fence_new(E.gx), *never = E.go->fence_new(E.gx);
    if (pin && f && never) {
        memcpy(pin, h, n);
        E.go->upload_async(E.gx, d, 0, pin, n - 4096, f);
        E.go->fence_wait(E.gx, f);
        E.go->fence_wait(E.gx, never);   // never recorded: returns at once
        memset(pin, 0, n);
        E.go->fence_record(E.gx, f);
        E.go->fence_wait(E.gx, f);
        E.go->download(E.gx, back, d, 0, n - 4096);
        CHECK(memcmp(back, h, n - 4096) == 0, "upload_async with a fence");
        copy_queue_order(d, pin, h, back, n - 4096, f);
    }
    E.go->fence_free(E.gx, f);
    E.go->fence_free(E.gx, never);
    E.go->dealloc_host(E.gx, pin);
    E.go->sync(E.gx);
    E.go->dealloc(E.gx, d);
    free(h), free(back);
    status_ok("memory");
}

static void test_weights_map(void) {
    const size_t n = (size_t)41 << 20;   // crosses the 16 MiB staging chunks
    uint8_t *h = xmalloc(n), *back = xmalloc(n);
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = check_rand(&E.rng);
        memcpy(h + i, &r, 8);
    }
    char err[512] = "";
    const void *dev = E.gb->ops->map_weights(E.gb, h, n, err, sizeof err);
    CHECK(dev != NULL, "map_weights: %s", err);
    if (dev) {
        E.go->download(E.gx, back, dev, 0, n);
        CHECK(memcmp(back, h, n) == 0, "mapped weights equal the host bytes");
        E.gb->ops->unmap_weights(E.gb, dev, n);
    }
    uint64_t fr = 0, tot = 0;
    int rc = E.gb->ops->mem_info(E.gb, &fr, &tot, err, sizeof err);
    CHECK(rc == MF_OK && fr <= tot && tot > ((uint64_t)1 << 30), "mem_info: %d free %llu "
          "total %llu %s", rc, (unsigned long long)fr, (unsigned long long)tot, err);
    printf("mem_info: %.1f GiB free of %.1f GiB\n", (double)fr / (1 << 30),
           (double)tot / (1 << 30));
    free(h), free(back);
}

// A bad request leaves a sticky error naming the op on its exec (a fresh one).
static void test_status(void) {
    struct mf_exec *ex = NULL;
    char err[1024] = "";
    int rc = E.gb->ops->exec_new(E.gb, 1, &ex, err, sizeof err);
    CHECK(rc == MF_OK, "exec_new: %s", err);
    if (rc)
        return;
    struct mf_route_params p = {.kind = MF_ROUTE_SOFTMAX, .n_expert = 5000, .n_used = 4,
                                .n_group = 1, .topk_group = 1, .routed_scaling_factor = 1};
    E.go->moe_route(ex, NULL, NULL, NULL, NULL, &p, 1, NULL, NULL);
    rc = E.go->status(ex, err, sizeof err);
    CHECK(rc != MF_OK && strstr(err, "moe_route"), "sticky status names the op: %d %s", rc,
          err);
    E.go->exec_free(ex);
    // More experts a token than the combine orders in threadgroup memory: refused before
    // anything is launched (no buffer is touched).
    rc = E.gb->ops->exec_new(E.gb, 1, &ex, err, sizeof err);
    CHECK(rc == MF_OK, "exec_new: %s", err);
    if (rc)
        return;
    const struct blob_layout L = layout(256, 192, 4, 64, MF_DTYPE_BF16);
    const struct mf_moe_batch lb = layout_batch(&L, 0, NULL, NULL, NULL);
    struct mf_moe_dev d = {.n_tok = 1, .k = MF_ROUTE_K_MAX + 1, .stride = (int64_t)L.bytes,
                           .gate = &L.gate, .up = &L.up, .down = &L.down,
                           .gate_bias = lb.gate_bias, .up_bias = lb.up_bias,
                           .down_bias = lb.down_bias, .act = L.act, .act_alpha = L.alpha,
                           .act_limit = L.limit};
    E.go->moe_experts_dev(ex, NULL, NULL, &d);
    rc = E.go->status(ex, err, sizeof err);
    CHECK(rc != MF_OK && strstr(err, "moe_experts_dev"), "%d experts a token: %d %s", d.k,
          rc, err);
    E.go->exec_free(ex);
}

// A backend made with MOEFLUX_GPU_CARVEOUT=v: MF_OK and every kernel given the carveout,
// or the backend refused with the variable and its value named.
static void carveout_case(const char *v, int ok) {
    struct mf_backend *be = NULL;
    char err[1024] = "", want[64];
    setenv("MOEFLUX_GPU_CARVEOUT", v, 1);
    const int rc = mf_backend_new(&be, "cuda", err, sizeof err);
    unsetenv("MOEFLUX_GPU_CARVEOUT");
    snprintf(want, sizeof want, "MOEFLUX_GPU_CARVEOUT=%s:", v);
    E.n_case++;
    if (ok)
        CHECK(rc == MF_OK, "MOEFLUX_GPU_CARVEOUT=%s: %s", v, err);
    else
        CHECK(rc == MF_ERR_ARG && strstr(err, want), "MOEFLUX_GPU_CARVEOUT=%s: %d %s", v, rc,
              err);
    if (be)
        be->ops->free(be);
}

static void test_carveout(void) {
    carveout_case("100", 1);
    carveout_case("0", 1);
    carveout_case("101", 0);
    carveout_case("-1", 0);
    carveout_case("5x", 0);
    carveout_case("0100", 0);
}

/* ==== The cubin cache ==== */

static int cache_files(const char *dir, char *first, size_t n) {
    char pat[600];
    snprintf(pat, sizeof pat, "%s/cuda/*.bin", dir);
    glob_t g;
    if (glob(pat, 0, NULL, &g) != 0)
        return 0;
    int count = (int)g.gl_pathc;
    snprintf(first, n, "%s", g.gl_pathv[0]);
    globfree(&g);
    return count;
}

static double make_backend(const char *what) {
    struct mf_backend *be = NULL;
    char err[4096] = "";
    double t0 = now_s();
    int rc = mf_backend_new(&be, "cuda", err, sizeof err);
    double dt = now_s() - t0;
    CHECK(rc == MF_OK, "%s: %s", what, err);
    if (be)
        be->ops->free(be);
    return dt;
}

static void test_cache(void) {
    char dir[512], file[700] = "";
    if (check_make_tmpdir(dir, sizeof dir, "mf_cubin") != 0)
        return;
    setenv("MOEFLUX_CACHE_DIR", dir, 1);
    // NVRTC 13 keeps a cache of its own in the driver's compute cache when a driver is
    // loaded: without this, "cold" would time NVRTC's cache, not a compile.
    setenv("CUDA_CACHE_DISABLE", "1", 1);
    double t_cold = make_backend("cold cache");
    CHECK(cache_files(dir, file, sizeof file) == 1, "one cache entry in %s", dir);
    double t_warm = make_backend("warm cache");
    FILE *f = fopen(file, "r+b");
    CHECK(f != NULL, "open %s", file);
    long size = 0;
    if (f) {   // corrupt the middle of the image
        fseek(f, 0, SEEK_END);
        size = ftell(f);
        fseek(f, size / 2, SEEK_SET);
        fwrite("corrupt!", 1, 8, f);
        fclose(f);
    }
    double t_fix = make_backend("corrupt cache entry");
    f = fopen(file, "rb");
    long size2 = -1;
    if (f) {
        fseek(f, 0, SEEK_END);
        size2 = ftell(f);
        fclose(f);
    }
    CHECK(size2 == size, "the corrupt entry was rewritten (%ld vs %ld bytes)", size2, size);
    double t_again = make_backend("rewritten cache entry");
    printf("cache entry %s, %ld bytes\n", file, size);
    printf("backend start: cold cache %.2f s, warm %.2f s, corrupt entry %.2f s, after %.2f s\n",
           t_cold, t_warm, t_fix, t_again);
    CHECK(t_warm < t_cold, "a cache hit is faster than compiling");
    unsetenv("CUDA_CACHE_DISABLE");
    remove(file);
    char sub[600];
    snprintf(sub, sizeof sub, "%s/cuda", dir);
    remove(sub);
    remove(dir);
}

/* ==== A small bandwidth check (printed, never asserted) ====
 * A 4-bit matvec streams its weight once; its bytes per second are compared with a
 * device-to-device copy (read + write) measured in the same run, rounds interleaved. */

static void bench(const char *label, int bits) {
    const int64_t R = 16384, N = 8192;
    const int reps = 20;
    struct mf_weight w = {.dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_BF16, .bits = bits,
                          .group_size = 64, .n_out = R, .n_in = N};
    size_t wb = (size_t)mf_weight_w_bytes(&w), sb = (size_t)mf_weight_s_bytes(&w);
    uint8_t *hw = xmalloc(wb);
    for (size_t i = 0; i < wb; i += 8) {
        uint64_t r = check_rand(&E.rng);
        memcpy(hw + i, &r, 8);
    }
    void *hs = encode(MF_DTYPE_BF16, sb / 2, 0.004f, 0.012f), *hb = encode(MF_DTYPE_BF16, sb / 2, -0.1f, -0.03f);
    w.w = gput(hw, wb);
    w.scales = gput(hs, sb);
    w.biases = gput(hb, sb);
    const size_t bytes = wb + 2 * sb;
    float *x = frand((size_t)(256 * N), -1, 1), *gxb = gput(x, (size_t)(256 * N) * 4);
    float *gy = E.go->alloc(E.gx, (size_t)(256 * R) * 4);
    void *c1 = E.go->alloc(E.gx, bytes), *c2 = E.go->alloc(E.gx, bytes);
    for (int round = 0; round < 3; round++) {
        E.go->matmul(E.gx, gy, &w, gxb, 1);
        E.go->sync(E.gx);
        double t0 = now_s();
        for (int i = 0; i < reps; i++)
            E.go->matmul(E.gx, gy, &w, gxb, 1);
        E.go->sync(E.gx);
        double t1 = now_s();
        for (int i = 0; i < reps; i++)
            E.go->copy(E.gx, c1, 0, c2, 0, bytes);
        E.go->sync(E.gx);
        double t2 = now_s();
        for (int i = 0; i < 3; i++)
            E.go->matmul(E.gx, gy, &w, gxb, 8);
        E.go->sync(E.gx);
        double t3 = now_s();
        for (int i = 0; i < 3; i++)
            E.go->matmul(E.gx, gy, &w, gxb, 256);
        E.go->sync(E.gx);
        double t4 = now_s();
        double mv = (double)bytes * reps / (t1 - t0), cp = 2.0 * (double)bytes * reps / (t2 - t1);
        printf("bench %s round %d: %d-bit matvec [%lld x %lld] %.0f GB/s; D2D copy (read+write) "
               "%.0f GB/s; ratio %.2f; n_tok 8: %.0f GB/s of weights; n_tok 256 GEMM: %.0f "
               "GFLOP/s\n", label, round, bits, (long long)R, (long long)N, mv / 1e9, cp / 1e9, mv / cp,
               (double)bytes * 3 / (t3 - t2) / 1e9, 2.0 * (double)R * N * 256 * 3 / (t4 - t3) / 1e9);
    }
    gfree((void *)w.w), gfree((void *)w.scales), gfree((void *)w.biases), gfree(gxb), gfree(gy);
    gfree(c1), gfree(c2), free(hw), free(hs), free(hb), free(x);
    status_ok("bench");
}

/* ==== Decode-shape timings (printed, never asserted) ====
 * The products of one Qwen3-30B-A3B decode step (4-bit group 64, bf16 scales; the
 * router 8-bit) and its grouped experts (8 of 128), each call on a different copy of
 * the weight so that the data streams from HBM and not from the 60 MB L2, against a
 * device-to-device copy of the same run. MOEFLUX_OPS_BENCH=decode runs only this. */

#define DB_STREAM ((size_t)256 << 20)   // bytes rotated through per shape (> 4x L2)

static double db_copy_gbs(void) {
    void *c1 = E.go->alloc(E.gx, DB_STREAM), *c2 = E.go->alloc(E.gx, DB_STREAM);
    E.go->copy(E.gx, c1, 0, c2, 0, DB_STREAM);
    E.go->sync(E.gx);
    double t0 = now_s();
    for (int i = 0; i < 10; i++)
        E.go->copy(E.gx, c1, 0, c2, 0, DB_STREAM);
    E.go->sync(E.gx);
    double gbs = 2.0 * (double)DB_STREAM * 10 / (now_s() - t0) / 1e9;
    gfree(c1), gfree(c2);
    return gbs;
}

// Microseconds per one-token matvec of [R x N], rotating over enough weight copies.
static double db_mv_us(int64_t R, int64_t N, int bits, size_t *bytes) {
    struct mf_weight w = {.dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_BF16, .bits = bits,
                          .group_size = 64, .n_out = R, .n_in = N};
    const size_t wb = (size_t)mf_weight_w_bytes(&w), sb = (size_t)mf_weight_s_bytes(&w);
    const size_t one = (wb + 2 * sb + 255) & ~(size_t)255;
    const int nc = one >= DB_STREAM ? 1 : (int)(DB_STREAM / one), reps = nc < 50 ? 50 : nc;
    uint8_t *h = xmalloc(one);
    memset(h, 0, one);
    for (size_t i = 0; i + 8 <= wb; i += 8) {
        uint64_t r = check_rand(&E.rng);
        memcpy(h + i, &r, 8);
    }
    void *hs = encode(MF_DTYPE_BF16, sb / 2, 0.004f, 0.012f);
    void *hb = encode(MF_DTYPE_BF16, sb / 2, -0.1f, -0.03f);
    memcpy(h + wb, hs, sb), memcpy(h + wb + sb, hb, sb);
    uint8_t *g = E.go->alloc(E.gx, one * (size_t)nc);
    for (int c = 0; c < nc; c++)
        E.go->upload(E.gx, g, one * (size_t)c, h, one);
    float *x = frand((size_t)N, -1, 1), *gx = gput(x, (size_t)N * 4);
    float *gy = E.go->alloc(E.gx, (size_t)R * 4);
    double t0 = 0;
    for (int i = -nc; i < reps; i++) {   // one pass over every copy first
        if (i == 0) {
            E.go->sync(E.gx);
            t0 = now_s();
        }
        const int c = (i + nc) % nc;
        w.w = g + one * (size_t)c;
        w.scales = g + one * (size_t)c + wb;
        w.biases = g + one * (size_t)c + wb + sb;
        E.go->matmul(E.gx, gy, &w, gx, 1);
    }
    E.go->sync(E.gx);
    const double us = (now_s() - t0) / reps * 1e6;
    *bytes = wb + 2 * sb;
    gfree(g), gfree(gx), gfree(gy), free(h), free(hs), free(hb), free(x);
    return us;
}

// Microseconds per decode call of moe_experts_dev: 8 of 128 A3B experts, 16 disjoint
// expert sets in turn (the 128 blobs, 340 MB, stream from HBM). ahead: with route_ahead
// (the ids and x are uploaded once, so the calls may overlap as moe.c's do behind a
// shared expert).
static double db_experts_us(size_t *bytes, int ahead) {
    enum { NE = 128, K = 8, H = 2048, I = 768, NS = NE / K, REPS = 160 };
    struct blob_layout L = layout(H, I, 4, 64, MF_DTYPE_BF16);
    uint8_t *blob = xmalloc(L.bytes), *g = E.go->alloc(E.gx, L.bytes * NE);
    memset(blob, 0, L.bytes);   // the padding after the last component
    fill_blob(blob, &L);
    for (int e = 0; e < NE; e++)
        E.go->upload(E.gx, g, L.bytes * (size_t)e, blob, L.bytes);
    int32_t idx[NE];
    float wt[NE];
    for (int e = 0; e < NE; e++)
        idx[e] = (e * 37) % NE, wt[e] = 0.1f + 0.01f * (float)(e % 8);
    int32_t *gi = gput(idx, sizeof idx);
    float *gw = gput(wt, sizeof wt), *x = frand(H, -1, 1), *gx = gput(x, H * 4);
    float *gy = E.go->alloc(E.gx, H * 4);
    struct mf_moe_dev d = {.n_tok = 1, .k = K, .base = g, .stride = (int64_t)L.bytes,
                           .gate = &L.gate, .up = &L.up, .down = &L.down,
                           .xg = E.go->alloc(E.gx, K * H * 4),
                           .gu = E.go->alloc(E.gx, K * 2 * I * 4),
                           .eo = E.go->alloc(E.gx, K * H * 4), .route_ahead = ahead};
    double t0 = 0;
    for (int i = -NS; i < REPS; i++) {
        if (i == 0) {
            E.go->sync(E.gx);
            t0 = now_s();
        }
        const int s = (i + NS) % NS;
        d.idx = gi + s * K;
        d.w = gw + s * K;
        E.go->moe_experts_dev(E.gx, gy, gx, &d);
    }
    E.go->sync(E.gx);
    const double us = (now_s() - t0) / REPS * 1e6;
    *bytes = K * (size_t)(mf_weight_w_bytes(&L.gate) + 2 * mf_weight_s_bytes(&L.gate)) * 3;
    gfree(d.xg), gfree(d.gu), gfree(d.eo), gfree(gi), gfree(gw), gfree(gx), gfree(gy);
    gfree(g), free(blob), free(x);
    return us;
}

static void bench_decode(void) {
    // per_layer: calls of the shape in one decoder layer (k_proj's shape is v_proj's too)
    static const struct { const char *name; int64_t r, n; int bits, per_layer; } S[] = {
        {"q_proj", 4096, 2048, 4, 1}, {"k_proj", 512, 2048, 4, 2},
        {"o_proj", 2048, 4096, 4, 1}, {"router", 128, 2048, 8, 1},
        {"lm_head", 151936, 2048, 4, 0}};
    for (int round = 0; round < 3; round++) {
        const double cp = db_copy_gbs();
        double total = 0;
        printf("decode-bench round %d: copy %.0f GB/s;", round, cp);
        for (size_t i = 0; i < sizeof S / sizeof S[0]; i++) {
            size_t b = 0;
            const double us = db_mv_us(S[i].r, S[i].n, S[i].bits, &b);
            printf(" %s %.1f us (%.2f)", S[i].name, us, (double)b / us / 1e3 / cp);
            total += us * S[i].per_layer;
        }
        size_t b = 0;
        const double us = db_experts_us(&b, 0), ua = db_experts_us(&b, 1);
        total += us;
        printf(" experts %.1f us (%.2f), route ahead %.1f us; layer products %.1f us\n", us,
               (double)b / us / 1e3 / cp, ua, total);
    }
    status_ok("bench_decode");
}

/* ==== gpt-oss: MXFP4 matmul, clamped SwiGLU ==== */

// An MXFP4 weight on both backends: random codes, scale bytes 120..131 (2^-7 .. 2^4).
static void tw_mxfp4(struct tw *t, int64_t n_out, int64_t n_in) {
    memset(t, 0, sizeof *t);
    struct mf_weight w = {.dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_U8, .bits = 4,
                          .group_size = 32, .qmode = MF_QMODE_MXFP4, .n_out = n_out,
                          .n_in = n_in};
    size_t wb = (size_t)mf_weight_w_bytes(&w), sb = (size_t)mf_weight_s_bytes(&w);
    t->hw = xmalloc(wb);
    t->hs = xmalloc(sb);
    for (size_t i = 0; i < wb; i++)
        ((uint8_t *)t->hw)[i] = (uint8_t)(check_rand(&E.rng) >> 56);
    for (size_t i = 0; i < sb; i++)
        ((uint8_t *)t->hs)[i] = (uint8_t)(120 + check_rand(&E.rng) % 12);
    w.w = t->hw;
    w.scales = t->hs;
    t->c = w;
    t->deq = xmalloc((size_t)(n_out * n_in) * sizeof(float));
    for (int64_t r = 0; r < n_out; r++)
        mf_cpu_dequant_ref(t->deq + r * n_in, &w, r, 0, n_in);
    t->g = w;
    t->g.w = gput(t->hw, wb);
    t->g.scales = gput(t->hs, sb);
}

static void test_gptoss(void) {
    struct tw t;
    tw_mxfp4(&t, 77, 2880);   // gpt-oss's hidden size
    const int nts[] = {1, 3, 4, 9};
    for (size_t i = 0; i < sizeof nts / sizeof nts[0]; i++)
        test_matmul(&t, nts[i], 0);
    gfree((void *)t.g.w);
    gfree((void *)t.g.scales);
    free(t.hw), free(t.hs), free(t.deq);
    CHECK(E.go->swiglu_clamped != NULL, "the device backend has no swiglu_clamped");
    if (E.go->swiglu_clamped) {
        const int R = 7, C = 1000;
        float *gu = frand((size_t)R * 2 * C, -12, 12), *yc = fpoison((size_t)R * C);
        E.co->swiglu_clamped(E.cx, yc, gu, gu + C, R, C, 2 * C, 1.702f, 7.0f);
        float *ggu = gput(gu, (size_t)R * 2 * C * 4), *gy = gpoison((size_t)R * C * 4);
        E.go->swiglu_clamped(E.gx, gy, ggu, ggu + C, R, C, 2 * C, 1.702f, 7.0f);
        float *yg = gget(gy, (size_t)R * C);
        cmp_rel("swiglu_clamped strided", yc, yg, (size_t)R * C, RTOL);
        free(gu), free(yc), free(yg), gfree(ggu), gfree(gy);
    }
    status_ok("gptoss");
}

/* ==== main ==== */

static int open_backends(int against_cpu) {
    char err[4096] = "";
    int rc = mf_backend_cpu_new(&E.cb, err, sizeof err);
    if (!rc)
        rc = against_cpu ? mf_backend_cpu_new(&E.gb, err, sizeof err)
                         : mf_backend_new(&E.gb, "cuda", err, sizeof err);
    if (!rc)
        rc = E.cb->ops->exec_new(E.cb, 2, &E.cx, err, sizeof err);
    if (!rc && !against_cpu)   // every fusion on, whatever the default (the ops under test)
        setenv("MOEFLUX_GPU_FUSE", "all", 1);
    if (!rc)
        rc = E.gb->ops->exec_new(E.gb, 2, &E.gx, err, sizeof err);
    if (!rc && !against_cpu) {
        setenv("MOEFLUX_GPU_ATTN_TILE", "0", 1);
        setenv("MOEFLUX_GPU_FUSE", "0", 1);
        setenv("MOEFLUX_GPU_ATTN_BLOCK", "64", 1);   // gx's blocks go by size
        rc = E.gb->ops->exec_new(E.gb, 2, &E.gx_untiled, err, sizeof err);
        unsetenv("MOEFLUX_GPU_ATTN_TILE");
        unsetenv("MOEFLUX_GPU_FUSE");
        unsetenv("MOEFLUX_GPU_ATTN_BLOCK");
    }
    CHECK(rc == MF_OK, "backends: %s", err);
    if (rc)
        return rc;
    E.co = E.cb->ops;
    E.go = E.gb->ops;
    if (!against_cpu)
        printf("tensor-core kernels: %s\n", mf_backend_cuda_tc(E.gb) ? "on" : "off");
    return MF_OK;
}

int main(void) {
    const char *against = getenv("MOEFLUX_OPS_AGAINST");
    const int against_cpu = against && strcmp(against, "cpu") == 0;
    if (!against_cpu) {
        char err[2048] = "";
        if (mf_backend_cuda_probe(err, sizeof err) != MF_OK) {
            void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
            if (!lib) {
                printf("SKIP: no CUDA driver (%s)\n", err);
                return 0;
            }
            dlclose(lib);
            CHECK(0, "a CUDA driver is installed but the backend is not usable: %s", err);
            return check_finish("test_backend_ops");
        }
    }
    E.against_cpu = against_cpu;
    E.progress = getenv("MOEFLUX_OPS_PROGRESS") != NULL;
    if (E.progress)
        setvbuf(stdout, NULL, _IOLBF, 0);   // each line as it is printed
    E.t_start = now_s();
    // MOEFLUX_OPS_NO_BENCH: the comparisons only (the CPU executor's device, where
    // timings mean nothing)
    const int bench_too = !against_cpu && !getenv("MOEFLUX_OPS_NO_BENCH");
    // MOEFLUX_OPS_SEED: a printed seed again, to reproduce a run's cases
    const char *seed = getenv("MOEFLUX_OPS_SEED");
    E.rng = seed ? strtoull(seed, NULL, 10)
                 : (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uint64_t)clock() ^ 0x5bd1e995u;
    if (!E.rng)
        E.rng = 1;
    printf("seed %llu, device backend %s\n", (unsigned long long)E.rng,
           against_cpu ? "cpu (harness check)" : "cuda");
    if (!against_cpu)
        test_cache();
    const char *only = getenv("MOEFLUX_OPS_BENCH");
    if (!against_cpu && only && strcmp(only, "decode") == 0) {
        if (open_backends(0) == MF_OK)
            bench_decode();
    } else if (open_backends(against_cpu) != MF_OK) {
        // reported by open_backends
    } else if (getenv("MOEFLUX_OPS_TC_ONLY")) {
        // make test-cuda's pass with the portable form of the tensor-core step: only
        // meaningful with the tensor-core kernels on.
        CHECK(against_cpu || mf_backend_cuda_tc(E.gb),
              "MOEFLUX_OPS_TC_ONLY: the tensor-core kernels are off (MOEFLUX_GPU_TC=1 on "
              "an sm_80 or later device turns them on)");
        test_tc_products();
        test_multis();
        test_tc_experts();
        test_mma_experts();
        test_experts_dev();
        printf("%d comparisons (tensor-core products only)\n", E.n_case);
    } else if (getenv("MOEFLUX_OPS_ONLY") && strcmp(getenv("MOEFLUX_OPS_ONLY"), "fused") == 0) {
        // the products that take a neighbour's work (a quick pass on the CPU executor)
        test_rms_multis();
        test_rms_route();
        test_attention();
        test_multis();
        test_experts_dev();
        printf("%d comparisons (fused products only)\n", E.n_case);
    } else {
        double t0 = now_s();
        test_memory();
        test_weights_map();
        if (!against_cpu) {
            test_status();
            test_carveout();
        }
        test_norms();
        test_rms_multis();
        test_rope();
        test_rope_qk();
        test_elementwise();
        test_rows();
        test_flag();
        test_axpy_flag();
        test_route();
        test_rms_route();
        test_experts();
        test_experts_dev();
        test_gdn();
        test_attention();
        test_attention_ext();
        test_products();
        test_gptoss();
        printf("%d comparisons, %d near-tie tokens skipped, %.1f s\n", E.n_case, E.n_skip,
               now_s() - t0);
        if (bench_too)
            for (int b = 0; b < 3; b++)
                bench("matvec", (int[]){4, 8, 2}[b]);
        if (bench_too)
            bench_decode();
    }
    if (E.gx)
        E.go->exec_free(E.gx);
    if (E.gx_untiled)
        E.go->exec_free(E.gx_untiled);
    if (E.cx)
        E.co->exec_free(E.cx);
    if (E.gb)
        E.gb->ops->free(E.gb);
    if (E.cb)
        E.cb->ops->free(E.cb);
    return check_finish("test_backend_ops");
}
