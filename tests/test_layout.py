"""The source tree and what an install contains agree."""
import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_constant(name: str):
    """setup.py's ``name = ...``, evaluated from the repository root (``find_packages`` is its only call)."""
    from setuptools import find_packages

    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            cwd = os.getcwd()
            os.chdir(ROOT)
            try:
                return eval(compile(ast.Expression(node.value), "setup.py", "eval"), {"find_packages": find_packages})
            finally:
                os.chdir(cwd)
    raise AssertionError(f"setup.py has no {name}")


def test_every_package_of_the_source_is_installed():
    """A new sub-package missing from setup.py's PACKAGES would import from a checkout and fail installed."""
    packages = set(_setup_constant("PACKAGES"))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastddpm").rglob("__init__.py")
             if "kernels" not in p.relative_to(ROOT).parts and "__pycache__" not in p.parts}
    assert found <= packages, sorted(found - packages)
    assert "fastddpm.kernels" in packages  # installed from kernels/ (package_dir)


def test_the_schema_table_is_installed():
    """The Triton registration reads fastddpm/ops/schemas.def at import: an install without it cannot register."""
    assert "schemas.def" in _setup_constant("PACKAGE_DATA")["fastddpm.ops"]
    assert (ROOT / "fastddpm" / "ops" / "schemas.def").is_file()
