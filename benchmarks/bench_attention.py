"""Attention: fastddpm's Triton flash attention vs every ``F.scaled_dot_product_attention``
backend (flash, cuDNN, memory-efficient, math), forward and forward+backward,
on the attention shapes of real DDPM U-Nets.

    python benchmarks/bench_attention.py [--dtype bf16|fp16] [--shapes cifar10-16x16 ...]

Rows: median time (20th/80th percentiles), TFLOP/s, and the speedup of the
Triton kernel over each SDPA backend (>1: Triton is faster); the summary rows
compare with the best SDPA backend per shape.  Writes
``benchmarks/results/attention_<dtype>.{json,md}``.  FLOPs: forward
``4 B H L^2 d``; backward 2.5x the forward (five ``L x L x d`` matmuls against
two), the FlashAttention papers' convention.

Goals (issue 4, H100): at least as fast as the best SDPA backend on every
shape, and >= 1.2x on the d=256 shape.  Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, error_line, measure, timing_fields, write_results  # noqa: E402

# (name, B, heads, L, d): the Ho et al. CIFAR-10 U-Net's 16x16 attention (one
# head of 256 channels), and the 32x32 / 64x64 attention of larger U-Nets
SHAPES = {
    "cifar10-16x16": (256, 1, 256, 256),
    "32x32-4heads": (64, 4, 1024, 64),
    "64x64-4heads": (16, 4, 4096, 64),
}
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["shape", "B", "heads", "L", "d", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "TFLOP/s",
           "triton speedup", "max_abs_err", "note"]


def providers() -> dict:
    """name -> attention function; each SDPA provider pinned to one backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastddpm.kernels.attention import attention

    def pinned(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    return {
        "triton": attention,
        "sdpa_flash": pinned(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": pinned(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": pinned(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa_math": pinned(SDPBackend.MATH),
    }


def _inputs(B, H, L, d, dtype, requires_grad):
    return [torch.randn(B, H, L, d, device="cuda", dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def time_provider(fn, B, H, L, d, dtype, mode, reps):
    q, k, v = _inputs(B, H, L, d, dtype, requires_grad=(mode != "fwd"))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        grad_out = torch.randn(B, H, L, d, device="cuda", dtype=dtype)

        def step():
            for x in (q, k, v):
                x.grad = None
            fn(q, k, v).backward(grad_out)
    return measure(step, "cuda", warmup=3, reps=reps)


def max_abs_error(fn, B, H, L, d, dtype) -> float:
    """Forward error against fp32 math on a slice of the batch (a sanity column, not a test)."""
    q, k, v = _inputs(min(B, 4), H, L, d, dtype, requires_grad=False)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return (fn(q, k, v).float() - ref).abs().max().item()


def run(shape_names, dtype_name, reps) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rows = []
    for name in shape_names:
        B, H, L, d = SHAPES[name]
        for mode in MODES:
            flops = 4.0 * B * H * L * L * d * (1.0 if mode == "fwd" else 3.5)
            group = []
            for provider, fn in providers().items():
                row = dict(shape=name, B=B, heads=H, L=L, d=d, mode=mode, provider=provider)
                try:
                    timing = time_provider(fn, B, H, L, d, dtype, mode, reps)
                    row.update(timing_fields(timing))
                    row["TFLOP/s"] = flops / (timing.median_ms * 1e-3) / 1e12
                    if mode == "fwd":
                        row["max_abs_err"] = max_abs_error(fn, B, H, L, d, dtype)
                except (RuntimeError, torch.OutOfMemoryError) as e:  # the backend cannot run this shape
                    row["note"] = error_line(e, 120)
                torch.cuda.empty_cache()
                group.append(row)
                shown = (f"{row['median_ms']:8.3f} ms {row['TFLOP/s']:7.1f} TFLOP/s" if "median_ms" in row
                         else f"n/a ({row['note']})")
                print(f"{name:14s} {mode:8s} {provider:15s} {shown}", flush=True)
            ours = next((r for r in group if r["provider"] == "triton" and "median_ms" in r), None)
            timed_sdpa = [r for r in group if r["provider"] != "triton" and "median_ms" in r]
            for r in timed_sdpa:
                r["triton speedup"] = r["median_ms"] / ours["median_ms"] if ours else None
            if ours and timed_sdpa:
                best = min(timed_sdpa, key=lambda r: r["median_ms"])
                group.append(dict(shape=name, B=B, heads=H, L=L, d=d, mode=mode, provider="best SDPA",
                                  **{"triton speedup": best["median_ms"] / ours["median_ms"],
                                     "note": best["provider"]}))
                print(f"{name:14s} {mode:8s} triton vs best SDPA ({best['provider']}): "
                      f"{best['median_ms'] / ours['median_ms']:.2f}x", flush=True)
            rows += group
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line (scripts/gpu_check.py's arguments are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out-dir", default=None, help="where the results go (default: benchmarks/results)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU and found none: nothing to measure on this machine.",
              file=sys.stderr)
        return 2
    rows = run(args.shapes, args.dtype, args.reps)
    meta = environment("cuda") | {"dtype": args.dtype, "flops": "fwd 4*B*H*L^2*d; fwd+bwd 3.5x that"}
    json_path, md_path = write_results(f"attention_{args.dtype}", rows, COLUMNS, meta, out_dir=args.out_dir)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
