"""Text generation over a Model: prompt evaluation, the sampling loop, stop conditions
and streamed text pieces.

The loop is plain Python around ``Model.eval`` (which releases the GIL): one prompt
evaluation, then one token per step. Text comes from a StreamingDetokenizer, so a
piece never ends inside a character; stop strings are matched on that text and text
that could still turn into a stop string is held back until it cannot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import GenerationError, StateError
from .sampling import LogitsProcessor, Sampler, SamplerSettings
from .tokenizer import StreamingDetokenizer, TokenizerError

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

Prompt = Union[str, Sequence[int], np.ndarray]


@dataclass
class GenerationStep:
    """One generated token, as `Model.generate` yields it.

    Attributes:
        token: the token id.
        text: the text this step completes ("" while a character or a possible stop
            string is held back); the concatenation of all pieces is the output.
        finish_reason: None while generating; on the last step "stop" (end-of-sequence
            token or stop string), "length" (max_tokens or the context is full).
        n_prompt: tokens of the prompt (reused ones included).
        n_generated: tokens generated so far, this one included.
        prompt_tps: prompt tokens evaluated per second.
        generation_tps: generated tokens per second so far.
        logprob: natural log of the model's probability of `token` (the softmax of the
            raw logits, before penalties, processors, temperature and filters); None
            unless generate(logprobs=True) or top_logprobs > 0.
        top_logprobs: the `top_logprobs` most likely (id, logprob) pairs, most likely
            first; None unless asked for.
        n_reused: prompt tokens not evaluated again because the sequence already held
            them (the longest common prefix with the previous sequence).
    """

    token: int
    text: str
    finish_reason: Optional[str]
    n_prompt: int
    n_generated: int
    prompt_tps: float
    generation_tps: float
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    n_reused: int = 0


def _stop_list(stop: Union[None, str, Sequence[str]]) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        items = [stop]
    elif isinstance(stop, (list, tuple)):
        items = list(stop)
    else:
        raise GenerationError(f"stop must be a str, a list of str or None, got {stop!r}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise GenerationError(f"stop strings must be non-empty str, got {s!r}")
    return items


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def prompt_ids(model: "Model", prompt: Prompt, add_special_tokens: bool) -> list[int]:
    """The token ids of a prompt given as text or ids."""
    if isinstance(prompt, str):
        ids = model.tokenize(prompt, add_special_tokens=add_special_tokens)
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        arr = np.asarray(prompt)
        if arr.size and not (np.issubdtype(arr.dtype, np.integer) or
                             all(_is_int(t) for t in arr.reshape(-1).tolist())):
            raise GenerationError(f"prompt ids must be ints, got dtype {arr.dtype}")
        ids = [int(t) for t in arr.reshape(-1).tolist()]
    else:
        raise GenerationError(f"prompt must be text (str) or token ids (a list or an "
                              f"integer array), got {type(prompt).__name__}")
    if not ids:
        raise GenerationError("the prompt is empty: give at least one token")
    return ids


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _count_arg(name: str, value: object) -> int:
    if not _is_int(value) or int(value) < 0:  # type: ignore[call-overload]
        raise GenerationError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def reuse_prefix(model: "Model", ids: list[int]) -> int:
    """Bring `model`'s sequence to the longest prefix it shares with `ids` (leaving
    at least one token of `ids` to evaluate); return that prefix's length.

    Attention-only models truncate exactly anywhere. Hybrid models (linear attention)
    truncate exactly only at an eval end point whose checkpoint is held; when the
    engine refuses, the nearest earlier end point is tried, and last of all the
    sequence is reset (the prompt is then evaluated again in full).
    """
    held = model._tokens
    limit = min(len(held), len(ids) - 1)
    k = 0
    while k < limit and held[k] == ids[k] and held[k] >= 0:
        k += 1
    if k == len(held):
        return k
    for point in [k] + [e for e in reversed(model._ends) if e < k]:
        if point == 0:
            break
        try:
            model.truncate(point)
            return point
        except StateError:
            continue
    model.reset()
    return 0


def log_softmax(row: np.ndarray) -> np.ndarray:
    """log of the softmax of a logits row, in float64 (shifted by the max)."""
    z = row.astype(np.float64) - np.max(row)
    return z - np.log(np.exp(z).sum())


def stream_generate(model: "Model", prompt: Prompt, *, max_tokens: int = 256,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0,
                    seed: Optional[int] = None,
                    stop: Union[None, str, Sequence[str]] = None,
                    logits_processors: Sequence[LogitsProcessor] = (),
                    reset: bool = True,
                    add_special_tokens: bool = True, logprobs: bool = False,
                    top_logprobs: int = 0,
                    progress: Union[None, bool, Callable[[int, int], None]] = None
                    ) -> Iterator[GenerationStep]:
    """Generate from `model`, yielding one GenerationStep per token.

    Every argument is checked here, when generate() is called; the sequence is
    touched only once the first step is asked for.

    Args:
        model: the Model (its sequence state is used and advanced).
        prompt: text (tokenized with the model's tokenizer) or token ids.
        max_tokens: the most tokens to generate.
        temperature, top_k, top_p, min_p, repetition_penalty, seed: see
            SamplerSettings; temperature 0 is greedy argmax.
        stop: a string or strings that end generation (not included in the text).
        logits_processors: callables (ids, logits) -> logits applied before sampling.
        reset: the prompt is the whole sequence (default). The tokens the sequence
            already holds in common with it are kept (the longest common prefix; see
            reuse_prefix) and only the rest is evaluated. False appends the prompt to
            the current sequence (e.g. after load_state).
        add_special_tokens: passed to the tokenizer for a text prompt.
        logprobs: fill GenerationStep.logprob.
        top_logprobs: fill GenerationStep.top_logprobs with this many pairs.
        progress: progress(done, total) while the prompt is evaluated (Model.eval).

    Yields:
        GenerationStep per generated token; the last has finish_reason set. An
        end-of-sequence token ends it as a last step whose text is only what was
        held back (never the EOS token's own text). The last yielded token is not
        evaluated into the sequence (that would need one more forward pass).

    One generator per Model at a time: a later generate() on the same Model (or an
    eval, reset, truncate or load_state between steps) changes the sequence under
    an earlier generator, which then raises GenerationError when it resumes instead
    of continuing on the wrong state.

    Raises:
        GenerationError: empty or non-id prompt, bad max_tokens/stop, a prompt that
            does not fit the context, or a superseded generator.
        SamplingError: a sampling parameter out of range or of the wrong type.
        TokenizerError: text prompt or stop strings without a usable tokenizer.
    """
    max_tokens = _count_arg("max_tokens", max_tokens)
    top_logprobs = _count_arg("top_logprobs", top_logprobs)
    stops = _stop_list(stop)
    if isinstance(logits_processors, Callable):  # type: ignore[arg-type]
        logits_processors = (logits_processors,)  # type: ignore[assignment]
    sampler = Sampler(SamplerSettings(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
        processors=tuple(logits_processors)))
    ids = prompt_ids(model, prompt, add_special_tokens)
    base = 0 if reset else model.n_past
    if base + len(ids) > model.n_ctx:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens and the sequence already {base}; "
            f"the context holds {model.n_ctx}")
    try:
        detok = model.tokenizer.streaming()
    except TokenizerError:
        if stops:
            raise
        detok = None   # ids in, ids out: pieces are ""
    if detok is not None:
        detok.prime(ids)
    return _run(model, ids, sampler, stops, detok, max_tokens, reset,
                logprobs or top_logprobs > 0, top_logprobs, progress)


def _run(model: "Model", ids: list[int], sampler: Sampler, stops: list[str],
         detok: Optional[StreamingDetokenizer], max_tokens: int, reset: bool,
         want_lp: bool, top_n: int,
         progress: Union[None, bool, Callable[[int, int], None]]
         ) -> Iterator[GenerationStep]:
    """The generation loop of stream_generate (its arguments already checked)."""
    model._gen_epoch += 1
    epoch = model._gen_epoch
    reused = reuse_prefix(model, ids) if reset else 0
    if model.n_past + len(ids) - reused > model.n_ctx:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens and the sequence already "
            f"{model.n_past}; the context holds {model.n_ctx}")
    eos = model.eos_token_ids
    t0 = time.perf_counter()
    logits = model.eval(ids[reused:], progress=progress)
    t1 = time.perf_counter()
    prompt_tps = (len(ids) - reused) / max(t1 - t0, 1e-9)
    context = list(ids)
    pending = ""
    for n in range(1, max_tokens + 1):
        tok = sampler(logits, context)
        lp, top = _logprobs(logits, tok, top_n) if want_lp else (None, None)

        def step(text: str, finish: Optional[str]) -> GenerationStep:
            return GenerationStep(tok, text, finish, len(ids), n, prompt_tps,
                                  n / max(time.perf_counter() - t1, 1e-9), lp, top,
                                  reused)

        if tok in eos:
            tail = pending + (detok.flush() if detok else "")
            hit = [tail.index(s) for s in stops if s in tail]
            yield step(tail[:min(hit)] if hit else tail, "stop")
            return
        context.append(tok)
        piece = detok.add(tok) if detok else ""
        full = model.n_past >= model.n_ctx
        if n == max_tokens or full:
            piece += detok.flush() if detok else ""
        pending += piece
        finish = None
        hit = [pending.index(s) for s in stops if s in pending]
        if hit:
            text, finish = pending[:min(hit)], "stop"
        elif n == max_tokens or full:
            text, finish = pending, "length"
        else:
            keep = _held_suffix(pending, stops)
            text = pending[:len(pending) - keep]
        pending = pending[len(text):]
        expect = model.n_past
        yield step(text, finish)
        if finish:
            return
        if model._gen_epoch != epoch or model.n_past != expect:
            raise GenerationError(
                "this generator's sequence was changed by a later generate() (or eval, "
                "reset, truncate, load_state) on the same Model; start a new one")
        logits = model.eval([tok])


def _logprobs(logits: np.ndarray, tok: int, top_n: int
              ) -> tuple[float, Optional[list[tuple[int, float]]]]:
    """logprob of `tok` and the top_n (id, logprob) pairs of the raw logits."""
    lp = log_softmax(logits)
    top = None
    if top_n:
        n = min(top_n, lp.size)
        idx = np.argpartition(-lp, n - 1)[:n]
        idx = idx[np.lexsort((idx, -lp[idx]))]
        top = [(int(i), float(lp[i])) for i in idx]
    return float(lp[tok]), top


def generate(model: "Model", prompt: Prompt, **kwargs) -> str:
    """Generate and return the whole text (see stream_generate for the arguments)."""
    return "".join(step.text for step in stream_generate(model, prompt, **kwargs))
