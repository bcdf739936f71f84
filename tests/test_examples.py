"""The examples run top to bottom: examples/quickstart.py as a script, and the code
cells of examples/quickstart.ipynb in order (exec in one namespace, as a kernel would;
no Jupyter needed), each making its tiny model in a temporary directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_quickstart_script(tmp_path: Path) -> None:
    env = dict(os.environ, MOEFLUX_QUICKSTART_DIR=str(tmp_path), PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for marker in ["qwen3_5_moe: 4 layers", "top-5 next tokens", "snapshot:",
                   "branch a:", "rewound to", "cannot rewind there exactly", "parallel:"]:
        assert marker in r.stdout, f"missing {marker!r} in:\n{r.stdout}"


def test_quickstart_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
    monkeypatch.setenv("MOEFLUX_QUICKSTART_DIR", str(tmp_path))
    namespace: dict = {"__name__": "__main__"}
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code_cells) >= 6
    for i, cell in enumerate(code_cells):
        exec(compile("".join(cell["source"]), f"quickstart.ipynb[{i}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "rewound to" in out and "branch a:" in out
    assert namespace["model"].closed and namespace["other"].closed
