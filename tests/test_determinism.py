"""Whole-forward determinism of the CPU backend, on all four families.

- Thread count: every output element of every op is computed by one task in a fixed
  order (row blocks of a matmul, one head of attention or of the delta rule, ...),
  so 1, 2, 3 and 8 threads give bitwise the same logits, prefill and decode.
- Expert I/O modes (where expert bytes come from) combined with thread counts: bitwise
  the same (test_io_modes.py covers each mode alone at 2 threads).
- Chunked vs one-shot prefill: a prompt longer than the forward's 64-token scratch runs
  layer-major in prefill groups of 512 tokens (the mixer in chunks of 64 inside a
  group, each MoE layer once over the group); fed by the caller in pieces cut at the
  group boundaries, every op sees the same token counts, so the logits are bitwise
  equal. Cut elsewhere, even at the 64-token chunk boundaries, they are not
  (measured: 6e-6..3e-5 absolute on these models): each expert of the MoE, and some
  matmuls, then see other token counts, and a matmul over
  quantized weights of at most 4 tokens (the kernel set's qdot_max_tok) dots rows
  straight from the codes where one of more tokens dequantizes tiles for a gemm, the
  two summing in another order; those runs are held to the CPU tier against mlx-lm.
- Snapshots: loaded into a context with other threads / I/O settings, the state is
  the same bytes and the continuation the same bits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import CPU_ARCHS, assert_close, continuation, converted  # noqa: F401
from reference import reference_logits

LONG = continuation(512, 150, seed=21)      # internal chunks of 64, 64, 22
GROUP = 512                                 # MF_PREFILL_GROUP_TOK (decoder.h)
LONGER = continuation(512, GROUP + 90, seed=23)   # two prefill groups
DECODE = continuation(512, 6, seed=22)


def _run(path: Path, pieces: list[int] | None = None, **kw: Any) -> np.ndarray:
    """All-position logits of LONG (in pieces cut at ``pieces``), then DECODE."""
    with moeflux.Model(path, n_ctx=256, **kw) as m:
        bounds = [0, *(pieces or []), len(LONG)]
        rows = [m.eval(LONG[a:b], all_logits=True) for a, b in zip(bounds, bounds[1:])]
        rows += [m.eval([t])[None] for t in DECODE]
    return np.concatenate(rows)


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_thread_counts_bitwise(arch: str,
                               converted: Callable[..., tuple[Path, Path]]) -> None:
    _, path = converted(arch)
    base = _run(path, threads=1)
    for threads in (2, 3, 8):
        got = _run(path, threads=threads)
        assert np.array_equal(got, base), (
            f"{arch}: {threads} threads differ from 1 by up to "
            f"{float(np.abs(got - base).max()):.3e}")


# (threads, Model kwargs): other I/O modes at other thread counts.
MIXED: list[tuple[int, dict[str, Any]]] = [
    (1, {"io_mode": "pread", "io_threads": 1}),
    (3, {"io_mode": "direct", "prefetch": True}),
    (2, {"io_mode": "mmap", "expert_cache_bytes": 64 << 20}),
    (8, {"io_mode": "pread", "expert_cache_bytes": 1 << 20, "prefetch": True}),
]


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_io_modes_at_thread_counts_bitwise(arch: str,
                                           converted: Callable[..., tuple[Path, Path]]
                                           ) -> None:
    _, path = converted(arch)
    base = _run(path, threads=2)
    for threads, kw in MIXED:
        got = _run(path, threads=threads, **kw)
        assert np.array_equal(got, base), f"{arch}: {threads} threads {kw} differ"


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_chunked_at_internal_boundaries_bitwise(arch: str,
                                                converted: Callable[..., tuple[Path, Path]]
                                                ) -> None:
    """A prompt of two prefill groups, fed in one call and in pieces cut at the group
    boundary: bitwise the same logits at every position."""
    _, path = converted(arch)
    runs = []
    for bounds in ([0, len(LONGER)], [0, GROUP, len(LONGER)]):
        with moeflux.Model(path, n_ctx=1024, threads=2) as m:
            runs.append(np.concatenate([m.eval(LONGER[a:b], all_logits=True)
                                        for a, b in zip(bounds, bounds[1:])]))
    base, got = runs
    assert np.array_equal(got, base), (
        f"{arch}: pieces at the prefill group boundary differ from one shot by up "
        f"to {float(np.abs(got - base).max()):.3e}")


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_chunked_elsewhere_within_tier(arch: str,
                                       converted: Callable[..., tuple[Path, Path]]
                                       ) -> None:
    """Other cuts (pieces of 3, 1 and 2 tokens: the row-dot kernel where one-shot
    used the gemm) agree with mlx-lm within the CPU tier at every position."""
    ckpt, path = converted(arch)
    got = _run(path, pieces=[3, 4, 6, 70], threads=2)
    assert_close(got[:len(LONG)], reference_logits(ckpt, LONG), f"{arch} cut prefill")
    got = _run(path, pieces=[64, 128], threads=2)   # the mixer's chunk boundaries
    assert_close(got[:len(LONG)], reference_logits(ckpt, LONG), f"{arch} cut prefill")


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_snapshot_survives_load_bytewise(arch: str,
                                         converted: Callable[..., tuple[Path, Path]]
                                         ) -> None:
    """A snapshot carries no thread count nor anything of the machine: loaded into a
    context with other threads and I/O settings, saving it again gives the same bytes,
    and the continuation is bitwise the one the saving context computes."""
    _, path = converted(arch)
    with moeflux.Model(path, n_ctx=256, threads=1) as a, \
            moeflux.Model(path, n_ctx=128, threads=3, io_mode="pread") as b:
        a.eval(LONG[:70])
        snap = a.save_state()
        b.eval(LONG[80:90])              # some other, stale state first
        b.load_state(snap)
        assert b.save_state() == snap
        want = [a.eval([t]) for t in DECODE]
        got = [b.eval([t]) for t in DECODE]
    assert np.array_equal(np.stack(got), np.stack(want))
