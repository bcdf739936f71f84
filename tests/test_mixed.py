"""Mixed-precision expert recipes (issue #15 part 2) against mlx-lm in float32.

Each checkpoint is written by mlx-lm itself: its model class with random weights,
``quantize_model`` with a recipe (mlx-lm's own ``mixed_3_6`` predicate, or an explicit
``quant_predicate``: 3-bit experts with 6-bit attention and a float ``down_proj``; or
the group-size rule, which leaves a projection whose input size is not a multiple of
the group size in float), ``save_model`` + ``save_config``. prep converts it into a
version-2 packed_experts/layout.json (per-projection formats, per-layer tables where
the recipe changes with the layer), ``prep verify`` passes, and the engine agrees with
mlx-lm for a prompt and 32 decode steps at the CPU tier; snapshots round-trip. A
damaged layout is refused with a message naming what is wrong.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import numpy as np

from _helpers import (CONT, FWD_PROMPT, HYBRID, check_prefill_and_decode,
                      check_truncate_and_snapshot)
from reference import reference_decode, reference_logits


def _attn_6_experts_3_down_float(path: str, module: Any) -> bool | dict:
    """3-bit experts, 6-bit attention, the experts' down_proj left in float."""
    if "switch_mlp.down_proj" in path:
        return False
    if "switch_mlp" in path:
        return {"group_size": 64, "bits": 3}
    if "self_attn" in path:
        return {"group_size": 64, "bits": 6}
    return True


# (id, arch, tiny_config overrides, recipe): recipe "mixed_3_6" is mlx-lm's own
# predicate builder; a callable is passed to quantize_model as quant_predicate; None
# quantizes at 4-bit gs64 and lets the group-size rule leave modules float.
CASES: list[tuple[str, str, dict[str, Any], Any]] = [
    ("qwen3_moe-mixed_3_6", "qwen3_moe", {}, "mixed_3_6"),
    ("qwen3_moe-attn6-exp3-downfloat", "qwen3_moe", {}, _attn_6_experts_3_down_float),
    ("qwen3_moe-gsrule-downfloat", "qwen3_moe", {"moe_intermediate_size": 96}, None),
    ("deepseek_v3-mixed_3_6", "deepseek_v3", {}, "mixed_3_6"),
    ("deepseek_v3-attn6-exp3-downfloat", "deepseek_v3", {}, _attn_6_experts_3_down_float),
    ("qwen3_next-mixed_3_6", "qwen3_next", {}, "mixed_3_6"),
    ("qwen3_5_moe-attn6-exp3-downfloat", "qwen3_5_moe", {},
     _attn_6_experts_3_down_float),
    ("qwen3_5_moe-mixed_3_6", "qwen3_5_moe", {}, "mixed_3_6"),
]
IDS = [c[0] for c in CASES]


def _random_routers(model: Any) -> None:
    """deepseek_v3's MoEGate starts at zeros (every score ties, and two correct
    implementations may break the ties differently): give it weights like a trained
    router's, well apart (std 2 / sqrt(hidden)), and a small correction bias."""
    import mlx.core as mx

    for _, m in model.named_modules():
        if type(m).__name__ == "MoEGate":
            n_out, n_in = m.weight.shape
            m.weight = mx.random.normal((n_out, n_in)) * (2.0 / n_in ** 0.5)
            m.e_score_correction_bias = mx.random.normal((n_out,)) * 0.05


def mlx_recipe_checkpoint(arch: str, out: Path, overrides: dict[str, Any],
                          recipe: Any) -> Path:
    """A tiny checkpoint of ``arch`` written by mlx-lm with ``recipe``."""
    import mlx.core as mx
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model, save_config, save_model

    from moeflux.prep.synth import build_tokenizer_json, tiny_config
    cfg = tiny_config(arch, **overrides)
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    cfg.pop("_synth", None)
    mx.random.seed(1)
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    _random_routers(model)
    model.set_dtype(mx.bfloat16)
    pred = mixed_quant_predicate_builder(recipe, model) if isinstance(recipe, str) \
        else recipe
    model, qcfg = quantize_model(model, cfg, 64, 4, quant_predicate=pred)
    out.mkdir(parents=True)
    save_model(out, model)
    save_config(qcfg, out / "config.json")
    vocab = int(cfg.get("text_config", cfg)["vocab_size"])
    (out / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(vocab)))
    return out


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[[str], tuple[Path, Path]]:
    """Factory: case id -> (mlx-lm checkpoint, converted model dir), made once."""
    from moeflux.prep.convert import convert

    done: dict[str, tuple[Path, Path]] = {}

    def make(case_id: str) -> tuple[Path, Path]:
        if case_id not in done:
            _, arch, overrides, recipe = CASES[IDS.index(case_id)]
            root = tmp_path_factory.mktemp(case_id)
            ckpt = mlx_recipe_checkpoint(arch, root / "src", overrides, recipe)
            done[case_id] = (ckpt, convert(ckpt, root / "model", progress=False))
        return done[case_id]

    return make


def _layout(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "packed_experts" / "layout.json").read_text())


def _weight_formats(comps: list[dict[str, Any]]) -> dict[str, tuple]:
    return {c["name"]: (c.get("mode"), c.get("bits"), c.get("group_size"))
            for c in comps if c["name"].endswith(".weight")}


@pytest.mark.parametrize("case_id", IDS)
def test_prefill_and_decode(case_id: str, recipe_model: Any) -> None:
    """All-position prefill logits, then 32 single-token decode steps, at the CPU
    tier (RTOL_CPU, inside RTOL), argmax equal everywhere."""
    ckpt, model_dir = recipe_model(case_id)
    arch = CASES[IDS.index(case_id)][1]
    assert _layout(model_dir)["version"] == 2
    check_prefill_and_decode(model_dir, arch, lambda t: reference_logits(ckpt, t),
                             lambda p, c: reference_decode(ckpt, p, c))


def _snapshot_round_trip(model_dir: Path) -> None:
    """A snapshot after the prompt, restored, gives the same decode bits."""
    import moeflux

    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(FWD_PROMPT)
        snap = m.save_state()
        rows = [m.eval([t]) for t in CONT]
        m.load_state(snap)
        again = [m.eval([t]) for t in CONT]
    np.testing.assert_array_equal(np.stack(again), np.stack(rows))


@pytest.mark.parametrize("case_id", IDS)
def test_snapshot_round_trip_and_verify(case_id: str, recipe_model: Any) -> None:
    """Snapshots restore bit for bit (and after a truncate where the family keeps
    no recurrent state); prep verify (every expert) passes."""
    from moeflux.prep.verify import verify

    ckpt, model_dir = recipe_model(case_id)
    _snapshot_round_trip(model_dir)
    if CASES[IDS.index(case_id)][1] not in HYBRID:
        check_truncate_and_snapshot(ckpt, model_dir)
    rep = verify(model_dir, ckpt, full=True)
    assert rep.ok, str(rep)


@pytest.mark.parametrize("case_id", ["qwen3_moe-mixed_3_6",
                                     "deepseek_v3-attn6-exp3-downfloat"])
def test_resident_and_io_modes_bitwise(case_id: str, recipe_model: Any) -> None:
    """Resident experts (moe_experts_dev and one grouped call per layer, the per-layer
    views included) and the mmap reader give the streaming path's bits."""
    import moeflux

    _, model_dir = recipe_model(case_id)

    def run(**kw: Any) -> np.ndarray:
        with moeflux.Model(model_dir, threads=2, **kw) as m:
            rows = [m.eval(FWD_PROMPT, all_logits=True)]
            rows += [m.eval([t])[None] for t in CONT]
        return np.concatenate(rows)

    base = run()
    for kw in ({"gpu_experts": "resident"}, {"io_mode": "mmap"}):
        np.testing.assert_array_equal(run(**kw), base, err_msg=str(kw))


def test_layouts_say_each_format(recipe_model: Any) -> None:
    """What the converted layouts hold, read from mlx-lm's config.json recipe: the
    float down_proj, the 3-bit experts, mixed_3_6's 6-bit down_proj in the layers its
    rule picks (a per-layer table) and 3-bit in the others."""
    lay = _layout(recipe_model("qwen3_moe-attn6-exp3-downfloat")[1])
    assert _weight_formats(lay["components"]) == {
        "gate_proj.weight": ("affine", 3, 64), "up_proj.weight": ("affine", 3, 64),
        "down_proj.weight": ("float", None, None)}
    ckpt, model_dir = recipe_model("qwen3_moe-mixed_3_6")
    cfg = json.loads((ckpt / "config.json").read_text())
    lay = _layout(model_dir)
    tables = {il: lay["components"] for il in lay["moe_layers"]}
    tables.update({int(k): v for k, v in lay.get("layer_components", {}).items()})
    for il, comps in tables.items():
        q = cfg["quantization"][f"model.layers.{il}.mlp.switch_mlp.down_proj"]
        assert _weight_formats(comps)["down_proj.weight"] == ("affine", q["bits"],
                                                              q["group_size"])
    assert {_weight_formats(c)["down_proj.weight"][1] for c in tables.values()} == {3, 6}
    lay = _layout(recipe_model("qwen3_moe-gsrule-downfloat")[1])
    assert _weight_formats(lay["components"])["down_proj.weight"][0] == "float"


# ==== damaged layouts ====

def _damage(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dst)
    p = dst / "packed_experts" / "layout.json"
    lay = json.loads(p.read_text())
    edit(lay)
    p.write_text(json.dumps(lay))
    return dst


def _comp(lay: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in lay["components"] if c["name"] == name)


def _set(comp: str, **kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda lay: _comp(lay, comp).update(kv)


DAMAGE = [
    ("overlap", _set("down_proj.weight", offset=0), "FormatError",
     r"components gate_proj\.weight and down_proj\.weight overlap"),
    ("unknown-dtype", _set("down_proj.weight", dtype="Q7"), "FormatError",
     r"dtype \(F32, F16, BF16"),
    ("wrong-size", _set("up_proj.scales", size=6), "FormatError",
     r"component up_proj\.scales: size 6 bytes but shape"),
    ("unknown-mode", _set("gate_proj.weight", mode="nvfp4"), "UnsupportedError",
     r"gate_proj\.weight: mode \"nvfp4\" is not read"),
    ("affine-marked-mxfp4", _set("gate_proj.weight", mode="mxfp4"), "FormatError",
     r"gate_proj\.weight marked mxfp4: expected U32 codes .* U8 .* no gate_proj\.biases"),
    ("interleaved", _set("gate_proj.weight", interleaved=True), "UnsupportedError",
     r"interleaved gate/up rows"),
    ("bad-bits", _set("gate_proj.weight", bits=5), "FormatError",
     r"gate_proj\.weight: bits 5 / group_size 64 do not fit"),
    ("unknown-part", _set("down_proj.weight", name="down_proj.weights"), "FormatError",
     r"down_proj\.weights: expected <projection>\.weight, \.scales, \.biases or \.bias"),
    ("no-down-proj", _set("down_proj.weight", name="dn_proj.weight"), "FormatError",
     r"layer 0: component down_proj\.weight missing"),
    ("no-scales", _set("up_proj.scales", name="upx_proj.scales"), "FormatError",
     r"up_proj\.weight: U32 codes need up_proj\.scales and up_proj\.biases"),
    ("float-with-scales", _set("down_proj.weight", mode="affine"), "FormatError",
     r"down_proj\.weight: BF16 2-D marked affine"),
    ("layer-not-moe", lambda lay: lay.setdefault("layer_components", {}).update(
        {"7": lay["components"]}), "FormatError",
     r"layer_components key \"7\" is not a MoE layer"),
    ("layer-key-not-canonical", lambda lay: lay.setdefault("layer_components", {}).update(
        {"01": lay["components"]}), "FormatError",
     r"layer_components key \"01\" is not a MoE layer"),
]


@pytest.mark.parametrize("what,edit,exc,pattern", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_layout_refused(what: str, edit: Any, exc: str, pattern: str,
                                recipe_model: Any, tmp_path: Path) -> None:
    """Overlapping components, an unknown dtype or mode, a size that is not its
    shape, ...: the model refuses to open, naming the component and the problem."""
    import moeflux
    from moeflux import errors

    _, model_dir = recipe_model("qwen3_moe-attn6-exp3-downfloat")
    bad = _damage(model_dir, tmp_path / "bad", edit)
    with pytest.raises(getattr(errors, exc), match=pattern):
        moeflux.Model(bad)


def test_verify_reports_damaged_layout(recipe_model: Any, tmp_path: Path) -> None:
    from moeflux.prep.verify import verify

    ckpt, model_dir = recipe_model("qwen3_moe-attn6-exp3-downfloat")
    bad = _damage(model_dir, tmp_path / "bad", _set("down_proj.weight", offset=0))
    rep = verify(bad, ckpt)
    assert any("components gate_proj.weight and down_proj.weight overlap" in p
               for p in rep.problems), str(rep)


def test_two_bit_requant_of_a_mixed_recipe_refused(recipe_model: Any,
                                                   tmp_path: Path) -> None:
    from moeflux.errors import FormatError
    from moeflux.prep.convert import convert

    ckpt, _ = recipe_model("qwen3_moe-mixed_3_6")
    with pytest.raises(FormatError, match="expert_bits=2 requantizes experts of one "
                                          "affine format"):
        convert(ckpt, tmp_path / "m2", expert_bits=2, progress=False)
    assert not (tmp_path / "m2").exists()


# ==== per-expert output biases ====

def test_per_expert_biases(synth_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """``switch_mlp.<proj>.bias`` tensors (what gpt-oss's SwitchGLU holds after
    mlx-lm's sanitize) become ``.bias`` components of a version-2 layout that verify
    accepts; all-zero biases give the plain model's logits bit for bit, nonzero ones
    change them (no family of this build has biases, so no mlx-lm oracle here: the
    values are checked against a plain loop in tests/c/test_expert_formats.c)."""
    import moeflux
    from moeflux.prep.convert import convert
    from moeflux.prep.verify import verify
    from test_prep import clone_checkpoint

    src = synth_checkpoint("qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    E, H, I = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    rows = {"gate_proj": I, "up_proj": I, "down_proj": H}

    def with_bias(bits: int) -> Callable[[dict], dict]:
        def edit(t: dict) -> dict:
            for il in range(cfg["num_hidden_layers"]):
                for proj, r in rows.items():
                    data = np.full(E * r, bits, "<u2").tobytes()
                    t[f"model.layers.{il}.mlp.switch_mlp.{proj}.bias"] = ("BF16", (E, r),
                                                                         data)
            return t
        return edit

    def logits(model_dir: Path) -> np.ndarray:
        with moeflux.Model(model_dir, threads=2) as m:
            return m.eval(FWD_PROMPT, all_logits=True)

    plain = logits(convert(src, tmp_path / "plain", progress=False))
    out = {}
    for name, bits in (("zero", 0x0000), ("half", 0x3F00)):   # bf16 0.0 and 0.5
        ck = clone_checkpoint(src, tmp_path / f"src-{name}", edit_tensors=with_bias(bits))
        dst = convert(ck, tmp_path / name, progress=False)
        lay = _layout(dst)
        assert lay["version"] == 2 and {"gate_proj.bias", "up_proj.bias",
                                        "down_proj.bias"} <= {c["name"] for c in
                                                              lay["components"]}
        rep = verify(dst, ck, full=True)
        assert rep.ok, str(rep)
        out[name] = logits(dst)
    np.testing.assert_array_equal(out["zero"], plain)
    assert np.abs(out["half"] - plain).max() > 1e-2 * np.abs(plain).max()
