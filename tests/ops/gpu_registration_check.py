"""Run as a script with Triton compiling (no ``TRITON_INTERPRET``), on any machine: every
Triton op is registered as a GPU would register it (``torch.library.triton_op``, the path a
CPU test run never takes), with the one table's schema, and its body traced on fake tensors
on CUDA (the fake implementation ``triton_op`` derives, what ``torch.compile`` traces on a GPU)
gives the outputs of the explicit fake the interpreter path registers: shapes, dtypes,
strides.  Prints one ``ok <op>`` line per op; raises on the first difference."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastddpm.kernels.ops  # noqa: F401 -- registers the ops
from fastddpm.kernels import _library
from fastddpm.ops import schemas

assert not _library.INTERPRET, "run without TRITON_INTERPRET"
T = 1000


def examples(name):
    """Arguments for op ``name``: odd shapes, the dtypes the kernels take."""
    x = torch.randn(3, 2, 5, 7)
    t = torch.randint(0, T, (3,))
    table = torch.rand(T, dtype=torch.float64)
    coefs = torch.rand(T, 6)
    rng = torch.tensor([1, 0])
    q = torch.randn(2, 3, 9, 16, dtype=torch.float16)
    return {
        "q_sample": (x, t, table, table, 1, 0),
        "diffusion_loss": (x, x, t, table, table, table, 1, 0, "epsilon", "l2", 1.0),
        "diffusion_loss_backward": (torch.ones(()), x, x, t, table, table, table, 1, 0, "v", "huber", 0.5),
        "ddpm_step": (x, x.half(), t, coefs, 1, 0, True, x.half(), 7.5, None, None, None),
        "ddpm_step_cast": (x, x, t, torch.rand(T, 8), 1, 0, False, torch.bfloat16, True, None, 1.0, None, x, x),
        "ddpm_step_": (x.clone(), x, t, coefs, rng, True, x.to(torch.bfloat16), x, 3.0, torch.ones(3), None, None),
        "multistep_step_": (x.clone(), x, torch.zeros(4, *x.shape), torch.tensor([2]), torch.rand(12, 14), rng, True,
                            True, x.half().contiguous(memory_format=torch.channels_last), x, 2.0, torch.ones(3)),
        "attention_forward": (q, q, q),
        "attention_backward": (q, q, q, q, q, torch.randn(2, 3, 9)),
    }[name]


def described(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(o.shape), o.dtype, tuple(o.stride()), o.device.type) for o in outs if o is not None]


names = set(schemas.names("triton"))
assert set(_library.OPS) == names, sorted(names ^ set(_library.OPS))
for name in sorted(names):
    packet = getattr(torch.ops.fastddpm_triton, name)
    assert schemas.matches(name, packet.default._schema), (name, packet.default._schema)
    with FakeTensorMode():  # fake CUDA tensors: the body runs as on a GPU, and no GPU is needed
        args = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
                     if isinstance(a, torch.Tensor) else a for a in examples(name))
        traced = described(packet(*args))
        expected = described(_library.FAKES[name](*args))
    assert traced == expected, f"{name}: the traced body gives {traced}, the fake {expected}"
    print("ok", name)
