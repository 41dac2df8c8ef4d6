"""Test configuration shared by every test module.

* ``HF_HUB_OFFLINE=1``: diffusers never looks anything up on a hub.
* Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1``
  must be set before triton is first imported, so it is set here, before any
  test module imports fastddpm.kernels.
* ``heavy`` tests (big shapes, long runs) are skipped unless ``--heavy`` is
  given or a GPU is present; ``gpu`` tests are skipped without a GPU.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import tolerances.py


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true", help="run the heavy cases that CI skips")


def pytest_collection_modifyitems(config, items):
    run_heavy = config.getoption("--heavy") or HAS_CUDA
    skip_heavy = pytest.mark.skip(reason="heavy case: run with --heavy or on a GPU")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "heavy" in item.keywords and not run_heavy:
            item.add_marker(skip_heavy)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: steadier on shared cores, and the same
    kernels for the same shapes as in spawned single-thread ranks."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
