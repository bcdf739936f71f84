"""Generation, sampling and tokenizer glue (moeflux/generate.py, sampling.py,
tokenizer.py, features.py).

The oracle for numbers is mlx-lm: greedy generation must equal argmax decoding of
mlx-lm's incremental logits. Sampling filters and penalties are checked against
distributions computed here from their definitions; text handling against the HF
`tokenizers` library's own decode of the whole sequence.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest

from _helpers import CPU_ARCHS, CONT, PROMPT, converted, open_model
from moeflux.generate import GenerationError
from moeflux.sampling import (Sampler, SamplerSettings, SamplingError,
                              apply_repetition_penalty, filter_probs)
from reference import reference_decode

__all__ = ["converted"]

TEXTS = ["Hello, world!", "The capital of France is Paris.", "  two  spaces\nnew line",
         "héllo wörld — ünïcode", "日本語のテキスト", "emoji 🙂🚀 and math ∑∫",
         "def forward(self, x): return x"]


@pytest.fixture(scope="module")
def hybrid(converted):
    src, dst = converted("qwen3_5_moe")
    m = open_model(dst)
    yield src, m
    m.close()


def forcing(ids_after_prompt: Sequence[int], n_prompt: int):
    """A logits processor that forces token ids_after_prompt[i] at generated step i."""
    def proc(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        i = len(ids) - n_prompt
        out = np.full_like(logits, -1e9)
        out[ids_after_prompt[min(i, len(ids_after_prompt) - 1)]] = 0.0
        return out
    return proc


# ---- against mlx-lm

@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_greedy_equals_mlx_argmax(converted, arch: str) -> None:
    src, dst = converted(arch)
    m = open_model(dst)
    try:
        steps = list(m.generate(PROMPT, max_tokens=12, temperature=0.0))
    finally:
        m.close()
    gen = [s.token for s in steps]
    assert steps[-1].finish_reason in ("length", "stop")
    assert all(s.finish_reason is None for s in steps[:-1])
    ref = reference_decode(src, PROMPT, gen[:-1])
    assert list(ref.argmax(-1)) == gen, f"{arch}: greedy tokens differ from mlx-lm"


def test_continue_after_load_state(hybrid) -> None:
    """generate(reset=False) after load_state continues the snapshotted sequence:
    the same tokens as generating from the whole prompt."""
    src, m = hybrid
    whole = [s.token for s in m.generate(PROMPT + CONT, max_tokens=6)]
    m.reset()
    m.eval(PROMPT)
    snap = m.save_state()
    m.eval(CONT)            # move away, then come back
    m.load_state(snap)
    cont = [s.token for s in m.generate(CONT, max_tokens=6, reset=False)]
    assert cont == whole


# ---- stop conditions

def test_max_tokens_and_eos(hybrid) -> None:
    src, m = hybrid
    steps = list(m.generate(PROMPT, max_tokens=5))
    assert len(steps) == 5 and steps[-1].finish_reason == "length"
    assert [s.n_generated for s in steps] == [1, 2, 3, 4, 5]
    assert list(m.generate(PROMPT, max_tokens=0)) == []
    eos = m.eos_token_id
    assert eos is not None and eos in m.eos_token_ids
    forced = [300, 301, eos, 302]
    steps = list(m.generate(PROMPT, max_tokens=10,
                            logits_processors=[forcing(forced, len(PROMPT))]))
    assert [s.token for s in steps] == forced[:3]
    assert steps[-1].finish_reason == "stop"
    assert m.n_past == len(PROMPT) + 2   # the EOS is not evaluated


def test_stop_strings_and_text(hybrid) -> None:
    src, m = hybrid
    text = " Hello, world! The end."
    ids = m.tokenize(text, add_special_tokens=False)
    proc = forcing(ids, len(PROMPT))
    n = len(ids)
    pieces = [s.text for s in m.generate(PROMPT, max_tokens=n, logits_processors=[proc])]
    assert "".join(pieces) == text
    for stop, want in [("world", " Hello, "), ("The end", " Hello, world! "),
                       (["xyz", "!"], " Hello, world"), ("not there", text)]:
        steps = list(m.generate(PROMPT, max_tokens=n, logits_processors=[proc], stop=stop))
        assert "".join(s.text for s in steps) == want, stop
        assert steps[-1].finish_reason == ("length" if stop == "not there" else "stop")


def test_streamed_text_whole_characters(hybrid) -> None:
    """Multi-byte characters split over tokens never come out as U+FFFD halves."""
    src, m = hybrid
    for text in TEXTS:
        ids = m.tokenize(text, add_special_tokens=False)
        pieces = [s.text for s in m.generate(PROMPT, max_tokens=len(ids),
                                             logits_processors=[forcing(ids, len(PROMPT))])]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces), pieces


def test_bad_requests(hybrid) -> None:
    src, m = hybrid
    with pytest.raises(GenerationError):
        list(m.generate([], max_tokens=3))
    with pytest.raises(GenerationError, match="context"):
        list(m.generate([1] * (m.n_ctx + 1), max_tokens=3))
    with pytest.raises(SamplingError):
        list(m.generate(PROMPT, temperature=-1.0))
    with pytest.raises(SamplingError):
        list(m.generate(PROMPT, top_p=0.0))


# ---- sampling

def test_seeded_sampling(hybrid) -> None:
    src, m = hybrid
    kw = dict(max_tokens=10, temperature=1.5, top_p=0.95)
    a = [s.token for s in m.generate(PROMPT, seed=3, **kw)]
    b = [s.token for s in m.generate(PROMPT, seed=3, **kw)]
    c = [s.token for s in m.generate(PROMPT, seed=4, **kw)]
    assert a == b and a != c
    greedy = [s.token for s in m.generate(PROMPT, max_tokens=10)]
    top1 = [s.token for s in m.generate(PROMPT, max_tokens=10, temperature=2.0, top_k=1,
                                        seed=5)]
    assert top1 == greedy


def test_sampler_distribution() -> None:
    """Draws follow softmax(logits / T) restricted by the filters."""
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))
    n = 40000

    def freq(**kw) -> np.ndarray:
        s = Sampler(SamplerSettings(seed=11, **kw))
        draws = [s(logits, []) for _ in range(n)]
        return np.bincount(draws, minlength=5) / n

    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    assert np.allclose(freq(temperature=1.0), p, atol=0.01)
    t2 = p ** 0.5 / (p ** 0.5).sum()
    assert np.allclose(freq(temperature=2.0), t2, atol=0.01)
    top2 = np.array([0, 0.4, 0, 0.3, 0]) / 0.7
    assert np.allclose(freq(temperature=1.0, top_k=2), top2, atol=0.01)
    # top_p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins.
    topp = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
    assert np.allclose(freq(temperature=1.0, top_p=0.75), topp, atol=0.01)
    # min_p 0.3: keep p >= 0.12.
    minp = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
    assert np.allclose(freq(temperature=1.0, min_p=0.3), minp, atol=0.01)


def test_filters_and_penalty_by_hand() -> None:
    p = np.array([0.1, 0.5, 0.25, 0.15])
    assert np.allclose(filter_probs(p, 1, 1.0, 0.0), [0, 1, 0, 0])
    assert np.allclose(filter_probs(p, 0, 0.5, 0.0), [0, 1, 0, 0])
    assert np.allclose(filter_probs(p, 0, 0.6, 0.0), [0, 0.5 / 0.75, 0.25 / 0.75, 0])
    assert np.allclose(filter_probs(p, 0, 1.0, 0.5), [0, 0.5 / 0.75, 0.25 / 0.75, 0])
    row = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    apply_repetition_penalty(row, np.array([0, 1, 1]), 2.0)
    assert np.allclose(row, [1.0, -4.0, 1.0, 0.5])
    # A processor sees prompt + generated ids.
    seen = []
    s = Sampler(SamplerSettings(processors=[lambda ids, lg: seen.append(list(ids)) or lg]))
    assert s(np.array([0.0, 1.0, 0.5], dtype=np.float32), [7, 8]) == 1
    assert seen == [[7, 8]]


# ---- tokenizer

def test_tokenizer_round_trip(hybrid) -> None:
    src, m = hybrid
    from tokenizers import Tokenizer as HF
    hf = HF.from_file(str(m.path / "tokenizer.json"))
    for text in TEXTS:
        ids = m.tokenize(text)
        assert ids == hf.encode(text).ids
        assert m.detokenize(ids) == text
        assert m.detokenize(np.array(ids, dtype=np.int32)) == text
        d = m.streaming_detokenizer()
        pieces = [d.add(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_chat_template(hybrid) -> None:
    src, m = hybrid
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}]
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert m.apply_chat_template(msgs) == want
    assert m.apply_chat_template(msgs, add_generation_prompt=False) == \
        want[:-len("<|im_start|>assistant\n")]
    ids = m.apply_chat_template(msgs, tokenize=True)
    assert m.detokenize(ids) == want
    assert ids.count(m.tokenizer.token_to_id("<|im_start|>")) == 3


def test_without_tokenizer(hybrid, tmp_path) -> None:
    """A model directory without tokenizer files still generates from ids (empty text
    pieces); text in or out raises TokenizerError naming the missing file."""
    from moeflux.tokenizer import TokenizerError

    src, m = hybrid
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in m.path.iterdir():
        if not p.name.startswith("tokenizer"):
            (bare / p.name).symlink_to(p.resolve())
    b = open_model(bare)
    try:
        want = [s.token for s in m.generate(PROMPT, max_tokens=4)]
        steps = list(b.generate(PROMPT, max_tokens=4))
        assert [s.token for s in steps] == want and all(s.text == "" for s in steps)
        with pytest.raises(TokenizerError, match="tokenizer.json"):
            b.tokenize("hello")
        with pytest.raises(TokenizerError):
            list(b.generate("hello", max_tokens=2))
        with pytest.raises(TokenizerError):
            list(b.generate(PROMPT, max_tokens=2, stop="x"))
    finally:
        b.close()


def test_chat_template_file(hybrid, tmp_path) -> None:
    """A template kept in chat_template.jinja (newer HF layout) is used when
    tokenizer_config.json has none; with neither, TokenizerError."""
    import json as _json

    from moeflux.tokenizer import Tokenizer, TokenizerError

    src, m = hybrid
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").symlink_to((m.path / "tokenizer.json").resolve())
    cfg = _json.loads((m.path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(_json.dumps(cfg))
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}")
    out = Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
    assert out == "[user] x\n[assistant] "


def test_streaming_with_leading_space_decoder(tmp_path) -> None:
    """With a SentencePiece-style (Metaspace) decoder, which drops the leading space of
    a decoded text, pieces still join into the whole decode, and a stream primed with
    the prompt keeps the reply's leading space."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    from moeflux.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "\u2581!": 3,
             "\u2581again": 4}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    ids = tok.encode("Hello world ! again")
    assert ids == [1, 2, 3, 4]
    assert tok.decode([2]) == "world"          # the decoder's leading-space rule
    d = tok.streaming()
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) == "Hello world ! again"
    d = tok.streaming()
    d.prime([1])                                # the prompt ended with "Hello"
    assert d.add(2) + d.add(3) + d.flush() == " world !"


# ---- logprobs, prefix reuse, progress, argument and processor checks

def log_softmax(row: np.ndarray) -> np.ndarray:
    z = row.astype(np.float64) - row.max()
    return z - np.log(np.exp(z).sum())


def test_logprobs_equal_log_softmax_of_eval(hybrid) -> None:
    src, m = hybrid
    steps = list(m.generate(PROMPT, max_tokens=4, temperature=0.8, seed=3,
                            logprobs=True, top_logprobs=3))
    m.reset()
    row = m.eval(PROMPT)   # the same evaluation path: prompt, then one token a step
    for s in steps:
        ref = log_softmax(row)
        row = m.eval([s.token])
        assert abs(s.logprob - ref[s.token]) < 1e-9
        assert [t for t, _ in s.top_logprobs] == list(np.argsort(-ref, kind="stable")[:3])
        assert np.allclose([v for _, v in s.top_logprobs], np.sort(ref)[::-1][:3],
                           atol=1e-9)
    assert list(m.generate(PROMPT, max_tokens=1))[0].logprob is None


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_moe"])
def test_prefix_reuse_is_exact(converted, arch: str) -> None:
    """generate keeps the longest prefix the sequence shares with the new prompt
    and evaluates only the rest; the tokens equal a fresh Model's. A hybrid model
    falls back to re-evaluating when no checkpoint is held at that prefix."""
    src, dst = converted(arch)
    m, fresh = open_model(dst), open_model(dst)
    try:
        first = [s.token for s in m.generate(PROMPT, max_tokens=4)]
        cases = [PROMPT + first[:3] + CONT,        # everything held is reused
                 PROMPT + CONT,                    # back to the end of the prompt
                 PROMPT[:-2] + CONT]               # mid-prompt: hybrids re-evaluate
        for i, prompt in enumerate(cases):
            held = m.tokens
            m.stats_reset()
            steps = list(m.generate(prompt, max_tokens=4))
            fresh.reset()
            assert [s.token for s in steps] == [s.token for s in
                                                fresh.generate(prompt, max_tokens=4)]
            n = 0
            while n < min(len(held), len(prompt) - 1) and held[n] == prompt[n]:
                n += 1
            reused = steps[0].n_reused
            if arch == "qwen3_moe" or i < 2:
                assert reused == n, (i, reused, n)
            else:
                assert reused == 0
            assert m.stats()["n_tokens_evaluated"] == len(prompt) - reused + 3
            assert m.tokens == prompt + [s.token for s in steps[:-1]]
    finally:
        m.close()
        fresh.close()


def test_later_generate_invalidates_earlier(hybrid) -> None:
    src, m = hybrid
    g1 = m.generate(PROMPT, max_tokens=5)
    next(g1)
    assert len(list(m.generate(CONT, max_tokens=2))) == 2
    with pytest.raises(GenerationError, match="changed"):
        next(g1)
    g2 = m.generate(PROMPT, max_tokens=5)
    next(g2)
    m.eval([1])
    with pytest.raises(GenerationError, match="changed"):
        next(g2)


def test_arguments_refused_at_the_call(hybrid) -> None:
    """Wrong types are moeflux errors, raised by generate() itself, before the
    sequence is touched."""
    src, m = hybrid
    m.reset()
    m.eval(PROMPT)
    for kwargs, cls in [({"prompt": None}, GenerationError),
                        ({"prompt": [1.5, 2]}, GenerationError),
                        ({"top_k": 2.5}, SamplingError),
                        ({"temperature": "1"}, SamplingError),
                        ({"stop": 5}, GenerationError),
                        ({"max_tokens": 1.5}, GenerationError),
                        ({"seed": "x"}, SamplingError),
                        ({"repetition_penalty": float("nan")}, SamplingError),
                        ({"repetition_penalty": float("inf")}, SamplingError),
                        ({"logits_processors": [5]}, SamplingError)]:
        args = {"prompt": PROMPT, **kwargs}
        with pytest.raises(cls):
            m.generate(args.pop("prompt"), **args)
    assert m.tokens == PROMPT


@pytest.mark.parametrize("bad", ["none", "shape", "nan", "posinf", "all_masked"])
def test_processor_results_refused(hybrid, bad: str) -> None:
    src, m = hybrid

    def proc(ids: np.ndarray, row: np.ndarray):
        if bad == "none":
            row[0] = 0.0
            return None
        if bad == "shape":
            return row[:-1]
        row[3] = {"nan": np.nan, "posinf": np.inf, "all_masked": -np.inf}[bad]
        if bad == "all_masked":
            row[:] = -np.inf
        return row

    with pytest.raises(SamplingError, match="processor"):
        list(m.generate(PROMPT, max_tokens=2, logits_processors=[proc]))

    def mask(ids: np.ndarray, row: np.ndarray) -> np.ndarray:
        row[:5] = -np.inf       # masking some tokens is fine
        return row

    assert all(s.token >= 5 for s in m.generate(PROMPT, max_tokens=3,
                                                 logits_processors=[mask]))


def test_eval_progress_and_rollback(hybrid, sigint_raises_keyboardinterrupt) -> None:
    """With a progress callback a long prompt goes in pieces: the callback sees
    them, the logits equal one call's, and an error between pieces puts the
    sequence back where it was."""
    src, m = hybrid
    from moeflux.model import PROGRESS_CHUNK
    n = 2 * PROGRESS_CHUNK + 37
    toks = [int(t) for t in np.random.default_rng(0).integers(0, m.n_vocab, n)]
    m.reset()
    whole = m.eval(toks, all_logits=True)
    m.reset()
    seen: list = []
    pieces = m.eval(toks, all_logits=True, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, n), (PROGRESS_CHUNK, n), (2 * PROGRESS_CHUNK, n), (n, n)]
    # Pieces are whole prefill groups (PROGRESS_CHUNK tokens): the same groups, and
    # so the same logits bit for bit, as one call.
    np.testing.assert_array_equal(pieces, whole)
    m.reset()
    m.eval(PROMPT)

    def stop(done: int, total: int) -> None:
        if done >= PROGRESS_CHUNK:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        m.eval(toks, progress=stop)
    assert m.tokens == PROMPT and m.n_past == len(PROMPT)
    # Long, after a start > 0, stopped in its last piece: this hybrid model still
    # holds the start's checkpoint (few pieces), so the rollback is exact.
    long = [int(t) for t in np.random.default_rng(1).integers(0, m.n_vocab, 2300)]
    seen.clear()

    def stop_late(done: int, total: int) -> None:
        seen.append(done)
        if done >= total - 600:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        m.eval(long, progress=stop_late)
    assert len(seen) <= 5
    assert m.tokens == PROMPT and m.n_past == len(PROMPT)
    after = m.eval(CONT)
    fresh_row = None
    m.reset()
    fresh_row = m.eval(PROMPT + CONT)
    assert np.abs(after - fresh_row).max() <= 1e-4 * np.abs(fresh_row).max()
    m.reset()
    calls: list = []
    list(m.generate(toks, max_tokens=1, progress=lambda d, t: calls.append((d, t))))
    assert calls[0] == (0, n) and calls[-1] == (n, n)


def test_eval_progress_bar(hybrid, capsys) -> None:
    """progress=True: a tqdm.auto bar on stderr (a widget in Jupyter), same logits."""
    src, m = hybrid
    from moeflux.model import PROGRESS_CHUNK
    toks = [i % m.n_vocab for i in range(PROGRESS_CHUNK + 10)]
    m.reset()
    a = m.eval(toks, progress=True)
    err = capsys.readouterr().err
    assert "prompt" in err and str(len(toks)) in err
    m.reset()
    b = m.eval(toks)
    np.testing.assert_array_equal(a, b)   # whole prefill groups: bit for bit


def test_synthetic_tokenizer_names_every_id(hybrid) -> None:
    """The demo's text is readable: every id a synthetic model can produce decodes
    to some text (before, ids past the ~350 learned ones decoded to "")."""
    src, m = hybrid
    tok = m.tokenizer
    assert tok.vocab_size == m.n_vocab
    assert all(tok.decode([i]) for i in range(m.n_vocab))
    from moeflux.prep.synth import build_tokenizer_json
    spec = build_tokenizer_json(32768)
    vocab = spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(32768))
