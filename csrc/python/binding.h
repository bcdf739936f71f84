/*
 * binding.h — what the files of the CPython binding share: the module state, the
 * Context object, its lock, and the one function that maps status codes to exceptions.
 *
 * module.c owns the module and the ModelHandle / Context types; state_binding.c adds
 * the snapshot methods to Context (its table is appended to Context at type creation).
 * diag.c is a separate, test-only module (moeflux._diag) that uses only Python.h from
 * here. Nothing here is global: the state lives in the module object, reached from a
 * Context through its (heap) type.
 */
#ifndef MF_PY_BINDING_H
#define MF_PY_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>

#include "moeflux.h"

// Per-module state (one per interpreter that imports moeflux._core).
typedef struct {
    PyTypeObject *handle_type;     // _core.ModelHandle
    PyTypeObject *context_type;    // _core.Context
    // Exception classes from moeflux.errors, imported at module exec.
    PyObject *err_base;            // MoefluxError
    PyObject *err_io;              // MoefluxIOError (OSError)
    PyObject *err_format;          // FormatError (ValueError)
    PyObject *err_shape;           // ShapeError (FormatError)
    PyObject *err_arg;             // ArgumentError (ValueError)
    PyObject *err_nomem;           // MoefluxMemoryError (MemoryError)
    PyObject *err_state;           // StateError
    PyObject *err_unsupported;     // UnsupportedError
    PyObject *err_backend;         // BackendError
    PyObject *err_aborted;         // AbortedError (mf_ctx_abort from another thread)
    PyObject *err_numeric;         // NumericError (NaN or infinity, damaged weights)
    PyObject *np_empty;            // numpy.empty, for result arrays
    unsigned long main_thread;     // threading.main_thread().ident: only it runs
                                   // Python's signal handlers
} mf_py_state;

// _core.ModelHandle: owns one loaded mf_model, shared by any number of Contexts (each
// holds a strong reference, so the model outlives them).
typedef struct {
    PyObject_HEAD
    mf_model *model;               // owned; NULL only while constructing
    PyObject *path;                // the model directory as given (str)
} mf_py_handle;

// _core.Context: one mf_ctx. `lock` serialises every call that touches ctx; `ctx` is
// NULL after close().
typedef struct {
    PyObject_HEAD
    PyObject *handle;              // strong reference to the mf_py_handle
    mf_ctx *ctx;                   // owned; NULL when closed
    PyThread_type_lock lock;
    atomic_int abort_requested;    // set by Context.abort() from any thread
    // Signal polling of the eval in progress (written by context_eval before the GIL
    // is released, then only by the evaluating thread in the abort callback):
    int poll_signals;              // the eval runs on the main thread
    double last_poll_s;            // monotonic time of the last poll (or eval start)
    long long signal_polls;        // GIL acquisitions for a poll, all evals (tests)
} mf_py_context;

// Module state of the module that defined `tp` (a type of this module).
mf_py_state *mf_py_state_of_type(PyTypeObject *tp);

// Set the Python exception for status (< 0 or MF_ABORTED) with message msg (may be
// NULL or "": then mf_strerror). Always returns NULL, for `return mf_py_raise(...)`.
PyObject *mf_py_raise(mf_py_state *st, int status, const char *msg);

// Take the Context's lock: a non-blocking try first, then a wait with the GIL released
// so another thread's eval can finish. Then checks the Context is open: on a closed
// Context it releases the lock, raises ValueError("Context is closed") and returns -1.
// 0 on success (the caller must call mf_py_ctx_unlock).
int mf_py_ctx_lock(mf_py_context *self);
void mf_py_ctx_unlock(mf_py_context *self);

// Methods appended to Context (state_binding.c), terminated by an entry with ml_name
// NULL.
extern PyMethodDef mf_py_state_methods[];

#endif /* MF_PY_BINDING_H */
