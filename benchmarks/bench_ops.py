"""The fused elementwise ops, per provider: median time, GB/s moved and % of
the device's measured copy bandwidth.

Providers are rows: ``reference`` (the eager reference, through the dispatch
with ``backend="reference"``: the baseline is imported, never redefined),
``reference_compiled`` (``torch.compile`` of that same call), and one row per
fast backend of ``fastddpm.ops`` (``cpp``, ``triton``), skipped where that
backend cannot run.  A new backend needs only an entry in ``PROVIDERS``.

    python benchmarks/bench_ops.py --device cpu --sizes 1M,4M
    python benchmarks/bench_ops.py --device cuda --sizes 1M,16M,64M

Goals (issue 3): on an H100, >= 85% of copy bandwidth for q_sample and
ddpm_step at >= 16M elements; on a 2-core CPU, ddpm_step >= 3x the eager
reference.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth_gbs, environment, error_line, measure, time_limit, timing_fields,  # noqa: E402
                    write_results)

from fastddpm import ops  # noqa: E402
from fastddpm.ops import reference  # noqa: E402
from fastddpm.schedule import NoiseSchedule  # noqa: E402

SEED = 1234
IMAGE = (3, 64, 64)  # elements per sample: a 64x64 RGB image
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["op", "dtype", "numel", "provider", "median_ms", "p20_ms", "p80_ms", "GB/s", "% copy BW",
           "x reference", "note"]


# -- the ops -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOp:
    """``forward(*args, backend=...)`` is what gets timed (and compiled);
    ``finish(result, args)`` runs after it (the backward of the loss)."""

    name: str
    make_args: Callable[[int, torch.device, torch.dtype], tuple]
    forward: Callable
    bytes_per_element: Callable[[torch.dtype], int]
    finish: Callable = lambda result, args: result


def _schedule_tables(device):
    s = NoiseSchedule.make("linear", 1000)
    return s, s.table("sqrt_alphas_cumprod", device), s.table("sqrt_one_minus_alphas_cumprod", device)


def _batch(numel: int) -> int:
    per_sample = IMAGE[0] * IMAGE[1] * IMAGE[2]
    return max(1, round(numel / per_sample))


def _q_sample_args(numel, device, dtype):
    n = _batch(numel)
    _, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _schedule_tables(device)
    x0 = torch.randn(n, *IMAGE, device=device).to(dtype)
    t = torch.randint(0, 1000, (n,), device=device)
    return x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod


def _q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, *, backend):
    return ops.q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed=SEED, backend=backend)


def _ddpm_step_args(numel, device, dtype):
    n = _batch(numel)
    s, _, _ = _schedule_tables(device)
    coefs = torch.as_tensor(reference.step_coefficients(s, "epsilon", "fixed_small"), dtype=torch.float64)
    x = torch.randn(n, *IMAGE, device=device)
    out = torch.randn(n, *IMAGE, device=device).to(dtype)
    step = torch.randint(1, 1000, (n,), device=device)
    return x, out, step, coefs.to(device=device, dtype=torch.float32)


def _ddpm_step(x, out, step, coefs, *, backend):
    return ops.ddpm_step(x, out, step, coefs, seed=SEED, clip_denoised=True, backend=backend)


def _loss_args(numel, device, dtype):
    n = _batch(numel)
    s, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = _schedule_tables(device)
    weights = torch.as_tensor(reference.loss_weights(s, "v", 5.0), dtype=torch.float64).to(device, torch.float32)
    out = torch.randn(n, *IMAGE, device=device).to(dtype).requires_grad_()
    x0 = torch.randn(n, *IMAGE, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    return out, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights


def _loss(out, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, *, backend):
    return ops.diffusion_loss(out, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, weights, seed=SEED,
                              prediction="v", backend=backend)


def _loss_backward(loss, args):
    out = args[0]
    out.grad = None
    loss.backward()
    return out.grad


def _size(dtype):
    return torch.empty((), dtype=dtype).element_size()


OPS = {
    # read x0, write x_t (float32)
    "q_sample": BenchOp("q_sample", _q_sample_args, _q_sample, lambda d: _size(d) + 4),
    # read x and the model output, write x_prev
    "ddpm_step": BenchOp("ddpm_step", _ddpm_step_args, _ddpm_step, lambda d: 4 + _size(d) + 4),
    # forward + backward of a v-prediction loss: read (out, x0) twice, write the gradient
    "diffusion_loss": BenchOp("diffusion_loss", _loss_args, _loss, lambda d: 2 * (_size(d) + 4) + _size(d),
                              finish=_loss_backward),
}


# -- the providers -------------------------------------------------------------------------
def _dispatch_provider(backend: str):
    """A backend of fastddpm.ops, or None where it cannot run this op."""

    def make(op: BenchOp, args: tuple, device: torch.device, dtype: torch.dtype):
        if backend not in ops.available_backends(op.name, device, dtype):
            return None
        return partial(op.forward, *args, backend=backend)

    return make


def _compiled_reference(op: BenchOp, args: tuple, device: torch.device, dtype: torch.dtype):
    compiled = torch.compile(partial(op.forward, backend="reference"), dynamic=False)
    return partial(compiled, *args)


PROVIDERS = {
    "reference": _dispatch_provider("reference"),
    "reference_compiled": _compiled_reference,
    "cpp": _dispatch_provider("cpp"),
    "triton": _dispatch_provider("triton"),
}


# -- running ---------------------------------------------------------------------------------
def _parse_size(s: str) -> int:
    s = s.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
    return int(float(s.rstrip("KMG")) * scale)


def run(device: torch.device, sizes, op_names, provider_names, dtype_names, reps: int,
        first_call_timeout_s: float) -> list[dict]:
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{device}: copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    failed: dict[tuple[str, str], str] = {}  # (op, provider) -> why; not retried at other sizes
    for op_name in op_names:
        op = OPS[op_name]
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for size in sizes:
                args = op.make_args(size, device, dtype)
                numel = args[0].numel()
                base_ms = None
                for provider in provider_names:
                    if (op_name, provider) in failed:
                        continue
                    fn = PROVIDERS[provider](op, args, device, dtype)
                    if fn is None:
                        continue
                    try:  # the first call compiles where the provider compiles
                        with time_limit(first_call_timeout_s):
                            op.finish(fn(), args)
                    except Exception as e:  # noqa: BLE001 -- recorded in the results
                        failed[(op_name, provider)] = f"first call failed: {error_line(e, 120)}"
                        rows.append(dict(op=op_name, dtype=dtype_name, numel=numel, provider=provider,
                                         note=failed[(op_name, provider)]))
                        print(f"{op_name:15s} {dtype_name} {numel:>10d} {provider:19s} {failed[(op_name, provider)]}")
                        continue
                    timing = measure(lambda args=args: op.finish(fn(), args), device, warmup=1 if device.type == "cpu" else 3,
                                     reps=reps)
                    base_ms = timing.median_ms if provider == "reference" else base_ms
                    gbs = op.bytes_per_element(dtype) * numel / (timing.median_ms * 1e-3) / 1e9
                    row = dict(op=op_name, dtype=dtype_name, numel=numel, provider=provider, **timing_fields(timing))
                    row["GB/s"] = gbs
                    row["% copy BW"] = 100.0 * gbs / copy_gbs
                    row["x reference"] = base_ms / timing.median_ms if base_ms else None
                    rows.append(row)
                    print(f"{op_name:15s} {dtype_name} {numel:>10d} {provider:19s} {timing.median_ms:9.3f} ms "
                          f"{gbs:8.1f} GB/s {row['% copy BW']:5.1f}% copy"
                          + (f"  x{row['x reference']:.1f} vs reference" if row["x reference"] else ""))
                del args
    return rows, copy_gbs


def build_parser() -> argparse.ArgumentParser:
    """The command line (scripts/gpu_check.py's arguments are checked against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="elements per tensor, e.g. 1M,16M (default: CPU 1M,4M; GPU 1M,16M,64M)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--dtypes", default="fp32,bf16", help="model output (x0 for q_sample) dtypes")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--first-call-timeout", type=float, default=300.0,
                   help="seconds allowed for a provider's first call (torch.compile of the reference can take long)")
    p.add_argument("--name", default=None, help="results file name (default: ops_<device type>)")
    p.add_argument("--out-dir", default=None, help="where the results go (default: benchmarks/results)")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch._dynamo.config.cache_size_limit = 64
    sizes = [_parse_size(s) for s in (a.sizes or ("1M,4M" if device.type == "cpu" else "1M,16M,64M")).split(",")]
    dtype_names = a.dtypes.split(",")
    rows, copy_gbs = run(device, sizes, a.ops.split(","), a.providers.split(","), dtype_names, a.reps,
                         a.first_call_timeout)
    meta = environment(device) | {"copy_bandwidth_GBs": round(copy_gbs, 1), "image": "x".join(map(str, IMAGE)),
                                  "seed": SEED}
    json_path, md_path = write_results(a.name or f"ops_{device.type}", rows, COLUMNS, meta, out_dir=a.out_dir)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
