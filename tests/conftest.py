"""Shared pytest fixtures: synthetic checkpoints made once per session.

``synth_checkpoint(arch, **overrides)`` returns the directory of a tiny mlx-community
style checkpoint (moeflux.prep.synth.tiny_config + write_checkpoint), written once per
distinct (arch, overrides, seed) and reused by every test file of the session.
Set MOEFLUX_SYNTH_CACHE=/some/dir to keep them across sessions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

# Tests import the oracle harness as `reference` (tests/ is on sys.path via rootdir
# conftest insertion; made explicit for runs started from elsewhere).
sys.path.insert(0, str(Path(__file__).resolve().parent))


def synth_key(arch: str, seed: int, overrides: dict[str, Any]) -> str:
    """Stable directory name for one synthetic checkpoint request."""
    blob = json.dumps({"arch": arch, "seed": seed, "overrides": overrides},
                      sort_keys=True, default=repr)
    return f"{arch}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@pytest.fixture(scope="session")
def synth_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the session's synthetic checkpoints."""
    env = os.environ.get("MOEFLUX_SYNTH_CACHE")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_checkpoint(synth_cache_dir: Path) -> Callable[..., Path]:
    """Factory: ``synth_checkpoint(arch, seed=0, **overrides) -> Path``.

    ``overrides`` are tiny_config's (config keys and the pseudo-keys bits, group_size,
    gate_bits, gate_group_size, mla_form). The same request returns the same path.
    ``gpt_oss`` comes from tests/gptoss_synth.py (its MXFP4-Q8 layout; overrides are
    config keys), with a vocabulary of 512 unless overridden so that the shared
    prompts (_helpers.PROMPT, FWD_PROMPT) fit.
    """
    from moeflux.prep.synth import tiny_config, write_checkpoint

    def write(tmp: Path, arch: str, seed: int, overrides: dict[str, Any]) -> None:
        if arch == "gpt_oss":
            import gptoss_synth

            gptoss_synth.write_gptoss_checkpoint(tmp, seed=seed,
                                                 **{"vocab_size": 512, **overrides})
        else:
            write_checkpoint(tmp, tiny_config(arch, **overrides), seed=seed)

    def make(arch: str, seed: int = 0, **overrides: Any) -> Path:
        path = synth_cache_dir / synth_key(arch, seed, overrides)
        if (path / "config.json").exists():
            return path
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp, arch, seed, overrides)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    return make


@pytest.fixture
def sigint_raises_keyboardinterrupt():
    """Make SIGINT raise KeyboardInterrupt for the duration of a test.

    Python installs that handler only when SIGINT is not ignored at start-up, and a
    process launched in the background by a non-interactive shell (as a CI runner may
    do) inherits SIGINT ignored. Ctrl-C tests would then test nothing, so they set the
    interactive behaviour explicitly."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# ==== Kernel-set accounting (tests/_kernsets.py) ====

@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run when a kernel set named in $MOEFLUX_REQUIRE_KERNELS was not run."""
    import _kernsets

    _, problems = _kernsets.summary()
    if problems and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Prints the kernel sets this run exercised (and any requirement not met)."""
    import _kernsets

    line, problems = _kernsets.summary()
    terminalreporter.write_line(line)
    for p in problems:
        terminalreporter.write_line(f"FAILED: {p}", red=True)
