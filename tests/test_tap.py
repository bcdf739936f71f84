"""The debug tap (`make tap`, tools/tap_diff.py): every compared tap of a debug-tap
build agrees with the same mlx-lm module output, and a deliberate error in one layer's
weights is localised to that layer's first affected tap.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from _helpers import ARCHS, converted  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import tap_diff  # noqa: E402

TOKENS = "17,301,5,88,450,2,199,76"


@pytest.fixture(scope="module")
def tap_site() -> Path:
    """The tap build, made once per module (its own build dir, the live sources)."""
    subprocess.run(["make", "-s", "tap", f"PYTHON={sys.executable}"], cwd=ROOT,
                   check=True, capture_output=True)
    return ROOT / "build" / "tap-site"


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    rc = tap_diff.main(list(args))
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_agree_with_mlx(arch: str, tap_site: Path,
                             converted: Callable[..., tuple[Path, Path]],
                             capsys: pytest.CaptureFixture) -> None:
    ckpt, model = converted(arch)
    rc, out = _run(capsys, str(model), str(ckpt), "--tokens", TOKENS,
                   "--tap-site", str(tap_site))
    assert rc == 0, out
    compared = int(out.split(" taps, ")[1].split(" compared")[0])
    assert compared >= 3, out   # at least the layer, its mixer or mlp, per layer


def test_tap_localises_a_damaged_layer(tap_site: Path, tmp_path: Path,
                                       converted: Callable[..., tuple[Path, Path]],
                                       capsys: pytest.CaptureFixture) -> None:
    """Scale layer 1's post-attention norm by 1.01 in the moeflux copy only: layer 0
    still agrees, and the first tap over the bound is layer 1's mlp."""
    ckpt, src = converted("qwen3_moe")
    model = tmp_path / "model"
    shutil.copytree(src, model)
    t = json.loads((model / "model_weights.json").read_text())["tensors"][
        "model.layers.1.post_attention_layernorm.weight"]
    dt = {"F32": np.float32, "F16": np.float16}.get(t["dtype"])
    with open(model / "model_weights.bin", "r+b") as f:
        f.seek(t["offset"])
        raw = f.read(t["size"])
        if dt is None:   # BF16: widen, scale, round back by truncation of the low half
            v = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            new = ((v * 1.01).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            new = (np.frombuffer(raw, dt) * dt(1.01)).astype(dt).tobytes()
        f.seek(t["offset"])
        f.write(new)
    rc, out = _run(capsys, str(model), str(ckpt), "--tokens", TOKENS,
                   "--tap-site", str(tap_site))
    assert rc == 1, out
    assert "first tap over 0.0001: model.layers.1.mlp" in out, out
    assert all("first over" not in line for line in out.splitlines()
               if "model.layers.0" in line), out
