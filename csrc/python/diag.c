/*
 * diag.c — moeflux._diag, the test-only extension module (built only when
 * MOEFLUX_BUILD_DIAG=1, which the Makefile's installs set; never imported by the
 * package, so the public moeflux._core carries none of it): each function runs
 * one CPU backend op on numpy buffers through a temporary backend and exec, so
 * tests/test_kernels.py can compare the ops one by one against mlx, and
 * bench/bench_matmul.py can time them. Not API: nothing here is documented for users.
 *
 * Every function takes its output buffer(s) as arguments (numpy arrays allocated by the
 * caller) and checks each buffer's size against the shapes it is given before touching
 * memory. Float weights are passed as raw buffers plus a dtype name ("F32", "BF16",
 * "F16"; bf16 as uint16 arrays) because numpy has no bfloat16.
 * Linked with the backends and core/common.c only (setup.py, diag_sources), not the
 * models or the binding of _core.
 */
#include "python/binding.h"

#include <stdint.h>
#include <string.h>

#include "backends/backend.h"
#include "backends/cpu/cpu_internal.h"

/* ==== Buffers and the temporary exec ==== */

#define MAX_BUFS 12

struct bufset {
    Py_buffer b[MAX_BUFS];
    int n;
};

static void bufs_release(struct bufset *s) {
    for (int i = 0; i < s->n; i++)
        PyBuffer_Release(&s->b[i]);
    s->n = 0;
}

// Pins o as a C-contiguous buffer of at least need_bytes; NULL (no buffer) if o is None
// and allow_none. Returns the data pointer, or NULL with an exception set (check
// PyErr_Occurred when None is allowed). Once an exception is set, later calls do nothing
// and return NULL, so an op pins all its buffers in a row and checks once at the end.
static void *bufs_get(struct bufset *s, PyObject *o, Py_ssize_t need_bytes, int writable,
                      int allow_none, const char *what) {
    if (PyErr_Occurred())
        return NULL;
    if (o == NULL || o == Py_None) {
        if (!allow_none)
            PyErr_Format(PyExc_ValueError, "%s: a buffer is required", what);
        return NULL;
    }
    if (s->n >= MAX_BUFS) {
        PyErr_SetString(PyExc_RuntimeError, "diag: too many buffers");
        return NULL;
    }
    Py_buffer *b = &s->b[s->n];
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return NULL;
    s->n++;
    if (b->len < need_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need at least %zd", what, b->len,
                     need_bytes);
        return NULL;
    }
    return b->buf;
}

static int parse_dtype(const char *s, enum mf_dtype *dt) {
    if (mf_dtype_parse(s, dt) != 0) {
        PyErr_Format(PyExc_ValueError, "unknown dtype '%s'", s);
        return -1;
    }
    return 0;
}

struct env {
    struct mf_backend *be;
    struct mf_exec *ex;
};

static int env_open(struct env *e, int n_threads, const char *kernels) {
    char err[256] = "";
    e->be = NULL;
    e->ex = NULL;
    if (mf_backend_cpu_new(&e->be, err, sizeof err) != MF_OK ||
        e->be->ops->exec_new(e->be, n_threads, &e->ex, err, sizeof err) != MF_OK ||
        (kernels && mf_cpu_exec_set_kernels(e->ex, kernels, err, sizeof err) != MF_OK)) {
        PyErr_Format(PyExc_RuntimeError, "diag: %s", err);
        if (e->ex)
            e->be->ops->exec_free(e->ex);
        if (e->be)
            e->be->ops->free(e->be);
        e->be = NULL;
        e->ex = NULL;
        return -1;
    }
    return 0;
}

static void env_close(struct env *e) {
    if (e->ex)
        e->be->ops->exec_free(e->ex);
    if (e->be)
        e->be->ops->free(e->be);
}

// An op's exit after an exception was set: releases the pinned buffers, returns NULL.
static PyObject *bufs_fail(struct bufset *s) {
    bufs_release(s);
    return NULL;
}

// Opens the temporary backend and exec for an op that has pinned its buffers in s; on
// failure releases them and returns -1 with an exception set.
static int env_begin(struct env *e, struct bufset *s, int n_threads, const char *kernels) {
    if (env_open(e, n_threads, kernels) < 0) {
        bufs_release(s);
        return -1;
    }
    return 0;
}

// An op's exit after it ran: closes the exec and backend, releases the buffers.
static PyObject *env_end(struct env *e, struct bufset *s) {
    env_close(e);
    bufs_release(s);
    return Py_NewRef(Py_None);
}

// A float vector weight (norm gains, conv weights, A_log, dt_bias) from a buffer.
static int float_weight(struct bufset *s, PyObject *o, const char *dtype, int64_t n,
                        int allow_none, const char *what, struct mf_weight *w) {
    memset(w, 0, sizeof *w);
    if (PyErr_Occurred())
        return -1;   // an earlier buffer failed (see bufs_get)
    if ((o == NULL || o == Py_None) && allow_none)
        return 1;   // absent
    if (parse_dtype(dtype, &w->dtype) < 0)
        return -1;
    w->w = bufs_get(s, o, (Py_ssize_t)(n * (int64_t)mf_dtype_size(w->dtype)), 0, 0, what);
    if (!w->w)
        return -1;
    w->n_out = 1;
    w->n_in = n;
    return 0;
}

/* ==== Linear algebra ==== */

// An MXFP4 weight (wdtype "MXFP4"): U32 codes of 4 bits, groups of 32, U8 scales.
static int mxfp4_format(struct mf_weight *w) {
    if (w->n_in % 32 != 0) {
        PyErr_Format(PyExc_ValueError, "MXFP4: n_in %lld is not a multiple of 32",
                     (long long)w->n_in);
        return -1;
    }
    *w = (struct mf_weight){.dtype = MF_DTYPE_U32, .sdtype = MF_DTYPE_U8, .bits = 4,
                            .group_size = 32, .qmode = MF_QMODE_MXFP4, .n_out = w->n_out,
                            .n_in = w->n_in};
    return 0;
}

// The format of a w->n_out x w->n_in weight from the Python arguments: dtype names, and
// bits / group size when the codes are packed (U32); wdtype "MXFP4" for MLX's mxfp4
// (bits, group size and sdtype are then implied). -1 with an exception set.
static int weight_format(struct mf_weight *w, const char *wdtype, const char *sdtype,
                         int bits, int gs) {
    if (strcmp(wdtype, "MXFP4") == 0)
        return mxfp4_format(w);
    if (parse_dtype(wdtype, &w->dtype) < 0 || parse_dtype(sdtype, &w->sdtype) < 0)
        return -1;
    if (w->dtype == MF_DTYPE_U32) {
        if (bits < 2 || bits > 8 || bits == 7 || (gs != 32 && gs != 64 && gs != 128) ||
            w->n_in % gs != 0) {
            PyErr_Format(PyExc_ValueError, "bad bits %d / group_size %d for n_in %lld",
                         bits, gs, (long long)w->n_in);
            return -1;
        }
        w->bits = bits;
        w->group_size = gs;
    } else if (w->dtype != MF_DTYPE_F32 && w->dtype != MF_DTYPE_BF16 &&
               w->dtype != MF_DTYPE_F16) {
        PyErr_Format(PyExc_ValueError, "weight dtype %s is not a float", wdtype);
        return -1;
    }
    return 0;
}

// Pins w's codes (and scales, biases when packed) sized for `count` times the layout
// `unit` (stacked matrices, or single rows); errors as bufs_get.
static void weight_pin(struct bufset *s, struct mf_weight *w, const struct mf_weight *unit,
                       int64_t count, PyObject *o_w, PyObject *o_s, PyObject *o_b) {
    w->w = bufs_get(s, o_w, (Py_ssize_t)(mf_weight_w_bytes(unit) * count), 0, 0, "w");
    if (w->dtype == MF_DTYPE_U32) {
        Py_ssize_t sb = (Py_ssize_t)(mf_weight_s_bytes(unit) * count);
        w->scales = bufs_get(s, o_s, sb, 0, 0, "scales");
        if (w->qmode == MF_QMODE_AFFINE)
            w->biases = bufs_get(s, o_b, sb, 0, 0, "biases");
    }
}

PyDoc_STRVAR(diag_matmul_doc,
"matmul(op, out, w, x, n_out, n_in, n_tok, wdtype='U32', scales=None, "
"biases=None, sdtype='F32', bits=0, group_size=0, n_threads=1, kernels=None, n_rep=1, "
"n_stack=1)\n--\n\n"
"Run op 'matmul' (out[n_tok,n_out] = x @ W^T), 'matmul_t' (out[n_tok,n_in] = x @ W) "
"or 'embed' (out[n_tok,n_in] = rows x (int32 tokens) of W) n_rep times. With n_stack > 1 "
"the buffers hold that many stacked matrices and repetition r uses matrix r % n_stack "
"(benchmarks that must not run from cache).");

static PyObject *diag_matmul(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"op", "out", "w", "x", "n_out", "n_in", "n_tok", "wdtype",
                             "scales", "biases", "sdtype", "bits", "group_size",
                             "n_threads", "kernels", "n_rep", "n_stack", NULL};
    const char *op, *wdtype = "U32", *sdtype = "F32", *kernels = NULL;
    PyObject *o_out, *o_w, *o_x, *o_s = Py_None, *o_b = Py_None;
    long long n_out, n_in;
    int n_tok, bits = 0, gs = 0, n_threads = 1, n_rep = 1, n_stack = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sOOOLLi|sOOsiiizii", kwlist, &op, &o_out,
                                     &o_w, &o_x, &n_out, &n_in, &n_tok, &wdtype, &o_s,
                                     &o_b, &sdtype, &bits, &gs, &n_threads, &kernels,
                                     &n_rep, &n_stack))
        return NULL;
    int which = strcmp(op, "matmul") == 0 ? 0 : strcmp(op, "matmul_t") == 0 ? 1
                : strcmp(op, "embed") == 0 ? 2 : -1;
    if (which < 0)
        return PyErr_Format(PyExc_ValueError, "unknown op '%s'", op);
    if (n_out < 1 || n_in < 1 || n_tok < 1 || n_threads < 1 || n_rep < 1 || n_stack < 1)
        return PyErr_Format(PyExc_ValueError, "sizes must be positive");
    struct mf_weight w = {.n_out = n_out, .n_in = n_in};
    if (weight_format(&w, wdtype, sdtype, bits, gs) < 0)
        return NULL;
    struct bufset s = {.n = 0};
    Py_ssize_t x_bytes = which == 0 ? (Py_ssize_t)(n_tok * n_in * 4)
                         : which == 1 ? (Py_ssize_t)(n_tok * n_out * 4)
                                      : (Py_ssize_t)(n_tok * 4);
    Py_ssize_t y_bytes = (Py_ssize_t)(n_tok * (which == 0 ? n_out : n_in) * 4);
    float *y = bufs_get(&s, o_out, y_bytes, 1, 0, "out");
    const void *x = bufs_get(&s, o_x, x_bytes, 0, 0, "x");
    weight_pin(&s, &w, &w, n_stack, o_w, o_s, o_b);
    if (PyErr_Occurred())
        return bufs_fail(&s);
    if (which == 2)
        for (int t = 0; t < n_tok; t++)
            if (((const int32_t *)x)[t] < 0 || ((const int32_t *)x)[t] >= n_out) {
                PyErr_Format(PyExc_ValueError, "token %d out of range", ((const int32_t *)x)[t]);
                return bufs_fail(&s);
            }
    struct env e;
    if (env_begin(&e, &s, n_threads, kernels) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (int r = 0; r < n_rep; r++) {
        struct mf_weight ws = mf_weight_slice(&w, r % n_stack);
        if (which == 0)
            e.be->ops->matmul(e.ex, y, &ws, x, n_tok);
        else if (which == 1)
            e.be->ops->matmul_t(e.ex, y, &ws, x, n_tok);
        else
            e.be->ops->embed(e.ex, y, &ws, x, n_tok);
    }
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

PyDoc_STRVAR(diag_matmul_heads_doc,
"matmul_heads(out, w, x, n_out, n_in, n_tok, n_head, w_head_rows, transposed, "
"y_tok_stride, y_head_stride, x_tok_stride, x_head_stride, wdtype='U32', scales=None, "
"biases=None, sdtype='F32', bits=0, group_size=0, n_threads=1, kernels=None)\n--\n\n"
"Run op 'matmul_heads': per head h, y_h = x_h @ W_h^T (or x_h @ W_h when transposed), "
"W_h the [n_out, n_in] rows starting at row h*w_head_rows of w; strides in floats.");

// Highest float index + 1 touched by [n_tok, n_head, width] rows at the given strides.
static int64_t strided_extent(int n_tok, int64_t tok_stride, int n_head,
                              int64_t head_stride, int64_t width) {
    return (n_tok - 1) * tok_stride + (n_head - 1) * head_stride + width;
}

static PyObject *diag_matmul_heads(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"out", "w", "x", "n_out", "n_in", "n_tok", "n_head",
                             "w_head_rows", "transposed", "y_tok_stride", "y_head_stride",
                             "x_tok_stride", "x_head_stride", "wdtype", "scales", "biases",
                             "sdtype", "bits", "group_size", "n_threads", "kernels", NULL};
    const char *wdtype = "U32", *sdtype = "F32", *kernels = NULL;
    PyObject *o_out, *o_w, *o_x, *o_s = Py_None, *o_b = Py_None;
    long long n_out, n_in, head_rows;
    int n_tok, n_head, trans, yts, yhs, xts, xhs, bits = 0, gs = 0, n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOLLiiLpiiii|sOOsiiiz", kwlist, &o_out,
                                     &o_w, &o_x, &n_out, &n_in, &n_tok, &n_head, &head_rows,
                                     &trans, &yts, &yhs, &xts, &xhs, &wdtype, &o_s, &o_b,
                                     &sdtype, &bits, &gs, &n_threads, &kernels))
        return NULL;
    if (n_out < 1 || n_in < 1 || n_tok < 1 || n_head < 1 || n_threads < 1 ||
        head_rows < 0 || yts < 0 || yhs < 0 || xts < 0 || xhs < 0)
        return PyErr_Format(PyExc_ValueError, "sizes must be positive, strides >= 0");
    struct mf_weight w = {.n_out = n_out, .n_in = n_in};
    if (weight_format(&w, wdtype, sdtype, bits, gs) < 0)
        return NULL;
    // Rows the last head reaches, as a multiple of one row's bytes.
    struct mf_weight one_row = w;
    one_row.n_out = 1;
    int64_t n_rows = (int64_t)(n_head - 1) * head_rows + n_out;
    int64_t in_w = trans ? n_out : n_in, out_w = trans ? n_in : n_out;
    struct bufset s = {.n = 0};
    float *y = bufs_get(&s, o_out, (Py_ssize_t)(strided_extent(n_tok, yts, n_head, yhs,
                                                                out_w) * 4), 1, 0, "out");
    const float *x = bufs_get(&s, o_x, (Py_ssize_t)(strided_extent(n_tok, xts, n_head, xhs,
                                                                   in_w) * 4), 0, 0, "x");
    weight_pin(&s, &w, &one_row, n_rows, o_w, o_s, o_b);
    if (PyErr_Occurred())
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, n_threads, kernels) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    e.be->ops->matmul_heads(e.ex, y, yts, yhs, &w, head_rows, trans, x, xts, xhs, n_tok,
                            n_head);
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

/* ==== Norms and rope ==== */

PyDoc_STRVAR(diag_rmsnorm_doc,
"rmsnorm(out, x, n_rows, n, eps, g=None, gdtype='F32', scale=1.0, z=None, "
"n_threads=1)\n--\n\n"
"out[n_rows,n] = rmsnorm(x) * g * scale, or rmsnorm(x) * g * silu(z) when z is given.");

static PyObject *diag_rmsnorm(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"out", "x", "n_rows", "n", "eps", "g", "gdtype", "scale", "z",
                             "n_threads", NULL};
    PyObject *o_out, *o_x, *o_g = Py_None, *o_z = Py_None;
    int n_rows, n, n_threads = 1;
    float eps, scale = 1.0f;
    const char *gdtype = "F32";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiif|OsfOi", kwlist, &o_out, &o_x, &n_rows,
                                     &n, &eps, &o_g, &gdtype, &scale, &o_z, &n_threads))
        return NULL;
    if (n_rows < 1 || n < 1 || n_threads < 1)
        return PyErr_Format(PyExc_ValueError, "sizes must be positive");
    struct bufset s = {.n = 0};
    Py_ssize_t bytes = (Py_ssize_t)n_rows * n * 4;
    struct mf_weight g;
    float *y = bufs_get(&s, o_out, bytes, 1, 0, "out");
    const float *x = bufs_get(&s, o_x, bytes, 0, 0, "x");
    int grc = float_weight(&s, o_g, gdtype, n, 1, "g", &g);
    const float *z = bufs_get(&s, o_z, bytes, 0, 1, "z");
    if (grc < 0 || PyErr_Occurred())
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, n_threads, NULL) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (z)
        e.be->ops->rmsnorm_gated(e.ex, y, x, z, grc == 1 ? NULL : &g, n_rows, n, eps);
    else
        e.be->ops->rmsnorm(e.ex, y, x, grc == 1 ? NULL : &g, n_rows, n, eps, scale);
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

PyDoc_STRVAR(diag_rope_doc,
"rope(x, n_tok, n_heads, tok_stride, head_stride, n_rot, inv_freq, pos0, "
"traditional, mscale=1.0, n_threads=1)\n--\n\n"
"Rotary embedding in place on the float32 buffer x.");

static PyObject *diag_rope(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"x", "n_tok", "n_heads", "tok_stride", "head_stride", "n_rot",
                             "inv_freq", "pos0", "traditional", "mscale", "n_threads", NULL};
    PyObject *o_x, *o_f;
    int n_tok, n_heads, tok_stride, head_stride, n_rot, pos0, traditional, n_threads = 1;
    float mscale = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiiiiiOip|fi", kwlist, &o_x, &n_tok,
                                     &n_heads, &tok_stride, &head_stride, &n_rot, &o_f,
                                     &pos0, &traditional, &mscale, &n_threads))
        return NULL;
    if (n_tok < 1 || n_heads < 1 || n_rot < 2 || n_rot % 2 || pos0 < 0 || n_threads < 1 ||
        head_stride < n_rot || tok_stride < 1)
        return PyErr_Format(PyExc_ValueError, "bad rope sizes");
    struct bufset s = {.n = 0};
    Py_ssize_t need = ((Py_ssize_t)(n_tok - 1) * tok_stride +
                       (Py_ssize_t)(n_heads - 1) * head_stride + n_rot) * 4;
    float *x = bufs_get(&s, o_x, need, 1, 0, "x");
    const float *f = bufs_get(&s, o_f, (Py_ssize_t)(n_rot / 2) * 4, 0, 0, "inv_freq");
    if (!f)
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, n_threads, NULL) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    e.be->ops->rope(e.ex, x, n_tok, n_heads, tok_stride, head_stride, n_rot, f, pos0,
                    traditional, mscale);
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

/* ==== Attention ==== */

PyDoc_STRVAR(diag_attention_doc,
"attention(out, q, kv, n_tok, n_head, n_kv_head, dk, dv, k_stride, v_stride, "
"pos0, scale, k_off=0, v=None, v_off=0, n_threads=1, kernels=None, sinks=None, "
"sinks_dtype='F32', window=0, ring=0)\n--\n\n"
"Causal attention; keys at kv + k_off (elements), values at (v or kv) + v_off. With "
"sinks [n_head] (raw, of sinks_dtype), window > 0 or ring > 0: attention_ext (the "
"cache then holds min(ring, pos0 + n_tok) rows when ring > 0).");

static PyObject *diag_attention(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"out", "q", "kv", "n_tok", "n_head", "n_kv_head", "dk", "dv",
                             "k_stride", "v_stride", "pos0", "scale", "k_off", "v",
                             "v_off", "n_threads", "kernels", "sinks", "sinks_dtype",
                             "window", "ring", NULL};
    const char *kernels = NULL, *sinks_dtype = "F32";
    PyObject *o_out, *o_q, *o_k, *o_v = Py_None, *o_sinks = Py_None;
    int n_tok, n_head, n_kv_head, dk, dv, k_stride, v_stride, pos0, k_off = 0, v_off = 0,
        n_threads = 1, window = 0, ring = 0;
    float scale;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOiiiiiiiif|iOiizOsii", kwlist, &o_out,
                                     &o_q, &o_k, &n_tok, &n_head, &n_kv_head, &dk, &dv,
                                     &k_stride, &v_stride, &pos0, &scale, &k_off, &o_v,
                                     &v_off, &n_threads, &kernels, &o_sinks, &sinks_dtype,
                                     &window, &ring))
        return NULL;
    if (n_tok < 1 || n_head < 1 || n_kv_head < 1 || n_head % n_kv_head || dk < 1 || dv < 1 ||
        pos0 < 0 || k_off < 0 || v_off < 0 || n_threads < 1 || window < 0 || ring < 0 ||
        (ring > 0 && ring < (window > 0 ? window + n_tok - 1 : pos0 + n_tok)))
        return PyErr_Format(PyExc_ValueError, "bad attention sizes");
    int n_pos = ring > 0 && ring < pos0 + n_tok ? ring : pos0 + n_tok;   // cache rows
    struct bufset s = {.n = 0};
    float *out = bufs_get(&s, o_out, (Py_ssize_t)n_tok * n_head * dv * 4, 1, 0, "out");
    const float *q = bufs_get(&s, o_q, (Py_ssize_t)n_tok * n_head * dk * 4, 0, 0, "q");
    Py_ssize_t k_need = ((Py_ssize_t)(n_pos - 1) * k_stride + (Py_ssize_t)n_kv_head * dk +
                         k_off) * 4;
    Py_ssize_t v_need = ((Py_ssize_t)(n_pos - 1) * v_stride + (Py_ssize_t)n_kv_head * dv +
                         v_off) * 4;
    // Keys and values in one buffer unless v is given: then kv must hold both ranges.
    Py_ssize_t kv_need = o_v == Py_None && v_need > k_need ? v_need : k_need;
    const float *k = bufs_get(&s, o_k, kv_need, 0, 0, "kv");
    const float *v = o_v == Py_None ? k : bufs_get(&s, o_v, v_need, 0, 0, "v");
    struct mf_weight sinks;
    int no_sinks = float_weight(&s, o_sinks, sinks_dtype, n_head, 1, "sinks", &sinks);
    if (!k || !v || no_sinks < 0)
        return bufs_fail(&s);
    struct mf_attn_ext ext = {.sinks = no_sinks ? NULL : &sinks, .window = window,
                              .ring = ring};
    struct env e;
    if (env_begin(&e, &s, n_threads, kernels) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (ext.sinks || window || ring)
        e.be->ops->attention_ext(e.ex, out, q, k + k_off, v + v_off, n_tok, n_head,
                                 n_kv_head, dk, dv, k_stride, v_stride, pos0, scale, &ext);
    else
        e.be->ops->attention(e.ex, out, q, k + k_off, v + v_off, n_tok, n_head, n_kv_head,
                             dk, dv, k_stride, v_stride, pos0, scale);
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

/* ==== GatedDeltaNet pieces ==== */

PyDoc_STRVAR(diag_conv1d_silu_doc,
"conv1d_silu(y, state, u, w, n_tok, C, K, wdtype='F32', n_threads=1)\n--\n\n"
"y[n_tok,C] = silu(causal depthwise conv); state[K-1,C] is read and advanced.");

PyDoc_STRVAR(diag_conv1d_silu_from_doc,
"conv1d_silu_from(y, state, state_in, u, w, n_tok, C, K, wdtype='F32', "
"n_threads=1)\n--\n\n"
"As conv1d_silu, out of place: history read from state_in[K-1,C] (not written), "
"the advanced history written to state[K-1,C].");

// Both conv ops: in place (from = 0), or out of place with state_in after state.
static PyObject *conv1d_silu_run(PyObject *args, PyObject *kw, int from) {
    static char *kw_in[] = {"y", "state", "u", "w", "n_tok", "C", "K", "wdtype",
                            "n_threads", NULL};
    static char *kw_from[] = {"y", "state", "state_in", "u", "w", "n_tok", "C", "K",
                              "wdtype", "n_threads", NULL};
    PyObject *o_y, *o_st, *o_in = NULL, *o_u, *o_w;
    int n_tok, C, K, n_threads = 1;
    const char *wdtype = "F32";
    int parsed =
        from ? PyArg_ParseTupleAndKeywords(args, kw, "OOOOOiii|si", kw_from, &o_y, &o_st,
                                           &o_in, &o_u, &o_w, &n_tok, &C, &K, &wdtype,
                                           &n_threads)
             : PyArg_ParseTupleAndKeywords(args, kw, "OOOOiii|si", kw_in, &o_y, &o_st, &o_u,
                                           &o_w, &n_tok, &C, &K, &wdtype, &n_threads);
    if (!parsed)
        return NULL;
    if (n_tok < 1 || C < 1 || K < 2 || n_threads < 1)
        return PyErr_Format(PyExc_ValueError, "bad conv sizes");
    struct bufset s = {.n = 0};
    struct mf_weight w;
    Py_ssize_t state_bytes = (Py_ssize_t)(K - 1) * C * 4;
    float *y = bufs_get(&s, o_y, (Py_ssize_t)n_tok * C * 4, 1, 0, "y");
    float *st = bufs_get(&s, o_st, state_bytes, 1, 0, "state");
    const float *st_in = from ? bufs_get(&s, o_in, state_bytes, 0, 0, "state_in") : NULL;
    const float *u = bufs_get(&s, o_u, (Py_ssize_t)n_tok * C * 4, 0, 0, "u");
    if (!u || float_weight(&s, o_w, wdtype, (int64_t)C * K, 0, "w", &w) < 0)
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, n_threads, NULL) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (from)
        e.be->ops->conv1d_silu_from(e.ex, y, st, st_in, u, &w, n_tok, C, K);
    else
        e.be->ops->conv1d_silu(e.ex, y, st, u, &w, n_tok, C, K);
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

static PyObject *diag_conv1d_silu(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return conv1d_silu_run(args, kw, 0);
}

static PyObject *diag_conv1d_silu_from(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return conv1d_silu_run(args, kw, 1);
}

PyDoc_STRVAR(diag_gdn_gates_doc,
"gdn_gates(g, beta, a, b, ab_stride, A_log, dt_bias, n_tok, nv, A_dtype='F32', "
"dt_dtype='F32')\n--\n\n"
"beta = sigmoid(b), g = exp(-exp(A_log) * softplus(a + dt_bias)), each [n_tok, nv].");

static PyObject *diag_gdn_gates(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"g", "beta", "a", "b", "ab_stride", "A_log", "dt_bias",
                             "n_tok", "nv", "A_dtype", "dt_dtype", NULL};
    PyObject *o_g, *o_beta, *o_a, *o_b, *o_A, *o_dt;
    int ab_stride, n_tok, nv;
    const char *A_dtype = "F32", *dt_dtype = "F32";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOiOOii|ss", kwlist, &o_g, &o_beta, &o_a,
                                     &o_b, &ab_stride, &o_A, &o_dt, &n_tok, &nv, &A_dtype,
                                     &dt_dtype))
        return NULL;
    if (n_tok < 1 || nv < 1 || ab_stride < nv)
        return PyErr_Format(PyExc_ValueError, "bad gate sizes");
    struct bufset s = {.n = 0};
    struct mf_weight A, dt;
    Py_ssize_t out_bytes = (Py_ssize_t)n_tok * nv * 4;
    Py_ssize_t ab_bytes = ((Py_ssize_t)(n_tok - 1) * ab_stride + nv) * 4;
    float *g = bufs_get(&s, o_g, out_bytes, 1, 0, "g");
    float *beta = bufs_get(&s, o_beta, out_bytes, 1, 0, "beta");
    const float *a = bufs_get(&s, o_a, ab_bytes, 0, 0, "a");
    const float *b = bufs_get(&s, o_b, ab_bytes, 0, 0, "b");
    if (!b || float_weight(&s, o_A, A_dtype, nv, 0, "A_log", &A) < 0 ||
        float_weight(&s, o_dt, dt_dtype, nv, 0, "dt_bias", &dt) < 0)
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, 1, NULL) < 0)
        return NULL;
    e.be->ops->gdn_gates(e.ex, g, beta, a, b, ab_stride, &A, &dt, n_tok, nv);
    return env_end(&e, &s);
}

PyDoc_STRVAR(diag_gdn_recurrence_doc,
"gdn_recurrence(o, S, qkv, qkv_stride, q_off, k_off, v_off, g, beta, n_tok, nk, nv, "
"dk, dv, n_threads=1, kernels=None)\n--\n\n"
"Delta-rule recurrence; q/k/v of token t at qkv + t*qkv_stride + *_off; S updated.");

PyDoc_STRVAR(diag_gdn_recurrence_from_doc,
"gdn_recurrence_from(o, S, S_in, qkv, qkv_stride, q_off, k_off, v_off, g, beta, "
"n_tok, nk, nv, dk, dv, n_threads=1, kernels=None)\n--\n\n"
"As gdn_recurrence, out of place: state read from S_in (not written), the "
"advanced state written to S; n_tok may be 0 (S = S_in).");

// Both recurrence ops: in place (from = 0), or out of place with S_in after S (and
// n_tok 0 allowed).
static PyObject *gdn_recurrence_run(PyObject *args, PyObject *kw, int from) {
    static char *kw_in[] = {"o", "S", "qkv", "qkv_stride", "q_off", "k_off", "v_off", "g",
                            "beta", "n_tok", "nk", "nv", "dk", "dv", "n_threads", "kernels",
                            NULL};
    static char *kw_from[] = {"o", "S", "S_in", "qkv", "qkv_stride", "q_off", "k_off",
                              "v_off", "g", "beta", "n_tok", "nk", "nv", "dk", "dv",
                              "n_threads", "kernels", NULL};
    const char *kernels = NULL;
    PyObject *o_o, *o_S, *o_Sin = NULL, *o_qkv, *o_g, *o_beta;
    int qkv_stride, q_off, k_off, v_off, n_tok, nk, nv, dk, dv, n_threads = 1;
    int parsed =
        from ? PyArg_ParseTupleAndKeywords(args, kw, "OOOOiiiiOOiiiii|iz", kw_from, &o_o,
                                           &o_S, &o_Sin, &o_qkv, &qkv_stride, &q_off,
                                           &k_off, &v_off, &o_g, &o_beta, &n_tok, &nk, &nv,
                                           &dk, &dv, &n_threads, &kernels)
             : PyArg_ParseTupleAndKeywords(args, kw, "OOOiiiiOOiiiii|iz", kw_in, &o_o, &o_S,
                                           &o_qkv, &qkv_stride, &q_off, &k_off, &v_off,
                                           &o_g, &o_beta, &n_tok, &nk, &nv, &dk, &dv,
                                           &n_threads, &kernels);
    if (!parsed)
        return NULL;
    if (n_tok < (from ? 0 : 1) || nk < 1 || nv < 1 || nv % nk || dk < 1 || dv < 1 ||
        q_off < 0 || k_off < 0 || v_off < 0 || n_threads < 1)
        return PyErr_Format(PyExc_ValueError, "bad recurrence sizes");
    int end = q_off + nk * dk;
    end = k_off + nk * dk > end ? k_off + nk * dk : end;
    end = v_off + nv * dv > end ? v_off + nv * dv : end;
    Py_ssize_t qkv_floats = n_tok ? (Py_ssize_t)(n_tok - 1) * qkv_stride + end : 0;
    Py_ssize_t state_bytes = (Py_ssize_t)nv * dv * dk * 4;
    struct bufset s = {.n = 0};
    float *o = bufs_get(&s, o_o, (Py_ssize_t)n_tok * nv * dv * 4, 1, 0, "o");
    float *S = bufs_get(&s, o_S, state_bytes, 1, 0, "S");
    const float *S_in = from ? bufs_get(&s, o_Sin, state_bytes, 0, 0, "S_in") : NULL;
    const float *qkv = bufs_get(&s, o_qkv, qkv_floats * 4, 0, 0, "qkv");
    const float *g = bufs_get(&s, o_g, (Py_ssize_t)n_tok * nv * 4, 0, 0, "g");
    const float *beta = bufs_get(&s, o_beta, (Py_ssize_t)n_tok * nv * 4, 0, 0, "beta");
    if (!beta)
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, n_threads, kernels) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (from)
        e.be->ops->gdn_recurrence_from(e.ex, o, S, S_in, qkv + q_off, qkv + k_off,
                                       qkv + v_off, qkv_stride, g, beta, n_tok, nk, nv, dk,
                                       dv);
    else
        e.be->ops->gdn_recurrence(e.ex, o, S, qkv + q_off, qkv + k_off, qkv + v_off,
                                  qkv_stride, g, beta, n_tok, nk, nv, dk, dv);
    Py_END_ALLOW_THREADS
    return env_end(&e, &s);
}

static PyObject *diag_gdn_recurrence(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return gdn_recurrence_run(args, kw, 0);
}

static PyObject *diag_gdn_recurrence_from(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return gdn_recurrence_run(args, kw, 1);
}

/* ==== Elementwise and rows ==== */

PyDoc_STRVAR(diag_elementwise_doc,
"elementwise(op, y, a, n_rows, n_cols, stride, b_off=0, g_cols=0, alpha=1.0, "
"limit=0.0)\n--\n\n"
"op 'swiglu': y[r,c] = silu(a[r*stride+c]) * a[r*stride+b_off+c]; 'mul_sigmoid': "
"y[r,c] *= sigmoid(a[r*stride + (g_cols==1 ? 0 : c)]); 'axpy': y += alpha*a (n_cols); "
"'swiglu_clamped': as swiglu, gpt-oss's form with alpha and limit.");

static PyObject *diag_elementwise(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"op", "y", "a", "n_rows", "n_cols", "stride", "b_off",
                             "g_cols", "alpha", "limit", NULL};
    const char *op;
    PyObject *o_y, *o_a;
    int n_rows, n_cols, stride, b_off = 0, g_cols = 0;
    float alpha = 1.0f, limit = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sOOiii|iiff", kwlist, &op, &o_y, &o_a,
                                     &n_rows, &n_cols, &stride, &b_off, &g_cols, &alpha,
                                     &limit))
        return NULL;
    int clamped = strcmp(op, "swiglu_clamped") == 0;
    int which = strcmp(op, "swiglu") == 0 || clamped ? 0 : strcmp(op, "mul_sigmoid") == 0 ? 1
                : strcmp(op, "axpy") == 0 ? 2 : -1;
    if (which < 0 || n_rows < 1 || n_cols < 1 || stride < 0 || b_off < 0)
        return PyErr_Format(PyExc_ValueError, "bad op or sizes");
    Py_ssize_t a_need = which == 0 ? (Py_ssize_t)(n_rows - 1) * stride + b_off + n_cols
                        : which == 1 ? (Py_ssize_t)(n_rows - 1) * stride + (g_cols == 1 ? 1 : n_cols)
                                     : (Py_ssize_t)n_cols;
    struct bufset s = {.n = 0};
    float *y = bufs_get(&s, o_y, (Py_ssize_t)(which == 2 ? 1 : n_rows) * n_cols * 4, 1, 0, "y");
    const float *a = bufs_get(&s, o_a, a_need * 4, 0, 0, "a");
    if (!a)
        return bufs_fail(&s);
    struct env e;
    if (env_begin(&e, &s, 1, NULL) < 0)
        return NULL;
    if (clamped)
        e.be->ops->swiglu_clamped(e.ex, y, a, a + b_off, n_rows, n_cols, stride, alpha,
                                  limit);
    else if (which == 0)
        e.be->ops->swiglu(e.ex, y, a, a + b_off, n_rows, n_cols, stride);
    else if (which == 1)
        e.be->ops->mul_sigmoid(e.ex, y, a, n_rows, n_cols, stride, g_cols);
    else
        e.be->ops->axpy(e.ex, y, alpha, a, n_cols);
    return env_end(&e, &s);
}

PyDoc_STRVAR(diag_rows_doc,
"rows(op, dst, src, idx, n_rows, n, n_dst_rows, n_src_rows, w=None)\n--\n\n"
"op 'scatter_add': dst[idx[i]] += w[i] * src[i]; 'gather': dst[i] = src[idx[i]].");

static PyObject *diag_rows(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"op", "dst", "src", "idx", "n_rows", "n", "n_dst_rows",
                             "n_src_rows", "w", NULL};
    const char *op;
    PyObject *o_d, *o_s, *o_i, *o_w = Py_None;
    int n_rows, n, n_dst, n_src;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sOOOiiii|O", kwlist, &op, &o_d, &o_s, &o_i,
                                     &n_rows, &n, &n_dst, &n_src, &o_w))
        return NULL;
    int scatter = strcmp(op, "scatter_add") == 0;
    if ((!scatter && strcmp(op, "gather") != 0) || n_rows < 1 || n < 1)
        return PyErr_Format(PyExc_ValueError, "bad op or sizes");
    struct bufset s = {.n = 0};
    float *dst = bufs_get(&s, o_d, (Py_ssize_t)n_dst * n * 4, 1, 0, "dst");
    const float *src = bufs_get(&s, o_s, (Py_ssize_t)n_src * n * 4, 0, 0, "src");
    const int32_t *idx = bufs_get(&s, o_i, (Py_ssize_t)n_rows * 4, 0, 0, "idx");
    const float *w = bufs_get(&s, o_w, (Py_ssize_t)n_rows * 4, 0, 1, "w");
    if (!idx || PyErr_Occurred())
        return bufs_fail(&s);
    int bound = scatter ? n_dst : n_src;
    if ((scatter ? n_src : n_dst) < n_rows) {
        PyErr_SetString(PyExc_ValueError, "fewer rows than n_rows");
        return bufs_fail(&s);
    }
    for (int i = 0; i < n_rows; i++)
        if (idx[i] < 0 || idx[i] >= bound) {
            PyErr_Format(PyExc_ValueError, "index %d out of range", idx[i]);
            return bufs_fail(&s);
        }
    struct env e;
    if (env_begin(&e, &s, 2, NULL) < 0)
        return NULL;
    if (scatter)
        e.be->ops->scatter_add_rows(e.ex, dst, src, idx, w, n_rows, n);
    else
        e.be->ops->gather_rows(e.ex, dst, src, idx, n_rows, n);
    return env_end(&e, &s);
}

/* ==== Benchmark helpers ==== */

struct read_job {
    const float *buf;
    int64_t n;
    int64_t per_task;
    float *partial;   // [n_task]
};

static void read_task(void *arg, int task, int tid) {
    (void)tid;
    const struct read_job *j = arg;
    int64_t i0 = task * j->per_task, i1 = i0 + j->per_task < j->n ? i0 + j->per_task : j->n;
    // Eight independent sums so the loop is bound by loads, not by add latency.
    float s[8] = {0};
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += j->buf[i + k];
    for (; i < i1; i++)
        s[0] += j->buf[i];
    j->partial[task] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

PyDoc_STRVAR(diag_read_bw_doc,
"read_bw(buf, n_threads, n_rep, n_stack=1) -> float\n--\n\n"
"Sum a float32 buffer on the CPU backend's pool, n_rep times (a plain memory-read "
"baseline for benchmarks). With n_stack > 1 the buffer is n_stack equal chunks and "
"repetition r sums chunk r % n_stack, one pool run per chunk as matmul does. Returns "
"the last sum.");

static PyObject *diag_read_bw(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o;
    int n_threads, n_rep, n_stack = 1;
    if (!PyArg_ParseTuple(args, "Oii|i", &o, &n_threads, &n_rep, &n_stack))
        return NULL;
    if (n_threads < 1 || n_rep < 1 || n_stack < 1)
        return PyErr_Format(PyExc_ValueError, "n_threads, n_rep, n_stack must be positive");
    struct bufset s = {.n = 0};
    const float *buf = bufs_get(&s, o, 4 * (Py_ssize_t)n_stack, 0, 0, "buf");
    if (!buf)
        return bufs_fail(&s);
    const int64_t chunk = s.b[0].len / 4 / n_stack;
    struct read_job j = {.buf = buf, .n = chunk};
    // Enough tasks to spread any chunk over the threads, at least 16 KiB each.
    j.per_task = (chunk + 4 * n_threads - 1) / (4 * n_threads);
    j.per_task = j.per_task < 4096 ? 4096 : j.per_task;
    int n_task = (int)((chunk + j.per_task - 1) / j.per_task);
    j.partial = calloc((size_t)n_task, sizeof(float));
    struct env e;
    if (!j.partial || env_open(&e, n_threads, NULL) < 0) {
        free(j.partial);
        bufs_release(&s);
        return j.partial ? NULL : PyErr_NoMemory();
    }
    double total = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int r = 0; r < n_rep; r++) {
        j.buf = buf + (r % n_stack) * chunk;
        mf_pool_run(e.ex->pool, read_task, &j, n_task);
    }
    for (int t = 0; t < n_task; t++)
        total += j.partial[t];
    Py_END_ALLOW_THREADS
    env_close(&e);
    free(j.partial);
    bufs_release(&s);
    return PyFloat_FromDouble(total);
}

PyDoc_STRVAR(diag_kernels_doc,
"kernels() -> list[str]\n--\n\n"
"Kernel sets this CPU supports, best first.");

static PyObject *diag_kernels(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    static const char *const names[] = {"avx512vnni", "avx512", "avx2", "neon", "scalar"};
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (!mf_cpu_kernels_find(names[i]))
            continue;
        PyObject *str = PyUnicode_FromString(names[i]);
        if (!str || PyList_Append(list, str) < 0) {
            Py_XDECREF(str);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(str);
    }
    return list;
}

#define KW(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS

static PyMethodDef diag_methods[] = {
    {"matmul", KW(diag_matmul), diag_matmul_doc},
    {"matmul_heads", KW(diag_matmul_heads), diag_matmul_heads_doc},
    {"rmsnorm", KW(diag_rmsnorm), diag_rmsnorm_doc},
    {"rope", KW(diag_rope), diag_rope_doc},
    {"attention", KW(diag_attention), diag_attention_doc},
    {"conv1d_silu", KW(diag_conv1d_silu), diag_conv1d_silu_doc},
    {"conv1d_silu_from", KW(diag_conv1d_silu_from), diag_conv1d_silu_from_doc},
    {"gdn_gates", KW(diag_gdn_gates), diag_gdn_gates_doc},
    {"gdn_recurrence", KW(diag_gdn_recurrence), diag_gdn_recurrence_doc},
    {"gdn_recurrence_from", KW(diag_gdn_recurrence_from),
     diag_gdn_recurrence_from_doc},
    {"elementwise", KW(diag_elementwise), diag_elementwise_doc},
    {"rows", KW(diag_rows), diag_rows_doc},
    {"read_bw", diag_read_bw, METH_VARARGS, diag_read_bw_doc},
    {"kernels", diag_kernels, METH_NOARGS, diag_kernels_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot diag_slots[] = {
#ifdef Py_mod_gil
    // No module state: every function works on its own temporary backend and exec.
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef diag_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moeflux._diag",
    .m_doc = "Test-only: single backend ops on numpy buffers (not part of the API).",
    .m_size = 0,
    .m_methods = diag_methods,
    .m_slots = diag_slots,
};

PyMODINIT_FUNC PyInit__diag(void) {
    return PyModuleDef_Init(&diag_module);
}
