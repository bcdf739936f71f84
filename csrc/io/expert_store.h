/*
 * expert_store.h — routed experts on disk: packed_experts/layer_NN.bin files and their
 * layout.json (reference-system format, spec §2.2). The io layer knows nothing of
 * models: it serves byte ranges "expert e of layer l" into caller buffers.
 *
 * File of a MoE layer = num_experts blobs back to back, expert e at e * expert_size.
 * Blob = [gate W|S|B, up W|S|B, down W|S|B]; layout.json names each component's
 * offset, size, dtype and per-expert shape. Files are opened once at open and read with
 * pread (thread-safe; the store is shared by every ctx of a model).
 *
 * The asynchronous reader (expert_reader.h) reads through the calls at the end of this
 * header: the mappings of mmap mode and the uncached fds of direct mode belong to the
 * store (one per file per model, made on first use under the store's lock, released
 * at close), so many contexts share them.
 */
#ifndef MF_EXPERT_STORE_H
#define MF_EXPERT_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "core/common.h"

// One of the 9 components of an expert blob ("gate_proj.weight", ...).
struct mf_expert_component {
    char name[32];          // "gate_proj.weight", "gate_proj.scales", ...
    uint64_t offset;        // bytes inside the blob
    uint64_t size;          // bytes
    enum mf_dtype dtype;
    int ndim;
    int64_t shape[2];       // per expert, e.g. [I, hid*bits/32]
};

struct mf_expert_layout {
    uint64_t expert_size;   // bytes per expert blob
    int num_experts;
    int num_layers;         // model layers (not only MoE ones)
    int n_components;
    struct mf_expert_component components[9];
    int bits;               // of the W components (4, or 2 for packed_experts_2bit)
    int group_size;
};

typedef struct mf_expert_store mf_expert_store;

// Open `dir`/layout.json and the layer files of every layer where is_moe[l] is set
// (n_layers entries). MF_ERR_IO names a missing or short file (size must be
// num_experts * expert_size); MF_ERR_FORMAT a malformed layout.
int mf_expert_store_open(mf_expert_store **out, const char *dir, int n_layers,
                         const uint8_t *is_moe, char *err, size_t errlen);
void mf_expert_store_close(mf_expert_store *st);
const struct mf_expert_layout *mf_expert_store_layout(const mf_expert_store *st);
// Component by name, NULL if absent.
const struct mf_expert_component *mf_expert_store_component(const mf_expert_store *st,
                                                            const char *name);

// Read expert `ie` of layer `il` (expert_size bytes) into dst. Thread-safe.
// MF_ERR_ARG for a layer without a file or ie out of range; MF_ERR_IO on a failed or
// short read (message names the file and offset).
int mf_expert_store_read(const mf_expert_store *st, int il, int ie, void *dst,
                         size_t dst_bytes, char *err, size_t errlen);

// MF_OK when layer il has an expert file and ie is in [0, num_experts), else MF_ERR_ARG
// with a message naming both. Thread-safe.
int mf_expert_store_check(const mf_expert_store *st, int il, int ie, char *err,
                          size_t errlen);

// Expert bytes of the model: n_moe_layers x num_experts x expert_size.
uint64_t mf_expert_store_total_bytes(const mf_expert_store *st);

// posix_fadvise(WILLNEED) on expert ie of layer il: the kernel starts reading it into
// the page cache and returns at once. Bad ids and systems without fadvise: no-op.
void mf_expert_store_hint(const mf_expert_store *st, int il, int ie);

// Open the uncached fds (O_DIRECT on Linux, F_NOCACHE on macOS) of every layer file,
// once per store; later calls return the first call's answer. MF_ERR_UNSUPPORTED with
// the reason in why when expert_size is not a multiple of 4096 or the file system
// refuses (at open or at a probe read). Thread-safe.
int mf_expert_store_open_direct(mf_expert_store *st, char *why, size_t whylen);
// mf_expert_store_read through the uncached fd into dst, which must be 4096-byte
// aligned and hold expert_size bytes. Thread-safe.
int mf_expert_store_read_direct(const mf_expert_store *st, int il, int ie, void *dst,
                                char *err, size_t errlen);

// Map every layer file read-only (MAP_SHARED), once per store; later calls return the
// first call's answer (MF_ERR_IO naming the file). Thread-safe.
int mf_expert_store_map(mf_expert_store *st, char *err, size_t errlen);
// MF_OK when layer il's file (fstat now) still holds expert ie whole, else MF_ERR_IO
// naming the file, layer, expert, offset and the file's size. ids must be valid
// (mf_expert_store_check). Thread-safe.
int mf_expert_store_check_size(const mf_expert_store *st, int il, int ie, char *err,
                               size_t errlen);
// After mf_expert_store_map: *data = expert ie of layer il inside the mapping (valid
// until the store is closed), its pages faulted in (madvise WILLNEED, then one byte
// read per page). The file's size is checked first, so a file truncated after open is
// MF_ERR_IO, not SIGBUS; a truncation after that check can still raise SIGBUS when the
// pages are touched (here or by the consumer). Thread-safe.
int mf_expert_store_prefault(const mf_expert_store *st, int il, int ie,
                             const void **data, char *err, size_t errlen);

#endif /* MF_EXPERT_STORE_H */
