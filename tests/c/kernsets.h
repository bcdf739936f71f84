/*
 * kernsets.h — kernel-set accounting for the C tests of the CPU backend: which sets
 * (scalar, avx2, avx512, avx512vnni, neon) a program really ran, printed at the end, and the
 * MOEFLUX_REQUIRE_KERNELS check. A set the CPU lacks is skipped by the tests; without
 * this check a build or dispatch bug that hides a set (or a CI machine without it)
 * would pass silently. `make test` sets the variable to every set the build contains
 * for this CPU (tools/kernel_sets.c), `make test-neon` to "scalar,neon".
 * Include after check.h, once per program.
 */
#ifndef MF_TESTS_KERNSETS_H
#define MF_TESTS_KERNSETS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cpu/cpu_internal.h"

// Every set name the CPU backend knows, in the order the tests try them.
static const char *const kernel_names[] = {"scalar", "avx2", "avx512", "avx512vnni", "neon"};
#define KS_N_SETS 5

// Sets exercised so far: ran[i] counts the runs of kernel_names[i].
struct kernsets {
    long ran[KS_N_SETS];
};

// Index of `name` in kernel_names, or -1.
static inline int ks_index(const char *name, size_t len) {
    for (int i = 0; i < KS_N_SETS; i++)
        if (strlen(kernel_names[i]) == len && strncmp(kernel_names[i], name, len) == 0)
            return i;
    return -1;
}

// Counts one run of the set `k` (the set an exec or call really used).
static inline void ks_note(struct kernsets *ks, const struct mf_cpu_kernels *k) {
    int i = ks_index(k->name, strlen(k->name));
    CHECK(i >= 0, "kernel set '%s' is not one the tests know", k->name);
    if (i >= 0)
        ks->ran[i]++;
}

// Forces set ki on ex and counts it. 0 if the CPU lacks it (the caller skips it); a
// set that was accepted but not installed is a failed CHECK.
static inline int ks_force(struct kernsets *ks, struct mf_exec *ex, size_t ki) {
    char err[256];
    if (mf_cpu_exec_set_kernels(ex, kernel_names[ki], err, sizeof err) != MF_OK)
        return 0;
    CHECK(strcmp(ex->k->name, kernel_names[ki]) == 0, "forcing '%s' installed '%s'",
          kernel_names[ki], ex->k->name);
    ks_note(ks, ex->k);
    return 1;
}

// The set ki if the CPU runs it (counted), else NULL: for tests calling kernels
// directly.
static inline const struct mf_cpu_kernels *ks_find(struct kernsets *ks, size_t ki) {
    const struct mf_cpu_kernels *k = mf_cpu_kernels_find(kernel_names[ki]);
    if (k)
        ks_note(ks, k);
    return k;
}

// Prints the sets exercised ("kernel sets exercised: scalar avx2 (runs)") and fails a
// CHECK for each set named in $MOEFLUX_REQUIRE_KERNELS (comma-separated) that never
// ran, or that the tests do not know.
static inline void ks_finish(const struct kernsets *ks, const char *prog) {
    printf("%s: kernel sets exercised:", prog);
    for (int i = 0; i < KS_N_SETS; i++)
        if (ks->ran[i])
            printf(" %s (%ld runs)", kernel_names[i], ks->ran[i]);
    printf("\n");
    const char *req = getenv("MOEFLUX_REQUIRE_KERNELS");
    if (!req)
        return;
    printf("%s: required kernel sets: %s\n", prog, req);
    for (const char *p = req; *p;) {
        size_t len = strcspn(p, ", ");
        if (len) {
            int i = ks_index(p, len);
            CHECK(i >= 0, "MOEFLUX_REQUIRE_KERNELS names '%.*s', not a kernel set "
                  "(scalar, avx2, avx512, avx512vnni, neon)", (int)len, p);
            CHECK(i < 0 || ks->ran[i] > 0, "kernel set '%s' is required "
                  "(MOEFLUX_REQUIRE_KERNELS=%s) but was not exercised: this build or "
                  "CPU does not run it", i >= 0 ? kernel_names[i] : "?", req);
        }
        p += len;
        p += strspn(p, ", ");
    }
}

#endif
