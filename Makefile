# moeflux — the two set-up commands of the README live here:
#   make demo   build, create (once, cached) a synthetic model, convert it, generate
#   make test   build with -Werror, run the C unit tests and the whole pytest suite
# Both start from a clean clone: they create .venv and install what they need.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CC     ?= cc
CFLAGS_C := -std=c11 -O1 -g -Wall -Wextra -Werror -D_GNU_SOURCE -Icsrc/include -Icsrc
# The kernel sources of shaders/ reach the CUDA backend as string literals in a
# generated C file (shaders/embed.py; the same step setup.py runs).
SHADERS_C := build/gen/mf_shaders.c
# The Metal backend (csrc/backends/metal/) is built on macOS only, with its
# Objective-C glue and the frameworks; elsewhere backend.c refuses "metal" with the reason.
UNAME_S := $(shell uname -s)
ifeq ($(UNAME_S),Darwin)
CORE_SRC := $(shell find csrc \( -name '*.c' -o -name '*.m' \) -not -path 'csrc/python/*' | sort) $(SHADERS_C)
CFLAGS_C := $(filter-out -D_GNU_SOURCE,$(CFLAGS_C)) -D_DARWIN_C_SOURCE
LDLIBS_OS := -framework Metal -framework Foundation
METAL_HOST_SRC :=
else
CORE_SRC := $(shell find csrc -name '*.c' -not -path 'csrc/python/*' -not -path 'csrc/backends/metal/*' | sort) $(SHADERS_C)
LDLIBS_OS := -ldl
# tests/c/test_metal_host.c links the Metal backend's plain C with its own stand-in
# for the Objective-C glue.
METAL_HOST_SRC := csrc/backends/metal/metal_ops.c csrc/backends/metal/metal_source.c
endif
# Every build made here also builds moeflux._diag, the test-only module of single
# backend ops (tests/test_kernels.py, bench/); a plain `pip install` leaves it out.
DIAG     := MOEFLUX_BUILD_DIAG=1
CTESTS   := $(patsubst tests/c/%.c,tests/c/build/%,$(wildcard tests/c/test_*.c)) \
            tests/c/build/test_kernel_sim

.PHONY: all venv install demo test ctest pytest asan asan-pytest tap clean test-cuda \
	test-neon neon-deps test-metal test-sim fault-site bench-cuda \
	fuzz-build fuzz-replay-build fuzz-smoke fuzz-replay fuzz-replay-c fuzz-py

all: install

# Dependencies come from pyproject.toml's extras (one list, not two): install the
# package once with them, then `install` rebuilds only the extension.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	MOEFLUX_WERROR=1 $(DIAG) $(PIP) install -q -e '.[test,prep,tokenizer]'
	touch $@

venv: $(VENV)/.deps

# Editable install: rebuilds moeflux._core from csrc/ every time (fast, a few files).
install: venv
	flock $(VENV)/.lock env MOEFLUX_WERROR=1 $(DIAG) $(PIP) install -q --no-build-isolation --no-deps -e .

demo: install
	$(PY) -m moeflux demo

# C unit tests: each tests/c/test_*.c is its own program linked with the core (no
# Python), built with -Werror and run.
$(SHADERS_C): shaders/embed.py $(wildcard shaders/*.h shaders/*.def)
	$(PYTHON) shaders/embed.py $@

tests/c/build/%: tests/c/%.c tests/c/check.h tests/c/kernsets.h $(CORE_SRC) $(shell find csrc -name '*.h')
	@mkdir -p tests/c/build
	$(CC) $(CFLAGS_C) $(CTEST_FLAGS) -o $@ $< $(CORE_SRC) $(EXTRA_SRC) -lpthread -lm $(LDLIBS_OS)

tests/c/build/test_metal_host: EXTRA_SRC = $(METAL_HOST_SRC)
tests/c/build/test_metal_host: $(METAL_HOST_SRC)

# tests/c/test_faults.c runs against a core built with -DMF_FAULT_INJECTION, whose
# common.h renames every allocation and expert pread to counting hooks. Its objects are
# compiled one by one and each is checked for a direct call to an allocator or pread:
# a file that bypasses common.h would escape the allocation-failure loop unseen.
FAULT_OBJ := tests/c/build/fault-obj
FAULT_FNS := malloc calloc realloc strdup strndup posix_memalign aligned_alloc pread
$(FAULT_OBJ)/.built: $(CORE_SRC) $(shell find csrc -name '*.h')
	@rm -rf $(FAULT_OBJ) && mkdir -p $(FAULT_OBJ)
	@set -e; for s in $(CORE_SRC); do \
		o=$(FAULT_OBJ)/$$(echo $$s | tr / _).o; \
		echo "$(CC) ... -DMF_FAULT_INJECTION -c $$s"; \
		$(CC) $(CFLAGS_C) $(CTEST_FLAGS) -DMF_FAULT_INJECTION -c -o $$o $$s; \
		[ "$$s" = csrc/core/common.c ] && continue; \
		bad=$$(nm -u $$o | awk '{print $$2}' | grep -xE '$(subst $() ,|,$(FAULT_FNS))' || true); \
		if [ -n "$$bad" ]; then echo "$$s calls $$bad directly (not through core/common.h)"; exit 1; fi; \
	done
	@touch $@

tests/c/build/test_faults: tests/c/test_faults.c tests/c/check.h $(FAULT_OBJ)/.built
	$(CC) $(CFLAGS_C) $(CTEST_FLAGS) -DMF_FAULT_INJECTION -o $@ $< $(FAULT_OBJ)/*.o -lpthread -lm -ldl

# The kernels of shaders/ run on the CPU by the executor of tests/c/sim (barriers,
# shuffles and threadgroup memory as on a GPU): the kernel source as host C++.
# The kernels' fmaf as one instruction where this CPU has it (x86-64 builds call the C
# library's otherwise: 2.6x slower overall); the same bits either way (one rounding,
# and -ffp-contract=off fuses nothing else). Threadgroups run on every CPU (mf_sim.cc).
SIM_FMA := $(shell grep -qw fma /proc/cpuinfo 2>/dev/null && echo -mfma)
SIM_FLAGS := -std=c++17 -O1 -g -Wall -Wextra -Werror -Wno-unknown-pragmas \
	-ffp-contract=off -DMF_SIM -Itests/c/sim $(SIM_FMA) -pthread
tests/c/build/test_kernel_sim: tests/c/test_kernel_sim.cc tests/c/sim/mf_sim.cc \
		tests/c/sim/mf_sim.h $(wildcard shaders/*.h shaders/*.def)
	@mkdir -p tests/c/build
	$(CXX) $(SIM_FLAGS) -o $@ tests/c/test_kernel_sim.cc tests/c/sim/mf_sim.cc

# The real CUDA backend on that executor: a stand-in driver and NVRTC
# (tests/c/sim/sim_cuda.cc, one device of compute capability 9.0 whose memory is host
# memory) loaded through MOEFLUX_LIBCUDA / MOEFLUX_LIBNVRTC, so test_backend_ops holds
# every CUDA op against the CPU backend, and the CUDA pytest files (SIM_PYTESTS) run
# whole models on it against the CPU, on a machine without a GPU (about 5 + 8 minutes
# on 2 cores: every shuffle is a coroutine switch per lane). Part of make test.
SIM_CUDA := tests/c/build/libmf_sim_cuda.so
$(SIM_CUDA): tests/c/sim/sim_cuda.cc tests/c/sim/mf_sim.cc tests/c/sim/mf_sim.h \
		csrc/backends/cuda/cuda_api.h $(wildcard shaders/*.h shaders/*.def)
	@mkdir -p tests/c/build
	$(CXX) $(SIM_FLAGS) -Icsrc -fPIC -shared -o $@ tests/c/sim/sim_cuda.cc tests/c/sim/mf_sim.cc

SIM_PYTESTS := tests/test_cuda.py tests/test_cuda_resident.py tests/test_cuda_state.py \
	tests/test_cuda_graphs.py
test-sim: tests/c/build/test_backend_ops $(SIM_CUDA) install
	@d=$$(mktemp -d) && \
	export MOEFLUX_LIBCUDA=$(CURDIR)/$(SIM_CUDA) MOEFLUX_LIBNVRTC=$(CURDIR)/$(SIM_CUDA) \
		MOEFLUX_CACHE_DIR=$$d && \
	MOEFLUX_OPS_NO_BENCH=1 MOEFLUX_OPS_PROGRESS=1 ./tests/c/build/test_backend_ops && \
	$(VENV)/bin/pytest -q $(SIM_PYTESTS); rc=$$?; rm -rf $$d; exit $$rc

# The Metal ops against the CUDA ops they mirror: both drivers' plain C with recorders
# in place of their launch layers, so only these sources are linked.
TWIN_SRC := csrc/backends/cuda/cuda_ops.c csrc/backends/metal/metal_ops.c \
	csrc/backends/backend.c csrc/core/common.c
tests/c/build/test_metal_twin: tests/c/test_metal_twin.c tests/c/check.h $(TWIN_SRC) \
		$(shell find csrc shaders -name '*.h' -o -name '*.def')
	@mkdir -p tests/c/build
	$(CC) $(CFLAGS_C) $(CTEST_FLAGS) -o $@ $< $(TWIN_SRC) -lm

# The CPU kernel sets this build contains and this CPU runs ("scalar,avx2,avx512"),
# from a probe built apart from the core (tools/kernel_sets.c). ctest and pytest pass
# it as MOEFLUX_REQUIRE_KERNELS (unless already set), so a run that skipped one of
# them fails instead of passing silently.
build/kernel_sets: tools/kernel_sets.c
	@mkdir -p build
	$(CC) -std=c11 -O1 -Wall -Wextra -Werror -o $@ $<
REQUIRE_KERNELS_ENV = MOEFLUX_REQUIRE_KERNELS="$${MOEFLUX_REQUIRE_KERNELS-$$(./build/kernel_sets)}"

ctest: $(CTESTS) build/kernel_sets
	@set -e; export $(REQUIRE_KERNELS_ENV); echo "kernel sets required: $$MOEFLUX_REQUIRE_KERNELS"; \
	for t in $(CTESTS); do echo "== $$t"; ./$$t; done; \
	echo "== test_backend_ops, the CPU in the GPU's place (the harness itself)"; \
	MOEFLUX_OPS_AGAINST=cpu ./tests/c/build/test_backend_ops

pytest: install build/kernel_sets
	export $(REQUIRE_KERNELS_ENV); $(VENV)/bin/pytest -q tests

test: ctest test-sim test-neon fuzz-smoke pytest

# The C kernel tests for aarch64 (the NEON set), cross-compiled and run under
# qemu-user: CI machines are x86-64, and NEON must not go untested there. The core is
# compiled once into build/aarch64/obj; qemu finds the aarch64 C library under
# AARCH64_SYSROOT (Debian's libc6-arm64-cross). tools/ensure_ci_deps.sh installs the
# cross tools (as root with apt-get) or fails saying what is missing: never a silent
# skip. NEON_TESTS: the kernel tests and the core's host-independent ones (seconds
# each under emulation; all but the CUDA ones).
AARCH64_CC      ?= aarch64-linux-gnu-gcc
AARCH64_SYSROOT ?= /usr/aarch64-linux-gnu
QEMU_AARCH64    ?= qemu-aarch64
NEON_TESTS      := test_cpu_matmul test_cpu_gptoss test_state test_config test_json test_model test_reader \
                   test_store test_cache
NEON_OBJS       := $(patsubst %.c,build/aarch64/obj/%.o,$(CORE_SRC))
NEON_RUN         = $(QEMU_AARCH64) -L $(AARCH64_SYSROOT)
.SECONDARY: $(NEON_OBJS)

build/aarch64/obj/%.o: %.c $(shell find csrc -name '*.h')
	@mkdir -p $(dir $@)
	$(AARCH64_CC) $(CFLAGS_C) -c -o $@ $<

build/aarch64/%: tests/c/%.c tests/c/check.h tests/c/kernsets.h $(NEON_OBJS)
	$(AARCH64_CC) $(CFLAGS_C) -o $@ $< $(NEON_OBJS) -lpthread -lm -ldl

neon-deps:
	@AARCH64_CC=$(AARCH64_CC) QEMU_AARCH64=$(QEMU_AARCH64) AARCH64_SYSROOT=$(AARCH64_SYSROOT) \
		tools/ensure_ci_deps.sh

# Then whole models of the four families under NEON against mlx-lm: pytest (on the
# host) runs tests/c/run_logits.c for aarch64 under qemu (tests/test_kernels.py
# test_forward_emulated), and fails unless the neon set was exercised.
test-neon: neon-deps install
	@$(MAKE) --no-print-directory $(addprefix build/aarch64/,$(NEON_TESTS) run_logits)
	@set -e; export MOEFLUX_REQUIRE_KERNELS=scalar,neon; \
	for t in $(NEON_TESTS); do echo "== qemu-aarch64 $$t"; \
		$(NEON_RUN) build/aarch64/$$t; done
	@echo "== qemu-aarch64 run_logits: whole models under neon against mlx-lm"
	MOEFLUX_RUN_LOGITS="$(NEON_RUN) build/aarch64/run_logits" MOEFLUX_RUN_LOGITS_SET=neon \
		MOEFLUX_REQUIRE_KERNELS=neon $(VENV)/bin/pytest -q -p no:cacheprovider \
		tests/test_kernels.py -k test_forward_emulated

# The C unit tests under AddressSanitizer and UBSan.
asan:
	$(MAKE) -B ctest CTEST_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"

# The whole pytest suite against a moeflux package whose extension is built with
# ASan + UBSan into build/asan-site (objects in build/asan-tmp: the editable install
# others use is left alone). Its Python files are links to the live sources, so the
# tests and the scripts they start never see two versions. PYTHONPATH puts it ahead
# of the editable finder; PYTHONSAFEPATH stops `python -m` and script runs (the CLI
# tests run with the repo as cwd) from putting the repo's own moeflux/ first.
# libasan must be the first library loaded, hence LD_PRELOAD (python itself is not
# instrumented). -fno-wrapv undoes the -fwrapv that Python's CFLAGS give extensions,
# which would hide signed overflow. Leak checks are off: CPython does not free
# everything at exit (`make asan` checks leaks of the core). allocator_may_return_null
# keeps libc's answer to an impossible size (NULL, which the code must handle).
# Every ASan report, from pytest or any subprocess a test starts (whose stderr a test
# may swallow), goes to build/asan-logs/ and fails the target. UBSan (gcc 12) ignores
# log_path: its reports go to stderr and end the process with status 1.
# PYTEST_ARGS narrows the run (default: tests).
ASAN_SITE   := $(CURDIR)/build/asan-site
ASAN_LOGS   := $(CURDIR)/build/asan-logs
PYTEST_ARGS ?= tests
ASAN_CFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
ASAN_ENV = PYTHONPATH=$(ASAN_SITE) PYTHONSAFEPATH=1 \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:log_path=$(ASAN_LOGS)/asan \
	UBSAN_OPTIONS=print_stacktrace=1

asan-pytest: venv
	rm -rf build/asan-site build/asan-tmp build/asan-logs
	mkdir -p build/asan-logs
	$(DIAG) CC="$(CC)" MOEFLUX_CFLAGS="$(ASAN_CFLAGS) -fno-wrapv -g -O1" MOEFLUX_LDFLAGS="$(ASAN_CFLAGS)" \
		$(PY) setup.py -q build_ext -b $(ASAN_SITE) -t build/asan-tmp
	ln -s $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(ASAN_SITE)/moeflux/
	ln -s $(CURDIR)/prep $(ASAN_SITE)/moeflux/prep
	env $(ASAN_ENV) $(PY) -c 'import moeflux._core as c, sys; print("sanitized core:", c.__file__); \
		sys.exit(0 if c.__file__.startswith("$(ASAN_SITE)/") and b"__asan_init" in open(c.__file__, "rb").read() else "not the sanitized build")'
	env $(ASAN_ENV) $(VENV)/bin/pytest -q $(PYTEST_ARGS); rc=$$?; \
	if ls build/asan-logs/* >/dev/null 2>&1; then \
		cat build/asan-logs/*; echo "sanitizer reports above (build/asan-logs/)"; exit 1; fi; \
	exit $$rc

# The debug-tap build of the extension (MF_TAP sites write to $$MOEFLUX_TAP_DIR) in
# build/tap-site, beside the normal editable install; tools/tap_diff.py uses it.
TAP_SITE := $(CURDIR)/build/tap-site
tap: venv
	rm -rf $(TAP_SITE) build/tap-tmp
	MOEFLUX_TAP=1 $(PY) setup.py -q build_ext -b $(TAP_SITE) -t build/tap-tmp
	ln -s $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(TAP_SITE)/moeflux/
	ln -s $(CURDIR)/prep $(TAP_SITE)/moeflux/prep

# The extension built with -DMF_FAULT_INJECTION in build/fault-site (Python files
# linked to the live sources, as for asan-pytest): tests/test_faults.py runs scripts
# against it that arm the hooks of core/common.h through ctypes. Rebuilt only when a
# C file changes; the test makes it itself when missing.
FAULT_SITE := $(CURDIR)/build/fault-site
fault-site: $(FAULT_SITE)/.built
$(FAULT_SITE)/.built: $(CORE_SRC) $(shell find csrc -name '*.[ch]') setup.py
	rm -rf $(FAULT_SITE) build/fault-tmp
	MOEFLUX_WERROR=1 MOEFLUX_CFLAGS=-DMF_FAULT_INJECTION $(PY) setup.py -q build_ext \
		-b $(FAULT_SITE) -t build/fault-tmp
	ln -s $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(FAULT_SITE)/moeflux/
	ln -s $(CURDIR)/prep $(FAULT_SITE)/moeflux/prep
	touch $@

# Coverage-guided fuzzing (tests/fuzz/README.md): one libFuzzer harness per input read
# from disk, built with clang -fsanitize=fuzzer,address,undefined against the core
# compiled once with the same sanitizers (build/fuzz/obj). fuzz-smoke runs each for
# FUZZ_SECONDS on a scratch corpus seeded from the committed one (never written to)
# and is part of `test` (before pytest, whose summary line stays the last one CI
# prints); without a working libFuzzer (tools/ensure_fuzz_deps.sh tries
# to install it) it falls back to fuzz-replay: the committed corpora through
# tests/fuzz/driver.c, built with $(CC) and ASan + UBSan. Crashing inputs land in
# build/fuzz/smoke/artifacts/.
# Speed (bench/RESULTS.md, fuzzing): -O2; no coverage in the hash loops of
# tests/fuzz/coverage_ignore.txt; and for the harnesses whose every input is parsed as
# whole-model JSON (config, manifest), json.c without comparison tracing (edges still
# counted): traced, its per-byte comparisons were half of their time. fuzz_json fuzzes
# json.c with comparison tracing.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 15
FUZZ_NAMES   := json config manifest layout snapshot
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	-fno-omit-frame-pointer
FUZZ_CFLAGS  := -std=c11 -g -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -Icsrc/include -Icsrc \
	-DFUZZ_MODELS_DIR='"$(CURDIR)/tests/fuzz/models"'
FUZZ_HDRS    := $(shell find csrc -name '*.h')
# -fsanitize-coverage-ignorelist: clang 13 or later (tested with Debian 12's clang 14).
FUZZ_COV     := -fsanitize-coverage-ignorelist=tests/fuzz/coverage_ignore.txt
FUZZ_OBJ     := $(patsubst %.c,build/fuzz/obj/%.o,$(CORE_SRC))
FUZZ_JSON_NOCMP := build/fuzz/obj-nocmp/csrc/core/json.o
FUZZ_OBJ_NOCMP  := $(filter-out build/fuzz/obj/csrc/core/json.o,$(FUZZ_OBJ)) $(FUZZ_JSON_NOCMP)
REPLAY_OBJ   := $(patsubst %.c,build/fuzz/replay-obj/%.o,$(CORE_SRC))
FUZZ_BINS    := $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_NAMES))
REPLAY_BINS  := $(patsubst %,build/fuzz/replay_%,$(FUZZ_NAMES))

# Objects are kept between builds (not make's intermediates, which it would delete).
.SECONDARY: $(FUZZ_OBJ) $(FUZZ_JSON_NOCMP) $(REPLAY_OBJ)

build/fuzz/obj/%.o: %.c $(FUZZ_HDRS) tests/fuzz/coverage_ignore.txt
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -fsanitize=fuzzer-no-link $(FUZZ_COV) -c -o $@ $<

build/fuzz/obj-nocmp/%.o: %.c $(FUZZ_HDRS) tests/fuzz/coverage_ignore.txt
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -fsanitize=fuzzer-no-link $(FUZZ_COV) \
		-fno-sanitize-coverage=trace-cmp -c -o $@ $<

# The core objects each harness links (config and manifest: json.c untraced).
FUZZ_LINK = $(FUZZ_OBJ)
build/fuzz/fuzz_config build/fuzz/fuzz_manifest: FUZZ_LINK = $(FUZZ_OBJ_NOCMP)
build/fuzz/fuzz_config build/fuzz/fuzz_manifest: $(FUZZ_JSON_NOCMP)

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_util.h $(FUZZ_OBJ) $(FUZZ_HDRS) \
		tests/fuzz/coverage_ignore.txt
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -fsanitize=fuzzer $(FUZZ_COV) -o $@ $< $(FUZZ_LINK) \
		-lpthread -lm -ldl

build/fuzz/replay-obj/%.o: %.c $(FUZZ_HDRS)
	@mkdir -p $(@D)
	$(CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -c -o $@ $<

build/fuzz/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_util.h tests/fuzz/driver.c \
		$(REPLAY_OBJ) $(FUZZ_HDRS)
	$(CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -o $@ $< tests/fuzz/driver.c $(REPLAY_OBJ) \
		-lpthread -lm -ldl

fuzz-build: $(FUZZ_BINS)
fuzz-replay-build: $(REPLAY_BINS)

fuzz-smoke: $(SHADERS_C)
	@if tools/ensure_fuzz_deps.sh; then \
		$(MAKE) --no-print-directory fuzz-build && \
		tests/fuzz/run.sh build/fuzz/smoke $(FUZZ_SECONDS) 1 $(FUZZ_NAMES); \
	else \
		echo "fuzz-smoke: no libFuzzer here, replaying the corpora through driver.c"; \
		$(MAKE) --no-print-directory fuzz-replay-c; \
	fi
	$(MAKE) --no-print-directory fuzz-py

# The C corpora through driver.c (no libFuzzer needed).
fuzz-replay-c: fuzz-replay-build
	@set -e; for n in $(FUZZ_NAMES); do ./build/fuzz/replay_$$n tests/fuzz/corpus/fuzz_$$n; done

fuzz-replay: fuzz-replay-c venv
	$(PY) tests/fuzz/fuzz_safetensors.py tests/fuzz/corpus/fuzz_safetensors

# prep's safetensors header parser under atheris (installed from PyPI into .venv on
# first use); where atheris cannot be had, its corpus is replayed instead.
fuzz-py: venv
	@if $(PY) -c 'import atheris' 2>/dev/null || $(PIP) install -q atheris; then \
		PY=$(PY) tests/fuzz/run.sh build/fuzz/smoke $(FUZZ_SECONDS) 1 safetensors; \
	else \
		echo "fuzz-py: atheris unavailable, replaying the safetensors corpus"; \
		$(PY) tests/fuzz/fuzz_safetensors.py tests/fuzz/corpus/fuzz_safetensors; \
	fi

clean:
	rm -rf build tests/c/build moeflux/*.so *.egg-info

# On a machine with an NVIDIA GPU (the CUDA test machine: no network, its own Python
# with numpy and pytest): build the GPU tests and the extension, run the C op tests
# (every op against the CPU backend), the NVRTC compile test and tests/test_cuda.py
# (whole models on CUDA against the CPU), meanwhile the op test's tensor-core products
# with the portable form of their mma step (MF_TC_EMU, what Metal runs), then
# print one line per step. The extension goes to build/cuda-site as asan-pytest does,
# so no pip or venv is needed. The tensor-core kernels (MOEFLUX_GPU_TC=1, not the
# default: slower at decode shapes) get the op test and CUDA_TC_PYTESTS of their own.
CUDA_PY   ?= python3
CUDA_SITE := $(CURDIR)/build/cuda-site
# The mlx-lm goldens (tests/test_cuda_golden.py) must have been made where mlx-lm is:
# `.venv/bin/python tests/make_cuda_goldens.py` writes .cache/cuda-goldens/, which the
# device call carries; here their absence fails instead of skipping.
CUDA_PYTESTS := tests/test_cuda.py tests/test_cuda_resident.py tests/test_cuda_golden.py \
                tests/test_cuda_state.py tests/test_cuda_graphs.py
# Run again with the tensor-core kernels on (MOEFLUX_GPU_TC=1) while they are not the
# default: the mlx-lm goldens, and resident against streamed bit for bit.
CUDA_TC_PYTESTS := tests/test_cuda_golden.py tests/test_cuda_resident.py

test-cuda: tests/c/build/test_cuda_nvrtc tests/c/build/test_backend_ops
	rm -rf build/cuda-site build/cuda-tmp
	MOEFLUX_WERROR=1 $(CUDA_PY) setup.py -q build_ext -b $(CUDA_SITE) -t build/cuda-tmp
	ln -s $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(CUDA_SITE)/moeflux/
	ln -s $(CURDIR)/prep $(CUDA_SITE)/moeflux/prep
	@status=""; fail=0; \
	rm -rf build/shaders-emu && cp -r shaders build/shaders-emu && \
	{ echo '#define MF_TC_EMU 1'; cat shaders/mf_prelude.h; } > build/shaders-emu/mf_prelude.h; \
	{ MOEFLUX_GPU_TC=1 MOEFLUX_SHADERS_DIR=build/shaders-emu MOEFLUX_OPS_TC_ONLY=1 \
		./tests/c/build/test_backend_ops > build/test_backend_ops_emu.log 2>&1; \
		echo $$? > build/test_backend_ops_emu.rc; } & \
	for t in test_cuda_nvrtc test_backend_ops test_backend_ops:tc; do \
		echo "== $$t"; env $$([ $${t#*:} = tc ] && echo MOEFLUX_GPU_TC=1) \
		./tests/c/build/$${t%:*} 2>&1 | tee build/$$t.log; rc=$${PIPESTATUS[0]}; \
		[ $$rc -eq 0 ] || fail=1; \
		status="$$status$$t: $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/$$t.log)\n"; \
	done; \
	echo "== pytest $(CUDA_PYTESTS)"; \
	PYTHONPATH=$(CUDA_SITE) PYTHONSAFEPATH=1 MOEFLUX_CUDA_GOLDENS_REQUIRED=1 \
		$(CUDA_PY) -m pytest -q -s -p no:cacheprovider \
		$(CUDA_PYTESTS) 2>&1 | tee build/pytest-cuda.log; rc=$${PIPESTATUS[0]}; \
	[ $$rc -eq 0 ] || fail=1; \
	status="$$status""pytest $(CUDA_PYTESTS): $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/pytest-cuda.log)\n"; \
	echo "== pytest $(CUDA_TC_PYTESTS) with MOEFLUX_GPU_TC=1"; \
	MOEFLUX_GPU_TC=1 PYTHONPATH=$(CUDA_SITE) PYTHONSAFEPATH=1 MOEFLUX_CUDA_GOLDENS_REQUIRED=1 \
		$(CUDA_PY) -m pytest -q -s -p no:cacheprovider \
		$(CUDA_TC_PYTESTS) 2>&1 | tee build/pytest-cuda-tc.log; rc=$${PIPESTATUS[0]}; \
	[ $$rc -eq 0 ] || fail=1; \
	status="$$status""pytest (MOEFLUX_GPU_TC=1) $(CUDA_TC_PYTESTS): $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/pytest-cuda-tc.log)\n"; \
	wait; echo "== test_backend_ops, tensor-core products with the portable step (MF_TC_EMU)"; \
	cat build/test_backend_ops_emu.log; rc=$$(cat build/test_backend_ops_emu.rc); \
	[ $$rc -eq 0 ] || fail=1; \
	status="$$status""test_backend_ops (MF_TC_EMU): $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/test_backend_ops_emu.log)\n"; \
	echo "== test-cuda summary"; printf '%b' "$$status"; exit $$fail

# On a Mac with Apple Silicon (macOS 13 or later, Xcode command line tools): the
# Metal host and twin tests, then the extension built with -Werror into build/metal-site (as
# test-cuda does) and tests/test_metal.py: the syntax checks, then whole models on
# Metal against the CPU backend in the pread and mmap expert modes; one line per step
# at the end. Elsewhere the whole-model tests skip ("no Metal device").
METAL_SITE := $(CURDIR)/build/metal-site

test-metal: venv tests/c/build/test_metal_host tests/c/build/test_metal_twin
	rm -rf build/metal-site build/metal-tmp
	MOEFLUX_WERROR=1 $(PY) setup.py -q build_ext -b $(METAL_SITE) -t build/metal-tmp
	ln -s $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(METAL_SITE)/moeflux/
	ln -s $(CURDIR)/prep $(METAL_SITE)/moeflux/prep
	@status=""; fail=0; \
	for t in test_metal_host test_metal_twin; do \
		echo "== $$t"; ./tests/c/build/$$t 2>&1 | tee build/$$t.log; rc=$${PIPESTATUS[0]}; \
		[ $$rc -eq 0 ] || fail=1; \
		status="$$status$$t: $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/$$t.log)\n"; \
	done; \
	echo "== pytest tests/test_metal.py"; \
	PYTHONPATH=$(METAL_SITE) PYTHONSAFEPATH=1 $(PY) -m pytest -q -s -p no:cacheprovider \
		tests/test_metal.py 2>&1 | tee build/pytest-metal.log; rc=$${PIPESTATUS[0]}; \
	[ $$rc -eq 0 ] || fail=1; \
	status="$$status""pytest tests/test_metal.py: $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/pytest-metal.log)\n"; \
	echo "== test-metal summary"; printf '%b' "$$status"; exit $$fail

# Resident decode / prefill on the GPU against the copy bandwidth of the same run
# (bench/bench_cuda.py; BENCH_CUDA_ARGS e.g. "--layers 12 --repeat 5", "--shape 35b
# --layers 40", "--shape 397b --layers 6", "--mode stream"). Builds the
# extension as test-cuda does (incrementally, after test-cuda).
BENCH_CUDA_ARGS ?=
bench-cuda:
	$(CUDA_PY) setup.py -q build_ext -b $(CUDA_SITE) -t build/cuda-tmp
	ln -sf $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(CUDA_SITE)/moeflux/
	ln -sfn $(CURDIR)/prep $(CUDA_SITE)/moeflux/prep
	PYTHONPATH=$(CUDA_SITE) PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 $(CUDA_PY) \
		bench/bench_cuda.py $(BENCH_CUDA_ARGS)
