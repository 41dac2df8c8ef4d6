"""The Triton flash attention against ``F.scaled_dot_product_attention``.

Every test runs the kernels themselves: CPU (interpreter) in fp32 and fp16,
GPU in fp16 and bf16 (fp32 on a GPU is not the kernels' to run: the dispatch
routes it to the reference and says so, tested below).  Forward and gradients,
sequence lengths that are and are not multiples of the blocks, head dims
16-256.  GPU also: bf16/fp16 with
the error bounded by a multiple of PyTorch's own error at that precision
against an fp32 reference (flash-attention's test style), big head dims and
sequence lengths up to 4096 (64x64 feature maps).
"""
import pytest
import torch
import torch.nn.functional as F

from fastddpm import ops
from tolerances import ATTENTION, assert_close

from backends import import_backend  # noqa: E402

kernels = import_backend("fastddpm.kernels.ops")
from fastddpm.kernels import attention_tiles  # noqa: E402
from fastddpm.kernels.attention import attention, l_bucket  # noqa: E402

pytestmark = pytest.mark.ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# what the kernels run here: the interpreter takes fp32 (IEEE dot) and fp16; a GPU fp16 and bf16
DTYPES = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]
DTYPE = DTYPES[0]


def qkv(B, H, L, d, dtype, device=DEVICE, layout="contiguous"):
    """Inputs as the U-Net makes them: contiguous ``[B, H, L, d]``, or views of
    one ``[B, 3*H*d, L]`` projection (strided, not contiguous)."""
    if layout == "contiguous":
        return [torch.randn(B, H, L, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    proj = torch.randn(B, 3 * H * d, L, device=device, dtype=dtype)
    q, k, v = proj.reshape(B, 3, H, d, L).permute(1, 0, 2, 4, 3).unbind(0)
    return [x.detach().requires_grad_() for x in (q, k, v)]


def forward_backward(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return [out, *grads]


def fp32_reference(q, k, v, grad_out):
    inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    return forward_backward(F.scaled_dot_product_attention, *inputs, grad_out.float())


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [16, 20, 64])
@pytest.mark.parametrize("d", [32, 64])
def test_attention_matches_sdpa(dtype, L, d):
    q, k, v = qkv(2, 2, L, d, dtype)
    grad_out = torch.randn(2, 2, L, d, device=DEVICE, dtype=dtype)
    got = forward_backward(attention, q, k, v, grad_out)
    want = fp32_reference(q, k, v, grad_out)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g.float(), w, **ATTENTION[dtype], msg=f"{name} L={L} d={d} {dtype}")


@pytest.mark.parametrize("d", [16, 40])
def test_attention_head_dims_padded(d):
    """Head dims that are not a power of two (padded, masked) and the smallest tile."""
    q, k, v = qkv(1, 3, 20, d, DTYPE)
    grad_out = torch.randn(1, 3, 20, d, device=DEVICE, dtype=DTYPE)
    for name, g, w in zip(NAMES, forward_backward(attention, q, k, v, grad_out), fp32_reference(q, k, v, grad_out)):
        assert_close(g.float(), w, **ATTENTION[DTYPE], msg=f"{name} d={d}")


def test_attention_strided_inputs():
    """q, k, v as strided views of one QKV projection, as in the U-Net's attention block."""
    q, k, v = qkv(2, 2, 20, 32, DTYPE, layout="projection")
    assert not q.is_contiguous()
    grad_out = torch.randn(2, 2, 20, 32, device=DEVICE, dtype=DTYPE).transpose(-1, -2).contiguous().transpose(-1, -2)
    for name, g, w in zip(NAMES, forward_backward(attention, q, k, v, grad_out), fp32_reference(q, k, v, grad_out)):
        assert_close(g.float(), w, **ATTENTION[DTYPE], msg=name)


def test_attention_through_dispatch(monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    q, k, v = qkv(1, 1, 16, 32, DTYPE)
    if HAS_CUDA:
        assert ops.select_backend("attention", DEVICE, DTYPE, head_dim=32) == "triton"
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v)
    assert_close(out.float(), fp32_reference(q, k, v, torch.ones_like(q))[0], **ATTENTION[DTYPE])


def test_float32_and_large_heads_go_to_the_reference_on_a_gpu():
    """No silent fallback inside the kernel: the dispatch sees why and runs (and reports) the reference."""
    cuda = torch.device("cuda")
    assert "scaled_dot_product_attention" in kernels.unsupported("attention", cuda, torch.float32)
    assert "head dims up to 256" in kernels.unsupported("attention", DEVICE, DTYPE, head_dim=320)
    assert kernels.unsupported("attention", DEVICE, DTYPE, head_dim=256) is None
    assert "triton" not in ops.available_backends("attention", DEVICE, DTYPE, head_dim=320)
    q = torch.randn(1, 1, 8, 320, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        attention(q, q, q)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="head dims up to 256"):
        ops.attention(q, q, q)
    assert ops.select_backend("attention", DEVICE, DTYPE, head_dim=320) == "reference"


@pytest.mark.gpu
def test_attention_fp32_gpu_runs_the_reference(monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    assert ops.select_backend("attention", DEVICE, torch.float32, head_dim=64) == "reference"
    q, k, v = qkv(2, 2, 300, 64, torch.float32)
    with pytest.raises(ValueError, match="float32"):
        attention(q, k, v)
    assert_close(ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), **ATTENTION[torch.float32])


def test_autotune_key_buckets_the_sequence_length():
    """A new L re-tunes only in a new power-of-two bucket (64 .. 4096)."""
    assert [l_bucket(L) for L in (1, 20, 64, 65, 100, 256, 257, 1024, 4096, 4097, 10**6)] == \
        [64, 64, 64, 128, 128, 256, 512, 1024, 4096, 4096, 4096]


# (kernel, BLOCK_M, BLOCK_N, head dim, warps, stages) that ptxas reported spilling registers when
# scripts/compile_sm90.py compiled them for sm_90 (triton 3.6, fp16 and bf16)
# (d = 256 dK/dV runs as two passes since; these are the one-pass figures)
SPILLED_ON_SM90 = [("fwd", 128, 64, 128, 4, 3), ("fwd", 64, 64, 256, 4, 3), ("dkdv", 64, 128, 128, 8, 2),
                   ("dq", 64, 16, 256, 4, 2), ("dq", 64, 32, 256, 4, 3)]
SPILLED_ONE_PASS_D256 = [(32, 64, 8, 1), (32, 64, 8, 2), (64, 64, 8, 2)]
BLOCKS = {"fwd": attention_tiles.FWD_BLOCKS, "dkdv": attention_tiles.DKDV_BLOCKS, "dq": attention_tiles.DQ_BLOCKS}


def kept(kind, block_m, block_n, head_dim, warps, stages, esize=2):
    outputs = sum(attention_tiles.dkdv_passes(head_dim)[0]) if kind == "dkdv" else 2
    return attention_tiles.config_fits(kind, block_m, block_n, head_dim, warps, stages, esize, outputs)


def test_autotune_pruner_drops_the_configs_that_spilled_on_sm90():
    for kind, bm, bn, d, warps, stages in SPILLED_ON_SM90:
        assert not kept(kind, bm, bn, d, warps, stages), (kind, bm, bn, d, warps, stages)
    assert attention_tiles.dkdv_passes(256) == ((True, False), (False, True))
    for bm, bn, warps, stages in SPILLED_ONE_PASS_D256:  # with both accumulators they would be dropped
        _, regs = attention_tiles.tile_cost("dkdv", bm, bn, 256, stages, 2, outputs=2)
        assert regs > attention_tiles.REGISTER_BUDGET * 32 * warps


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_autotune_keeps_configs_for_every_head_dim(kind):
    """Something to tune at every head dim, and the fallback (the last config) fits d = 256."""
    for d in (16, 32, 64, 128, 256):
        assert any(kept(kind, *block[:2], d, *block[2:]) for block in BLOCKS[kind]), (kind, d)
    assert kept(kind, *BLOCKS[kind][-1][:2], 256, *BLOCKS[kind][-1][2:])


def test_attention_opcheck():
    q, k, v = qkv(1, 2, 20, 32, DTYPE)
    torch.library.opcheck(torch.ops.fastddpm_triton.attention_forward, (q, k, v))


def test_attention_torch_compile_fullgraph():
    def block(q, k, v):
        return attention(q, k, v) * 2.0

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    q, k, v = qkv(1, 2, 20, 32, DTYPE)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = fp32_reference(q, k, v, torch.full((1, 2, 20, 32), 2.0, device=DEVICE))
    for name, g, w in zip(NAMES, [out, *grads], [want[0] * 2.0, *want[1:]]):
        assert_close(g.float(), w, **ATTENTION[DTYPE], msg=name)


def test_attention_head_dim_256_backward_in_two_passes():
    """d = 256 (the Ho U-Net's 16x16 attention) runs dK and dV as separate passes; both equal the reference."""
    q, k, v = qkv(1, 1, 20, 256, DTYPE)
    grad_out = torch.randn(1, 1, 20, 256, device=DEVICE, dtype=DTYPE)
    for name, g, w in zip(NAMES, forward_backward(attention, q, k, v, grad_out), fp32_reference(q, k, v, grad_out)):
        assert_close(g.float(), w, **ATTENTION[DTYPE], msg=f"{name} d=256")


@pytest.mark.heavy
@pytest.mark.parametrize("d", [128, 256])
def test_attention_large_head_dims(d):
    """The Ho et al. CIFAR-10 model's 16x16 attention has one head of d=256."""
    L = 256 if HAS_CUDA else 48
    q, k, v = qkv(2, 1, L, d, torch.float16)
    grad_out = torch.randn(2, 1, L, d, device=DEVICE, dtype=torch.float16)
    got = forward_backward(attention, q, k, v, grad_out)
    want = fp32_reference(q, k, v, grad_out)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g.float(), w, **ATTENTION[torch.float16], msg=f"{name} d={d}")


# -- GPU only -----------------------------------------------------------------------
GPU_SHAPES = [(4, 1, 256, 256), (2, 4, 1024, 64), (1, 4, 4096, 64), (3, 2, 100, 128), (2, 1, 16, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_low_precision_bounded_by_pytorch_error(dtype, shape):
    """|triton - fp32 ref| <= 2 |sdpa(dtype) - fp32 ref| + eps, per output and gradient."""
    q, k, v = qkv(*shape, dtype)
    grad_out = torch.randn(shape, device=DEVICE, dtype=dtype)
    got = forward_backward(attention, q, k, v, grad_out)
    torch_lowp = forward_backward(F.scaled_dot_product_attention, q, k, v, grad_out)
    want = fp32_reference(q, k, v, grad_out)
    for name, g, p, w in zip(NAMES, got, torch_lowp, want):
        ours = (g.float() - w).abs().max().item()
        theirs = (p.float() - w).abs().max().item()
        eps = 1e-3 * w.abs().max().item()
        assert ours <= 2 * theirs + eps, f"{name} {shape} {dtype}: error {ours:.3e} vs PyTorch's {theirs:.3e}"


@pytest.mark.gpu
def test_attention_is_the_automatic_choice_on_gpu(monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    for dtype in (torch.bfloat16, torch.float16):
        assert ops.select_backend("attention", torch.device("cuda"), dtype, head_dim=256) == "triton"
