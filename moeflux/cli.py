"""The ``generate``, ``info`` and ``chat`` commands of ``python -m moeflux``.

Text goes to stdout as it is produced; speeds and diagnostics go to stderr, so the
output of ``generate`` can be piped as is.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from .clitools import EXIT_ERROR, eval_progress
from .errors import GenerationError, MoefluxError


def use_2bit_of(expert_bits: Optional[int]) -> Optional[bool]:
    """--expert-bits to Model's use_2bit: None chooses (4-bit when present)."""
    return None if expert_bits is None else expert_bits == 2


def open_model(args: argparse.Namespace) -> Any:
    """The Model of --model with --threads, --n-ctx and --expert-bits."""
    from .model import Model
    return Model(args.model, threads=args.threads, n_ctx=args.n_ctx,
                 use_2bit=use_2bit_of(args.expert_bits))


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --threads, --n-ctx, --expert-bits."""
    p.add_argument("--model", "-m", required=True, help="model directory")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default, or 0: all cores)")
    p.add_argument("--n-ctx", type=int, default=None,
                   help="context length (default: min(4096, model maximum))")
    p.add_argument("--expert-bits", type=int, choices=(4, 2), default=None,
                   help="expert set to read: 4 = packed_experts/, 2 = "
                        "packed_experts_2bit/ (default: 4-bit when present, else 2-bit)")


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens,
                   help=f"most tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", "-t", type=float, default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable)")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop)


def _fail(msg: str) -> int:
    print(f"moeflux: error: {msg}", file=sys.stderr)
    return EXIT_ERROR


# ---- generate

def _prompt_of(args: argparse.Namespace, model: Any) -> tuple[Any, bool]:
    """The prompt (text or ids) and add_special_tokens of the generate command."""
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.replace(",", " ").split()], True
        except ValueError:
            raise GenerationError(f"--prompt-ids must be integers, got "
                                  f"{args.prompt_ids!r}") from None
    if args.chat_template:
        return model.apply_chat_template([{"role": "user", "content": args.prompt}]), \
            False
    return args.prompt, True


def _stats_line(model: Any, last: Any) -> str:
    """The speeds and expert I/O of a generate run (stderr)."""
    if last is None:
        return "generation: 0 tokens"
    st = model.stats()
    n = max(1, int(st["n_tokens_evaluated"]))
    return (f"prompt: {last.n_prompt} tokens ({last.n_reused} reused), "
            f"{last.prompt_tps:.2f} tokens/s; generation: {last.n_generated} tokens, "
            f"{last.generation_tps:.2f} tokens/s ({last.finish_reason}); experts: "
            f"{st['expert_bytes_read'] / n / 2**20:.2f} MiB read per token evaluated, "
            f"{st['io_wait_s']:.2f} s waiting for reads")


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a completion of --prompt to stdout; progress and speeds to stderr."""
    if args.prompt is None and args.prompt_ids is None:
        return _fail("give --prompt TEXT or --prompt-ids IDS")
    with open_model(args) as model:
        prompt, add_special = _prompt_of(args, model)
        show = not args.no_progress and sys.stderr.isatty()
        progress, close_bar = eval_progress("prompt", show)
        last = None
        try:
            for step in model.generate(prompt, add_special_tokens=add_special,
                                       progress=progress, **_sampling_kwargs(args)):
                if last is None:
                    close_bar()
                sys.stdout.write(f"{step.token} " if args.ids else step.text)
                sys.stdout.flush()
                last = step
        finally:
            close_bar()
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(_stats_line(model, last), file=sys.stderr)
    return 0


# ---- info

def _dir_bytes(path: Path) -> tuple[int, int]:
    """Number and total size of the per-layer expert files in `path`."""
    files = sorted(path.glob("layer_*.bin")) if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# info runs the layout check (which checksums every file) by itself up to this size.
VERIFY_AUTO_BYTES = 8 << 30


def _verify(path: Path) -> tuple[Optional[bool], str]:
    """Run moeflux.prep.verify when this build has it: (ok or None, summary)."""
    try:
        from moeflux.prep.verify import verify
    except ImportError:
        return None, "skipped (moeflux.prep.verify is not available)"
    try:
        report = verify(path)
    except MoefluxError as exc:
        return False, str(exc)
    ok = getattr(report, "ok", None)
    if ok is None:
        ok = not getattr(report, "errors", None)
    return bool(ok), str(report).strip() or ("ok" if ok else "failed")


def cmd_info(args: argparse.Namespace) -> int:
    """Print what a model directory holds and check its on-disk layout."""
    path = Path(args.dir)
    from .model import Model
    with Model(path, use_2bit=use_2bit_of(args.expert_bits)) as model:
        cfg = model.config
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) \
            else {}

        def key(name: str, default: Any = None) -> Any:
            return text.get(name, cfg.get(name, default))

        facts = {
            "path": str(path.resolve()),
            "architecture": model.architecture,
            "num_hidden_layers": key("num_hidden_layers"),
            "hidden_size": key("hidden_size"),
            "vocab_size": model.vocab_size,
            # the expert count under each family's key (gpt_oss, minimax: local)
            "num_experts": key("num_experts", key("n_routed_experts",
                                                  key("num_local_experts"))),
            "num_experts_per_tok": key("num_experts_per_tok"),
            "max_position_embeddings": key("max_position_embeddings"),
            "n_ctx": model.n_ctx,
            "bos_token_id": model.bos_token_id,
            "eos_token_id": model.eos_token_id,
            "expert_bytes_per_token": model.expert_bytes_per_token,
            "quantization": cfg.get("quantization", {}).get("bits")
            if isinstance(cfg.get("quantization"), dict) else None,
        }
    wbin = path / "model_weights.bin"
    facts["model_weights_bytes"] = wbin.stat().st_size if wbin.is_file() else 0
    n_files, n_bytes = _dir_bytes(path / "packed_experts")
    facts["expert_files"], facts["expert_bytes"] = n_files, n_bytes
    n2, b2 = _dir_bytes(path / "packed_experts_2bit")
    if n2:
        facts["expert_files_2bit"], facts["expert_bytes_2bit"] = n2, b2
    total = facts["model_weights_bytes"] + n_bytes + (b2 if n2 else 0)
    if args.no_verify:
        ok, summary = None, "skipped (--no-verify)"
    elif not args.verify and total > VERIFY_AUTO_BYTES:
        # verify checksums every file: minutes for a large model, so only on request.
        ok, summary = None, (f"skipped for {_mib(total)} of files (--verify checks "
                             "layout and checksums)")
    else:
        ok, summary = _verify(path)
    facts["layout_ok"], facts["layout_check"] = ok, summary
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        rows = [
            ("model", facts["path"]),
            ("architecture", facts["architecture"]),
            ("layers", facts["num_hidden_layers"]),
            ("hidden size", facts["hidden_size"]),
            ("vocabulary", facts["vocab_size"]),
            ("experts", f"{facts['num_experts']} per MoE layer, "
                        f"{facts['num_experts_per_tok']} active per token"),
            ("expert bytes/token", f"{facts['expert_bytes_per_token']} "
                                   f"({_mib(facts['expert_bytes_per_token'])})"),
            ("dense weights", f"model_weights.bin, {_mib(facts['model_weights_bytes'])}"),
            ("expert files", f"packed_experts/: {n_files} layer files, {_mib(n_bytes)}"),
            ("context", f"n_ctx {facts['n_ctx']} "
                        f"(model maximum {facts['max_position_embeddings']})"),
            ("layout check", summary.splitlines()[0] if summary else summary),
        ]
        if n2:
            rows.insert(8, ("2-bit experts", f"packed_experts_2bit/: {n2} layer files, "
                                             f"{_mib(b2)}"))
        for name, value in rows:
            print(f"{name:<20} {value}")
    if ok is False:
        # Every problem, not just the count: the point of the check.
        for line in summary.splitlines()[1:] or [summary]:
            print(f"moeflux: problem: {line.strip().lstrip('- ')}", file=sys.stderr)
    return 0 if ok is not False else EXIT_ERROR


# ---- chat

class ChatSession:
    """A multi-turn conversation over one Model that evaluates only new tokens.

    After each reply the sequence holds prompt + reply; the next turn's rendered
    conversation normally starts with exactly those tokens, so only the new ones are
    evaluated. When re-tokenizing the reply differs, the snapshot taken at the end of
    the previous prompt is loaded instead and evaluation resumes from there; only when
    neither is a prefix does the turn start from an empty sequence.
    """

    def __init__(self, model: Any, system: Optional[str] = None) -> None:
        self.model = model
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.held: list[int] = []             # tokens the sequence holds now
        self.snapshot: Optional[bytes] = None  # state after snapshot_ids
        self.snapshot_ids: list[int] = []

    def _resume(self, ids: list[int]) -> int:
        """Bring the sequence to the longest reusable prefix of ids; its length."""
        m = self.model
        if self.held and ids[:len(self.held)] == self.held and len(ids) > len(self.held):
            return len(self.held)
        n = len(self.snapshot_ids)
        if self.snapshot is not None and ids[:n] == self.snapshot_ids and len(ids) > n:
            m.load_state(self.snapshot)
            return n
        m.reset()
        return 0

    def interrupted(self) -> None:
        """Forget a turn stopped by Ctrl-C: its user message and the held tokens (the
        sequence may end anywhere in the reply), so the next turn resumes from the
        prompt snapshot."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        self.held = []

    def _render_fitting(self, reserve: int) -> tuple[list[int], int]:
        """The conversation's prompt ids, after dropping the oldest turns (never the
        system prompt or the new message) until `reserve` tokens are left for the
        reply; and how many messages were dropped. GenerationError (the new message
        forgotten) when the new message alone does not fit."""
        m = self.model
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = m.apply_chat_template(self.messages, add_generation_prompt=True,
                                        tokenize=True)
            if len(ids) + reserve <= m.n_ctx:
                return ids, dropped
            if len(self.messages) - first <= 1:
                if len(ids) < m.n_ctx:
                    return ids, dropped   # fits, with less room for the reply
                self.messages.pop()
                raise GenerationError(
                    f"the message needs {len(ids)} tokens with the conversation's "
                    f"prompt, more than the context's {m.n_ctx}: shorten it (or start "
                    "with a larger --n-ctx)")
            del self.messages[first]
            dropped += 1

    def turn(self, user: str, out: TextIO, **sampling: Any) -> tuple[str, dict]:
        """Answer `user`, streaming the reply to `out`. Returns (reply, counts).

        When the conversation no longer fits the context with room for a reply
        (min(max_tokens, n_ctx / 4) tokens), its oldest messages are dropped first:
        counts["dropped"] says how many."""
        m = self.model
        self.messages.append({"role": "user", "content": user})
        reserve = max(1, min(int(sampling.get("max_tokens", 256)), m.n_ctx // 4))
        ids, dropped = self._render_fitting(reserve)
        reused = self._resume(ids)
        new = ids[reused:]
        # Everything but the last prompt token is evaluated here so the snapshot ends
        # at the prompt; generate() evaluates the last one and samples from it.
        if len(new) > 1:
            m.eval(new[:-1])
        self.snapshot = None   # free the old one first: snapshots can be large
        self.snapshot, self.snapshot_ids = m.save_state(), list(ids[:-1])
        reply, gen = [], []
        for step in m.generate(new[-1:], reset=False, **sampling):
            out.write(step.text)
            out.flush()
            reply.append(step.text)
            gen.append(step.token)
        # Feed the last token too, so the sequence holds prompt + reply and the next
        # turn starts right after it.
        self.held = []
        if gen and m.n_past < m.n_ctx:
            m.eval(gen[-1:])
            self.held = list(ids) + gen
        text = "".join(reply)
        self.messages.append({"role": "assistant", "content": text})
        return text, {"prompt_tokens": len(ids), "evaluated": len(new),
                      "reused": reused, "generated": len(gen), "dropped": dropped}


CHAT_HELP = """commands (a line starting with /):
  /help    this list
  /reset   forget the conversation (keeps --system)
  /quit    leave (also /exit, or end of input: Ctrl-D)
Ctrl-C stops the reply being written; the conversation goes on without that turn.
When the conversation outgrows the context, its oldest turns are dropped."""


def _read_line(stream: Any) -> Optional[str]:
    """One input line as text, None at end of input. Bytes that are not UTF-8 are
    replaced (U+FFFD) with a warning, instead of ending the chat."""
    raw = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline()
    if not raw:
        return None
    if isinstance(raw, str):
        return raw.rstrip("\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        print("[the line was not valid UTF-8: invalid bytes replaced by U+FFFD]",
              file=sys.stderr, flush=True)
    return text.rstrip("\r\n")


def _chat_command(line: str, session: "ChatSession", model: Any,
                  args: argparse.Namespace) -> Optional[ChatSession]:
    """Handle a /command: the session to go on with, or None to quit."""
    cmd = line.strip().split()[0].lower()
    if cmd in ("/quit", "/exit"):
        return None
    if cmd == "/reset":
        model.reset()
        print("[conversation reset]", file=sys.stderr, flush=True)
        return ChatSession(model, args.system)
    if cmd != "/help":
        print(f"[unknown command {cmd}]", file=sys.stderr)
    print(CHAT_HELP, file=sys.stderr, flush=True)
    return session


def _chat_turn(session: ChatSession, line: str, args: argparse.Namespace) -> None:
    """One turn; Ctrl-C and requests that cannot be served end only the turn."""
    t0 = time.perf_counter()
    try:
        _, counts = session.turn(line, sys.stdout, **_sampling_kwargs(args))
    except KeyboardInterrupt:
        # The engine left the sequence as it was before the interrupted eval; the
        # next turn resumes from the prompt snapshot.
        session.interrupted()
        print("\n[interrupted]", file=sys.stderr, flush=True)
        return
    except GenerationError as exc:
        print(f"[{exc}]", file=sys.stderr, flush=True)
        return
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if counts["dropped"]:
        print(f"[context full: dropped the {counts['dropped']} oldest message(s); "
              "/reset starts over]", file=sys.stderr, flush=True)
    print(f"[turn: {counts['prompt_tokens']} prompt tokens, "
          f"{counts['evaluated']} evaluated, {counts['reused']} reused; "
          f"{counts['generated']} generated in {dt:.2f} s]", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat: one user message per stdin line; /help lists the commands."""
    with open_model(args) as model:
        session: Optional[ChatSession] = ChatSession(model, args.system)
        interactive = sys.stdin.isatty()
        if interactive:
            print("moeflux chat: type a message; /help for commands", file=sys.stderr)
        while session is not None:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = _read_line(sys.stdin)
            if line is None:
                break
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                session = _chat_command(line, session, model, args)
                continue
            _chat_turn(session, line, args)
    return 0


def register(subparsers: Any) -> None:
    """Add the generate, info and chat commands to `python -m moeflux`."""
    p = subparsers.add_parser("generate", help="generate text from a prompt",
                              description="Generate a completion of --prompt: text to "
                              "stdout, progress and speeds to stderr.")
    add_model_options(p)
    p.add_argument("--prompt", "-p", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None,
                   help="prompt as token ids (space or comma separated)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt as a user turn of the model's chat template")
    p.add_argument("--ids", action="store_true", help="print token ids, not text")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar for a long prompt (shown on a terminal)")
    _add_sampling_options(p, 256)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("info", help="describe a model directory")
    p.add_argument("dir", help="model directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify", action="store_true",
                   help="check layout and checksums even for a large model")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the on-disk layout check")
    p.add_argument("--expert-bits", type=int, choices=(4, 2), default=None,
                   help="expert set to open (default: 4-bit when present)")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "chat", help="multi-turn chat from stdin lines",
        description="Multi-turn chat: one message per line of stdin.\n\n" + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_options(p, 512)
    p.set_defaults(func=cmd_chat)
