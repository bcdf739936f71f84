"""os.fork() while another thread is inside eval (issue 12 item 2).

In the child, the Model opened in the parent must not hang on any use (its lock may
be held by a thread that does not exist there, its worker threads are gone): every
use raises MoefluxError saying to open it again, and opening it again works. Run in
a subprocess with a timeout, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _helpers import converted

__all__ = ["converted"]

CHILD = textwrap.dedent("""
    import os, sys, threading, time
    import moeflux

    path = sys.argv[1]
    m = moeflux.Model(path, threads=2)
    inside = threading.Event()
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            inside.set()
            m.eval([i % 500 for i in range(1, 1500)])   # long: ~0.1 s or more
            m.reset()

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    inside.wait()
    time.sleep(0.05)          # well inside an eval by now (each takes longer)
    pid = os.fork()
    if pid == 0:
        code = 0
        for what, use in [("n_past", lambda: m.n_past), ("eval", lambda: m.eval([1])),
                          ("reset", m.reset), ("tokens", lambda: m.tokens),
                          ("generate", lambda: next(m.generate([1, 2], max_tokens=1)))]:
            try:
                use()
                print(f"child: {what} did not raise", flush=True)
                code = 1
            except moeflux.MoefluxError as exc:
                if "fork" not in str(exc):
                    print(f"child: {what}: {exc}", flush=True)
                    code = 1
        m.close()             # must not hang either
        with moeflux.Model(path, threads=1) as again:
            again.eval([1, 2, 3])
        print("child ok", flush=True)
        del m             # and the interpreter exit frees nothing of the parent's
        sys.exit(code)
    _, status = os.waitpid(pid, 0)
    stop.set()
    t.join()
    print("parent n_past", m.n_past, flush=True)
    m.close()
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_fork_during_eval_does_not_hang(converted) -> None:
    src, dst = converted("qwen3_5_moe")
    r = subprocess.run([sys.executable, "-c", CHILD, str(dst)], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child ok" in r.stdout and "parent n_past" in r.stdout
