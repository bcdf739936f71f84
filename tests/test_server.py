"""``python -m moeflux serve``: the OpenAI-compatible server, end to end.

A real server process on a free localhost port, driven by the official ``openai``
client. Greedy answers must equal ``Model.generate`` in this process on the same model
directory; logprobs must equal a log-softmax computed here from ``Model.eval`` logits;
two requests run at once, one beyond the context limit waits, a client that goes
away stops its request, and a conversation's next turn reuses its prefix.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from _helpers import converted, open_model

__all__ = ["converted"]

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
N_CTX = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/moeflux/status",
                                timeout=30) as r:
        return json.loads(r.read())


class ServerProcess:
    """`python -m moeflux serve` as a child process, stopped by its own pid."""

    def __init__(self, model_dir: Path, contexts: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeflux", "serve", "--model", str(model_dir),
             "--port", str(self.port), "--contexts", str(contexts), "--n-ctx",
             str(N_CTX), "--threads", "1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
        deadline = time.monotonic() + 120
        while True:
            try:
                status(self.port)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("server did not start:\n" + self.output)
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1",
                                    api_key="none", max_retries=0, timeout=120)
        self.output = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.output = self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture(scope="module")
def model_dir(converted) -> Path:
    return converted("qwen3_5_moe")[1]


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, contexts=2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(model_dir: Path) -> Iterator[Any]:
    m = open_model(model_dir, n_ctx=N_CTX)
    yield m
    m.close()


def chat_ids(m: Any, messages: list[dict]) -> list[int]:
    return m.apply_chat_template(messages, tokenize=True)


def log_softmax(row: np.ndarray) -> np.ndarray:
    z = row.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def test_models_and_greedy_chat(server: ServerProcess, local: Any, model_dir) -> None:
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [model_dir.name]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = server.client.chat.completions.create(model=ids[0], messages=msgs,
                                              max_tokens=8, temperature=0)
    want = local.generate_text(chat_ids(local, msgs), max_tokens=8)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(chat_ids(local, msgs))
    assert 1 <= r.usage.completion_tokens <= 8


def test_streaming_equals_whole(server: ServerProcess) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    whole = server.client.chat.completions.create(model="x", messages=msgs,
                                                  max_tokens=10, temperature=0)
    chunks = list(server.client.chat.completions.create(
        model="x", messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Completions stream too.
    parts = list(server.client.completions.create(model="x", prompt="Hello", max_tokens=5,
                                                  temperature=0, stream=True))
    plain = server.client.completions.create(model="x", prompt="Hello", max_tokens=5,
                                             temperature=0)
    assert "".join(p.choices[0].text for p in parts) == plain.choices[0].text


def test_completion_logprobs_match_eval(server: ServerProcess, local: Any) -> None:
    r = server.client.completions.create(model="x", prompt="Hello, world", max_tokens=4,
                                         temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    prompt = local.tokenize("Hello, world")
    gen = local.generate(prompt, max_tokens=4)
    toks = [s.token for s in gen]
    assert len(lp.token_logprobs) == len(toks)
    local.reset()
    rows = local.eval(prompt + toks[:-1], all_logits=True)[len(prompt) - 1:]
    for i, tok in enumerate(toks):
        ref = log_softmax(rows[i])
        assert abs(lp.token_logprobs[i] - ref[tok]) < 1e-4
        # Keyed by token text, so two ids with the same text share an entry.
        top3 = np.sort(ref)[::-1][:3]
        vals = list(lp.top_logprobs[i].values())
        assert abs(max(vals) - top3[0]) < 1e-4
        assert all(np.abs(top3 - v).min() < 1e-4 for v in vals)
    # Chat: logprobs with top_logprobs.
    msgs = [{"role": "user", "content": "Hi"}]
    c = server.client.chat.completions.create(model="x", messages=msgs, max_tokens=3,
                                              temperature=0, logprobs=True,
                                              top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-9   # greedy


def test_stop_seed_and_bad_requests(server: ServerProcess) -> None:
    full = server.client.completions.create(model="x", prompt="The capital", max_tokens=12,
                                            temperature=0).choices[0].text
    cut = full[3:5]
    assert cut and cut in full
    r = server.client.completions.create(model="x", prompt="The capital", max_tokens=12,
                                         temperature=0, stop=[cut])
    assert r.choices[0].text == full[:full.index(cut)]
    assert r.choices[0].finish_reason == "stop"
    a, b = (server.client.completions.create(model="x", prompt="Hi", max_tokens=8,
                                             temperature=1.0, top_p=0.9, seed=11)
            .choices[0].text for _ in range(2))
    assert a == b
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="x", prompt="Hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="x", prompt="Hi", max_tokens=2,
                                         temperature=-1)


def test_conversation_reuses_prefix(server: ServerProcess, local: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."}]
    r1 = server.client.chat.completions.create(model="x", messages=msgs, max_tokens=6,
                                               temperature=0)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And another one?"}]
    r2 = server.client.chat.completions.create(model="x", messages=msgs, max_tokens=6,
                                               temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens, (cached, r1.usage)
    local.reset()
    assert r2.choices[0].message.content == local.generate_text(chat_ids(local, msgs),
                                                                max_tokens=6)


def test_two_concurrent_requests(server: ServerProcess, local: Any) -> None:
    prompts = ["Count to ten", "Tell me about the sea"]
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        r = server.client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=24, temperature=0)
        out[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        local.reset()
        want = local.generate_text(chat_ids(local, [{"role": "user", "content": p}]),
                                   max_tokens=24)
        assert out[i] == want
    assert status(server.port)["contexts_open"] == 2


def test_disconnect_stops_the_request(server: ServerProcess) -> None:
    before = status(server.port)
    stream = server.client.completions.create(model="x", prompt="Once upon a time",
                                              max_tokens=N_CTX - 16, temperature=0,
                                              stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while True:
        st = status(server.port)
        done = st["finished"][len(before["finished"]):]
        if done and st["active"] == 0:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    assert done[-1]["reason"] == "cancelled", done
    assert done[-1]["generated"] < N_CTX - 16 - 100
    assert st.get("cancelled", 0) == before.get("cancelled", 0) + 1


def test_requests_beyond_the_limit_wait(model_dir: Path, local: Any) -> None:
    srv = ServerProcess(model_dir, contexts=1)
    try:
        out: dict[int, str] = {}

        def ask(i: int) -> None:
            r = srv.client.completions.create(model="x", prompt=f"Item {i}:",
                                              max_tokens=48, temperature=0)
            out[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        st = status(srv.port)
        assert st["contexts_open"] == 1 and st["peak_waiting"] >= 1, st
        for i in range(3):
            local.reset()
            assert out[i] == local.generate_text(f"Item {i}:", max_tokens=48)
    finally:
        srv.stop()
