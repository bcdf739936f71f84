"""``python -m moeflux.bench`` (moeflux/bench.py): the command runs end to end on a
tiny model and writes every field, every ratio a positive finite number; the page
cache helpers the cold figures rest on are checked against reads whose pages are
known. No timing assertions: speed belongs to bench/RESULTS.md.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moeflux
from moeflux import bench

# Cold runs evict files with posix_fadvise(DONTNEED) and read /proc: Linux only.
pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or
                                not os.path.exists("/proc/meminfo"),
                                reason="the bench's cold runs need Linux")

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = {"median", "min", "max", "runs"}


def run_bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    args = ["--layers", "1", "--experts", "16", "--vocab", "1024", "--tokens", "2",
            "--prompts", "4,70", "--repeats", "2", "--io-mib", "8", "--mem-mib", "16",
            "--threads", "2", "--cache", str(tmp_path / "cache"), "--json", str(out),
            *extra]
    r = subprocess.run([sys.executable, "-m", "moeflux.bench", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text())


def summaries(tree: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every (path, summary) in the JSON tree."""
    if SUMMARY <= set(tree):
        return [(path, tree)]
    found = []
    for k, v in tree.items():
        if isinstance(v, dict):
            found += summaries(v, path + (k,))
    return found


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return run_bench(tmp_path_factory.mktemp("bench"))


def test_json_has_every_field(result) -> None:
    _, res = result
    m = res["machine"]
    for key in ("cpu", "cores", "ram_bytes", "filesystem", "kernel", "python",
                "moeflux", "git_commit", "loadavg_start", "loadavg_end"):
        assert key in m, key
    assert m["moeflux"] == moeflux.__version__
    assert set(res["limits"]["disk_read_Bps"]) == {"1", "4", "8", "16"}
    assert "memory_read_Bps" in res["limits"]
    assert res["settings"]["disk_mode"] in ("O_DIRECT",
                                            "buffered after posix_fadvise(DONTNEED)")
    assert res["hold_ram"]["held_bytes"] == 0
    assert res["engine"], "no engine configuration ran"
    for eng in res["engine"].values():
        for kind in ("decode_cold", "decode_warm"):
            for key in ("tokens_per_s", "bound_tokens_per_s", "ratio",
                        "expert_bytes_per_token", "expert_bytes_disk_per_token"):
                assert key in eng[kind], (kind, key)
        assert set(eng["prefill"]) == {"4", "70"}
        for f in eng["prefill"].values():
            assert {"tokens_per_s", "bound_tokens_per_s", "ratio",
                    "distinct_expert_bytes", "distinct_source"} <= set(f)


def test_every_summary_is_two_finite_positive_runs(result) -> None:
    _, res = result
    found = summaries(res)
    ratios = [p for p, _ in found if p[-1] == "ratio"]
    assert len(ratios) == len(res["engine"]) * 4     # cold, warm, 2 prompt lengths
    for path, s in found:
        assert len(s["runs"]) == 2, path
        assert s["min"] <= s["median"] <= s["max"], path
        for v in s["runs"]:
            assert math.isfinite(v), path
            if path[-1] != "resident_after_evict":
                assert v > 0, path


def test_bytes_per_token_are_k_experts_per_layer(result) -> None:
    # With no expert cache each token reads K experts in every MoE layer: the figure
    # comes from the engine's stats, the expectation from the model's shapes.
    _, res = result
    mod = res["model"]
    want = mod["experts_per_tok"] * mod["expert_size"] * mod["moe_layers"]
    for eng in res["engine"].values():
        for kind in ("decode_cold", "decode_warm"):
            assert eng[kind]["expert_bytes_per_token"]["runs"] == [want, want]
        # 70 tokens = 2 chunks, one prefill group: every expert read at most once for
        # the whole prompt, so at most all 16 (chunk by chunk it was up to 2 x 16).
        f = eng["prefill"]["70"]
        assert f["distinct_expert_bytes"]["max"] <= 16 * mod["expert_size"]
        assert f["expert_bytes_read"]["max"] <= 16 * mod["expert_size"]


def test_report_table_printed(result) -> None:
    r, res = result
    for label in res["engine"]:
        assert f"{label}: decode cold (tokens/s)" in r.stdout
        assert f"{label}: prefill 70 (tokens/s)" in r.stdout
    assert "disk random read, 8 threads (GB/s)" in r.stdout
    assert "[bench] repeat 2/2" in r.stderr


def test_engine_options_follow_the_signature() -> None:
    params = inspect.signature(moeflux.Model).parameters
    kwargs, missing = bench.engine_options({"io_mode": "pread", "io_threads": 4,
                                            "prefetch": None})
    for name, value in (("io_mode", "pread"), ("io_threads", 4)):
        if name in params:
            assert kwargs[name] == value
        else:
            assert name in missing and name not in kwargs
    assert "prefetch" not in kwargs and "prefetch" not in missing


def expert_file(tmp_path: Path, n: int, size: int) -> Path:
    p = tmp_path / "layer_00.bin"
    p.write_bytes(os.urandom(n * size))
    os.sync()
    return p


def test_residency_counts_the_experts_read(tmp_path: Path) -> None:
    size = 16 * 4096 + 512                   # not page aligned: pages straddle experts
    p = expert_file(tmp_path, 8, size)
    bench.evict([str(p)])
    if bench.resident_fraction([str(p)]) != 0.0:
        pytest.skip("this file system keeps the pages (tmpfs?): nothing to measure")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)   # no readahead
        for e in (2, 5):
            assert len(os.pread(fd, size, e * size)) == size
    finally:
        os.close(fd)
    assert bench.resident_experts([str(p)], size) == 2
    bench.warm_files([str(p)])
    assert bench.resident_fraction([str(p)]) == 1.0
    assert bench.resident_experts([str(p)], size) == 8


def test_disk_read_reads_every_byte_asked(tmp_path: Path) -> None:
    size = 4 * 4096
    p = expert_file(tmp_path, 8, size)
    facts = {"expert_size": size, "num_experts": 8, "files": [str(p)]}
    rng = bench.np.random.default_rng(0)
    direct = bench.direct_io_ok(str(p), size)
    assert bench.disk_read_bw(facts, 3, 8, direct, rng) > 0
    with pytest.raises(bench.BenchError):                # more picks than experts
        bench.disk_read_bw(facts, 2, 9, direct, rng)


def test_hold_ram_holds_and_refuses_too_much() -> None:
    with bench.RamHold(8 << 20) as hold:
        assert hold.report["held_bytes"] == 8 << 20
        assert "mlocked" in hold.report
    avail = bench.meminfo("MemAvailable")
    if avail is None:
        pytest.skip("no /proc/meminfo")
    with pytest.raises(bench.BenchError, match="available"):
        with bench.RamHold(avail):
            pass


def test_engine_configs_are_every_combination() -> None:
    args = bench.build_parser().parse_args(
        ["--io-mode", "all", "--expert-cache-bytes", "0,512M", "--prefetch", "0,1"])
    bench.check_args(args)
    assert args.expert_cache_bytes == [0, 512 << 20] and args.prefetch == [0, 1]
    configs, missing = bench.engine_configs(args)
    labels = [label for label, _ in configs]
    if not missing:
        assert len(labels) == len(set(labels)) == 4 * 2 * 2
        assert "direct+cache512M+prefetch" in labels and "pread" in labels
        kw = dict(configs)["mmap+cache512M"]
        assert kw["io_mode"] == "mmap" and kw["expert_cache_bytes"] == 512 << 20
        assert kw["prefetch"] == 0


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "moeflux.bench", "--prompts", "4,x",
                        "--cache", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--prompts" in r.stderr
    r = subprocess.run([sys.executable, "-m", "moeflux.bench", "--experts", "4",
                        "--cache", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "experts per token" in r.stderr


def test_397b_shapes_and_io_mode_all(tmp_path: Path) -> None:
    # Qwen3.5-397B-A17B per layer: experts of 3 projections of 1024 x 4096 at 4 bits
    # plus a bf16 scale and bias per 64 weights = 4.5 bits, 10 per token.
    r, res = run_bench(tmp_path, "--shape", "397b", "--experts", "12", "--repeats", "1",
                       "--prompts", "2", "--io-mode", "all")
    mod = res["model"]
    assert mod["expert_size"] == 3 * 1024 * 4096 * 9 // 16 == 7_077_888
    assert mod["experts_per_tok"] == 10 and mod["num_experts"] == 12
    assert "does not depend on the count" in mod["experts_note"]
    assert "does not depend on the count" in r.stdout
    params = inspect.signature(moeflux.Model).parameters
    want = set(bench.IO_MODES) if "io_mode" in params else {"default"}
    assert set(res["engine"]) == want
    assert ("io_mode" in res["settings"]["unsupported_options"]) == \
        ("io_mode" not in params)


def _cuda_variants():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_variants",
                                                  ROOT / "bench" / "cuda_variants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cuda_variants", mod)   # for its dataclass
    spec.loader.exec_module(sys.modules["cuda_variants"])
    return sys.modules["cuda_variants"]


def test_cuda_variants_copies_the_kernels_with_their_defines(tmp_path: Path) -> None:
    """bench/cuda_variants.py (needs a GPU to measure): a variant is the kernel
    directory copied whole, its macros defined ahead of mf_prelude.h's own text."""
    cv = _cuda_variants()
    src = ROOT / "shaders"
    v = cv.parse_variant(f"occ-5={src}:MF_CODE_PRMT=0,MF_OCC_GU1=5")
    assert (v.name, v.defines) == ("occ-5", [("MF_CODE_PRMT", "0"), ("MF_OCC_GU1", "5")])
    d = cv.materialise(v, tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in src.iterdir())
    head = "#define MF_CODE_PRMT 0\n#define MF_OCC_GU1 5\n"
    assert (d / "mf_prelude.h").read_text() == head + (src / "mf_prelude.h").read_text()
    assert (d / "moe.h").read_bytes() == (src / "moe.h").read_bytes()
    assert cv.parse_variant(f"base={src}").defines == []
    e = cv.parse_variant(f"apart={src}:MF_OCC_GU1=5@MOEFLUX_GPU_FUSE=0,MOEFLUX_X=")
    assert (e.defines, e.env) == ([("MF_OCC_GU1", "5")],
                                  [("MOEFLUX_GPU_FUSE", "0"), ("MOEFLUX_X", "")])
    env = cv.child_env(tmp_path, e)
    assert env["MOEFLUX_GPU_FUSE"] == "0" and env["MOEFLUX_SHADERS_DIR"] == str(tmp_path)
    assert cv.parse_variant(f"b={src}@MOEFLUX_GPU_PDL=0").env == [("MOEFLUX_GPU_PDL", "0")]
    assert cv.parse_variant(f"n={src}@MOEFLUX_GPU_FUSE=add,attn,norm,MOEFLUX_X=1").env == [
        ("MOEFLUX_GPU_FUSE", "add,attn,norm"), ("MOEFLUX_X", "1")]


@pytest.mark.parametrize("spec, says", [
    ("noequals", "expected NAME=DIR"),
    ("a b={src}", "expected NAME=DIR"),
    ("a={tmp}", "holds no mf_prelude.h"),
    ("a={src}:MF_X", "is not MACRO=VALUE"),
    ("a={src}:1X=2", "is not MACRO=VALUE"),
    ("a={src}@PATH=/x", "is not MOEFLUX_VAR=VALUE"),
    ("a={src}:MF_X=1@MOEFLUX_Y", "is not MOEFLUX_VAR=VALUE"),
    ("a={src}@MOEFLUX_X=1,MOEFLUX_Y", "is not MOEFLUX_VAR=VALUE"),
    ("a={src}@MOEFLUX_X=1,b c", "is not MOEFLUX_VAR=VALUE"),
])
def test_cuda_variants_bad_specs_are_one_line_errors(tmp_path: Path, spec: str,
                                                      says: str) -> None:
    spec = spec.format(src=ROOT / "shaders", tmp=tmp_path)
    with pytest.raises(ValueError, match=says):
        _cuda_variants().parse_variant(spec)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_variants.py"), spec],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and r.stdout == "", r.stderr
