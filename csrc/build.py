"""How setup.py builds ``fastddpm._C`` (loaded by path, so it needs no import
of the package being built).

* Always the C++ part (CPU ops, OpenMP); the CUDA part too when torch is a CUDA
  build and the CUDA toolkit is found.  No GPU is needed, nothing is
  downloaded; ninja compiles (``MAX_JOBS`` sets its parallelism).
* The toolkit: ``CUDA_HOME``/``CUDA_PATH`` if set; else the directory of the
  real ``nvcc`` on ``PATH`` (a wrapper script that ``exec``s another ``nvcc``
  is followed: torch's own guess, the wrapper's grandparent directory, is
  wrong there and linking fails with ``cannot find -lcudart``); else
  ``/usr/local/cuda``.  ``FASTDDPM_BUILD_CUDA=0`` builds the C++ part only;
  ``FASTDDPM_REQUIRE_CUDA=1`` (for CI) fails the build instead of silently
  leaving the CUDA part out.
* Architectures: ``FASTDDPM_CUDA_ARCHS`` (e.g. ``"9.0"`` or ``"8.0;9.0"``);
  default ``9.0`` in CI (``CI=true``: one architecture keeps the build short),
  else the local GPUs' if any, else ``8.0;9.0``.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

SOURCES = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/cpu_kernels.cpp"]
CUDA_SOURCES = ["csrc/cuda_kernels.cu"]
# -fopenmp: at::parallel_for's OpenMP region and `omp simd` are compiled here;
# -fno-math-errno: sqrtf without an errno branch, so the noise loop vectorises;
# -ffp-contract=off: no FMA contraction, float32 operations in the reference's order.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3"]             # no --use_fast_math: the noise must match the reference to a few ulp
DEFAULT_ARCHS = "8.0;9.0"
CI_ARCHS = "9.0"


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def real_nvcc(path: str | Path, depth: int = 4) -> Path | None:
    """The nvcc binary behind ``path``, following symlinks and wrapper scripts
    that name another ``.../bin/nvcc``."""
    p = Path(path).resolve()
    if not p.is_file():
        return None
    if _is_elf(p) or depth == 0:
        return p
    text = p.read_text(errors="ignore")
    for candidate in re.findall(r"(/[^\s\"';]*/bin/nvcc)\b", text):
        found = real_nvcc(candidate, depth - 1)
        if found is not None and found != p:
            return found
    return p


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (the directory holding ``bin/nvcc``), or None."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = real_nvcc(nvcc)
        if real is not None:
            home = real.parent.parent
            if (home / "include" / "cuda_runtime.h").exists():
                return str(home)
    fallback = Path("/usr/local/cuda")
    if (fallback / "bin" / "nvcc").exists():
        return str(fallback)
    return None


def cuda_archs() -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` to build for."""
    env = os.environ.get("FASTDDPM_CUDA_ARCHS")
    if env:
        return env
    if os.environ.get("CI", "").lower() == "true":
        return CI_ARCHS
    import torch

    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_ARCHS


def source_files(root: Path) -> list[Path]:
    """What fastddpm._C is compiled from: csrc's sources and headers, and the schema table."""
    csrc = root / "csrc"
    found = [p for p in csrc.iterdir() if p.suffix in (".cpp", ".cu", ".h")]
    return sorted(found) + [root / "fastddpm" / "ops" / "schemas.def"]


def source_hash(root: Path) -> str:
    """16 hex digits over the names and bytes of ``source_files``: compiled into the
    extension (``fastddpm._C.source_hash``), so a carried or installed build can be
    checked against the sources it is used with."""
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def extension_kwargs(root: Path) -> dict:
    """``ext_modules`` and ``cmdclass`` for setup()."""
    cuda_home = find_cuda_home() if os.environ.get("FASTDDPM_BUILD_CUDA", "1") != "0" else None
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if not with_cuda and os.environ.get("FASTDDPM_REQUIRE_CUDA") == "1":
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit was found"
        raise RuntimeError(f"FASTDDPM_REQUIRE_CUDA=1 but the CUDA part of fastddpm._C cannot be built: {why}")
    kwargs = dict(
        name="fastddpm._C",
        include_dirs=[str(root / "csrc")],
        # the C++ objects only (a source change recompiles them, not the CUDA one)
        extra_compile_args={"cxx": [*CXX_FLAGS, f"-DFASTDDPM_SOURCE_HASH=h{source_hash(root)}"]},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs()
        kwargs["extra_compile_args"]["nvcc"] = list(NVCC_FLAGS)
        ext = CUDAExtension(sources=SOURCES + CUDA_SOURCES, define_macros=[("FASTDDPM_WITH_CUDA", None)], **kwargs)
        print(f"fastddpm._C: C++ + CUDA (CUDA_HOME={cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension(sources=SOURCES, **kwargs)
        print("fastddpm._C: C++ only (no CUDA toolkit or a CPU-only torch)")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}
