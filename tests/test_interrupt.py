"""How a running eval polls for Ctrl-C (csrc/python/module.c, ctx_abort_cb).

Python runs signal handlers only on the main thread, so an eval on another thread
must never take the GIL to poll (that cost 0.55 -> 1.98 ms per token while another
Python thread was busy); on the main thread it polls at most every 50 ms. Ctrl-C
itself stopping an eval on the main thread is tests/test_api.py::test_ctrl_c and
tests/test_hybrid.py::test_aborted_eval_leaves_state_unchanged.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import moeflux
from _helpers import continuation, converted

__all__ = ["converted"]  # the fixture is used by name

POLL_S = 0.05   # MF_PY_POLL_S


def _long_eval(m: moeflux.Model, n_tok: int) -> float:
    """Seconds of one eval of n_tok tokens from an empty sequence."""
    m.reset()
    t0 = time.perf_counter()
    m.eval(continuation(m.n_vocab, n_tok, seed=3))
    return time.perf_counter() - t0


def test_eval_off_the_main_thread_never_polls(converted: Callable[..., tuple[Path, Path]]
                                               ) -> None:
    _, model_dir = converted("qwen3_next")
    with moeflux.Model(model_dir, threads=1) as m:
        spent: list[float] = []
        t = threading.Thread(target=lambda: spent.append(_long_eval(m, 200)))
        t.start()
        t.join()
        assert spent, "the eval thread failed"
        assert m._ctx._signal_polls == 0, "a non-main thread took the GIL to poll"


def test_eval_on_the_main_thread_polls_at_a_bounded_rate(
        converted: Callable[..., tuple[Path, Path]]) -> None:
    _, model_dir = converted("qwen3_next")
    with moeflux.Model(model_dir, threads=1) as m:
        n_tok, spent = 64, 0.0
        while spent < 4 * POLL_S and n_tok <= 4096:   # long enough to poll a few times
            n_tok *= 2
            before = m._ctx._signal_polls
            spent = _long_eval(m, min(n_tok, m.n_ctx))
        polls = m._ctx._signal_polls - before
        n_layer_calls = m.n_layer * -(-min(n_tok, m.n_ctx) // 64)
        assert polls >= 1, f"no poll in a {spent:.3f} s eval on the main thread"
        assert polls <= spent / POLL_S + 1 < n_layer_calls, \
            f"{polls} polls in {spent:.3f} s ({n_layer_calls} layer calls)"
