/*
 * test_metal_host.c — the parts of the Metal backend that run without a Mac: the
 * kernel program text handed to newLibraryWithSource (metal_source.c; also from
 * MOEFLUX_SHADERS_DIR), the pipeline
 * table against the manifest text, and (off macOS, with a recording stand-in for the
 * Objective-C glue) how the ops group routed experts by buffer and when they wait.
 *
 *   test_metal_host [OUT]   OUT: also write the program text there (tests/test_metal.py
 *                           syntax-checks that exact text against shaders/metal_stub)
 *
 * The manifest is read from the embedded kernels.def text, not through the X-macro
 * the table is made from, so a table that drifted from the manifest fails here.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/metal/metal_internal.h"
#include "check.h"

static const char *embedded(const char *name) {
    for (int i = 0; i < mf_shader_count; i++)
        if (strcmp(mf_shader_names[i], name) == 0)
            return mf_shader_sources[i];
    return NULL;
}

static int count_of(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* ==== The pipeline table against kernels.def, read as text ==== */

static void test_table(void) {
    const char *def = embedded("kernels.def");
    CHECK(def != NULL, "kernels.def is not embedded");
    if (!def)
        return;
    int n = 0;
    for (const char *line = def; line && *line; line = strchr(line, '\n'), line += !!line) {
        char name[64];
        int n_buf = -1;
        if (sscanf(line, "K(%63[^,], %*[^,], %d,", name, &n_buf) != 2)
            continue;
        CHECK(n < MF_MKID_COUNT, "kernels.def row %d (%s) beyond the table's %d", n, name,
              MF_MKID_COUNT);
        if (n < MF_MKID_COUNT) {
            CHECK(strcmp(mf_metal_kernel_names[n], name) == 0, "row %d: table %s, def %s", n,
                  mf_metal_kernel_names[n], name);
            CHECK(mf_metal_kernel_n_buf[n] == n_buf, "%s: table %d buffers, def %d", name,
                  mf_metal_kernel_n_buf[n], n_buf);
        }
        n++;
    }
    CHECK(n == MF_MKID_COUNT && n >= 19, "kernels.def has %d rows, the table %d", n,
          MF_MKID_COUNT);
    printf("pipeline table: %d kernels, as kernels.def\n", n);
}

/* ==== The program text ==== */

static void test_program(const char *out_path) {
    char err[512] = "", *src = NULL;
    int rc = mf_metal_program_source(NULL, &src, err, sizeof err);
    CHECK(rc == MF_OK && src, "program source: %s", err);
    if (rc != MF_OK)
        return;
    CHECK(count_of(src, "#include \"") == 0, "a quoted include is left in the program");
    CHECK(count_of(src, "#include <metal_stdlib>") == 1, "<metal_stdlib> included %d times",
          count_of(src, "#include <metal_stdlib>"));
    for (int i = 0; i < MF_MKID_COUNT; i++) {
        char k[96];
        snprintf(k, sizeof k, "MF_KERNEL(%s)", mf_metal_kernel_names[i]);
        CHECK(count_of(src, k) == 1, "%s appears %d times", k, count_of(src, k));
    }
    // Every file mf_kernels.h includes is expanded exactly once (its first line mark).
    const char *files[] = {"mf_prelude.h", "mf_params.h", "quant.h", "matmul.h", "tc.h",
                           "norm.h", "rope.h", "attn.h", "gdn.h", "elementwise.h", "moe.h",
                           "gptoss.h"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char mark[64];
        snprintf(mark, sizeof mark, "#line 1 \"%s\"\n", files[i]);
        CHECK(count_of(src, mark) == 1, "%s expanded %d times", files[i], count_of(src, mark));
    }
    // grid.h is driver code: neither its line mark nor its helper may reach the program
    // (a comment naming the file may).
    CHECK(count_of(src, "#line 1 \"grid.h\"") == 0 && count_of(src, "mf_grid_set") == 0,
          "grid.h (driver code) reached the kernel program");
    if (out_path) {
        FILE *f = fopen(out_path, "w");
        CHECK(f && fputs(src, f) >= 0 && fclose(f) == 0, "cannot write %s", out_path);
    }
    printf("program: %zu bytes\n", strlen(src));
    free(src);
}

/* ==== MOEFLUX_SHADERS_DIR: the same files read from a directory ==== */

static void test_shaders_dir(void) {
    char dir[512];
    if (check_make_tmpdir(dir, sizeof dir, "mf_metal_src") != 0) {
        CHECK(0, "no temporary directory");
        return;
    }
    const char *marker = "// planted by test_metal_host\n";
    for (int i = 0; i < mf_shader_count; i++) {
        const char *t = mf_shader_sources[i];
        if (strcmp(mf_shader_names[i], "quant.h") == 0) {
            size_t n = strlen(marker) + strlen(t) + 1;
            char *m = malloc(n);
            CHECK(m != NULL, "out of memory");
            if (!m)
                return;
            snprintf(m, n, "%s%s", marker, t);
            check_write_file(dir, mf_shader_names[i], m, strlen(m));
            free(m);
        } else {
            check_write_file(dir, mf_shader_names[i], t, strlen(t));
        }
    }
    char err[512] = "", *src = NULL, path[600];
    int rc = mf_metal_program_source(dir, &src, err, sizeof err);
    CHECK(rc == MF_OK && src && strstr(src, "#line 1 \"quant.h\"\n// planted by"),
          "the directory's quant.h is not the one compiled: %s", err);
    free(src);
    snprintf(path, sizeof path, "%s/moe.h", dir);
    CHECK(remove(path) == 0, "remove %s", path);
    src = NULL;
    rc = mf_metal_program_source(dir, &src, err, sizeof err);
    CHECK(rc == MF_ERR_IO && !src && strstr(err, "MOEFLUX_SHADERS_DIR") &&
              strstr(err, "moe.h"),
          "a missing moe.h: status %d, message '%s'", rc, err);
    for (int i = 0; i < mf_shader_count; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, mf_shader_names[i]);
        (void)remove(path);
    }
    CHECK(remove(dir) == 0, "remove %s", dir);
}

#if !defined(__APPLE__)
/* ==== Off macOS: a recording stand-in for the glue ==== */

struct launch {
    int kid;
    const void *bufs[8];
    unsigned g[3], b[3];
    int32_t tab[16];
};

struct mf_exec {
    int status;
    struct launch l[16];
    int n_launch, n_wait;
    int32_t last_arg[16];
    // two fake buffers: region A is a reader slot, region B weights
    unsigned char *a, *b;
    size_t a_len, b_len;
};

void mf_metal_launch(struct mf_exec *ex, int kid, const unsigned g[3], const unsigned b[3],
                     const void *params, size_t params_bytes, const void *const *bufs,
                     int n_buf, const char *op) {
    (void)params, (void)params_bytes, (void)op;
    if (ex->n_launch == 16)
        return;
    struct launch *l = &ex->l[ex->n_launch++];
    l->kid = kid;
    memcpy(l->g, g, sizeof l->g);
    memcpy(l->b, b, sizeof l->b);
    for (int i = 0; i < n_buf && i < 8; i++)
        l->bufs[i] = bufs[i];
    memcpy(l->tab, ex->last_arg, sizeof l->tab);
}

const void *mf_metal_host_arg(struct mf_exec *ex, const void *src, size_t n, const char *op) {
    (void)op;
    memcpy(ex->last_arg, src, n < sizeof ex->last_arg ? n : sizeof ex->last_arg);
    return ex->last_arg;
}

void *mf_metal_scratch(struct mf_exec *ex, int slot, size_t n, const char *op) {
    (void)ex, (void)slot, (void)n, (void)op;
    return NULL;
}

const void *mf_metal_region(struct mf_exec *ex, const void *p, size_t need, const char *op) {
    (void)op;
    const unsigned char *q = p;
    if (q >= ex->a && q + need <= ex->a + ex->a_len)
        return ex->a;
    if (q >= ex->b && q + need <= ex->b + ex->b_len)
        return ex->b;
    mf_metal_fail(ex, MF_ERR_ARG, "unknown");
    return NULL;
}

void mf_metal_wait(struct mf_exec *ex, const char *op) {
    (void)op;
    ex->n_wait++;
}

void mf_metal_copy(struct mf_exec *ex, void *dst, size_t dst_off, const void *src,
                   size_t src_off, size_t bytes) {
    (void)ex, (void)dst, (void)dst_off, (void)src, (void)src_off, (void)bytes;
}

void mf_metal_download(struct mf_exec *ex, void *dst_host, const void *src, size_t src_off,
                       size_t bytes) {
    (void)ex, (void)dst_host, (void)src, (void)src_off, (void)bytes;
}

void mf_metal_fail(struct mf_exec *ex, int status, const char *fmt, ...) {
    (void)fmt;
    if (ex->status == MF_OK)
        ex->status = status;
}

int mf_metal_failed(const struct mf_exec *ex) { return ex->status != MF_OK; }
int mf_metal_tc(const struct mf_exec *ex) { (void)ex; return 0; }
int mf_metal_mma(const struct mf_exec *ex) { (void)ex; return 0; }
int mf_metal_attn_tile(const struct mf_exec *ex) { (void)ex; return 1; }
int mf_metal_attn_block(const struct mf_exec *ex) { (void)ex; return 0; }
int mf_metal_fuse(const struct mf_exec *ex) { (void)ex; return 1; }
int mf_metal_fuse_route(const struct mf_exec *ex) { (void)ex; return 1; }
int *mf_metal_counter(struct mf_exec *ex, const char *op) {
    (void)ex, (void)op;
    static int c[MF_COUNT_INTS];   // this test's single-threaded stand-in
    return c;
}

// A float expert of n_ff x n_embd: gate, up, down back to back from offset 0.
static void float_views(struct mf_weight v[3], int n_ff, int n_embd) {
    memset(v, 0, 3 * sizeof v[0]);
    int64_t sz = (int64_t)n_ff * n_embd * 4;
    for (int i = 0; i < 3; i++) {
        v[i].dtype = MF_DTYPE_F32;
        v[i].n_out = i < 2 ? n_ff : n_embd;
        v[i].n_in = i < 2 ? n_embd : n_ff;
        v[i].w = (const void *)(uintptr_t)(i * sz);
    }
}

static int64_t tab_off(const int32_t *t, int i) {
    return (int64_t)(((uint64_t)(uint32_t)t[4 * i + 1] << 32) | (uint32_t)t[4 * i]);
}

// Three experts, two in a reader slot region and one in weights: two launch groups,
// offsets from each region's start, and no wait although a slot was read (API v3:
// models/moe.c keeps the slot until a fence after the kernels is reached).
static void test_experts_by_region(void) {
    enum { FF = 8, EMBD = 16, BLOB = 3 * FF * EMBD * 4 };
    static unsigned char a[4 * BLOB], b[4 * BLOB];
    struct mf_exec ex = {.a = a, .b = b, .a_len = sizeof a, .b_len = sizeof b};
    struct mf_weight v[3];
    float_views(v, FF, EMBD);
    const void *blobs[3] = {a + 2 * BLOB, b + BLOB, a};
    const int32_t row0[3] = {0, 1, 3}, rows[3] = {1, 2, 1};
    struct mf_moe_batch batch = {.n = 3, .blob_host = blobs, .row0_host = row0,
                                 .n_rows_host = rows, .gate = &v[0], .up = &v[1],
                                 .down = &v[2]};
    float eo[4] = {0}, gu[4] = {0}, xg[4] = {0};
    mf_metal_moe_experts(&ex, eo, gu, xg, &batch);
    CHECK(ex.status == MF_OK && ex.n_launch == 4, "status %d, %d launches (expected 4)",
          ex.status, ex.n_launch);
    if (ex.n_launch != 4)
        return;
    // the first group's experts have one row each: the one-row kernels
    CHECK(ex.l[0].kid == MF_MKID_mf_moe_gu1 && ex.l[1].kid == MF_MKID_mf_moe_down1 &&
              ex.l[2].kid == MF_MKID_mf_moe_gu && ex.l[3].kid == MF_MKID_mf_moe_down,
          "kernels %d %d %d %d", ex.l[0].kid, ex.l[1].kid, ex.l[2].kid, ex.l[3].kid);
    CHECK(ex.l[0].bufs[2] == a && ex.l[2].bufs[2] == b, "bases are not the regions");
    CHECK(ex.l[0].g[1] == 2 && ex.l[2].g[1] == 1, "experts per group %u %u", ex.l[0].g[1],
          ex.l[2].g[1]);
    CHECK(tab_off(ex.l[0].tab, 0) == 2 * BLOB && tab_off(ex.l[0].tab, 1) == 0 &&
              tab_off(ex.l[2].tab, 0) == BLOB,
          "blob offsets %lld %lld %lld", (long long)tab_off(ex.l[0].tab, 0),
          (long long)tab_off(ex.l[0].tab, 1), (long long)tab_off(ex.l[2].tab, 0));
    CHECK(ex.l[0].tab[2] == 0 && ex.l[0].tab[7] == 1 && ex.l[2].tab[3] == 2,
          "row tables differ from the batch");
    CHECK(ex.n_wait == 0, "%d waits after reading reader slots (expected 0)", ex.n_wait);
    // The same experts all in weights: no wait.
    struct mf_exec ex2 = {.a = a, .b = b, .a_len = 0, .b_len = sizeof b};
    const void *wblobs[2] = {b, b + 3 * BLOB};
    batch.n = 2;
    batch.blob_host = wblobs;
    mf_metal_moe_experts(&ex2, eo, gu, xg, &batch);
    CHECK(ex2.n_launch == 2 && ex2.n_wait == 0, "weights experts: %d launches, %d waits",
          ex2.n_launch, ex2.n_wait);
}

// The matmul forms the CUDA driver picks, with grid.h's geometry; a host argument
// reaches the kernel as a copy.
static void test_dispatch(void) {
    struct mf_exec ex = {0};
    struct mf_weight w = {.w = (void *)64, .dtype = MF_DTYPE_F32, .n_out = 100, .n_in = 40};
    struct mf_weight wide = w;   // 64 GEMM tiles of 9 tokens (at least MF_GEMM_MIN_TG)
    wide.n_out = 4096;
    float y[4] = {0}, x[4] = {0};
    mf_metal_matmul(&ex, y, &w, x, 1);
    mf_metal_matmul(&ex, y, &wide, x, 9);
    mf_metal_matmul_t(&ex, y, &w, x, 3);
    const int32_t tok[3] = {7, 1, 5};
    mf_metal_embed(&ex, y, &w, tok, 3);
    mf_metal_matmul(&ex, y, &w, x, 9);   // 2 tiles, too few: the row dots
    CHECK(ex.n_launch == 5, "%d launches", ex.n_launch);
    if (ex.n_launch != 5)
        return;
    CHECK(ex.l[0].kid == MF_MKID_mf_mv1 && ex.l[1].kid == MF_MKID_mf_gemm &&
              ex.l[2].kid == MF_MKID_mf_mt && ex.l[3].kid == MF_MKID_mf_embed &&
              ex.l[4].kid == MF_MKID_mf_mv,
          "kernels %d %d %d %d %d", ex.l[0].kid, ex.l[1].kid, ex.l[2].kid, ex.l[3].kid,
          ex.l[4].kid);
    // One token over 100 rows: the one-token matvec, one row per warp (rpw 1).
    CHECK(ex.l[0].g[0] == (100 + MF_MV_ROWS - 1) / MF_MV_ROWS && ex.l[0].b[0] == 32 * MF_MV_ROWS &&
              ex.l[0].g[1] == 1,
          "matvec grid %u x %u", ex.l[0].g[0], ex.l[0].b[0]);
    CHECK(ex.l[3].tab[0] == 7 && ex.l[3].tab[2] == 5, "embed tokens not passed");
    CHECK(ex.l[0].bufs[3] == NULL && ex.l[0].bufs[2] == w.w, "weight buffers");
    // A bad weight is an error that stops later ops.
    struct mf_weight bad = w;
    bad.dtype = MF_DTYPE_U32;
    bad.bits = 7;
    mf_metal_matmul(&ex, y, &bad, x, 1);
    mf_metal_matmul(&ex, y, &w, x, 1);
    CHECK(ex.status == MF_ERR_ARG && ex.n_launch == 5, "status %d, %d launches", ex.status,
          ex.n_launch);
}
#endif

int main(int argc, char **argv) {
    test_table();
    test_program(argc > 1 ? argv[1] : NULL);
    test_shaders_dir();
#if !defined(__APPLE__)
    test_experts_by_region();
    test_dispatch();
#endif
    return check_finish("test_metal_host");
}
