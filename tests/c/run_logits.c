/*
 * run_logits.c — a whole forward pass through the C API, for a machine (or emulator)
 * that has no Python: loads a converted model with a given backend ("cpu:neon"),
 * evaluates the first n_prompt tokens at once (every position's logits), then the rest
 * one at a time, and writes the logits rows as raw float32 [rows, n_vocab] to a file.
 * tests/test_kernels.py runs it cross-compiled for aarch64 under qemu-user (make
 * test-neon) and compares the rows with mlx-lm. Not a test_*.c: the Makefile does not
 * run it as a unit test.
 *
 *   run_logits MODEL_DIR BACKEND N_PROMPT OUT_FILE TOKEN...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moeflux.h"

// Parses argv[i] as a non-negative int into *v; 0 on success.
static int parse_int(const char *s, int *v) {
    char *end;
    long x = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || x < 0 || x > 1 << 30)
        return -1;
    *v = (int)x;
    return 0;
}

// Evaluates the tokens (prompt at once, the rest one by one) into rows; 0 on success.
static int run(mf_ctx *ctx, const int32_t *tok, int n_tok, int n_prompt, float *rows,
               int n_vocab) {
    int rc = mf_ctx_eval(ctx, tok, n_prompt, rows, 1);
    for (int i = n_prompt; rc == MF_OK && i < n_tok; i++)
        rc = mf_ctx_eval(ctx, tok + i, 1, rows + (size_t)i * (size_t)n_vocab, 0);
    if (rc != MF_OK)
        fprintf(stderr, "run_logits: eval: %s (%s)\n", mf_strerror(rc), mf_ctx_errmsg(ctx));
    return rc == MF_OK ? 0 : -1;
}

static int write_rows(const char *path, const float *rows, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        return -1;
    }
    size_t w = fwrite(rows, sizeof(float), n, f);
    if (fclose(f) != 0 || w != n) {
        fprintf(stderr, "run_logits: short write to %s (%zu of %zu floats)\n", path, w, n);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int n_prompt, n_tok = argc - 5;
    if (argc < 6 || parse_int(argv[3], &n_prompt) || n_prompt < 1 || n_prompt > n_tok) {
        fprintf(stderr, "usage: run_logits MODEL_DIR BACKEND N_PROMPT OUT_FILE TOKEN...\n");
        return 2;
    }
    int32_t *tok = malloc((size_t)n_tok * sizeof *tok);
    if (!tok)
        return 1;
    for (int i = 0; i < n_tok; i++)
        if (parse_int(argv[5 + i], &tok[i])) {
            fprintf(stderr, "run_logits: token '%s' is not an id\n", argv[5 + i]);
            free(tok);
            return 2;
        }
    char err[512] = "";
    struct mf_model_params mp = mf_model_default_params();
    mp.backend = argv[2];
    struct mf_ctx_params cp = mf_ctx_default_params();
    cp.n_ctx = n_tok;
    cp.n_threads = 2;
    mf_model *m = NULL;
    mf_ctx *ctx = NULL;
    float *rows = NULL;
    int ok = -1;
    if (mf_model_load(&m, argv[1], &mp, err, sizeof err) != MF_OK ||
        mf_ctx_new(&ctx, m, &cp, err, sizeof err) != MF_OK) {
        fprintf(stderr, "run_logits: %s\n", err);
    } else {
        size_t n = (size_t)n_tok * (size_t)mf_model_n_vocab(m);
        rows = malloc(n * sizeof(float));
        if (rows && run(ctx, tok, n_tok, n_prompt, rows, mf_model_n_vocab(m)) == 0)
            ok = write_rows(argv[4], rows, n);
        printf("run_logits: %s, backend %s, %d tokens (%d at once): %s\n",
               mf_model_arch(m), argv[2], n_tok, n_prompt, ok == 0 ? "written" : "failed");
    }
    free(rows);
    mf_ctx_free(ctx);
    mf_model_free(m);
    free(tok);
    return ok == 0 ? 0 : 1;
}
