"""checksums: the sha256 sums moeflux.json records for every file of a model directory.

Shared by ``python -m moeflux.prep verify`` (which lists every difference) and
``moeflux.Model(path, verify=True)`` (which refuses the first one before opening the
model). Standard library only, so opening a model never needs prep's dependencies.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

MANIFEST_NAME = "moeflux.json"
# Bytes hashed per read: large enough that a 100 GB model is not a million syscalls,
# small enough that a progress bar moves smoothly.
HASH_CHUNK = 8 << 20
EXPERT_DIRS = ("packed_experts", "packed_experts_2bit")

Progress = Callable[[int], None]


def sha256_file(path: Path, progress: Optional[Progress] = None) -> str:
    """Hex sha256 of ``path``; ``progress(n)`` after each chunk of n bytes."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def load_manifest(dst: Path) -> Any:
    """moeflux.json of ``dst`` as parsed JSON (OSError / ValueError as json raises)."""
    return json.loads((dst / MANIFEST_NAME).read_text())


def listed(info: Any) -> list[tuple[str, str]]:
    """(relative path, recorded "algo:hex") of every file moeflux.json lists, sorted.
    Empty when the manifest has no (or a malformed) "checksums" object."""
    sums = info.get("checksums") if isinstance(info, dict) else None
    if not isinstance(sums, dict):
        return []
    return sorted((str(k), str(v)) for k, v in sums.items())


def skip_other_experts(entries: list[tuple[str, str]], expert_dir: str
                       ) -> list[tuple[str, str]]:
    """``entries`` without the files of the expert directory not in use (a model
    directory may hold both 4-bit and 2-bit experts; only one set is read)."""
    others = [d for d in EXPERT_DIRS if d != expert_dir]
    return [(rel, want) for rel, want in entries
            if not any(rel.startswith(d + "/") for d in others)]


def check(dst: Path, entries: list[tuple[str, str]],
          progress: Optional[Progress] = None) -> Iterator[tuple[str, str, str]]:
    """Hash every listed file; yield (relative path, expected, actual) for each one
    that differs. ``actual`` is "missing" for a file that is not there and
    "unknown algorithm" for a sum that is not sha256."""
    for rel, want in entries:
        p = dst / rel
        algo, _, hexd = want.partition(":")
        if not p.is_file():
            yield rel, want, "missing"
            continue
        if algo != "sha256":
            yield rel, want, "unknown algorithm"
            continue
        got = sha256_file(p, progress)
        if got != hexd:
            yield rel, want, f"sha256:{got}"


def total_bytes(dst: Path, entries: list[tuple[str, str]]) -> int:
    """Bytes ``check`` will read (files that are there)."""
    n = 0
    for rel, _ in entries:
        p = dst / rel
        if p.is_file():
            n += p.stat().st_size
    return n
