"""The one benchmark harness: timing, the device's copy bandwidth, results files.

Every benchmark script times its providers with ``measure`` (median and
20th/80th percentiles, GPU time from CUDA events, calls batched so launch
overhead does not count) and writes its rows with ``write_results``: a JSON
file and a markdown table under ``benchmarks/results/``.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def environment(device) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict], columns: Sequence[str], meta: dict) -> tuple[Path, Path]:
    """``benchmarks/results/<name>.json`` (meta + rows) and ``<name>.md`` (a table)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2) + "\n")
    header = f"# {name}\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
    md_path.write_text(header + markdown_table(rows, columns) + "\n")
    return json_path, md_path


def timing_fields(timing: Timing) -> dict:
    return asdict(timing)
