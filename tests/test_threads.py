"""Many contexts in one process, and interruption.

- Two Models of one directory (loaded twice) and a third sharing the first's weights
  (Model.share) run in three threads at once and give bit-identical logits to the same
  work run sequentially; their evaluations overlap in time, which they could not if
  eval held the GIL.
- Ctrl-C (SIGINT sent to the process from a timer thread) during a long prompt
  evaluation raises KeyboardInterrupt well before the evaluation would have ended,
  and leaves the Model usable: same position as before, and the next evaluation
  agrees with mlx-lm. Model.abort() from another thread does the same with
  AbortedError.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import moeflux
from _helpers import PROMPT, assert_close, converted, open_model, run_in_threads
from moeflux.errors import AbortedError
from reference import reference_logits

__all__ = ["converted"]

MAX_POS = 32768


def work(m: "moeflux.Model", seed: int, spans: list | None = None) -> list[np.ndarray]:
    """A prefill and a few decode steps from a seed-dependent prompt."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, m.n_vocab, size=24).astype(np.int32)
    out = []
    m.reset()
    for i in range(12):
        t0 = time.perf_counter()
        logits = m.eval(prompt if i == 0 else [int(out[-1].argmax())])
        if spans is not None:
            spans.append((t0, time.perf_counter()))
        out.append(logits)
    return out


def test_contexts_in_threads(converted) -> None:
    src, dst = converted("qwen3_5_moe")
    models = [open_model(dst, threads=1), open_model(dst, threads=1)]
    models.append(moeflux.Model.share(models[0], threads=1))
    try:
        want = [work(m, seed) for seed, m in enumerate(models)]
        for _ in range(2):
            got: list = [None] * 3
            spans: list = [[] for _ in range(3)]

            def run(i: int) -> None:
                got[i] = work(models[i], i, spans[i])

            run_in_threads(run, 3)
            for i in range(3):
                for a, b in zip(got[i], want[i]):
                    assert np.array_equal(a, b), f"context {i} differs from sequential"
            overlap = any(a0 < b1 and b0 < a1
                          for a0, a1 in spans[0] for b0, b1 in spans[1] + spans[2])
            if overlap:
                break
        assert overlap, "evaluations of different contexts never overlapped"
    finally:
        for m in models:
            m.close()


@pytest.fixture(scope="module")
def long_model(converted):
    """A Model whose long prompt takes ~2 s to evaluate on this machine (sized from a
    timed 512-token prompt, within a 32k context), so an interruption at 10 % of it
    is clearly early whatever the machine's speed."""
    src, dst = converted("qwen3_5_moe", max_position_embeddings=MAX_POS)
    m = open_model(dst, threads=1, n_ctx=MAX_POS)
    rng = np.random.default_rng(3)
    t0 = time.perf_counter()
    m.eval(rng.integers(0, m.n_vocab, 512).astype(np.int32))
    per_512 = time.perf_counter() - t0
    n_long = int(min(MAX_POS - 64, max(1024, 512 * 2.0 / per_512)))
    long_prompt = rng.integers(0, m.n_vocab, n_long).astype(np.int32)
    m.reset()
    t0 = time.perf_counter()
    m.eval(long_prompt)
    full_s = time.perf_counter() - t0
    m.reset()
    yield src, m, long_prompt, full_s
    m.close()


def _interrupted_eval_leaves_model_usable(src, m, long_prompt, full_s, fire, exc_type):
    m.reset()
    m.eval(PROMPT[:3])
    before = m.save_state()
    timer = threading.Timer(0.1 * full_s, fire)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(exc_type):
            m.eval(long_prompt)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.6 * full_s, (
        f"stopped after {elapsed:.2f} s; the whole evaluation takes {full_s:.2f} s")
    assert m.n_past == 3
    assert m.save_state() == before
    got = m.eval(PROMPT[3:], all_logits=True)
    assert_close(got, reference_logits(src, PROMPT)[3:], "after an interrupted eval")


def test_ctrl_c_during_prompt_eval(long_model, sigint_raises_keyboardinterrupt) -> None:
    src, m, long_prompt, full_s = long_model
    assert full_s > 0.5, f"the long prompt takes only {full_s:.2f} s: not a test"
    pid = os.getpid()
    _interrupted_eval_leaves_model_usable(
        src, m, long_prompt, full_s, lambda: os.kill(pid, signal.SIGINT),
        KeyboardInterrupt)


def test_abort_from_another_thread(long_model) -> None:
    src, m, long_prompt, full_s = long_model
    _interrupted_eval_leaves_model_usable(src, m, long_prompt, full_s, m.abort,
                                          AbortedError)
