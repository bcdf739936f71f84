/*
 * state_binding.c — Context methods for sequence state (save_state, load_state,
 * truncate), appended to _core.Context at type creation. Filled by the snapshot work;
 * empty until then.
 */
#include "python/binding.h"

PyMethodDef mf_py_state_methods[] = {
    {NULL, NULL, 0, NULL},
};
