#!/usr/bin/env bash
# ensure_fuzz_deps.sh — exit 0 when $FUZZ_CC (default clang) can build a libFuzzer
# program with ASan and UBSan, as `make fuzz-build` does. When it cannot and this is
# root on a machine with apt-get (a CI runner), install clang and its runtime
# libraries (libclang-rt-14-dev holds libFuzzer on Debian/Ubuntu) and check again.
# Exit 1 when fuzzing is not possible here: the Makefile then replays the corpora
# through a plain driver instead.
set -u
cc="${FUZZ_CC:-clang}"

probe() {
    local dir
    dir="$(mktemp -d)" || return 1
    printf '%s\n' '#include <stddef.h>' '#include <stdint.h>' \
        'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }' \
        >"$dir/probe.c"
    "$cc" -fsanitize=fuzzer,address,undefined -o "$dir/probe" "$dir/probe.c" \
        >/dev/null 2>&1 && "$dir/probe" -runs=1 >/dev/null 2>&1
    local rc=$?
    rm -rf "$dir"
    return $rc
}

probe && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_fuzz_deps: $cc cannot build libFuzzer programs; installing clang" >&2
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-14-dev \
        >/dev/null 2>&1 ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null 2>&1
    probe && exit 0
fi
echo "ensure_fuzz_deps: no libFuzzer with $cc" >&2
exit 1
