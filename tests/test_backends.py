"""The fast backends a machine must have are there: on a machine with a CUDA
device, ``cpp`` (with its CUDA kernels) and ``triton`` always; elsewhere those
named by ``FASTDDPM_REQUIRE_BACKENDS`` (CI: ``cpp,triton``).  A missing one
fails here with its reason, instead of the dispatch quietly falling back."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends import BACKENDS, HAS_CUDA, backend_of, required_backends
from fastddpm import ops
from fastddpm.ops import registry

pytestmark = pytest.mark.ops

OPS = ops.OPS  # every op of the dispatch, multistep_step included


@pytest.mark.parametrize("backend", BACKENDS)
def test_required_backend_loads(backend):
    if backend not in required_backends():
        pytest.skip(f"{backend} is not required here (set FASTDDPM_REQUIRE_BACKENDS to require it)")
    assert ops.load_error(backend) is None, f"backend {backend!r} {ops.load_error(backend)}"


@pytest.mark.gpu
def test_gpu_runs_the_fast_backends():
    from fastddpm.ops import cpp as cpp_ops

    assert cpp_ops.has_cuda(), "fastddpm._C was built without its CUDA kernels"
    for op in OPS:
        for dtype in (torch.float16, torch.bfloat16):
            assert ops.select_backend(op, torch.device("cuda"), dtype) == "triton", (op, dtype)
    assert ops.select_backend("ddpm_step", torch.device("cuda"), torch.float32) == "triton"


def test_backend_of_modules():
    assert backend_of("fastddpm.kernels.ops") == "triton" and backend_of("fastddpm._C") == "cpp"
    with pytest.raises(ValueError):
        backend_of("fastddpm.ops")


def test_required_backends_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTDDPM_REQUIRE_BACKENDS", "cpp")
    assert "cpp" in required_backends()
    monkeypatch.setenv("FASTDDPM_REQUIRE_BACKENDS", "cuda")
    with pytest.raises(ValueError, match="FASTDDPM_REQUIRE_BACKENDS"):
        required_backends()
    monkeypatch.delenv("FASTDDPM_REQUIRE_BACKENDS")
    assert required_backends() == (set(BACKENDS) if HAS_CUDA else set())


def test_load_error_names_the_reason(monkeypatch):
    monkeypatch.setitem(registry.BACKEND_MODULES, "cpp", "fastddpm.no_such_module")
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setattr(registry, "_load_errors", {})
    assert ops.load_error("cpp") == "not part of this installation"
    assert ops.load_error("reference") is None
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.load_error("cuda")


def test_source_checkout_imports_the_kernels_from_itself():
    """``PYTHONPATH=<checkout>`` (what the GPU check runs) imports ``fastddpm.kernels``
    from the checkout's ``kernels/`` without an installed copy to map it."""
    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n"
            "import fastddpm, fastddpm.kernels._library as lib\n"
            "print(fastddpm.__file__); print(lib.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(root),
                                                                       "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    package, library = (Path(line).resolve() for line in out.stdout.split())
    assert package == root / "fastddpm" / "__init__.py"
    assert library == root / "kernels" / "_library.py"
