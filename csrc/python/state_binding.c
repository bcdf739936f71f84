/*
 * state_binding.c — Context methods for sequence state: state_size, save_state,
 * load_state, truncate, set_checkpoints. Appended to _core.Context's methods at type
 * creation.
 *
 * Each method holds the Context's lock for the whole call (so an eval in another
 * thread cannot change the state mid-snapshot) and releases the GIL around the core
 * call, which may move gigabytes for a large model. Snapshots go straight into a new
 * bytes object: it is allocated with the GIL held and filled without it, which is safe
 * because no other thread can see the object before it is returned.
 */
#include "python/binding.h"

static mf_py_state *state_of(PyObject *obj) {
    return mf_py_state_of_type(Py_TYPE(obj));
}

// The end of a method that holds the lock around one core call returning a status:
// raises the context's error (read while still locked: another thread could replace
// the message once unlocked) unless rc is MF_OK, unlocks, and returns None or NULL.
static PyObject *unlock_with_status(mf_py_context *self, mf_py_state *st, int rc) {
    if (rc != MF_OK)
        mf_py_raise(st, rc, mf_ctx_errmsg(self->ctx));
    mf_py_ctx_unlock(self);
    return rc == MF_OK ? Py_NewRef(Py_None) : NULL;
}

// A method's int argument in [lo, hi] into *out; -1 with an ArgumentError set (a
// float such as 3.7 is refused, not rounded: range_msg says what is expected).
static int int_arg(mf_py_state *st, PyObject *arg, long lo, long hi, const char *range_msg,
                   int *out) {
    if (!PyIndex_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(st->err_arg, "%s; got a %.100s", range_msg, Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow = 0;
    long n = PyLong_AsLongAndOverflow(arg, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (overflow)
        n = overflow < 0 ? LONG_MIN : LONG_MAX;
    if (n < lo || n > hi) {
        mf_py_raise(st, MF_ERR_ARG, range_msg);
        return -1;
    }
    *out = (int)n;
    return 0;
}

PyDoc_STRVAR(state_size_doc,
"state_size($self, /)\n--\n\n"
"Bytes a snapshot of the current sequence takes (grows with n_past).");

static PyObject *context_state_size(PyObject *obj, PyObject *unused) {
    (void)unused;
    mf_py_context *self = (mf_py_context *)obj;
    if (mf_py_ctx_lock(self) < 0)
        return NULL;
    size_t n = mf_ctx_state_size(self->ctx);
    mf_py_ctx_unlock(self);
    return PyLong_FromSize_t(n);
}

PyDoc_STRVAR(save_state_doc,
"save_state($self, /)\n--\n\n"
"Snapshot the sequence (KV caches, linear-attention state, position) as bytes in\n"
"the versioned MFLX format. load_state restores it into any Context of the same\n"
"model whose n_ctx holds the sequence.");

static PyObject *context_save_state(PyObject *obj, PyObject *unused) {
    (void)unused;
    mf_py_context *self = (mf_py_context *)obj;
    mf_py_state *st = state_of(obj);
    if (!st || mf_py_ctx_lock(self) < 0)
        return NULL;
    size_t n = mf_ctx_state_size(self->ctx);
    if (n == 0 || n > (size_t)PY_SSIZE_T_MAX) {
        mf_py_ctx_unlock(self);
        return mf_py_raise(st, MF_ERR_NOMEM, "save_state: cannot size the snapshot");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!out) {
        mf_py_ctx_unlock(self);
        return NULL;
    }
    char *dst = PyBytes_AS_STRING(out);
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_ctx_state_save(self->ctx, dst, n);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        mf_py_raise(st, (int)rc, mf_ctx_errmsg(self->ctx));
        mf_py_ctx_unlock(self);
        Py_DECREF(out);
        return NULL;
    }
    mf_py_ctx_unlock(self);
    if ((size_t)rc != n && _PyBytes_Resize(&out, (Py_ssize_t)rc) < 0)
        return NULL;
    return out;
}

PyDoc_STRVAR(load_state_doc,
"load_state($self, buffer, /)\n--\n\n"
"Restore a snapshot from any contiguous bytes-like object. The whole snapshot is\n"
"validated first; on error (StateError: another model or too long for n_ctx;\n"
"FormatError: truncated or corrupted; UnsupportedError: newer format) the sequence\n"
"is unchanged.");

static PyObject *context_load_state(PyObject *obj, PyObject *arg) {
    mf_py_context *self = (mf_py_context *)obj;
    mf_py_state *st = state_of(obj);
    if (!st)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (mf_py_ctx_lock(self) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_ctx_state_load(self->ctx, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return unlock_with_status(self, st, rc);
}

PyDoc_STRVAR(truncate_doc,
"truncate($self, n, /)\n--\n\n"
"Shorten the sequence to its first n tokens. Exact for attention-only models; with\n"
"linear attention only when a checkpoint at n is held (the last evaluation end\n"
"points are kept), else StateError and the sequence is unchanged. 0 always works.");

static PyObject *context_truncate(PyObject *obj, PyObject *arg) {
    mf_py_context *self = (mf_py_context *)obj;
    mf_py_state *st = state_of(obj);
    int n;
    if (!st ||
        int_arg(st, arg, 0, INT32_MAX, "truncate: n must be in [0, n_past]", &n) < 0 ||
        mf_py_ctx_lock(self) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_ctx_truncate(self->ctx, n);
    Py_END_ALLOW_THREADS
    return unlock_with_status(self, st, rc);
}

PyDoc_STRVAR(set_checkpoints_doc,
"set_checkpoints($self, n, /)\n--\n\n"
"How many automatic checkpoints of linear-attention state are kept for exact\n"
"truncate: 0 = default (8 most recent evaluation end points, at most 1 GiB), -1 =\n"
"none, else n (<= 64). Drops the checkpoints held so far.");

static PyObject *context_set_checkpoints(PyObject *obj, PyObject *arg) {
    mf_py_context *self = (mf_py_context *)obj;
    mf_py_state *st = state_of(obj);
    int n;
    if (!st ||
        int_arg(st, arg, -1, 64, "set_checkpoints: n must be -1, 0 or 1..64", &n) < 0 ||
        mf_py_ctx_lock(self) < 0)
        return NULL;
    return unlock_with_status(self, st, mf_ctx_checkpoints_set(self->ctx, n));
}

PyMethodDef mf_py_state_methods[] = {
    {"set_checkpoints", context_set_checkpoints, METH_O, set_checkpoints_doc},
    {"state_size", context_state_size, METH_NOARGS, state_size_doc},
    {"save_state", context_save_state, METH_NOARGS, save_state_doc},
    {"load_state", context_load_state, METH_O, load_state_doc},
    {"truncate", context_truncate, METH_O, truncate_doc},
    {NULL, NULL, 0, NULL},
};
