"""moeflux.prep.synth against mlx-lm itself.

For each architecture and several quantization settings: (a) the synthetic checkpoint
loads STRICTLY in mlx-lm, runs to finite logits, and its routers pick different experts
for different tokens with a clear k-th/(k+1)-th margin; (b) mlx-lm's own conversion
path (Model -> cast like convert -> quantize_model -> save_model/save_config) applied
to the same config yields the same tensor names, shapes, dtypes, index and config.
Plus determinism, sharding, the tokenizer, the value statistics and the CLI.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

from moeflux.prep import synth
from moeflux.prep.safetensors_io import Checkpoint, bf16_to_f32

mx.set_default_device(mx.cpu)

TOKENS = [1, 50, 300, 7, 99, 260, 12, 400, 33, 5, 77, 141, 222, 18, 350, 64]

# (arch, overrides): group sizes 32/64/128, 3/4/6/8 bits, with and without router
# overrides, dense layers, tied embeddings, both MLA forms and q_lora_rank null.
CASES = [
    ("qwen3_5_moe", {}),
    ("qwen3_5_moe", {"group_size": 32, "bits": 8, "gate_bits": None}),
    ("qwen3_5_moe", {"group_size": 128, "gate_bits": 4, "tie_word_embeddings": True}),
    ("qwen3_next", {}),
    ("qwen3_next", {"group_size": 128, "mlp_only_layers": [1]}),
    ("qwen3_next", {"group_size": 32, "bits": 8, "gate_bits": None,
                    "decoder_sparse_step": 2}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"mla_form": "kv_b_proj"}),
    ("deepseek_v3", {"q_lora_rank": None, "group_size": 32, "bits": 8}),
    # gs 128 leaves embed_q (in = nope 64) and q_b_proj (in = q_lora 64) in float,
    # exactly as quantize_model does.
    ("deepseek_v3", {"group_size": 128, "mla_form": "kv_b_proj"}),
    ("deepseek_v3", {"group_size": 128}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"group_size": 128, "bits": 8, "gate_bits": None,
                   "tie_word_embeddings": True}),
    ("qwen3_moe", {"group_size": 32, "bits": 3, "mlp_only_layers": [0]}),
    ("qwen3_moe", {"bits": 6, "gate_bits": 4}),
    # gs 128 leaves the experts' down_proj (in = intermediate_size 64) in float.
    ("minimax", {}),
    ("minimax", {"group_size": 128, "use_qk_norm": False, "tie_word_embeddings": True}),
    ("minimax", {"group_size": 32, "bits": 3, "gate_bits": 6}),
]
IDS = [f"{a}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "default")
       for a, o in CASES]


# ==== (a) strict load, finite logits, routing ====

class _Recorder(nn.Module):
    """Wraps a router module and keeps what it saw and returned."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[Any, Any]] = []

    def __call__(self, x: mx.array) -> Any:
        out = self.inner(x)
        self.calls.append((x, out))
        return out


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    ffn = [getattr(layer, "mlp", None) or layer.block_sparse_moe  # minimax's name
           for layer in model.layers]
    return [f for f in ffn if hasattr(f, "switch_mlp")]


def _topk_and_margin(scores: np.ndarray, k: int) -> tuple[list[frozenset], np.ndarray]:
    """Top-k index sets per position and the gap between the k-th and (k+1)-th score."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    srt = np.take_along_axis(scores, order, axis=-1)
    sets = [frozenset(int(i) for i in row[:k]) for row in order]
    return sets, srt[:, k - 1] - srt[:, k]


def _deepseek_selection_scores(logits: np.ndarray, bias: np.ndarray,
                               n_group: int, topk_group: int) -> np.ndarray:
    """noaux_tc selection scores (model-math §3.5): sigmoid + correction bias, experts
    of all but the best topk_group groups (by top-2 sum) set to 0 as mlx-lm does."""
    s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) + bias
    n_pos, n_exp = s.shape
    g = s.reshape(n_pos, n_group, n_exp // n_group)
    gscore = np.sort(g, axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-gscore, axis=-1, kind="stable")[:, :topk_group]
    mask = np.zeros_like(gscore, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    g = np.where(mask[..., None], g, 0.0)
    return g.reshape(n_pos, n_exp)


@pytest.mark.parametrize("arch,overrides", CASES, ids=IDS)
def test_loads_strictly_and_routes(synth_checkpoint, arch: str,
                                   overrides: dict) -> None:
    path = synth_checkpoint(arch, **overrides)
    model, config = load_model(path, strict=True)
    model.set_dtype(mx.float32)
    # The config keys mlx-lm silently defaults when misnamed (model-math §6.2).
    if arch == "deepseek_v3":
        assert type(model.model.layers[0].self_attn.rope).__name__ == "YarnRoPE"
    elif arch == "qwen3_5_moe":
        args = model.language_model.args
        assert (args.rope_theta, args.partial_rotary_factor) == (1e7, 0.25)
    elif arch == "qwen3_next":
        assert (model.args.rope_theta, model.args.partial_rotary_factor) == (1e7, 0.25)
    blocks = _moe_blocks(model)
    assert blocks, "config has no MoE layer"
    recorders = []
    for blk in blocks:
        blk.gate = _Recorder(blk.gate)
        recorders.append((blk, blk.gate))
    logits = np.array(model(mx.array([TOKENS])))
    assert logits.shape == (1, len(TOKENS), config.get("text_config", config)
                            ["vocab_size"])
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1  # not a constant output

    t = config.get("text_config", config)
    k = int(t["num_experts_per_tok"])
    varied = False
    margins = []
    for blk, rec in recorders:
        (x, out), = rec.calls
        if arch == "minimax":
            # Chosen by sigmoid(logits) + e_score_correction_bias (minimax.py).
            raw = np.array(out[0]).astype(np.float64)
            sel = 1.0 / (1.0 + np.exp(-raw)) + np.array(blk.e_score_correction_bias)
            sets, margin = _topk_and_margin(sel, k)
        elif arch == "deepseek_v3":
            gate = rec.inner
            raw = np.array((x @ gate.weight.T)[0])
            scores = _deepseek_selection_scores(
                raw, np.array(gate.e_score_correction_bias), int(t["n_group"]),
                int(t["topk_group"]))
            sets, margin = _topk_and_margin(scores, k)
            mlx_sets = [frozenset(int(i) for i in row) for row in np.array(out[0][0])]
            # Our replica of the selection must agree with mlx-lm's where the choice
            # is not a near-tie, or the margins below would measure something else.
            for s, m, ms in zip(sets, margin, mlx_sets):
                if m > 1e-4:
                    assert s == ms
        else:
            sets, margin = _topk_and_margin(np.array(out[0]), k)
        assert len(set(sets)) >= len(TOKENS) // 4, f"routing barely varies: {sets}"
        varied |= len(set(sets)) > 1
        # No expert wins every token.
        assert not frozenset.intersection(*sets), sets
        margins.append(margin)
    assert varied
    margins = np.concatenate(margins)
    # A clear margin between the k-th and (k+1)-th expert most of the time.
    assert np.mean(margins > 1e-3) >= 0.9, margins


# ==== (b) equality with mlx-lm's own conversion path ====

def _mlx_lm_checkpoint(out: Path, arch: str, overrides: dict) -> Path:
    """mlx-lm's path (model-math §6.2; convert's cast then quantize_model) for the
    same config."""
    cfg = synth.tiny_config(arch, **overrides)
    plain = copy.deepcopy(cfg)
    for key in ("quantization", "quantization_config", synth.SYNTH_KEY):
        plain.pop(key, None)
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(plain)
    model = model_cls(args_cls.from_dict(copy.deepcopy(plain)))
    # convert(): cast floating parameters to bf16 unless the model's cast_predicate
    # says to keep them (A_log for qwen3_5, e_score_correction_bias for deepseek).
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(mx.bfloat16)
        if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))
    gs = overrides.get("group_size", 64)
    bits = overrides.get("bits", 4)
    gate_bits = overrides.get("gate_bits")

    def custom_gates(path: str, _: nn.Module) -> Any:
        if gate_bits is not None and path.endswith(("mlp.gate", "block_sparse_moe.gate",
                                                    "shared_expert_gate")):
            return {"group_size": 64, "bits": gate_bits}
        return True

    # Default gate bits: mlx-lm's own model.quant_predicate (None -> the model's);
    # deepseek_v3 has none, so everything quantizable is quantized.
    predicate = None
    if arch != "deepseek_v3" and "gate_bits" in overrides:
        predicate = custom_gates
    model, qcfg = quantize_model(model, plain, gs, bits, quant_predicate=predicate)
    save_model(out, model)
    save_config(qcfg, out / "config.json")
    return out


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with Checkpoint(path) as ck:
        return {n: (i.dtype, i.shape) for n, i in ck.tensors.items()}


def _as_kv_b_proj(header: dict, cfg: dict) -> dict:
    """The old MLA form of an embed_q/unembed_out header: one kv_b_proj per layer,
    rows [h][k_nope | v] over the latent (what deepseek_v3.sanitize splits)."""
    out = {}
    nh, nope, vd = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim",
                                     "v_head_dim"))
    kv_lora = cfg["kv_lora_rank"]
    gs = cfg["quantization"]["group_size"]
    bits = cfg["quantization"]["bits"]
    for name, ent in header.items():
        if ".embed_q." in name or ".unembed_out." in name:
            if ".embed_q.weight" in name:
                base = name.replace(".embed_q.weight", ".kv_b_proj")
                if kv_lora % gs == 0:
                    out[f"{base}.weight"] = ("U32", (nh * (nope + vd),
                                                     kv_lora * bits // 32))
                    out[f"{base}.scales"] = ("BF16", (nh * (nope + vd), kv_lora // gs))
                    out[f"{base}.biases"] = ("BF16", (nh * (nope + vd), kv_lora // gs))
                else:
                    out[f"{base}.weight"] = ("BF16", (nh * (nope + vd), kv_lora))
            continue
        out[name] = ent
    return out


@pytest.mark.parametrize("arch,overrides", CASES, ids=IDS)
def test_matches_mlx_lm_layout(synth_checkpoint, tmp_path: Path, arch: str,
                               overrides: dict) -> None:
    ours = synth_checkpoint(arch, **overrides)
    theirs = _mlx_lm_checkpoint(tmp_path / "mlx", arch, overrides)
    cfg = json.loads((ours / "config.json").read_text())
    want = _header(theirs)
    if overrides.get("mla_form") == "kv_b_proj":
        want = _as_kv_b_proj(want, cfg)
    got = _header(ours)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    # config.json: the whole file equal (quantization block, its copy, every key).
    assert cfg == json.loads((theirs / "config.json").read_text())
    assert list(cfg) == sorted(cfg)
    # Index: same files, same map, same totals.
    iours = json.loads((ours / "model.safetensors.index.json").read_text())
    itheirs = json.loads((theirs / "model.safetensors.index.json").read_text())
    assert sorted(iours["weight_map"]) == sorted(want)
    assert iours["metadata"] == itheirs["metadata"]
    if overrides.get("mla_form") != "kv_b_proj":
        assert iours == itheirs
    assert sorted(p.name for p in ours.glob("model*.safetensors")) == \
        ["model.safetensors"]
    with Checkpoint(ours) as ck:
        for info in ck.files.values():
            assert info.metadata == {"format": "mlx"}


def test_kv_b_proj_equals_split_form_after_sanitize(synth_checkpoint) -> None:
    """The old-form checkpoint, through deepseek_v3.sanitize, gives the split form's
    parameter set (strict load proves it), and the split matrices are the kv_b_proj
    rows: K part transposed, V part as is."""
    path = synth_checkpoint("deepseek_v3", mla_form="kv_b_proj")
    model, cfg = load_model(path, strict=True)
    attn = model.model.layers[0].self_attn
    with Checkpoint(path) as ck:
        w = mx.array(ck.array("model.layers.0.self_attn.kv_b_proj.weight"))
        s = mx.array(bf16_to_f32(ck.array("model.layers.0.self_attn.kv_b_proj.scales")))
        b = mx.array(bf16_to_f32(ck.array("model.layers.0.self_attn.kv_b_proj.biases")))
    full = np.array(mx.dequantize(w, s, b, group_size=64, bits=4))
    nh, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
    full = full.reshape(nh, nope + cfg["v_head_dim"], cfg["kv_lora_rank"])
    eq = np.array(mx.dequantize(attn.embed_q.weight, attn.embed_q.scales.astype(
        mx.float32), attn.embed_q.biases.astype(mx.float32), group_size=64, bits=4))
    # Requantization in sanitize changes values by at most about one step.
    step = np.abs(np.array(attn.embed_q.scales.astype(mx.float32))).max()
    assert np.abs(eq - full[:, :nope, :].swapaxes(1, 2)).max() <= step


# ==== determinism, sharding, values ====

def _all_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_deterministic_by_seed(tmp_path: Path) -> None:
    cfg = synth.tiny_config("qwen3_next")
    a = _all_bytes(synth.write_checkpoint(tmp_path / "a", cfg, seed=7))
    b = _all_bytes(synth.write_checkpoint(tmp_path / "b", cfg, seed=7))
    c = _all_bytes(synth.write_checkpoint(tmp_path / "c", cfg, seed=8))
    assert a == b
    assert a.keys() == c.keys()
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["config.json"] == c["config.json"]
    # The header (names, shapes, offsets) depends on the config only.
    with Checkpoint(tmp_path / "a") as ca, Checkpoint(tmp_path / "c") as cc:
        assert ca.tensors.keys() == cc.tensors.keys()
        for name, info in ca.tensors.items():
            assert (info.dtype, info.shape, info.begin) == \
                (cc.tensors[name].dtype, cc.tensors[name].shape, cc.tensors[name].begin)
        diff = [n for n in ca.tensors if ca.read(n) != cc.read(n)]
        assert len(diff) == len(ca.tensors)  # every tensor depends on the seed


def test_refuses_a_checkpoint_larger_than_the_disk(tmp_path: Path) -> None:
    """write_checkpoint checks the free space before it writes a byte (it used to
    fail gigabytes in with ENOSPC, leaving a partial shard). The request is twice the
    file system's whole size, so it is refused on any machine."""
    import shutil

    from moeflux.errors import MoefluxError
    from moeflux.prep._common import PrepIOError

    per_layer = synth.checkpoint_bytes(synth.tiny_config(
        "qwen3_moe", num_hidden_layers=1, hidden_size=4096, num_experts=512,
        moe_intermediate_size=4096))
    layers = 2 * shutil.disk_usage(tmp_path).total // per_layer + 1
    cfg = synth.tiny_config("qwen3_moe", num_hidden_layers=int(layers),
                            hidden_size=4096, num_experts=512,
                            moe_intermediate_size=4096)
    assert synth.checkpoint_bytes(cfg) > 2 * shutil.disk_usage(tmp_path).total
    with pytest.raises(PrepIOError, match="GB free") as exc:
        synth.write_checkpoint(tmp_path / "big", cfg)
    assert isinstance(exc.value, MoefluxError)
    assert list((tmp_path / "big").iterdir()) == []


def test_sharding_like_save_model(tmp_path: Path) -> None:
    cfg = synth.tiny_config("qwen3_5_moe")
    one = synth.write_checkpoint(tmp_path / "one", cfg, seed=3)
    many = synth.write_checkpoint(tmp_path / "many", cfg, seed=3,
                                  max_shard_bytes=300_000)
    files = sorted(p.name for p in many.glob("model*.safetensors"))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    with Checkpoint(one) as c1, Checkpoint(many) as cn:
        assert c1.tensors.keys() == cn.tensors.keys()
        for name in c1.tensors:
            assert c1.read(name) == cn.read(name), name
            assert index["weight_map"][name] == cn.info(name).path.name
        # mlx-lm's make_shards: a new file starts only when the next tensor would
        # not fit, and no file but a single-tensor one exceeds the limit.
        for f in cn.files.values():
            size = sum(i.nbytes for i in f.tensors.values())
            assert size <= 300_000 or len(f.tensors) == 1
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    m1, _ = load_model(one, strict=True)
    mn, _ = load_model(many, strict=True)
    toks = mx.array([TOKENS[:6]])
    np.testing.assert_array_equal(np.array(m1(toks).astype(mx.float32)),
                                  np.array(mn(toks).astype(mx.float32)))


@pytest.mark.parametrize("bits,gs", [(4, 64), (8, 32), (3, 128)])
def test_dequantized_statistics(tmp_path: Path, bits: int, gs: int) -> None:
    """Dequantized weights: zero mean and std gain/sqrt(n_in); scales of both signs;
    floats randomised (norms in 0.5..1.5, never all ones)."""
    cfg = synth.tiny_config("qwen3_moe", bits=bits, group_size=gs, gate_bits=None)
    path = synth.write_checkpoint(tmp_path / "m", cfg, seed=1)
    with Checkpoint(path) as ck:
        for base, n_in, gain in [("model.layers.0.self_attn.q_proj", 256, 1.0),
                                 ("model.layers.0.mlp.switch_mlp.down_proj", 64, 1.0),
                                 ("model.layers.0.mlp.gate", 256, synth.GAIN_ROUTER)]:
            if n_in % gs:
                assert base + ".scales" not in ck  # left in float, as mlx-lm does
                continue
            s = bf16_to_f32(ck.array(base + ".scales"))
            b = bf16_to_f32(ck.array(base + ".biases"))
            w = mx.dequantize(mx.array(ck.array(base + ".weight")), mx.array(s),
                              mx.array(b), group_size=gs, bits=bits)
            w = np.array(w)
            target = gain / np.sqrt(n_in)
            assert abs(w.std() / target - 1.0) < 0.15, (base, w.std(), target)
            # Zero mean up to sampling noise: 4 standard errors of the codes' mean
            # plus of the per-group mean jitter (std 0.05 * target per group).
            tol = 4 * target * (1 / np.sqrt(w.size) + 0.05 / np.sqrt(s.size))
            assert abs(w.mean()) < tol, (base, w.mean(), tol)
            assert (s < 0).any() and (s > 0).any()
        norm = bf16_to_f32(ck.array("model.layers.0.input_layernorm.weight"))
        assert 0.5 <= norm.min() < norm.max() <= 1.5 and norm.std() > 0.1


def test_float_tensor_dtypes_and_ranges(synth_checkpoint) -> None:
    with Checkpoint(synth_checkpoint("qwen3_5_moe")) as ck:
        la = "language_model.model.layers.0.linear_attn"
        assert ck.info(f"{la}.A_log").dtype == "F32"
        a = np.exp(ck.array(f"{la}.A_log"))
        assert (a >= 1.0).all() and (a <= 16.0).all() and a.std() > 0
        dt = bf16_to_f32(ck.array(f"{la}.dt_bias"))
        assert dt.std() > 0 and not np.allclose(dt, 1.0)
        # conv_dim = 2 * nk * dk + nv * dv = 2*2*64 + 4*64
        assert ck.info(f"{la}.conv1d.weight").shape == (512, 4, 1)
    with Checkpoint(synth_checkpoint("qwen3_next")) as ck:
        assert ck.info("model.layers.0.linear_attn.A_log").dtype == "BF16"
    with Checkpoint(synth_checkpoint("deepseek_v3")) as ck:
        gw = bf16_to_f32(ck.array("model.layers.1.mlp.gate.weight"))
        cb = ck.array("model.layers.1.mlp.gate.e_score_correction_bias")
        assert ck.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == "F32"
        assert gw.std() > 0.05 and (np.abs(cb) > 0.01).all()


# ==== tokenizer ====

def test_tokenizer_loads_and_round_trips(synth_checkpoint) -> None:
    from tokenizers import Tokenizer

    path = synth_checkpoint("qwen3_moe")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert tok.get_vocab_size() <= vocab
    for text in ["Hello, world!", "The capital of France is Paris.",
                 "naïve café — 日本語 🙂\n\ttabs  and  spaces", ""]:
        ids = tok.encode(text).ids
        assert all(0 <= i < vocab for i in ids)
        assert tok.decode(ids) == text
    # Merges are used: common words are fewer tokens than bytes.
    assert len(tok.encode("The quick brown fox").ids) < len("The quick brown fox")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 257 and 258 in ids
    tc = json.loads((path / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and tc["bos_token"] == "<|endoftext|>"
    assert tok.token_to_id(tc["eos_token"]) == synth.EOS_ID
    assert "<|im_start|>" in tc["chat_template"]


def test_tokenizer_fits_small_and_large_vocab() -> None:
    from tokenizers import Tokenizer

    for vocab in (259, 300, 248320):
        spec = synth.build_tokenizer_json(vocab)
        tok = Tokenizer.from_str(json.dumps(spec))
        assert max(spec["model"]["vocab"].values()) < vocab
        assert tok.decode(tok.encode("abc def").ids) == "abc def"
    with pytest.raises(synth.SynthError):
        synth.build_tokenizer_json(258)


def test_chat_template_renders(synth_checkpoint) -> None:
    import jinja2

    tc = json.loads((synth_checkpoint("qwen3_moe") / "tokenizer_config.json")
                    .read_text())
    out = jinja2.Template(tc["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ==== config API and CLI ====

def test_tiny_config_rejects_bad_requests() -> None:
    with pytest.raises(synth.SynthError):
        synth.tiny_config("llama")
    with pytest.raises(synth.SynthError):
        synth.tiny_config("qwen3_moe", bits=7)
    with pytest.raises(synth.SynthError):
        synth.tiny_config("qwen3_moe", group_size=16)
    with pytest.raises(synth.SynthError):
        synth.tiny_config("deepseek_v3", gate_bits=8)
    with pytest.raises(synth.SynthError):
        synth.tiny_config("deepseek_v3", mla_form="fused")
    with pytest.raises(synth.SynthError):
        synth.tiny_config("qwen3_moe", mla_form="kv_b_proj")


def test_tiny_config_overrides_are_consistent() -> None:
    cfg = synth.tiny_config("qwen3_5_moe", num_hidden_layers=8, vocab_size=1000)
    t = cfg["text_config"]
    assert t["num_hidden_layers"] == 8 and t["vocab_size"] == 1000
    assert t["layer_types"].count("full_attention") == 2
    assert "language_model.model.layers.7.mlp.gate" in cfg["quantization"]
    assert cfg["quantization"] == cfg["quantization_config"]
    nxt = synth.tiny_config("qwen3_next", mlp_only_layers=[0], gate_bits=None)
    assert set(nxt["quantization"]) == {"group_size", "bits", "mode"}


def test_cli_and_preset(tmp_path: Path) -> None:
    out = tmp_path / "preset"
    # 4 layers: mlx-lm's qwen3_5 needs one full-attention layer (every 4th).
    cmd = [sys.executable, "-m", "moeflux.prep", "synth", "--preset",
           "qwen36-35b-a3b-shapes", "--layers", "4", "--set", "num_experts=16",
           "--set", "num_experts_per_tok=4", "--set", "vocab_size=1024", "--out", str(out), "--no-progress",
           "--seed", "5"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["text_config"]
    assert (t["hidden_size"], t["num_experts"], t["vocab_size"]) == (2048, 16, 1024)
    assert (t["num_hidden_layers"], t["num_experts_per_tok"]) == (4, 4)
    assert (t["linear_num_value_heads"], t["head_dim"]) == (32, 256)
    # The worked example of model-math §5.1 (Qwen3.6-35B-A3B, 4-bit gs64).
    p = "language_model.model.layers.0."
    want = {
        "linear_attn.in_proj_qkv.weight": ("U32", (8192, 256)),
        "linear_attn.in_proj_qkv.scales": ("BF16", (8192, 32)),
        "linear_attn.conv1d.weight": ("BF16", (8192, 4, 1)),
        "mlp.switch_mlp.gate_proj.weight": ("U32", (16, 512, 256)),
        "mlp.switch_mlp.gate_proj.scales": ("BF16", (16, 512, 32)),
        "mlp.switch_mlp.down_proj.weight": ("U32", (16, 2048, 64)),
        "mlp.switch_mlp.down_proj.scales": ("BF16", (16, 2048, 8)),
        "mlp.gate.weight": ("U32", (16, 512)),
        "mlp.gate.scales": ("BF16", (16, 32)),
        "mlp.shared_expert_gate.weight": ("U32", (1, 512)),
        "linear_attn.A_log": ("F32", (32,)),
    }
    got = _header(out)
    for name, ent in want.items():
        assert got[p + name] == ent, name
    model, _ = load_model(out, strict=True)
    model.set_dtype(mx.float32)
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3, 4, 5]])))).all()

    bad = subprocess.run([sys.executable, "-m", "moeflux.prep", "synth", "--out",
                          str(tmp_path / "x")], capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"give --arch or --preset" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "moeflux.prep", "synth", "--arch",
                          "qwen3_moe", "--set", "bits=7", "--out", str(tmp_path / "x")],
                         capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"bits=7" in bad.stderr


# ==== the oracle harness ====

@pytest.mark.parametrize("arch", synth.ARCHITECTURES)
def test_reference_decode_agrees_with_prefill(synth_checkpoint, arch: str) -> None:
    """reference_decode (cached, one token at a time) and reference_logits (one
    uncached prefill) are two mlx-lm code paths; they must give the same logits."""
    from reference import reference_decode, reference_logits

    path = synth_checkpoint(arch)
    prompt, cont = TOKENS[:9], TOKENS[9:13]
    full = reference_logits(path, prompt + cont)
    assert full.dtype == np.float32 and full.shape[0] == len(prompt) + len(cont)
    dec = reference_decode(path, prompt, cont)
    assert dec.shape == (len(cont) + 1, full.shape[1])
    np.testing.assert_allclose(dec, full[len(prompt) - 1:], rtol=1e-4, atol=1e-4)


def test_unquantized_config_loads(tmp_path: Path) -> None:
    """No quantization block: every Linear/Embedding is a BF16 float weight, as an
    unquantized mlx-lm save would be, and it loads strictly."""
    cfg = synth.tiny_config("qwen3_moe")
    for key in ("quantization", "quantization_config"):
        cfg.pop(key)
    path = synth.write_checkpoint(tmp_path / "f", cfg)
    hdr = _header(path)
    assert not any(n.endswith(".scales") for n in hdr)
    assert hdr["model.embed_tokens.weight"] == ("BF16", (512, 256))
    assert "quantization" not in json.loads((path / "config.json").read_text())
    model, _ = load_model(path, strict=True)
    model.set_dtype(mx.float32)
    assert np.isfinite(np.array(model(mx.array([TOKENS])))).all()


def test_mlx_lm_load_with_tokenizer_and_chat_template(synth_checkpoint) -> None:
    """mlx_lm.load (model + tokenizer through transformers) accepts the checkpoint,
    and the chat template and special ids come out as configured."""
    from mlx_lm import load

    model, tok = load(str(synth_checkpoint("qwen3_5_moe")))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                  add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == synth.EOS_ID and tok.bos_token_id == synth.BOS_ID
    assert ids[0] == 257
