"""The Triton ops' schemas are their Python annotations (torch 2.11's
``triton_op`` infers them and ignores a declared string), and they must equal
the C++ backend's schemas (``csrc/module.cpp``), op for op, up to ``int`` being
inferred as ``SymInt``."""
import pytest
import torch

from backends import import_backend

kernels_library = import_backend("fastddpm.kernels._library")
import_backend("fastddpm.kernels.ops")
import_backend("fastddpm.ops.cpp")

pytestmark = pytest.mark.ops


def normalized(schema) -> tuple:
    """(arguments, returns) of a FunctionSchema with alias-set names, the
    overload name and int/SymInt differences removed."""
    def arg(a):
        writes = a.alias_info is not None and a.alias_info.is_write
        return (a.name, str(a.type).replace("SymInt", "int"), writes, a.has_default_value(), a.default_value,
                a.kwarg_only)
    return tuple(arg(a) for a in schema.arguments), tuple(str(r.type) for r in schema.returns)


def test_every_triton_op_is_registered_with_its_annotations():
    for name, fn in kernels_library.OPS.items():
        registered = getattr(torch.ops.fastddpm_triton, name).default._schema
        inferred = torch._C.parse_schema(f"{name}{torch.library.infer_schema(fn, mutates_args=_mutated(registered))}")
        assert normalized(registered) == normalized(inferred), name


def test_triton_schemas_equal_the_cpp_ones():
    shared = [name for name in kernels_library.OPS if hasattr(torch.ops.fastddpm, name)]
    assert {"q_sample", "diffusion_loss", "diffusion_loss_backward", "ddpm_step", "ddpm_step_cast",
            "ddpm_step_", "multistep_step_"} <= set(shared)
    for name in shared:
        cpp = getattr(torch.ops.fastddpm, name).default._schema
        triton = getattr(torch.ops.fastddpm_triton, name).default._schema
        assert normalized(triton) == normalized(cpp), f"{name}:\n  triton {triton}\n  cpp    {cpp}"


def test_normalized_sees_a_difference():
    """The comparison is not vacuous: a renamed, a retyped, a non-mutating or a defaulted argument differs."""
    base = torch._C.parse_schema("f(Tensor(a!) x, int seed, Tensor? m) -> ()")
    for other in ("f(Tensor(a!) y, int seed, Tensor? m) -> ()", "f(Tensor(a!) x, float seed, Tensor? m) -> ()",
                  "f(Tensor x, int seed, Tensor? m) -> ()", "f(Tensor(a!) x, int seed, Tensor? m=None) -> ()",
                  "f(Tensor(a!) x, int seed, Tensor? m) -> Tensor"):
        assert normalized(torch._C.parse_schema(other)) != normalized(base), other
    assert normalized(torch._C.parse_schema("f(Tensor(b!) x, SymInt seed, Tensor? m) -> ()")) == normalized(base)


def _mutated(schema) -> tuple:
    return tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
