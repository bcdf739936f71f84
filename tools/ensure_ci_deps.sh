#!/usr/bin/env bash
# ensure_ci_deps.sh — makes sure the tools `make test-neon` needs are here: an aarch64
# cross compiler with its C library, and qemu-user to run its programs. When one
# is missing it installs the Debian packages (gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user) if this runs as root with apt-get; otherwise it
# fails with a message saying what to install. It never skips: CI must run the NEON
# kernels or fail.
#
# Usage: tools/ensure_ci_deps.sh [CROSS_CC [QEMU]]   (defaults: aarch64-linux-gnu-gcc
# qemu-aarch64, or $AARCH64_CC / $QEMU_AARCH64; the aarch64 libraries qemu loads are
# under $AARCH64_SYSROOT, default /usr/aarch64-linux-gnu)
set -u
cc=${1:-${AARCH64_CC:-aarch64-linux-gnu-gcc}}
qemu=${2:-${QEMU_AARCH64:-qemu-aarch64}}
sysroot=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
packages="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"

# 0 when the cross compiler links an aarch64 program and qemu runs it.
tools_work() {
    command -v "$cc" >/dev/null 2>&1 && command -v "$qemu" >/dev/null 2>&1 || return 1
    local dir rc
    dir=$(mktemp -d) || return 1
    printf '#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n' >"$dir/p.c"
    "$cc" -o "$dir/p" "$dir/p.c" >/dev/null 2>&1 &&
        [ "$(QEMU_LD_PREFIX="$sysroot" "$qemu" "$dir/p" 2>/dev/null)" = ok ]
    rc=$?
    rm -rf "$dir"
    return $rc
}

if tools_work; then
    exit 0
fi
echo "ensure_ci_deps: $cc or $qemu missing or not working; need: $packages" >&2
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_ci_deps: not root with apt-get: install them ($packages) or set" \
         "AARCH64_CC / QEMU_AARCH64; the NEON kernel tests cannot run without them" >&2
    exit 1
fi
echo "ensure_ci_deps: installing $packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q && apt-get install -y -q --no-install-recommends $packages || {
    echo "ensure_ci_deps: apt-get install of $packages failed" >&2
    exit 1
}
if ! tools_work; then
    echo "ensure_ci_deps: $packages installed, but $cc with $qemu (libraries under" \
         "$sysroot) still does not run an aarch64 program" >&2
    exit 1
fi
