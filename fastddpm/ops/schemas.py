"""The one schema table (``schemas.def`` beside this file), read for Python.

``csrc/module.cpp`` defines the C++ library from the same file (an X-macro:
``FASTDDPM_OP(s)`` is ``m.def(s)``); ``kernels/_library.py`` registers each
Triton op with its string from here, after :func:`check_annotations` has held
the Python function's annotations to it (torch 2.11's ``triton_op`` infers a
schema from them whatever it is given).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

TABLE = Path(__file__).with_name("schemas.def")
_LINE = re.compile(r'FASTDDPM(_CPP|_TRITON)?_OP\("([^"]+)"\)')
_BACKENDS = {None: ("cpp", "triton"), "_CPP": ("cpp",), "_TRITON": ("triton",)}


def parse(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{op name: (schema, backends)}`` from the table's text; raises
    ``ValueError`` on a line that is neither a comment, blank, nor one
    ``FASTDDPM[_CPP|_TRITON]_OP("...")``, and on a name given twice."""
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{TABLE.name}:{number}: expected FASTDDPM_OP(\"<schema>\"), got {line!r}")
        schema = match.group(2)
        name = schema.split("(", 1)[0]
        if name in table:
            raise ValueError(f"{TABLE.name}:{number}: op {name!r} is declared twice")
        try:
            torch._C.parse_schema(schema)
        except RuntimeError as e:
            raise ValueError(f"{TABLE.name}:{number}: malformed schema {schema!r}: {e}") from None
        table[name] = (schema, _BACKENDS[match.group(1)])
    return table


@lru_cache(maxsize=None)
def table() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The table: ``{op name: (schema string, backends that implement it)}``."""
    return parse(TABLE.read_text())


def names(backend: str) -> tuple[str, ...]:
    """The ops the table gives ``backend`` (``"cpp"`` or ``"triton"``)."""
    return tuple(name for name, (_, backends) in table().items() if backend in backends)


def schema(name: str, backend: str | None = None) -> str:
    """The schema string of op ``name``; with ``backend``, also check that the
    table gives the op to that backend."""
    try:
        text, backends = table()[name]
    except KeyError:
        raise KeyError(f"op {name!r} has no schema in {TABLE}; add a FASTDDPM_OP line there") from None
    if backend is not None and backend not in backends:
        raise KeyError(f"{TABLE.name} declares op {name!r} for {', '.join(backends)}, not {backend}")
    return text


def mutated(name: str) -> tuple[str, ...]:
    """The arguments op ``name`` writes (``Tensor(a!)``)."""
    return tuple(a.name for a in torch._C.parse_schema(schema(name)).arguments
                 if a.alias_info is not None and a.alias_info.is_write)


def normalized(parsed) -> tuple:
    """(arguments, returns) of a ``FunctionSchema`` with the name, the overload,
    alias-set names and ``int``/``SymInt`` differences removed: what two
    registrations of one op must agree on."""
    def arg(a):
        writes = a.alias_info is not None and a.alias_info.is_write
        return (a.name, str(a.type).replace("SymInt", "int"), writes, a.has_default_value(), a.default_value,
                a.kwarg_only)
    return tuple(arg(a) for a in parsed.arguments), tuple(str(r.type) for r in parsed.returns)


def matches(name: str, parsed) -> bool:
    """Whether the registered/inferred schema ``parsed`` is op ``name``'s in the table."""
    return normalized(parsed) == normalized(torch._C.parse_schema(schema(name)))


def check_annotations(name: str, fn: Callable, backend: str = "triton") -> None:
    """Raise ``TypeError`` unless the schema inferred from ``fn``'s annotations
    is op ``name``'s in the table (``KeyError`` if the table does not give the
    op to ``backend``)."""
    schema(name, backend)
    inferred = torch._C.parse_schema(f"{name}{torch.library.infer_schema(fn, mutates_args=mutated(name))}")
    if not matches(name, inferred):
        raise TypeError(f"{fn.__module__}.{fn.__qualname__}'s annotations give\n  {inferred}\n"
                        f"but {TABLE.name} declares\n  {schema(name)}")
