/*
 * metal_source.c — the kernel program as one text for the Metal compiler.
 *
 * NVRTC takes the shaders/ headers as named in-memory includes; Metal's
 * newLibraryWithSource takes a single string and has no include path. So the root
 * file (mf_kernels.h) is expanded here: each `#include "name"` of an embedded file is
 * replaced by that file's text, the first time only (every file has include guards,
 * so later copies would be empty anyway), with #line directives so the compiler's
 * messages still name the original file and line. <metal_stdlib> stays an include.
 * With a directory (MOEFLUX_SHADERS_DIR, as the CUDA driver reads it) the same file
 * names are read from there instead, so kernels can be fixed without a rebuild.
 * Plain C: built on macOS with the driver, and on every system by the test that
 * syntax-checks this exact text against shaders/metal_stub.
 */
#include "backends/metal/metal_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROOT "mf_kernels.h"
#define MAX_DEPTH 16

struct text {
    char *p;
    size_t n, cap;
};

static int put(struct text *t, const char *s, size_t n) {
    if (t->n + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 1 << 16;
        while (cap < t->n + n + 1)
            cap *= 2;
        char *q = realloc(t->p, cap);
        if (!q)
            return 0;
        t->p = q;
        t->cap = cap;
    }
    memcpy(t->p + t->n, s, n);
    t->n += n;
    t->p[t->n] = '\0';
    return 1;
}

static int put_line_mark(struct text *t, int line, const char *file) {
    char buf[160];
    int n = snprintf(buf, sizeof buf, "#line %d \"%s\"\n", line, file);
    return n > 0 && (size_t)n < sizeof buf && put(t, buf, (size_t)n);
}

static int find_source(const char *name, size_t len) {
    for (int i = 0; i < mf_shader_count; i++)
        if (strlen(mf_shader_names[i]) == len && memcmp(mf_shader_names[i], name, len) == 0)
            return i;
    return -1;
}

// The quoted name of an `#include "..."` line: start and length, or 0 if the line is
// something else (angle-bracket includes included).
static int quoted_include(const char *line, const char *end, const char **name,
                          size_t *len) {
    const char *p = line;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (p == end || *p++ != '#')
        return 0;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if ((size_t)(end - p) < 8 || memcmp(p, "include", 7) != 0)
        return 0;
    p += 7;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (p == end || *p != '"')
        return 0;
    const char *q = memchr(p + 1, '"', (size_t)(end - p - 1));
    if (!q)
        return 0;
    *name = p + 1;
    *len = (size_t)(q - p - 1);
    return 1;
}

struct expand {
    struct text out;
    unsigned char *done;   // [mf_shader_count] already expanded
    const char *dir;       // read the files here; NULL: the embedded texts
    char *err;
    size_t errlen;
};

// The text of file idx: embedded, or read from x->dir into *owned (freed by the caller).
static int file_text(struct expand *x, int idx, const char **text, char **owned) {
    *owned = NULL;
    *text = mf_shader_sources[idx];
    if (!x->dir)
        return MF_OK;
    char *path = mf_path_join(x->dir, mf_shader_names[idx]);
    if (!path)
        return MF_ERR_NOMEM;
    size_t len = 0;
    char why[400];
    int rc = mf_read_file(path, owned, &len, why, sizeof why);
    free(path);
    if (rc != MF_OK)
        return mf_err(x->err, x->errlen, rc, "metal backend: MOEFLUX_SHADERS_DIR: %s", why);
    *text = *owned;
    return MF_OK;
}

static int expand_file(struct expand *x, int idx, int depth);

// One `#include "name"` line of file `from` at line `ln`.
static int expand_include(struct expand *x, const char *from, int ln, const char *name,
                          size_t len, int depth) {
    int idx = find_source(name, len);
    if (idx < 0)
        return mf_err(x->err, x->errlen, MF_ERR_FORMAT,
                      "metal backend: %s:%d includes \"%.*s\", which is not among the %d "
                      "embedded kernel files", from, ln, (int)len, name, mf_shader_count);
    if (x->done[idx])
        return put(&x->out, "\n", 1) ? MF_OK : MF_ERR_NOMEM;
    int rc = expand_file(x, idx, depth + 1);
    if (rc == MF_OK && !put_line_mark(&x->out, ln + 1, from))
        rc = MF_ERR_NOMEM;
    return rc;
}

static int expand_text(struct expand *x, const char *name, const char *s, int depth) {
    if (!put_line_mark(&x->out, 1, name))
        return MF_ERR_NOMEM;
    for (int ln = 1; *s; ln++) {
        const char *end = strchr(s, '\n');
        end = end ? end : s + strlen(s);
        const char *inc;
        size_t len;
        int rc = MF_OK;
        if (quoted_include(s, end, &inc, &len))
            rc = expand_include(x, name, ln, inc, len, depth);
        else if (!put(&x->out, s, (size_t)(end - s)) || !put(&x->out, "\n", 1))
            rc = MF_ERR_NOMEM;
        if (rc != MF_OK)
            return rc;
        s = *end ? end + 1 : end;
    }
    return MF_OK;
}

static int expand_file(struct expand *x, int idx, int depth) {
    const char *name = mf_shader_names[idx], *text;
    if (depth > MAX_DEPTH)
        return mf_err(x->err, x->errlen, MF_ERR_FORMAT,
                      "metal backend: includes nested deeper than %d at %s", MAX_DEPTH, name);
    x->done[idx] = 1;
    char *owned;
    int rc = file_text(x, idx, &text, &owned);
    if (rc == MF_OK)
        rc = expand_text(x, name, text, depth);
    free(owned);
    return rc;
}

int mf_metal_program_source(const char *dir, char **out, char *err, size_t errlen) {
    *out = NULL;
    int root = find_source(ROOT, strlen(ROOT));
    if (root < 0)
        return mf_err(err, errlen, MF_ERR_FORMAT,
                      "metal backend: the embedded kernel sources lack %s", ROOT);
    struct expand x = {.done = calloc((size_t)mf_shader_count, 1),
                       .dir = dir && *dir ? dir : NULL, .err = err, .errlen = errlen};
    int rc = x.done ? expand_file(&x, root, 0) : MF_ERR_NOMEM;
    free(x.done);
    if (rc == MF_ERR_NOMEM)
        mf_err(err, errlen, rc, "metal backend: out of memory for the kernel source");
    if (rc != MF_OK) {
        free(x.out.p);
        return rc;
    }
    *out = x.out.p;
    return MF_OK;
}
