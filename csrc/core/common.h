/*
 * common.h — small helpers every part of the core uses: dtypes, bf16/f16 widening,
 * error-message formatting, whole-file reads, and (in fault-injection test builds only)
 * the hooks every allocation and expert read goes through. No state lives here, except
 * the fault hooks' counters in those test builds.
 */
#ifndef MF_COMMON_H
#define MF_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "moeflux.h"

// Element types found in safetensors checkpoints and in model_weights.json.
enum mf_dtype {
    MF_DTYPE_F32 = 0,
    MF_DTYPE_F16 = 1,
    MF_DTYPE_BF16 = 2,
    MF_DTYPE_U32 = 3,   // packed affine-quantized codes
    MF_DTYPE_U8 = 4,
    MF_DTYPE_I32 = 5,
};

// "F32", "BF16", ... (static). Returns "?" for an unknown value.
const char *mf_dtype_name(enum mf_dtype dt);
// Parse a safetensors dtype string; returns -1 if unknown.
int mf_dtype_parse(const char *s, enum mf_dtype *out);
// Bytes per element (U32 = 4).
size_t mf_dtype_size(enum mf_dtype dt);

// bf16 -> f32 is exact: the bf16 bits are the top half of the f32 bits.
static inline float mf_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float mf_f16_to_f32(uint16_t h);

// Read element i of a float tensor of dtype dt (F32/F16/BF16) as f32.
static inline float mf_load_f32(const void *p, enum mf_dtype dt, size_t i) {
    switch (dt) {
    case MF_DTYPE_F32: return ((const float *)p)[i];
    case MF_DTYPE_BF16: return mf_bf16_to_f32(((const uint16_t *)p)[i]);
    case MF_DTYPE_F16: return mf_f16_to_f32(((const uint16_t *)p)[i]);
    default: return 0.0f;
    }
}

// snprintf into err (if err && errlen) and return `status`. Lets error paths read
// `return mf_err(err, errlen, MF_ERR_IO, "%s: %s", path, strerror(errno));`.
int mf_err(char *err, size_t errlen, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

// Open path read-only (close-on-exec) into *fd and its size into *size; it must be a
// regular file. MF_ERR_IO names the path and errno text; nothing is left open then.
int mf_open_regular(const char *path, int *fd, uint64_t *size, char *err, size_t errlen);

// Read a whole (small) file into a NUL-terminated malloc'd buffer. MF_ERR_IO names
// the path and errno text.
int mf_read_file(const char *path, char **out, size_t *len, char *err, size_t errlen);

// Monotonic wall clock in seconds (timings in stats).
double mf_now_s(void);

// Join dir and name with '/', into a malloc'd string (NULL on OOM).
char *mf_path_join(const char *dir, const char *name);

/* ==== Fault injection (test builds only) ====
 * Built with -DMF_FAULT_INJECTION (tests/c/test_faults.c, `make fault-site` for the
 * Python tests), every file that includes this header calls the hooks below instead
 * of malloc, calloc, realloc, strdup, strndup, posix_memalign, aligned_alloc and pread:
 * the macros at the end rename the calls, so no call site changes and a release build
 * has neither the hooks nor their cost. The Makefile checks each object of that build
 * for a direct call to an allocator, i.e. a file that bypasses this header.
 *
 * The counters are process-wide (a test arms a fault, then calls the API from one
 * thread; the I/O workers' preads count too), so they are atomics; they are the only
 * mutable globals of the core, and exist only in these builds. */
#ifdef MF_FAULT_INJECTION
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

// Kinds of mf_fault_io_arm. Each applies to every pread after the first `after`.
enum mf_fault_io {
    MF_FAULT_IO_OFF = 0,
    MF_FAULT_IO_SHORT = 1,   // return part of the request (4096-byte multiples when
                             // the request is one, as O_DIRECT needs)
    MF_FAULT_IO_EIO = 2,     // fail with errno EIO, reading nothing
    MF_FAULT_IO_EOF = 3,     // return 0, as at the end of a file
};

// Make the n-th allocation from now (n >= 1) fail, only that one; 0 = none. Resets
// the count of mf_fault_alloc_count.
MF_API void mf_fault_alloc_arm(long n);
// Allocations made through the hooks since the last mf_fault_alloc_arm.
MF_API long mf_fault_alloc_count(void);
// From the (after + 1)-th pread on, fault every pread with `kind` (enum mf_fault_io);
// MF_FAULT_IO_OFF disarms. Resets the count of mf_fault_io_count.
MF_API void mf_fault_io_arm(int kind, long after);
// preads made through the hook since the last mf_fault_io_arm.
MF_API long mf_fault_io_count(void);

MF_API void *mf_fault_malloc(size_t n);
MF_API void *mf_fault_calloc(size_t n, size_t size);
MF_API void *mf_fault_realloc(void *p, size_t n);
MF_API char *mf_fault_strdup(const char *s);
MF_API char *mf_fault_strndup(const char *s, size_t n);
MF_API int mf_fault_posix_memalign(void **p, size_t align, size_t n);
MF_API void *mf_fault_aligned_alloc(size_t align, size_t n);
MF_API ssize_t mf_fault_pread(int fd, void *buf, size_t n, off_t off);

#undef malloc
#undef calloc
#undef realloc
#undef strdup
#undef strndup
#undef posix_memalign
#undef aligned_alloc
#undef pread
#define malloc(n) mf_fault_malloc(n)
#define calloc(n, size) mf_fault_calloc(n, size)
#define realloc(p, n) mf_fault_realloc(p, n)
#define strdup(s) mf_fault_strdup(s)
#define strndup(s, n) mf_fault_strndup(s, n)
#define posix_memalign(p, align, n) mf_fault_posix_memalign(p, align, n)
#define aligned_alloc(align, n) mf_fault_aligned_alloc(align, n)
#define pread(fd, buf, n, off) mf_fault_pread(fd, buf, n, off)
#endif /* MF_FAULT_INJECTION */

#endif /* MF_COMMON_H */
