/*
 * expert_reader.h — asynchronous expert reads for one context: its own I/O worker
 * threads, a pool of expert-sized slots, submit / wait per expert, prefetch hints, an
 * optional RAM cache, and four I/O modes. One reader per mf_ctx, over the model's
 * shared mf_expert_store (many readers may share one store, on any threads).
 *
 * Modes (enum mf_io_mode):
 *   pread   buffered pread into a slot (the page cache serves repeats).
 *   mmap    no copy: the bytes are a pointer into the store's mapping of the layer
 *           file; a worker pre-faults the expert's pages (madvise WILLNEED, then one
 *           read per page) so compute does not stall on page faults, unless all of
 *           them are in the page cache already (mincore at submit): then the ticket
 *           is complete at once and no worker is woken.
 *   direct  uncached reads (O_DIRECT on Linux, F_NOCACHE on macOS) into a slot. Needs
 *           expert_size % 4096 == 0, 4096-aligned slots and a file system that accepts
 *           it; otherwise the reader uses pread and says why in stats.mode_note.
 *   auto    mf_io_auto_mode: pread when the model's expert bytes exceed 0.75 x
 *           physical RAM (the page cache cannot hold them, so mapping them would only
 *           thrash), else mmap (the reference system's rule).
 * The environment variable MOEFLUX_IO (pread|mmap|direct|auto), when set, overrides
 * params.mode; any other value is MF_ERR_ARG at mf_expert_reader_new.
 * Every mode hands out the same bytes.
 *
 * Slots and tickets. The reader owns n_slots + cache_bytes / slot_bytes slots
 * (slot_bytes = expert_size rounded up to 4096; 2 MiB-aligned when at least 2 MiB,
 * which made page-cached reads 3.6x faster on the reference system and 1.1-1.2x in
 * bench/bench_reader.c here (pread, 8 workers, 1.7 MB experts)).
 * Their keys (layer, expert) are kept by the LFRU policy of expert_cache.h. submit()
 * takes a ticket that pins the expert's slot (loading it if needed; asking for an
 * expert already in a slot costs no I/O: a "hit"); wait() gives the bytes; release()
 * unpins. A pinned slot is never recycled. With cache_bytes > 0 a released slot keeps
 * its expert until the LFRU policy recycles it (the RAM cache); with cache_bytes = 0
 * it is emptied at release, so hits come only from prefetches and from an expert held
 * by two tickets, and reads reuse the fewest slots (they stay in the CPU cache). In
 * mmap mode slots hold no memory, only pointers.
 *
 * How moe.c is meant to use it, per MoE layer, once routing is known:
 *
 *   // submit the layer's experts at once (reads start now)
 *   for (j = 0; j < n_used; j++) {
 *       while ((rc = mf_expert_reader_submit(r, il, used[j], &tk, err, n)) ==
 *              MF_EXPERT_READER_FULL)          // prefill: more experts than slots
 *           compute_one_ready();
 *       ...rc < 0 (NULL argument only): mf_expert_reader_release_all(r), fail
 *   }
 *   // the next MoE layer's likely experts (the previous token's): read after this
 *   // layer's submits, into free slots, while this layer computes
 *   mf_expert_reader_prefetch(r, il_next, prev_token_experts_of_il_next, k);
 *   shared_expert();                           // overlaps the reads in flight
 *   while (outstanding) compute_one_ready();   // each routed expert as it lands
 *
 *   compute_one_ready():
 *       rc = mf_expert_reader_wait_any(r, &tk, &blob, err, n);
 *       ie = mf_expert_reader_ticket_expert(r, tk, NULL, NULL);
 *       if (rc == MF_OK) expert_apply(..., blob, ..., ie);   // blob valid until release
 *       mf_expert_reader_release(r, tk);       // after EVERY wait, failed or not
 *       ...rc != MF_OK: mf_expert_reader_release_all(r), fail with err
 *
 * Errors (a short read, EIO, a file truncated after open, a bad layer or expert id)
 * are never returned by submit: they come back from wait / wait_any as the status and
 * a message naming the file, layer, expert and offset. submit returns only MF_OK,
 * MF_EXPERT_READER_FULL (every slot or ticket is held by a ticket not yet released:
 * wait for and release one, then submit again; nothing changed) or MF_ERR_ARG (a
 * NULL argument).
 *
 * Threading: the calls of one reader are made by one thread at a time (the ctx's);
 * they are also mutually locked, so a misuse is not a data race. The workers never
 * call back into the consumer. mf_expert_reader_free with reads in flight waits for
 * the reads already started (each is one pread or one pre-fault), drops the queued
 * ones and returns.
 */
#ifndef MF_EXPERT_READER_H
#define MF_EXPERT_READER_H

#include <stddef.h>
#include <stdint.h>

#include "io/expert_store.h"

enum mf_io_mode {
    MF_IO_AUTO = 0,     // pread when expert bytes > 0.75 x RAM or params.to_device,
                        // else mmap
    MF_IO_PREAD = 1,    // buffered pread into slots
    MF_IO_MMAP = 2,     // pointers into the store's mappings, pages pre-faulted
    MF_IO_DIRECT = 3,   // O_DIRECT / F_NOCACHE reads into slots (or pread, see note)
};

// submit: every slot or ticket is held by an unreleased ticket (positive: "act").
#define MF_EXPERT_READER_FULL 1

typedef struct mf_expert_reader mf_expert_reader;

struct mf_expert_reader_params {
    int n_workers;          // I/O threads; default 8 (see MF_EXPERT_READER_WORKERS)
    int n_slots;            // working slots; default 16; use >= 2 x experts per token
                            // so a layer's reads and the next layer's prefetch coexist
    uint64_t cache_bytes;   // extra slots kept as an LFRU RAM cache; default 0 (off)
    uint64_t ram_bytes;     // physical RAM for the auto rule; default 0 = ask the system
    enum mf_io_mode mode;   // default MF_IO_AUTO; MOEFLUX_IO overrides it when set
    int to_device;          // the bytes go on to a device by copies (a GPU that cannot
                            // read host memory): auto picks mmap with the mappings
                            // page-locked through `pin` when `pin` is given and the
                            // experts take at most half the RAM (the device's copies then
                            // read the page cache directly), else pread into the slots
                            // (pinned there), whose copies are asynchronous, over plain
                            // mmap, whose pageable pages are copied synchronously and
                            // measured 2-2.6x slower on the H200 (bench/RESULTS.md
                            // "CUDA"); default 0
    struct mf_expert_pin pin;   // page-locking for to_device (pin.pin NULL: none); an
                                // explicit mmap is page-locked too where it can be
    // Slot memory, e.g. pinned host memory of a GPU backend: alloc(alloc_user, bytes)
    // returns a buffer of `bytes` (a multiple of 4096; direct mode needs it 4096-byte
    // aligned or falls back to pread), freed by free_fn(alloc_user, ptr). NULL (the
    // default) = posix_memalign / free. Both or neither.
    void *(*alloc_fn)(void *user, size_t bytes);
    void (*free_fn)(void *user, void *ptr);
    void *alloc_user;
};

// Default worker count. Expert reads are 1-10 MiB each and a decode layer wants its K
// (8-10) experts at once: 8 workers put a whole layer's reads in flight together, the
// depth at which NVMe and virtual disks reach their rate (a thread pool saturates a
// device at 1.7-7 MB reads and depth >= 8; the reference system's Rust port uses an
// 8-thread pool). More threads only add contention on 2-4 channel SSDs.
#define MF_EXPERT_READER_WORKERS 8

struct mf_expert_reader_params mf_expert_reader_default_params(void);

// What the reader did since it was made (cumulative; subtract two snapshots for a
// span). Filled by mf_expert_reader_stats.
struct mf_expert_reader_stats {
    int64_t reads;             // expert reads from disk (pread or direct) completed
    int64_t bytes_disk;        // bytes those reads moved
    int64_t bytes_cache;       // bytes handed out from a slot without I/O (hits)
    int64_t bytes_mmap;        // bytes handed out as pointers into a mapping
    int64_t resident;          // mmap misses found wholly in the page cache, handed out
                               // without an I/O thread's pre-fault
    int64_t hits, misses;      // submits that found / did not find their expert in a slot
    int64_t prefetch_issued;   // experts a prefetch started loading into a slot
    int64_t prefetch_hits;     // submits served by a slot a prefetch loaded
    int64_t prefetch_hints;    // experts a prefetch could only fadvise (no free slot)
    int64_t errors;            // waits that returned an error (bad ids, failed reads)
    double wait_s;             // time the consumer blocked in wait / wait_any / submit
    enum mf_io_mode mode;      // the mode in effect (never AUTO)
    int pinned;                // mmap mode with the mappings page-locked (params.pin)
    int n_slots, n_workers;    // in effect
    char mode_note[320];       // how the mode was chosen; any fallback and its reason
};

// Make a reader over st (borrowed: it must outlive the reader). MF_ERR_ARG for bad
// params or an unknown MOEFLUX_IO value (named in err), MF_ERR_NOMEM, MF_ERR_IO (mmap
// mode could not map a file), MF_ERR_BACKEND (a thread could not start). *out = NULL
// and nothing leaked on failure.
int mf_expert_reader_new(mf_expert_reader **out, mf_expert_store *st,
                         const struct mf_expert_reader_params *p, char *err,
                         size_t errlen);
// Stop the workers (reads in flight finish first, queued ones are dropped), free the
// slots. Outstanding tickets and the pointers they gave become invalid. NULL: no-op.
void mf_expert_reader_free(mf_expert_reader *r);

// Start getting expert ie of layer il (non-blocking, except for the moment a
// prefetch read takes to free a slot when every other slot is pinned). *ticket is an
// int in [0, mf_expert_reader_n_tickets). See the header comment for the results.
int mf_expert_reader_submit(mf_expert_reader *r, int il, int ie, int *ticket, char *err,
                            size_t errlen);
// Block until the ticket's expert is loaded: MF_OK and *data = its expert_size bytes
// (owned by the reader, valid until the ticket is released), or the load's error
// (*data = NULL). MF_ERR_ARG for a ticket that is not submitted-and-unwaited. Release
// the ticket afterwards in every case.
int mf_expert_reader_wait(mf_expert_reader *r, int ticket, const void **data, char *err,
                          size_t errlen);
// Like wait, for whichever submitted, unwaited ticket completes first (the earliest
// submitted among those already complete); *ticket says which. MF_ERR_STATE when no
// ticket is outstanding.
int mf_expert_reader_wait_any(mf_expert_reader *r, int *ticket, const void **data,
                              char *err, size_t errlen);
// Unpin the ticket's slot and free the ticket (waited or not). Bad ids: no-op.
void mf_expert_reader_release(mf_expert_reader *r, int ticket);
// Release every ticket (an error path's cleanup), then wait for the loads already
// queued or running, so no read begun before the error outlives the call (the next
// submit cannot inherit its failure).
void mf_expert_reader_release_all(mf_expert_reader *r);
// The layer and expert a live ticket was submitted for (il/ie may be NULL); returns ie,
// or -1 for a free or bad ticket.
int mf_expert_reader_ticket_expert(mf_expert_reader *r, int ticket, int *il,
                                   int *ie);
// Tickets: at most this many are live at once (ids are below it).
int mf_expert_reader_n_tickets(const mf_expert_reader *r);

// Hint: these experts of layer il will be wanted soon (e.g. the previous token's
// experts of layer il + 1 while layer il computes). Experts not already in a slot are
// loaded by the workers into free slots, after any submitted read (a later submit
// finds them: a prefetch hit); when no slot is free, pread mode asks the kernel to
// read them into the page cache (posix_fadvise WILLNEED) instead. Bad ids are
// ignored. Never blocks on I/O, never fails.
void mf_expert_reader_prefetch(mf_expert_reader *r, int il, const int32_t *ids, int n);

void mf_expert_reader_stats(mf_expert_reader *r, struct mf_expert_reader_stats *out);

// The auto rule as a pure function: MF_IO_PREAD when expert_bytes > 0.75 x ram_bytes,
// else MF_IO_MMAP. ram_bytes == 0 (unknown) gives MF_IO_PREAD.
enum mf_io_mode mf_io_auto_mode(uint64_t expert_bytes, uint64_t ram_bytes);
// "pread" / "mmap" / "direct" / "auto" -> *out; -1 for anything else.
int mf_io_mode_parse(const char *s, enum mf_io_mode *out);
const char *mf_io_mode_name(enum mf_io_mode m);   // "?" when out of range
// Physical RAM in bytes (sysconf), 0 when unknown.
uint64_t mf_io_physical_ram(void);

#endif /* MF_EXPERT_READER_H */
