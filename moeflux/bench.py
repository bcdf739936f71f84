"""``python -m moeflux.bench``: the engine measured against the machine's limits, in one run.

It measures, on the machine it runs on and over the model's own files:
  - the disk's random-read bandwidth at the engine's read size (one expert) and its
    I/O parallelism (a thread pool of 1, 4, 8, 16 and the engine's worker count),
    with O_DIRECT where the file system takes it, else buffered reads of files just
    evicted from the page cache;
  - the memory read bandwidth at the engine's compute thread count (a summing read of
    a buffer several times the last-level cache: ``moeflux._diag.read_bw`` on the CPU
    backend's pool where the test-only module is built (MOEFLUX_BUILD_DIAG=1, as
    ``make install`` does), else numpy sums on as many Python threads);
  - the engine: decode tokens/s cold (expert files evicted from the page cache before
    every token) and warm (every expert in the page cache), prefill tokens/s of
    random prompts of several lengths (cold), bytes read per token;
and reports every engine figure as a ratio to its bound computed from the limits of
the same repeat (ratio = engine speed / bound speed; 1 = at the limit):
  - cold decode: expert bytes from disk per token / disk bandwidth + bytes touched in
    RAM per token (non-expert weights, expert bytes served from RAM, recurrent state)
    / memory bandwidth;
  - warm decode: every byte touched per token / memory bandwidth;
  - prefill: distinct expert bytes read / disk bandwidth + resident weights once per
    64-token chunk / memory bandwidth.
Repeats interleave limit and engine measurements; each figure is reported as median
and min-max over the repeats, printed as a table and written as JSON (--json).

The model is synthetic (random weights, ``moeflux.prep.synth``) with real per-layer
shapes: Qwen3.6-35B-A3B (default, the demo's model) or Qwen3.5-397B-A17B (--shape
397b), with fewer layers (--layers) and optionally fewer experts per layer
(--experts), made once and cached. Engine options (--io-mode, --io-threads,
--expert-cache-bytes, --prefetch) are passed to moeflux.Model when it takes them;
--io-mode all and lists of cache sizes and prefetch settings run every combination,
interleaved within each repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import functools
import inspect
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30
PAGE = mmap.PAGESIZE
CHUNK_TOKENS = 64          # the engine's prefill chunk: weights read once per chunk
DISK_THREADS = (1, 4, 8, 16)
DEFAULT_IO_THREADS = 8     # the engine's default I/O worker count
IO_MODES = ("pread", "mmap", "direct", "auto")
ENGINE_OPTIONS = ("io_mode", "io_threads", "expert_cache_bytes", "prefetch")
PHASE_KEYS = ("attention_s", "routing_s", "io_wait_s", "experts_s", "shared_s",
              "head_s", "expert_read_s", "compute_s")
FACT_KEYS = ("io_mode", "io_fallback")

# Per-layer shapes (config keys of the qwen3_5_moe text config). 397B: hidden 4096,
# 32/2 attention heads of 256, GatedDeltaNet 16 key / 64 value heads of 128, 512
# experts of width 1024, 10 per token, shared expert 1024.
SHAPES: dict[str, dict[str, Any]] = {
    "35b": {"preset": "qwen36-35b-a3b-shapes", "name": "Qwen3.6-35B-A3B", "set": {}},
    "397b": {"preset": "qwen36-35b-a3b-shapes", "name": "Qwen3.5-397B-A17B", "set": {
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 2,
        "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 64,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "num_experts": 512,
        "num_experts_per_tok": 10, "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024}},
}
DEFAULT_EXPERTS = {"35b": None, "397b": 64}   # None: the real count


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A request the bench cannot honour (message says what and why)."""


# ---- summaries ---------------------------------------------------------------------

def summary(values: list[float]) -> dict[str, Any]:
    """median, min, max and every run of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values),
            "max": max(values), "runs": list(values)}


class Recorder:
    """Numbers collected per repeat under a key path, summarised at the end."""

    def __init__(self) -> None:
        self.values: dict[tuple, list[float]] = {}
        self.facts: dict[tuple, Any] = {}

    def add(self, path: tuple, value: float) -> None:
        self.values.setdefault(path, []).append(float(value))

    def fact(self, path: tuple, value: Any) -> None:
        self.facts[path] = value

    def nested(self) -> dict:
        out: dict = {}
        for path, vals in self.values.items():
            _put(out, path, summary(vals))
        for path, val in self.facts.items():
            _put(out, path, val)
        return out


def _put(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(str(key), {})
    tree[str(path[-1])] = value


# ---- machine -----------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith(("model name", "Hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def meminfo(key: str) -> Optional[int]:
    """A /proc/meminfo field in bytes (None where there is no /proc)."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        text = _read(str(idx / "size")).strip()
        if text.endswith("K"):
            best = max(best, int(text[:-1]) * 1024)
        elif text.endswith("M"):
            best = max(best, int(text[:-1]) * MiB)
    return best or 32 * MiB


def filesystem(path: Path) -> dict[str, Any]:
    """Mount point, device and file-system type holding `path` (from /proc/mounts)."""
    real = str(path.resolve())
    best: dict[str, Any] = {"mount": None, "device": None, "fstype": None}
    for line in _read("/proc/mounts").splitlines():
        dev, mnt, fstype = line.split()[:3]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and \
                len(mnt) >= len(best["mount"] or ""):
            best = {"mount": mnt, "device": dev, "fstype": fstype}
    dev = os.path.basename(best["device"] or "")
    rot = _read(f"/sys/class/block/{dev}/queue/rotational").strip()
    best["rotational"] = None if rot == "" else rot == "1"
    return best


def git_commit() -> Optional[str]:
    """The commit of the repository moeflux runs from (None when not a checkout)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip() or None
    return f"{commit}+dirty" if commit and dirty.stdout.strip() else commit


def machine_info(model_dir: Path) -> dict[str, Any]:
    """The facts that a figure needs to be read: CPU, RAM, disk, software."""
    import moeflux

    return {
        "cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
        "llc_bytes": llc_bytes(), "ram_bytes": meminfo("MemTotal"),
        "ram_available_bytes": meminfo("MemAvailable"),
        "filesystem": filesystem(model_dir), "kernel": platform.release(),
        "os": platform.system(), "python": platform.python_version(),
        "numpy": np.__version__, "moeflux": moeflux.__version__,
        "git_commit": git_commit(), "loadavg_start": list(os.getloadavg()),
    }


# ---- models ------------------------------------------------------------------------

def model_overrides(shape: str, layers: int, experts: Optional[int],
                    vocab: int) -> tuple[str, dict[str, Any]]:
    """(architecture, tiny_config overrides) of a bench model."""
    from moeflux.prep.synth import PRESETS

    arch, ov = PRESETS[SHAPES[shape]["preset"]]
    ov = copy.deepcopy(ov)
    ov.update(copy.deepcopy(SHAPES[shape]["set"]))
    ov["num_hidden_layers"] = layers
    ov["vocab_size"] = vocab
    if experts is not None:
        if experts < ov["num_experts_per_tok"]:
            raise BenchError(f"--experts {experts}: fewer than the "
                             f"{ov['num_experts_per_tok']} experts per token of {shape}")
        ov["num_experts"] = experts
    return arch, ov


def ensure_model(cache: Path, shape: str, layers: int, experts: Optional[int],
                 vocab: int) -> Path:
    """The converted bench model, made on first use (the 35b default is the demo's)."""
    from moeflux import demo

    if shape == "35b" and experts is None:
        return demo.ensure_model(cache, layers, vocab)
    from moeflux.prep.convert import convert
    from moeflux.prep.synth import tiny_config, write_checkpoint

    arch, ov = model_overrides(shape, layers, experts, vocab)
    root = cache / f"{shape}-shapes-L{layers}-E{ov['num_experts']}-V{vocab}"
    model_dir = root / "model"
    if (model_dir / "moeflux.json").exists():
        return model_dir
    ckpt = root / "checkpoint"
    if not (ckpt / "config.json").exists():
        log(f"writing a synthetic checkpoint ({layers} layers at "
            f"{SHAPES[shape]['name']} shapes, {ov['num_experts']} experts) to {ckpt}")
        write_checkpoint(ckpt, tiny_config(arch, **ov), progress=True)
    log(f"converting into {model_dir}")
    convert(ckpt, model_dir, progress=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return model_dir


def _text_config(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg.get("text_config", cfg)


def state_bytes_per_token(tc: dict[str, Any]) -> int:
    """Recurrent state read and written per token: 2 x f32 [Hv, Dk, Dv] per
    GatedDeltaNet layer (full attention every full_attention_interval layers)."""
    hv = tc.get("linear_num_value_heads")
    if not hv:
        return 0
    every = int(tc.get("full_attention_interval", 4))
    n_linear = sum(1 for i in range(int(tc["num_hidden_layers"])) if (i + 1) % every)
    per_layer = hv * tc["linear_key_head_dim"] * tc["linear_value_head_dim"] * 4
    return 2 * n_linear * per_layer


def model_facts(model_dir: Path) -> dict[str, Any]:
    """Sizes the bounds need: expert layout and the resident bytes a token touches."""
    layout = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    man = json.loads((model_dir / "model_weights.json").read_text())["tensors"]
    tc = _text_config(model_dir)
    embed = sum(t["size"] for n, t in man.items() if "embed_tokens." in n)
    tied = bool(tc.get("tie_word_embeddings", False))
    weights = (model_dir / "model_weights.bin").stat().st_size
    files = [model_dir / "packed_experts" / f"layer_{il:02d}.bin"
             for il in layout["moe_layers"]]
    return {
        "path": str(model_dir), "expert_size": layout["expert_size"],
        "num_experts": layout["num_experts"], "moe_layers": len(files),
        "experts_per_tok": tc["num_experts_per_tok"],
        "expert_files_bytes": sum(f.stat().st_size for f in files),
        "weights_bytes": weights,
        # decode reads one embedding row, not the table (unless it is also the head)
        "weights_touched_per_token": weights if tied else weights - embed,
        "state_bytes_per_token": state_bytes_per_token(tc),
        "files": [str(f) for f in files],
    }


# ---- page cache --------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


MAP_FAILED = ctypes.c_void_p(-1).value


def evict(paths: list[str]) -> None:
    """Drop the files' clean pages from the page cache (no root needed). Pages that a
    process has mapped and faulted in stay: that is why residency is checked."""
    if not hasattr(os, "posix_fadvise"):
        raise BenchError("evicting files from the page cache needs "
                         "posix_fadvise (Linux); this platform has none")
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> None:
    """The whole page cache dropped (root only; asked for with --drop-caches)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def page_residency(path: str) -> Optional[np.ndarray]:
    """One byte per page of the file, 1 where the page is in the page cache
    (mincore over a mapping that is never touched); None where that fails."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, np.uint8)
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, MAP_FAILED):
        return None
    vec = np.zeros((size + PAGE - 1) // PAGE, np.uint8)
    try:
        rc = libc.mincore(addr, size, vec.ctypes.data_as(ctypes.c_void_p))
    finally:
        libc.munmap(addr, size)
    return vec & 1 if rc == 0 else None


def resident_fraction(paths: list[str]) -> Optional[float]:
    """Fraction of the files' pages in the page cache (None: cannot tell)."""
    vecs = [page_residency(p) for p in paths]
    if any(v is None for v in vecs):
        return None
    total = sum(len(v) for v in vecs)
    return float(sum(int(v.sum()) for v in vecs) / total) if total else 0.0


def resident_experts(paths: list[str], expert_size: int) -> Optional[int]:
    """Experts at least half of whose pages are in the page cache: right after a
    cold run, the distinct experts it read (readahead spills a little past an
    expert, never half of the next one)."""
    count = 0
    for p in paths:
        vec = page_residency(p)
        if vec is None:
            return None
        n = os.path.getsize(p) // expert_size
        starts = (np.arange(n, dtype=np.int64) * expert_size) // PAGE
        ends = ((np.arange(1, n + 1, dtype=np.int64) * expert_size) + PAGE - 1) // PAGE
        cums = np.concatenate([[0], np.cumsum(vec, dtype=np.int64)])
        count += int(np.count_nonzero(2 * (cums[ends] - cums[starts]) >= ends - starts))
    return count


def warm_files(paths: list[str]) -> None:
    """Read every file once so its pages are in the page cache."""
    buf = bytearray(16 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


class RamHold:
    """Anonymous memory held for the run (touched, mlocked where permitted) so the
    page cache cannot keep the expert files."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.addr: Optional[int] = None
        self.report: dict[str, Any] = {"requested_bytes": nbytes, "held_bytes": 0}

    def __enter__(self) -> "RamHold":
        if self.nbytes <= 0:
            return self
        avail = meminfo("MemAvailable")
        if avail is not None and self.nbytes > avail - GiB:
            raise BenchError(f"--hold-ram {self.nbytes / GiB:.1f} GiB: only "
                             f"{avail / GiB:.1f} GiB available; at most "
                             f"{(avail - GiB) / GiB:.1f} GiB can be held (1 GiB kept free)")
        self._hold(avail)
        return self

    def _hold(self, avail: Optional[int]) -> None:
        libc = _libc()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        addr = libc.mmap(None, self.nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise BenchError(f"--hold-ram: mmap of {self.nbytes} bytes failed: "
                             f"{os.strerror(err)}")
        self.addr = addr
        ctypes.memset(addr, 1, self.nbytes)            # touch every page
        locked = libc.mlock(addr, self.nbytes) == 0
        self.report.update({
            "held_bytes": self.nbytes, "mlocked": locked,
            "mlock_error": None if locked else os.strerror(ctypes.get_errno()),
            "available_before": avail, "available_after": meminfo("MemAvailable")})

    def __exit__(self, *exc: Any) -> None:
        if self.addr is not None:
            _libc().munmap(self.addr, self.nbytes)
            self.addr = None


# ---- limits: disk and memory -------------------------------------------------------

def _aligned_buffers(n: int, size: int) -> list[mmap.mmap]:
    """n page-aligned buffers of `size` bytes (O_DIRECT needs the alignment)."""
    return [mmap.mmap(-1, size) for _ in range(n)]


def direct_io_ok(path: str, size: int) -> bool:
    """True when the file system takes O_DIRECT reads of one expert at this size."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or size % 4096:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    buf = mmap.mmap(-1, size)
    try:
        return os.preadv(fd, [buf], 0) == size
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


def disk_read_bw(facts: dict[str, Any], threads: int, n_reads: int, direct: bool,
                 rng: np.random.Generator) -> float:
    """Bytes/s of `n_reads` distinct random experts read by `threads` workers; a
    buffered run starts from files evicted from the page cache."""
    size, E, files = facts["expert_size"], facts["num_experts"], facts["files"]
    if not 0 < n_reads <= len(files) * E:
        raise BenchError(f"disk read: {n_reads} distinct experts asked of "
                         f"{len(files) * E}")
    picks = rng.permutation(len(files) * E)[:n_reads]
    flag = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = [os.open(p, flag) for p in files]
    bufs = _aligned_buffers(threads, size)
    try:
        if not direct:
            evict(files)
        jobs = [picks[w::threads] for w in range(threads)]

        def worker(w: int) -> int:
            got = 0
            for pick in jobs[w]:
                fi, e = divmod(int(pick), E)
                got += os.preadv(fds[fi], [bufs[w]], e * size)
            return got

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(worker, range(threads)))
        dt = time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)
        for b in bufs:
            b.close()
    if got != len(picks) * size:
        raise BenchError(f"disk read: {got} bytes read, expected {len(picks) * size}")
    return got / dt


def _numpy_read(pool: ThreadPoolExecutor, threads: int) -> Callable[[np.ndarray, int], None]:
    """A summing read of buf, reps times, as numpy sums of `threads` slices on `pool`
    (numpy drops the GIL while it sums)."""
    def read(buf: np.ndarray, reps: int) -> None:
        parts = np.array_split(buf, threads)
        for _ in range(reps):
            list(pool.map(np.sum, parts))
    return read


def memory_read_bw(threads: int, nbytes: int) -> tuple[float, str]:
    """(bytes/s, method) of a summing read over `nbytes` (well beyond the caches) at
    `threads` threads, at least ~0.3 s of reading: on the CPU backend's pool through
    moeflux._diag where that test-only module is built, else with numpy."""
    with ThreadPoolExecutor(threads) as pool:
        try:
            from moeflux import _diag

            def read(buf: np.ndarray, reps: int) -> None:
                _diag.read_bw(buf, threads, reps)
            method = f"moeflux._diag.read_bw, CPU pool of {threads} threads"
        except ImportError:
            read = _numpy_read(pool, threads)
            method = f"numpy sums on {threads} threads (moeflux._diag not built)"
        buf = np.ones(nbytes // 4, np.float32)
        read(buf, 1)                                      # fault in, warm the pool
        t0 = time.perf_counter()
        read(buf, 1)
        one = time.perf_counter() - t0
        reps = max(1, min(50, math.ceil(0.3 / max(one, 1e-6))))
        t0 = time.perf_counter()
        read(buf, reps)
        return buf.nbytes * reps / (time.perf_counter() - t0), method


# ---- the engine --------------------------------------------------------------------

def engine_options(requested: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(kwargs moeflux.Model takes, names it does not take) of the requested options."""
    import moeflux

    params = inspect.signature(moeflux.Model).parameters
    kwargs = {k: v for k, v in requested.items() if v is not None and k in params}
    missing = [k for k, v in requested.items() if v is not None and k not in params]
    return kwargs, missing


def stats_bytes(st: dict[str, Any]) -> tuple[float, float]:
    """(expert bytes that came from disk, expert bytes served from RAM) of a stats
    dict: the split where the engine reports it, else every expert byte from disk."""
    if "expert_bytes_disk" in st:
        disk = st["expert_bytes_disk"] + st.get("expert_bytes_mapped", 0)
        return float(disk), float(st.get("expert_bytes_cache", 0))
    return float(st["expert_bytes_read"]), 0.0


class Engine:
    """One open Model plus the cache control a measurement needs."""

    def __init__(self, facts: dict[str, Any], threads: int, kwargs: dict[str, Any],
                 cold: Callable[[], None]) -> None:
        import moeflux

        self.facts, self.cold = facts, cold
        self.model = moeflux.Model(facts["path"], threads=threads, **kwargs)
        self.rng = np.random.default_rng(1)

    def close(self) -> None:
        self.model.close()

    def _start(self) -> int:
        """A fresh sequence with a short prompt and two untimed steps; last token."""
        m = self.model
        m.reset()
        logits = m.eval(self.rng.integers(0, m.n_vocab, 8).tolist())
        for _ in range(2):
            logits = m.eval([int(logits.argmax())])
        return int(logits.argmax())

    def decode(self, n_tokens: int, cold: bool) -> dict[str, Any]:
        """Greedy decode of n_tokens; cold evicts the experts before every token."""
        m, tok, elapsed = self.model, self._start(), 0.0
        m.stats_reset()
        residency = None
        for i in range(n_tokens):
            if cold:
                self.cold()
                if i == 0:
                    residency = resident_fraction(self.facts["files"])
            t0 = time.perf_counter()
            logits = m.eval([tok])
            elapsed += time.perf_counter() - t0
            tok = int(logits.argmax())
        return {"seconds": elapsed, "stats": m.stats(), "residency": residency}

    def prefill(self, n: int) -> dict[str, Any]:
        """A cold prefill of n random tokens; distinct experts read (page cache)."""
        m = self.model
        m.reset()
        prompt = self.rng.integers(0, m.n_vocab, n).tolist()
        self.cold()
        m.stats_reset()
        t0 = time.perf_counter()
        m.eval(prompt)
        elapsed = time.perf_counter() - t0
        distinct = resident_experts(self.facts["files"], self.facts["expert_size"])
        return {"seconds": elapsed, "stats": m.stats(), "distinct": distinct}


def record_decode(rec: Recorder, key: tuple, run: dict[str, Any], n: int,
                  bound_s: Callable[[float, float], float]) -> None:
    """Figures of one decode run: tokens/s, bytes/token, bound, ratio, phases."""
    st = run["stats"]
    disk, ram = stats_bytes(st)
    per_tok = run["seconds"] / n
    bound = bound_s(disk / n, ram / n)
    rec.add(key + ("tokens_per_s",), 1 / per_tok)
    rec.add(key + ("bound_tokens_per_s",), 1 / bound)
    rec.add(key + ("ratio",), bound / per_tok)
    rec.add(key + ("expert_bytes_per_token",), st["expert_bytes_read"] / n)
    rec.add(key + ("expert_bytes_disk_per_token",), disk / n)
    if run.get("residency") is not None:
        rec.add(key + ("resident_after_evict",), run["residency"])
    for k in PHASE_KEYS:
        if k in st:
            rec.add(key + ("ms_per_token", k[:-2]), st[k] * 1e3 / n)
    for k in FACT_KEYS:
        if k in st:
            rec.fact(key + (k,), st[k])


def record_prefill(rec: Recorder, key: tuple, run: dict[str, Any], n: int,
                   facts: dict[str, Any], disk_bw: float, mem_bw: float) -> None:
    """Figures of one prefill: tokens/s against distinct experts from disk."""
    st = run["stats"]
    disk, ram = stats_bytes(st)
    cap = facts["num_experts"] * facts["moe_layers"] * facts["expert_size"]
    if run["distinct"]:
        distinct, source = float(run["distinct"] * facts["expert_size"]), "page cache"
    else:
        distinct, source = min(disk, cap), "engine stats"
    chunks = math.ceil(n / CHUNK_TOKENS)
    resident = chunks * facts["weights_touched_per_token"] + n * \
        facts["state_bytes_per_token"] + ram
    bound = distinct / disk_bw + resident / mem_bw
    rec.add(key + ("tokens_per_s",), n / run["seconds"])
    rec.add(key + ("bound_tokens_per_s",), n / bound)
    rec.add(key + ("ratio",), bound / run["seconds"])
    rec.add(key + ("expert_bytes_read",), st["expert_bytes_read"])
    rec.add(key + ("expert_bytes_disk",), disk)
    rec.add(key + ("distinct_expert_bytes",), distinct)
    for k in PHASE_KEYS:
        if k in st:
            rec.add(key + ("ms_total", k[:-2]), st[k] * 1e3)
    rec.fact(key + ("distinct_source",), source)


# ---- one run -----------------------------------------------------------------------

def measure_disk(rec: Recorder, facts: dict[str, Any], args: argparse.Namespace,
                 direct: bool, rng: np.random.Generator) -> dict[int, float]:
    """Random-read bandwidth at every thread count; bytes/s by thread count."""
    n_all = facts["moe_layers"] * facts["num_experts"]
    out = {}
    for t in sorted(set(DISK_THREADS) | {args.io_threads_eff}):
        n = min(n_all, max(2 * t, args.io_mib * MiB // facts["expert_size"]))
        out[t] = disk_read_bw(facts, t, n, direct, rng)
        rec.add(("limits", "disk_read_Bps", str(t)), out[t])
    log(f"  disk random read ({'O_DIRECT' if direct else 'buffered, evicted'}, "
        f"{facts['expert_size']} B): " +
        ", ".join(f"{t} thr {bw / GB:.2f} GB/s" for t, bw in out.items()))
    return out


def measure_memory(rec: Recorder, args: argparse.Namespace) -> float:
    bw, method = memory_read_bw(args.threads, args.mem_bytes)
    rec.add(("limits", "memory_read_Bps"), bw)
    rec.fact(("limits", "memory_method"), method)
    log(f"  memory read ({args.threads} threads, {args.mem_bytes / MiB:.0f} MiB): "
        f"{bw / GB:.2f} GB/s")
    return bw


def run_engine(rec: Recorder, facts: dict[str, Any], args: argparse.Namespace,
               label: str, kwargs: dict[str, Any], cold: Callable[[], None],
               measure: Callable[[], tuple[float, float]]) -> None:
    """One engine configuration in one repeat: limits measured between its runs."""
    key = ("engine", label)
    eng = Engine(facts, args.threads, kwargs, cold)
    try:
        disk_bw, _ = measure()
        run = eng.decode(args.tokens, cold=True)
        _, mem_bw = measure()
        resident = facts["weights_touched_per_token"] + facts["state_bytes_per_token"]
        record_decode(rec, key + ("decode_cold",), run, args.tokens,
                      lambda d, r: d / disk_bw + (r + resident) / mem_bw)
        log(f"  {label}: cold decode {args.tokens / run['seconds']:.2f} tokens/s")
        warm_files(facts["files"])
        rec.add(key + ("decode_warm", "resident_before"),
                resident_fraction(facts["files"]) or 0.0)
        run = eng.decode(args.tokens, cold=False)
        record_decode(rec, key + ("decode_warm",), run, args.tokens,
                      lambda d, r: (d + r + resident) / mem_bw)
        log(f"  {label}: warm decode {args.tokens / run['seconds']:.2f} tokens/s")
        for n in args.prompts:
            run = eng.prefill(n)
            record_prefill(rec, key + ("prefill", str(n)), run, n, facts, disk_bw, mem_bw)
            log(f"  {label}: prefill {n} tokens {n / run['seconds']:.2f} tokens/s")
    finally:
        eng.close()


def _size_label(n: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def config_label(mode: Optional[str], cache: Optional[int], prefetch: Optional[int]
                 ) -> str:
    """'pread', 'direct+cache512M', 'mmap+prefetch', ... ('default': no mode)."""
    label = mode or "default"
    if cache:
        label += f"+cache{_size_label(cache)}"
    if prefetch == 1:
        label += "+prefetch"
    return label


def engine_configs(args: argparse.Namespace) -> tuple[list[tuple[str, dict]], list[str]]:
    """(label, Model kwargs) per engine configuration (every io mode x cache size x
    prefetch asked for), and the options this moeflux.Model does not take."""
    modes = list(IO_MODES) if args.io_mode == "all" else [args.io_mode]
    configs, unsupported = [], []
    for mode in modes:
        for cache in args.expert_cache_bytes:
            for prefetch in args.prefetch:
                kwargs, missing = engine_options(
                    {"io_mode": mode, "io_threads": args.io_threads,
                     "expert_cache_bytes": cache, "prefetch": prefetch})
                unsupported += [m for m in missing if m not in unsupported]
                label = config_label(kwargs.get("io_mode"),
                                     kwargs.get("expert_cache_bytes"),
                                     kwargs.get("prefetch"))
                if label not in [c[0] for c in configs]:
                    configs.append((label, kwargs))
    return configs, unsupported


def cold_function(args: argparse.Namespace, files: list[str]) -> Callable[[], None]:
    if args.drop_caches:
        if os.geteuid() != 0:
            raise BenchError("--drop-caches needs root (/proc/sys/vm/drop_caches); "
                             "without it the expert files are evicted with "
                             "posix_fadvise(DONTNEED)")
        return drop_caches
    return lambda: evict(files)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement; the JSON document."""
    model_dir = ensure_model(args.cache, args.shape, args.layers, args.experts, args.vocab)
    facts = model_facts(model_dir)
    direct = direct_io_ok(facts["files"][0], facts["expert_size"])
    configs, unsupported = engine_configs(args)
    for name in unsupported:
        log(f"note: this moeflux.Model takes no {name!r}; running without it")
    rec, rng = Recorder(), np.random.default_rng(0)
    cold = cold_function(args, facts["files"])
    result = {"machine": machine_info(model_dir)}
    with RamHold(int(args.hold_ram * GiB)) as hold:
        for r in range(args.repeats):
            log(f"repeat {r + 1}/{args.repeats} (load average {os.getloadavg()[0]:.2f})")
            for label, kwargs in configs:
                measure = limits_measurer(rec, facts, args, direct, rng)
                run_engine(rec, facts, args, label, kwargs, cold, measure)
        result["hold_ram"] = hold.report
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result.update(describe(args, facts, direct, configs, unsupported))
    result.update(rec.nested())
    return result


def limits_measurer(rec: Recorder, facts: dict[str, Any], args: argparse.Namespace,
                    direct: bool, rng: np.random.Generator
                    ) -> Callable[[], tuple[float, float]]:
    """A function that measures disk then memory on alternate calls (so the limits
    interleave with the engine's runs) and returns the latest (disk B/s at the
    engine's I/O workers, memory B/s)."""
    state = {"calls": 0, "disk": 0.0, "mem": 0.0}

    def measure() -> tuple[float, float]:
        if state["calls"] % 2 == 0:
            state["disk"] = measure_disk(rec, facts, args, direct, rng)[args.io_threads_eff]
        else:
            state["mem"] = measure_memory(rec, args)
        state["calls"] += 1
        return state["disk"], state["mem"]

    return measure


def describe(args: argparse.Namespace, facts: dict[str, Any], direct: bool,
             configs: list, unsupported: list[str]) -> dict[str, Any]:
    """The settings and model facts of the run, for the JSON and the table."""
    model = {k: v for k, v in facts.items() if k != "files"}
    model.update(shape=args.shape, shape_name=SHAPES[args.shape]["name"],
                 layers=args.layers, vocab=args.vocab,
                 experts_fit_in_ram=facts["expert_files_bytes"] <
                 (meminfo("MemAvailable") or 0))
    if args.experts is not None:
        model["experts_note"] = (f"{facts['num_experts']} experts per layer instead of "
                                 "the real count: the cost of a miss (one expert_size "
                                 "read) does not depend on the count")
    return {
        "model": model,
        "settings": {
            "repeats": args.repeats, "tokens": args.tokens, "prompts": args.prompts,
            "threads": args.threads, "io_threads": args.io_threads_eff,
            "disk_mode": "O_DIRECT" if direct else "buffered after posix_fadvise(DONTNEED)",
            "cold_mode": "drop_caches" if args.drop_caches else "posix_fadvise(DONTNEED)",
            "memory_buffer_bytes": args.mem_bytes, "io_mib": args.io_mib,
            "engine_configs": {label: kw for label, kw in configs},
            "unsupported_options": unsupported},
    }


# ---- output ------------------------------------------------------------------------

def _fmt(s: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    return (f"{s['median'] / scale:.{digits}f} "
            f"({s['min'] / scale:.{digits}f}-{s['max'] / scale:.{digits}f})")


def table_rows(res: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(figure, value, bound, ratio) rows, each as median (min-max)."""
    lim = res["limits"]
    for t, s in lim["disk_read_Bps"].items():
        yield f"disk random read, {t} threads (GB/s)", _fmt(s, GB), "", ""
    yield "memory read (GB/s)", _fmt(lim["memory_read_Bps"], GB), "", ""
    for label, eng in res["engine"].items():
        for kind in ("decode_cold", "decode_warm"):
            f = eng[kind]
            yield (f"{label}: {kind.replace('_', ' ')} (tokens/s)",
                   _fmt(f["tokens_per_s"]), _fmt(f["bound_tokens_per_s"]),
                   _fmt(f["ratio"], digits=3))
            yield (f"{label}: {kind.replace('_', ' ')} expert MiB/token",
                   _fmt(f["expert_bytes_per_token"], MiB), "", "")
        for n, f in eng.get("prefill", {}).items():
            yield (f"{label}: prefill {n} (tokens/s)", _fmt(f["tokens_per_s"]),
                   _fmt(f["bound_tokens_per_s"]), _fmt(f["ratio"], digits=3))
            yield (f"{label}: prefill {n} expert GiB from disk (distinct)",
                   f"{_fmt(f['expert_bytes_disk'], GiB)} "
                   f"({f['distinct_expert_bytes']['median'] / GiB:.2f})", "", "")


def hold_text(h: dict[str, Any]) -> str:
    if not h["held_bytes"]:
        return "none"
    how = "mlocked" if h["mlocked"] else f"touched, not mlocked: {h['mlock_error']}"
    return f"{h['held_bytes'] / GiB:.2f} GiB ({how})"


def print_report(res: dict[str, Any], out: Any = sys.stdout) -> None:
    m, mod, st = res["machine"], res["model"], res["settings"]
    print(f"machine  {m['cpu']}, {m['cores']} cores, "
          f"{(m['ram_bytes'] or 0) / GiB:.1f} GiB RAM, {m['filesystem']['fstype']} on "
          f"{m['filesystem']['device']}, Linux {m['kernel']}, Python {m['python']}, "
          f"moeflux {m['moeflux']} ({m['git_commit']}), load average "
          f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}", file=out)
    print(f"model    {mod['layers']} layers at {mod['shape_name']} shapes, "
          f"{mod['num_experts']} experts x {mod['expert_size']} B (K {mod['experts_per_tok']}), "
          f"experts {mod['expert_files_bytes'] / GiB:.2f} GiB, resident touched "
          f"{mod['weights_touched_per_token'] / MiB:.1f} MiB/token", file=out)
    fit = "fit" if mod["experts_fit_in_ram"] else "do not fit"
    print(f"         experts {fit} in available RAM; cold = evicted before every token",
          file=out)
    if "experts_note" in mod:
        print(f"note     {mod['experts_note']}", file=out)
    print(f"settings threads {st['threads']}, I/O workers {st['io_threads']}, disk "
          f"{st['disk_mode']}, cold = {st['cold_mode']}, repeats {st['repeats']}, "
          f"hold RAM {hold_text(res['hold_ram'])}", file=out)
    rows = [("figure", "median (min-max)", "bound", "ratio")] + list(table_rows(res))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
    print("ratio = engine tokens/s / bound tokens/s of the same repeat (1 = at the "
          "limit); bounds: cold = disk bytes / disk read at the I/O workers + RAM bytes "
          "/ memory read, warm = all bytes / memory read", file=out)
    for label, eng in res["engine"].items():
        print_engine_notes(label, eng, out)


def print_engine_notes(label: str, eng: dict[str, Any], out: Any) -> None:
    """Phase times, the engine's I/O mode, and a warning when cold was not cold."""
    for kind in ("decode_cold", "decode_warm"):
        f = eng[kind]
        phases = f.get("ms_per_token")
        if phases:
            print(f"{label}: {kind.replace('_', ' ')} ms/token by phase (median): " +
                  ", ".join(f"{k} {v['median']:.2f}" for k, v in phases.items()),
                  file=out)
        if "io_mode" in f:
            print(f"{label}: {kind.replace('_', ' ')} engine io_mode {f['io_mode']}, "
                  f"fallback {f.get('io_fallback') or 'none'}", file=out)
    for n, f in eng.get("prefill", {}).items():
        phases = f.get("ms_total")
        if phases:
            print(f"{label}: prefill {n} ms by phase (median): " +
                  ", ".join(f"{k} {v['median']:.1f}" for k, v in phases.items()),
                  file=out)
    left = eng["decode_cold"].get("resident_after_evict")
    if left and left["max"] > 0.01:
        print(f"{label}: WARNING: {left['max']:.0%} of the expert pages stayed in the "
              "page cache after eviction: cold decode was not fully cold. Pages the "
              "engine has mapped (io_mode mmap, or auto choosing it) cannot be evicted "
              "from outside; --hold-ram makes the page cache too small instead", file=out)
    warm = eng["decode_warm"].get("resident_before")
    if warm and warm["min"] < 0.99:
        print(f"{label}: note: only {warm['min']:.0%} of the expert pages were in the "
              "page cache before the warm decode (RAM held or too small)", file=out)


# ---- command line ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from moeflux.demo import DEFAULT_VOCAB

    p = argparse.ArgumentParser(
        prog="python -m moeflux.bench",
        description="Measure the disk and memory limits and the engine against them "
                    "(decode cold and warm, prefill), as ratios, in one run.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="35b",
                   help="per-layer shapes: 35b = Qwen3.6-35B-A3B (default), "
                        "397b = Qwen3.5-397B-A17B")
    p.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    p.add_argument("--experts", type=int, default=None,
                   help="experts per layer (default: 256 for 35b, 64 for 397b)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--cache", type=Path, default=None,
                   help="model cache directory (default: the demo's)")
    p.add_argument("--tokens", type=int, default=16, help="decode tokens per run")
    p.add_argument("--prompts", default="16,128,512", help="prefill lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: all cores)")
    p.add_argument("--io-mib", type=int, default=256,
                   help="MiB read per disk measurement (default 256)")
    p.add_argument("--mem-mib", type=int, default=None,
                   help="memory-bandwidth buffer (default: 8 x LLC, >= 256 MiB)")
    p.add_argument("--hold-ram", type=float, default=0.0, metavar="GiB",
                   help="hold this much RAM so the page cache cannot keep the experts")
    p.add_argument("--drop-caches", action="store_true",
                   help="cold = /proc/sys/vm/drop_caches (root) instead of fadvise")
    p.add_argument("--io-mode", choices=IO_MODES + ("all",), default=None)
    p.add_argument("--io-threads", type=int, default=None)
    p.add_argument("--expert-cache-bytes", default=None, metavar="SIZES",
                   help="engine RAM cache sizes to run, e.g. 0,512M,2G (default: the "
                        "engine's)")
    p.add_argument("--prefetch", default=None, metavar="0,1",
                   help="decode prefetch settings to run: 0, 1 or 0,1 (default: the "
                        "engine's)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def parse_size(text: str) -> int:
    """'512M' / '2G' / '4096' -> bytes."""
    scale = {"K": 1024, "M": MiB, "G": GiB}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_list(text: Optional[str], conv: Callable[[str], Any], name: str) -> list:
    """A comma list of values ([None] when not given: the engine's default)."""
    if text is None:
        return [None]
    try:
        values = [conv(x) for x in str(text).replace(",", " ").split()]
    except ValueError as exc:
        raise BenchError(f"{name} {text!r}: {exc}") from exc
    if not values or any(v < 0 for v in values):
        raise BenchError(f"{name} {text!r}: expected non-negative values")
    return values


def check_args(args: argparse.Namespace) -> None:
    """Validate and fill the derived settings (BenchError on a bad value)."""
    from moeflux.demo import default_cache

    try:
        args.prompts = [int(x) for x in str(args.prompts).replace(",", " ").split()]
    except ValueError as exc:
        raise BenchError(f"--prompts {args.prompts!r}: expected integers") from exc
    for name in ("layers", "tokens", "repeats", "io_mib", "vocab"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, "
                             f"got {getattr(args, name)}")
    args.expert_cache_bytes = parse_list(args.expert_cache_bytes, parse_size,
                                         "--expert-cache-bytes")
    args.prefetch = parse_list(args.prefetch, int, "--prefetch")
    if any(v not in (None, 0, 1) for v in args.prefetch):
        raise BenchError(f"--prefetch: 0 or 1, got {args.prefetch}")
    if any(n < 1 for n in args.prompts):
        raise BenchError(f"--prompts: lengths must be >= 1, got {args.prompts}")
    args.threads = args.threads or os.cpu_count() or 1
    args.io_threads_eff = args.io_threads or DEFAULT_IO_THREADS
    mem = args.mem_mib * MiB if args.mem_mib else max(256 * MiB, 8 * llc_bytes())
    args.mem_bytes = mem - mem % 4096
    args.cache = args.cache or default_cache()
    if args.experts is None:
        args.experts = DEFAULT_EXPERTS[args.shape]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        res = bench(args)
    except BenchError as exc:
        print(f"moeflux.bench: error: {exc}", file=sys.stderr)
        return 2
    print_report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
