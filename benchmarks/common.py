"""The one benchmark harness: timing, the device's copy bandwidth, results files.

Every benchmark script times its providers with ``measure`` (median and
20th/80th percentiles, GPU time from CUDA events, calls batched so launch
overhead does not count) and writes its rows with ``write_results``: a JSON
file and a markdown table under ``benchmarks/results/``.  ``environment``
records the device, versions and git commit; ``PeakMemory``, ``forward_flops``
and ``bf16_peak_tflops`` give the memory and tensor-core utilisation columns.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name: the
# vendor data sheets.  The first entry whose words all occur in the name wins.
BF16_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "SXM"), 989.0),
    (("H100", "HBM3"), 989.0),  # torch reports the SXM part as "NVIDIA H100 80GB HBM3"
)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(fn: Callable[[], object], device, *, warmup: int = 2, reps: int = 10, min_sample_ms: float = 1.0,
            max_total_s: float = 20.0) -> Timing:
    """Time ``fn()``: ``reps`` samples, each ``inner`` back-to-back calls (enough
    for ``min_sample_ms``), as the time per call.  On CUDA the samples are
    CUDA-event intervals, so host overhead hides behind queued kernels."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once_ms = (time.perf_counter() - start) * 1e3
    inner = max(1, int(min_sample_ms / max(once_ms, 1e-3)))
    reps = max(3, min(reps, int(max_total_s * 1e3 / max(once_ms * inner, 1e-3))))
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), reps)


def copy_bandwidth_gbs(device, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth, GB/s counting read + write
    (the ceiling an elementwise op can reach)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, reps=20)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def bf16_peak_tflops(device) -> float | None:
    """The device's dense bf16 tensor-core peak from ``BF16_PEAK_TFLOPS``, or None (unknown)."""
    name = device_name(device)
    for words, tflops in BF16_PEAK_TFLOPS:
        if all(w.lower() in name.lower() for w in words):
            return tflops
    return None


def git_commit() -> str | None:
    """``HEAD`` of the repository, with ``-dirty`` when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: Sequence[str]) -> dict:
    """``{name: version}`` of installed distributions ("not installed" otherwise)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def driver_version() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def environment(device, packages: Sequence[str] = ()) -> dict:
    """Run metadata: device, driver, torch/CUDA/Triton, threads, time, git
    commit, and the versions of ``packages`` (distribution names)."""
    return {
        "device": device_name(device),
        "driver": driver_version() if torch.device(device).type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_versions(["triton"])["triton"],
        "threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
    } | package_versions(packages)


def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them
    (matmuls, convolutions, attention; elementwise ops count zero)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory over a ``with`` block, in MB (``.mb``; None where unknown).

    CUDA: ``torch.cuda.max_memory_allocated`` (everything allocated on the
    device, resident models included).  CPU: the peak resident set size above
    the size at entry, sampled every ``interval_s`` by a thread (Linux
    ``/proc``; None elsewhere).
    """

    kind = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "peak RSS above the start (sampled)"}

    def __init__(self, device, interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            if self._start is not None:
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._start is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
            self.mb = (self._peak - self._start) / 2**20
        return False


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict], columns: Sequence[str], meta: dict,
                  out_dir: Path | str | None = None) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` (meta + rows) and ``<name>.md`` (meta as a list,
    list values as sub-lists, then a table); ``out_dir`` defaults to ``benchmarks/results/``."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2) + "\n")
    def item(k, v):
        return f"- {k}:" + "".join(f"\n  - {x}" for x in v) if isinstance(v, (list, tuple)) else f"- {k}: {v}"

    header = f"# {name}\n\n" + "\n".join(item(k, v) for k, v in meta.items()) + "\n\n"
    md_path.write_text(header + markdown_table(rows, columns) + "\n")
    return json_path, md_path


def timing_fields(timing: Timing) -> dict:
    return asdict(timing)


def error_line(e: BaseException, width: int = 160) -> str:
    """``"<type>: <first line of the message>"``, the line cut at ``width``: an exception as a row's note."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:width] if text else ''}"


def free_memory(device: torch.device) -> None:
    """Drop what a finished row left behind (objects, compiled graphs, cached CUDA blocks)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (Unix): a
    compile that never finishes becomes a row note, not a hung benchmark."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
