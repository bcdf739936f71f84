#!/usr/bin/env bash
# run_long.sh OUT SECONDS [NAME...] — the long runs, on a machine with many cores (the
# test machine): builds the harnesses, then runs every harness (default: all five C
# harnesses and the safetensors one) one after another for SECONDS each on every core
# (libFuzzer -fork), writing OUT/NAME.log, OUT/artifacts/ and OUT/summary.txt (one line
# per harness: executions, cores, coverage, status). Needs clang with libFuzzer (or
# FUZZ_PREBUILT, below) and, for the safetensors harness, a Python with numpy and
# atheris (PY, default python3).
set -u
out="$1" secs="$2"
shift 2
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(json config manifest layout snapshot safetensors)
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
cores=$(nproc)
mkdir -p "$out/artifacts"
# FUZZ_PREBUILT=DIR: harness binaries built elsewhere (a machine without clang), copied
# into build/fuzz/; they find the fixtures through FUZZ_MODELS_DIR.
if [ -n "${FUZZ_PREBUILT:-}" ]; then
    mkdir -p build/fuzz && cp "$FUZZ_PREBUILT"/fuzz_* build/fuzz/ || exit 1
    export FUZZ_MODELS_DIR="$PWD/tests/fuzz/models"
else
    make -s -j"$cores" fuzz-build >"$out/build.log" 2>&1 || { tail -n 20 "$out/build.log"; exit 1; }
fi
{
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    PY="${PY:-python3}" tests/fuzz/run.sh "$out" "$secs" "$cores" "${names[@]}"
} 2>&1 | tee "$out/summary.txt"
