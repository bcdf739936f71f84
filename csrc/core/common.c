/*
 * common.c — the small helpers of common.h: dtype names and sizes, f16 widening,
 * error-message formatting, whole-file reads and path joins. Nothing here keeps state;
 * everything a caller gets back is either static or malloc'd for the caller to free.
 */
#include "core/common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

double mf_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ==== Dtypes ==== */

// Indexed by enum mf_dtype; names are the safetensors spellings.
static const struct {
    const char *name;
    size_t size;
} dtype_table[] = {
    [MF_DTYPE_F32] = {"F32", 4},  [MF_DTYPE_F16] = {"F16", 2},
    [MF_DTYPE_BF16] = {"BF16", 2}, [MF_DTYPE_U32] = {"U32", 4},
    [MF_DTYPE_U8] = {"U8", 1},    [MF_DTYPE_I32] = {"I32", 4},
};

#define N_DTYPES ((int)(sizeof dtype_table / sizeof dtype_table[0]))

const char *mf_dtype_name(enum mf_dtype dt) {
    if ((int)dt < 0 || (int)dt >= N_DTYPES)
        return "?";
    return dtype_table[dt].name;
}

int mf_dtype_parse(const char *s, enum mf_dtype *out) {
    if (!s)
        return -1;
    for (int i = 0; i < N_DTYPES; i++) {
        if (strcmp(s, dtype_table[i].name) == 0) {
            *out = (enum mf_dtype)i;
            return 0;
        }
    }
    return -1;
}

size_t mf_dtype_size(enum mf_dtype dt) {
    if ((int)dt < 0 || (int)dt >= N_DTYPES)
        return 0;
    return dtype_table[dt].size;
}

/* ==== f16 widening ====
 * IEEE binary16 -> binary32 by hand (no _Float16 dependency): every f16 value,
 * subnormals, infinities and NaN payloads included, is exactly representable in f32. */

float mf_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);   // inf / NaN (payload kept)
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);   // rebias 15 -> 127
    } else if (man == 0) {
        u = sign;                                // +-0
    } else {
        // Subnormal: value = man * 2^-24. Normalise the mantissa.
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while ((man & 0x400) == 0);
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ==== Errors ==== */

int mf_err(char *err, size_t errlen, int status, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return status;
}

/* ==== Files and paths ==== */

int mf_open_regular(const char *path, int *fd, uint64_t *size, char *err, size_t errlen) {
    *fd = -1;
    *size = 0;
    // O_NONBLOCK: a FIFO (or device) in the file's place must be refused below, not
    // block open() until a writer appears. It means nothing for a regular file's reads,
    // but is cleared all the same.
    int f = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (f < 0)
        return mf_err(err, errlen, MF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(f, &st) != 0) {
        int e = errno;
        close(f);
        return mf_err(err, errlen, MF_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(f);
        return mf_err(err, errlen, MF_ERR_IO, "%s: not a regular file", path);
    }
    int fl = fcntl(f, F_GETFL);
    if (fl < 0 || fcntl(f, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        int e = errno;
        close(f);
        return mf_err(err, errlen, MF_ERR_IO, "%s: fcntl: %s", path, strerror(e));
    }
    *fd = f;
    *size = (uint64_t)st.st_size;
    return MF_OK;
}

int mf_read_file(const char *path, char **out, size_t *len, char *err, size_t errlen) {
    *out = NULL;
    if (len)
        *len = 0;
    int fd;
    uint64_t bytes;
    int rc = mf_open_regular(path, &fd, &bytes, err, errlen);
    if (rc != MF_OK)
        return rc;
    size_t size = (size_t)bytes;
    char *buf = malloc(size + 1);
    if (!buf) {
        close(fd);
        return mf_err(err, errlen, MF_ERR_NOMEM, "%s: out of memory reading %zu bytes",
                      path, size);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return mf_err(err, errlen, MF_ERR_IO, "%s: read failed: %s", path,
                          strerror(e));
        }
        if (r == 0)
            break;   // file shrank under us: use what is there
        got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    *out = buf;
    if (len)
        *len = got;
    return MF_OK;
}

char *mf_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    int slash = a > 0 && dir[a - 1] != '/';
    char *p = malloc(a + (size_t)slash + b + 1);
    if (!p)
        return NULL;
    memcpy(p, dir, a);
    if (slash)
        p[a] = '/';
    memcpy(p + a + slash, name, b + 1);
    return p;
}

/* ==== Fault injection (test builds only; see common.h) ====
 * The real functions are called as (malloc)(n): a function-like macro is not expanded
 * when its name is not followed by '('. */
#ifdef MF_FAULT_INJECTION
#include <stdatomic.h>

static _Atomic long fault_alloc_at;     // the allocation that fails, 0 = none
static _Atomic long fault_alloc_seen;   // allocations since the last arm
static _Atomic int fault_io_kind;       // enum mf_fault_io
static _Atomic long fault_io_after;     // preads left alone before faulting
static _Atomic long fault_io_seen;      // preads since the last arm

void mf_fault_alloc_arm(long n) {
    atomic_store(&fault_alloc_seen, 0);
    atomic_store(&fault_alloc_at, n);
}

long mf_fault_alloc_count(void) {
    return atomic_load(&fault_alloc_seen);
}

// 1 when this allocation is the armed one (errno ENOMEM set, as libc would).
static int alloc_fails(void) {
    long k = atomic_fetch_add(&fault_alloc_seen, 1) + 1;
    if (k != atomic_load(&fault_alloc_at))
        return 0;
    errno = ENOMEM;
    return 1;
}

// Zero-filled, as fresh pages from the system are: a descriptor array an error path
// closes before filling then closes fd 0, which the fault test's descriptor check
// sees every time (with leftover heap contents it would close someone else's file
// only now and then).
void *mf_fault_malloc(size_t n) {
    return alloc_fails() ? NULL : (calloc)(1, n ? n : 1);
}

void *mf_fault_calloc(size_t n, size_t size) {
    return alloc_fails() ? NULL : (calloc)(n, size);
}

void *mf_fault_realloc(void *p, size_t n) {
    return alloc_fails() ? NULL : (realloc)(p, n);
}

char *mf_fault_strdup(const char *s) {
    return alloc_fails() ? NULL : (strdup)(s);
}

char *mf_fault_strndup(const char *s, size_t n) {
    return alloc_fails() ? NULL : (strndup)(s, n);
}

int mf_fault_posix_memalign(void **p, size_t align, size_t n) {
    return alloc_fails() ? ENOMEM : (posix_memalign)(p, align, n);
}

void *mf_fault_aligned_alloc(size_t align, size_t n) {
    return alloc_fails() ? NULL : (aligned_alloc)(align, n);
}

void mf_fault_io_arm(int kind, long after) {
    atomic_store(&fault_io_kind, MF_FAULT_IO_OFF);
    atomic_store(&fault_io_seen, 0);
    atomic_store(&fault_io_after, after);
    atomic_store(&fault_io_kind, kind);
}

long mf_fault_io_count(void) {
    return atomic_load(&fault_io_seen);
}

// A short read's length: half the request, kept a multiple of 4096 when the request
// is one (an O_DIRECT fd refuses anything else), never 0.
static size_t short_len(size_t n) {
    if (n % 4096 == 0)
        return n > 4096 ? (n / 2) & ~(size_t)4095 : n;
    return n > 1 ? n / 2 : n;
}

ssize_t mf_fault_pread(int fd, void *buf, size_t n, off_t off) {
    long k = atomic_fetch_add(&fault_io_seen, 1) + 1;
    int kind = atomic_load(&fault_io_kind);
    if (kind == MF_FAULT_IO_OFF || k <= atomic_load(&fault_io_after))
        return (pread)(fd, buf, n, off);
    switch (kind) {
    case MF_FAULT_IO_SHORT: return (pread)(fd, buf, short_len(n), off);
    case MF_FAULT_IO_EIO: errno = EIO; return -1;
    case MF_FAULT_IO_EOF: return 0;
    default: return (pread)(fd, buf, n, off);
    }
}
#endif /* MF_FAULT_INJECTION */
