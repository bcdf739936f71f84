"""Helpers shared by the test files: converted synthetic model directories (made once
per session), the logits comparison with the mlx-lm oracle, and the checks that the
forward-pass tests of every architecture repeat (prefill and decode, long prompts,
failed evaluations).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from reference import reference_decode, reference_logits

# Every architecture moeflux targets. A test over them runs each one: it passes or
# fails (an UnsupportedError fails it), never skipped nor marked as expected to fail.
ARCHS = ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe", "glm4_moe",
         "minimax"]
# ARCHS and gpt_oss, whose checkpoint mlx-lm itself writes (tests/gptoss_synth.py): the
# CPU-only tests run these; the CUDA / Metal tests keep to ARCHS, and run gpt_oss from
# the checkpoint carried with the goldens (tests/test_cuda_golden.py).
CPU_ARCHS = [*ARCHS, "gpt_oss"]
HYBRID = {"qwen3_5_moe", "qwen3_next"}

# Logits agreement with mlx-lm: max |ours - ref| <= RTOL * max |ref| (the forward-pass
# tests use the same bound). RTOL is the acceptance bar of every backend; the CPU backend
# (f32 throughout, as the float32 reference) is held to the tighter regression tier
# RTOL_CPU: it agrees to ~1e-6..1e-5 of the largest logit, so a kernel change that costs
# more accuracy than float32 rounding shows up here long before it could move RTOL.
RTOL = 1e-3
RTOL_CPU = 5e-5

PROMPT = [17, 301, 5, 88, 450, 2, 199, 76, 333, 12, 401]
CONT = [64, 9, 270, 3, 140]


@pytest.fixture(scope="session")
def converted(synth_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """Factory: (arch, seed=0, **overrides) -> (checkpoint dir, moeflux model dir).

    The model dir is the checkpoint converted by moeflux.prep.convert, made once per
    session (never reused from an earlier session's MOEFLUX_SYNTH_CACHE: the
    conversion under test is always the current one).
    """
    done: dict[str, tuple[Path, Path]] = {}

    def make(arch: str, seed: int = 0, **overrides: Any) -> tuple[Path, Path]:
        from moeflux.prep.convert import convert

        ckpt = synth_checkpoint(arch, seed=seed, **overrides)
        if ckpt.name not in done:
            dst = tmp_path_factory.mktemp("model") / ckpt.name
            convert(ckpt, dst, progress=False)
            done[ckpt.name] = (ckpt, dst)
        return done[ckpt.name]

    return make


def open_model(path: Path, **kwargs: Any) -> Any:
    """moeflux.Model(path, **kwargs). Every architecture in ARCHS is supported, so any
    error (UnsupportedError included) fails the calling test: there is no escape into
    an expected failure."""
    import moeflux

    return moeflux.Model(path, **kwargs)


def _log_rel_err(what: str, rel: np.ndarray) -> None:
    """Appends the worst relative error of one comparison to $MOEFLUX_ERR_LOG when set
    (measuring the CPU tier's margin across a whole test run; off by default)."""
    path = os.environ.get("MOEFLUX_ERR_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{float(rel.max()):.3e}\t{test}\t{what}\n")


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str,
                 backend: str = "cpu") -> None:
    """The acceptance rule, row by row (one row per position): max |ours - ref| <=
    tol * max |ref| of that row, and the same argmax; tol is RTOL_CPU for the CPU
    backend (its regression tier), RTOL for any other."""
    ours = np.atleast_2d(ours)
    ref = np.atleast_2d(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite logits"
    tol = RTOL_CPU if backend == "cpu" else RTOL
    scale = np.abs(ref).max(axis=-1, keepdims=True).astype(np.float64)
    rel = (np.abs(ours.astype(np.float64) - ref) / np.where(scale > 0, scale, 1.0)
           ).max(axis=-1)
    _log_rel_err(what, rel)
    bad = np.nonzero(rel > tol)[0]
    assert bad.size == 0, (f"{what} ({backend} tier {tol:g}): positions {bad.tolist()} "
                           f"off by {rel[bad].tolist()} (relative); worst over all "
                           f"positions {float(rel.max()):.3e}")
    am_ours, am_ref = ours.argmax(-1), ref.argmax(-1)
    diff = np.nonzero(am_ours != am_ref)[0]
    assert diff.size == 0, (f"{what}: argmax differs at positions {diff.tolist()}: "
                            f"{am_ours[diff].tolist()} vs {am_ref[diff].tolist()}")


def continuation(n_vocab: int, n: int, seed: int = 7) -> list[int]:
    """``n`` pseudo-random token ids below ``n_vocab``, fixed by ``seed``."""
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


def run_in_threads(fn: Callable[[int], None], n: int) -> None:
    """Run fn(0) .. fn(n - 1) each in its own thread, all at once; an exception in any
    of them fails the calling test (exceptions are collected, not lost in a thread)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ==== Checks the forward-pass tests (test_hybrid, test_qwen3_moe, test_deepseek) share ====

# The forward-pass tests' prompt and decode length.
FWD_PROMPT = [1, 5, 77, 300, 12, 9, 411, 42, 8, 100, 250, 3]
N_DECODE = 32


def check_prefill_and_decode(model_dir: Path, arch: str,
                             oracle_logits: Callable[[list[int]], np.ndarray],
                             oracle_decode: Callable[[list[int], list[int]], np.ndarray]
                             ) -> None:
    """All-position prefill logits of FWD_PROMPT, then N_DECODE single-token decode
    steps, against ``oracle_logits(tokens)`` / ``oracle_decode(prompt, cont)``."""
    import moeflux

    with moeflux.Model(model_dir, threads=2) as m:
        assert m.arch == arch
        ours = m.eval(FWD_PROMPT, all_logits=True)
        assert_close(ours, oracle_logits(FWD_PROMPT), "prefill")
        cont = continuation(m.n_vocab, N_DECODE)
        ref = oracle_decode(FWD_PROMPT, cont)
        assert_close(ours[-1], ref[0], "prefill last row vs cached reference")
        rows = [m.eval([t]) for t in cont]
        assert_close(np.stack(rows), ref[1:], "decode")
        assert m.n_past == len(FWD_PROMPT) + N_DECODE


def eval_in_pieces(m: Any, tokens: list[int], cuts: list[int]) -> np.ndarray:
    """All-position logits of ``tokens`` fed to ``m`` in pieces split at ``cuts``."""
    bounds = [0, *cuts, len(tokens)]
    return np.concatenate([m.eval(tokens[a:b], all_logits=True)
                           for a, b in zip(bounds, bounds[1:])])


def check_prompt_in_pieces(ckpt: Path, model_dir: Path, cuts: list[int]) -> None:
    """FWD_PROMPT fed in pieces split at ``cuts`` gives every position's reference
    logits (a piece attends to the cache rows written by earlier calls)."""
    import moeflux

    ref = reference_logits(ckpt, FWD_PROMPT)
    with moeflux.Model(model_dir, threads=2) as m:
        pieces = eval_in_pieces(m, FWD_PROMPT, cuts)
    assert_close(pieces, ref, f"pieces at {cuts}")


def state_growth_of_7_tokens(model_dir: Path) -> int:
    """Bytes the sequence state grows by from position 4 to 11 of FWD_PROMPT."""
    import moeflux

    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(FWD_PROMPT[:4])
        s4 = m.state_size
        m.eval(FWD_PROMPT[4:11])
        return m.state_size - s4


def check_long_prompt(ckpt: Path, model_dir: Path) -> None:
    """A 150-token prompt (longer than the forward's 64-token scratch, so it runs in
    internal chunks) matches at every position, and so does decoding after it."""
    import moeflux

    prompt = continuation(512, 150, seed=3)
    with moeflux.Model(model_dir, threads=2) as m:
        ours = m.eval(prompt, all_logits=True)
        assert_close(ours, reference_logits(ckpt, prompt), "150-token prefill")
        cont = continuation(512, 4, seed=4)
        rows = [m.eval([t]) for t in cont]
    ref = reference_decode(ckpt, prompt, cont)
    assert_close(np.stack(rows), ref[1:], "decode after 150 tokens")


def check_reset_equals_fresh(ckpt: Path, model_dir: Path) -> None:
    """After 20 tokens and a reset, FWD_PROMPT gives the reference's logits."""
    import moeflux

    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(continuation(512, 20, seed=9))
        m.reset()
        assert m.n_past == 0
        ours = m.eval(FWD_PROMPT, all_logits=True)
    assert_close(ours, reference_logits(ckpt, FWD_PROMPT), "after reset")


def check_truncate_and_snapshot(ckpt: Path, model_dir: Path) -> None:
    """Truncating to 5 and continuing equals a sequence that only ever had those 5
    tokens; a snapshot taken after the truncate restores bit for bit."""
    import moeflux

    cont = continuation(512, 6, seed=5)
    ref = reference_decode(ckpt, FWD_PROMPT[:5], cont)
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(FWD_PROMPT)
        m.truncate(5)
        assert m.n_past == 5
        snap = m.save_state()
        rows = [m.eval([t]) for t in cont]
        assert_close(np.stack(rows), ref[1:], "decode after truncate")
        m.load_state(snap)
        again = [m.eval([t]) for t in cont]
    np.testing.assert_array_equal(np.stack(again), np.stack(rows))


def check_failed_eval_recovers(ckpt: Path, src_dir: Path, tmp_path: Path) -> None:
    """An expert read failing in the last layer (its file truncated after open, on a
    copy of ``src_dir``) raises after every earlier layer has run, twice in a row (a
    second failure must not compound); the position stays, and decoding continues
    exactly once the file is whole again. The last layer must be MoE."""
    import moeflux

    model_dir = tmp_path / "model"
    shutil.copytree(src_dir, model_dir)
    cont = continuation(512, 3, seed=11)
    ref = reference_decode(ckpt, FWD_PROMPT, cont)
    cfg = json.loads((model_dir / "config.json").read_text())
    n_layer = cfg.get("text_config", cfg)["num_hidden_layers"]
    victim = model_dir / "packed_experts" / f"layer_{n_layer - 1:02d}.bin"
    blob = victim.read_bytes()
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(FWD_PROMPT)
        with open(victim, "r+b") as f:   # same inode: the open descriptor sees it
            f.truncate(0)
        for tok in cont[:2]:
            with pytest.raises(OSError):
                m.eval([tok, cont[1]])
            assert m.n_past == len(FWD_PROMPT)
        with open(victim, "r+b") as f:
            f.write(blob)
        rows = [m.eval([t]) for t in cont]
    assert_close(np.stack(rows), ref[1:], "decode after failed evals")
