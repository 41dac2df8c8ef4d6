"""What the per-op conformance tests share: the backends under test, the inputs, the schedule.

Each conformance file (``test_<op>.py``) runs its op on every fast backend (``cpp``, ``triton``)
against the reference (``fastddpm.ops.reference``), over dtypes and odd and round shapes, with
the tolerances of ``tests/tolerances.py``.  ``TARGETS`` are the (backend, device) pairs: the C++
op on the CPU, Triton on the GPU (or the interpreter on a CPU-only machine), and on a GPU the
CUDA build of the C++ op too.  A backend that cannot run a case is skipped, unless it is required
here (``tests/backends.py``): then the case fails with the reason.
"""
from functools import lru_cache

import pytest
import torch

from fastddpm.ops import reference
from fastddpm.schedule import NoiseSchedule

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TARGETS = [("cpp", "cpu"), ("triton", DEVICE.type)] + ([pytest.param(("cpp", "cuda"), marks=pytest.mark.gpu)]
                                                       if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 5, 7, 9), (2, 1, 8, 8), (4, 3, 16, 16), (1, 1, 8, 8)]  # odd and round
LARGE_ODD_SHAPES = [(3, 3, 97, 101), (2, 3, 151, 150)]  # rows across tasks; > 65536 elements a row
T = 1000
SEED = 0x1234_5678_9ABC_DEF
SAMPLE_OFFSET = 5
# (seed, sample_offset): zero, a seed that fills both key words, the largest seed, offsets past 2**31
RNG_KEYS = [(0, 0), (SEED, SAMPLE_OFFSET), (2**32 + 3, 2**31 + 1), (2**63 - 1, 2**32 - 8)]
# (prediction, sampler, variance, eta): every DDPM row, and DDIM at three etas
STEP_VARIANTS = ([(p, "ddpm", v, 0.0) for p in reference.PREDICTIONS for v in reference.VARIANCES]
                 + [(p, "ddim", "fixed_small", eta) for p in reference.PREDICTIONS for eta in (0.0, 0.5, 1.0)])
NAMESPACES = {"cpp": "fastddpm", "triton": "fastddpm_triton"}


def target_id(v) -> str:
    return "-".join(v) if isinstance(v, tuple) and all(isinstance(x, str) for x in v) else str(v).replace("torch.", "")


def variant_id(v) -> str:
    return "-".join(map(str, v))


def namespace_op(backend: str, name: str):
    """A backend's torch operator ``name`` (the ops outside the registry: ``ddpm_step_cast``...)."""
    return getattr(getattr(torch.ops, NAMESPACES[backend]), name).default


@lru_cache(maxsize=None)
def schedule() -> NoiseSchedule:
    return NoiseSchedule.make("linear", T)


def tables(device="cpu"):
    s = schedule()
    return s.table("sqrt_alphas_cumprod", device), s.table("sqrt_one_minus_alphas_cumprod", device)


def timesteps(n, device="cpu", top=T):
    """Per-sample t covering both ends of the schedule."""
    base = [top - 1, 0, 1, top // 2, 17, top - 2]
    return torch.tensor((base * (n // len(base) + 1))[:n], dtype=torch.int64, device=device)


def coefficients(variant=("epsilon", "ddpm", "fixed_small", 0.0), device="cpu") -> torch.Tensor:
    prediction, sampler, variance, eta = variant
    rows = reference.step_coefficients(schedule(), prediction, variance, sampler, eta)
    return torch.as_tensor(rows, dtype=torch.float64).to(torch.float32).to(device)


def loss_weights(prediction, device="cpu") -> torch.Tensor:
    w = reference.loss_weights(schedule(), prediction, 5.0)  # min-SNR-5
    return torch.as_tensor(w, dtype=torch.float64).to(torch.float32).to(device)


def inputs(shape, dtype, device="cpu", seed=0):
    """A float32 ``x`` and a model output of ``dtype`` (scaled so the x0 clip bites)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    out = (torch.randn(shape, generator=g) * 1.5).to(device=device, dtype=dtype)
    return x, out


def rng_key(seed, sample_offset, device="cpu") -> torch.Tensor:
    """The noise key of the in-place ops: int64 [2] (seed, sample_offset)."""
    return torch.tensor([seed, sample_offset], dtype=torch.int64, device=device)
