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
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import MoefluxError
from .sampling import LogitsProcessor, Sampler, SamplerSettings
from .tokenizer import TokenizerError

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

Prompt = Union[str, Sequence[int], np.ndarray]


class GenerationError(MoefluxError, ValueError):
    """A generation request that cannot be served (empty prompt, prompt too long)."""


@dataclass
class GenerationStep:
    """One generated token, as `Model.generate` yields it.

    Attributes:
        token: the token id.
        text: the text this step completes ("" while a character or a possible stop
            string is held back); the concatenation of all pieces is the output.
        finish_reason: None while generating; on the last step "stop" (end-of-sequence
            token or stop string), "length" (max_tokens or the context is full).
        n_prompt: tokens of the prompt evaluated by this call.
        n_generated: tokens generated so far, this one included.
        prompt_tps: prompt tokens per second.
        generation_tps: generated tokens per second so far.
    """

    token: int
    text: str
    finish_reason: Optional[str]
    n_prompt: int
    n_generated: int
    prompt_tps: float
    generation_tps: float


def _stop_list(stop: Union[None, str, Sequence[str]]) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
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
    else:
        ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
    if not ids:
        raise GenerationError("the prompt is empty: give at least one token")
    return ids


def stream_generate(model: "Model", prompt: Prompt, *, max_tokens: int = 256,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0,
                    seed: Optional[int] = None,
                    stop: Union[None, str, Sequence[str]] = None,
                    logits_processors: Sequence[LogitsProcessor] = (),
                    reset: bool = True,
                    add_special_tokens: bool = True) -> Iterator[GenerationStep]:
    """Generate from `model`, yielding one GenerationStep per token.

    Args:
        model: the Model (its sequence state is used and advanced).
        prompt: text (tokenized with the model's tokenizer) or token ids.
        max_tokens: the most tokens to generate.
        temperature, top_k, top_p, min_p, repetition_penalty, seed: see
            SamplerSettings; temperature 0 is greedy argmax.
        stop: a string or strings that end generation (not included in the text).
        logits_processors: callables (ids, logits) -> logits applied before sampling.
        reset: start from an empty sequence (default); False continues the model's
            current sequence, the prompt being appended to it.
        add_special_tokens: passed to the tokenizer for a text prompt.

    Yields:
        GenerationStep per generated token; the last has finish_reason set. An
        end-of-sequence token ends it as a last step whose text is only what was
        held back (never the EOS token's own text). The last yielded token is not
        evaluated into the sequence (that would need one more forward pass).

    Raises:
        GenerationError: empty prompt or one that does not fit the context.
        TokenizerError: text prompt or stop strings without a usable tokenizer.
    """
    if max_tokens < 0:
        raise GenerationError(f"max_tokens must be >= 0, got {max_tokens}")
    stops = _stop_list(stop)
    sampler = Sampler(SamplerSettings(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
        processors=tuple(logits_processors)))
    ids = prompt_ids(model, prompt, add_special_tokens)
    try:
        detok = model.tokenizer.streaming()
    except TokenizerError:
        if stops:
            raise
        detok = None   # ids in, ids out: pieces are ""
    if detok is not None:
        detok.prime(ids)
    if reset:
        model.reset()
    if model.n_past + len(ids) > model.n_ctx:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens and the sequence already {model.n_past}; "
            f"the context holds {model.n_ctx}")
    eos = model.eos_token_ids

    t0 = time.perf_counter()
    logits = model.eval(ids)
    t1 = time.perf_counter()
    prompt_tps = len(ids) / max(t1 - t0, 1e-9)
    context = list(ids)
    pending = ""
    for n in range(1, max_tokens + 1):
        tok = sampler(logits, context)
        if tok in eos:
            tail = pending + (detok.flush() if detok else "")
            hit = [tail.index(s) for s in stops if s in tail]
            yield GenerationStep(tok, tail[:min(hit)] if hit else tail, "stop", len(ids),
                                 n, prompt_tps, n / max(time.perf_counter() - t1, 1e-9))
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
        gen_tps = n / max(time.perf_counter() - t1, 1e-9)
        yield GenerationStep(tok, text, finish, len(ids), n, prompt_tps, gen_tps)
        if finish:
            return
        logits = model.eval([tok])


def generate(model: "Model", prompt: Prompt, **kwargs) -> str:
    """Generate and return the whole text (see stream_generate for the arguments)."""
    return "".join(step.text for step in stream_generate(model, prompt, **kwargs))
