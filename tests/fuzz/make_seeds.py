"""Write the fuzzing fixtures and seed corpora from the repo's own generators.

For each family a tiny checkpoint (moeflux.prep.synth) is converted
(moeflux.prep.convert); its config.json, model_weights.json and
packed_experts/layout.json become tests/fuzz/models/<family>.model (the three joined
by NUL: the config harness's input format, and the fixture the manifest and snapshot
harnesses hold fixed) and the seeds of every harness's corpus. The snapshot seeds are
written by the snapshot harness itself (FUZZ_WRITE_SEEDS), since only the engine can
make a valid one. Usage: python tests/fuzz/make_seeds.py WORKDIR (scratch space).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from moeflux.prep.convert import convert
from moeflux.prep.safetensors_io import SafetensorsFile
from moeflux.prep.synth import tiny_config, write_checkpoint

HERE = Path(__file__).resolve().parent
FAMILIES = ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe", "glm4_moe", "minimax"]
# Small widths keep the fixtures (and so each execution) small.
SMALL = {"hidden_size": 64, "vocab_size": 300, "num_hidden_layers": 2}
# The hybrids' GatedDeltaNet state is most of a snapshot: one narrow head.
HYBRID = {"full_attention_interval": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
          "linear_num_key_heads": 1, "linear_num_value_heads": 1,
          "linear_key_head_dim": 32, "linear_value_head_dim": 64}


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def family_files(arch: str, work: Path) -> tuple[bytes, bytes, bytes, Path]:
    cfg = tiny_config(arch, **SMALL, **(HYBRID if arch in ("qwen3_5_moe", "qwen3_next")
                                        else {}))
    ckpt = write_checkpoint(work / f"ckpt-{arch}", cfg)
    dst = convert(ckpt, work / f"model-{arch}", progress=False)
    # The manifest names its source checkpoint: not this machine's scratch path.
    files = [(dst / name).read_bytes().replace(str(work).encode(), b"synth")
             for name in ("config.json", "model_weights.json", "packed_experts/layout.json")]
    return files[0], files[1], files[2], ckpt


def safetensors_seeds(ckpt: Path) -> tuple[bytes, bytes]:
    """The header of the checkpoint's first shard with the data of its first tensor
    (the prep parser checks offsets against the file size), and a one-tensor file.
    The harness also reads each input as a bare header (its framed form), for which
    main() adds the headers alone."""
    shard = sorted(ckpt.glob("model*.safetensors"))[0]
    with SafetensorsFile(shard) as f:
        first = min(f.tensors.values(), key=lambda t: t.end)
    head = shard.read_bytes()[:first.end]
    hdr = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
           b'"__metadata__":{"format":"pt"}}')
    return head, struct.pack("<Q", len(hdr)) + hdr + bytes(8)


SYNTAX = ["{", "}", "[", "]", ":", ",", "\"", "null", "true", "false", "-1", "0", "1e400",
          "-0", "1.5", "4294967296", "9223372036854775808", "\\u0000", "\\ud800"]


def tokens(obj: object, out: set[str]) -> None:
    """Keys and string values of a JSON document (model names, dtypes, tensor names)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(f'"{k}"')
            tokens(v, out)
    elif isinstance(obj, list):
        for v in obj:
            tokens(v, out)
    elif isinstance(obj, str):
        out.add(f'"{obj}"')


def write_dict(path: Path, docs: list[bytes], extra: list[str]) -> None:
    out: set[str] = set()
    for d in docs:
        tokens(json.loads(d), out)
    # Tensor names are many and long: keep their distinct dotted pieces instead.
    names = {t for t in out if t.count(".") >= 2}
    out -= names
    for t in names:
        parts = t.strip('"').split(".")
        out.update([f'"{parts[0]}.', f'.{parts[-1]}"'] + [f".{p}." for p in parts[1:-1]])
    lines = ["# libFuzzer dictionary, written by make_seeds.py"]
    lines += [json.dumps(t) for t in sorted(out | set(extra) | set(SYNTAX)) if len(t) < 64]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    work = Path(sys.argv[1])
    corpus = HERE / "corpus"
    docs: list[tuple[bytes, bytes, bytes]] = []
    for i, arch in enumerate(FAMILIES):
        cfg, man, lay, ckpt = family_files(arch, work)
        model = cfg + b"\0" + man + b"\0" + lay
        put(HERE / "models" / f"{arch}.model", model)
        put(corpus / "fuzz_config" / f"{arch}.model", model)
        put(corpus / "fuzz_config" / f"{arch}-config-only.json", cfg)
        # The JSON harness gets the small files; manifests are the manifest harness's.
        put(corpus / "fuzz_manifest" / f"{arch}.manifest", bytes([i]) + man)
        n_layers = SMALL["num_hidden_layers"]
        put(corpus / "fuzz_layout" / f"{arch}.layout",
            bytes([n_layers - 1, (1 << n_layers) - 1]) + lay)
        for name, data in (("config", cfg), ("layout", lay)):
            put(corpus / "fuzz_json" / f"{arch}-{name}.json", data)
        big, small = safetensors_seeds(ckpt)
        put(corpus / "fuzz_safetensors" / f"{arch}-head.safetensors", big)
        put(corpus / "fuzz_safetensors" / "small.safetensors", small)
        put(corpus / "fuzz_safetensors" / "small-header.json", small[8:-8])
        (hlen,) = struct.unpack("<Q", big[:8])
        put(corpus / "fuzz_safetensors" / f"{arch}-header.json", big[8:8 + hlen])
        docs.append((cfg, man, lay))
    configs = [d[0] for d in docs]
    write_dict(HERE / "json.dict", configs + [d[2] for d in docs], [])
    write_dict(HERE / "config.dict", [d for t in docs for d in t], [])
    write_dict(HERE / "manifest.dict", [d[1] for d in docs],
               ['"F32"', '"F16"', '"BF16"', '"U32"', '"U8"', '"I32"'])
    write_dict(HERE / "layout.dict", [d[2] for d in docs], ['"moeflux-experts"'])


if __name__ == "__main__":
    main()
