"""Compile every Triton kernel variant fastddpm launches on a GPU for sm_90
(H100/H200) on a machine without one, and check what ptxas reports.

    python scripts/compile_sm90.py [--json PATH] [--list]

The host launchers (``fastddpm.kernels``) are called with CPU tensors of the
shapes and dtypes that the GPU tests and benchmarks use, with their ``launch``
replaced by a recorder: what they would launch (kernel, arguments,
compile-time constants) is what gets compiled, so this check follows the code.
An autotuned kernel is compiled in every config its pruner keeps (the ones
the autotuner may pick).  Triton's own JIT does the compiling, against a
stand-in driver that reports an sm_90 target; nothing is launched.

Fails (exit 1) on a compile error, on shared memory above the 227 KiB an sm_90
block can have, or on register spills (ptxas ``-v``) in any variant.  Prints
one line per kernel and a summary; ``--json`` writes every variant's numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_sm90.py compiles for a GPU: unset TRITON_INTERPRET")
# A fresh cache: a cached kernel would skip ptxas, and with it the register report.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastddpm-sm90-")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastddpm

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastddpm.kernels.attention_tiles import SMEM_LIMIT  # noqa: E402  (bytes of shared memory an sm_90 block may use)

TARGET = GPUTarget("cuda", 90, 32)


class Sm90Driver:
    """The parts of Triton's driver that compiling (not launching) asks for."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise RuntimeError("nothing is benchmarked or launched here")


# -- recording what the launchers launch ----------------------------------------------
LAUNCHES: list[tuple] = []


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            LAUNCHES.append((self.kernel, args, kwargs))
        return record


def record_launches():
    """Replace ``launch`` in every kernel module by the recorder."""
    from fastddpm.kernels import attention, ddpm_step, diffusion_loss, multistep_step, q_sample

    for module in (attention, ddpm_step, diffusion_loss, multistep_step, q_sample):
        module.launch = _Recorder


def drive_launchers() -> None:
    """Call each host launcher the way the GPU tests and benchmarks do."""
    from fastddpm.ops import reference
    from fastddpm.kernels import attention as attn
    from fastddpm.kernels import ddpm_step as step_mod
    from fastddpm.kernels import diffusion_loss as loss_mod
    from fastddpm.kernels import q_sample as q_mod
    from fastddpm.kernels._library import ELEMENTWISE_BLOCK

    floats = (torch.float32, torch.float16, torch.bfloat16)
    T = 1000
    table = torch.rand(T)
    coefs = torch.rand(T, 6)  # c2 != 0: the raw-output term is compiled and run
    # numel per sample -> every elementwise BLOCK (128 .. ELEMENTWISE_BLOCK), odd and round
    numels = [100, 255, 500, ELEMENTWISE_BLOCK * 3]
    for numel, dtype in itertools.product(numels, floats):
        x0 = torch.randn(2, numel, dtype=dtype)
        t = torch.tensor([0, T - 1])
        _call(q_mod.q_sample, x0, t, table, table, 0, 0)
        for prediction, loss_type in itertools.product(reference.PREDICTIONS, reference.LOSSES):
            _call(loss_mod.diffusion_loss, x0, x0.float(), t, table, table, table, 0, 0, prediction, loss_type, 1.0)
            _call(loss_mod.diffusion_loss_backward, torch.tensor(1.0), x0, x0.float(), t, table, table, table, 0, 0,
                  prediction, loss_type, 1.0)
    # the reverse step: every output dtype x model-input dtype/layout x clip x key source
    shape = (2, 3, 32, 32)  # 3072 elements per sample: the largest block
    x = torch.randn(shape)
    step = torch.tensor(5)
    rng = torch.tensor([1, 0])
    for out_dtype, clip in itertools.product(floats, (False, True)):
        out = torch.randn(shape, dtype=out_dtype)
        step_mod.ddpm_step_into(x, out, step, coefs, 1, 0, clip, torch.empty(shape))
        step_mod.ddpm_step_into(x, out, step, coefs, 0, 0, clip, x.clone(), rng=rng)
        for model_dtype, layout in itertools.product(floats, (torch.contiguous_format, torch.channels_last)):
            model_input = torch.empty(shape, dtype=model_dtype, memory_format=layout)
            step_mod.ddpm_step_into(x, out, step, coefs, 1, 0, clip, torch.empty(shape), model_input)
            step_mod.ddpm_step_into(x, out, step, coefs, 0, 0, clip, x.clone(), model_input, rng=rng)
    # ... guided (classifier-free guidance: uncond_output a dim-0 view of a [2n, ...] output): every
    # output dtype x clip x key source, and the in-place form with each model-input dtype/layout
    for out_dtype, clip in itertools.product(floats, (False, True)):
        both = torch.randn((4, *shape[1:]), dtype=out_dtype)
        out, uncond = both[:2], both[2:]
        step_mod.ddpm_step_into(x, out, step, coefs, 1, 0, clip, torch.empty(shape), uncond_output=uncond,
                                guidance_scale=7.5)
        step_mod.ddpm_step_into(x, out, step, coefs, 0, 0, clip, x.clone(), rng=rng, uncond_output=uncond,
                                guidance_scale=7.5)
        for model_dtype, layout in itertools.product(floats, (torch.contiguous_format, torch.channels_last)):
            model_input = torch.empty(shape, dtype=model_dtype, memory_format=layout)
            step_mod.ddpm_step_into(x, out, step, coefs, 0, 0, clip, x.clone(), model_input, rng=rng,
                                    uncond_output=uncond, guidance_scale=7.5)
    # ... thresholded (dynamic thresholding: float32 [n] bounds), unguided and guided: every output
    # dtype x clip x key source, and the in-place form with each model-input dtype/layout
    bounds = torch.rand(2) + 1.0
    for out_dtype, clip, guided in itertools.product(floats, (False, True), (False, True)):
        both = torch.randn((4, *shape[1:]), dtype=out_dtype)
        out, uncond = both[:2], (both[2:] if guided else None)
        kw = dict(uncond_output=uncond, guidance_scale=7.5, threshold=bounds)
        step_mod.ddpm_step_into(x, out, step, coefs, 1, 0, clip, torch.empty(shape), **kw)
        step_mod.ddpm_step_into(x, out, step, coefs, 0, 0, clip, x.clone(), rng=rng, **kw)
        for model_dtype, layout in itertools.product(floats, (torch.contiguous_format, torch.channels_last)):
            model_input = torch.empty(shape, dtype=model_dtype, memory_format=layout)
            step_mod.ddpm_step_into(x, out, step, coefs, 0, 0, clip, x.clone(), model_input, rng=rng, **kw)
    # ... inpainting (known/mask with a [K, 8] table), unguided and guided: every output dtype x clip x
    # key source, and the in-place form with each model-input dtype/layout; thresholded too, once per dtype
    coefs7 = torch.rand(T, 8)
    blend = dict(known=torch.randn(shape), mask=torch.rand(shape).round())
    for out_dtype, clip, guided in itertools.product(floats, (False, True), (False, True)):
        both = torch.randn((4, *shape[1:]), dtype=out_dtype)
        out, uncond = both[:2], (both[2:] if guided else None)
        kw = dict(uncond_output=uncond, guidance_scale=7.5, **blend)
        step_mod.ddpm_step_into(x, out, step, coefs7, 1, 0, clip, torch.empty(shape), **kw)
        step_mod.ddpm_step_into(x, out, step, coefs7, 0, 0, clip, x.clone(), rng=rng, **kw)
        for model_dtype, layout in itertools.product(floats, (torch.contiguous_format, torch.channels_last)):
            model_input = torch.empty(shape, dtype=model_dtype, memory_format=layout)
            step_mod.ddpm_step_into(x, out, step, coefs7, 0, 0, clip, x.clone(), model_input, rng=rng, **kw)
        if clip:
            step_mod.ddpm_step_into(x, out, step, coefs7, 0, 0, clip, x.clone(), rng=rng, threshold=bounds, **kw)
    for numel in numels[:-1]:  # the smaller blocks, one variant each (and guided, thresholded, blended)
        x = torch.randn(2, numel)
        step_mod.ddpm_step_into(x, x, step, coefs, 1, 0, True, torch.empty_like(x))
        step_mod.ddpm_step_into(x, x, step, coefs, 1, 0, True, torch.empty_like(x), uncond_output=x,
                                guidance_scale=7.5)
        step_mod.ddpm_step_into(x, x, step, coefs, 1, 0, True, torch.empty_like(x), threshold=bounds)
        step_mod.ddpm_step_into(x, x, step, coefs7, 1, 0, True, torch.empty_like(x), known=x, mask=x)
    # the multistep solver update: every output dtype x clip x stochastic, at every block size
    from fastddpm.kernels import multistep_step as ms_mod

    table = torch.rand(20, ms_mod.MULTISTEP_WIDTH)  # and a history of [slots, *x.shape]
    slots = ms_mod.MULTISTEP_HISTORY_SLOTS
    for numel, out_dtype, clip, stochastic in itertools.product(numels, floats, (False, True), (False, True)):
        x = torch.randn(2, numel)
        out = torch.randn(2, numel, dtype=out_dtype)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, 2, numel), step, table, rng, clip, stochastic)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, 2, numel), step, table, rng, clip, stochastic,
                                   uncond_output=torch.randn(2, numel, dtype=out_dtype), guidance_scale=7.5)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, 2, numel), step, table, rng, clip, stochastic,
                                   threshold=bounds)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, 2, numel), step, table, rng, clip, stochastic,
                                   uncond_output=torch.randn(2, numel, dtype=out_dtype), guidance_scale=7.5,
                                   threshold=bounds)
    # ... and with the model input: every output dtype x model-input dtype/layout x stochastic
    for out_dtype, model_dtype, layout, stochastic in itertools.product(
            floats, floats, (torch.contiguous_format, torch.channels_last), (False, True)):
        x = torch.randn(shape)
        model_input = torch.empty(shape, dtype=model_dtype, memory_format=layout)
        out = torch.randn(shape, dtype=out_dtype)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, *shape), step, table, rng, True, stochastic, model_input)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, *shape), step, table, rng, True, stochastic, model_input,
                                   uncond_output=torch.randn(shape, dtype=out_dtype), guidance_scale=7.5)
        ms_mod.multistep_step_into(x, out, torch.zeros(slots, *shape), step, table, rng, True, stochastic, model_input,
                                   threshold=bounds)
    # attention: fp16/bf16 (fp32 goes to SDPA on a GPU) at every head dim the tests, the
    # benchmarks and the U-Nets use (16 .. 256, padded ones too), L a multiple of 16 or not
    for dtype, d, L in itertools.product((torch.float16, torch.bfloat16), (16, 32, 40, 64, 128, 256), (256, 100)):
        q = torch.randn(1, 1, L, d, dtype=dtype)
        _call(attn.attention_forward, q, q, q)
        _call(attn.attention_backward, q, q, q, q, q, torch.zeros(1, 1, L))


def _call(op, *args):
    """The Python body of a registered op, called directly (no dispatch, no autograd)."""
    return getattr(op, "_init_fn", op)(*args)


# -- compiling -------------------------------------------------------------------------
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(jit_fn, args, kwargs) -> dict:
    """Compile one variant; its registers, spills and shared memory."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = jit_fn.warmup(*args, grid=(1,), **kwargs)
    text = log.getvalue()
    regs = [int(r) for r in PTXAS_REGS.findall(text)]
    spills = [int(a) + int(b) for a, b in PTXAS_SPILLS.findall(text)]
    return dict(registers=max(regs, default=-1), spill_bytes=sum(spills), shared=int(compiled.metadata.shared))


def variants():
    """(JITFunction, args, kwargs) for every recorded launch; an autotuned kernel
    once per config its pruner keeps."""
    for kernel, args, kwargs in LAUNCHES:
        if isinstance(kernel, triton.runtime.Autotuner):
            kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.run sets before pruning
            configs = kernel.prune_configs(kwargs)
            kernel.nargs = None
            for config in configs:
                full = {**kwargs, **config.all_kwargs()}
                yield kernel.fn, args, full
        else:
            yield kernel, args, kwargs


def _key(jit_fn, args, kwargs):
    """What Triton compiles a kernel anew for: tensor dtypes, ints equal to 1,
    divisible by 16 or 64-bit, and the compile-time constants and options."""
    def spec(a):
        if isinstance(a, torch.Tensor):
            return ("T", str(a.dtype))
        if isinstance(a, bool) or a is None:
            return a
        if isinstance(a, int):
            return ("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
        if isinstance(a, float):
            return "f"
        return a
    return (jit_fn.__name__, tuple(spec(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))


VARIANTS: list[tuple] = []  # (JITFunction, args, kwargs), one per distinct compile


def _label(jit_fn, kargs, kwargs) -> str:
    constants = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in kargs if isinstance(a, torch.Tensor)})
    return (f"{jit_fn.__name__} " + " ".join(f"{k}={v}" for k, v in sorted(constants.items())) +
            f" warps={kwargs.get('num_warps')} stages={kwargs.get('num_stages')} dtypes={','.join(dtypes)}")


def _compile_index(index: int) -> dict:
    jit_fn, kargs, kwargs = VARIANTS[index]
    try:
        row = compile_variant(jit_fn, kargs, kwargs)
    except Exception as e:  # a compile error is a finding, not a crash of the check
        row = dict(registers=-1, spill_bytes=-1, shared=-1, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["variant"] = _label(jit_fn, kargs, kwargs)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every variant's registers/spills/shared memory here")
    parser.add_argument("--list", action="store_true", help="list the variants without compiling")
    parser.add_argument("--match", default="", help="compile only the kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: all cores)")
    args = parser.parse_args()

    triton.runtime.driver.set_active(Sm90Driver())
    triton.knobs.nvidia.dump_ptxas_log = True
    record_launches()
    drive_launchers()
    seen = set()
    for variant in variants():
        if args.match not in variant[0].__name__:
            continue
        key = _key(*variant)
        if key not in seen:
            seen.add(key)
            VARIANTS.append(variant)
    if args.list:
        print("\n".join(_label(*v) for v in VARIANTS))
        print(f"{len(VARIANTS)} variants")
        return 0

    t0 = time.perf_counter()
    rows, failures = [], []
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:  # children inherit the variants
        for row in pool.imap(_compile_index, range(len(VARIANTS)), chunksize=4):
            rows.append(row)
            if len(rows) % 100 == 0:
                print(f"  {len(rows)}/{len(VARIANTS)} compiled ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)
    for row in rows:
        label = row["variant"]
        problems = []
        if "error" in row:
            problems.append(row["error"])
        else:
            if row["spill_bytes"] > 0:
                problems.append(f"{row['spill_bytes']} bytes of register spills ({row['registers']} registers)")
            if row["shared"] > SMEM_LIMIT:
                problems.append(f"{row['shared']} bytes of shared memory > {SMEM_LIMIT}")
        if problems:
            failures.append(f"{label}: {'; '.join(problems)}")
    seconds = time.perf_counter() - t0
    by_kernel: dict[str, list] = {}
    for row in rows:
        by_kernel.setdefault(row["variant"].split()[0], []).append(row)
    for name, group in sorted(by_kernel.items()):
        regs = [r["registers"] for r in group if r["registers"] >= 0]
        shared = [r["shared"] for r in group if r["shared"] >= 0]
        print(f"{name:28s} {len(group):4d} variants  registers <= {max(regs, default=-1):3d}  "
              f"shared <= {max(shared, default=-1) / 1024:6.1f} KiB  spills in "
              f"{sum(r['spill_bytes'] > 0 for r in group)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(target="sm_90", triton=triton.__version__, torch=torch.__version__,
                                             seconds=round(seconds, 1), variants=rows), indent=1))
    print(f"compile_sm90: {len(rows)} variants compiled for sm_90 in {seconds:.0f} s "
          f"(triton {triton.__version__}); {len(failures)} with problems")
    for line in failures:
        print("  FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
