"""Build script: the package, plus the compiled extension ``fastddpm._C`` when
its sources exist (``csrc/``; how and with which toolkit: ``csrc/build.py``).
``FASTDDPM_BUILD_EXT=0`` skips the build; the package then runs on the reference."""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# every package under fastddpm/, with fastddpm.kernels through the fastddpm/kernels -> ../kernels link
PACKAGES = find_packages(include=["fastddpm", "fastddpm.*"])
PACKAGE_DIR = {"fastddpm": "fastddpm", "fastddpm.kernels": "kernels"}
PACKAGE_DATA = {"fastddpm": ["assets/*.safetensors", "assets/*.json"], "fastddpm.ops": ["schemas.def"]}


def extension_kwargs() -> dict:
    """ext_modules/cmdclass for fastddpm._C (built by csrc/build.py); empty when
    there is nothing to build."""
    if os.environ.get("FASTDDPM_BUILD_EXT", "1") == "0":
        return {}
    helper = ROOT / "csrc" / "build.py"
    if not helper.exists():
        return {}
    spec = importlib.util.spec_from_file_location("fastddpm_csrc_build", helper)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.extension_kwargs(ROOT)


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    include_package_data=True,
    **extension_kwargs(),
)
