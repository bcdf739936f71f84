# moeflux — the two set-up commands of the README live here:
#   make demo   build, create (once, cached) a synthetic model, convert it, generate
#   make test   build with -Werror, run the C unit tests and the whole pytest suite
# Both start from a clean clone: they create .venv and install what they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CC     ?= cc
CFLAGS_C := -std=c11 -O1 -g -Wall -Wextra -Werror -D_GNU_SOURCE -Icsrc/include -Icsrc
CORE_SRC := $(shell find csrc -name '*.c' -not -path 'csrc/python/*' | sort)
CTESTS   := $(patsubst tests/c/%.c,tests/c/build/%,$(wildcard tests/c/test_*.c))

.PHONY: all venv install demo test ctest pytest asan clean

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
tests/c/build/%: tests/c/%.c $(CORE_SRC) $(shell find csrc -name '*.h')
	@mkdir -p tests/c/build
	$(CC) $(CFLAGS_C) $(CTEST_FLAGS) -o $@ $< $(CORE_SRC) -lpthread -lm

ctest: $(CTESTS)
	@set -e; for t in $(CTESTS); do echo "== $$t"; ./$$t; done

pytest: install
	$(VENV)/bin/pytest -q tests

test: ctest pytest

# The C unit tests under AddressSanitizer and UBSan.
asan:
	$(MAKE) -B ctest CTEST_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"

clean:
	rm -rf build tests/c/build moeflux/*.so *.egg-info
