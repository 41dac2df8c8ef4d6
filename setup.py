"""Build script: the package, plus the compiled extension ``fastddpm._C`` when
its sources exist (see ``csrc/``).  ``FASTDDPM_BUILD_EXT=0`` skips the build."""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

PACKAGES = ["fastddpm", "fastddpm.models", "fastddpm.kernels"]
PACKAGE_DIR = {"fastddpm": "fastddpm", "fastddpm.kernels": "kernels"}
PACKAGE_DATA = {"fastddpm": ["assets/*.safetensors", "assets/*.json"]}


def extension_kwargs() -> dict:
    """ext_modules/cmdclass for fastddpm._C; empty when there is nothing to build."""
    if os.environ.get("FASTDDPM_BUILD_EXT", "1") == "0":
        return {}
    if not list((ROOT / "csrc").glob("*.cpp")):
        return {}
    from csrc_build import extension_kwargs as build  # noqa: WPS433 (local build helper)

    return build(ROOT)


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    include_package_data=True,
    **extension_kwargs(),
)
