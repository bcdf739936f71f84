/*
 * common.h — small helpers every part of the core uses: dtypes, bf16/f16 widening,
 * error-message formatting, checked allocation. No state lives here.
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

#endif /* MF_COMMON_H */
