/*
 * expert_store.h — routed experts on disk: packed_experts/layer_NN.bin files and their
 * layout.json (reference-system format, spec §2.2). The io layer knows nothing of
 * models: it serves byte ranges "expert e of layer l" into caller buffers.
 *
 * File of a MoE layer = num_experts blobs back to back, expert e at e * expert_size.
 * Blob = named components; the reference system's (layout version 1) are the nine
 * [gate W|S|B, up W|S|B, down W|S|B]. Version 2 adds per-projection formats (affine
 * at its own bits / group size, or float), per-expert output biases, fused
 * projections (gate_up_proj) and per-layer component tables for recipes whose
 * precision changes with the layer. layout.json names each component's offset, size,
 * dtype and per-expert shape. Files are opened once at open and read with
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

// Most components one expert blob may have (projections x their parts).
#define MF_EXPERT_MAX_COMPONENTS 16

// How the numbers of a projection's weight are stored. A new kind (its "mode" name in
// layout.json, the parts it needs, the kernels that read it) joins this list and
// check_projection in expert_store.c.
enum mf_expert_mode {
    MF_EXPERT_MODE_NONE = 0,    // not a weight component (scales, biases, bias)
    MF_EXPERT_MODE_FLOAT = 1,   // plain F32/F16/BF16 [rows, n_in]
    MF_EXPERT_MODE_AFFINE = 2,  // MLX affine: U32 codes [rows, n_in*bits/32] with
                                // scales and biases [rows, n_in/group_size]
    MF_EXPERT_MODE_MXFP4 = 3,   // MLX mxfp4 (gpt-oss): U32 codes [rows, n_in/8] of FP4
                                // E2M1, U8 E8M0 scales [rows, n_in/32], no biases
};

// One component of an expert blob, "<projection>.<part>": part weight, scales,
// biases (affine) or bias (a per-expert float vector added to the output).
struct mf_expert_component {
    char name[32];          // "gate_proj.weight", "gate_proj.scales", ...
    uint64_t offset;        // bytes inside the blob
    uint64_t size;          // bytes
    enum mf_dtype dtype;
    int ndim;
    int64_t shape[2];       // per expert, e.g. [I, hid*bits/32]
    // weight components only (resolved at open): how the projection is stored
    enum mf_expert_mode mode;
    int bits;               // affine (4 for mxfp4)
    int group_size;         // affine (32 for mxfp4)
};

// The components of the experts of one layer.
struct mf_expert_table {
    int n_components;
    struct mf_expert_component components[MF_EXPERT_MAX_COMPONENTS];
};

struct mf_expert_layout {
    uint64_t expert_size;   // bytes per expert blob (the stride in every layer file)
    int num_experts;
    int num_layers;         // model layers (not only MoE ones)
    int version;            // of layout.json (1: the nine uniform components)
    // The default table ("components"); layers listed in "layer_components" have their
    // own (mf_expert_store_proj reads the right one).
    int n_components;
    struct mf_expert_component components[MF_EXPERT_MAX_COMPONENTS];
    int bits;               // of gate_proj.weight in the default table when affine
    int group_size;         // (informational for mixed layouts; 0 when float)
};

// One projection of a layer's experts: its weight and the parts that go with it
// (NULL when absent), as validated at open.
struct mf_expert_proj {
    const struct mf_expert_component *weight, *scales, *biases, *bias;
    enum mf_expert_mode mode;
    int bits, group_size;   // affine; mxfp4: 4 / 32
    int64_t rows, n_in;
};

typedef struct mf_expert_store mf_expert_store;

// Open `dir`/layout.json and the layer files of every layer where is_moe[l] is set
// (n_layers entries). MF_ERR_IO names a missing or short file (size must be
// num_experts * expert_size); MF_ERR_FORMAT a malformed layout.
int mf_expert_store_open(mf_expert_store **out, const char *dir, int n_layers,
                         const uint8_t *is_moe, char *err, size_t errlen);
void mf_expert_store_close(mf_expert_store *st);
const struct mf_expert_layout *mf_expert_store_layout(const mf_expert_store *st);
// Component of the default table by name, NULL if absent.
const struct mf_expert_component *mf_expert_store_component(const mf_expert_store *st,
                                                            const char *name);
// Projection `proj` ("gate_proj", "gate_up_proj", ...) of layer il's experts: 1 and
// *out filled when its weight component exists, else 0.
int mf_expert_store_proj(const mf_expert_store *st, int il, const char *proj,
                         struct mf_expert_proj *out);

// Read expert `ie` of layer `il` into dst (a buffer of expert_size bytes; only the
// bytes the layer's components reach are read when its table is smaller than the
// largest, the rest of dst is left as it was). Thread-safe.
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
// Page-locking of the mappings for a device that copies from them (a GPU whose DMA then
// reads the page cache directly, with no copy into staging memory). A pin callback
// page-locks [p, p + n) (MF_OK, or an error code with err set); unpin undoes it.
struct mf_expert_pin {
    int (*pin)(void *user, const void *p, size_t n, char *err, size_t errlen);
    void (*unpin)(void *user, const void *p);
    void *user;
};
// After mf_expert_store_map: page-lock every layer's mapping through `how`, once per
// store however many readers ask (counted); a second caller must pass the same
// callbacks. On failure nothing stays locked and err names the file. Thread-safe.
int mf_expert_store_pin(mf_expert_store *st, const struct mf_expert_pin *how, char *err,
                        size_t errlen);
// Drop one count of mf_expert_store_pin; the last unlocks every mapping. The callbacks
// (and what their user pointer names) must live until then. Thread-safe.
void mf_expert_store_unpin(mf_expert_store *st);
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
// After mf_expert_store_map, for ids that passed mf_expert_store_check and
// mf_expert_store_check_size: 1 and *data = expert ie of layer il inside the mapping
// when every page of it is in the page cache now (mincore; nothing is read), else 0
// (*data untouched). Lets a warm expert skip the pre-fault's round trip through an I/O
// thread. Thread-safe.
int mf_expert_store_resident(const mf_expert_store *st, int il, int ie, const void **data);

#endif /* MF_EXPERT_STORE_H */
