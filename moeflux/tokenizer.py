"""Tokenizer glue: the model directory's tokenizer.json through the HF ``tokenizers``
library, a streaming detokenizer that never emits half a character, and the chat
template of tokenizer_config.json rendered with jinja2.

Both libraries are optional dependencies (extra ``tokenizer``) and are imported only
when a tokenizer is first needed, so evaluating token ids works without them.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .errors import TokenizerError

__all__ = ["Tokenizer", "StreamingDetokenizer", "TokenizerError"]


def _token_text(value: Any) -> Optional[str]:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """The tokenizer of one model directory.

    Attributes:
        path: the tokenizer.json it was read from.
        config: tokenizer_config.json as a dict ({} when absent).
        bos_token / eos_token: the special-token strings when the config names them.
    """

    def __init__(self, model_dir: Union[str, Path]) -> None:
        """Load `model_dir`/tokenizer.json (and tokenizer_config.json if present).

        Raises:
            TokenizerError: the file is missing or the `tokenizers` package is not
                installed (install ``moeflux[tokenizer]``).
        """
        model_dir = Path(model_dir)
        self.path = model_dir / "tokenizer.json"
        if not self.path.is_file():
            raise TokenizerError(
                f"{self.path}: no tokenizer.json in the model directory (copy the "
                "checkpoint's tokenizer files there, or pass token ids instead of text)")
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TokenizerError(
                "the 'tokenizers' package is needed to turn text into tokens: "
                "pip install 'moeflux[tokenizer]'") from exc
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:
            raise TokenizerError(f"{self.path}: cannot load: {exc}") from exc
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict = {}
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"{cfg_path}: cannot read: {exc}") from exc
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (may be below the model's n_vocab)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string, or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens per the tokenizer's post-processor."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 byte runs become U+FFFD)."""
        return self._tok.decode([int(i) for i in ids],
                                skip_special_tokens=skip_special_tokens)

    def streaming(self, skip_special_tokens: bool = False) -> "StreamingDetokenizer":
        """A new StreamingDetokenizer over this tokenizer."""
        return StreamingDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render `messages` with tokenizer_config.json's chat_template.

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with the assistant turn's opening.
            extra: more template variables (e.g. tools=...).

        Returns:
            The prompt text (tokenize it with add_special_tokens=False, since the
            template already writes the special tokens it wants).

        Raises:
            TokenizerError: no chat_template, jinja2 not installed, or the template
                fails (raise_exception in the template included).
        """
        template = self.config.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = self.path.parent / "chat_template.jinja"
        if not isinstance(template, str) and jinja_file.is_file():
            # Newer HF checkpoints keep the template in its own file.
            template = jinja_file.read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise TokenizerError(
                f"{self.path.parent}: no chat_template in tokenizer_config.json and no "
                "chat_template.jinja")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TokenizerError(
                "the 'jinja2' package is needed for chat templates: "
                "pip install 'moeflux[tokenizer]'") from exc

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, whole characters only.

    Byte-level BPE splits one character over several tokens; decoding a prefix of
    them yields U+FFFD. So each step decodes a short window (the tokens since the last
    emitted boundary, plus the one before as context so leading-space rules apply)
    and emits only once the window no longer ends in a partial character. Every step
    costs O(window), not O(sequence).
    """

    MAX_HELD = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0   # first id of the decode window (context, already emitted)
        self._read = 0     # ids before this are emitted

    def prime(self, ids: Sequence[int]) -> None:
        """Take the last of `ids` (e.g. the prompt) as already-emitted context, so the
        first new token decodes as it would after them (decoders that drop a leading
        space at the start of a text would otherwise drop it from the reply)."""
        self._ids = [int(i) for i in list(ids)[-1:]]
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is partial)."""
        self._ids.append(int(token_id))
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix:], self._skip)
        held = len(self._ids) - self._read
        # A UTF-8 character spans at most 4 bytes, so a replacement character still
        # there after MAX_HELD tokens is invalid data, not a partial character.
        if (full.endswith("\ufffd") and held < self.MAX_HELD) or len(full) <= len(done):
            return ""
        if not full.startswith(done):
            # The context token decodes differently with what follows; emit the new
            # ids on their own rather than repeat or drop text.
            full = done + self._tok.decode(self._ids[self._read:], self._skip)
        self._prefix = self._read
        self._read = len(self._ids)
        return full[len(done):]

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character comes out as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix:], self._skip)
        if full.startswith(done):
            piece = full[len(done):]
        else:
            piece = self._tok.decode(self._ids[self._read:], self._skip)
        self._prefix = self._read
        self._read = len(self._ids)
        return piece
