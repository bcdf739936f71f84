#!/bin/sh
# Build bench/bench_reader.c against the core (no Python) into build/ and run it with
# the given arguments (see the .c file's header). Run from the repository root.
set -e
mkdir -p build
${CC:-cc} -std=c11 -O2 -D_GNU_SOURCE -Icsrc/include -Icsrc -o build/bench_reader \
    bench/bench_reader.c $(find csrc -name '*.c' -not -path 'csrc/python/*' | sort) \
    -lpthread -lm
exec ./build/bench_reader "$@"
