"""The Metal backend: what can be checked on any machine, and the whole-model checks
that need a Mac (`make test-metal`).

Everywhere: backend "auto" picks the CPU where neither Metal nor CUDA answers and then
gives the CPU's logits; "metal" off macOS is a clear BackendError; every manifest
kernel, in the one program text the driver hands to newLibraryWithSource (written by
tests/c/test_metal_host.c from the driver's own code), passes a Metal syntax check
against shaders/metal_stub, and a kernel with a planted syntax error fails it; the
Objective-C driver compiles (syntax only) against the committed stub declarations of
Foundation and Metal, and a misspelled Metal selector fails it; clang's static
analyzer finds no reference-counting or allocation error in it, and finds a planted
leak; the driver's pipeline table agrees with kernels.def. The syntax checks catch macro, typing and API-name
mistakes, not Metal semantics (shaders/metal_stub says what they cannot see).

On a Mac with Apple Silicon: whole models on Metal against the CPU backend, logits of
a prompt and of decode steps, in the pread and mmap expert modes; and checkpoints
mlx-lm writes there (gpt-oss, two mixed expert recipes).
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
STUB = SHADERS / "metal_stub"
DRIVER = ROOT / "csrc" / "backends" / "metal" / "metal_backend.m"
HOST_TEST = ROOT / "tests" / "c" / "build" / "test_metal_host"
HAVE_METAL = "metal" in moeflux.backends()
MSL_FLAGS = ["-x", "c++", "-std=c++17", "-fsyntax-only", "-D__METAL_VERSION__=310",
             f"-I{STUB}", f"-I{SHADERS}", "-Wall", "-Wextra", "-Werror",
             "-Wno-unknown-attributes", "-Wno-unused-parameter", "-Wno-unused-function"]
# The host's C library headers stand in for macOS's (_GNU_SOURCE: posix_memalign in
# glibc under -std=c11); the frameworks come from the stubs.
# Apple's Objective-C runtime rules (not the GNU runtime's), so the analyzer applies
# Cocoa's ownership conventions (new/alloc/retain own, release gives up).
OBJC_BASE = ["-x", "objective-c", "-fblocks", "-fobjc-runtime=macosx-13.0", "-std=c11",
             "-D_DARWIN_C_SOURCE", "-D_GNU_SOURCE", f"-I{STUB / 'objc'}",
             f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}"]
OBJC_FLAGS = [*OBJC_BASE, "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
# Shallow mode (little inlining across functions): 0.4 s instead of 20 s, and the
# ownership of each function's own objects is still checked.
ANALYZE = [*OBJC_BASE, "--analyze", "-Xclang", "-analyzer-checker=osx.cocoa,unix,core",
           "-Xclang", "-analyzer-config", "-Xclang", "mode=shallow", "-o", "/dev/null"]


def manifest() -> list[tuple[str, int]]:
    rows = re.findall(r"^K\((\w+),\s*\w+,\s*(\d+),\s*\w+\)\s*$",
                      (SHADERS / "kernels.def").read_text(), re.M)
    return [(n, int(b)) for n, b in rows]


def kernel_files() -> list[str]:
    """The files the kernel program is made of, from mf_kernels.h's includes."""
    return re.findall(r'^#include "(\w+\.h)"', (SHADERS / "mf_kernels.h").read_text(), re.M)


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed")
    return path


# ---- everywhere: backend choice

@pytest.fixture(scope="module")
def model_dir(synth_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeflux.prep.convert import convert
    return convert(synth_checkpoint("qwen3_5_moe"), tmp_path_factory.mktemp("metal") / "m",
                   progress=False)


def test_backends_lists_metal_only_where_usable() -> None:
    names = moeflux.backends()
    assert names[0] == "cpu" and set(names) <= {"cpu", "cuda", "metal"}
    if sys.platform != "darwin":
        assert "metal" not in names


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS builds carry the Metal backend")
def test_metal_off_macos_is_a_clear_backend_error(model_dir: Path) -> None:
    with pytest.raises(moeflux.BackendError) as info:
        moeflux.Model(model_dir, backend="metal")
    assert isinstance(info.value, moeflux.MoefluxError)
    assert "macOS" in str(info.value) and "auto" in str(info.value)


def test_unknown_backend_names_the_choices(model_dir: Path) -> None:
    with pytest.raises(moeflux.BackendError, match="auto, cpu, cuda or metal"):
        moeflux.Model(model_dir, backend="vulkan")


def test_auto_picks_in_order_and_matches_that_backend(model_dir: Path) -> None:
    names = moeflux.backends()
    expect = "metal" if "metal" in names else "cuda" if "cuda" in names else "cpu"
    prompt = [3, 14, 15, 92, 65]
    with moeflux.Model(model_dir, backend="auto") as auto, \
            moeflux.Model(model_dir, backend=expect) as same:
        assert auto.backend == expect and same.backend == expect
        np.testing.assert_array_equal(auto.eval(prompt, all_logits=True),
                                      same.eval(prompt, all_logits=True))
    with moeflux.Model(model_dir) as cpu:
        assert cpu.backend == "cpu"


# ---- everywhere: the kernels as Metal Shading Language (syntax)

@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exact program text the driver compiles, written by the host test binary
    (built by make, up to date; without a sanitizer runtime preloaded into cc)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    res = subprocess.run(["make", "-s", str(HOST_TEST.relative_to(ROOT))], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path_factory.mktemp("msl") / "program.metal"
    res = subprocess.run([str(HOST_TEST), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_program_covers_the_manifest_and_passes_the_msl_check(program: Path) -> None:
    text = program.read_text()
    for name, _ in manifest():
        assert text.count(f"MF_KERNEL({name})") == 1, name
    assert '#include "' not in text
    res = subprocess.run([tool("clang++"), *MSL_FLAGS, str(program)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


def test_pipeline_table_matches_the_manifest(program: Path) -> None:
    # The host test compares the table with kernels.def read as text; its summary line
    # carries the count.
    res = subprocess.run([str(HOST_TEST)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"pipeline table: {len(manifest())} kernels, as kernels.def" in res.stdout
    # No kernel name is spelled out in the driver: the table comes from the X-macro.
    driver = "".join(p.read_text() for p in DRIVER.parent.iterdir()
                     if p.suffix in (".m", ".c", ".h"))
    for name, _ in manifest():
        assert f'"{name}"' not in driver, name


def _msl_check(files_dir: Path, name: str) -> subprocess.CompletedProcess:
    flags = [f if f != f"-I{SHADERS}" else f"-I{files_dir}" for f in MSL_FLAGS]
    return subprocess.run([tool("clang++"), *flags, str(files_dir / name)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("name", kernel_files())
def test_each_kernel_file_passes_the_msl_check(name: str) -> None:
    res = _msl_check(SHADERS, name)
    assert res.returncode == 0, res.stderr


def test_a_planted_kernel_syntax_error_fails_the_msl_check(tmp_path: Path) -> None:
    for f in SHADERS.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    name, _ = manifest()[0]
    kfile = next(f for f in kernel_files() if f"MF_KERNEL({name})" in (SHADERS / f).read_text())
    assert _msl_check(tmp_path, kfile).returncode == 0   # the copy is clean
    text = (tmp_path / kfile).read_text()
    head, body = text.split(f"MF_KERNEL({name})", 1)
    sig, rest = body.split("{", 1)
    (tmp_path / kfile).write_text(f"{head}MF_KERNEL({name}){sig}{{ int broken = ; {rest}")
    res = _msl_check(tmp_path, kfile)
    assert res.returncode != 0 and "expected expression" in res.stderr, res.stderr


# ---- everywhere: the Objective-C driver against stub declarations (syntax)

def test_objc_driver_passes_the_stub_syntax_check() -> None:
    res = subprocess.run([tool("clang"), *OBJC_FLAGS, str(DRIVER)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("old,new,says", [
    ("waitUntilCompleted]", "waitUntilComplete]", "waitUntilComplete"),
    ("newBufferWithBytesNoCopy:p length:len", "newBufferWithBytesNoCopy:p size:len",
     "newBufferWithBytesNoCopy"),
    ("id<MTLBuffer> buf = [ex->mb->dev newBufferWithLength",
     "MTLBufferX *buf = [ex->mb->dev newBufferWithLength", "MTLBufferX"),
])
def test_a_planted_driver_error_fails_the_stub_syntax_check(tmp_path: Path, old: str,
                                                            new: str, says: str) -> None:
    text = DRIVER.read_text()
    assert old in text
    bad = tmp_path / DRIVER.name
    bad.write_text(text.replace(old, new, 1))
    res = subprocess.run([tool("clang"), *OBJC_FLAGS, str(bad)], capture_output=True,
                         text=True)
    assert res.returncode != 0 and says in res.stderr, res.stderr


def test_objc_driver_passes_the_static_analyzer() -> None:
    """Manual reference counting checked by clang's analyzer (Cocoa retain counts,
    unix allocation and core checks) with the stub declarations."""
    res = subprocess.run([tool("clang"), *ANALYZE, str(DRIVER)], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr


@pytest.mark.parametrize("drop", ["    [fn release];\n", "    [text release];\n"])
def test_a_planted_leak_fails_the_static_analyzer(tmp_path: Path, drop: str) -> None:
    text = DRIVER.read_text()
    assert text.count(drop) == 1
    bad = tmp_path / DRIVER.name
    bad.write_text(text.replace(drop, ""))
    res = subprocess.run([tool("clang"), *ANALYZE, str(bad)], capture_output=True,
                         text=True)
    assert "Potential leak" in res.stderr, res.stderr


# ---- on a Mac: whole models on Metal against the CPU backend

ARCHS = ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe", "glm4_moe",
         "minimax"]
PROMPT = [17, 301, 5, 88, 450, 2, 199, 76, 333, 12, 401]
CONT = [64, 9, 270, 3, 140]


def _close(gpu: np.ndarray, cpu: np.ndarray, what: str, rel: float = 5e-5) -> float:
    """The CUDA backend's bound (tests/test_cuda.py): 5e-5 of the largest CPU logit per
    position, and the same argmax."""
    gpu, cpu = np.atleast_2d(gpu), np.atleast_2d(cpu)
    assert np.isfinite(gpu).all(), f"{what}: non-finite logits"
    err = float((np.abs(gpu - cpu).max(axis=-1) / np.abs(cpu).max(axis=-1)).max())
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
    assert (gpu.argmax(-1) == cpu.argmax(-1)).all(), f"{what}: argmax differs"
    return err


@pytest.mark.skipif(not HAVE_METAL, reason="no Metal device (macOS on Apple Silicon)")
@pytest.mark.parametrize("io_mode", ["pread", "mmap"])
@pytest.mark.parametrize("arch", ARCHS)
def test_metal_model_matches_cpu(arch: str, io_mode: str,
                                 synth_checkpoint: Callable[..., Path],
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    from moeflux.prep.convert import convert
    dst = convert(synth_checkpoint(arch), tmp_path_factory.mktemp("metal") / arch,
                  progress=False)
    opened: list[Any] = []
    try:
        cpu = moeflux.Model(dst, backend="cpu")
        opened.append(cpu)
        gpu = moeflux.Model(dst, backend="metal", io_mode=io_mode)
        opened.append(gpu)
    except moeflux.UnsupportedError as exc:
        pytest.xfail(f"{arch}: {exc}")
    errs = [_close(gpu.eval(PROMPT, all_logits=True), cpu.eval(PROMPT, all_logits=True),
                   f"{arch} prompt")]
    for i, tok in enumerate(CONT):
        errs.append(_close(gpu.eval(tok), cpu.eval(tok), f"{arch} decode step {i}"))
    print(f"{arch} ({io_mode}): Metal vs CPU max relative logit error {max(errs):.3g}")
    for m in opened:
        m.close()


# Checkpoints mlx-lm itself writes (a Mac has mlx): gpt-oss (tests/gptoss_synth.py:
# MXFP4 experts with biases, clamped SwiGLU, sinks, sliding window) and two mixed
# expert recipes of tests/test_mixed.py (a 6-bit down_proj in some layers; a float one).
MLX_WRITTEN = ["gpt_oss", "qwen3_moe-mixed_3_6", "qwen3_moe-attn6-exp3-downfloat"]


@pytest.mark.skipif(not HAVE_METAL, reason="no Metal device (macOS on Apple Silicon)")
@pytest.mark.parametrize("case", MLX_WRITTEN)
def test_metal_mlx_written_models_match_cpu(case: str,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    import json

    from moeflux.prep.convert import convert
    root = tmp_path_factory.mktemp("metal-" + case)
    if case == "gpt_oss":
        import gptoss_synth
        ckpt = gptoss_synth.write_gptoss_checkpoint(root / "src")
    else:
        from test_mixed import CASES, IDS, mlx_recipe_checkpoint
        _, arch, overrides, recipe = CASES[IDS.index(case)]
        ckpt = mlx_recipe_checkpoint(arch, root / "src", overrides, recipe)
    dst = convert(ckpt, root / "model", progress=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = int(cfg.get("text_config", cfg)["vocab_size"])
    prompt, cont = [t % vocab for t in PROMPT], [t % vocab for t in CONT]
    with moeflux.Model(dst, backend="cpu") as cpu, \
            moeflux.Model(dst, backend="metal") as gpu:
        errs = [_close(gpu.eval(prompt, all_logits=True), cpu.eval(prompt, all_logits=True),
                       f"{case} prompt")]
        for i, tok in enumerate(cont):
            errs.append(_close(gpu.eval(tok), cpu.eval(tok), f"{case} decode step {i}"))
    print(f"{case}: Metal vs CPU max relative logit error {max(errs):.3g}")
