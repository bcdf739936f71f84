/*
 * test_metal_twin.c — every compute op of the Metal backend against its CUDA twin.
 *
 * The CUDA ops (cuda_ops.c) run and pass on an NVIDIA GPU (make test-cuda). The Metal
 * ops (metal_ops.c) must hand the same kernels the same work: here both run with
 * their launch layers replaced by recorders (the CUDA launch/argument ring/scratch and
 * the Metal glue), on the same arguments, and the recorded launches must agree in
 * kernel, grid, threadgroup, params bytes and buffers (host arguments by content),
 * as must copies and errors. Expert batches are given one buffer region starting at
 * the lowest blob, where the Metal driver's per-region offsets equal CUDA's. What
 * this cannot see: the glue itself (buffer lookup, encoding, waits), checked only on a
 * Mac by make test-metal.
 *
 * Linked with cuda_ops.c, metal_ops.c, backend.c and common.c only (Makefile), so the
 * recorders below stand in for cuda_backend.c and metal_backend.m.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cuda/cuda_internal.h"
#include "backends/metal/metal_internal.h"
#include "check.h"

/* ==== Recorders ==== */

#define MAX_REC 32
#define MAX_ARG 8
#define ARG_BYTES 4096
#define SCRATCH0 0x50000000ull   // attention partials on both sides
#define SCRATCH1 0x60000000ull   // routing outputs
#define ARG_BASE(side) ((side) ? 0xB0000000ull : 0xA0000000ull)

static const size_t params_size[] = {
#define K(name, params, n_buf, grid) sizeof(struct params),
#include "../../shaders/kernels.def"
#undef K
};

struct rec {
    int kid, n_buf;
    unsigned g[3], b[3];
    unsigned char params[256];
    uint64_t bufs[16];
};

struct side {
    struct rec r[MAX_REC];
    int n;
    unsigned char args[MAX_ARG][ARG_BYTES];
    size_t arg_n[MAX_ARG];
    int n_arg;
    uint64_t copy[3];      // dst, src, bytes of the last device copy
    int n_copy;
};

// Recording state of the two sides (0 CUDA, 1 Metal): this program's own.
static struct side S[2];

static void record(int side, int kid, const unsigned g[3], const unsigned b[3],
                   const void *params, const uint64_t *bufs, int n_buf) {
    struct side *s = &S[side];
    if (s->n == MAX_REC || g[0] == 0 || g[1] == 0 || g[2] == 0)
        return;
    struct rec *r = &s->r[s->n++];
    r->kid = kid;
    r->n_buf = n_buf;
    memcpy(r->g, g, sizeof r->g);
    memcpy(r->b, b, sizeof r->b);
    memcpy(r->params, params, params_size[kid]);
    for (int i = 0; i < n_buf && i < 16; i++)
        r->bufs[i] = bufs[i];
}

static uint64_t put_arg(int side, const void *src, size_t n) {
    struct side *s = &S[side];
    if (s->n_arg == MAX_ARG || n > ARG_BYTES)
        return 0;
    memcpy(s->args[s->n_arg], src, n);
    s->arg_n[s->n_arg] = n;
    return ARG_BASE(side) + 0x10000ull * (uint64_t)s->n_arg++;
}

static void fail_first(struct mf_exec *ex, int status) {
    if (ex->status == MF_OK)
        ex->status = status;
}

/* ---- the CUDA side (what cuda_backend.c provides to cuda_ops.c) */

void mf_cuda_enter(struct mf_exec *ex) { (void)ex; }
void mf_cuda_prof_flush(struct mf_exec *ex) { (void)ex; }
CUstream mf_cuda_stream(struct mf_exec *ex) { return ex->st; }

void mf_cuda_fail(struct mf_exec *ex, int status, const char *fmt, ...) {
    (void)fmt;
    fail_first(ex, status);
}

int mf_cuda_ck(struct mf_exec *ex, CUresult r, const char *op, const char *call) {
    (void)op, (void)call;
    if (r != MF_CUDA_SUCCESS)
        fail_first(ex, MF_ERR_BACKEND);
    return r == MF_CUDA_SUCCESS;
}

void mf_cuda_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                    const void *params, size_t params_bytes, const CUdeviceptr *bufs,
                    int n_buf, const char *op) {
    (void)ex, (void)op, (void)params_bytes;
    uint64_t u[16] = {0};
    for (int i = 0; i < n_buf && i < 16; i++)
        u[i] = (uint64_t)bufs[i];
    record(0, kid, g, b, params, u, n_buf);
}

CUdeviceptr mf_cuda_ring_put(struct mf_exec *ex, const void *src, size_t n, const char *op) {
    (void)ex, (void)op;
    return put_arg(0, src, n);
}

CUdeviceptr mf_cuda_scratch(struct mf_exec *ex, CUdeviceptr *buf, size_t *have, size_t n,
                            const char *op) {
    (void)have, (void)n, (void)op;
    return buf == &ex->ws ? SCRATCH0 : SCRATCH1;
}

static CUresult fake_dtod(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream st) {
    (void)st;
    S[0].copy[0] = dst, S[0].copy[1] = src, S[0].copy[2] = n;
    S[0].n_copy++;
    return MF_CUDA_SUCCESS;
}

static CUresult fake_dtoh(void *dst, CUdeviceptr src, size_t n, CUstream st) {
    (void)dst, (void)src, (void)n, (void)st;
    return MF_CUDA_SUCCESS;
}

static CUresult fake_sync(CUstream st) {
    (void)st;
    return MF_CUDA_SUCCESS;
}

/* ---- the Metal side (what metal_backend.m provides to metal_ops.c); the exec is
 * opaque to metal_ops.c, so an exec of the CUDA layout serves here */

// Start of the one region the expert blobs of a batch lie in (set per case).
static uintptr_t region_base;

void mf_metal_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                     const void *params, size_t params_bytes, const void *const *bufs,
                     int n_buf, const char *op) {
    (void)ex, (void)op;
    CHECK(params_bytes == params_size[kid], "%s: %zu params bytes, manifest struct %zu",
          mf_metal_kernel_names[kid], params_bytes, params_size[kid]);
    uint64_t u[16] = {0};
    for (int i = 0; i < n_buf && i < 16; i++)
        u[i] = (uint64_t)(uintptr_t)bufs[i];
    record(1, kid, g, b, params, u, n_buf);
}

const void *mf_metal_host_arg(struct mf_exec *ex, const void *src, size_t n, const char *op) {
    (void)ex, (void)op;
    return (const void *)(uintptr_t)put_arg(1, src, n);
}

void *mf_metal_scratch(struct mf_exec *ex, int slot, size_t n, const char *op) {
    (void)ex, (void)n, (void)op;
    return (void *)(uintptr_t)(slot ? SCRATCH1 : SCRATCH0);
}

const void *mf_metal_region(struct mf_exec *ex, const void *p, size_t need, const char *op) {
    (void)ex, (void)p, (void)need, (void)op;
    return (const void *)region_base;
}

void mf_metal_wait(struct mf_exec *ex, const char *op) { (void)ex, (void)op; }

void mf_metal_copy(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                   size_t src_off, size_t bytes) {
    (void)ex;
    S[1].copy[0] = (uint64_t)(uintptr_t)dst + dst_off;
    S[1].copy[1] = (uint64_t)(uintptr_t)src + src_off;
    S[1].copy[2] = bytes;
    S[1].n_copy++;
}

void mf_metal_download(struct mf_exec *ex, void *dst_host, const void *src, size_t src_off,
                       size_t bytes) {
    (void)ex, (void)dst_host, (void)src, (void)src_off, (void)bytes;
}

void mf_metal_fail(struct mf_exec *ex, int status, const char *fmt, ...) {
    (void)fmt;
    fail_first(ex, status);
}

int mf_metal_failed(const struct mf_exec *ex) { return ex->status != MF_OK; }
int mf_metal_tc(const struct mf_exec *ex) { return ex->cb->tc; }
int mf_metal_mma(const struct mf_exec *ex) { return ex->cb->mma; }
int mf_metal_attn_tile(const struct mf_exec *ex) { return ex->attn_tile; }
int mf_metal_attn_block(const struct mf_exec *ex) { return ex->attn_block; }
int mf_metal_fuse(const struct mf_exec *ex) { return ex->fuse; }
int *mf_metal_counter(struct mf_exec *ex, const char *op) {
    (void)op;
    return (int *)(uintptr_t)ex->count_dev;
}

/* ---- what backend.c refers to, not linked here */

int mf_backend_cpu_new(struct mf_backend **out, char *err, size_t errlen) {
    (void)out;
    return mf_err(err, errlen, MF_ERR_BACKEND, "not in this test");
}

int mf_backend_cpu_new_kernels(struct mf_backend **out, const char *kernels, char *err,
                               size_t errlen) {
    (void)kernels;
    return mf_backend_cpu_new(out, err, errlen);
}

int mf_backend_cuda_new(struct mf_backend **out, char *err, size_t errlen) {
    return mf_backend_cpu_new(out, err, errlen);
}

int mf_backend_cuda_probe(char *err, size_t errlen) {
    return mf_backend_cpu_new(NULL, err, errlen);
}

#if defined(__APPLE__)
int mf_backend_metal_new(struct mf_backend **out, char *err, size_t errlen) {
    return mf_backend_cpu_new(out, err, errlen);
}

int mf_backend_metal_probe(char *err, size_t errlen) {
    return mf_backend_cpu_new(NULL, err, errlen);
}
#endif

/* ==== Comparison ==== */

static struct mf_cuda_be fake_be;
static struct mf_exec E[2];   // [0] for the CUDA ops, [1] for the Metal ops
static int n_cases, n_launches, n_tc;   // n_tc: launches of the tensor-core kernels
static int n_mma;                       // of the prefill kernels of mma.h
static int n_tile;                      // of mf_attn_tile
static int attn_tile = 1;               // each exec's switch, as exec_new sets it
static int attn_block;                  // likewise (MOEFLUX_GPU_ATTN_BLOCK)
static int fuse = MF_FUSE_ALL;          // likewise (MOEFLUX_GPU_FUSE)
static int n_norm;                      // launches of mf_mv_multi1n
static int n_route1n;                   // of mf_route1n
static int n_part1;                     // of mf_attn_part1
static int n_gmulti;                    // of mf_gemm_mma_multi

static void reset(void) {
    memset(S, 0, sizeof S);
    for (int i = 0; i < 2; i++) {
        memset(&E[i], 0, sizeof E[i]);
        E[i].cb = &fake_be;
        E[i].attn_tile = attn_tile;
        E[i].attn_block = attn_block;
        E[i].fuse = fuse;
        E[i].count_dev = 0x7000000;
    }
}

static int arg_index(int side, uint64_t a) {
    uint64_t d = a - ARG_BASE(side);
    return a >= ARG_BASE(side) && d % 0x10000ull == 0 && d / 0x10000ull < MAX_ARG
               ? (int)(d / 0x10000ull)
               : -1;
}

static void compare_buf(const char *what, int i, int j, uint64_t c, uint64_t m) {
    int ac = arg_index(0, c), am = arg_index(1, m);
    if (ac < 0 && am < 0) {
        CHECK(c == m, "%s: launch %d buffer %d: cuda %#llx, metal %#llx", what, i, j,
              (unsigned long long)c, (unsigned long long)m);
        return;
    }
    CHECK(ac >= 0 && am >= 0 && S[0].arg_n[ac] == S[1].arg_n[am] &&
              memcmp(S[0].args[ac], S[1].args[am], S[0].arg_n[ac]) == 0,
          "%s: launch %d buffer %d: host arguments differ", what, i, j);
}

static void compare(const char *what) {
    n_cases++;
    n_launches += S[1].n;
    for (int i = 0; i < S[0].n; i++) {
        const int k = S[0].r[i].kid;
        n_mma += k == MF_KID_mf_moe_gu_mma || k == MF_KID_mf_moe_down_mma ||
                 k == MF_KID_mf_gemm_mma || k == MF_KID_mf_gemm_mma_multi;
        n_tile += k == MF_KID_mf_attn_tile;
        n_norm += k == MF_KID_mf_mv_multi1n;
        n_route1n += k == MF_KID_mf_route1n;
        n_part1 += k == MF_KID_mf_attn_part1;
        n_gmulti += k == MF_KID_mf_gemm_mma_multi;
        n_tc += k == MF_KID_mf_mv_tc || k == MF_KID_mf_moe_gu_tc || k == MF_KID_mf_moe_down_tc;
    }
    CHECK(S[0].n == S[1].n && S[0].n < MAX_REC, "%s: cuda %d launches, metal %d", what,
          S[0].n, S[1].n);
    CHECK(E[0].status == E[1].status, "%s: status cuda %d, metal %d", what, E[0].status,
          E[1].status);
    CHECK(S[0].n_copy == S[1].n_copy && memcmp(S[0].copy, S[1].copy, sizeof S[0].copy) == 0,
          "%s: device copies differ", what);
    for (int i = 0; i < S[0].n && i < S[1].n; i++) {
        const struct rec *c = &S[0].r[i], *m = &S[1].r[i];
        CHECK(c->kid == m->kid && c->n_buf == m->n_buf, "%s: launch %d: kernel %d/%d vs "
              "%d/%d", what, i, c->kid, c->n_buf, m->kid, m->n_buf);
        if (c->kid != m->kid)
            continue;
        CHECK(memcmp(c->g, m->g, sizeof c->g) == 0 && memcmp(c->b, m->b, sizeof c->b) == 0,
              "%s: launch %d (%s): geometry differs", what, i, mf_metal_kernel_names[c->kid]);
        CHECK(memcmp(c->params, m->params, params_size[c->kid]) == 0,
              "%s: launch %d (%s): params differ", what, i, mf_metal_kernel_names[c->kid]);
        for (int j = 0; j < c->n_buf; j++)
            compare_buf(what, i, j, c->bufs[j], m->bufs[j]);
    }
}

// Runs op on both sides with the same arguments, then compares the recordings.
#define BOTH(op, ...)                                 \
    do {                                              \
        reset();                                      \
        mf_cuda_##op(&E[0], __VA_ARGS__);             \
        mf_metal_##op(&E[1], __VA_ARGS__);            \
        compare(#op);                                 \
    } while (0)

#define P(a) ((void *)(uintptr_t)(a))

/* ==== Cases ==== */

static struct mf_weight quant(int bits, int gs, enum mf_dtype sdt, int64_t n_out,
                              int64_t n_in) {
    struct mf_weight w = {.w = P(0x30000000), .scales = P(0x31000000),
                          .biases = P(0x32000000), .dtype = MF_DTYPE_U32, .sdtype = sdt,
                          .bits = bits, .group_size = gs, .n_out = n_out, .n_in = n_in};
    return w;
}

static struct mf_weight flt(enum mf_dtype dt, int64_t n_out, int64_t n_in) {
    struct mf_weight w = {.w = P(0x33000000), .dtype = dt, .n_out = n_out, .n_in = n_in};
    return w;
}

static void test_products(void) {
    float *y = P(0x10000000), *x = P(0x11000000);
    const int toks[] = {1, 4, 8, 9, 70};
    const int bits[] = {2, 3, 4, 5, 6, 8};
    for (size_t t = 0; t < sizeof toks / sizeof toks[0]; t++)
        for (size_t b = 0; b < sizeof bits / sizeof bits[0]; b++) {
            struct mf_weight w = quant(bits[b], b % 2 ? 64 : 128, MF_DTYPE_BF16, 300, 1024);
            BOTH(matmul, y, &w, x, toks[t]);
            BOTH(matmul_t, y, &w, x, toks[t]);
            BOTH(matmul_heads, y, 96, 32, &w, 40, (int)(b % 2), x, 700, 64, toks[t], 3);
        }
    struct mf_weight f = flt(MF_DTYPE_F16, 17, 33);
    BOTH(matmul, y, &f, x, 2);
    struct mf_weight bad = quant(7, 64, MF_DTYPE_F16, 8, 128);
    BOTH(matmul, y, &bad, x, 1);
    bad = quant(4, 64, MF_DTYPE_U8, 8, 128);   // affine codes with U8 scales: refused
    BOTH(matmul, y, &bad, x, 1);
    CHECK(E[0].status == MF_ERR_ARG && S[0].n == 0, "affine weight with U8 scales: "
          "status %d, %d launches", E[0].status, S[0].n);
    const int32_t tok[5] = {3, 1, 4, 1, 5};
    struct mf_weight e = quant(4, 64, MF_DTYPE_F32, 1000, 256);
    BOTH(embed, y, &e, tok, 5);
    // gpt-oss's MXFP4 experts: the matvec for any token count; matmul_t, heads and
    // embed refused alike (as are the affine kernels: check_weight).
    struct mf_weight m = {.w = P(0x30000000), .scales = P(0x31000000),
                          .dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_U8, .bits = 4,
                          .group_size = 32, .qmode = MF_QMODE_MXFP4, .n_out = 300,
                          .n_in = 2880};
    for (size_t t = 0; t < sizeof toks / sizeof toks[0]; t++)
        BOTH(matmul, y, &m, x, toks[t]);
    BOTH(matmul_t, y, &m, x, 2);
    BOTH(matmul_heads, y, 96, 32, &m, 40, 0, x, 700, 64, 1, 3);
    BOTH(embed, y, &m, tok, 5);
    // matmul_multi: one mf_mv_multi launch (mixed formats, 1-3 products), or one
    // matmul each beyond the matvec's token count, for MXFP4 or for unequal n_in.
    float *ys[3] = {y, P(0x12000000), P(0x13000000)};
    struct mf_weight q = quant(4, 64, MF_DTYPE_BF16, 4096, 1024);
    struct mf_weight r = quant(8, 32, MF_DTYPE_F16, 128, 1024);
    struct mf_weight fl = flt(MF_DTYPE_BF16, 77, 1024), other = flt(MF_DTYPE_F32, 5, 512);
    const struct mf_weight *mix[3] = {&q, &r, &fl}, *odd[3] = {&q, &other, &fl},
                           *mx[2] = {&q, &m};
    for (int n = 1; n <= 3; n++)
        for (size_t t = 0; t < sizeof toks / sizeof toks[0]; t++)
            BOTH(matmul_multi, n, ys, mix, x, toks[t]);
    BOTH(matmul_multi, 3, ys, odd, x, 1);
    BOTH(matmul_multi, 2, ys, mx, x, 1);
    struct mf_weight bad2 = quant(7, 64, MF_DTYPE_F16, 8, 1024);
    const struct mf_weight *wbad[2] = {&q, &bad2};
    BOTH(matmul_multi, 2, ys, wbad, x, 1);
    // a prefill's q, k and v in the prefill tensor-core formats: one mf_gemm_mma_multi
    // launch (the gemm fusion on), else one mf_gemm_mma each
    struct mf_weight kq = quant(4, 64, MF_DTYPE_BF16, 512, 1024);
    struct mf_weight vq = quant(2, 128, MF_DTYPE_F16, 130, 1024);
    const struct mf_weight *qkv[3] = {&q, &kq, &vq};
    const int gm = n_gmulti, mma0 = n_mma;
    BOTH(matmul_multi, 3, ys, qkv, x, 70);
    BOTH(matmul_multi, 2, ys, qkv + 1, x, 9);
    fuse = 0;
    BOTH(matmul_multi, 3, ys, qkv, x, 70);
    fuse = MF_FUSE_ALL;
    CHECK(fake_be.mma == 0 || (n_gmulti == gm + 2 && n_mma == mma0 + 5),
          "q, k, v of many tokens: %d mf_gemm_mma_multi launches (expected 2), %d of the "
          "prefill kernels (expected 5)", n_gmulti - gm, n_mma - mma0);
    // rms_matmul_multi: one mf_mv_multi1n launch for one token of affine products (with
    // or without gains), else rmsnorm then matmul_multi (a float weight, more tokens,
    // the switch off, a quantized gain refused).
    float *xn = P(0x15000000);
    struct mf_weight g = flt(MF_DTYPE_BF16, 1, 1024), qg = quant(4, 64, MF_DTYPE_F16, 1, 1024);
    const struct mf_weight *qr[3] = {&q, &r, &q};
    for (int n = 1; n <= 3; n++) {
        BOTH(rms_matmul_multi, n, ys, qr, xn, x, &g, 1e-6f, 1);
        BOTH(rms_matmul_multi, n, ys, mix, xn, x, &g, 1e-6f, 1);
        BOTH(rms_matmul_multi, n, ys, qr, xn, x, NULL, 1e-5f, 3);
    }
    BOTH(rms_matmul_multi, 2, ys, qr, xn, x, NULL, 1e-5f, 1);
    BOTH(rms_matmul_multi, 2, ys, qr, xn, x, &qg, 1e-5f, 1);
    fuse = 0;
    BOTH(rms_matmul_multi, 3, ys, qr, xn, x, &g, 1e-6f, 1);
    fuse = MF_FUSE_ALL;
    // matmul_add: mf_mv1 adding into y for one token (affine or float), else matmul
    // into tmp and axpy (more tokens, MXFP4, the tensor-core formats while they are on)
    float *tmp = P(0x16000000);
    for (size_t t = 0; t < sizeof toks / sizeof toks[0]; t++) {
        BOTH(matmul_add, y, &q, x, toks[t], tmp);
        BOTH(matmul_add, y, &fl, x, toks[t], tmp);
    }
    BOTH(matmul_add, y, &r, x, 1, tmp);
    BOTH(matmul_add, y, &m, x, 1, tmp);
    fuse = 0;
    BOTH(matmul_add, y, &r, x, 1, tmp);
    fuse = MF_FUSE_ALL;
}

static void test_norms_rope_attention(void) {
    float *y = P(0x10000000), *x = P(0x11000000), *z = P(0x12000000);
    struct mf_weight g = flt(MF_DTYPE_BF16, 1, 128);
    BOTH(rmsnorm, y, x, &g, 7, 128, 1e-6f, 1.0f);
    BOTH(rmsnorm, y, x, NULL, 7, 128, 1e-6f, 0.5f);
    BOTH(rmsnorm_heads, y, x, &g, 5, 1000, 4, 130, 128, 1e-5f, 1.0f);
    BOTH(rmsnorm_gated, y, x, z, &g, 3, 128, 1e-6f);
    BOTH(add_rmsnorm, y, x, z, &g, 3, 2048, 1e-6f);
    BOTH(add_rmsnorm, y, x, z, NULL, 1, 128, 1e-5f);
    struct mf_weight qg = quant(4, 64, MF_DTYPE_F16, 1, 128);
    BOTH(rmsnorm, y, x, &qg, 1, 128, 1e-6f, 1.0f);
    BOTH(add_rmsnorm, y, x, z, &qg, 1, 128, 1e-6f);
    BOTH(rope, x, 6, 8, 1024, 128, 64, P(0x13000000), 17, 0, 1.0f);
    BOTH(rope, x, 1, 2, 576, 64, 64, P(0x13000000), 300, 1, 0.7f);
    // rope_qk: norms on both, on q only (quantized: refused), none; and normalised
    // heads longer than MF_ROPE_QK_NORM_MAX (refused: mf_rope_qk splits those)
    struct mf_weight kg = flt(MF_DTYPE_F32, 1, 128), big = flt(MF_DTYPE_BF16, 1, 1100);
    struct mf_rope_qk r = {.x = {x, z}, .heads = {8, 2}, .tok_stride = {1024, 256},
                           .head_stride = {128, 128}, .norm = {&g, &kg}, .n_tok = 3,
                           .head_dim = 128, .n_rot = 64, .pos0 = 40, .eps = 1e-6f,
                           .mscale = 1.0f, .inv_freq = P(0x13000000)};
    BOTH(rope_qk, &r);
    r.norm[1] = NULL, r.traditional = 1, r.mscale = 0.7f;
    BOTH(rope_qk, &r);
    r.norm[0] = &qg;
    BOTH(rope_qk, &r);
    r.norm[0] = NULL;
    BOTH(rope_qk, &r);
    r.norm[0] = &big, r.head_dim = 1100, r.head_stride[0] = r.head_stride[1] = 1100;
    r.tok_stride[0] = 8800, r.tok_stride[1] = 2200;
    BOTH(rope_qk, &r);
    BOTH(attention, y, x, z, P(0x14000000), 9, 16, 2, 128, 128, 256, 256, 500, 0.088f);
    // a 150-token chunk: one block of queries by size, three of 64 (each pointing into q
    // and out) with MOEFLUX_GPU_ATTN_BLOCK=64; a 512-token chunk at 30000 positions
    // (120 splits of 32 heads: 2 MB of partials a query) in blocks of 64 by size
    const int tile0 = n_tile;
    BOTH(attention, y, x, z, P(0x14000000), 150, 8, 2, 64, 64, 128, 128, 700, 0.125f);
    CHECK(n_tile == tile0 + 1, "150 queries: %d blocks, expected 1", n_tile - tile0);
    attn_block = 64;
    BOTH(attention, y, x, z, P(0x14000000), 150, 8, 2, 64, 64, 128, 128, 700, 0.125f);
    CHECK(n_tile == tile0 + 4, "150 queries: %d blocks of 64, expected 3", n_tile - tile0 - 1);
    attn_block = 0;
    BOTH(attention, y, x, z, P(0x14000000), 512, 32, 4, 128, 128, 512, 512, 30000, 0.088f);
    CHECK(n_tile == tile0 + 12, "512 queries at 30000: %d blocks, expected 8",
          n_tile - tile0 - 4);
    BOTH(attention, y, x, z, P(0x14000000), 1, 16, 1, 576, 512, 576, 576, 3, 0.1f);
    BOTH(attention, y, x, z, P(0x14000000), 1, 4, 1, 2048, 512, 2048, 2048, 0, 0.1f);
    // prefill shapes with tiled attention off (MOEFLUX_GPU_ATTN_TILE=0) on both sides
    attn_tile = 0;
    BOTH(attention, y, x, z, P(0x14000000), 9, 16, 2, 128, 128, 256, 256, 500, 0.088f);
    BOTH(attention, y, x, z, P(0x14000000), 70, 8, 8, 256, 128, 2048, 1024, 60, 0.06f);
    attn_tile = 1;
    // mf_attn_part1 (the partials and the combine in one launch) where a block is not
    // tiled; the pair apart with the fusions off
    const int part1 = n_part1;
    BOTH(attention, y, x, z, P(0x14000000), 1, 32, 4, 128, 128, 512, 512, 3000, 0.088f);
    CHECK(n_part1 == part1 + 1, "decode attention: %d launches of mf_attn_part1, expected 1",
          n_part1 - part1);
    fuse = 0;
    BOTH(attention, y, x, z, P(0x14000000), 1, 32, 4, 128, 128, 512, 512, 3000, 0.088f);
    fuse = MF_FUSE_ALL;
    CHECK(n_part1 == part1 + 1, "attention with the fusions off launched mf_attn_part1");
    BOTH(attention, y, x, z, P(0x14000000), 70, 8, 8, 256, 128, 2048, 1024, 60, 0.06f);
}

static void test_gdn_and_elementwise(void) {
    float *y = P(0x10000000), *s = P(0x11000000), *si = P(0x12000000), *u = P(0x13000000);
    struct mf_weight w = flt(MF_DTYPE_BF16, 8192, 4);
    BOTH(conv1d_silu, y, s, u, &w, 3, 8192, 4);
    BOTH(conv1d_silu_from, y, s, si, u, &w, 0, 8192, 4);
    struct mf_weight al = flt(MF_DTYPE_F32, 1, 32), dt = flt(MF_DTYPE_BF16, 1, 32);
    BOTH(gdn_gates, y, s, u, si, 64, &al, &dt, 5, 32);
    BOTH(gdn_recurrence, y, s, u, si, P(0x14000000), 8192, P(0x15000000), P(0x16000000), 4,
         16, 32, 128, 128);
    BOTH(gdn_recurrence_from, y, s, si, u, si, P(0x14000000), 8192, P(0x15000000),
         P(0x16000000), 0, 16, 32, 128, 128);
    BOTH(gdn_recurrence_from, y, s, si, u, si, P(0x14000000), 8192, P(0x15000000),
         P(0x16000000), 2, 16, 32, 512, 128);
    BOTH(swiglu, y, s, u, 3, 512, 1024);
    BOTH(swiglu_clamped, y, s, u, 3, 512, 1024, 1.702f, 7.0f);
    BOTH(mul_sigmoid, y, s, 4, 2048, 1, 1);
    BOTH(mul_sigmoid, y, s, 4, 64, 4096, 64);
    BOTH(axpy, y, 0.5f, s, 5000);
    BOTH(axpy_flag, y, 1.0f, s, 5000, P(0x17000000));
    const int32_t idx[6] = {2, 0, 5, 5, 1, 3};
    const float wt[6] = {0.5f, 0.25f, 1.0f, -2.0f, 0.125f, 3.0f};
    BOTH(scatter_add_rows, y, s, idx, wt, 6, 2048);
    BOTH(scatter_add_rows, y, s, idx, NULL, 6, 2048);
    BOTH(gather_rows, y, s, idx, 6, 300);
    BOTH(gather_rows_dev, y, s, P(0x17000000), 6, 300);
    BOTH(flag_nonfinite, P(0x18000000), s, (int64_t)5 << 32 | 7);
}

static void test_route(void) {
    float *logits = P(0x10000000);
    int32_t idx_host[64];
    float w_host[64];
    struct mf_route_params sm = {.kind = MF_ROUTE_SOFTMAX, .n_expert = 256, .n_used = 8,
                                 .norm_topk_prob = 1, .n_group = 1, .topk_group = 1,
                                 .routed_scaling_factor = 1.0f};
    BOTH(moe_route, NULL, NULL, logits, NULL, &sm, 3, idx_host, w_host);
    BOTH(moe_route, P(0x19000000), P(0x1a000000), logits, NULL, &sm, 5, NULL, NULL);
    struct mf_route_params tc = {.kind = MF_ROUTE_NOAUX_TC, .n_expert = 256, .n_used = 8,
                                 .norm_topk_prob = 1, .n_group = 8, .topk_group = 4,
                                 .routed_scaling_factor = 2.5f};
    BOTH(moe_route, P(0x19000000), NULL, logits, P(0x1b000000), &tc, 2, idx_host, NULL);
    tc.topk_group = 9;   // refused on both
    BOTH(moe_route, NULL, NULL, logits, NULL, &tc, 1, idx_host, w_host);
    // rms_route: one mf_route1n launch for one token of an affine router with device
    // outputs, else rms_matmul_multi and moe_route (more tokens, a float router, no
    // device outputs, the switch off, a bad routing refused alike)
    tc.topk_group = 4;
    float *xn = P(0x15000000), *x = P(0x11000000);
    struct mf_weight rq = quant(8, 64, MF_DTYPE_BF16, 256, 2048), rf = flt(MF_DTYPE_BF16,
                                                                           256, 2048);
    struct mf_weight g = flt(MF_DTYPE_BF16, 1, 2048);
    int32_t *di = P(0x19000000);
    float *dw = P(0x1a000000), *db = P(0x1b000000);
    BOTH(rms_route, di, dw, logits, NULL, &sm, 1, &rq, xn, x, &g, 1e-6f);
    BOTH(rms_route, di, dw, logits, db, &tc, 1, &rq, xn, x, &g, 1e-6f);
    BOTH(rms_route, di, dw, logits, db, &tc, 1, &rq, xn, x, NULL, 1e-6f);
    BOTH(rms_route, di, dw, logits, NULL, &sm, 3, &rq, xn, x, &g, 1e-6f);
    BOTH(rms_route, di, dw, logits, NULL, &sm, 1, &rf, xn, x, &g, 1e-6f);
    BOTH(rms_route, NULL, dw, logits, NULL, &sm, 1, &rq, xn, x, &g, 1e-6f);
    fuse = 0;
    BOTH(rms_route, di, dw, logits, NULL, &sm, 1, &rq, xn, x, &g, 1e-6f);
    fuse = MF_FUSE_ALL;
    tc.topk_group = 9;
    BOTH(rms_route, di, dw, logits, db, &tc, 1, &rq, xn, x, &g, 1e-6f);
    CHECK(n_route1n == 3, "%d launches of mf_route1n, expected 3", n_route1n);
}

// Expert views of a quantized blob [gate W S B, up W S B, down W S B] at offsets.
static void expert_views(struct mf_weight v[3], int n_ff, int n_embd, int bits) {
    uint64_t off = 0;
    for (int i = 0; i < 3; i++) {
        v[i] = quant(bits, 64, MF_DTYPE_BF16, i < 2 ? n_ff : n_embd, i < 2 ? n_embd : n_ff);
        int64_t wb = mf_weight_w_bytes(&v[i]), sb = mf_weight_s_bytes(&v[i]);
        v[i].w = P(off);
        v[i].scales = P(off + (uint64_t)wb);
        v[i].biases = P(off + (uint64_t)(wb + sb));
        off += (uint64_t)(wb + 2 * sb);
    }
}

static void test_experts(void) {
    struct mf_weight v[3];
    expert_views(v, 512, 2048, 4);
    const uint64_t S_e = 1769472, base = 0x40000000;
    const void *blobs[300];
    int32_t row0[300], rows[300];
    for (int i = 0; i < 300; i++) {   // scattered order; more than one table part
        blobs[i] = P(base + S_e * (uint64_t)((i * 37) % 300));
        row0[i] = i;
        rows[i] = 1 + i % 3;
    }
    region_base = (uintptr_t)base;
    struct mf_moe_batch b = {.n = 8, .blob_host = blobs, .row0_host = row0,
                             .n_rows_host = rows, .gate = &v[0], .up = &v[1], .down = &v[2]};
    float *eo = P(0x10000000), *gu = P(0x11000000), *xg = P(0x12000000);
    blobs[0] = P(base);   // the lowest blob is the region start
    BOTH(moe_experts, eo, gu, xg, &b);
    b.n = 300;
    BOTH(moe_experts, eo, gu, xg, &b);
    int32_t many[300];   // entries of many rows too: the prefill tensor-core pair
    for (int i = 0; i < 300; i++)
        many[i] = i % 4 == 1 ? MF_MMA_MIN_ROWS + i % 40 : rows[i];
    b.n_rows_host = many;
    BOTH(moe_experts, eo, gu, xg, &b);
    for (int i = 0; i < 300; i++)
        many[i] = MF_MMA_MIN_ROWS + i % 3;   // and of many rows alone
    BOTH(moe_experts, eo, gu, xg, &b);
    b.n_rows_host = rows;
    struct mf_weight down8 = v[2], up8 = v[1];   // a down of its own format: launched
    down8.bits = 8;
    b.down = &down8;
    BOTH(moe_experts, eo, gu, xg, &b);
    up8.bits = 8;   // up unlike gate: refused on both
    b.up = &up8;
    BOTH(moe_experts, eo, gu, xg, &b);
    // gpt-oss: MXFP4 codes, float biases where the affine biases were, clamped SwiGLU
    struct mf_weight mx[3], bias[3];
    for (int i = 0; i < 3; i++) {
        mx[i] = v[i];
        mx[i].qmode = MF_QMODE_MXFP4;
        mx[i].sdtype = MF_DTYPE_U8;
        mx[i].group_size = 32;
        mx[i].biases = NULL;
        bias[i] = (struct mf_weight){.w = v[i].biases, .dtype = MF_DTYPE_BF16, .n_out = 1,
                                     .n_in = v[i].n_out};
    }
    b = (struct mf_moe_batch){.n = 300, .blob_host = blobs, .row0_host = row0,
                              .n_rows_host = rows, .gate = &mx[0], .up = &mx[1],
                              .down = &mx[2], .gate_bias = &bias[0], .up_bias = &bias[1],
                              .down_bias = &bias[2], .act = MF_MOE_ACT_SWIGLU_CLAMPED,
                              .act_alpha = 1.702f, .act_limit = 7.0f};
    BOTH(moe_experts, eo, gu, xg, &b);
}

// The scatter table both drivers send (gpu_args.h): walked as mf_scatter_add walks it,
// every destination once, its sources in ascending order, all rows once; parts cover
// the call's rows in order. Host code only, so it is checked here, without a GPU.
static int scatter_tab_faults(const int32_t *idx, int n, int expect_part) {
    struct mf_scatter_buf sb;
    if (!mf_scatter_buf_new(&sb, n))
        return -1;
    int covered = 0, bad = sb.part != expect_part;
    for (int i0 = 0; i0 < n; i0 += sb.part) {
        int nr;
        size_t bytes;
        const int m = mf_scatter_part(&sb, idx, i0, n, &nr, &bytes);
        const int32_t *off = sb.tab + m, *rows = off + m + 1;
        bad += i0 != covered || bytes != (size_t)(2 * m + 1 + nr) * 4 || off[0] != 0 ||
               off[m] != nr;
        for (int d = 0; d < m; d++) {
            for (int j = off[d]; j < off[d + 1]; j++) {
                bad += idx[i0 + rows[j]] != sb.tab[d];                  // its destination
                bad += j > off[d] && rows[j] <= rows[j - 1];            // ascending
            }
            bad += off[d + 1] <= off[d];                                // not empty
            bad += d > 0 && sb.tab[d] <= sb.tab[d - 1];                 // each once
        }
        covered += nr;
    }
    mf_scatter_buf_free(&sb);
    return bad + (covered != n);
}

static void test_scatter_tab(void) {
    enum { N = 40000, ND = 97 };
    int32_t *idx = malloc(N * sizeof *idx);
    CHECK(idx != NULL, "out of memory");
    if (!idx)
        return;
    uint32_t r = 12345;
    for (int i = 0; i < N; i++) {
        r = r * 1664525u + 1013904223u;
        idx[i] = (int32_t)((r >> 8) % ND) - (i % 7 == 0 ? ND : 0);   // some negative
    }
    // a decode step's rows (the struct's own arrays), a prefill group's (allocated),
    // and a call of several parts
    const int ns[] = {8, MF_SCATTER_SMALL, MF_SCATTER_SMALL + 1, 4096, N};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        const int part = ns[i] < MF_SCATTER_PART ? ns[i] : MF_SCATTER_PART;
        const int bad = scatter_tab_faults(idx, ns[i], part);
        CHECK(bad == 0, "scatter table of %d rows: %d faults", ns[i], bad);
    }
    free(idx);
}

int main(void) {
    fake_be.cu.MemcpyDtoDAsync = fake_dtod;
    fake_be.mma = 1;   // the prefill tensor-core kernels, as on an sm_80+ device
    fake_be.cu.MemcpyDtoHAsync = fake_dtoh;
    fake_be.cu.StreamSynchronize = fake_sync;
    test_products();
    test_norms_rope_attention();
    test_gdn_and_elementwise();
    test_route();
    test_experts();
    test_scatter_tab();
    // The tensor-core launches (MOEFLUX_GPU_TC=1 on an sm_80+ device, or on Metal).
    CHECK(n_tc == 0, "%d tensor-core launches while they are off", n_tc);
    fake_be.tc = 1;
    test_products();
    test_experts();
    CHECK(n_tc >= 10, "only %d tensor-core launches while they are on", n_tc);
    CHECK(n_mma >= 4, "only %d launches of the prefill tensor-core kernels", n_mma);
    CHECK(n_tile == 14, "%d launches of mf_attn_tile, expected 14", n_tile);
    CHECK(n_norm == 7, "%d launches of mf_mv_multi1n, expected 7", n_norm);
    // Most cases launch kernels (a few are refused or do nothing on both sides): a
    // recorder that lost launches would pass the comparisons vacuously.
    CHECK(n_launches >= 100, "only %d launches in %d cases", n_launches, n_cases);
    printf("%d cases, %d launches: the Metal ops launch what the CUDA ops launch\n",
           n_cases, n_launches);
    return check_finish("test_metal_twin");
}
