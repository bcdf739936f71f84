/*
 * tap.c — the debug tap: in a build with -DMF_TAP_ENABLED (MOEFLUX_TAP=1 at build
 * time), every MF_TAP site of the forward files hands its tensor here, and when the
 * environment variable MOEFLUX_TAP_DIR names a directory the tensor is appended there:
 * raw float32 to "<name>.f32" and one line to "index.jsonl" saying
 * {"name", "eval", "n_past", "floats"} (eval counts this ctx's eval calls). Names are
 * mlx-lm module paths ("model.layers.3.mlp"), so scripts can put the same points of
 * mlx-lm beside them (tools/tap_diff.py) and find the first layer and op that differ.
 * A tap never fails an eval: a write error is logged once and tapping stops.
 * In a normal build MF_TAP compiles to nothing and this file is unused.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

static int tap_append(const char *dir, const char *file, const void *p, size_t n,
                      const char *mode) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, mode);
    if (!f)
        return -1;
    size_t w = fwrite(p, 1, n, f);
    return (fclose(f) != 0 || w != n) ? -1 : 0;
}

void mf_tap(mf_ctx *ctx, const char *fmt, int il, const float *buf, int64_t n) {
    const char *dir = getenv("MOEFLUX_TAP_DIR");
    if (!dir || !dir[0] || ctx->tap_failed || n <= 0)
        return;
    char name[256], line[512], file[300];
    snprintf(name, sizeof name, fmt, il);
    float *host = malloc((size_t)n * sizeof(float));
    if (!host) {
        ctx->tap_failed = 1;
        mf_log(ctx->model, MF_LOG_WARN, "tap: out of memory for %s", name);
        return;
    }
    ctx->be->ops->download(ctx->ex, host, buf, 0, (size_t)n * sizeof(float));
    snprintf(file, sizeof file, "%s.f32", name);
    int len = snprintf(line, sizeof line,
                       "{\"name\": \"%s\", \"eval\": %lld, \"n_past\": %d, \"floats\": %lld}\n",
                       name, (long long)ctx->n_evals, ctx->n_past, (long long)n);
    if (tap_append(dir, file, host, (size_t)n * sizeof(float), "ab") != 0 ||
        tap_append(dir, "index.jsonl", line, (size_t)len, "a") != 0) {
        ctx->tap_failed = 1;
        mf_log(ctx->model, MF_LOG_WARN, "tap: cannot write %s/%s; tapping stops", dir,
               file);
    }
    free(host);
}
