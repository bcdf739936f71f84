/*
 * module.c — moeflux._core: the CPython binding of the C core.
 *
 * Two heap types made per module (multi-phase init, PyType_FromModuleAndSpec):
 * ModelHandle owns a loaded mf_model; Context owns an mf_ctx over a handle. The GIL
 * is released around every call into the core that may take long (model load, ctx
 * creation, eval); arguments are parsed and buffers pinned before, results built after.
 * One lock per Context keeps two threads off one mf_ctx while separate Contexts run in
 * parallel. Ctrl-C reaches a running eval through the ctx abort callback, which takes
 * the GIL briefly to run the signal handlers, at most every MF_PY_POLL_S and only when
 * the eval runs on the main thread (the only one Python runs them on). Status codes
 * become exceptions in exactly one place, mf_py_raise, with classes from
 * moeflux.errors. numpy arrays are made by calling numpy.empty (no numpy C API, so the
 * build needs no numpy headers) and filled through the buffer protocol.
 */
#include "python/binding.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/metal/metal_backend.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ==== Module state and errors ==== */

mf_py_state *mf_py_state_of_type(PyTypeObject *tp) {
    PyObject *mod = PyType_GetModule(tp);
    return mod ? (mf_py_state *)PyModule_GetState(mod) : NULL;
}

PyObject *mf_py_raise(mf_py_state *st, int status, const char *msg) {
    if (!msg || !msg[0])
        msg = mf_strerror(status);
    PyObject *cls;
    switch (status) {
    case MF_ERR_IO: cls = st->err_io; break;
    case MF_ERR_FORMAT: cls = st->err_format; break;
    case MF_ERR_SHAPE: cls = st->err_shape; break;
    case MF_ERR_ARG: cls = st->err_arg; break;
    case MF_ERR_NOMEM: cls = st->err_nomem; break;
    case MF_ERR_STATE: cls = st->err_state; break;
    case MF_ERR_UNSUPPORTED: cls = st->err_unsupported; break;
    case MF_ERR_BACKEND: cls = st->err_backend; break;
    case MF_ERR_NUMERIC: cls = st->err_numeric; break;
    case MF_ABORTED: cls = st->err_aborted; break;
    default:
        PyErr_Format(st->err_base, "moeflux status %d: %s", status, msg);
        return NULL;
    }
    PyErr_SetString(cls, msg);
    return NULL;
}

/* ==== Locks ==== */

int mf_py_ctx_lock(mf_py_context *self) {
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    if (!self->ctx) {
        PyThread_release_lock(self->lock);
        PyErr_SetString(PyExc_ValueError, "Context is closed");
        return -1;
    }
    return 0;
}

void mf_py_ctx_unlock(mf_py_context *self) {
    PyThread_release_lock(self->lock);
}

/* ==== ModelHandle ==== */

PyDoc_STRVAR(handle_doc,
"ModelHandle(path, backend='cpu', use_2bit=0, gpu_experts=None, gpu_cache_bytes=-1,\n"
"            gpu_cache_fraction=-1.0)\n--\n\n"
"A loaded model directory, shareable by several Contexts.\n\n"
"use_2bit: 0 reads packed_experts/, 1 packed_experts_2bit/, -1 the 2-bit files only\n"
"when the 4-bit ones are absent. gpu_experts: None/'auto', 'resident' or 'stream'\n"
"(moeflux.h). gpu_cache_fraction in [0, 1], else gpu_cache_bytes >= 0, else (both\n"
"< 0) auto: the device expert cache of streaming contexts (moeflux.h). Raises\n"
"moeflux errors naming the bad file.");

static PyObject *handle_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "backend", "use_2bit", "gpu_experts",
                             "gpu_cache_bytes", "gpu_cache_fraction", NULL};
    PyObject *path_bytes = NULL;
    const char *backend = "cpu", *gpu_experts = NULL;
    int use_2bit = 0;
    long long cache_bytes = -1;
    double cache_fraction = -1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|sizLd:ModelHandle", kwlist,
                                     PyUnicode_FSConverter, &path_bytes, &backend,
                                     &use_2bit, &gpu_experts, &cache_bytes,
                                     &cache_fraction))
        return NULL;
    mf_py_state *st = mf_py_state_of_type(tp);
    mf_py_handle *self = (mf_py_handle *)tp->tp_alloc(tp, 0);
    if (!self || !st) {
        Py_XDECREF(self);
        Py_DECREF(path_bytes);
        return NULL;
    }
    self->model = NULL;
    self->path = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(path_bytes),
                                                  PyBytes_GET_SIZE(path_bytes));
    if (!self->path) {
        Py_DECREF(self);
        Py_DECREF(path_bytes);
        return NULL;
    }
    struct mf_model_params p = mf_model_default_params();
    p.backend = backend;
    p.use_2bit = use_2bit;
    p.gpu_experts = gpu_experts;
    p.gpu_cache_bytes = (int64_t)cache_bytes;
    p.gpu_cache_fraction = cache_fraction;
    char err[1024] = "";
    const char *path = PyBytes_AS_STRING(path_bytes);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_model_load(&self->model, path, &p, err, sizeof err);
    Py_END_ALLOW_THREADS
    Py_DECREF(path_bytes);
    if (rc != MF_OK) {
        Py_DECREF(self);
        return mf_py_raise(st, rc, err);
    }
    return (PyObject *)self;
}

static int handle_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void handle_dealloc(PyObject *obj) {
    mf_py_handle *self = (mf_py_handle *)obj;
    PyTypeObject *tp = Py_TYPE(obj);
    PyObject_GC_UnTrack(obj);
    mf_model_free(self->model);
    self->model = NULL;
    Py_CLEAR(self->path);
    tp->tp_free(obj);
    Py_DECREF(tp);
}

static PyObject *handle_get_int(PyObject *obj, void *which) {
    const mf_model *m = ((mf_py_handle *)obj)->model;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(mf_model_n_vocab(m));
    case 1: return PyLong_FromLong(mf_model_n_layer(m));
    case 2: return PyLong_FromLong(mf_model_n_embd(m));
    case 3: return PyLong_FromLong(mf_model_bos(m));
    case 4: return PyLong_FromLong(mf_model_eos(m));
    case 5: return PyLong_FromLongLong(mf_model_expert_bytes_per_token(m));
    case 6: return PyLong_FromLong(mf_model_n_ctx_train(m));
    case 7: return PyUnicode_FromString(mf_model_arch(m));
    case 8: return PyUnicode_FromString(mf_model_config_json(m));
    case 9: return Py_NewRef(((mf_py_handle *)obj)->path);
    case 10: return PyUnicode_FromString(mf_model_backend(m));
    default: Py_RETURN_NONE;
    }
}

#define GET(name, i, doc) {name, handle_get_int, NULL, doc, (void *)(intptr_t)(i)}

static PyGetSetDef handle_getset[] = {
    GET("n_vocab", 0, "Vocabulary size."),
    GET("n_layer", 1, "Number of decoder layers."),
    GET("n_embd", 2, "Hidden size."),
    GET("bos", 3, "BOS token id, -1 if unknown."),
    GET("eos", 4, "EOS token id (first if several), -1 if unknown."),
    GET("expert_bytes_per_token", 5, "Routed-expert bytes read per token, uncached."),
    GET("n_ctx_train", 6, "max_position_embeddings."),
    GET("arch", 7, "config.json model_type."),
    GET("config_json", 8, "config.json as text."),
    GET("path", 9, "The model directory as given to the constructor."),
    GET("backend", 10, "The compute backend in use (what 'auto' chose)."),
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *no_pickle(PyObject *self, PyObject *unused) {
    (void)unused;
    PyErr_Format(PyExc_TypeError, "cannot pickle '%s' objects (a loaded model or a "
                 "running sequence; save_state() gives bytes that can be stored)",
                 Py_TYPE(self)->tp_name);
    return NULL;
}

// In a fork() child: forget the model without freeing it. Its memory is a copy of the
// parent's and the expert store's state (and any lock a vanished thread held) cannot
// be trusted, so the child leaks it rather than run teardown code on it.
static PyObject *handle_disown(PyObject *obj, PyObject *unused) {
    (void)unused;
    ((mf_py_handle *)obj)->model = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef handle_methods[] = {
    {"__reduce__", no_pickle, METH_NOARGS, "Pickling is refused."},
    {"_disown", handle_disown, METH_NOARGS,
     "_disown($self, /)\n--\n\nFork child only: drop the model unfreed."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot handle_slots[] = {
    {Py_tp_new, handle_new},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_traverse, handle_traverse},
    {Py_tp_getset, handle_getset},
    {Py_tp_methods, handle_methods},
    {Py_tp_doc, (void *)handle_doc},
    {0, NULL},
};

static PyType_Spec handle_spec = {
    .name = "moeflux._core.ModelHandle",
    .basicsize = sizeof(mf_py_handle),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = handle_slots,
};

/* ==== Context: construction ==== */

// Seconds between two signal polls of a running eval. Taking the GIL costs up to the
// interpreter's switch interval (5 ms) when another Python thread is busy, so a poll
// at every layer slowed decode 3.6x (0.55 -> 1.98 ms per token); 50 ms keeps Ctrl-C
// prompt for a person.
#define MF_PY_POLL_S 0.05

static double monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Called with the GIL held by context_eval before it releases it.
static void poll_begin(mf_py_context *self, const mf_py_state *st) {
    self->poll_signals = PyThread_get_thread_ident() == st->main_thread;
    self->last_poll_s = monotonic_s();
}

// The ctx abort callback: runs on the evaluating thread (GIL released) before every
// layer. Context.abort() is an atomic flag, checked every time. On the main thread,
// at most every MF_PY_POLL_S, it takes the GIL to run Python's signal handlers; an
// exception they raise (KeyboardInterrupt) stays pending on this thread and is
// re-raised when eval returns MF_ABORTED. Other threads never take the GIL here.
static int ctx_abort_cb(void *user) {
    mf_py_context *self = user;
    if (atomic_load(&self->abort_requested))
        return 1;
    if (!self->poll_signals)
        return 0;
    double now = monotonic_s();
    if (now - self->last_poll_s < MF_PY_POLL_S)
        return 0;
    self->last_poll_s = now;
    int stop = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    self->signal_polls++;
    if (PyErr_Occurred() || PyErr_CheckSignals() < 0)
        stop = 1;
    PyGILState_Release(g);
    return stop;
}

PyDoc_STRVAR(context_doc,
"Context(model, n_threads=0, n_ctx=0, backend='cpu', io_mode=None, io_threads=0,\n"
"        expert_cache_bytes=0, prefetch=-1)\n--\n\n"
"One sequence over a model. `model` is a model directory (str or path) or a\n"
"ModelHandle to share one loaded model between Contexts. n_threads 0 = all online\n"
"cores; n_ctx 0 = min(4096, max_position_embeddings); io_mode None = auto (or\n"
"$MOEFLUX_IO), else 'pread', 'mmap', 'direct'; io_threads 0 = default (8);\n"
"expert_cache_bytes 0 = no RAM expert cache; prefetch -1 = default (off), 0, 1.");

static PyObject *context_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"model", "n_threads", "n_ctx", "backend", "io_mode",
                             "io_threads", "expert_cache_bytes", "prefetch", NULL};
    PyObject *model_arg;
    int n_threads = 0, n_ctx = 0, io_threads = 0, prefetch = -1;
    long long cache_bytes = 0;
    const char *backend = "cpu", *io_mode = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iisziLi:Context", kwlist, &model_arg,
                                     &n_threads, &n_ctx, &backend, &io_mode, &io_threads,
                                     &cache_bytes, &prefetch))
        return NULL;
    mf_py_state *st = mf_py_state_of_type(tp);
    if (!st)
        return NULL;
    PyObject *handle;
    if (PyObject_TypeCheck(model_arg, st->handle_type)) {
        handle = Py_NewRef(model_arg);
    } else {
        handle = PyObject_CallFunction((PyObject *)st->handle_type, "Os", model_arg,
                                       backend);
        if (!handle)
            return NULL;
    }
    mf_py_context *self = (mf_py_context *)tp->tp_alloc(tp, 0);
    if (!self) {
        Py_DECREF(handle);
        return NULL;
    }
    self->handle = handle;
    self->ctx = NULL;
    atomic_init(&self->abort_requested, 0);
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    struct mf_ctx_params p = mf_ctx_default_params();
    p.n_threads = n_threads;
    p.n_ctx = n_ctx;
    p.io_mode = io_mode;   // borrowed for the mf_ctx_new call, as the C API allows
    p.io_threads = io_threads;
    p.expert_cache_bytes = cache_bytes;
    p.prefetch = prefetch;
    p.abort_fn = ctx_abort_cb;
    p.abort_user = self;   // borrowed: the ctx never outlives this object
    const mf_model *model = ((mf_py_handle *)handle)->model;
    char err[1024] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_ctx_new(&self->ctx, model, &p, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc != MF_OK) {
        Py_DECREF(self);
        return mf_py_raise(st, rc, err);
    }
    return (PyObject *)self;
}

static int context_traverse(PyObject *obj, visitproc visit, void *arg) {
    mf_py_context *self = (mf_py_context *)obj;
    Py_VISIT(Py_TYPE(obj));
    Py_VISIT(self->handle);
    return 0;
}

static int context_clear(PyObject *obj) {
    mf_py_context *self = (mf_py_context *)obj;
    // The ctx borrows the model: free it before the handle can go.
    mf_ctx_free(self->ctx);
    self->ctx = NULL;
    Py_CLEAR(self->handle);
    return 0;
}

static void context_dealloc(PyObject *obj) {
    mf_py_context *self = (mf_py_context *)obj;
    PyTypeObject *tp = Py_TYPE(obj);
    PyObject_GC_UnTrack(obj);
    context_clear(obj);
    if (self->lock)
        PyThread_free_lock(self->lock);
    tp->tp_free(obj);
    Py_DECREF(tp);
}

/* ==== Context: eval ==== */

// Tokens from a C-contiguous 1-D int32 buffer or, failing that, any iterable of
// integers (or one int), always copied into *owned (see tokens_get). Returns 0 or -1 with an
// exception set.
struct tokens {
    Py_buffer view;     // only while tokens_get reads a buffer
    int32_t *owned;
    const int32_t *ids;
    Py_ssize_t n;
};

static int is_int32_format(const Py_buffer *v) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    return v->itemsize == 4 && (f[0] == 'i' || f[0] == 'l') && f[1] == '\0';
}

static int tokens_get(struct tokens *t, PyObject *obj, mf_py_state *st) {
    memset(t, 0, sizeof *t);
    if (PyObject_CheckBuffer(obj) &&
        PyObject_GetBuffer(obj, &t->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        if (t->view.ndim == 1 && is_int32_format(&t->view)) {
            // Copied, not borrowed: eval checks the ids and then runs with the GIL
            // released, so another thread writing the caller's array in between could
            // send an unchecked id into the embedding lookup (a read past the table).
            t->n = t->view.shape ? t->view.shape[0] : t->view.len / 4;
            t->owned = malloc((size_t)(t->n > 0 ? t->n : 1) * sizeof *t->owned);
            if (!t->owned) {
                PyBuffer_Release(&t->view);
                PyErr_NoMemory();
                return -1;
            }
            if (t->n > 0)
                memcpy(t->owned, t->view.buf, (size_t)t->n * sizeof *t->owned);
            PyBuffer_Release(&t->view);
            t->ids = t->owned;
            return 0;
        }
        int ndim = t->view.ndim;
        PyBuffer_Release(&t->view);
        if (ndim > 1) {
            PyErr_Format(st->err_arg, "tokens must be one-dimensional, got %d dimensions",
                         ndim);
            return -1;
        }
    }
    PyErr_Clear();
    if (PyIndex_Check(obj) && !PySequence_Check(obj)) {
        t->owned = malloc(sizeof *t->owned);
        if (!t->owned) {
            PyErr_NoMemory();
            return -1;
        }
        long v = PyLong_AsLong(obj);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < INT32_MIN || v > INT32_MAX) {
            PyErr_Format(st->err_arg, "token id %ld out of range", v);
            return -1;
        }
        t->owned[0] = (int32_t)v;
        t->ids = t->owned;
        t->n = 1;
        return 0;
    }
    PyObject *seq = PySequence_Fast(obj, "tokens must be a sequence of ints, an int32 "
                                         "buffer or an int");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    t->owned = malloc((size_t)(n > 0 ? n : 1) * sizeof *t->owned);
    if (!t->owned) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *idx = PyNumber_Index(PySequence_Fast_GET_ITEM(seq, i));
        long v = idx ? PyLong_AsLong(idx) : -1;
        Py_XDECREF(idx);
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            Py_DECREF(seq);
            PyErr_Format(st->err_arg, "token id %ld at index %zd out of range", v, i);
            return -1;
        }
        t->owned[i] = (int32_t)v;
    }
    Py_DECREF(seq);
    t->ids = t->owned;
    t->n = n;
    return 0;
}

static void tokens_release(struct tokens *t) {
    free(t->owned);
    memset(t, 0, sizeof *t);
}

// numpy.empty(shape, dtype="float32") and its pinned writable buffer.
static PyObject *new_f32_array(mf_py_state *st, Py_ssize_t rows, Py_ssize_t cols,
                               Py_buffer *view) {
    PyObject *shape = rows < 0 ? Py_BuildValue("(n)", cols) : Py_BuildValue("(nn)", rows, cols);
    if (!shape)
        return NULL;
    PyObject *arr = PyObject_CallFunction(st->np_empty, "Os", shape, "float32");
    Py_DECREF(shape);
    if (!arr)
        return NULL;
    if (PyObject_GetBuffer(arr, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

PyDoc_STRVAR(context_eval_doc,
"eval($self, /, tokens, all_logits=False)\n--\n\n"
"Evaluate tokens after the current position and return float32 logits: [n_vocab]\n"
"for the last token, or [n_tokens, n_vocab] when all_logits. tokens: an int32\n"
"buffer, a sequence of ints, or one int. On error the sequence is\n"
"unchanged. Ctrl-C stops it at the next layer (KeyboardInterrupt).");

// A signal that arrived during an eval too short for a rate-limited poll (or after
// its last poll) would otherwise raise in Python after the eval committed: run the
// handlers now and, when one raises, take the eval back (exact: n_past0 is the
// previous eval's end, whose checkpoint a hybrid model keeps), so the exception
// leaves the sequence as it was. Returns MF_ABORTED with the exception pending (the
// eval taken back, or, where truncate refuses, standing: Model.eval then records it
// before the exception propagates), else MF_OK.
static int late_signal(mf_py_context *self, int n_past0) {
    if (PyErr_CheckSignals() == 0)
        return MF_OK;
    self->signal_polls++;
    (void)mf_ctx_truncate(self->ctx, n_past0);   // plain C: the pending exception stays
    return MF_ABORTED;
}

static PyObject *context_eval(PyObject *obj, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"tokens", "all_logits", NULL};
    mf_py_context *self = (mf_py_context *)obj;
    PyObject *tok_obj;
    int all_logits = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p:eval", kwlist, &tok_obj, &all_logits))
        return NULL;
    mf_py_state *st = mf_py_state_of_type(Py_TYPE(obj));
    if (!st)
        return NULL;
    struct tokens t;
    if (tokens_get(&t, tok_obj, st) < 0) {
        tokens_release(&t);
        return NULL;
    }
    if (t.n < 1 || t.n > INT32_MAX) {
        tokens_release(&t);
        return mf_py_raise(st, MF_ERR_ARG, "eval: need at least one token");
    }
    if (mf_py_ctx_lock(self) < 0) {
        tokens_release(&t);
        return NULL;
    }
    // Refuse a too-long request before allocating n_tokens x n_vocab logits for it, so
    // it reports the n_ctx limit rather than a MemoryError.
    int n_past = mf_ctx_n_past(self->ctx), n_ctx = mf_ctx_n_ctx(self->ctx);
    if (t.n > (Py_ssize_t)(n_ctx - n_past)) {
        mf_py_ctx_unlock(self);
        char msg[160];   // written before tokens_release zeroes t.n
        snprintf(msg, sizeof msg, "eval: %lld tokens at position %d exceed n_ctx %d",
                 (long long)t.n, n_past, n_ctx);
        tokens_release(&t);
        return mf_py_raise(st, MF_ERR_ARG, msg);
    }
    int n_vocab = mf_model_n_vocab(mf_ctx_model(self->ctx));
    Py_buffer out;
    PyObject *arr = new_f32_array(st, all_logits ? t.n : -1, n_vocab, &out);
    if (!arr) {
        mf_py_ctx_unlock(self);
        tokens_release(&t);
        return NULL;
    }
    atomic_store(&self->abort_requested, 0);
    poll_begin(self, st);
    const int n_past0 = mf_ctx_n_past(self->ctx);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_ctx_eval(self->ctx, t.ids, (int)t.n, out.buf, all_logits);
    Py_END_ALLOW_THREADS
    if (rc == MF_OK && self->poll_signals)
        rc = late_signal(self, n_past0);
    self->poll_signals = 0;   // other calls that poll (none today) start quiet
    PyBuffer_Release(&out);
    tokens_release(&t);
    if (rc != MF_OK) {
        // A KeyboardInterrupt (or other signal-handler exception) raised in the abort
        // callback is pending: let it propagate.
        if (!(rc == MF_ABORTED && PyErr_Occurred()))
            mf_py_raise(st, rc, mf_ctx_errmsg(self->ctx));
        mf_py_ctx_unlock(self);
        Py_DECREF(arr);
        return NULL;
    }
    mf_py_ctx_unlock(self);
    return arr;
}

/* ==== Context: other methods ==== */

static PyObject *context_reset(PyObject *obj, PyObject *unused) {
    (void)unused;
    mf_py_context *self = (mf_py_context *)obj;
    if (mf_py_ctx_lock(self) < 0)
        return NULL;
    mf_ctx_reset(self->ctx);
    mf_py_ctx_unlock(self);
    Py_RETURN_NONE;
}

static PyObject *context_close(PyObject *obj, PyObject *unused) {
    (void)unused;
    mf_py_context *self = (mf_py_context *)obj;
    if (mf_py_ctx_lock(self) < 0) {
        PyErr_Clear();   // already closed: close() is idempotent
        Py_RETURN_NONE;
    }
    mf_ctx *ctx = self->ctx;
    self->ctx = NULL;
    Py_BEGIN_ALLOW_THREADS
    mf_ctx_free(ctx);   // joins the thread pool
    Py_END_ALLOW_THREADS
    mf_py_ctx_unlock(self);
    Py_RETURN_NONE;
}

// In a fork() child: drop the ctx unfreed, without its lock (which a thread that does
// not exist in the child may hold) and without joining worker threads that are gone.
static PyObject *context_disown(PyObject *obj, PyObject *unused) {
    (void)unused;
    ((mf_py_context *)obj)->ctx = NULL;
    Py_RETURN_NONE;
}

static PyObject *context_abort(PyObject *obj, PyObject *unused) {
    (void)unused;
    // No lock: this is the one call meant for another thread while eval runs.
    atomic_store(&((mf_py_context *)obj)->abort_requested, 1);
    Py_RETURN_NONE;
}

static int dict_set(PyObject *d, const char *k, PyObject *v) {
    if (!v)
        return -1;
    int rc = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return rc;
}

static PyObject *context_stats(PyObject *obj, PyObject *unused) {
    (void)unused;
    mf_py_context *self = (mf_py_context *)obj;
    if (mf_py_ctx_lock(self) < 0)
        return NULL;
    struct mf_ctx_stats s;
    mf_ctx_stats_get(self->ctx, &s);
    mf_py_ctx_unlock(self);
    PyObject *d = PyDict_New();
    if (!d || dict_set(d, "n_tokens_evaluated", PyLong_FromLongLong(s.n_tokens_evaluated)) ||
        dict_set(d, "expert_reads", PyLong_FromLongLong(s.expert_reads)) ||
        dict_set(d, "expert_bytes_read", PyLong_FromLongLong(s.expert_bytes_read)) ||
        dict_set(d, "expert_read_s", PyFloat_FromDouble(s.expert_read_s)) ||
        dict_set(d, "compute_s", PyFloat_FromDouble(s.compute_s)) ||
        dict_set(d, "attention_s", PyFloat_FromDouble(s.attention_s)) ||
        dict_set(d, "routing_s", PyFloat_FromDouble(s.routing_s)) ||
        dict_set(d, "io_wait_s", PyFloat_FromDouble(s.io_wait_s)) ||
        dict_set(d, "experts_s", PyFloat_FromDouble(s.experts_s)) ||
        dict_set(d, "shared_s", PyFloat_FromDouble(s.shared_s)) ||
        dict_set(d, "head_s", PyFloat_FromDouble(s.head_s)) ||
        dict_set(d, "expert_bytes_disk", PyLong_FromLongLong(s.expert_bytes_disk)) ||
        dict_set(d, "expert_bytes_mapped", PyLong_FromLongLong(s.expert_bytes_mapped)) ||
        dict_set(d, "expert_bytes_cache", PyLong_FromLongLong(s.expert_bytes_cache)) ||
        dict_set(d, "cache_hits", PyLong_FromLongLong(s.cache_hits)) ||
        dict_set(d, "cache_misses", PyLong_FromLongLong(s.cache_misses)) ||
        dict_set(d, "prefetch_issued", PyLong_FromLongLong(s.prefetch_issued)) ||
        dict_set(d, "prefetch_hits", PyLong_FromLongLong(s.prefetch_hits)) ||
        dict_set(d, "gpu_cache_hits", PyLong_FromLongLong(s.gpu_cache_hits)) ||
        dict_set(d, "gpu_cache_misses", PyLong_FromLongLong(s.gpu_cache_misses)) ||
        dict_set(d, "gpu_bytes_uploaded", PyLong_FromLongLong(s.gpu_bytes_uploaded)) ||
        dict_set(d, "gpu_copy_wait_s", PyFloat_FromDouble(s.gpu_copy_wait_s)) ||
        dict_set(d, "io_mode", PyUnicode_FromString(s.io_mode)) ||
        dict_set(d, "io_fallback", PyUnicode_FromString(s.io_note))) {
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *context_stats_reset(PyObject *obj, PyObject *unused) {
    (void)unused;
    mf_py_context *self = (mf_py_context *)obj;
    if (mf_py_ctx_lock(self) < 0)
        return NULL;
    mf_ctx_stats_reset(self->ctx);
    mf_py_ctx_unlock(self);
    Py_RETURN_NONE;
}

static PyMethodDef context_methods[] = {
    {"eval", (PyCFunction)(void (*)(void))context_eval, METH_VARARGS | METH_KEYWORDS,
     context_eval_doc},
    {"reset", context_reset, METH_NOARGS,
     "reset($self, /)\n--\n\nForget the sequence: position 0, state as fresh."},
    {"close", context_close, METH_NOARGS,
     "close($self, /)\n--\n\nFree the context now (idempotent)."},
    {"abort", context_abort, METH_NOARGS,
     "abort($self, /)\n--\n\nAsk a running eval (in another thread) to stop at the next "
     "layer; it raises AbortedError. Callable from any thread."},
    {"stats", context_stats, METH_NOARGS,
     "stats($self, /)\n--\n\nCounters since creation or stats_reset() as a dict."},
    {"stats_reset", context_stats_reset, METH_NOARGS,
     "stats_reset($self, /)\n--\n\nZero the counters."},
    {"__reduce__", no_pickle, METH_NOARGS, "Pickling is refused."},
    {"_disown", context_disown, METH_NOARGS,
     "_disown($self, /)\n--\n\nFork child only: drop the ctx unfreed."},
    {NULL, NULL, 0, NULL},
};

// Properties. Model-level values come from the (immutable) model; n_past needs the
// lock because an eval in another thread changes it.
static PyObject *context_get(PyObject *obj, void *which) {
    mf_py_context *self = (mf_py_context *)obj;
    int w = (int)(intptr_t)which;
    if (w == 100)
        return Py_NewRef(self->handle ? self->handle : Py_None);
    if (mf_py_ctx_lock(self) < 0)
        return NULL;
    long long v = w == 103 ? self->signal_polls
                  : w == 101 ? mf_ctx_n_past(self->ctx) : mf_ctx_n_ctx(self->ctx);
    mf_py_ctx_unlock(self);
    return PyLong_FromLongLong(v);
}

static PyObject *context_get_model(PyObject *obj, void *which) {
    mf_py_context *self = (mf_py_context *)obj;
    if (!self->ctx) {
        PyErr_SetString(PyExc_ValueError, "Context is closed");
        return NULL;
    }
    return handle_get_int(self->handle, which);
}

#define CGET(name, i, doc) {name, context_get_model, NULL, doc, (void *)(intptr_t)(i)}

static PyGetSetDef context_getset[] = {
    CGET("n_vocab", 0, "Vocabulary size."),
    CGET("n_layer", 1, "Number of decoder layers."),
    CGET("n_embd", 2, "Hidden size."),
    CGET("bos", 3, "BOS token id, -1 if unknown."),
    CGET("eos", 4, "EOS token id, -1 if unknown."),
    CGET("expert_bytes_per_token", 5, "Routed-expert bytes read per token, uncached."),
    CGET("arch", 7, "config.json model_type."),
    CGET("config_json", 8, "config.json as text."),
    {"model", context_get, NULL, "The ModelHandle this context runs on.",
     (void *)(intptr_t)100},
    {"n_past", context_get, NULL, "Tokens in the sequence.", (void *)(intptr_t)101},
    {"n_ctx", context_get, NULL, "Maximum tokens in the sequence.", (void *)(intptr_t)102},
    {"_signal_polls", context_get, NULL,
     "Test-only: times evals took the GIL to poll for Ctrl-C.", (void *)(intptr_t)103},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot context_slots[] = {
    {Py_tp_new, context_new},
    {Py_tp_dealloc, context_dealloc},
    {Py_tp_traverse, context_traverse},
    {Py_tp_clear, context_clear},
    {Py_tp_methods, context_methods},
    {Py_tp_getset, context_getset},
    {Py_tp_doc, (void *)context_doc},
    {0, NULL},
};

static PyType_Spec context_spec = {
    .name = "moeflux._core.Context",
    .basicsize = sizeof(mf_py_context),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = context_slots,
};

/* ==== Module ==== */

// Add the snapshot methods of state_binding.c to Context as method descriptors (their
// PyMethodDef entries are static, so they outlive the type as descriptors require).
static int add_state_methods(PyTypeObject *tp) {
    for (PyMethodDef *d = mf_py_state_methods; d->ml_name; d++) {
        PyObject *descr = PyDescr_NewMethod(tp, d);
        if (!descr)
            return -1;
        int rc = PyObject_SetAttrString((PyObject *)tp, d->ml_name, descr);
        Py_DECREF(descr);
        if (rc < 0)
            return -1;
    }
    PyType_Modified(tp);
    return 0;
}

/* ==== backends(): the compute backends usable in this process ==== */

PyDoc_STRVAR(backends_doc,
"backends()\n--\n\n"
"Names of the backends a model can be opened with here: always 'cpu', then 'cuda'\n"
"when a CUDA driver, a device and NVRTC are found, and 'metal' on macOS with a\n"
"unified-memory Metal device (nothing is compiled). backend='auto' takes the last.");

// Appends name to list when on; 0 on failure (the exception is set).
static int append_if(PyObject *list, int on, const char *name) {
    if (!on)
        return 1;
    PyObject *s = PyUnicode_FromString(name);
    int ok = s && PyList_Append(list, s) == 0;
    Py_XDECREF(s);
    return ok;
}

static PyObject *py_backends(PyObject *mod, PyObject *noargs) {
    (void)mod;
    (void)noargs;
    char err[1024];
    int cuda, metal;
    Py_BEGIN_ALLOW_THREADS
    cuda = mf_backend_cuda_probe(err, sizeof err) == MF_OK;
    metal = mf_backend_metal_usable(err, sizeof err) == MF_OK;
    Py_END_ALLOW_THREADS
    PyObject *names = Py_BuildValue("[s]", "cpu");
    if (names && (!append_if(names, cuda, "cuda") || !append_if(names, metal, "metal")))
        Py_CLEAR(names);
    return names;
}

static PyMethodDef backend_methods[] = {
    {"backends", py_backends, METH_NOARGS, backends_doc},
    {NULL, NULL, 0, NULL},
};

// threading.main_thread().ident (right even when the import runs on another thread).
static int main_thread_ident(unsigned long *out) {
    PyObject *threading = PyImport_ImportModule("threading");
    if (!threading)
        return -1;
    PyObject *main = PyObject_CallMethod(threading, "main_thread", NULL);
    Py_DECREF(threading);
    if (!main)
        return -1;
    PyObject *ident = PyObject_GetAttrString(main, "ident");
    Py_DECREF(main);
    if (!ident)
        return -1;
    *out = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    return PyErr_Occurred() ? -1 : 0;
}

static int core_exec(PyObject *mod) {
    mf_py_state *st = PyModule_GetState(mod);
    st->handle_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &handle_spec, NULL);
    if (!st->handle_type || PyModule_AddType(mod, st->handle_type) < 0)
        return -1;
    st->context_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &context_spec, NULL);
    if (!st->context_type || add_state_methods(st->context_type) < 0 ||
        PyModule_AddType(mod, st->context_type) < 0)
        return -1;
    PyObject *errors = PyImport_ImportModule("moeflux.errors");
    if (!errors)
        return -1;
    struct {
        PyObject **slot;
        const char *name;
    } classes[] = {
        {&st->err_base, "MoefluxError"},       {&st->err_io, "MoefluxIOError"},
        {&st->err_format, "FormatError"},      {&st->err_shape, "ShapeError"},
        {&st->err_arg, "ArgumentError"},       {&st->err_nomem, "MoefluxMemoryError"},
        {&st->err_state, "StateError"},        {&st->err_unsupported, "UnsupportedError"},
        {&st->err_backend, "BackendError"},    {&st->err_aborted, "AbortedError"},
        {&st->err_numeric, "NumericError"},
    };
    for (size_t i = 0; i < sizeof classes / sizeof classes[0]; i++) {
        *classes[i].slot = PyObject_GetAttrString(errors, classes[i].name);
        if (!*classes[i].slot) {
            Py_DECREF(errors);
            return -1;
        }
    }
    Py_DECREF(errors);
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np)
        return -1;
    st->np_empty = PyObject_GetAttrString(np, "empty");
    Py_DECREF(np);
    if (!st->np_empty || main_thread_ident(&st->main_thread) < 0)
        return -1;
    if (PyModule_AddFunctions(mod, backend_methods) < 0 ||
        PyModule_AddStringConstant(mod, "version", mf_version()) < 0)
        return -1;
    return 0;
}

static int core_traverse(PyObject *mod, visitproc visit, void *arg) {
    mf_py_state *st = PyModule_GetState(mod);
    if (!st)
        return 0;
    Py_VISIT(st->handle_type);
    Py_VISIT(st->context_type);
    Py_VISIT(st->err_base);
    Py_VISIT(st->err_io);
    Py_VISIT(st->err_format);
    Py_VISIT(st->err_shape);
    Py_VISIT(st->err_arg);
    Py_VISIT(st->err_nomem);
    Py_VISIT(st->err_state);
    Py_VISIT(st->err_unsupported);
    Py_VISIT(st->err_backend);
    Py_VISIT(st->err_aborted);
    Py_VISIT(st->err_numeric);
    Py_VISIT(st->np_empty);
    return 0;
}

static int core_clear(PyObject *mod) {
    mf_py_state *st = PyModule_GetState(mod);
    if (!st)
        return 0;
    Py_CLEAR(st->handle_type);
    Py_CLEAR(st->context_type);
    Py_CLEAR(st->err_base);
    Py_CLEAR(st->err_io);
    Py_CLEAR(st->err_format);
    Py_CLEAR(st->err_shape);
    Py_CLEAR(st->err_arg);
    Py_CLEAR(st->err_nomem);
    Py_CLEAR(st->err_state);
    Py_CLEAR(st->err_unsupported);
    Py_CLEAR(st->err_backend);
    Py_CLEAR(st->err_aborted);
    Py_CLEAR(st->err_numeric);
    Py_CLEAR(st->np_empty);
    return 0;
}

static void core_free(void *mod) {
    core_clear((PyObject *)mod);
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#ifdef Py_mod_gil
    // Every Context has its own lock and the module state is written only at exec.
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moeflux._core",
    .m_doc = "C core of moeflux: ModelHandle (a loaded model) and Context (a sequence).",
    .m_size = sizeof(mf_py_state),
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) {
    return PyModuleDef_Init(&core_module);
}
