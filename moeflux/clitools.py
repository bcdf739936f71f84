"""What every command line of moeflux shares: expected failures end as one line on
stderr with a nonzero status, never a traceback (a bug still shows one); Ctrl-C ends
with status 130 (and says when a rerun resumes); a closed stdout pipe (``generate |
head``) ends quietly; progress bars come from ``tqdm.auto`` (widgets in Jupyter).
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Optional

from .errors import MoefluxError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what a tool killed by the signal reports


def one_line(exc: BaseException) -> str:
    """The message of an expected failure on one line: an OSError's "[Errno N]"
    prefix (doubled when one wraps another) dropped, newlines joined."""
    if isinstance(exc, OSError) and exc.strerror:
        text = str(exc.strerror)
        if exc.filename and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
    else:
        text = str(exc) or type(exc).__name__
    text = re.sub(r"(\[Errno \d+\]\s*)+", "", text)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _silence_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null so the interpreter's final
    flush does not print a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def run_cli(fn: Callable[[], Any], prog: str, resumable: bool = False) -> int:
    """Run a command body and turn its expected failures into an exit status."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"\n{prog}: interrupted{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (MoefluxError, OSError) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_ERROR


def progress_bar(total: int, desc: str, unit: str = "tok", enabled: bool = True,
                 **kwargs: Any) -> Optional[Any]:
    """A tqdm.auto bar (a widget in Jupyter, text on a terminal), or None when not
    wanted or tqdm is not installed (it is an optional dependency)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)


def eval_progress(desc: str = "prompt", enabled: bool = True
                  ) -> tuple[Optional[Callable[[int, int], None]], Callable[[], None]]:
    """A progress(done, total) callback for Model.eval / generate, and the function
    that closes its bar. The bar appears only for an evaluation long enough to be
    done in pieces (the first call then has done < total). (None, no-op) when
    disabled."""
    if not enabled:
        return None, lambda: None
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            if done >= total:
                return
            bars.append(progress_bar(total, desc, leave=False))
        if bars[0] is not None:
            bars[0].update(done - bars[0].n)

    def close() -> None:
        while bars:
            bar = bars.pop()
            if bar is not None:
                bar.close()

    return update, close
