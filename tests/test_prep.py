"""Model prep (moeflux.prep convert / extract-weights / repack-experts / verify).

Every conversion is checked byte for byte against the source checkpoint read here
independently (plain file reads of the safetensors container, not prep's reader), and
the 2-bit requantization against mlx's own ``mx.dequantize`` plus a requantization
written in this file. Checkpoints come from moeflux.prep.synth (mlx-community layout)
and, for two architectures, from mlx-lm's own quantize_model + save_model.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeflux.errors import FormatError, MoefluxError, ShapeError
from moeflux.prep import repack_experts as repack_mod
from moeflux.prep.convert import convert
from moeflux.prep.verify import verify

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
EXPERT_RE = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.mlp\.switch_mlp\."
                       r"(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
COMPONENTS = [f"{p}.{q}" for p in ("gate_proj", "up_proj", "down_proj")
              for q in ("weight", "scales", "biases")]
SIZES = {"U32": 4, "F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I32": 4}


# ==== independent safetensors access (plain file reads) ====

def read_tensors(src: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in src/model*.safetensors."""
    out = {}
    for f in sorted(src.glob("model*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, ent in header.items():
            if name == "__metadata__":
                continue
            b, e = ent["data_offsets"]
            out[name] = (ent["dtype"], tuple(ent["shape"]), raw[8 + n + b:8 + n + e])
    return out


def write_tensors(dst: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]
                  ) -> None:
    """One model.safetensors holding ``tensors`` (test-side writer)."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    off = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [off, off + len(data)]}
        off += len(data)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for _, _, data in tensors.values():
            f.write(data)


def clone_checkpoint(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy of ``src`` as one shard, with tensors and/or config.json edited."""
    dst.mkdir(parents=True)
    tensors = read_tensors(src)
    if edit_tensors:
        tensors = edit_tensors(tensors) or tensors
    write_tensors(dst, tensors)
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        cfg = edit_config(cfg) or cfg
    (dst / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


# ==== the independent check of a converted directory ====

def module_quant(cfg: dict[str, Any], module: str) -> tuple[int, int]:
    q = cfg["quantization"]
    ent = q.get(module)
    if isinstance(ent, dict):
        return ent["bits"], ent["group_size"]
    return q["bits"], q["group_size"]


def skipped(name: str) -> bool:
    short = name.removeprefix("language_model.")
    return short.startswith(("mtp.", "vision_tower", "model.visual")) or \
        name.startswith(("vision_tower", "model.visual"))


def check_conversion(src: Path, dst: Path) -> None:
    """Every byte of dst against src, plus manifest fields and checksums."""
    tensors = read_tensors(src)
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    man = json.loads((dst / "model_weights.json").read_text())
    binary = (dst / "model_weights.bin").read_bytes()

    # -- model_weights: names, order, alignment, padding, bytes, bits --
    plain = sorted(n for n in tensors if not EXPERT_RE.match(n) and not skipped(n))
    assert man["num_tensors"] == len(plain)
    assert set(man["tensors"]) == {n.removeprefix("language_model.") for n in plain}
    pos = 0
    for name in plain:
        dtype, shape, data = tensors[name]
        ent = man["tensors"][name.removeprefix("language_model.")]
        want_off = (pos + 63) // 64 * 64
        assert ent["offset"] == want_off, name
        assert binary[pos:want_off] == bytes(want_off - pos), f"padding before {name}"
        if name.endswith("linear_attn.A_log") and dtype != "F32":
            src_f = np.frombuffer(data, "<u2" if dtype == "BF16" else "<f2")
            if dtype == "BF16":
                data = (src_f.astype("<u4") << 16).tobytes()
            else:
                data = src_f.astype("<f4").tobytes()
            dtype = "F32"
        assert (ent["dtype"], tuple(ent["shape"]), ent["size"]) == (dtype, shape,
                                                                    len(data)), name
        assert binary[want_off:want_off + len(data)] == data, name
        module, _, part = name.rpartition(".")
        if dtype == "U32" or f"{module}.scales" in tensors and part in ("scales",
                                                                        "biases"):
            bits, gs = module_quant(cfg, module)
            assert (ent["bits"], ent["group_size"]) == (bits, gs), name
        else:
            assert "bits" not in ent, name
        pos = want_off + len(data)
    assert len(binary) == pos

    # -- experts: layout and every byte of every layer file --
    layout = json.loads((dst / "packed_experts" / "layout.json").read_text())
    layers = sorted({int(EXPERT_RE.match(n).group(1)) for n in tensors
                     if EXPERT_RE.match(n)})
    n_exp = text.get("num_experts") or text.get("n_routed_experts")
    prefix = "language_model." if cfg["model_type"] == "qwen3_5_moe" else ""
    assert layout["format"] == "moeflux-experts" and layout["version"] == 1
    assert layout["moe_layers"] == layers
    assert layout["num_layers"] == text["num_hidden_layers"]
    assert layout["num_experts"] == n_exp
    assert [c["name"] for c in layout["components"]] == COMPONENTS
    off = 0
    per_expert = {}
    for c in layout["components"]:
        dtype, shape, data = tensors[f"{prefix}model.layers.{layers[0]}.mlp.switch_mlp."
                                     f"{c['name']}"]
        size = len(data) // n_exp
        assert (c["offset"], c["size"], c["dtype"], tuple(c["shape"])) == (
            off, size, dtype, shape[1:])
        per_expert[c["name"]] = size
        off += size
    es = layout["expert_size"]
    assert es == off
    bits, gs = module_quant(cfg, f"{prefix}model.layers.{layers[0]}.mlp.switch_mlp."
                                 "gate_proj")
    assert (layout["bits"], layout["group_size"]) == (bits, gs)
    files = sorted(p.name for p in (dst / "packed_experts").glob("layer_*.bin"))
    assert files == [f"layer_{il:02d}.bin" for il in layers]
    for il in layers:
        blob = (dst / "packed_experts" / f"layer_{il:02d}.bin").read_bytes()
        assert len(blob) == n_exp * es
        for e in range(n_exp):
            expect = b"".join(
                tensors[f"{prefix}model.layers.{il}.mlp.switch_mlp.{c}"][2]
                [e * per_expert[c]:(e + 1) * per_expert[c]] for c in COMPONENTS)
            assert blob[e * es:(e + 1) * es] == expect, (il, e)

    # -- copied files, provenance, checksums, no leftovers --
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            assert (dst / name).read_bytes() == (src / name).read_bytes()
    info = json.loads((dst / "moeflux.json").read_text())
    assert info["format_version"] == 1 and info["architecture"] == cfg["model_type"]
    assert info["source"]["path"] == str(src.resolve())
    assert sorted(f["name"] for f in info["source"]["files"]) == sorted(
        p.name for p in src.glob("model*.safetensors"))
    outputs = sorted(str(p.relative_to(dst)) for p in dst.rglob("*")
                     if p.is_file() and p.name not in ("moeflux.json",)
                     and not p.name.startswith("."))
    assert sorted(info["checksums"]) == outputs
    for rel, digest in info["checksums"].items():
        assert digest == "sha256:" + hashlib.sha256((dst / rel).read_bytes()).hexdigest()
    assert not list(dst.rglob("*.tmp"))


# ==== checkpoints ====

def mlx_checkpoint(arch: str, out: Path, gs: int | None = 64, dtype: str = "bfloat16",
                   **quant_kw: Any) -> Path:
    """A tiny checkpoint written by mlx-lm itself (model-math §6.2); ``quant_kw`` go
    to quantize_model (mode, quant_predicate)."""
    import importlib

    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save_config, save_model

    from moeflux.prep.synth import tiny_config
    cfg = tiny_config(arch)
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    mx.random.seed(0)
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    model.set_dtype(getattr(mx, dtype))
    model, qcfg = quantize_model(model, cfg, gs, None if gs is None else 4,
                                 **quant_kw)
    out.mkdir(parents=True)
    save_model(out, model)
    save_config(qcfg, out / "config.json")
    return out


CASES = [
    ("qwen3_5_moe", {}),
    ("qwen3_5_moe", {"group_size": 32}),
    ("qwen3_next", {"group_size": 128, "moe_intermediate_size": 128,
                    "gate_group_size": 32}),
    ("qwen3_next", {"mlp_only_layers": [1]}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"mla_form": "kv_b_proj", "group_size": 32}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"bits": 8, "gate_bits": 4}),
    ("qwen3_moe", {"bits": 3, "gate_bits": None, "group_size": 128,
                   "moe_intermediate_size": 128}),
]


CASE_IDS = [f"{a}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'default'}"
            for a, o in CASES]


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_convert_synth_every_byte(synth_checkpoint, tmp_path, arch, overrides):
    src = synth_checkpoint(arch, **overrides)
    dst = convert(src, tmp_path / "model", progress=False)
    check_conversion(src, dst)
    assert verify(dst, src, full=True).ok


MLX_CASES = [("qwen3_5_moe", 64, "bfloat16"), ("qwen3_next", 64, "bfloat16"),
             ("deepseek_v3", 64, "bfloat16"), ("qwen3_moe", 32, "float16"),
             ("qwen3_moe", 64, "float32")]


@pytest.mark.parametrize("arch,gs,dtype", MLX_CASES,
                         ids=[f"{a}-gs{g}-{d}" for a, g, d in MLX_CASES])
def test_convert_mlx_lm_checkpoint(tmp_path, arch, gs, dtype):
    src = mlx_checkpoint(arch, tmp_path / "src", gs, dtype)
    dst = convert(src, tmp_path / "model", progress=False)
    check_conversion(src, dst)
    man = json.loads((dst / "model_weights.json").read_text())
    want = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    assert man["tensors"]["model.norm.weight"]["dtype"] == want
    assert verify(dst, src, full=True).ok


def test_convert_sharded_and_extra_tensors(tmp_path):
    """Several shards; MTP and vision tensors skipped; BF16/F16 A_log widened; F16
    scales and F32 norms copied as they are."""
    from moeflux.prep.synth import tiny_config, write_checkpoint
    base = write_checkpoint(tmp_path / "base", tiny_config("qwen3_5_moe"), seed=3,
                            max_shard_bytes=300_000)
    assert len(list(base.glob("model-*.safetensors"))) > 2

    def edit(t):
        name0 = "language_model.model.layers.0.linear_attn.A_log"
        dt, shape, data = t[name0]
        f32 = np.frombuffer(data, "<f4")
        t[name0] = ("BF16", shape, (f32.view("<u4") >> 16).astype("<u2").tobytes())
        name1 = "language_model.model.layers.1.linear_attn.A_log"
        t[name1] = ("F16", shape, np.frombuffer(t[name1][2], "<f4").astype("<f2")
                    .tobytes())
        t["language_model.mtp.fc.weight"] = ("BF16", (4, 4), bytes(32))
        t["mtp.layers.0.norm.weight"] = ("BF16", (4,), bytes(8))
        t["vision_tower.blocks.0.attn.qkv.weight"] = ("BF16", (4, 4), bytes(32))
        t["model.visual.patch_embed.weight"] = ("F32", (2,), bytes(8))
        norm = "language_model.model.norm.weight"
        t[norm] = ("F32", t[norm][1], (np.frombuffer(t[norm][2], "<u2").astype("<u4")
                                       << 16).tobytes())
        qp = "language_model.model.layers.0.self_attn.q_proj" \
            if "language_model.model.layers.0.self_attn.q_proj.scales" in t else \
            "language_model.model.layers.3.self_attn.q_proj"
        for part in ("scales", "biases"):
            dt, shape, data = t[f"{qp}.{part}"]
            f = (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
            t[f"{qp}.{part}"] = ("F16", shape, f.astype("<f2").tobytes())
        return t
    # re-shard the edited tensors: clone writes one file, then split it again
    src = clone_checkpoint(base, tmp_path / "src", edit_tensors=edit)
    dst = convert(src, tmp_path / "model", progress=False)
    check_conversion(src, dst)
    man = json.loads((dst / "model_weights.json").read_text())
    assert not any("mtp" in n or "visual" in n or "vision" in n for n in man["tensors"])
    assert man["tensors"]["model.layers.1.linear_attn.A_log"]["dtype"] == "F32"
    dst2 = convert(base, tmp_path / "model_sharded", progress=False)
    check_conversion(base, dst2)


# ==== resume ====

def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_interrupted_after_layer_then_resumed(synth_checkpoint, tmp_path, monkeypatch):
    src = synth_checkpoint("qwen3_5_moe")
    ref = convert(src, tmp_path / "ref", progress=False)
    dst = tmp_path / "model"

    def boom(il: int) -> None:
        if il == 1:
            raise KeyboardInterrupt("injected after layer 1")
    monkeypatch.setattr(repack_mod, "_after_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, progress=False)
    monkeypatch.undo()
    exp = dst / "packed_experts"
    assert sorted(p.name for p in exp.iterdir()) == ["layer_00.bin", "layer_01.bin"]
    assert not (dst / "moeflux.json").exists()
    # a hard kill leaves a temporary behind: it must not count and must go away
    (exp / "layer_02.bin.tmp").write_bytes(b"garbage")
    kept = {p: (dst / p).stat().st_mtime_ns for p in
            ("model_weights.bin", "packed_experts/layer_00.bin",
             "packed_experts/layer_01.bin")}
    convert(src, dst, progress=False)
    for p, mtime in kept.items():
        assert (dst / p).stat().st_mtime_ns == mtime, f"{p} was rewritten"
    assert _snapshot(dst) == _snapshot(ref)
    assert not list(dst.rglob("*.tmp"))
    check_conversion(src, dst)


def _inject_mid_layer(monkeypatch, path: str, action) -> None:
    """Make ``action()`` run in the middle of layer 2's file (after 3 experts) on the
    kernel-copy path or the buffered path."""
    monkeypatch.setattr(repack_mod, "BATCH_BYTES", 1)  # one expert per batch
    if path == "buffered":
        monkeypatch.setattr(repack_mod, "USE_KERNEL_COPY", False)
        real_fill = repack_mod.fill_verbatim

        def fill(src_, plan, il, e0, e1, view):
            real_fill(src_, plan, il, e0, e1, view)
            if il == 2 and e0 == 3:
                action()
        monkeypatch.setattr(repack_mod, "fill_verbatim", fill)
    else:
        real_pf = repack_mod._prefetch

        def prefetch(src_, plan, il, e0, e1):
            if il == 2 and e0 == 4:  # experts 0..3 of layer 2 copied by now
                action()
            real_pf(src_, plan, il, e0, e1)
        monkeypatch.setattr(repack_mod, "_prefetch", prefetch)


@pytest.mark.parametrize("path", ["kernel", "buffered"])
def test_interrupted_inside_layer_leaves_nothing_finished(synth_checkpoint, tmp_path,
                                                          monkeypatch, path):
    src = synth_checkpoint("deepseek_v3")
    dst = tmp_path / "model"

    def fail() -> None:
        assert (dst / "packed_experts" / "layer_02.bin.tmp").stat().st_size > 0
        raise RuntimeError("injected mid-layer")
    _inject_mid_layer(monkeypatch, path, fail)
    with pytest.raises(RuntimeError, match="injected"):
        convert(src, dst, progress=False)
    monkeypatch.undo()
    assert not (dst / "packed_experts" / "layer_02.bin").exists()
    assert not list(dst.rglob("*.tmp"))
    assert (dst / "packed_experts" / "layer_01.bin").exists()
    assert not (dst / "moeflux.json").exists()
    convert(src, dst, progress=False)
    check_conversion(src, dst)


def test_changed_output_file_is_redone(synth_checkpoint, tmp_path):
    src = synth_checkpoint("qwen3_moe")
    dst = convert(src, tmp_path / "model", progress=False)
    p = dst / "packed_experts" / "layer_01.bin"
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    convert(src, dst, progress=False)
    check_conversion(src, dst)


# ==== refusals ====

def _assert_nothing_written(dst: Path) -> None:
    """No output at all (the empty lock file of a prep command aside)."""
    assert not dst.exists() or not [p for p in dst.rglob("*") if p.is_file()
                                    and p.name != ".moeflux-prep.lock"]


def _assert_refused(src: Path, dst: Path, exc: type[BaseException], pattern: str) -> None:
    """convert(src, dst) raises ``exc`` matching ``pattern`` before writing anything."""
    with pytest.raises(exc, match=pattern):
        convert(src, dst, progress=False)
    _assert_nothing_written(dst)


def test_refuses_unknown_model_type(synth_checkpoint, tmp_path):
    src = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "src",
                           edit_config=lambda c: {**c, "model_type": "llama"})
    _assert_refused(src, tmp_path / "model", FormatError, "model_type 'llama'")


def test_refuses_hf_per_expert_tensors(synth_checkpoint, tmp_path):
    def edit(t):
        del t["model.layers.0.mlp.switch_mlp.up_proj.weight"]
        t["model.layers.0.mlp.experts.0.up_proj.weight"] = ("BF16", (64, 256),
                                                            bytes(64 * 256 * 2))
        return t
    src = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "src",
                           edit_tensors=edit)
    _assert_refused(src, tmp_path / "model",
                    FormatError, r"mlp\.experts\.0\.up_proj\.weight")


def test_refuses_hf_fused_experts(synth_checkpoint, tmp_path):
    def edit(t):
        t["language_model.model.layers.0.mlp.experts.gate_up_proj"] = (
            "BF16", (8, 128, 256), bytes(8 * 128 * 256 * 2))
        return t
    src = clone_checkpoint(synth_checkpoint("qwen3_5_moe"), tmp_path / "src",
                           edit_tensors=edit)
    with pytest.raises(FormatError, match=r"experts\.gate_up_proj"):
        convert(src, tmp_path / "model", progress=False)


def test_refuses_hf_conv_layout(synth_checkpoint, tmp_path):
    name = "language_model.model.layers.0.linear_attn.conv1d.weight"

    def edit(t):
        dt, (c, k, one), data = t[name]
        t[name] = (dt, (c, one, k), data)
        return t
    src = clone_checkpoint(synth_checkpoint("qwen3_5_moe"), tmp_path / "src",
                           edit_tensors=edit)
    with pytest.raises(FormatError, match=re.escape(name) + r".*\[C, 1, K\]"):
        convert(src, tmp_path / "model", progress=False)


def test_refuses_non_affine_mode(synth_checkpoint, tmp_path):
    def edit_cfg(c):
        c["quantization"]["mode"] = "mxfp4"
        return c
    src = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "src",
                           edit_config=edit_cfg)
    with pytest.raises(FormatError, match="mxfp4"):
        convert(src, tmp_path / "model", progress=False)


def test_refuses_missing_biases(synth_checkpoint, tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.o_proj.biases"]
        return t
    src = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "src",
                           edit_tensors=edit)
    _assert_refused(src, tmp_path / "model", FormatError, r"o_proj\.biases.*affine")


@pytest.mark.parametrize("key,value,pattern", [
    ("num_experts", 16, r"switch_mlp\.gate_proj\.weight: shape \[8, 64, 32\], "
                        r"expected \[16, 64, 32\]"),
    ("moe_intermediate_size", 128, r"switch_mlp\.gate_proj\.weight: shape "
                                   r"\[8, 64, 32\], expected \[8, 128, 32\]"),
    ("hidden_size", 512, r"switch_mlp\.gate_proj\.weight: shape \[8, 64, 32\], "
                         r"expected \[8, 64, 64\]"),
])
def test_refuses_expert_shapes_vs_config(synth_checkpoint, tmp_path, key, value,
                                         pattern):
    src = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "src",
                           edit_config=lambda c: {**c, key: value})
    _assert_refused(src, tmp_path / "model", ShapeError, pattern)


def test_refuses_packed_cols_vs_bits(synth_checkpoint, tmp_path):
    def edit_cfg(c):
        c["quantization"]["bits"] = 8
        return c
    src = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "src",
                           edit_config=edit_cfg)
    _assert_refused(src, tmp_path / "model",
                    ShapeError, r"groups \* group_size 64 != \d+ inputs")


def test_refuses_missing_moe_layer(synth_checkpoint, tmp_path):
    src = clone_checkpoint(
        synth_checkpoint("qwen3_next"), tmp_path / "src",
        edit_tensors=lambda t: {k: v for k, v in t.items()
                                if not k.startswith("model.layers.2.mlp.switch_mlp")})
    with pytest.raises(FormatError, match=r"missing in \[2\]"):
        convert(src, tmp_path / "model", progress=False)


def test_refuses_when_disk_too_small(synth_checkpoint, tmp_path, monkeypatch):
    from moeflux.prep import _common
    src = synth_checkpoint("qwen3_moe")
    real = shutil.disk_usage
    monkeypatch.setattr(_common.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    with pytest.raises(_common.PrepIOError, match="free") as exc:
        convert(src, tmp_path / "model", progress=False)
    assert isinstance(exc.value, MoefluxError)
    _assert_nothing_written(tmp_path / "model")


# ==== verify ====

def test_verify_reports_corruption(synth_checkpoint, tmp_path):
    src = synth_checkpoint("qwen3_5_moe")
    dst = convert(src, tmp_path / "model", progress=False)
    assert verify(dst, src).ok and verify(dst).ok

    man = json.loads((dst / "model_weights.json").read_text())
    t = man["tensors"]["model.layers.2.linear_attn.out_proj.scales"]
    flip_at = t["offset"] + 5
    with open(dst / "model_weights.bin", "r+b") as f:
        f.seek(flip_at)
        b = f.read(1)
        f.seek(flip_at)
        f.write(bytes([b[0] ^ 0x10]))
    rep = verify(dst)
    assert not rep.ok and any("model_weights.bin: sha256" in p for p in rep.problems)
    rep = verify(dst, src)
    assert any(f"tensor model.layers.2.linear_attn.out_proj.scales differs from the "
               f"source at file offset {flip_at}" in p for p in rep.problems), rep

    lay = json.loads((dst / "packed_experts" / "layout.json").read_text())
    es = lay["expert_size"]
    comp = next(c for c in lay["components"] if c["name"] == "up_proj.scales")
    at = 3 * es + comp["offset"] + 7
    p = dst / "packed_experts" / "layer_01.bin"
    with open(p, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    rep = verify(dst, src, full=True)
    assert any("packed_experts/layer_01.bin: sha256" in x for x in rep.problems)
    assert any(f"layer_01.bin: layer 1 expert 3 differs from the source at file offset "
               f"{at} (component up_proj.scales byte 7)" in x for x in rep.problems), rep

    p2 = dst / "packed_experts" / "layer_02.bin"
    with open(p2, "r+b") as f:
        f.truncate(p2.stat().st_size - 100)
    rep = verify(dst)
    assert any(f"layer_02.bin: {8 * es - 100} bytes, expected 8 experts" in x
               for x in rep.problems), rep
    out = subprocess.run([PY, "-m", "moeflux.prep", "verify", str(dst), "--src",
                          str(src)], capture_output=True, text=True)
    assert out.returncode == 1 and "layer 1 expert 3" in out.stdout


def test_verify_cli_ok(synth_checkpoint, tmp_path):
    src = synth_checkpoint("qwen3_moe")
    dst = convert(src, tmp_path / "model", progress=False)
    out = subprocess.run([PY, "-m", "moeflux.prep", "verify", str(dst), "--src",
                          str(src), "--full"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (dst / "packed_experts" / "layout.json").write_text("{}")
    out = subprocess.run([PY, "-m", "moeflux.prep", "verify", str(dst)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "layout.json" in out.stdout


# ==== command lines ====

def test_command_lines(synth_checkpoint, tmp_path):
    src = synth_checkpoint("qwen3_moe")
    a = tmp_path / "a"
    r = subprocess.run([PY, "-m", "moeflux.prep", "convert", str(src), str(a),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_conversion(src, a)
    b = tmp_path / "b"
    r = subprocess.run([PY, str(REPO / "prep" / "extract_weights.py"), str(src), str(b),
                        "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([PY, "-m", "moeflux.prep.repack_experts", str(src), str(b),
                        "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for rel in ("model_weights.bin", "model_weights.json", "packed_experts/layer_00.bin",
                "packed_experts/layer_01.bin", "packed_experts/layout.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    r = subprocess.run([PY, "-m", "moeflux.prep", "convert", str(tmp_path / "nope"),
                        str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode != 0 and "config.json" in r.stderr


# ==== 2-bit ====

def _bf16_round(x: np.ndarray) -> np.ndarray:
    """f32 -> nearest bf16 (ties to even) as f32, done by mlx."""
    import mlx.core as mx
    return np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))


def _unpack2(words: np.ndarray) -> np.ndarray:
    out = np.empty(words.shape[:-1] + (words.shape[-1] * 16,), np.float32)
    for k in range(16):
        out[..., k::16] = (words >> (2 * k)) & 3
    return out


@pytest.mark.parametrize("arch,overrides", [("qwen3_5_moe", {}),
                                            ("qwen3_moe", {"group_size": 32})])
def test_two_bit_requantization(synth_checkpoint, tmp_path, arch, overrides):
    import mlx.core as mx
    src = synth_checkpoint(arch, **overrides)
    dst = convert(src, tmp_path / "model", expert_bits=2, progress=False)
    tensors = read_tensors(src)
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    gs = cfg["quantization"]["group_size"]
    lay = json.loads((dst / "packed_experts_2bit" / "layout.json").read_text())
    assert (lay["bits"], lay["group_size"]) == (2, gs)
    assert not (dst / "packed_experts").exists()
    comps = {c["name"]: c for c in lay["components"]}
    hid, inter, n_exp = text["hidden_size"], text["moe_intermediate_size"], \
        text["num_experts"]
    rows_in = {"gate_proj": (inter, hid), "up_proj": (inter, hid),
               "down_proj": (hid, inter)}
    sq = {p: [0.0, 0] for p in rows_in}
    prefix = "language_model." if arch == "qwen3_5_moe" else ""
    es = lay["expert_size"]
    for il in lay["moe_layers"]:
        blob = np.frombuffer((dst / "packed_experts_2bit" / f"layer_{il:02d}.bin")
                             .read_bytes(), np.uint8).reshape(n_exp, es)
        for proj, (rows, n_in) in rows_in.items():
            base = f"{prefix}model.layers.{il}.mlp.switch_mlp.{proj}"
            w = np.frombuffer(tensors[f"{base}.weight"][2], "<u4").reshape(
                n_exp, rows, -1)
            s, b = (mx.array(np.frombuffer(tensors[f"{base}.{k}"][2], "<u2")
                             .astype("<u4") << 16).view(mx.float32)
                    .reshape(n_exp, rows, -1) for k in ("scales", "biases"))
            x = np.array(mx.dequantize(mx.array(w), s, b, group_size=gs, bits=4))
            # independent requantization of mlx's dequantized values
            g = x.reshape(n_exp, rows, n_in // gs, gs)
            lo, hi = g.min(-1), g.max(-1)
            s2 = _bf16_round((hi - lo) / np.float32(3))
            b2 = _bf16_round(lo)
            div = np.where(s2 == 0, np.float32(1), s2)
            q = np.clip(np.rint((g - b2[..., None]) / div[..., None]), 0, 3)
            ref = (q * s2[..., None] + b2[..., None]).reshape(x.shape)
            # what the file holds, decoded here
            cw, cs, cb = (comps[f"{proj}.{k}"] for k in ("weight", "scales", "biases"))
            assert (cw["dtype"], cs["dtype"]) == ("U32", "BF16")
            words = blob[:, cw["offset"]:cw["offset"] + cw["size"]].copy().view(
                "<u4").reshape(n_exp, rows, n_in // 16)
            fs, fb = ((blob[:, c["offset"]:c["offset"] + c["size"]].copy().view("<u2")
                       .astype("<u4") << 16).view("<f4").reshape(n_exp, rows, -1)
                      for c in (cs, cb))
            np.testing.assert_array_equal(fs, s2)
            np.testing.assert_array_equal(fb, b2)
            got = (_unpack2(words).reshape(g.shape) * fs[..., None] + fb[..., None]
                   ).reshape(x.shape)
            np.testing.assert_array_equal(got, ref)
            sq[proj][0] += float(np.square(ref - x, dtype=np.float64).sum())
            sq[proj][1] += x.size
    info = json.loads((dst / "moeflux.json").read_text())
    assert info["expert_bits"] == 2 and info["expert_dir"] == "packed_experts_2bit"
    for proj, (s, n) in sq.items():
        assert info["requant_rmse"][proj] == pytest.approx((s / n) ** 0.5, rel=1e-6)
        assert info["requant_rmse"][proj] > 0
    assert verify(dst, src, full=True).ok
    r = subprocess.run([PY, "-m", "moeflux.prep", "repack-experts", str(src),
                        str(tmp_path / "cli"), "--expert-bits", "2", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "gate_proj" in r.stdout and "RMSE" in r.stdout


def test_two_bit_model_runs_like_mlx(synth_checkpoint, tmp_path):
    """End to end: the engine on packed_experts_2bit/ gives mlx-lm's logits for the
    same checkpoint whose experts are the 2-bit ones (mlx's own 2-bit
    QuantizedSwitchLinear reading our codes, scales and biases)."""
    import moeflux
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference import reference_logits

    src = synth_checkpoint("qwen3_moe")
    dst = convert(src, tmp_path / "model", expert_bits=2, progress=False)
    lay = json.loads((dst / "packed_experts_2bit" / "layout.json").read_text())
    n_exp, es = lay["num_experts"], lay["expert_size"]

    def edit(t):
        for il in lay["moe_layers"]:
            blob = np.frombuffer((dst / "packed_experts_2bit" / f"layer_{il:02d}.bin")
                                 .read_bytes(), np.uint8).reshape(n_exp, es)
            for c in lay["components"]:
                data = blob[:, c["offset"]:c["offset"] + c["size"]].tobytes()
                t[f"model.layers.{il}.mlp.switch_mlp.{c['name']}"] = (
                    c["dtype"], (n_exp, *c["shape"]), data)
        return t

    def edit_cfg(cfg):
        for il in lay["moe_layers"]:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                cfg["quantization"][f"model.layers.{il}.mlp.switch_mlp.{proj}"] = {
                    "group_size": lay["group_size"], "bits": 2}
        cfg["quantization_config"] = cfg["quantization"]
        return cfg
    ref_dir = clone_checkpoint(src, tmp_path / "ref2bit", edit_tensors=edit,
                               edit_config=edit_cfg)
    prompt = [1, 5, 77, 300, 12, 9, 411, 42, 8, 100, 250, 3]
    ref = reference_logits(ref_dir, prompt)
    with moeflux.Model(dst, threads=2, use_2bit=1) as m:
        ours = m.eval(prompt, all_logits=True)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)
    assert (err <= 1e-3).all(), err
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    # and the 2-bit experts really differ from the 4-bit ones (not a vacuous check)
    ref4 = reference_logits(src, prompt)
    assert np.abs(ref4 - ref).max() > 10 * np.abs(ours - ref).max()


def test_other_source_into_same_dir_redoes_everything(synth_checkpoint, tmp_path):
    a = synth_checkpoint("qwen3_moe")
    b = synth_checkpoint("qwen3_moe", seed=1)
    dst = convert(a, tmp_path / "model", progress=False)
    convert(b, dst, progress=False)
    check_conversion(b, dst)


def test_directory_lock(synth_checkpoint, tmp_path):
    from moeflux.prep._common import DirLock
    from moeflux.errors import MoefluxIOError
    src = synth_checkpoint("qwen3_moe")
    dst = tmp_path / "model"
    with DirLock(dst):
        with pytest.raises(MoefluxIOError, match="another moeflux.prep command"):
            convert(src, dst, progress=False)
    convert(src, dst, progress=False)
    check_conversion(src, dst)


def test_extra_layers_past_num_hidden_layers(synth_checkpoint, tmp_path):
    """DeepSeek MTP layers (numbered num_hidden_layers and up) are dropped, as
    mlx-lm does; elsewhere such a layer means config and tensors disagree."""
    def add_layer(n):
        def edit(t):
            t[f"model.layers.{n}.input_layernorm.weight"] = ("BF16", (256,), bytes(512))
            return t
        return edit
    ds = clone_checkpoint(synth_checkpoint("deepseek_v3"), tmp_path / "ds",
                          edit_tensors=add_layer(3))
    dst = convert(ds, tmp_path / "ds_model", progress=False)
    man = json.loads((dst / "model_weights.json").read_text())
    assert "model.layers.3.input_layernorm.weight" not in man["tensors"]
    assert "model.layers.2.input_layernorm.weight" in man["tensors"]
    qm = clone_checkpoint(synth_checkpoint("qwen3_moe"), tmp_path / "qm",
                          edit_tensors=add_layer(2))
    pattern = (r"model\.layers\.2\.input_layernorm\.weight: layer 2 but config.json "
               r"num_hidden_layers is 2")
    with pytest.raises(ShapeError, match=pattern):
        convert(qm, tmp_path / "qm_model", progress=False)


@pytest.mark.parametrize("path", ["kernel", "buffered"])
def test_hard_kill_then_resume(synth_checkpoint, tmp_path, path):
    """SIGKILL (no cleanup runs) in the middle of layer 2: what is on disk must not
    look finished, and a rerun completes it, reusing layers 0 and 1."""
    src = synth_checkpoint("qwen3_5_moe")
    dst = tmp_path / "model"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import pytest
from test_prep import _inject_mid_layer
from moeflux.prep.convert import convert
mp = pytest.MonkeyPatch()
_inject_mid_layer(mp, {path!r}, lambda: os.kill(os.getpid(), signal.SIGKILL))
convert({str(src)!r}, {str(dst)!r}, progress=False)
"""
    r = subprocess.run([PY, "-c", script], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    exp = dst / "packed_experts"
    assert (exp / "layer_02.bin.tmp").stat().st_size > 0
    assert sorted(p.name for p in exp.glob("*.bin")) == ["layer_00.bin", "layer_01.bin"]
    assert not (dst / "moeflux.json").exists()
    assert not (exp / "layout.json").exists()
    kept = {p: (exp / p).stat().st_mtime_ns for p in ("layer_00.bin", "layer_01.bin")}
    convert(src, dst, progress=False)
    assert {p: (exp / p).stat().st_mtime_ns for p in kept} == kept
    check_conversion(src, dst)


def test_verify_reference_layout_without_moe_layers(synth_checkpoint, tmp_path):
    """A layout.json in the reference system's form (no format/version/moe_layers):
    the layer files to check come from config.json."""
    src = synth_checkpoint("deepseek_v3")
    dst = convert(src, tmp_path / "model", progress=False)
    p = dst / "packed_experts" / "layout.json"
    lay = json.loads(p.read_text())
    for k in ("format", "version", "moe_layers"):
        del lay[k]
    p.write_text(json.dumps(lay))
    (dst / "moeflux.json").unlink()
    assert verify(dst, src).problems == ["moeflux.json: missing"]
    (dst / "packed_experts" / "layer_02.bin").unlink()
    rep = verify(dst)
    assert "packed_experts/layer_02.bin: missing (layer 2 is MoE)" in rep.problems


@pytest.mark.parametrize("module", ["convert", "extract_weights", "repack_experts",
                                    "verify"])
def test_each_module_runs_as_script_and_module(module):
    for cmd in ([PY, str(REPO / "prep" / f"{module}.py"), "--help"],
                [PY, "-m", f"moeflux.prep.{module}", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        assert r.returncode == 0 and "usage:" in r.stdout, (cmd, r.stderr)


def test_refuses_real_mxfp4_checkpoint(tmp_path):
    """mlx-lm's own non-affine (mxfp4) output: uint8 scales and no biases."""
    src = mlx_checkpoint("qwen3_moe", tmp_path / "src", None, mode="mxfp4")
    with pytest.raises(FormatError, match="mxfp4"):
        convert(src, tmp_path / "model", progress=False)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization"]["mode"], cfg["quantization_config"]
    (src / "config.json").write_text(json.dumps(cfg))
    _assert_refused(src, tmp_path / "model",
                    FormatError, r"scales: dtype U8|biases: missing")


def test_mixed_expert_bits_get_a_layer_table(tmp_path):
    """A mixed recipe (one layer's down_proj experts at 8 bits) converts into a
    version-2 layout: the default table at 4 bits, layer 1's own table with its 8-bit
    down_proj, every byte as in the source (verify --full)."""
    def pred(path, module):
        if path.endswith("layers.1.mlp.switch_mlp.down_proj"):
            return {"group_size": 64, "bits": 8}
        return True
    src = mlx_checkpoint("qwen3_moe", tmp_path / "src", quant_predicate=pred)
    dst = convert(src, tmp_path / "model", progress=False)
    lay = json.loads((dst / "packed_experts" / "layout.json").read_text())
    assert lay["version"] == 2 and list(lay["layer_components"]) == ["1"]
    down = {c["name"]: c for c in lay["layer_components"]["1"]}["down_proj.weight"]
    assert (down["mode"], down["bits"], down["group_size"]) == ("affine", 8, 64)
    assert {c["name"]: c for c in lay["components"]}["down_proj.weight"]["bits"] == 4
    rep = verify(dst, src, full=True)
    assert rep.ok, str(rep)


def test_verify_compares_large_tensors_in_chunks(synth_checkpoint, tmp_path,
                                                 monkeypatch):
    from moeflux.prep import verify as verify_mod
    monkeypatch.setattr(verify_mod, "CHUNK_BYTES", 64)
    src = synth_checkpoint("qwen3_moe")
    dst = convert(src, tmp_path / "model", progress=False)
    assert verify(dst, src).ok
    t = json.loads((dst / "model_weights.json").read_text())["tensors"][
        "model.embed_tokens.weight"]
    with open(dst / "model_weights.bin", "r+b") as f:
        f.seek(t["offset"] + 1000)
        b = f.read(1)
        f.seek(t["offset"] + 1000)
        f.write(bytes([b[0] ^ 0x5A]))
    rep = verify(dst, src)
    assert any(f"tensor model.embed_tokens.weight differs from the source at file "
               f"offset {t['offset'] + 1000} (byte 1000 of the tensor)" in p
               for p in rep.problems), rep


def test_read_back_check_blocks_publishing_a_bad_layer(synth_checkpoint, tmp_path,
                                                       monkeypatch):
    """A layer whose bytes change between writing and the rename (disk, bug) is
    caught by the read-back of experts {0, 1, mid, last} and never published."""
    from moeflux.errors import MoefluxIOError
    real = repack_mod._check_layer

    def corrupt_then_check(src_, plan, il, tmp):
        with open(tmp, "r+b") as f:
            f.seek(plan.expert_size + 3)
            b = f.read(1)
            f.seek(plan.expert_size + 3)
            f.write(bytes([b[0] ^ 1]))
        return real(src_, plan, il, tmp)
    monkeypatch.setattr(repack_mod, "_check_layer", corrupt_then_check)
    dst = tmp_path / "model"
    with pytest.raises(MoefluxIOError, match="layer 0 expert 1 reads back different"):
        convert(synth_checkpoint("qwen3_moe"), dst, progress=False)
    assert list((dst / "packed_experts").iterdir()) == []


def test_refuses_output_into_source(synth_checkpoint):
    from moeflux.errors import ArgumentError
    src = synth_checkpoint("qwen3_moe")
    with pytest.raises(ArgumentError, match="must not be the source"):
        convert(src, src, progress=False)
    assert not (src / "model_weights.bin").exists()


@pytest.mark.parametrize("arch,overrides", [CASES[0], CASES[5], CASES[8]],
                         ids=[CASE_IDS[0], CASE_IDS[5], CASE_IDS[8]])
def test_buffered_copy_path_every_byte(synth_checkpoint, tmp_path, monkeypatch, arch,
                                       overrides):
    """The portable path (no in-kernel copy: other platforms, or a destination
    sendfile cannot write) gives the same bytes."""
    from moeflux.prep import extract_weights as extract_mod
    monkeypatch.setattr(repack_mod, "USE_KERNEL_COPY", False)
    monkeypatch.setattr(extract_mod, "USE_KERNEL_COPY", False)
    src = synth_checkpoint(arch, **overrides)
    dst = convert(src, tmp_path / "model", progress=False)
    check_conversion(src, dst)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sendfile to a file "
                    "is Linux-only; elsewhere the buffered path is the only one")
def test_kernel_copy_path_is_the_one_used_on_linux(synth_checkpoint, tmp_path,
                                                   monkeypatch):
    def no(*a, **k):
        raise AssertionError("buffered path used")
    from moeflux.prep import extract_weights as extract_mod
    monkeypatch.setattr(repack_mod, "_write_layer", no)
    monkeypatch.setattr(extract_mod, "_write_bin_buffered", no)
    src = synth_checkpoint("qwen3_moe")
    check_conversion(src, convert(src, tmp_path / "model", progress=False))
