"""How fastddpm's Triton kernels become torch operators.

On a GPU every op is a ``torch.library.triton_op`` whose body launches its
kernels through ``wrap_triton``: ``torch.compile`` traces into it and CUDA
graphs capture the launches.  Under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tests) ``triton_op`` cannot be traced by
``torch.compile``, so the same body is registered as an opaque
``torch.library.custom_op`` with an explicit fake implementation instead.

``INTERPRET`` is read once, at import, from Triton's own setting: Triton decides
between compiling and interpreting when a kernel is decorated, i.e. when this
package is imported.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from fastddpm.ops import schemas

NAMESPACE = "fastddpm_triton"
INTERPRET = bool(triton.knobs.runtime.interpret)  # TRITON_INTERPRET=1

# Elementwise kernels: one program per (sample, block of elements).  Under the
# interpreter, where every program costs Python time, use big blocks.
ELEMENTWISE_BLOCK = 4096 if INTERPRET else 1024
ELEMENTWISE_WARPS = 4


def _fix_interpreter_index() -> None:
    """Let the interpreter use a scalar kernel argument as a ``range`` bound
    with numpy >= 2.4.

    The interpreter holds a scalar as a numpy array of shape ``(1,)`` and its
    ``__index__`` calls ``int()`` on it, which numpy 2.4 made an error
    ("only 0-dimensional arrays can be converted to Python scalars"), so
    ``for start in range(0, n, BLOCK)`` fails in every attention kernel under
    Triton 3.6.  This wraps the interpreter's own patching of ``tl.tensor``
    (restored with it after each launch) and reads the single element instead.
    Kernels compiled for a GPU are untouched.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "fastddpm_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.fastddpm_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _fix_interpreter_index()


OPS: dict[str, Callable] = {}  # op name -> its Python function
FAKES: dict[str, Callable] = {}  # op name -> its explicit fake (what the interpreter path registers)


def op(name: str, *, fake: Callable) -> Callable:
    """Decorator: register ``fn`` as ``fastddpm_triton::name`` with the schema
    of the one table (``fastddpm/ops/schemas.def``; what it mutates too).

    ``fn``'s annotations must give that same schema, checked here at import:
    torch 2.11's ``triton_op`` ignores a declared schema and infers one from
    them (an ``int`` becomes ``SymInt``, which the check allows).

    :param fake: the shape/dtype-only implementation used by the custom-op
        path (``triton_op`` derives its own from ``fn``).
    """
    qualname = f"{NAMESPACE}::{name}"

    def register(fn):
        schemas.check_annotations(name, fn, "triton")
        signature = schemas.schema(name)[len(name):]  # "(Tensor x, ...) -> ...", as torch.library takes it
        mutates_args = schemas.mutated(name)
        OPS[name] = fn
        FAKES[name] = fake
        if INTERPRET:
            opdef = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, schema=signature)
            opdef.register_fake(fake)
            return opdef
        return torch.library.triton_op(qualname, fn, mutates_args=mutates_args, schema=signature)

    return register


def launch(kernel):
    """``wrap_triton(kernel)`` on a GPU, so ``torch.compile`` traces the launch
    into the graph; the kernel itself under the interpreter (the body runs
    inside an opaque custom op there, and torch >= 2.11's ``wrap_triton``
    rejects interpreted kernels)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def elementwise_grid(n: int, numel: int, block: int) -> tuple[int, int]:
    """Rows on axis 0 (up to 2**31-1 samples), element blocks on axis 1."""
    return (n, triton.cdiv(numel, block))


def elementwise_block(numel) -> int:
    """Block size for ``numel`` elements per sample: the smallest power of two
    >= ``numel`` between 128 and ELEMENTWISE_BLOCK.  Comparisons only, so a
    symbolic ``numel`` (torch.compile with dynamic shapes) gives a constant."""
    block = 128
    while block < ELEMENTWISE_BLOCK and block < numel:
        block *= 2
    return block
