"""Fault injection from Python.

Expert reads and allocations: against the extension built with -DMF_FAULT_INJECTION
(``make fault-site``, made here when missing), whose hooks (core/common.h) a script in
a subprocess arms through ctypes. A pread failing with EIO or ending early refuses the
eval with MoefluxIOError naming the layer file and offset, leaves n_past, tokens and
state unchanged, and the same eval with the hook off gives the logits of a fresh
model; short reads are completed; allocation N of Model() failing, for every N, gives
a MoefluxError (never a crash) on every architecture. The leak checks of the same
failures are in tests/c/test_faults.c (LeakSanitizer under ``make asan``).

The C fault test (tests/c/test_faults.c) also runs here on a converted model of every
architecture (it writes only a qwen3_moe model itself).

Snapshot files: ENOSPC and EIO while writing (injected into the os calls of the
writer) give an OSError naming the file; the old file is left whole, no temporary
file stays behind and the sequence is unchanged.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from moeflux import MoefluxIOError
from _helpers import CPU_ARCHS, CONT, PROMPT, converted  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "build" / "fault-site"

# Run in the fault build: arms the hooks through ctypes. argv: a JSON job.
SCRIPT = r"""
import ctypes, json, sys
import numpy as np
import moeflux
from moeflux import _core

lib = ctypes.CDLL(_core.__file__)
assert hasattr(lib, "mf_fault_io_arm"), "not the fault-injection build"
lib.mf_fault_io_arm.argtypes = [ctypes.c_int, ctypes.c_long]
lib.mf_fault_alloc_arm.argtypes = [ctypes.c_long]
lib.mf_fault_alloc_count.restype = ctypes.c_long
lib.mf_fault_io_count.restype = ctypes.c_long
SHORT, EIO, EOF = 1, 2, 3
job = json.loads(sys.argv[1])
out = {}


def fresh(path, toks_list, **kw):
    with moeflux.Model(path, threads=1, n_ctx=64, **kw) as m:
        return [m.eval(t) for t in toks_list]


def read_faults(path, mode):
    prompt, cont = job["prompt"], job["cont"]
    want = fresh(path, [prompt, cont[:1]], io_mode=mode)
    res = {"errors": []}
    with moeflux.Model(path, threads=1, n_ctx=64, io_mode=mode) as m:
        res["mode"] = m.stats()["io_mode"]
        lib.mf_fault_io_arm(SHORT, 0)
        got = m.eval(prompt)
        res["short_preads"] = lib.mf_fault_io_count()
        lib.mf_fault_io_arm(0, 0)
        res["short_equal"] = bool(np.array_equal(got, want[0]))
        for kind in (EIO, EOF):
            before = (m.n_past, list(m.tokens), m.save_state())
            lib.mf_fault_io_arm(kind, 0)
            try:
                m.eval(cont[:1])
                res["errors"].append(None)
            except moeflux.MoefluxIOError as exc:
                res["errors"].append(str(exc))
            finally:
                lib.mf_fault_io_arm(0, 0)
            res.setdefault("unchanged", []).append(
                before == (m.n_past, list(m.tokens), m.save_state()))
        res["retry_equal"] = bool(np.array_equal(m.eval(cont[:1]), want[1]))
    with moeflux.Model(path, threads=1, n_ctx=64, io_mode=mode) as m:
        lib.mf_fault_io_arm(EIO, 1)
        try:
            m.eval(prompt)
            res["prompt_error"] = None
        except moeflux.MoefluxIOError as exc:
            res["prompt_error"] = str(exc)
        finally:
            lib.mf_fault_io_arm(0, 0)
        res["prompt_n_past"] = m.n_past
        res["prompt_retry_equal"] = bool(np.array_equal(m.eval(prompt), want[0]))
    return res


def alloc_failures(path):
    refused, kinds, n = 0, set(), 1
    while True:
        lib.mf_fault_alloc_arm(n)
        try:
            m = moeflux.Model(path, threads=1, n_ctx=64, io_mode="pread")
        except moeflux.MoefluxError as exc:
            used = lib.mf_fault_alloc_count()
            lib.mf_fault_alloc_arm(0)
            assert used >= n and str(exc), (n, used, exc)
            refused += 1
            kinds.add(type(exc).__name__)
        else:
            used = lib.mf_fault_alloc_count()
            lib.mf_fault_alloc_arm(0)
            m.eval(job["prompt"])   # a tolerated failure must still work
            m.close()
            if used < n:
                return {"allocations": used, "refused": refused, "kinds": sorted(kinds)}
        n += 1


for path in job["paths"]:
    if job["what"] == "read":
        out[path] = {mode: read_faults(path, mode) for mode in ("pread", "direct")}
    else:
        out[path] = alloc_failures(path)
print(json.dumps(out))
"""


def _plain_env() -> dict[str, str]:
    """The environment without what `make asan-pytest` adds (a compiler or the C test
    would otherwise run with the sanitizer runtime preloaded)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONPATH",
                         "PYTHONSAFEPATH", "MOEFLUX_CFLAGS", "MOEFLUX_LDFLAGS",
                         "MOEFLUX_IO")}


def _make(target: str) -> None:
    r = subprocess.run(["make", "-s", "-C", str(REPO), target, f"PY={sys.executable}"],
                       capture_output=True, text=True, timeout=1200, env=_plain_env())
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="session")
def fault_site() -> Path:
    """build/fault-site, (re)built by make when missing or older than a C file."""
    _make("fault-site")
    return SITE


def test_c_fault_test_every_arch(converted: Callable[..., tuple[Path, Path]]) -> None:
    """tests/c/test_faults.c (every allocation of open, ctx creation, eval, snapshot
    save and load failing in turn; short, EIO and EOF expert reads) on a converted
    model of every architecture, which the C test cannot make itself. Built by make
    when missing; after `make asan` the binary is the sanitized one, and this runs it
    under LeakSanitizer."""
    _make("tests/c/build/test_faults")
    paths = {arch: str(converted(arch)[1]) for arch in CPU_ARCHS}
    env = dict(_plain_env(), MOEFLUX_FAULT_MODELS=":".join(paths.values()))
    r = subprocess.run([str(REPO / "tests" / "c" / "build" / "test_faults")], env=env,
                       capture_output=True, text=True, timeout=1200)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    for arch, path in paths.items():
        assert f"== {path} ({arch})" in r.stdout, f"{arch} was not tested"


def _run_job(site: Path, job: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONSAFEPATH="1")
    env.pop("MOEFLUX_IO", None)   # each job sets its io_mode
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(job)], env=env,
                       capture_output=True, text=True, timeout=900, cwd=str(site))
    assert r.returncode == 0, f"status {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_expert_read_faults(fault_site: Path,
                            converted: Callable[..., tuple[Path, Path]]) -> None:
    paths = [str(converted(arch)[1]) for arch in CPU_ARCHS]
    res = _run_job(fault_site, {"what": "read", "paths": paths, "prompt": PROMPT,
                                "cont": CONT})
    for path, modes in res.items():
        for mode, r in modes.items():
            what = f"{Path(path).name} {mode} (in effect: {r['mode']})"
            assert r["short_preads"] > 0, what
            assert r["short_equal"], f"{what}: short reads changed the logits"
            for msg, cause in zip(r["errors"], ["Input/output error",
                                                "unexpected end of file"]):
                assert msg is not None, f"{what}: a failing read was not reported"
                assert "packed_experts/layer_" in msg and "at offset" in msg \
                    and cause in msg, f"{what}: {msg}"
            assert all(r["unchanged"]), f"{what}: a refused eval changed the sequence"
            assert r["retry_equal"], f"{what}: after a refused eval the logits differ"
            assert r["prompt_error"] and "at offset" in r["prompt_error"], what
            assert r["prompt_n_past"] == 0, what
            assert r["prompt_retry_equal"], what


def test_allocation_failures_every_arch(fault_site: Path,
                                        converted: Callable[..., tuple[Path, Path]]
                                        ) -> None:
    paths = [str(converted(arch)[1]) for arch in CPU_ARCHS]
    res = _run_job(fault_site, {"what": "alloc", "paths": paths, "prompt": PROMPT})
    for path, r in res.items():
        print(f"{Path(path).name}: {r}")
        assert r["refused"] > 20, (path, r)
        assert set(r["kinds"]) <= {"MoefluxMemoryError", "BackendError"}, (path, r)


# ---- snapshot files


def _fail_fsync(code: int) -> Callable[[int], None]:
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))
    return fsync


class _FailingFile:
    """A file object whose write fails after half the data (a disk filling up)."""

    def __init__(self, f: Any, code: int) -> None:
        self._f, self._code = f, code

    def write(self, data: bytes) -> int:
        self._f.write(bytes(data[:len(data) // 2]))
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_FailingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_snapshot_write_faults(code: int, where: str, tmp_path: Path,
                               converted: Callable[..., tuple[Path, Path]],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflux import features

    _, dst = converted("qwen3_moe")
    target = tmp_path / "s.mflx"
    with moeflux.Model(dst, threads=1, n_ctx=64) as m:
        m.eval(PROMPT[:4])
        old = m.save_state(target)
        m.eval(PROMPT[4:])
        before = (m.n_past, m.save_state())
        with monkeypatch.context() as mp:
            if where == "fsync":
                mp.setattr(features.os, "fsync", _fail_fsync(code))
            else:
                real = features.os.fdopen
                mp.setattr(features.os, "fdopen",
                           lambda *a, **k: _FailingFile(real(*a, **k), code))
            with pytest.raises(OSError) as ei:
                m.save_state(target)
        assert ei.value.errno == code
        assert isinstance(ei.value, MoefluxIOError), type(ei.value)
        assert str(target) in str(ei.value) and os.strerror(code) in str(ei.value)
        assert target.read_bytes() == old, "the old snapshot was damaged"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mflx"], \
            "a temporary file was left behind"
        assert (m.n_past, m.save_state()) == before
        m.load_state(target)
        assert m.n_past == 4
