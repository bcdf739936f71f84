#!/usr/bin/env bash
# run.sh OUT SECONDS JOBS NAME... — run each libFuzzer harness build/fuzz/fuzz_NAME (or
# for NAME safetensors, tests/fuzz/fuzz_safetensors.py under atheris with $PY) for
# SECONDS on JOBS cores (1: one process; more: libFuzzer's -fork mode), starting from
# the committed corpus tests/fuzz/corpus/fuzz_NAME (read only: new inputs go to
# OUT/NAME), with tests/fuzz/NAME.dict when present. Logs go to OUT/NAME.log, crashing
# inputs to OUT/artifacts/. Prints one line per harness (executions, coverage, seconds)
# and exits 1 if any harness failed (a crash, leak, sanitizer report, timeout or OOM).
# `make fuzz-smoke` runs it with JOBS=1; tests/fuzz/run_long.sh with every core.
set -u
out="$1" secs="$2" jobs="$3"
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
bin="$here/../../build/fuzz"
mkdir -p "$out/artifacts"
fail=0
for name in "$@"; do
    mkdir -p "$out/$name"
    # 10 s is far beyond any one input's time (a slower one is a hang); 2 GiB bounds the
    # memory an input may make the engine take.
    opts=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -max_total_time="$secs"
          -artifact_prefix="$out/artifacts/$name-")
    [ -f "$here/$name.dict" ] && opts+=(-dict="$here/$name.dict")
    start=$(date +%s)
    if [ "$name" = safetensors ]; then
        # Python (atheris, run by $PY, default python3). libFuzzer's fork mode would
        # exec the script itself, so JOBS independent processes (seeds 1..JOBS) share
        # the output corpus instead; their executions are summed.
        rc=0 execs=0
        pids=()
        for i in $(seq 1 "$jobs"); do
            "${PY:-python3}" "$here/fuzz_safetensors.py" "${opts[@]}" -seed="$i" "$out/$name" \
                "$here/corpus/fuzz_$name" >"$out/$name.$i.log" 2>&1 &
            pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || rc=$?; done
        for i in $(seq 1 "$jobs"); do
            n=$(grep -aE '^#[0-9]+' "$out/$name.$i.log" | tail -n 1 | sed -nE 's/^#([0-9]+).*/\1/p')
            execs=$((execs + ${n:-0}))
        done
        cat "$out/$name".*.log >"$out/$name.log"
        last=$(grep -aE '^#[0-9]+' "$out/$name.1.log" | tail -n 1)
    else
        # Fork mode ignores timeouts and OOMs unless told not to: both are failures here.
        fork=()
        [ "$jobs" -gt 1 ] && fork=(-fork="$jobs" -ignore_timeouts=0 -ignore_ooms=0)
        "$bin/fuzz_$name" "${opts[@]}" "${fork[@]}" "$out/$name" "$here/corpus/fuzz_$name" \
            >"$out/$name.log" 2>&1
        rc=$?
        # The last status line: "#<execs> <event> cov: <n> ft: <n> ... exec/s: <n> ...".
        last=$(grep -aE '^#[0-9]+' "$out/$name.log" | tail -n 1)
        execs=$(printf '%s' "$last" | sed -nE 's/^#([0-9]+).*/\1/p')
    fi
    took=$(( $(date +%s) - start ))
    cov=$(printf '%s' "$last" | sed -nE 's/.*cov: ([0-9]+).*/\1/p')
    ft=$(printf '%s' "$last" | sed -nE 's/.*ft: ([0-9]+).*/\1/p')
    status=ok
    if [ $rc -ne 0 ]; then
        status="FAILED (exit $rc; see $out/$name.log)"
        fail=1
        grep -aE 'ERROR: |SUMMARY: |fuzz harness:' "$out/$name.log" | head -n 5
    fi
    echo "fuzz_$name: ${execs:-0} executions in ${took} s on $jobs core(s), cov ${cov:-?} ft ${ft:-?}: $status"
done
exit $fail
