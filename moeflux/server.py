"""``python -m moeflux serve --model DIR``: an OpenAI-compatible HTTP server.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as
server-sent events with ``"stream": true``), ``GET /v1/models``, and
``GET /moeflux/status`` (counters, for operators and tests). Built on FastAPI and
uvicorn, the optional extra ``moeflux[server]``.

Concurrency: one Model context per running request, up to ``--contexts``; the extra
contexts share the loaded weights (``Model.share``). Requests beyond that wait in
line. A request picks the free context whose sequence shares the longest prefix with
its prompt, and ``generate`` keeps that prefix, so the next turn of a conversation
evaluates only its new tokens (reported as ``usage.prompt_tokens_details.
cached_tokens``). Generation runs in a worker thread (eval releases the GIL); a client
that disconnects has its request stopped: between tokens, or inside a long prompt
evaluation through ``Model.abort``.
"""


import argparse
import asyncio
import collections
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from .errors import (AbortedError, ArgumentError, GenerationError, MoefluxError,
                     SamplingError, TokenizerError)

# OpenAI's bounds: at most 4 stop sequences, 20 top logprobs (5 for completions).
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_TOP_LOGPROBS_COMPLETIONS = 5


class RequestError(MoefluxError, ValueError):
    """A request the server refuses (HTTP 400); the message says which field."""


# ==== the pool of contexts ====

class ContextPool:
    """Up to `size` Models over one loaded model; acquire() waits for a free one."""

    def __init__(self, first: Any, size: int, threads: Optional[int],
                 n_ctx: Optional[int]) -> None:
        self.first = first
        self.size = size
        self._threads, self._n_ctx = threads, n_ctx
        self._free: list[Any] = [first]
        self._opened = 1
        self._sem = asyncio.Semaphore(size)
        self.waiting = 0
        self.peak_waiting = 0

    async def acquire(self, ids: list[int]) -> Any:
        """A free Model, the one holding the longest prefix of `ids` (a new one is
        opened when none shares any and fewer than `size` exist)."""
        if self._sem.locked():   # every context busy: this request waits in line
            self.waiting += 1
            self.peak_waiting = max(self.peak_waiting, self.waiting)
            try:
                await self._sem.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()
        best, best_n = None, -1
        for m in self._free:
            n = _common_prefix(m._tokens, ids)
            if n > best_n:
                best, best_n = m, n
        if (best is None or best_n == 0) and self._opened < self.size:
            from .model import Model
            self._opened += 1
            try:
                return await asyncio.to_thread(Model.share, self.first, self._threads,
                                               self._n_ctx)
            except BaseException:
                self._opened -= 1
                self._sem.release()
                raise
        self._free.remove(best)
        return best

    def release(self, model: Any) -> None:
        self._free.append(model)
        self._sem.release()

    @property
    def opened(self) -> int:
        return self._opened


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or x < 0:
            break
        n += 1
    return n


# ==== one request ====

@dataclass
class Job:
    """One generation: its arguments, its worker thread's events and its fate."""

    ids: list[int]
    kwargs: dict[str, Any]
    top_n: int
    want_lp: bool
    loop: asyncio.AbstractEventLoop
    events: "asyncio.Queue[Any]" = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    model: Any = None
    reason: Optional[str] = None
    generated: int = 0
    outcome: str = "error"  # the worker's view: "done" once it ran to the end
    on_end: Any = None      # called on the loop once the worker thread is done

    def stop(self) -> None:
        """Stop the worker: between tokens, or inside an eval (Model.abort)."""
        if not self.cancel.is_set():
            self.cancel.set()
            if self.model is not None:
                self.model.abort()

    def _post(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def run(self) -> None:
        """Worker thread body: every step, then None (or the exception) as the end."""
        try:
            if self.cancel.is_set():
                raise AbortedError("cancelled before it started")
            gen = self.model.generate(self.ids, logprobs=self.want_lp,
                                      top_logprobs=self.top_n, **self.kwargs)
            for step in gen:
                self.generated = step.n_generated
                self._post(step)
                if self.cancel.is_set():
                    gen.close()
                    break
            self.outcome = "cancelled" if self.cancel.is_set() else "done"
            self._post(None)
        except BaseException as exc:  # delivered to the request, never lost
            self._post(exc)
        finally:
            if self.on_end is not None:
                self.loop.call_soon_threadsafe(self.on_end)


class Server:
    """The server's state: the pool, the model's name and tokenizer, counters."""

    def __init__(self, pool: ContextPool, name: str) -> None:
        self.pool = pool
        self.name = name
        self.created = int(time.time())
        self.counts = collections.Counter()
        self.finished: collections.deque = collections.deque(maxlen=32)
        self.active = 0

    @property
    def tokenizer(self) -> Any:
        return self.pool.first.tokenizer

    def status(self) -> dict[str, Any]:
        return {"model": self.name, "contexts": self.pool.size,
                "contexts_open": self.pool.opened, "active": self.active,
                "waiting": self.pool.waiting, "peak_waiting": self.pool.peak_waiting,
                **dict(self.counts), "finished": list(self.finished)}

    async def steps(self, job: Job, disconnected: Any) -> AsyncIterator[Any]:
        """Run `job` on a context and yield its GenerationSteps. The job is stopped
        when the consumer goes away (this generator closed or cancelled) or when
        `disconnected()` says the client left. The context goes back to the pool
        when the worker thread has ended, whatever happened here (no await is
        needed in the cleanup, which a cancelled task could not do)."""
        self.counts["requests"] += 1
        model = await self.pool.acquire(job.ids)
        job.model = model
        self.active += 1

        def ended() -> None:
            self.active -= 1
            reason = "cancelled" if job.reason == "cancelled" else job.outcome
            self.finished.append({"reason": reason, "generated": job.generated,
                                  "prompt_tokens": len(job.ids)})
            self.pool.release(model)

        job.on_end = ended
        threading.Thread(target=job.run, name="moeflux-request", daemon=True).start()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), 0.25)
                except asyncio.TimeoutError:
                    if await disconnected():
                        return
                    continue
                if item is None:
                    job.reason = "done"
                    return
                if isinstance(item, BaseException):
                    job.reason = "error"
                    raise item
                yield item
        finally:
            if job.reason is None:
                job.reason = "cancelled"
                self.counts["cancelled"] += 1
                job.stop()


# ==== request parsing ====

def _field(body: dict, name: str, kinds: tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise RequestError(f"'{name}' must be {kinds[0].__name__}, got {value!r}")
    if not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {kinds[0].__name__}, got {value!r}")
    return value


def sampling_of(body: dict, n_ctx: int, n_prompt: int) -> dict[str, Any]:
    """generate() keyword arguments from an OpenAI request body."""
    if _field(body, "n", (int,), 1) != 1:
        raise RequestError("'n' must be 1: one choice per request")
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), None)
    room = max(0, n_ctx - n_prompt)
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP or
                             not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} "
                           "non-empty strings")
    return dict(max_tokens=max_tokens,
                temperature=float(_field(body, "temperature", (int, float), 1.0)),
                top_p=float(_field(body, "top_p", (int, float), 1.0)),
                seed=_field(body, "seed", (int,), None), stop=stop or None)


def _message_text(content: Any) -> str:
    """A message's content: a string or a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise RequestError("only text message content is supported")
            parts.append(str(p.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise RequestError(f"message content must be text, got {type(content).__name__}")


def chat_prompt(server: Server, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    msgs = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role' and a 'content'")
        role = "system" if m["role"] == "developer" else m["role"]
        msgs.append({"role": role, "content": _message_text(m.get("content"))})
    return server.pool.first.apply_chat_template(msgs, add_generation_prompt=True,
                                                 tokenize=True)


def completion_prompt(server: Server, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return server.pool.first.tokenize(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise RequestError("'prompt' must be a string, a list of one string or a list of "
                       "token ids (one prompt per request)")


# ==== responses ====

def _token_text(server: Server, tok: int) -> str:
    return server.tokenizer.decode([tok])


def _lp_entry(server: Server, tok: int, lp: float) -> dict[str, Any]:
    text = _token_text(server, tok)
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(server: Server, step: Any) -> dict[str, Any]:
    entry = _lp_entry(server, step.token, step.logprob)
    entry["top_logprobs"] = [_lp_entry(server, t, v) for t, v in step.top_logprobs or []]
    return entry


def _by_text(top: list[dict]) -> dict[str, float]:
    """Top logprobs keyed by token text (the completions format): when two ids have
    the same text, the more likely one's value is kept."""
    out: dict[str, float] = {}
    for t in top:
        out.setdefault(t["token"], t["logprob"])
    return out


def usage_of(n_prompt: int, n_gen: int, reused: int) -> dict[str, Any]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
            "total_tokens": n_prompt + n_gen,
            "prompt_tokens_details": {"cached_tokens": reused}}


class Reply:
    """Accumulates the steps of one request into OpenAI response objects."""

    def __init__(self, server: Server, chat: bool, n_prompt: int) -> None:
        self.server, self.chat, self.n_prompt = server, chat, n_prompt
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text: list[str] = []
        self.lps: list[Any] = []
        self.n_gen = 0
        self.reused = 0
        self.finish: Optional[str] = None

    def add(self, step: Any, want_lp: bool) -> Optional[Any]:
        """Take a step; its logprobs entry when asked for."""
        self.text.append(step.text)
        self.n_gen = step.n_generated
        self.reused = step.n_reused
        self.finish = step.finish_reason or self.finish
        if not want_lp:
            return None
        entry = chat_logprobs(self.server, step)
        self.lps.append(entry)
        return entry

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.server.name}

    def usage(self) -> dict[str, Any]:
        return usage_of(self.n_prompt, self.n_gen, self.reused)

    def completion_logprobs(self, entries: list[Any]) -> dict[str, Any]:
        offsets, pos = [], 0
        for e in entries:
            offsets.append(pos)
            pos += len(e["token"])
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [_by_text(e["top_logprobs"]) for e in entries],
                "text_offset": offsets}

    def full(self, want_lp: bool) -> dict[str, Any]:
        text = "".join(self.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": {"content": self.lps} if want_lp else None,
                      "finish_reason": self.finish or "length"}
            return {**self.head("chat.completion"), "choices": [choice],
                    "usage": self.usage()}
        choice = {"index": 0, "text": text,
                  "logprobs": self.completion_logprobs(self.lps) if want_lp else None,
                  "finish_reason": self.finish or "length"}
        return {**self.head("text_completion"), "choices": [choice],
                "usage": self.usage()}

    def chunk(self, text: Optional[str], entry: Optional[Any], finish: Optional[str],
              want_lp: bool, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": [entry]} if want_lp and entry else None}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish,
                  "logprobs": self.completion_logprobs([entry])
                  if want_lp and entry else None}
        return {**self.head("text_completion"), "choices": [choice]}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ==== the app ====

def create_app(model_dir: str, *, contexts: int = 1, threads: Optional[int] = None,
               n_ctx: Optional[int] = None, use_2bit: Optional[bool] = None,
               name: Optional[str] = None) -> Any:
    """The FastAPI app serving `model_dir` (opened now: errors surface here)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError as exc:
        raise MoefluxError("the server needs FastAPI and uvicorn: "
                           "pip install 'moeflux[server]'") from exc
    from .model import Model

    if not isinstance(contexts, int) or contexts < 1:
        raise ArgumentError(f"contexts must be >= 1, got {contexts!r}")
    first = Model(model_dir, threads=threads, n_ctx=n_ctx, use_2bit=use_2bit)
    first.tokenizer   # noqa: B018 - fail now, not at the first request
    app = FastAPI(title="moeflux", version="1")
    # asyncio objects bind to the running loop at first use, so this is made here.
    state = {"server": Server(ContextPool(first, contexts, threads, n_ctx),
                              name or Path(model_dir).resolve().name)}

    def error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                       "code": None}}, status_code=status)

    @app.get("/v1/models")
    async def models() -> Any:
        s = state["server"]
        return {"object": "list", "data": [{"id": s.name, "object": "model",
                                            "created": s.created,
                                            "owned_by": "moeflux"}]}

    @app.get("/moeflux/status")
    async def status() -> Any:
        return state["server"].status()

    async def handle(request: Request, chat: bool) -> Any:
        s = state["server"]
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        try:
            return await _serve(s, request, body, chat, StreamingResponse)
        except (RequestError, ArgumentError, GenerationError, SamplingError,
                TokenizerError) as exc:
            return error(400, str(exc))
        except MoefluxError as exc:
            return error(500, str(exc), "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, False)

    return app


def _lp_request(body: dict, chat: bool) -> tuple[bool, int]:
    """(logprobs wanted, top count) of a request."""
    if chat:
        want = bool(_field(body, "logprobs", (bool,), False))
        top = _field(body, "top_logprobs", (int,), 0)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]")
        if top and not want:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
        return want, top
    lp = _field(body, "logprobs", (int,), None)
    if lp is None:
        return False, 0
    if not 0 <= lp <= MAX_TOP_LOGPROBS_COMPLETIONS:
        raise RequestError(f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS_COMPLETIONS}]")
    return True, lp


async def _serve(s: Server, request: Any, body: dict, chat: bool,
                 streaming_response: Any) -> Any:
    if body.get("echo"):
        raise RequestError("'echo' is not supported")
    ids = await asyncio.to_thread(chat_prompt if chat else completion_prompt, s, body)
    n_ctx = s.pool.first.n_ctx
    if len(ids) >= n_ctx:
        raise RequestError(f"the prompt has {len(ids)} tokens; the context holds "
                           f"{n_ctx}, with room for at least one generated token")
    kwargs = sampling_of(body, n_ctx, len(ids))
    want_lp, top = _lp_request(body, chat)
    # Validate the sampling arguments now (a 400), not in the worker.
    from .sampling import SamplerSettings
    SamplerSettings(temperature=kwargs["temperature"], top_p=kwargs["top_p"],
                    seed=kwargs["seed"]).check()
    job = Job(ids, kwargs, top, want_lp, asyncio.get_running_loop())
    reply = Reply(s, chat, len(ids))
    if not _field(body, "stream", (bool,), False):
        return await _complete(s, request, job, reply)
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return await _stream(s, request, job, reply, usage, streaming_response)


async def _complete(s: Server, request: Any, job: Job, reply: Reply) -> Any:
    """The whole response at once (None when the client left meanwhile)."""
    steps = s.steps(job, request.is_disconnected)
    try:
        async for step in steps:
            reply.add(step, job.want_lp)
    finally:
        await steps.aclose()
    return None if job.reason == "cancelled" else reply.full(job.want_lp)


async def _stream(s: Server, request: Any, job: Job, reply: Reply, usage: bool,
                  streaming_response: Any) -> Any:
    """Server-sent events, one per step, then the usage (when asked) and [DONE]."""
    # Until the response starts, the request's disconnect is polled here; after
    # that the response watches it itself (and cancels the stream), so polling
    # too would race it for the same message.
    watch = {"fn": request.is_disconnected}
    steps = s.steps(job, lambda: watch["fn"]())
    # The first step is awaited here so that a failure becomes an HTTP error
    # rather than a broken stream.
    try:
        first = await steps.__anext__()
    except StopAsyncIteration:
        first = None
    if job.reason == "cancelled":
        return None
    watch["fn"] = _never_disconnected
    want_lp, chat = job.want_lp, reply.chat

    async def events() -> AsyncIterator[str]:
        try:
            if chat:   # the chat stream opens with the role
                yield _sse(reply.chunk("", None, None, False, first=True))
            step = first
            while step is not None:
                entry = reply.add(step, want_lp)
                yield _sse(reply.chunk(step.text, entry, step.finish_reason, want_lp))
                step = await steps.__anext__()
        except StopAsyncIteration:
            pass
        except MoefluxError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error"}})
        finally:
            await steps.aclose()
        if reply.finish is None:
            yield _sse(reply.chunk(None, None, "length", False))
        if usage:
            yield _sse({**reply.head("chat.completion.chunk" if chat
                                     else "text_completion"),
                        "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"

    return streaming_response(events(), media_type="text/event-stream")


async def _never_disconnected() -> bool:
    return False


# ==== command line ====

def cmd_serve(args: argparse.Namespace) -> int:
    """Open the model and serve until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise MoefluxError("the server needs FastAPI and uvicorn: "
                           "pip install 'moeflux[server]'") from None
    from .cli import use_2bit_of
    threads = args.threads
    if not threads and args.contexts > 1:
        # Contexts run at once: share the cores rather than oversubscribe them.
        threads = max(1, (os.cpu_count() or 1) // args.contexts)
    app = create_app(args.model, contexts=args.contexts, threads=threads,
                     n_ctx=args.n_ctx, use_2bit=use_2bit_of(args.expert_bits),
                     name=args.name)
    print(f"moeflux: serving {args.model} on http://{args.host}:{args.port}/v1 "
          f"({args.contexts} context(s))", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``serve`` command to ``python -m moeflux``."""
    from .cli import add_model_options

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API: /v1/chat/completions, "
                    "/v1/completions (streaming or not), /v1/models. Needs "
                    "pip install 'moeflux[server]'.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--contexts", type=int, default=1,
                   help="requests run at once, each on its own context over the "
                        "shared weights; more wait in line (default 1). Without "
                        "--threads, each context gets cores / contexts threads")
    p.add_argument("--name", default=None,
                   help="model id in /v1/models (default: the directory's name)")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
