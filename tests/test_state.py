"""Sequence-state snapshots and truncation (csrc/core/state.c, state_binding.c,
moeflux/features.py).

What must hold, on every architecture:
- save -> evaluate more -> load -> evaluate again gives bit-identical logits, in the
  same context and in another one (with another n_ctx); and those logits agree with
  mlx-lm's for the whole token sequence;
- every damaged snapshot (each header field, truncation at many points, random bit
  flips, another model's snapshot) is refused with the right exception, and the
  context is exactly as before (its own snapshot is byte-identical) and still
  evaluates as mlx-lm does;
- truncate(n) is exact (equal to a fresh evaluation of the prefix with the same call
  boundaries, and to mlx-lm) or refused with the context unchanged.
"""
from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from _helpers import (CONT, CPU_ARCHS, HYBRID, PROMPT, assert_close, converted,
                      open_model)
from moeflux.errors import ArgumentError, FormatError, StateError, UnsupportedError
from reference import reference_logits

__all__ = ["converted"]  # the fixture is used by name

# The snapshot format, version 2 (state.c): "MFLX" | u32 version | u32 n_ident |
# n_ident x i64 | u32 n_past | u32 n_seg | n_seg x (u32 kind, u32 layer, u64 row_bytes,
# u64 fixed_bytes, u64 data_bytes) | data | u64 checksum of all before. The identity
# fields: the shared ones, the family's own (mf_arch.ident), then the tail.
IDENT_CORE = ["architecture", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "num_experts",
              "num_experts_per_tok", "moe_intermediate_size", "intermediate_size",
              "number of MoE layers", "norm_topk_prob", "tie_word_embeddings"]
_HYBRID_IDENT = ["shared_expert_intermediate_size", "full_attention_interval",
                 "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_conv_kernel_dim"]
IDENT_ARCH = {
    "qwen3_5_moe": _HYBRID_IDENT, "qwen3_next": _HYBRID_IDENT, "qwen3_moe": [],
    "deepseek_v3": ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
                    "n_shared_experts", "n_group", "topk_group", "moe_layer_freq"],
    "glm4_moe": ["first_k_dense_replace", "n_shared_experts", "n_group", "topk_group",
                 "use_qk_norm", "attention_bias"],
    "gpt_oss": ["sliding_window", "layer_types"],
    "minimax": ["rotary_dim", "use_qk_norm"],
}
IDENT_TAIL = ["expert bytes per token", "manifest hash", "rope/norm/scaling constants",
              "weights fingerprint"]
OFF_IDENT = 12
SEG_ROW = 32


def ident_of(arch: str) -> list[str]:
    """The identity field names of a version-2 snapshot of ``arch``, in order."""
    return IDENT_CORE + IDENT_ARCH[arch] + IDENT_TAIL


def off_n_past(snap: bytes) -> int:
    return OFF_IDENT + 8 * struct.unpack_from("<I", snap, 8)[0]


def off_n_seg(snap: bytes) -> int:
    return off_n_past(snap) + 4


def off_table(snap: bytes) -> int:
    return off_n_past(snap) + 8


FNV_OFFSET = 0xcbf29ce484222325
FNV_PRIME = 0x100000001b3
M64 = 0xFFFFFFFFFFFFFFFF


def fnv1a64(data: bytes, h: int = FNV_OFFSET) -> int:
    """Byte FNV-1a 64 from its definition (offset basis, prime)."""
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & M64
    return h


def checksum(body: bytes) -> int:
    """The snapshot checksum as state.c documents it: four lanes of FNV-1a-style
    steps over little-endian u64 words (word i to lane i % 4, lane l seeded with the
    offset basis ^ l), then byte FNV-1a over the lanes, the tail bytes and the length."""
    n_words = len(body) // 8
    words = struct.unpack_from(f"<{n_words}Q", body)
    lanes = [FNV_OFFSET ^ l for l in range(4)]
    for i, w in enumerate(words):
        lanes[i % 4] = ((lanes[i % 4] ^ w) * FNV_PRIME) & M64
    h = fnv1a64(struct.pack("<4Q", *lanes))
    h = fnv1a64(body[8 * n_words:], h)
    return fnv1a64(struct.pack("<Q", len(body)), h)


def reseal(body: bytes) -> bytes:
    """A snapshot whose checksum matches `body` (everything but the trailer)."""
    return body + struct.pack("<Q", checksum(body))


def n_seg_of(snap: bytes) -> int:
    return struct.unpack_from("<I", snap, off_n_seg(snap))[0]


@pytest.fixture(scope="module", params=CPU_ARCHS)
def arch_model(request, converted):
    """(arch, checkpoint dir, Model) per architecture."""
    src, dst = converted(request.param)
    m = open_model(dst)
    yield request.param, src, m
    m.close()


# ---- round trips

def test_roundtrip_bit_exact(arch_model, tmp_path: Path) -> None:
    arch, src, m = arch_model
    m.reset()
    m.eval(PROMPT)
    snap = m.save_state()
    assert isinstance(snap, bytes) and len(snap) == m.state_size
    first = m.eval(CONT, all_logits=True)
    m.load_state(snap)
    assert m.n_past == len(PROMPT)
    again = m.eval(CONT, all_logits=True)
    assert np.array_equal(first, again), f"{arch}: logits after load differ"
    ref = reference_logits(src, PROMPT + CONT)[len(PROMPT):]
    assert_close(first, ref, f"{arch} continuation after a snapshot")

    # Pickled, and through a file written atomically.
    m.load_state(pickle.loads(pickle.dumps(snap)))
    assert np.array_equal(m.eval(CONT, all_logits=True), first)
    path = tmp_path / "state.mflx"
    assert m.save_state(path) == m.save_state()
    assert [p.name for p in tmp_path.iterdir()] == ["state.mflx"]  # no temp left
    m.load_state(snap)
    m.eval(CONT[:2])
    m.load_state(path)
    assert m.n_past == len(PROMPT) + len(CONT)
    m.load_state(bytearray(snap))
    m.load_state(np.frombuffer(snap, dtype=np.uint8))
    assert np.array_equal(m.eval(CONT, all_logits=True), first)


def test_load_into_other_context(arch_model, converted) -> None:
    """A snapshot moves to another Model of the same directory that has evaluated
    something else and has a smaller n_ctx, and continues bit for bit; a ctx too short
    for it refuses it."""
    arch, src, m = arch_model
    m.reset()
    m.eval(PROMPT)
    snap = m.save_state()
    want = m.eval(CONT, all_logits=True)
    other = open_model(m.path, n_ctx=len(PROMPT) + len(CONT))
    try:
        other.eval(list(reversed(PROMPT)) + CONT[:3])   # stale, longer state
        other.load_state(snap)
        assert other.n_past == len(PROMPT)
        assert np.array_equal(other.eval(CONT, all_logits=True), want)
    finally:
        other.close()
    short = open_model(m.path, n_ctx=len(PROMPT) - 1)
    try:
        with pytest.raises(StateError, match="n_ctx"):
            short.load_state(snap)
        assert short.n_past == 0
    finally:
        short.close()


# Snapshots in format version 1, written by moeflux before the identity list became
# the family's (tests/data/snapshot_v1_<arch>.mflx): the default tiny_config(arch) of
# seed 0, converted, one thread, after eval(V1_PROMPT), with the AVX-512 kernel set
# (the best set then). Their state is that set's bits: re-evaluating V1_PROMPT gives
# the same bits only with it (other sets sum in other orders), so the test runs it.
V1_PROMPT = [17, 301, 5, 88, 450]
DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe"])
def test_version1_snapshot_loads(converted, arch: str) -> None:
    """A version-1 file of every first family loads, and decoding continues bit for bit
    as after re-evaluating its tokens; saving it again writes version 2."""
    from moeflux import _diag

    if "avx512" not in _diag.kernels():
        pytest.skip("the v1 files hold the AVX-512 kernel set's bits; this CPU lacks it")
    snap = (DATA / f"snapshot_v1_{arch}.mflx").read_bytes()
    assert struct.unpack_from("<II", snap, 4) == (1, 34)
    src, dst = converted(arch)
    m = open_model(dst, threads=1, backend="cpu:avx512")
    try:
        m.load_state(snap)
        assert m.n_past == len(V1_PROMPT)
        loaded = m.eval(CONT, all_logits=True)
        m.reset()
        m.eval(V1_PROMPT)
        fresh = m.eval(CONT, all_logits=True)
        assert np.array_equal(loaded, fresh), f"{arch}: logits after a v1 load differ"
        m.load_state(snap)
        again = m.save_state()
        assert struct.unpack_from("<I", again, 4)[0] == 2
        m.reset()
        m.load_state(again)
        assert np.array_equal(m.eval(CONT, all_logits=True), fresh)
    finally:
        m.close()


def test_empty_sequence_snapshot(arch_model) -> None:
    arch, src, m = arch_model
    m.reset()
    empty = m.save_state()
    m.eval(PROMPT)
    m.load_state(empty)
    assert m.n_past == 0
    assert_close(m.eval(PROMPT, all_logits=True), reference_logits(src, PROMPT),
                 f"{arch} after loading an empty snapshot")


# ---- refusals

def _expect_refused(m, blob: bytes, exc: type, before: bytes, what: str,
                    match: str | None = None) -> None:
    with pytest.raises(exc, match=match):
        m.load_state(blob)
    assert m.save_state() == before, f"{what}: the context changed"


def test_header_fields_refused(arch_model) -> None:
    """Each header field changed: unsealed -> FormatError (checksum); resealed -> the
    refusal that field deserves."""
    arch, src, m = arch_model
    m.reset()
    m.eval(PROMPT)
    snap = m.save_state()
    body = snap[:-8]
    n_seg = n_seg_of(snap)
    IDENT = ident_of(arch)
    assert struct.unpack_from("<II", snap, 4) == (2, len(IDENT))
    OFF_N_PAST, OFF_N_SEG, OFF_TABLE = off_n_past(snap), off_n_seg(snap), off_table(snap)

    def patched(off: int, fmt: str, value: int) -> bytes:
        b = bytearray(body)
        struct.pack_into(fmt, b, off, value)
        return bytes(b)

    # Magic and version.
    bad = b"MFLY" + body[4:]
    _expect_refused(m, bad + snap[-8:], FormatError, snap, "magic")
    _expect_refused(m, reseal(bad), FormatError, snap, "magic resealed", "magic")
    _expect_refused(m, reseal(patched(4, "<I", 3)), UnsupportedError, snap, "version 3",
                    "newer")
    # Read as version 1: its 34 fields are not this header's.
    _expect_refused(m, reseal(patched(4, "<I", 1)), FormatError, snap, "version 1")
    _expect_refused(m, reseal(patched(4, "<I", 0)), FormatError, snap, "version 0")
    _expect_refused(m, reseal(patched(8, "<I", len(IDENT) + 1)), FormatError, snap,
                    "n_ident")
    # Every identity field: another model.
    for i, name in enumerate(IDENT):
        off = OFF_IDENT + 8 * i
        (value,) = struct.unpack_from("<q", body, off)
        changed = patched(off, "<q", value ^ 0x10)
        _expect_refused(m, changed + snap[-8:], FormatError, snap, f"{name} unsealed",
                        "checksum")
        _expect_refused(m, reseal(changed), StateError, snap, f"{name} resealed",
                        "model" if i == 0 else name)
    # n_past: one more than the data holds; more than n_ctx.
    _expect_refused(m, reseal(patched(OFF_N_PAST, "<I", len(PROMPT) + 1)), FormatError,
                    snap, "n_past + 1")
    _expect_refused(m, reseal(patched(OFF_N_PAST, "<I", m.n_ctx + 1)), StateError, snap,
                    "n_past > n_ctx", "n_ctx")
    _expect_refused(m, reseal(patched(OFF_N_SEG, "<I", n_seg + 1)), StateError, snap,
                    "n_seg")
    # Every field of every segment-table row.
    for s in range(n_seg):
        row = OFF_TABLE + SEG_ROW * s
        kind, layer, row_b, fixed_b, data_b = struct.unpack_from("<IIQQQ", body, row)
        for off, fmt, value, exc in [(row, "<I", kind + 1, StateError),
                                     (row + 4, "<I", layer + 1, StateError),
                                     (row + 8, "<Q", row_b + 4, StateError),
                                     (row + 16, "<Q", fixed_b + 4, StateError),
                                     (row + 24, "<Q", data_b + 4, FormatError)]:
            changed = patched(off, fmt, value)
            _expect_refused(m, changed + snap[-8:], FormatError, snap,
                            f"segment {s} @{off - row} unsealed")
            _expect_refused(m, reseal(changed), exc, snap, f"segment {s} @{off - row}")
    # Data bytes appended or removed, resealed: the table no longer adds up.
    _expect_refused(m, reseal(body + b"\0" * 4), FormatError, snap, "4 bytes more")
    _expect_refused(m, reseal(body[:-4]), FormatError, snap, "4 bytes fewer")
    got = m.eval(CONT, all_logits=True)
    assert_close(got, reference_logits(src, PROMPT + CONT)[len(PROMPT):],
                 f"{arch} after refusals")


def test_truncated_and_flipped_refused(arch_model) -> None:
    arch, src, m = arch_model
    m.reset()
    m.eval(PROMPT)
    snap = m.save_state()
    n_seg = n_seg_of(snap)
    table = off_table(snap)
    cuts = {0, 1, 3, 4, 8, 11, 12, off_n_past(snap), table, table + SEG_ROW * n_seg,
            len(snap) - 9, len(snap) - 8, len(snap) - 1}
    cuts.update(range(0, len(snap), max(1, len(snap) // 40)))
    for cut in sorted(c for c in cuts if 0 <= c < len(snap)):
        _expect_refused(m, snap[:cut], FormatError, snap, f"cut at {cut}")
    rng = np.random.default_rng(7)
    for pos in rng.integers(0, len(snap), size=150):
        bit = int(rng.integers(0, 8))
        b = bytearray(snap)
        b[pos] ^= 1 << bit
        version = struct.unpack_from("<I", b, 4)[0]
        exc = UnsupportedError if 4 <= pos < 8 and version > 1 else FormatError
        _expect_refused(m, bytes(b), exc, snap, f"bit {bit} of byte {pos}")
    assert_close(m.eval(CONT, all_logits=True),
                 reference_logits(src, PROMPT + CONT)[len(PROMPT):],
                 f"{arch} after refusals")


def _foreign_snapshot(path: Path) -> bytes:
    o = open_model(path)
    try:
        o.eval(PROMPT[:4])
        return o.save_state()
    finally:
        o.close()


def _refuse_foreign(converted, foreign: bytes, why: str) -> None:
    src, dst = converted("qwen3_5_moe")
    m = open_model(dst)
    try:
        m.eval(PROMPT)
        before = m.save_state()
        _expect_refused(m, foreign, StateError, before, why, why)
        assert_close(m.eval(CONT, all_logits=True),
                     reference_logits(src, PROMPT + CONT)[len(PROMPT):],
                     "after a foreign snapshot")
    finally:
        m.close()


@pytest.mark.parametrize("what", ["seed", "shape"])
def test_same_arch_other_model_refused(converted, what: str) -> None:
    """Other weights of the same layout (another seed), or another shape."""
    if what == "seed":
        path, why = converted("qwen3_5_moe", seed=1)[1], "weights fingerprint"
    else:
        path, why = converted("qwen3_5_moe", moe_intermediate_size=128)[1], \
            "moe_intermediate_size"
    _refuse_foreign(converted, _foreign_snapshot(path), why)


@pytest.mark.parametrize("arch", [a for a in CPU_ARCHS if a != "qwen3_5_moe"])
def test_other_arch_refused(converted, arch: str) -> None:
    """A snapshot of another architecture, loaded into qwen3_5_moe."""
    foreign = _foreign_snapshot(converted(arch)[1])
    _refuse_foreign(converted, foreign, f"snapshot is of model {arch}")


# ---- truncation

def test_truncate(arch_model) -> None:
    """Evaluate in three calls; truncating to each call boundary (and, attention-only,
    to any position) equals a fresh evaluation of that prefix with the same call
    boundaries, and mlx-lm. Hybrid truncation elsewhere is refused, unchanged."""
    arch, src, m = arch_model
    cuts = [5, 8, len(PROMPT)]

    def fresh(n: int) -> np.ndarray:
        m.reset()
        start = 0
        for c in [c for c in cuts if c < n] + [n]:
            m.eval(PROMPT[start:c])
            start = c
        return m.eval(CONT, all_logits=True)

    def prefix_then(n: int) -> None:
        m.reset()
        start = 0
        for c in cuts:
            m.eval(PROMPT[start:c])
            start = c
        m.truncate(n)
        assert m.n_past == n

    for n in [8, 5]:
        want = fresh(n)
        prefix_then(n)
        got = m.eval(CONT, all_logits=True)
        assert np.array_equal(got, want), f"{arch}: truncate({n}) is not exact"
        assert_close(got, reference_logits(src, PROMPT[:n] + CONT)[n:],
                     f"{arch} truncate({n})")
    # Two truncations in a row: to 8, then to 5 (checkpoint 5 is still held).
    prefix_then(8)
    m.truncate(5)
    assert np.array_equal(m.eval(CONT, all_logits=True), fresh(5))
    for n in [1, 6, 10]:
        prefix_then(len(PROMPT))
        if arch in HYBRID:
            before = m.save_state()
            with pytest.raises(StateError, match="checkpoint") as info:
                m.truncate(n)
            held = re.search(r"held: ([0-9, ]+)", str(info.value))
            assert held and {int(x) for x in held.group(1).split(",")} == set(cuts)
            assert m.save_state() == before
        else:
            m.truncate(n)
            got = m.eval(CONT, all_logits=True)
            assert_close(got, reference_logits(src, PROMPT[:n] + CONT)[n:],
                         f"{arch} truncate({n})")
    # 0 is a reset, always exact; beyond n_past is an argument error.
    prefix_then(0)
    after_truncate = m.eval(CONT, all_logits=True)
    m.reset()
    assert np.array_equal(after_truncate, m.eval(CONT, all_logits=True))
    with pytest.raises(ArgumentError):
        m.truncate(m.n_past + 1)
    with pytest.raises(ArgumentError):
        m.truncate(-1)


def test_truncate_after_load_and_ring(converted) -> None:
    """A loaded snapshot point is a truncation target; the most recent evaluation end
    points are kept (up to the ring size), older ones are refused."""
    src, dst = converted("qwen3_5_moe")
    m = open_model(dst)
    try:
        m.eval(PROMPT)
        snap = m.save_state()
        want = m.eval(CONT, all_logits=True)
        m.reset()
        m.load_state(snap)
        m.eval(CONT)
        m.truncate(len(PROMPT))
        assert np.array_equal(m.eval(CONT, all_logits=True), want)
        # One token per call: every position is an end point, the recent ones kept.
        m.reset()
        for t in PROMPT:
            m.eval([t])
        held = []
        for n in range(len(PROMPT) - 1, 0, -1):
            try:
                m.truncate(n)
            except StateError:
                break
            held.append(n)
        assert len(held) >= 4, f"too few checkpoints kept: {held}"
        n = held[-1]
        assert_close(m.eval(CONT, all_logits=True),
                     reference_logits(src, PROMPT[:n] + CONT)[n:], f"truncate({n})")
        # Fewer checkpoints, or none.
        m.set_checkpoints(2)
        m.reset()
        for t in PROMPT:
            m.eval([t])
        m.truncate(len(PROMPT) - 1)
        with pytest.raises(StateError):
            m.truncate(len(PROMPT) - 3)
        m.set_checkpoints(-1)
        m.eval(CONT[:1])
        with pytest.raises(StateError, match="off"):
            m.truncate(len(PROMPT) - 1)
        with pytest.raises(ArgumentError):
            m.set_checkpoints(65)
        m.set_checkpoints(0)
    finally:
        m.close()


def test_snapshot_file_in_another_process(converted, tmp_path: Path) -> None:
    """A snapshot file written here continues bit for bit in a fresh process (nothing
    process-specific, such as addresses, leaks into it)."""
    import subprocess
    import sys

    src, dst = converted("qwen3_5_moe")
    m = open_model(dst)
    try:
        m.eval(PROMPT)
        m.save_state(tmp_path / "s.mflx")
        want = m.eval(CONT, all_logits=True)
    finally:
        m.close()
    code = ("import sys, numpy as np, moeflux\n"
            "m = moeflux.Model(sys.argv[1])\n"
            "m.load_state(sys.argv[2])\n"
            "np.save(sys.argv[3], m.eval([int(t) for t in sys.argv[4].split(',')],"
            " all_logits=True))\n")
    out = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, "-c", code, str(dst), str(tmp_path / "s.mflx"),
                        str(out), ",".join(map(str, CONT))], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out), want)


def test_load_state_file_errors(converted, tmp_path: Path) -> None:
    """Files: an empty or truncated snapshot file is refused (FormatError), a missing
    one raises OSError; the sequence stays as it was."""
    src, dst = converted("qwen3_5_moe")
    m = open_model(dst)
    try:
        m.eval(PROMPT)
        snap = m.save_state(tmp_path / "ok.mflx")
        (tmp_path / "empty.mflx").write_bytes(b"")
        (tmp_path / "short.mflx").write_bytes(snap[:-100])
        for name in ["empty.mflx", "short.mflx"]:
            with pytest.raises(FormatError):
                m.load_state(tmp_path / name)
            assert m.save_state() == snap
        with pytest.raises(OSError):
            m.load_state(str(tmp_path / "missing.mflx"))
        m.reset()
        m.load_state(str(tmp_path / "ok.mflx"))
        assert m.save_state() == snap
    finally:
        m.close()
