#!/usr/bin/env bash
# run.sh OUT SECONDS JOBS NAME... — run each libFuzzer harness build/fuzz/fuzz_NAME (or
# for NAME safetensors, tests/fuzz/fuzz_safetensors.py under atheris with $PY) for
# SECONDS on JOBS cores, starting from the committed corpus tests/fuzz/corpus/fuzz_NAME
# (read only: new inputs go to OUT/NAME), with tests/fuzz/NAME.dict when present. Logs
# go to OUT/NAME.log, crashing inputs to OUT/artifacts/. Prints one line per harness
# (executions, coverage, seconds) and exits 1 if any harness failed (a crash, leak,
# sanitizer report, timeout or OOM). `make fuzz-smoke` runs it with JOBS=1;
# tests/fuzz/run_long.sh with every core.
#
# JOBS > 1: JOBS independent processes (seeds 1..JOBS) share OUT/NAME, each taking up
# the others' new inputs every second (libFuzzer's -reload); their executions are
# summed, and the coverage printed is that of the corpus they leave (OUT/NAME and the
# committed one, replayed once with -runs=0). Not libFuzzer's -fork mode: it restarts
# a worker process for each job (job k runs k seconds) and merges each job's inputs
# in one parent process, one job at a time; on 2 cores, 40 s of fuzz_layout made
# 0.66 M executions that way and 1.23 M as two independent processes.
set -u
out="$1" secs="$2" jobs="$3"
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
bin="$here/../../build/fuzz"
mkdir -p "$out/artifacts"
fail=0

# The harness command for NAME (an array: a binary, or Python with the script).
harness() {
    if [ "$1" = safetensors ]; then
        cmd=("${PY:-python3}" "$here/fuzz_safetensors.py")
    else
        cmd=("$bin/fuzz_$1")
    fi
}

# The executions of a log: its last status line's "#<execs>".
execs_of() {
    grep -aE '^#[0-9]+' "$1" | tail -n 1 | sed -nE 's/^#([0-9]+).*/\1/p'
}

for name in "$@"; do
    mkdir -p "$out/$name"
    harness "$name"
    # 10 s is far beyond any one input's time (a slower one is a hang); 2 GiB bounds the
    # memory an input may make the engine take.
    opts=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -max_total_time="$secs"
          -artifact_prefix="$out/artifacts/$name-")
    [ -f "$here/$name.dict" ] && opts+=(-dict="$here/$name.dict")
    corpora=("$out/$name" "$here/corpus/fuzz_$name")
    start=$(date +%s)
    rc=0
    if [ "$jobs" -le 1 ]; then
        "${cmd[@]}" "${opts[@]}" "${corpora[@]}" >"$out/$name.log" 2>&1 || rc=$?
        execs=$(execs_of "$out/$name.log")
        # The last status line: "#<execs> <event> cov: <n> ft: <n> ... exec/s: <n> ...".
        last=$(grep -aE '^#[0-9]+' "$out/$name.log" | tail -n 1)
    else
        pids=()
        for i in $(seq 1 "$jobs"); do
            "${cmd[@]}" "${opts[@]}" -seed="$i" "${corpora[@]}" >"$out/$name.$i.log" 2>&1 &
            pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || rc=$?; done
        execs=0
        for i in $(seq 1 "$jobs"); do
            n=$(execs_of "$out/$name.$i.log")
            execs=$((execs + ${n:-0}))
        done
        cat "$out/$name".*.log >"$out/$name.log"
        rm -f "$out/$name".*.log
        # Coverage of what the processes left, together (-runs=0: load and run the
        # corpora once, print "INITED cov: <n> ft: <n> ...", stop).
        "${cmd[@]}" -runs=0 -timeout=10 -rss_limit_mb=2048 "${corpora[@]}" \
            >"$out/$name.cov.log" 2>&1 || rc=$?
        last=$(grep -aE '^#[0-9]+.*INITED' "$out/$name.cov.log" | tail -n 1)
    fi
    took=$(( $(date +%s) - start ))
    cov=$(printf '%s' "$last" | sed -nE 's/.*cov: ([0-9]+).*/\1/p')
    ft=$(printf '%s' "$last" | sed -nE 's/.*ft: ([0-9]+).*/\1/p')
    status=ok
    if [ $rc -ne 0 ]; then
        status="FAILED (exit $rc; see $out/$name.log)"
        fail=1
        grep -aE 'ERROR: |SUMMARY: |fuzz harness:' "$out/$name.log" "$out/$name.cov.log" \
            2>/dev/null | head -n 5
    fi
    echo "fuzz_$name: ${execs:-0} executions in ${took} s on $jobs core(s), cov ${cov:-?} ft ${ft:-?}: $status"
done
exit $fail
