/*
 * manifest.h — the tensor manifest of model_weights.json and the read-only mapping of
 * model_weights.bin it describes (reference-system format, §2.1 of the spec).
 *
 * model_weights.json: {"model": src, "num_tensors": n, "tensors": {name: {offset,
 * size, shape, dtype, bits?, group_size?}}, "config": {...}}. Offsets are bytes into
 * model_weights.bin; every tensor is checked at load to lie inside the file and to have
 * size == prod(shape) * dtype size, so later code can trust the ranges.
 */
#ifndef MF_MANIFEST_H
#define MF_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

#include "core/common.h"

#define MF_MAX_DIMS 4

struct mf_tensor_info {
    char *name;               // owned by the manifest
    uint64_t offset;          // bytes into model_weights.bin (64-bit: files > 4 GiB)
    uint64_t size;            // bytes
    int ndim;
    int64_t shape[MF_MAX_DIMS];
    enum mf_dtype dtype;
    int bits;                 // U32 tensors: bits per code (from the manifest, default
                              // 0 = unknown, resolved by the weight binder)
    int group_size;           // 0 = unknown
};

struct mf_manifest {
    int n_tensors;
    struct mf_tensor_info *tensors;   // owned, sorted by name
    uint64_t hash;                    // FNV-1a over names, offsets, shapes, dtypes
                                      // (identifies the model in snapshots)
};

// Parse model_weights.json at json_path and check every entry against a bin of
// bin_size bytes. MF_ERR_FORMAT / MF_ERR_SHAPE name the tensor and the bad field.
int mf_manifest_load(struct mf_manifest *m, const char *json_path, uint64_t bin_size,
                     char *err, size_t errlen);
int mf_manifest_parse(struct mf_manifest *m, const char *text, size_t len,
                      const char *name, uint64_t bin_size, char *err, size_t errlen);
void mf_manifest_free(struct mf_manifest *m);

// Binary search by exact name; NULL if absent.
const struct mf_tensor_info *mf_manifest_find(const struct mf_manifest *m,
                                              const char *name);

#endif /* MF_MANIFEST_H */
