/*
 * test_fuzz_regress.c — one test per bug the libFuzzer harnesses of tests/fuzz/ found,
 * each the minimized input written out, so the fix stays tested without a fuzzer.
 * Several were undefined behaviour that only a sanitizer sees: those tests also check
 * the refusal's message, which the buggy code did not give, and `make asan` runs them
 * under UBSan.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "io/expert_store.h"

static char dir[256];

// A layout whose gate_proj.scales has 2 columns (so hid = 2 * group_size) and the
// given group_size: 9 components of a tiny 2-row expert, 1 expert, 1 layer.
static void put_layout(const char *group_size) {
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const part[3] = {"weight", "scales", "biases"};
    char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf,
                                "{\"num_layers\": 1, \"num_experts\": 1, "
                                "\"expert_size\": 4096, \"group_size\": %s, "
                                "\"components\": [", group_size);
    unsigned off = 0;
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < 3; k++) {
            unsigned size = k ? 2 * 2 * 2 : 2 * 4 * 4;   // BF16 [2, 2] or U32 [2, 4]
            n += (size_t)snprintf(buf + n, sizeof buf - n,
                                  "%s{\"name\": \"%s.%s\", \"offset\": %u, \"size\": %u, "
                                  "\"dtype\": \"%s\", \"shape\": [2, %d]}",
                                  p || k ? ", " : "", proj[p], part[k], off, size,
                                  k ? "BF16" : "U32", k ? 2 : 4);
            off += size;
        }
    snprintf(buf + n, sizeof buf - n, "]}");
    check_write_file(dir, "layout.json", buf, strlen(buf));
}

// fuzz_layout: group_size 2^62 made resolve_bits compute hid = 2 * 2^62 (signed
// overflow) before checking the group size.
static void test_layout_huge_group_size(void) {
    put_layout("4611686018427387904");
    uint8_t is_moe[1] = {1};
    mf_expert_store *st = NULL;
    char err[512] = "";
    int rc = mf_expert_store_open(&st, dir, 1, is_moe, err, sizeof err);
    CHECK(rc == MF_ERR_FORMAT && st == NULL && strstr(err, "group_size 4611686018427387904: expected"),
          "huge group_size: status %d, message \"%s\"", rc, err);
    mf_expert_store_close(st);
    // The same layout with a valid group size is accepted (the test input is sound).
    put_layout("32");
    static const uint8_t zeros[4096];
    check_write_file(dir, "layer_00.bin", zeros, sizeof zeros);
    rc = mf_expert_store_open(&st, dir, 1, is_moe, err, sizeof err);
    CHECK(rc == MF_OK, "group_size 32: %s", err);
    mf_expert_store_close(st);
}

int main(void) {
    if (check_make_tmpdir(dir, sizeof dir, "mf_fuzz_regress") != 0) return 1;
    test_layout_huge_group_size();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    (void)!system(cmd);
    return check_finish("test_fuzz_regress");
}
