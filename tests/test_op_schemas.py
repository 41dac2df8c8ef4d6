"""One schema table (``fastddpm/ops/schemas.def``) defines both compiled
backends: every op registered under ``torch.ops.fastddpm`` (the C++ library,
which includes the table) and ``torch.ops.fastddpm_triton`` (registered from
it in ``kernels/_library.py``) has the table's schema, up to ``int`` being
inferred as ``SymInt``, and each backend registers exactly the ops the table
gives it."""
import pytest
import torch

from backends import import_backend
from fastddpm.ops import schemas

pytestmark = pytest.mark.ops


def _registered(namespace: str) -> dict:
    """{op name: schema} of every op the dispatcher knows in ``namespace``."""
    names = {op.split("::", 1)[1].split(".", 1)[0] for op in torch._C._dispatch_get_all_op_names()
             if op.startswith(f"{namespace}::")}
    return {name: getattr(getattr(torch.ops, namespace), name).default._schema for name in names}


def test_the_table_parses_and_names_each_op_once():
    table = schemas.table()
    assert {"q_sample", "diffusion_loss", "diffusion_loss_backward", "ddpm_step", "ddpm_step_cast", "ddpm_step_",
            "multistep_step_", "attention_forward", "attention_backward"} <= set(table)
    assert schemas.mutated("ddpm_step_") == ("x", "model_input")
    assert schemas.mutated("multistep_step_") == ("x", "history", "model_input")
    assert schemas.names("cpp") == tuple(n for n in table if n not in ("attention_forward", "attention_backward"))


def test_cpp_ops_are_the_tables():
    import_backend("fastddpm.ops.cpp")
    registered = _registered("fastddpm")
    assert set(registered) == set(schemas.names("cpp"))
    for name, schema in registered.items():
        assert schemas.matches(name, schema), f"{name}:\n  cpp   {schema}\n  table {schemas.schema(name)}"


def test_triton_ops_are_the_tables():
    kernels_library = import_backend("fastddpm.kernels._library")
    import_backend("fastddpm.kernels.ops")
    registered = _registered("fastddpm_triton")
    assert set(registered) == set(kernels_library.OPS) == set(schemas.names("triton"))
    for name, schema in registered.items():
        assert schemas.matches(name, schema), f"{name}:\n  triton {schema}\n  table  {schemas.schema(name)}"


def test_annotations_that_differ_from_the_table_are_refused():
    """The import-time check of the Triton functions' annotations (torch 2.11's
    triton_op infers the schema from them) sees a renamed or retyped argument."""
    def q_sample(x0: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                 sqrt_one_minus_alphas_cumprod: torch.Tensor, seed: int, sample_offset: int) -> torch.Tensor:
        raise NotImplementedError

    schemas.check_annotations("q_sample", q_sample)
    q_sample.__annotations__["seed"] = float
    with pytest.raises(TypeError, match="annotations give"):
        schemas.check_annotations("q_sample", q_sample)
    with pytest.raises(KeyError, match="not triton"):
        schemas.check_annotations("philox4x32", q_sample)
    with pytest.raises(KeyError, match="no schema"):
        schemas.schema("no_such_op")


def test_normalized_sees_a_difference():
    """The comparison is not vacuous: a renamed, a retyped, a non-mutating or a defaulted argument differs."""
    base = torch._C.parse_schema("f(Tensor(a!) x, int seed, Tensor? m) -> ()")
    for other in ("f(Tensor(a!) y, int seed, Tensor? m) -> ()", "f(Tensor(a!) x, float seed, Tensor? m) -> ()",
                  "f(Tensor x, int seed, Tensor? m) -> ()", "f(Tensor(a!) x, int seed, Tensor? m=None) -> ()",
                  "f(Tensor(a!) x, int seed, Tensor? m) -> Tensor"):
        assert schemas.normalized(torch._C.parse_schema(other)) != schemas.normalized(base), other
    assert schemas.normalized(torch._C.parse_schema("f(Tensor(b!) x, SymInt seed, Tensor? m) -> ()")) == \
        schemas.normalized(base)


@pytest.mark.parametrize("line, message", [
    ('m.def("q(Tensor x) -> Tensor");', "expected FASTDDPM_OP"),
    ('FASTDDPM_OP("q(Tensor x) -> Tensor")\nFASTDDPM_CPP_OP("q(Tensor y) -> Tensor")', "declared twice"),
    ('FASTDDPM_OP("q(Tensor x -> Tensor")', r"schemas.def:3: malformed schema 'q\(Tensor x -> Tensor'"),
])
def test_a_malformed_table_is_refused(line, message):
    with pytest.raises(ValueError, match=message):
        schemas.parse(f"// a comment\n\n{line}\n")


def test_the_backends_of_each_macro():
    table = schemas.parse('FASTDDPM_OP("a(Tensor x) -> Tensor")\nFASTDDPM_CPP_OP("b(Tensor x) -> Tensor")\n'
                          'FASTDDPM_TRITON_OP("c(Tensor x) -> Tensor")\n')
    assert {name: backends for name, (_, backends) in table.items()} == {
        "a": ("cpp", "triton"), "b": ("cpp",), "c": ("triton",)}
