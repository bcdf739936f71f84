#!/usr/bin/env bash
# run_long.sh OUT NAME:SECONDS... — the long runs, on a machine with many cores (the
# test machine): every harness named, one after another, for its SECONDS on every core
# (one process per core, through run.sh); default: all six harnesses for 60 s each.
# Writes OUT/NAME.log, OUT/NAME/ (new inputs), OUT/artifacts/ and OUT/summary.txt (the
# machine, then one line per harness: executions, cores, coverage, status); exits 1
# when a harness failed.
#
# Binaries: FUZZ_PREBUILT=DIR (a path from the repository root, or absolute) uses
# harnesses built elsewhere with `make fuzz-build` and copied to DIR, when every C
# harness named runs here (they are copied to build/fuzz/ and find the fixtures through
# FUZZ_MODELS_DIR, the compiled-in path being the build machine's); else `make
# fuzz-build` (clang with libFuzzer). The safetensors harness needs a Python with numpy
# and atheris (PY, default python3); it is skipped, and said so, without them.
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
export FUZZ_MODELS_DIR="$PWD/tests/fuzz/models"

# 0 when DIR holds a runnable build of every C harness named in the specs.
prebuilt_ok() {
    local spec name
    for spec in "${specs[@]}"; do
        name="${spec%%:*}"
        [ "$name" = safetensors ] && continue
        "$1/fuzz_$name" -runs=1 >/dev/null 2>&1 || return 1
    done
}

if [ -n "${FUZZ_PREBUILT:-}" ] && prebuilt_ok "$FUZZ_PREBUILT"; then
    if [ "$(cd "$FUZZ_PREBUILT" && pwd)" != "$PWD/build/fuzz" ]; then
        cp "$FUZZ_PREBUILT"/fuzz_* build/fuzz/ || exit 1
    fi
    echo "using the prebuilt harnesses of $FUZZ_PREBUILT" >"$out/build.log"
else
    [ -n "${FUZZ_PREBUILT:-}" ] &&
        echo "run_long: the harnesses in $FUZZ_PREBUILT do not run here; building" >&2
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
        PY="$py" tests/fuzz/run.sh "$out" "$secs" "$cores" "$name" || echo "run_long: FAILED"
    done
} 2>&1 | tee "$out/summary.txt"
! grep -q '^run_long: FAILED' "$out/summary.txt"
