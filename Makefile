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
CORE_SRC := $(shell find csrc -name '*.c' -not -path 'csrc/python/*' | sort) $(SHADERS_C)
CTESTS   := $(patsubst tests/c/%.c,tests/c/build/%,$(wildcard tests/c/test_*.c))

.PHONY: all venv install demo test ctest pytest asan asan-pytest tap clean test-cuda bench-cuda

all: install

# Dependencies come from pyproject.toml's extras (one list, not two): install the
# package once with them, then `install` rebuilds only the extension.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	MOEFLUX_WERROR=1 $(PIP) install -q -e '.[test,prep,tokenizer]'
	touch $@

venv: $(VENV)/.deps

# Editable install: rebuilds moeflux._core from csrc/ every time (fast, a few files).
install: venv
	flock $(VENV)/.lock env MOEFLUX_WERROR=1 $(PIP) install -q --no-build-isolation --no-deps -e .

demo: install
	$(PY) -m moeflux demo

# C unit tests: each tests/c/test_*.c is its own program linked with the core (no
# Python), built with -Werror and run.
$(SHADERS_C): shaders/embed.py $(wildcard shaders/*.h shaders/*.def)
	$(PYTHON) shaders/embed.py $@

tests/c/build/%: tests/c/%.c tests/c/check.h $(CORE_SRC) $(shell find csrc -name '*.h')
	@mkdir -p tests/c/build
	$(CC) $(CFLAGS_C) $(CTEST_FLAGS) -o $@ $< $(CORE_SRC) -lpthread -lm -ldl

ctest: $(CTESTS)
	@set -e; for t in $(CTESTS); do echo "== $$t"; ./$$t; done

pytest: install
	$(VENV)/bin/pytest -q tests

test: ctest pytest

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
	CC="$(CC)" MOEFLUX_CFLAGS="$(ASAN_CFLAGS) -fno-wrapv -g -O1" MOEFLUX_LDFLAGS="$(ASAN_CFLAGS)" \
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

clean:
	rm -rf build tests/c/build moeflux/*.so *.egg-info

# On a machine with an NVIDIA GPU (the CUDA test machine: no network, its own Python
# with numpy and pytest): build the GPU tests and the extension, run the C op tests
# (every op against the CPU backend), the NVRTC compile test and tests/test_cuda.py
# (whole models on CUDA against the CPU), then print one line per step. The
# extension goes to build/cuda-site as asan-pytest does, so no pip or venv is needed.
CUDA_PY   ?= python3
CUDA_SITE := $(CURDIR)/build/cuda-site
# The mlx-lm goldens (tests/test_cuda_golden.py) must have been made where mlx-lm is:
# `.venv/bin/python tests/make_cuda_goldens.py` writes .cache/cuda-goldens/, which the
# device call carries; here their absence fails instead of skipping.
CUDA_PYTESTS := tests/test_cuda.py tests/test_cuda_resident.py tests/test_cuda_golden.py \
                tests/test_cuda_state.py

test-cuda: tests/c/build/test_cuda_nvrtc tests/c/build/test_backend_ops
	rm -rf build/cuda-site build/cuda-tmp
	MOEFLUX_WERROR=1 $(CUDA_PY) setup.py -q build_ext -b $(CUDA_SITE) -t build/cuda-tmp
	ln -s $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(CUDA_SITE)/moeflux/
	ln -s $(CURDIR)/prep $(CUDA_SITE)/moeflux/prep
	@status=""; fail=0; \
	for t in test_cuda_nvrtc test_backend_ops; do \
		echo "== $$t"; ./tests/c/build/$$t 2>&1 | tee build/$$t.log; rc=$${PIPESTATUS[0]}; \
		[ $$rc -eq 0 ] || fail=1; \
		status="$$status$$t: $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/$$t.log)\n"; \
	done; \
	echo "== pytest $(CUDA_PYTESTS)"; \
	PYTHONPATH=$(CUDA_SITE) PYTHONSAFEPATH=1 MOEFLUX_CUDA_GOLDENS_REQUIRED=1 \
		$(CUDA_PY) -m pytest -q -s -p no:cacheprovider \
		$(CUDA_PYTESTS) 2>&1 | tee build/pytest-cuda.log; rc=$${PIPESTATUS[0]}; \
	[ $$rc -eq 0 ] || fail=1; \
	status="$$status""pytest $(CUDA_PYTESTS): $$([ $$rc -eq 0 ] && echo PASS || echo FAIL) $$(tail -n 1 build/pytest-cuda.log)\n"; \
	echo "== test-cuda summary"; printf '%b' "$$status"; exit $$fail

# Resident decode / prefill on the GPU against the copy bandwidth of the same run
# (bench/bench_cuda.py; BENCH_CUDA_ARGS e.g. "--layers 12 --repeat 5"). Builds the
# extension as test-cuda does (incrementally, after test-cuda).
BENCH_CUDA_ARGS ?=
bench-cuda:
	$(CUDA_PY) setup.py -q build_ext -b $(CUDA_SITE) -t build/cuda-tmp
	ln -sf $(CURDIR)/moeflux/*.py $(CURDIR)/moeflux/py.typed $(CUDA_SITE)/moeflux/
	ln -sfn $(CURDIR)/prep $(CUDA_SITE)/moeflux/prep
	PYTHONPATH=$(CUDA_SITE) PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 $(CUDA_PY) \
		bench/bench_cuda.py $(BENCH_CUDA_ARGS)
