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


# ---- issue 13: errors, pipes, Ctrl-C, chat commands, 2-bit, progress, prep leftovers

def run_bytes(*args: str, stdin: bytes = b"", prog: str = "moeflux"
              ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", prog, *args], input=stdin,
                          capture_output=True, env=env, cwd=ROOT, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, prog: str) -> str:
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_errors_are_one_line(dirs, tmp_path: Path) -> None:
    src, dst = dirs
    line = one_line_error(run("generate", "--model", str(tmp_path / "nope"), "--prompt",
                              "x"), "moeflux")
    assert "nope" in line
    one_line_error(run("info", str(tmp_path / "nope")), "moeflux")
    one_line_error(run("chat", "--model", str(dst), "--threads", "-2"), "moeflux")
    r = run_bytes("convert", str(tmp_path / "nope"), str(tmp_path / "out"),
                  prog="moeflux.prep")
    line = one_line_error(r, "moeflux.prep")
    assert "[Errno" not in line and "config.json" in line
    assert not (tmp_path / "out").exists()
    # A refusal: converting a directory into itself.
    line = one_line_error(run_bytes("convert", str(src), str(src), prog="moeflux.prep"),
                          "moeflux.prep")
    assert "source" in line


def test_generate_into_a_closed_pipe(dirs) -> None:
    """`generate | head`: no BrokenPipeError noise, status 141 (as after SIGPIPE)."""
    src, dst = dirs
    p = subprocess.Popen([sys.executable, "-m", "moeflux", "generate", "--model", str(dst),
                          "--prompt", "Hello", "--max-tokens", "3000", "--n-ctx", "4096"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ctrl_c_ends_quietly(dirs) -> None:
    import signal
    import time
    src, dst = dirs
    p = subprocess.Popen([sys.executable, "-m", "moeflux", "generate", "--model", str(dst),
                          "--prompt", "Hello", "--max-tokens", "3000", "--n-ctx", "4096"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.read(1)
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err.decode() and "interrupted" in err.decode()


def test_prep_interrupt_says_rerun(monkeypatch, capsys, tmp_path: Path) -> None:
    import moeflux.prep.convert as conv
    from moeflux.prep.__main__ import main as prep_main

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(conv, "convert", interrupted)
    assert prep_main(["convert", str(tmp_path / "a"), str(tmp_path / "b")]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_chat_commands_and_bad_input(dirs) -> None:
    src, dst = dirs
    r = run_bytes("chat", "--model", str(dst), "--max-tokens", "3",
                  stdin=b"/help\nHello\n/reset\ncaf\xe9 \xff bad bytes\n/quit\nNever read\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "/reset" in err and "/quit" in err            # the help text
    assert "conversation reset" in err and "not valid UTF-8" in err
    turns = [ln for ln in err.splitlines() if ln.startswith("[turn:")]
    assert len(turns) == 2, err                          # "Never read" was not
    assert ", 0 reused" in turns[1]                      # after /reset


def test_chat_keeps_going_when_the_context_is_full(dirs) -> None:
    src, dst = dirs
    lines = [f"Message number {i} about something else" for i in range(8)]
    r = run_bytes("chat", "--model", str(dst), "--max-tokens", "12", "--n-ctx", "96",
                  stdin="\n".join(lines + ["x " * 200]).encode() + b"\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    turns = [ln for ln in err.splitlines() if ln.startswith("[turn:")]
    assert len(turns) == 8, err
    assert "context full: dropped" in err
    assert "more than the context" in err                # the oversized last message


def test_chat_session_drops_oldest_turns(dirs) -> None:
    src, dst = dirs
    m = open_model(dst, n_ctx=80)
    fresh = open_model(dst, n_ctx=80)
    try:
        s = ChatSession(m, "Be brief.")
        dropped = 0
        for i in range(6):
            reply, counts = s.turn(f"Tell me fact {i} please", io.StringIO(),
                                   max_tokens=10)
            dropped += counts["dropped"]
            assert s.messages[0]["role"] == "system"
            assert counts["prompt_tokens"] + min(10, 80 // 4) <= 80
            ids = fresh.apply_chat_template(s.messages[:-1], tokenize=True)
            fresh.reset()
            assert fresh.generate_text(ids, max_tokens=10) == reply
        assert dropped > 0
    finally:
        m.close()
        fresh.close()


def test_two_bit_model_from_the_cli(dirs, tmp_path: Path) -> None:
    from moeflux.prep.convert import convert
    src, dst = dirs
    d2 = convert(src, tmp_path / "m2", expert_bits=2, progress=False)
    r = run("generate", "--model", str(d2), "--prompt-ids", "1,2,3", "--ids",
            "--max-tokens", "3", "--threads", "0")
    assert r.returncode == 0, r.stderr
    r2 = run("generate", "--model", str(d2), "--prompt-ids", "1,2,3", "--ids",
             "--max-tokens", "3", "--expert-bits", "2")
    assert r2.stdout == r.stdout
    line = one_line_error(run("generate", "--model", str(d2), "--prompt-ids", "1",
                              "--expert-bits", "4"), "moeflux")
    assert "--expert-bits 2" in line
    r = run("info", str(d2), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["expert_files_2bit"] > 0


def test_info_prints_the_problem(dirs, tmp_path: Path) -> None:
    src, dst = dirs
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    f = sorted((bad / "packed_experts").glob("layer_*.bin"))[0]
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    r = run("info", str(bad))
    assert r.returncode == 1
    problems = [ln for ln in r.stderr.splitlines() if ln.startswith("moeflux: problem:")]
    assert problems and any(f.name in p for p in problems), r.stderr


def test_prompt_progress_bar(capsys) -> None:
    from moeflux.clitools import eval_progress
    update, close = eval_progress("prompt", True)
    update(600, 600)                # one-piece eval: no bar
    close()
    assert capsys.readouterr().err == ""
    update, close = eval_progress("prompt", True)
    for done in (0, 256, 512, 600):
        update(done, 600)
    close()
    err = capsys.readouterr().err
    assert "prompt" in err and "600" in err


def test_prep_leaves_a_clean_directory(synth_checkpoint, tmp_path: Path,
                                       monkeypatch) -> None:
    """A finished conversion keeps no journal or lock; converting a smaller model
    over a bigger one leaves no stale layer files; a failed space check creates
    nothing."""
    import moeflux.prep._common as common
    from moeflux.prep.convert import convert
    dst = tmp_path / "out"
    convert(synth_checkpoint("qwen3_moe", num_hidden_layers=4), dst, progress=False)
    assert not (dst / common.JOURNAL_NAME).exists()
    assert not (dst / common.LOCK_NAME).exists()
    assert len(list((dst / "packed_experts").glob("layer_*.bin"))) == 4
    convert(synth_checkpoint("qwen3_moe", num_hidden_layers=2), dst, progress=False)
    assert sorted(p.name for p in (dst / "packed_experts").glob("layer_*.bin")) == \
        ["layer_00.bin", "layer_01.bin"]
    facts = json.loads(run("info", str(dst), "--json").stdout)
    assert facts["expert_files"] == 2 and facts["layout_ok"] is True

    class Tiny:
        free = 1000
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: Tiny)
    with pytest.raises(common.PrepIOError, match="free"):
        convert(synth_checkpoint("qwen3_moe", num_hidden_layers=2), tmp_path / "new" / "x",
                progress=False)
    assert not (tmp_path / "new").exists()
    from moeflux.prep.extract_weights import extract_weights
    from moeflux.prep.repack_experts import repack_experts
    for step in (extract_weights, repack_experts):
        with pytest.raises(common.PrepIOError, match="free"):
            step(synth_checkpoint("qwen3_moe", num_hidden_layers=2), tmp_path / "new2",
                 progress=False)
        assert not (tmp_path / "new2").exists()
