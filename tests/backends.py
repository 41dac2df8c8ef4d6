"""Importing a fast backend in a test module (``import_backend``), or needing it
to run an op (``need``): a skip where the backend is optional, a failure with its
reason where it is required.

Required: both ``cpp`` and ``triton`` on a machine with a CUDA device (a GPU
check that skipped them would report success having tested nothing), and
whatever ``FASTDDPM_REQUIRE_BACKENDS`` names (``cpp,triton``; CI sets it).
"""
import importlib
import os

import pytest
import torch

from fastddpm import ops

BACKENDS = ("cpp", "triton")
HAS_CUDA = torch.cuda.is_available()


def required_backends() -> set[str]:
    named = {b.strip() for b in os.environ.get("FASTDDPM_REQUIRE_BACKENDS", "").split(",") if b.strip()}
    unknown = named - set(BACKENDS)
    if unknown:
        raise ValueError(f"FASTDDPM_REQUIRE_BACKENDS may name {BACKENDS}, got {sorted(unknown)}")
    return set(BACKENDS) if HAS_CUDA else named


def backend_of(module: str) -> str:
    if module == "fastddpm.kernels" or module.startswith("fastddpm.kernels."):
        return "triton"
    if module in ("fastddpm._C", "fastddpm.ops.cpp"):
        return "cpp"
    raise ValueError(f"{module} is not a backend module")


def import_backend(module: str):
    """The module; if it cannot be imported, the test module fails when its
    backend is required and is skipped otherwise."""
    if backend_of(module) in required_backends():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} cannot be imported here (backend not required)")


def need(backend: str, op: str, device, dtype=torch.float32) -> None:
    """Skip (or fail, where the backend is required) unless ``backend`` runs ``op`` here."""
    reason = ops.unsupported(backend, op, torch.device(device), dtype)
    if reason is None:
        return
    if ops.load_error(backend) is not None and backend in required_backends():
        pytest.fail(f"{backend} is required here but {reason}")
    pytest.skip(f"{backend} cannot run {op} on {device} ({dtype}) here: {reason}")
