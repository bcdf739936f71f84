"""The command line: ``python -m moeflux generate | info | chat`` (moeflux/cli.py).

Each command runs as a real subprocess on a converted synthetic model. Greedy token
ids printed by ``generate --ids`` must equal argmax decoding of mlx-lm; ``info`` must
report the model's facts and fail on a damaged directory; ``chat`` must reuse the
sequence across turns (checked in process, where replies can be forced so that their
re-tokenization is known) and answer as a fresh evaluation of the whole conversation
would.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _helpers import PROMPT, converted, open_model
from moeflux.cli import ChatSession
from reference import reference_decode

__all__ = ["converted"]

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "moeflux", *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def dirs(converted):
    return converted("qwen3_5_moe")


def test_generate_ids_equal_mlx_greedy(dirs) -> None:
    src, dst = dirs
    r = run("generate", "--model", str(dst), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-tokens", "8", "--ids", "--threads", "2")
    assert r.returncode == 0, r.stderr
    gen = [int(t) for t in r.stdout.split()]
    assert len(gen) >= 1
    ref = reference_decode(src, PROMPT, gen[:-1])
    assert list(ref.argmax(-1)) == gen
    assert "tokens/s" in r.stderr


def test_generate_text(dirs) -> None:
    src, dst = dirs
    r = run("generate", "--model", str(dst), "--prompt", "Hello, world!",
            "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    m = open_model(dst)
    try:
        want = m.generate_text("Hello, world!", max_tokens=6)
    finally:
        m.close()
    assert r.stdout == want + "\n"
    assert "prompt: " in r.stderr and "generation: " in r.stderr
    r = run("generate", "--model", str(dst / "missing"), "--prompt", "x")
    assert r.returncode != 0 and "missing" in r.stderr
    # --chat-template wraps the prompt as a user turn.
    r = run("generate", "--model", str(dst), "--prompt", "Hi", "--chat-template",
            "--max-tokens", "4", "--ids")
    assert r.returncode == 0, r.stderr
    m = open_model(dst)
    try:
        ids = m.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
        want = [s.token for s in m.generate(ids, max_tokens=4)]
    finally:
        m.close()
    assert [int(t) for t in r.stdout.split()] == want


def test_info(dirs, tmp_path: Path) -> None:
    src, dst = dirs
    r = run("info", str(dst), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    cfg = json.loads((dst / "config.json").read_text())["text_config"]
    assert facts["architecture"] == "qwen3_5_moe"
    assert facts["num_hidden_layers"] == cfg["num_hidden_layers"]
    assert facts["vocab_size"] == cfg["vocab_size"]
    assert facts["num_experts"] == cfg["num_experts"]
    layout = json.loads((dst / "packed_experts" / "layout.json").read_text())
    n_moe = len(list((dst / "packed_experts").glob("layer_*.bin")))
    assert facts["expert_bytes_per_token"] == \
        n_moe * cfg["num_experts_per_tok"] * layout["expert_size"]
    assert facts["layout_ok"] is True
    assert facts["expert_files"] == n_moe
    r = run("info", str(dst))
    assert r.returncode == 0 and "expert bytes/token" in r.stdout
    # A damaged copy: an expert file with one byte flipped is reported, exit 1.
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    f = sorted((bad / "packed_experts").glob("layer_*.bin"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = run("info", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr


def test_chat_subprocess(dirs) -> None:
    src, dst = dirs
    r = run("chat", "--model", str(dst), "--max-tokens", "6", "--system", "Be brief.",
            stdin="Hello there\n\nWhat is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    turns = [line for line in r.stderr.splitlines() if line.startswith("[turn:")]
    assert len(turns) == 2, r.stderr
    assert ", 0 reused" in turns[0] and ", 0 reused" not in turns[1]


def test_chat_reuses_and_matches_fresh(dirs) -> None:
    """Forced replies (so their tokens re-render identically): the second and third
    turns evaluate only their new tokens; free (greedy) replies equal a fresh
    generation over the whole rendered conversation."""
    src, dst = dirs
    m = open_model(dst)
    fresh = open_model(dst)
    try:
        eos = m.eos_token_id
        s = ChatSession(m, "Be brief.")

        def forced(text: str):
            ids = m.tokenize(text, add_special_tokens=False) + [eos]
            def proc(seen: np.ndarray, logits: np.ndarray) -> np.ndarray:
                out = np.full_like(logits, -1e9)
                out[ids[min(len(seen) - 1, len(ids) - 1)]] = 0.0
                return out
            return proc

        out = io.StringIO()
        reply, c1 = s.turn("Hello", out, max_tokens=20,
                           logits_processors=[forced(" Hi there")])
        assert reply == " Hi there" and c1["reused"] == 0
        reply, c2 = s.turn("Capital of France?", out, max_tokens=20,
                           logits_processors=[forced(" Paris")])
        assert reply == " Paris"
        assert c2["reused"] == c1["prompt_tokens"] + c1["generated"]
        assert c2["evaluated"] == c2["prompt_tokens"] - c2["reused"]
        # A free greedy turn, compared with generating from scratch.
        reply, c3 = s.turn("And of Spain?", out, max_tokens=8)
        assert c3["reused"] == c2["prompt_tokens"] + c2["generated"]
        ids = fresh.apply_chat_template(s.messages[:-1], tokenize=True)
        assert len(ids) == c3["prompt_tokens"]
        assert fresh.generate_text(ids, max_tokens=8) == reply
        assert out.getvalue().startswith(" Hi there Paris")
    finally:
        m.close()
        fresh.close()


def test_info_large_model_verify_on_request(dirs, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """Past the size threshold the checksum pass runs only with --verify."""
    import moeflux.cli
    from moeflux.__main__ import main

    src, dst = dirs
    monkeypatch.setattr(moeflux.cli, "VERIFY_AUTO_BYTES", 0)
    assert main(["info", str(dst), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["layout_ok"] is None and "--verify" in facts["layout_check"]
    assert main(["info", str(dst), "--json", "--verify"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["layout_ok"] is True and "checksums" in facts["layout_check"]


def test_chat_turn_interrupted(dirs) -> None:
    """A turn stopped by Ctrl-C (here raised from a logits processor mid-reply) is
    forgotten; the next turn answers as a fresh generation over the conversation."""
    src, dst = dirs
    m = open_model(dst)
    fresh = open_model(dst)
    try:
        s = ChatSession(m)
        s.turn("Hello", io.StringIO(), max_tokens=4)

        def interrupt(seen: np.ndarray, logits: np.ndarray) -> np.ndarray:
            if len(seen) > 2:
                raise KeyboardInterrupt
            return logits

        with pytest.raises(KeyboardInterrupt):
            s.turn("Tell me more", io.StringIO(), max_tokens=8,
                   logits_processors=[interrupt])
        s.interrupted()
        assert [msg["role"] for msg in s.messages] == ["user", "assistant"]
        reply, counts = s.turn("Capital of France?", io.StringIO(), max_tokens=6)
        ids = fresh.apply_chat_template(s.messages[:-1], tokenize=True)
        assert fresh.generate_text(ids, max_tokens=6) == reply
        assert counts["prompt_tokens"] == len(ids)
    finally:
        m.close()
        fresh.close()
