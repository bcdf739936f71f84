#!/usr/bin/env bash
# run_long.sh OUT NAME:SECONDS... — the long runs, on a machine with many cores (the
# test machine): every harness named, one after another, for its SECONDS on every core
# (libFuzzer -fork), through run.sh; default: all six harnesses for 60 s each. Writes
# OUT/NAME.log, OUT/NAME/ (new inputs), OUT/artifacts/ and OUT/summary.txt (the
# machine, then one line per harness: executions, cores, coverage, status).
#
# Binaries: FUZZ_PREBUILT=DIR uses harnesses built elsewhere (copied to build/fuzz/;
# they find the fixtures through FUZZ_MODELS_DIR) when they run here, else
# `make fuzz-build` (clang with libFuzzer). The safetensors harness needs a Python with
# numpy and atheris (PY, default python3); it is skipped, and said so, without them.
set -u
out="$1"
shift
specs=("$@")
[ ${#specs[@]} -eq 0 ] &&
    specs=(json:60 config:60 manifest:60 layout:60 snapshot:60 safetensors:60)
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
cores=$(nproc)
py="${PY:-python3}"
mkdir -p "$out/artifacts" build/fuzz
if [ -n "${FUZZ_PREBUILT:-}" ] && "$FUZZ_PREBUILT/fuzz_json" -runs=1 >/dev/null 2>&1; then
    cp "$FUZZ_PREBUILT"/fuzz_* build/fuzz/ || exit 1
    export FUZZ_MODELS_DIR="$PWD/tests/fuzz/models"
    echo "using the prebuilt harnesses of $FUZZ_PREBUILT" >"$out/build.log"
else
    make -s -j"$cores" fuzz-build >"$out/build.log" 2>&1 || { tail -n 20 "$out/build.log"; exit 1; }
fi
{
    echo "machine: $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    for spec in "${specs[@]}"; do
        name="${spec%%:*}" secs="${spec##*:}"
        if [ "$name" = safetensors ] && ! "$py" -c 'import atheris, numpy' 2>/dev/null; then
            echo "fuzz_safetensors: skipped ($py lacks atheris or numpy)"
            continue
        fi
        PY="$py" tests/fuzz/run.sh "$out" "$secs" "$cores" "$name"
    done
} 2>&1 | tee "$out/summary.txt"
