"""The CUDA backend from Python, and the checks of its kernel source that need no GPU.

Everywhere: ``moeflux.backends()``; nvcc compiles the kernels to PTX without warnings; opening a model with backend="cuda" where no CUDA
driver exists raises BackendError naming what is missing; the kernel manifest agrees
with the params structs, the kernel files and the grid functions; each kernel file
passes a Metal syntax check (clang++ against shaders/metal_stub: macro and typing
mistakes of the Metal branch, not Metal semantics); the embedded-source generator is
deterministic. On a machine with a CUDA GPU: whole models on CUDA against the CPU
backend, logits of a prompt and of decode steps.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux

ROOT = Path(__file__).resolve().parent.parent
SHADERS = ROOT / "shaders"
HAVE_CUDA = "cuda" in moeflux.backends()
KERNEL_FILES = ["quant.h", "matmul.h", "tc.h", "mma.h", "norm.h", "rope.h", "attn.h", "gdn.h",
                "elementwise.h", "moe.h", "gptoss.h", "mf_kernels.h"]


def manifest() -> list[tuple[str, str, int, str]]:
    rows = re.findall(r"^K\((\w+),\s*(\w+),\s*(\d+),\s*(\w+)\)\s*$",
                      (SHADERS / "kernels.def").read_text(), re.M)
    return [(n, p, int(b), g) for n, p, b, g in rows]


def param_structs() -> dict[str, list[str]]:
    """struct name -> field declarations, from mf_params.h."""
    text = (SHADERS / "mf_params.h").read_text()
    out = {}
    for name, body in re.findall(r"struct (\w+) \{(.*?)\};", text, re.S):
        out[name] = [d.strip() for d in body.split(";") if d.strip()]
    return out


# ---- everywhere

def test_backends_lists_cpu_first() -> None:
    names = moeflux.backends()
    assert names[0] == "cpu" and set(names) <= {"cpu", "cuda"}


@pytest.fixture(scope="module")
def model_dir(synth_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeflux.prep.convert import convert
    return convert(synth_checkpoint("qwen3_next"), tmp_path_factory.mktemp("cuda") / "m",
                   progress=False)


@pytest.mark.skipif(HAVE_CUDA, reason="a CUDA device is present")
def test_cuda_unavailable_is_a_clear_backend_error(model_dir: Path) -> None:
    with pytest.raises(moeflux.BackendError) as info:
        moeflux.Model(model_dir, backend="cuda")
    assert isinstance(info.value, moeflux.MoefluxError)
    assert "libcuda.so.1" in str(info.value)


def assert_plain(params: str, structs: dict[str, list[str]]) -> None:
    """32-bit ints and floats only, no pointers: scalars, arrays of them, or params
    structs (or arrays of them) that are themselves plain (the same layout in C, CUDA
    and MSL)."""
    for decl in structs[params]:
        m = re.fullmatch(r"struct (\w+) \w+(\[\w+\])?", decl)
        if m:
            assert m.group(1) in structs, f"{params}: {decl!r}"
            assert_plain(m.group(1), structs)
            continue
        assert re.fullmatch(r"(int|float) \w+(\[\w+( \+ \d+)?\])?(, \w+)*", decl), \
            f"{params}: {decl!r}"


def test_manifest_matches_params_kernels_and_grids() -> None:
    rows = manifest()
    structs = param_structs()
    grid = (SHADERS / "grid.h").read_text()
    sources = {f: (SHADERS / f).read_text() for f in KERNEL_FILES}
    umbrella = sources["mf_kernels.h"]
    assert len(rows) >= 19 and len({r[0] for r in rows}) == len(rows)
    for name, params, n_buf, grid_fn in rows:
        fields = structs.get(params)
        assert fields, f"{name}: params struct {params} not in mf_params.h"
        assert_plain(params, structs)
        assert re.search(rf"void {grid_fn}\(const struct {params} \*p,", grid), grid_fn
        defs = [f for f, s in sources.items() if f"MF_KERNEL({name})" in s]
        assert len(defs) == 1, f"{name} defined in {defs}"
        body = sources[defs[0]].split(f"MF_KERNEL({name})", 1)[1]
        sig = body.split("{", 1)[0]
        bufs = [int(i) for i in re.findall(r"MF_BUF\((\d+),", sig)]
        assert bufs == list(range(n_buf)), f"{name}: buffers {bufs}, manifest says {n_buf}"
        assert re.search(rf"MF_PARAMS\({n_buf}, struct {params}, p\)", sig), name
        assert f'#include "{defs[0]}"' in umbrella or defs[0] == "mf_kernels.h"


def test_every_kernel_in_the_manifest() -> None:
    named = {r[0] for r in manifest()}
    defined = set()
    for f in KERNEL_FILES:
        defined |= set(re.findall(r"MF_KERNEL\((\w+)\)", (SHADERS / f).read_text()))
    assert defined == named


def test_register_budgets_name_kernels() -> None:
    """mf_occ (shaders/mf_prelude.h) picks a kernel's threadgroups per SM by its name:
    each name it lists must be a kernel of the manifest, or a renamed kernel would fall
    back to the default budget without a word."""
    prelude = (SHADERS / "mf_prelude.h").read_text()
    table = prelude.split("constexpr int mf_occ_n(", 1)[1].split("\n}", 1)[0]
    listed = re.findall(r'mf_occ_is\(k, "(\w+)"\)', table)
    assert len(listed) >= 4, table
    assert sorted(set(listed) - {r[0] for r in manifest()}) == []


def test_every_kernel_waits_for_the_one_before() -> None:
    """With programmatic dependent launch a kernel may start while the one before it
    ends, so each must call mf_dep_wait() (shaders/mf_prelude.h) itself or through a
    helper that does (the matvec kernels' row dots load their first weights before it);
    a kernel without it would race. A planted kernel without it fails."""
    text = "\n".join((SHADERS / f).read_text() for f in KERNEL_FILES)

    def missing(text: str) -> list[str]:
        # function bodies, roughly: from each MF_FN / MF_KERNEL to the next one
        parts = re.split(r"(?=^MF_FN |^template <|^MF_KERNEL\()", text, flags=re.M)
        bodies = {}
        for part in parts:
            m = re.match(r"MF_KERNEL\((\w+)\)", part) or \
                re.search(r"^MF_FN [^(]*?(\w+)\(", part, re.M)
            if m:
                bodies[m.group(1)] = part
        waits = {n for n, b in bodies.items() if "mf_dep_wait();" in b}
        grown = True
        while grown:   # helpers that call a waiting helper wait too
            grown = False
            for n, b in bodies.items():
                if n not in waits and any(re.search(rf"\b{w}\s*[<(]", b) for w in waits):
                    waits.add(n)
                    grown = True
        return [r[0] for r in manifest() if r[0] not in waits]

    assert missing(text) == []
    planted = text.replace("MF_PARAMS(3, struct mf_p_attn, p) {\n    mf_dep_wait();",
                           "MF_PARAMS(3, struct mf_p_attn, p) {", 1)
    assert planted != text and missing(planted) == ["mf_attn_comb"]


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_metal_syntax(name: str) -> None:
    clang = shutil.which("clang++")
    if not clang:
        pytest.skip("clang++ not installed")
    cmd = [clang, "-x", "c++", "-std=c++17", "-fsyntax-only", "-D__METAL_VERSION__=310",
           f"-I{SHADERS / 'metal_stub'}", f"-I{SHADERS}", "-Wall", "-Wextra", "-Werror",
           "-Wno-unknown-attributes", "-Wno-unused-parameter", "-Wno-unused-function",
           str(SHADERS / name)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_nvcc_ptx_no_warnings(tmp_path: Path) -> None:
    """The kernel source through nvcc as well as NVRTC (tests/c/test_cuda_nvrtc.c):
    PTX for sm_90 with every warning an error, the math mode the driver uses."""
    nvcc = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))
    if not nvcc:
        pytest.skip("nvcc not installed")
    src = tmp_path / "kernels.cu"
    src.write_text('#include "mf_kernels.h"\n')
    cmd = [nvcc, "-ptx", "-arch=sm_90", "-std=c++17", "--fmad=false", f"-I{SHADERS}",
           "-Werror", "all-warnings", str(src), "-o", str(tmp_path / "k.ptx")]
    # Without a sanitizer preload (make asan-pytest sets LD_PRELOAD): nvcc is not ours,
    # and it crashes with libasan loaded into it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    for name, _, _, _ in manifest():
        assert f".entry {name}(" in ptx, name


def test_embed_is_deterministic(tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.c"
        subprocess.run([sys.executable, str(SHADERS / "embed.py"), str(out)], check=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    for f in KERNEL_FILES + ["mf_prelude.h", "mf_params.h", "kernels.def"]:
        assert f'"{f}",'.encode() in outs[0]
    assert b'"grid.h"' not in outs[0]


# ---- on a CUDA machine: whole models against the CPU backend

ARCHS = ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe", "glm4_moe",
         "minimax"]
PROMPT = [17, 301, 5, 88, 450, 2, 199, 76, 333, 12, 401]
CONT = [64, 9, 270, 3, 140]


def _close(gpu: np.ndarray, cpu: np.ndarray, what: str, rel: float = 5e-5) -> float:
    gpu, cpu = np.atleast_2d(gpu), np.atleast_2d(cpu)
    assert np.isfinite(gpu).all(), f"{what}: non-finite logits"
    err = float((np.abs(gpu - cpu).max(axis=-1) / np.abs(cpu).max(axis=-1)).max())
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
    assert (gpu.argmax(-1) == cpu.argmax(-1)).all(), f"{what}: argmax differs"
    return err


@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_model_matches_cpu(arch: str, synth_checkpoint: Callable[..., Path],
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    from moeflux.prep.convert import convert
    dst = convert(synth_checkpoint(arch), tmp_path_factory.mktemp("cuda") / arch,
                  progress=False)
    opened: list[Any] = []
    try:
        cpu = moeflux.Model(dst, backend="cpu")
        opened.append(cpu)
        gpu = moeflux.Model(dst, backend="cuda")
        opened.append(gpu)
    except moeflux.UnsupportedError as exc:
        pytest.xfail(f"{arch}: {exc}")
    errs = [_close(gpu.eval(PROMPT, all_logits=True), cpu.eval(PROMPT, all_logits=True),
                   f"{arch} prompt")]
    for i, tok in enumerate(CONT):
        errs.append(_close(gpu.eval(tok), cpu.eval(tok), f"{arch} decode step {i}"))
    print(f"{arch}: CUDA vs CPU max relative logit error {max(errs):.3g}")
    for m in opened:
        m.close()


@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_long_prompt_matches_cpu(arch: str, synth_checkpoint: Callable[..., Path],
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """A 300-token prompt, every row's logits, then decode steps: on CUDA every family
    here takes it as one chunk (the backend's prefill_chunk: attention in 64-query
    blocks, the head in 64-row blocks, the hybrids' recurrences over all 300 tokens);
    on the CPU it runs in groups of 64-token chunks."""
    from moeflux.prep.convert import convert
    dst = convert(synth_checkpoint(arch), tmp_path_factory.mktemp("cuda-long") / arch,
                  progress=False)
    try:
        gpu = moeflux.Model(dst, backend="cuda")
    except moeflux.UnsupportedError as exc:
        pytest.xfail(f"{arch}: {exc}")
    with gpu, moeflux.Model(dst, backend="cpu") as cpu:
        prompt = [int(t) for t in np.random.default_rng(3).integers(1, cpu.n_vocab, 300)]
        errs = [_close(gpu.eval(prompt, all_logits=True), cpu.eval(prompt, all_logits=True),
                       f"{arch} 300-token prompt")]
        for i, tok in enumerate(CONT):
            errs.append(_close(gpu.eval(tok), cpu.eval(tok), f"{arch} decode step {i}"))
    print(f"{arch}: 300-token prompt, CUDA vs CPU max relative logit error {max(errs):.3g}")
