/*
 * test_expert_formats.c — layout version 2 (issue #15 part 2): per-projection formats
 * and per-layer tables read by the store, the expert views moe.c makes of them, the
 * CPU grouped expert op on a fused gate_up_proj with per-expert biases against a
 * plain loop over the same floats, MXFP4 experts with per-expert biases and the
 * clamped SwiGLU (gpt-oss) against a plain loop decoding E2M1 / E8M0 in double, and
 * what the GPU backends' expert kernels take and refuse at model open
 * (mf_moe_experts_gpu_check: runs without a GPU).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/backend.h"
#include "check.h"
#include "io/expert_store.h"
#include "models/moe.h"

enum { H = 64, I = 32, NE = 2 };

static char tmpdir[256];

static size_t comp(char *buf, size_t cap, const char *name, unsigned off, unsigned size,
                   const char *dt, int r, int c, const char *extra) {
    char shape[32];
    if (c > 0)
        snprintf(shape, sizeof shape, "[%d, %d]", r, c);
    else
        snprintf(shape, sizeof shape, "[%d]", r);
    return (size_t)snprintf(buf, cap,
                            "{\"name\": \"%s\", \"offset\": %u, \"size\": %u, \"dtype\": "
                            "\"%s\", \"shape\": %s%s}", name, off, size, dt, shape,
                            extra ? extra : "");
}

static void write_layers(int n_layers, const uint8_t *is_moe, size_t es, uint64_t seed) {
    unsigned char *data = malloc(NE * es);
    float *f = (float *)data;
    for (size_t i = 0; i < NE * es / 4; i++)   // small floats; bf16 halves stay finite
        f[i] = (float)((int)(check_rand(&seed) % 2001) - 1000) / 4000.0f;
    for (int l = 0; l < n_layers; l++) {
        if (!is_moe[l])
            continue;
        char name[32];
        snprintf(name, sizeof name, "layer_%02d.bin", l);
        check_write_file(tmpdir, name, data, NE * es);
    }
    free(data);
}

/* ==== Fused gate_up_proj with biases, float: computed against a plain loop ==== */

// Blob: gate_up W F32 [2I, H] | gate_up bias F32 [2I] | down W F32 [H, I] | down bias
// BF16 [H].
#define GU_W 0u
#define GU_B (GU_W + 2u * I * H * 4u)
#define DN_W (GU_B + 2u * I * 4u)
#define DN_B (DN_W + (unsigned)H * I * 4u)
#define ES_A (DN_B + (unsigned)H * 2u)

static void fused_layout(char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap,
                                "{\"format\": \"moeflux-experts\", \"version\": 2, "
                                "\"num_layers\": 2, \"num_experts\": %d, \"expert_size\": "
                                "%u, \"moe_layers\": [1], \"components\": [", NE, ES_A);
    n += comp(buf + n, cap - n, "gate_up_proj.weight", GU_W, 2u * I * H * 4u, "F32", 2 * I,
              H, ", \"mode\": \"float\"");
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += comp(buf + n, cap - n, "gate_up_proj.bias", GU_B, 2u * I * 4u, "F32", 2 * I, 0,
              NULL);
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += comp(buf + n, cap - n, "down_proj.weight", DN_W, (unsigned)H * I * 4u, "F32", H,
              I, NULL);
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += comp(buf + n, cap - n, "down_proj.bias", DN_B, (unsigned)H * 2u, "BF16", H, 0,
              NULL);
    snprintf(buf + n, cap - n, "]}");
}

// One row through the expert, in double: SwiGLU of the fused halves plus biases.
static void expert_ref(const unsigned char *blob, const float *x, double *y) {
    const float *w = (const float *)(blob + GU_W), *b = (const float *)(blob + GU_B);
    const float *d = (const float *)(blob + DN_W);
    const uint16_t *db = (const uint16_t *)(blob + DN_B);
    double h[I];
    for (int j = 0; j < I; j++) {
        double g = b[j], u = b[I + j];
        for (int k = 0; k < H; k++) {
            g += (double)w[j * H + k] * x[k];
            u += (double)w[(I + j) * H + k] * x[k];
        }
        h[j] = g / (1.0 + exp(-g)) * u;
    }
    for (int o = 0; o < H; o++) {
        double acc = mf_bf16_to_f32(db[o]);
        for (int j = 0; j < I; j++)
            acc += (double)d[o * I + j] * h[j];
        y[o] = acc;
    }
}

static void run_fused(const mf_expert_store *st, const struct mf_moe_views *v) {
    struct mf_backend *be = NULL;
    struct mf_exec *ex = NULL;
    char err[512] = "";
    int rc = mf_backend_cpu_new(&be, err, sizeof err);
    if (rc == MF_OK)
        rc = be->ops->exec_new(be, 2, &ex, err, sizeof err);
    CHECK(rc == MF_OK, "cpu backend: %s", err);
    if (rc != MF_OK)
        return;
    unsigned char *blob = malloc(ES_A);
    rc = mf_expert_store_read(st, 1, 1, blob, ES_A, err, sizeof err);
    CHECK(rc == MF_OK, "read: %s", err);
    enum { M = 3 };
    float xg[M * H], gu[M * 2 * I], eo[M * H];
    uint64_t seed = 7;
    for (int i = 0; i < M * H; i++)
        xg[i] = (float)((int)(check_rand(&seed) % 2001) - 1000) / 1000.0f;
    const void *blobs[1] = {blob};
    int32_t row0 = 0, rows = M;
    struct mf_moe_batch b = mf_moe_views_batch(v);
    b.n = 1, b.blob_host = blobs, b.row0_host = &row0, b.n_rows_host = &rows;
    be->ops->moe_experts(ex, eo, gu, xg, &b);
    double worst = 0.0, scale = 0.0;
    for (int r = 0; r < M; r++) {
        double y[H];
        expert_ref(blob, xg + r * H, y);
        for (int o = 0; o < H; o++) {
            worst = fmax(worst, fabs(eo[r * H + o] - y[o]));
            scale = fmax(scale, fabs(y[o]));
        }
    }
    CHECK(scale > 0.01 && worst <= 1e-5 * scale, "fused gate_up + biases: off by %g of %g",
          worst, scale);
    free(blob);
    be->ops->exec_free(ex);
    be->ops->free(be);
}

static void test_fused_biases(void) {
    static const uint8_t is_moe[2] = {0, 1};
    char layout[4096], err[512] = "";
    fused_layout(layout, sizeof layout);
    check_write_file(tmpdir, "layout.json", layout, strlen(layout));
    write_layers(2, is_moe, ES_A, 3);
    mf_expert_store *st = NULL;
    int rc = mf_expert_store_open(&st, tmpdir, 2, is_moe, err, sizeof err);
    CHECK(rc == MF_OK, "fused layout refused: %s", err);
    if (rc != MF_OK)
        return;
    struct mf_moe_views v;
    int vrc = mf_moe_layer_views(st, 1, H, I, &v, err, sizeof err);
    CHECK(vrc == MF_OK && v.has_bias[0] && v.has_bias[1] && v.has_bias[2] &&
              (uintptr_t)v.up.w == GU_W + (uintptr_t)I * H * 4 &&
              (uintptr_t)v.bias[1].w == GU_B + (uintptr_t)I * 4 && v.down.dtype == MF_DTYPE_F32,
          "fused views: %s", err);
    struct mf_moe_batch b = mf_moe_views_batch(&v);
    rc = mf_moe_experts_gpu_check("cuda", &b, 1, err, sizeof err);
    CHECK(rc == MF_OK, "GPU check of float biases and a fused gate_up: %d %s", rc, err);
    struct mf_weight ib = v.bias[2];   // a bias the kernels cannot read
    ib.dtype = MF_DTYPE_I32;
    b.down_bias = &ib;
    rc = mf_moe_experts_gpu_check("cuda", &b, 1, err, sizeof err);
    CHECK(rc == MF_ERR_UNSUPPORTED && strstr(err, "cuda backend: layer 1") &&
              strstr(err, "down_proj.bias is I32"), "GPU refusal of an I32 bias: %d %s", rc,
          err);
    if (vrc == MF_OK)
        run_fused(st, &v);
    rc = mf_moe_layer_views(st, 1, H, 2 * I, &v, err, sizeof err);
    CHECK(rc == MF_ERR_SHAPE && strstr(err, "gate_up_proj"), "n_ff mismatch: %s", err);
    mf_expert_store_close(st);
}

/* ==== Mixed formats and a per-layer table ==== */

// gate 3-bit g64, up 6-bit g32 (affine, BF16 scales), down float BF16 [H, I]; layer 2's
// own table has down 4-bit g32.
static size_t mixed_table(char *buf, size_t cap, int down_affine) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    unsigned off = 0;
    struct { const char *name, *dt; int r, c; const char *extra; } t[] = {
        {"gate_proj.weight", "U32", I, H * 3 / 32, ", \"mode\": \"affine\", \"bits\": 3, "
                                                   "\"group_size\": 64"},
        {"gate_proj.scales", "BF16", I, H / 64, NULL},
        {"gate_proj.biases", "BF16", I, H / 64, NULL},
        {"up_proj.weight", "U32", I, H * 6 / 32, ", \"bits\": 6, \"group_size\": 32"},
        {"up_proj.scales", "BF16", I, H / 32, NULL},
        {"up_proj.biases", "BF16", I, H / 32, NULL},
        {"down_proj.weight", "BF16", H, I, ", \"mode\": \"float\""},
        {"down_proj.weight", "U32", H, I * 4 / 32, ", \"bits\": 4, \"group_size\": 32"},
        {"down_proj.scales", "BF16", H, I / 32, NULL},
        {"down_proj.biases", "BF16", H, I / 32, NULL},
    };
    int first = 1;
    for (size_t k = 0; k < sizeof t / sizeof t[0]; k++) {
        if ((k == 6 && down_affine) || (k > 6 && !down_affine))
            continue;
        unsigned size = (unsigned)(t[k].r * t[k].c) * (t[k].dt[0] == 'U' ? 4u : 2u);
        n += (size_t)snprintf(buf + n, cap - n, "%s", first ? "" : ", ");
        n += comp(buf + n, cap - n, t[k].name, off, size, t[k].dt, t[k].r, t[k].c,
                  t[k].extra);
        off += (size + 15u) / 16u * 16u;
        first = 0;
    }
    n += (size_t)snprintf(buf + n, cap - n, "]");
    return n;
}

#define ES_B 8192u

static int open_mixed(const char *extra_top, mf_expert_store **st, char *err,
                      size_t errlen) {
    static const uint8_t is_moe[3] = {0, 1, 1};
    char layout[8192];
    size_t n = (size_t)snprintf(layout, sizeof layout,
                                "{\"format\": \"moeflux-experts\", \"version\": 2, "
                                "\"num_layers\": 3, \"num_experts\": %d, \"expert_size\": "
                                "%u, %s\"components\": ", NE, ES_B, extra_top);
    n += mixed_table(layout + n, sizeof layout - n, 0);
    n += (size_t)snprintf(layout + n, sizeof layout - n,
                          ", \"layer_components\": {\"2\": ");
    n += mixed_table(layout + n, sizeof layout - n, 1);
    snprintf(layout + n, sizeof layout - n, "}}");
    check_write_file(tmpdir, "layout.json", layout, strlen(layout));
    write_layers(3, is_moe, ES_B, 5);
    return mf_expert_store_open(st, tmpdir, 3, is_moe, err, errlen);
}

// Layer 2's table ends at 3968 bytes of the 8192-byte stride: a read stops there.
static void check_short_read(const mf_expert_store *st) {
    char err[512] = "", path[512];
    unsigned char *buf = malloc(ES_B), *file = malloc(ES_B);
    memset(buf, 0xAA, ES_B);
    snprintf(path, sizeof path, "%s/layer_02.bin", tmpdir);
    FILE *f = fopen(path, "rb");
    int ok = f && fseek(f, ES_B, SEEK_SET) == 0 && fread(file, 1, ES_B, f) == ES_B;
    if (f)
        fclose(f);
    int rc = mf_expert_store_read(st, 2, 1, buf, ES_B, err, sizeof err);
    int tail = 1;
    for (unsigned i = 3968; i < ES_B; i++)
        tail &= buf[i] == 0xAA;
    CHECK(ok && rc == MF_OK && memcmp(buf, file, 3968) == 0 && tail,
          "layer 2 read: %s (tail untouched %d)", err, tail);
    free(buf);
    free(file);
}

static void test_mixed_tables(void) {
    mf_expert_store *st = NULL;
    char err[512] = "";
    int rc = open_mixed("", &st, err, sizeof err);
    CHECK(rc == MF_OK, "mixed layout refused: %s", err);
    if (rc != MF_OK)
        return;
    struct mf_expert_proj g, u, d1, d2;
    CHECK(mf_expert_store_proj(st, 1, "gate_proj", &g) && g.mode == MF_EXPERT_MODE_AFFINE &&
              g.bits == 3 && g.group_size == 64 && g.n_in == H && g.rows == I,
          "gate 3-bit g64 (%d %d %lld)", g.bits, g.group_size, (long long)g.n_in);
    CHECK(mf_expert_store_proj(st, 1, "up_proj", &u) && u.bits == 6 && u.group_size == 32 &&
              u.n_in == H, "up 6-bit g32");
    CHECK(mf_expert_store_proj(st, 1, "down_proj", &d1) && d1.mode == MF_EXPERT_MODE_FLOAT &&
              d1.n_in == I && !d1.scales, "layer 1 down float");
    CHECK(mf_expert_store_proj(st, 2, "down_proj", &d2) && d2.mode == MF_EXPERT_MODE_AFFINE &&
              d2.bits == 4 && d2.group_size == 32 && d2.n_in == I, "layer 2 down 4-bit");
    CHECK(!mf_expert_store_proj(st, 1, "gate_up_proj", &g), "no gate_up_proj");
    struct mf_moe_views v;
    rc = mf_moe_layer_views(st, 1, H, I, &v, err, sizeof err);
    CHECK(rc == MF_OK && v.gate.bits == 3 && v.up.bits == 6 && v.up.group_size == 32 &&
              v.down.dtype == MF_DTYPE_BF16 && !v.has_bias[2], "views: %s", err);
    struct mf_moe_batch b = mf_moe_views_batch(&v);
    rc = mf_moe_experts_gpu_check("metal", &b, 1, err, sizeof err);
    CHECK(rc == MF_ERR_UNSUPPORTED && strstr(err, "up_proj is affine 6-bit group 32") &&
              strstr(err, "gate_proj affine 3-bit group 64"), "GPU refusal: %s", err);
    v.up = v.gate;   // gate and up alike; down in float (layer 1) or 4-bit g32 (layer 2)
    b = mf_moe_views_batch(&v);
    CHECK(mf_moe_experts_gpu_check("cuda", &b, 1, err, sizeof err) == MF_OK,
          "3-bit gate/up, float down: %s", err);
    struct mf_moe_views v2;
    rc = mf_moe_layer_views(st, 2, H, I, &v2, err, sizeof err);
    CHECK(rc == MF_OK, "layer 2 views: %s", err);
    v2.up = v2.gate;
    b = mf_moe_views_batch(&v2);
    CHECK(rc != MF_OK || (mf_moe_experts_gpu_check("metal", &b, 1, err, sizeof err) ==
                          MF_OK && v2.down.bits == 4),
          "gate/up and a 4-bit down: %s", err);
    check_short_read(st);
    mf_expert_store_close(st);
    // Top-level defaults contradicting a component's own bits: the component wins,
    // and a top-level value the kernels lack is refused.
    st = NULL;
    rc = open_mixed("\"bits\": 7, ", &st, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "bits 7"), "bits 7: %s", err);
    mf_expert_store_close(st);
}

/* ==== MXFP4 experts with biases and the clamped SwiGLU (gpt-oss) ==== */

// Blob: per projection U32 E2M1 codes, U8 E8M0 scales (one per 32), BF16 bias.
#define MX_GW 0u
#define MX_GS (MX_GW + (unsigned)I * H / 2u)
#define MX_GB (MX_GS + (unsigned)I * H / 32u)
#define MX_UW (MX_GB + (unsigned)I * 2u)
#define MX_US (MX_UW + (unsigned)I * H / 2u)
#define MX_UB (MX_US + (unsigned)I * H / 32u)
#define MX_DW (MX_UB + (unsigned)I * 2u)
#define MX_DS (MX_DW + (unsigned)H * I / 2u)
#define MX_DB (MX_DS + (unsigned)H * I / 32u)
#define ES_MX (MX_DB + (unsigned)H * 2u)

static size_t mx_proj(char *buf, size_t cap, const char *p, unsigned w, unsigned sc,
                      unsigned b, int rows, int n_in, int with_biases) {
    char name[32];
    size_t n = 0;
    snprintf(name, sizeof name, "%s.weight", p);
    n += comp(buf + n, cap - n, name, w, (unsigned)(rows * n_in / 2), "U32", rows, n_in / 8,
              ", \"mode\": \"mxfp4\", \"bits\": 4, \"group_size\": 32");
    snprintf(name, sizeof name, "%s.scales", p);
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += comp(buf + n, cap - n, name, sc, (unsigned)(rows * n_in / 32), "U8", rows,
              n_in / 32, NULL);
    snprintf(name, sizeof name, "%s.%s", p, with_biases ? "biases" : "bias");
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += comp(buf + n, cap - n, name, b, (unsigned)rows * 2u, "BF16", rows,
              with_biases ? 1 : 0, NULL);
    return n;
}

// with_biases: the down projection carries affine .biases instead of .bias (refused).
static void mxfp4_layout(char *buf, size_t cap, int with_biases) {
    size_t n = (size_t)snprintf(buf, cap,
                                "{\"format\": \"moeflux-experts\", \"version\": 2, "
                                "\"num_layers\": 2, \"num_experts\": %d, \"expert_size\": "
                                "%u, \"moe_layers\": [1], \"components\": [", NE, ES_MX);
    n += mx_proj(buf + n, cap - n, "gate_proj", MX_GW, MX_GS, MX_GB, I, H, 0);
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += mx_proj(buf + n, cap - n, "up_proj", MX_UW, MX_US, MX_UB, I, H, 0);
    n += (size_t)snprintf(buf + n, cap - n, ", ");
    n += mx_proj(buf + n, cap - n, "down_proj", MX_DW, MX_DS, MX_DB, H, I, with_biases);
    snprintf(buf + n, cap - n, "]}");
}

// Random codes, exponents 2^-3 .. 2^1 and bf16 biases of about 0.1.
static void mxfp4_fill(unsigned char *blob, uint64_t seed) {
    for (unsigned i = 0; i < ES_MX; i++)
        blob[i] = (unsigned char)check_rand(&seed);
    const unsigned sc[3][2] = {{MX_GS, I * H / 32}, {MX_US, I * H / 32}, {MX_DS, H * I / 32}};
    const unsigned bs[3][2] = {{MX_GB, I}, {MX_UB, I}, {MX_DB, H}};
    for (int p = 0; p < 3; p++) {
        for (unsigned i = 0; i < sc[p][1]; i++)
            blob[sc[p][0] + i] = (unsigned char)(124 + check_rand(&seed) % 5);
        uint16_t *b = (uint16_t *)(blob + bs[p][0]);
        for (unsigned i = 0; i < bs[p][1]; i++)
            b[i] = (uint16_t)(0x3dcc ^ (check_rand(&seed) & 0x807f));   // +-0.1 or so
    }
}

// Element k of row r of an MXFP4 matrix [rows, n_in] (codes: 8 per U32, low first).
static double mx_at(const unsigned char *blob, unsigned w, unsigned sc, int n_in, int r,
                    int k) {
    static const double e2m1[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    const uint32_t *q = (const uint32_t *)(blob + w) + (size_t)r * n_in / 8;
    unsigned code = (q[k / 8] >> (4 * (k % 8))) & 15u;
    double v = e2m1[code & 7] * ((code & 8) ? -1.0 : 1.0);
    return ldexp(v, (int)blob[sc + (size_t)r * n_in / 32 + k / 32] - 127);
}

static double mx_bias(const unsigned char *blob, unsigned b, int j) {
    return mf_bf16_to_f32(((const uint16_t *)(blob + b))[j]);
}

// One row through the expert in double: clamped SwiGLU (alpha 1.702, limit 7).
static void mx_ref(const unsigned char *blob, const float *x, double *y) {
    double h[I];
    for (int j = 0; j < I; j++) {
        double g = mx_bias(blob, MX_GB, j), u = mx_bias(blob, MX_UB, j);
        for (int k = 0; k < H; k++) {
            g += mx_at(blob, MX_GW, MX_GS, H, j, k) * x[k];
            u += mx_at(blob, MX_UW, MX_US, H, j, k) * x[k];
        }
        g = g < 7.0 ? g : 7.0;
        u = u < -7.0 ? -7.0 : u > 7.0 ? 7.0 : u;
        h[j] = (u + 1.0) * g / (1.0 + exp(-1.702 * g));
    }
    for (int o = 0; o < H; o++) {
        double acc = mx_bias(blob, MX_DB, o);
        for (int j = 0; j < I; j++)
            acc += mx_at(blob, MX_DW, MX_DS, I, o, j) * h[j];
        y[o] = acc;
    }
}

static void run_mxfp4(const struct mf_moe_views *v, const unsigned char *blob) {
    struct mf_backend *be = NULL;
    struct mf_exec *ex = NULL;
    char err[512] = "";
    int rc = mf_backend_cpu_new(&be, err, sizeof err);
    if (rc == MF_OK)
        rc = be->ops->exec_new(be, 2, &ex, err, sizeof err);
    CHECK(rc == MF_OK, "cpu backend: %s", err);
    if (rc != MF_OK)
        return;
    enum { M = 3 };
    float xg[M * H], gu[M * 2 * I], eo[M * H];
    uint64_t seed = 11;
    for (int i = 0; i < M * H; i++)
        xg[i] = (float)((int)(check_rand(&seed) % 2001) - 1000) / 1000.0f;
    const void *blobs[1] = {blob};
    int32_t row0 = 0, rows = M;
    struct mf_moe_batch b = mf_moe_views_batch(v);
    b.n = 1, b.blob_host = blobs, b.row0_host = &row0, b.n_rows_host = &rows;
    be->ops->moe_experts(ex, eo, gu, xg, &b);
    double worst = 0.0, scale = 0.0;
    for (int r = 0; r < M; r++) {
        double y[H];
        mx_ref(blob, xg + r * H, y);
        for (int o = 0; o < H; o++) {
            worst = fmax(worst, fabs(eo[r * H + o] - y[o]));
            scale = fmax(scale, fabs(y[o]));
        }
    }
    CHECK(scale > 0.01 && worst <= 1e-5 * scale,
          "mxfp4 experts + biases + clamped SwiGLU: off by %g of %g", worst, scale);
    be->ops->exec_free(ex);
    be->ops->free(be);
}

static void check_mxfp4_views(const mf_expert_store *st, const unsigned char *blob) {
    char err[512] = "";
    struct mf_moe_views v;
    int rc = mf_moe_layer_views(st, 1, H, I, &v, err, sizeof err);
    CHECK(rc == MF_OK && v.gate.qmode == MF_QMODE_MXFP4 && v.down.qmode == MF_QMODE_MXFP4 &&
              v.gate.sdtype == MF_DTYPE_U8 && v.gate.biases == NULL && v.gate.n_in == H &&
              v.down.n_in == I && (uintptr_t)v.down.scales == MX_DS &&
              v.has_bias[0] && v.has_bias[1] && v.has_bias[2], "mxfp4 views: %s", err);
    if (rc != MF_OK)
        return;
    v.act = MF_MOE_ACT_SWIGLU_CLAMPED, v.act_alpha = 1.702f, v.act_limit = 7.0f;
    struct mf_moe_batch b = mf_moe_views_batch(&v);
    rc = mf_moe_experts_gpu_check("cuda", &b, 1, err, sizeof err);
    CHECK(rc == MF_OK, "GPU check of MXFP4 experts, biases, clamped SwiGLU: %d %s", rc, err);
    run_mxfp4(&v, blob);
}

static void test_mxfp4(void) {
    static const uint8_t is_moe[2] = {0, 1};
    char layout[4096], err[512] = "";
    unsigned char *data = malloc(NE * ES_MX);
    for (int e = 0; e < NE; e++)
        mxfp4_fill(data + e * ES_MX, 21 + (uint64_t)e);
    check_write_file(tmpdir, "layer_01.bin", data, NE * ES_MX);
    mxfp4_layout(layout, sizeof layout, 1);
    check_write_file(tmpdir, "layout.json", layout, strlen(layout));
    mf_expert_store *st = NULL;
    int rc = mf_expert_store_open(&st, tmpdir, 2, is_moe, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && strstr(err, "down_proj.weight marked mxfp4") &&
              strstr(err, "no down_proj.biases"), "mxfp4 with affine biases: %d %s", rc, err);
    mf_expert_store_close(st);
    st = NULL;
    mxfp4_layout(layout, sizeof layout, 0);
    check_write_file(tmpdir, "layout.json", layout, strlen(layout));
    rc = mf_expert_store_open(&st, tmpdir, 2, is_moe, err, sizeof err);
    CHECK(rc == MF_OK, "mxfp4 layout refused: %s", err);
    if (rc == MF_OK)
        check_mxfp4_views(st, data + ES_MX);   // expert 1, as read from the file below
    unsigned char *blob = malloc(ES_MX);
    if (rc == MF_OK) {
        rc = mf_expert_store_read(st, 1, 1, blob, ES_MX, err, sizeof err);
        CHECK(rc == MF_OK && memcmp(blob, data + ES_MX, ES_MX) == 0, "read: %s", err);
    }
    free(blob);
    free(data);
    mf_expert_store_close(st);
}

static void cleanup(void) {
    static const char *const names[] = {"layout.json", "layer_01.bin", "layer_02.bin"};
    char path[512];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
        unlink(path);
    }
    rmdir(tmpdir);
}

int main(void) {
    if (check_make_tmpdir(tmpdir, sizeof tmpdir, "mf_fmt") != 0)
        return 1;
    test_fused_biases();
    test_mixed_tables();
    test_mxfp4();
    cleanup();
    return check_finish("test_expert_formats");
}
