/*
 * weights.h — the read-only mapping of model_weights.bin (core/weights.c). The bind
 * helpers that resolve tensors in it are declared in internal.h, for the arch files.
 */
#ifndef MF_WEIGHTS_H
#define MF_WEIGHTS_H

#include <stddef.h>

#include "core/internal.h"

// Open and mmap `path` into m->weights_fd / weights_map / weights_bytes. MF_ERR_IO
// names the path and the errno text. On failure the three fields stay -1 / NULL / 0.
int mf_weights_map(mf_model *m, const char *path, char *err, size_t errlen);
// Undo mf_weights_map; safe on a model where it failed or never ran (fd -1).
void mf_weights_unmap(mf_model *m);

#endif /* MF_WEIGHTS_H */
