#!/usr/bin/env bash
# On the CUDA test machine: the decode-shape timings of tests/c/test_backend_ops.c
# (MOEFLUX_OPS_BENCH=decode) for the kernels of a base tree against this tree's, and
# against variants of this tree's shaders (MOEFLUX_SHADERS_DIR, no rebuild), in
# interleaved passes, then optionally `make test-cuda`, `make bench-cuda`, and the
# whole-model bench of BASE_TREE and of this tree interleaved.
#
#   bench/cuda_ab.sh BASE_TREE [steps]   steps: any of "ab test bench model" (default: ab)
#
# BASE_TREE: a checkout whose shaders/, csrc/backends/cuda/cuda_ops.c and
# csrc/backends/gpu_args.h are the "before" (the op-test file, with the decode timings,
# is this tree's). Variants: comma-separated "name:sed-expression:file" entries in
# $AB_VARIANTS, applied to a copy of shaders/ (the expression can hold neither ':'
# nor ','). The model step needs BASE_TREE whole
# (e.g. `git archive REV | tar -x -C DIR`, carried to the GPU machine): this tree,
# then the base, twice, `make bench-cuda` in each with $BENCH_CUDA_ARGS, one model
# directory for both.
# Logs go to $OUT (default /tmp/ab-out).
set -u
BASE=${1:?usage: bench/cuda_ab.sh BASE_TREE [steps]}
STEPS=${2:-ab}
OUT=${OUT:-/tmp/ab-out}
mkdir -p "$OUT"
J=$(nproc)
export MOEFLUX_CACHE_DIR=/tmp/ab-cache
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader

step() { echo "== $1 ($(date -u +%H:%M:%S))"; }

if [[ " $STEPS " == *" ab "* ]]; then
    step build
    make -s -j"$J" tests/c/build/test_backend_ops >"$OUT/build.log" 2>&1 || {
        tail -20 "$OUT/build.log"; exit 1; }
    rm -rf /tmp/ab-old && mkdir -p /tmp/ab-old
    tar --exclude=./build --exclude=./tests/c/build --exclude=./.cache -cf - . |
        tar -xf - -C /tmp/ab-old
    cp -r "$BASE"/shaders/. /tmp/ab-old/shaders/
    cp "$BASE"/csrc/backends/cuda/cuda_ops.c /tmp/ab-old/csrc/backends/cuda/
    [ -f "$BASE"/csrc/backends/gpu_args.h ] &&
        cp "$BASE"/csrc/backends/gpu_args.h /tmp/ab-old/csrc/backends/
    make -s -C /tmp/ab-old -j"$J" tests/c/build/test_backend_ops >"$OUT/build-old.log" 2>&1 ||
        { tail -20 "$OUT/build-old.log"; exit 1; }
    names=(old new)
    dirs=("" "")
    bins=(/tmp/ab-old/tests/c/build/test_backend_ops tests/c/build/test_backend_ops)
    IFS=',' read -ra VS <<<"${AB_VARIANTS:-}"
    for v in "${VS[@]}"; do
        IFS=: read -r name expr file <<<"$v"
        rm -rf "/tmp/ab-$name" && cp -r shaders "/tmp/ab-$name"
        sed -i "$expr" "/tmp/ab-$name/$file"
        names+=("$name")
        dirs+=("/tmp/ab-$name")
        bins+=(tests/c/build/test_backend_ops)
    done
    for pass in 0 1; do
        for i in "${!names[@]}"; do
            step "decode bench ${names[$i]} pass $pass"
            MOEFLUX_OPS_BENCH=decode MOEFLUX_SHADERS_DIR="${dirs[$i]}" timeout 120 \
                "${bins[$i]}" 2>&1 | grep -E "decode-bench|FAIL|error" |
                sed "s/^/${names[$i]}: /" | tee -a "$OUT/ab.log"
        done
    done
fi
if [[ " $STEPS " == *" test "* ]]; then
    step test-cuda
    timeout 420 make test-cuda CUDA_PY=python3 >"$OUT/test-cuda.log" 2>&1
    echo "test-cuda rc $?"
    grep -E "comparisons|passed|failed|FAIL|== |PASS|relative" "$OUT/test-cuda.log" | tail -30
fi
if [[ " $STEPS " == *" bench "* ]]; then
    step bench-cuda
    timeout "${BENCH_TIMEOUT:-300}" make bench-cuda CUDA_PY=python3 \
        BENCH_CUDA_ARGS="${BENCH_CUDA_ARGS:---layers 12 --repeat 2}" >"$OUT/bench-cuda.log" 2>&1
    echo "bench-cuda rc $?"
    tail -25 "$OUT/bench-cuda.log"
fi
if [[ " $STEPS " == *" model "* ]]; then
    for pass in 0 1; do
        for tree in . "$BASE"; do
            step "model bench $tree pass $pass"
            timeout "${BENCH_TIMEOUT:-300}" make -C "$tree" bench-cuda CUDA_PY=python3 \
                BENCH_CUDA_ARGS="${BENCH_CUDA_ARGS:---layers 12 --repeat 2} --dir /tmp/ab-model" \
                >"$OUT/model.log" 2>&1
            echo "rc $?"
            grep -E "^decode|^prefill" "$OUT/model.log" | sed "s|^|$tree: |" |
                tee -a "$OUT/ab.log"
        done
    done
fi
step done
