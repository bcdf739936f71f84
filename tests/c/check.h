/*
 * check.h — the test harness every tests/c/test_*.c program shares: CHECK (count and
 * report a failed condition, keep going so one run lists every failure), the exit
 * status summary, and a fresh temporary directory. A header, not a test_*.c, so the
 * Makefile does not build it as a program of its own. Include it once per program.
 */
#ifndef MF_TESTS_CHECK_H
#define MF_TESTS_CHECK_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Failed checks of this program (each test program is one translation unit plus the
// core; the count is only read by check_finish in main).
static int n_fail;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            n_fail++;                                                      \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

/* main's exit status: 1 after printing the failure count when a CHECK failed, else 0
 * after printing "<name>: ok". */
static inline int check_finish(const char *name) {
    if (n_fail) {
        fprintf(stderr, "%s: %d failure(s)\n", name, n_fail);
        return 1;
    }
    printf("%s: ok\n", name);
    return 0;
}

/* Write n bytes to dir/name (created or truncated); a failure is a failed CHECK. */
static inline void check_write_file(const char *dir, const char *name, const void *data,
                                    size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    if (!f)
        return;
    CHECK(fwrite(data, 1, n, f) == n, "short write %s", path);
    CHECK(fclose(f) == 0, "close %s", path);
}

/* xorshift64*: reproducible pseudo-random numbers for the fuzzers, from a caller-owned
 * nonzero state. */
static inline uint64_t check_rand(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545f4914f6cdd1dull;
}

/* Create a fresh directory $TMPDIR/<stem>_XXXXXX (/tmp without TMPDIR) and write its
 * path into dir[cap]. Returns 0, or -1 after printing why. */
static inline int check_make_tmpdir(char *dir, size_t cap, const char *stem) {
    const char *base = getenv("TMPDIR");
    int n = snprintf(dir, cap, "%s/%s_XXXXXX", base && *base ? base : "/tmp", stem);
    if (n < 0 || (size_t)n >= cap) {
        fprintf(stderr, "temporary directory path too long for %zu bytes\n", cap);
        return -1;
    }
    if (!mkdtemp(dir)) {
        fprintf(stderr, "mkdtemp %s: %s\n", dir, strerror(errno));
        return -1;
    }
    return 0;
}

#endif
