"""Writes the mlx-lm float32 reference logits that tests/test_cuda_golden.py compares
the CUDA backend with, for machines that have a GPU but no mlx (the CUDA test machine
has no network and no mlx wheel for its platform).

For each family: the tiny synthetic checkpoint conftest's ``synth_checkpoint(arch)``
makes (seed 0, no overrides), its all-position prefill logits of FWD_PROMPT and the
logits of N_DECODE cached decode steps (tests/reference.py), and a SHA-256 of the
checkpoint's files, so the GPU side can tell that it rebuilt the same checkpoint.
Output: one .npz per family in the directory given (default .cache/cuda-goldens/, which
git ignores and the device call carries). Also, for each mixed-precision recipe of
tests/test_mixed.py, the checkpoint mlx-lm itself writes (mixed/<case>/: the GPU side
has no mlx-lm to write it) and its reference logits (mixed/<case>.npz), and the gpt-oss
checkpoint of tests/gptoss_synth.py with its reference.npz (gpt_oss/).

    .venv/bin/python tests/make_cuda_goldens.py [OUT_DIR]
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _helpers import ARCHS, FWD_PROMPT, N_DECODE, continuation  # noqa: E402
from reference import reference_decode, reference_logits  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "cuda-goldens"


def checkpoint_digest(ckpt: Path) -> str:
    """SHA-256 over the names and bytes of the checkpoint's files, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        h.update(f.relative_to(ckpt).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def make(arch: str, out: Path) -> Path:
    from moeflux.prep.synth import tiny_config, write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / arch
        write_checkpoint(ckpt, tiny_config(arch), seed=0)
        prefill = reference_logits(ckpt, FWD_PROMPT)
        n_vocab = prefill.shape[-1]
        cont = continuation(n_vocab, N_DECODE)
        decode = reference_decode(ckpt, FWD_PROMPT, cont)
        dst = out / f"{arch}.npz"
        np.savez_compressed(dst, prompt=np.array(FWD_PROMPT, np.int32),
                            cont=np.array(cont, np.int32), prefill=prefill, decode=decode,
                            digest=np.array(checkpoint_digest(ckpt)))
    return dst


def make_mixed(case_id: str, out: Path) -> Path:
    """The mlx-lm checkpoint of one test_mixed case and its reference logits."""
    import shutil

    from test_mixed import CASES, IDS, mlx_recipe_checkpoint

    _, arch, overrides, recipe = CASES[IDS.index(case_id)]
    ckpt = out / "mixed" / case_id
    if ckpt.exists():
        shutil.rmtree(ckpt)
    mlx_recipe_checkpoint(arch, ckpt, overrides, recipe)
    prefill = reference_logits(ckpt, FWD_PROMPT)
    cont = continuation(prefill.shape[-1], N_DECODE)
    decode = reference_decode(ckpt, FWD_PROMPT, cont)
    dst = out / "mixed" / f"{case_id}.npz"
    np.savez_compressed(dst, prompt=np.array(FWD_PROMPT, np.int32),
                        cont=np.array(cont, np.int32), prefill=prefill, decode=decode,
                        digest=np.array(checkpoint_digest(ckpt)), arch=np.array(arch))
    return dst


def make_gptoss(out: Path) -> Path:
    """tests/gptoss_synth.py's checkpoint, written by mlx-lm with its reference.npz."""
    import gptoss_synth

    return gptoss_synth.write_gptoss_checkpoint(out / "gpt_oss")


def main() -> None:
    from test_mixed import IDS

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    (out / "mixed").mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:
        print(make(arch, out))
    for case_id in IDS:
        print(make_mixed(case_id, out))
    print(make_gptoss(out))


if __name__ == "__main__":
    main()
