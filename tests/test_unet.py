"""The DDPM U-Net: shapes, configuration, validation, the attention dispatch,
gradients, and low precision."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastddpm.ops
from fastddpm.models import PRESETS, UNet, UNetConfig, create_model
from fastddpm.models.unet import AttentionBlock, timestep_embedding
from tolerances import ATTENTION, BY_DTYPE, EXACT, FP32, assert_close

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peers  # noqa: E402  the attention block as it was before issue 15

TINY = PRESETS["tiny"]


def tiny(**overrides) -> UNet:
    return create_model("tiny", **overrides).eval()


def _randomise_norms(model: torch.nn.Module) -> None:
    """GroupNorm starts as (1, 0); random affine parameters make the checks see them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


# -- shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, size", [
    (dict(TINY.to_dict()), 8),                                       # gray
    (dict(TINY.to_dict(), in_channels=3), 8),                        # RGB
    (dict(TINY.to_dict(), in_channels=3, out_channels=6), 8),        # learned-variance style output
    (dict(image_size=24, in_channels=3, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
          attention_resolutions=(12,), num_heads=2, num_groups=8, dropout=0.0), 24),  # 24 -> 12 -> 6
    (dict(TINY.to_dict(), resample_with_conv=False), 8),
    (dict(TINY.to_dict()), 12),                                      # other sizes than image_size run too
])
@pytest.mark.parametrize("t_kind", ["vector", "scalar", "float"])
def test_output_shape(fields, size, t_kind):
    model = UNet(**fields).eval()
    n = 3
    x = torch.randn(n, model.in_channels, size, size)
    t = {"vector": torch.tensor([0, 10, 999]), "scalar": torch.tensor(5),
         "float": torch.tensor([0.0, 1.5, 999.0])}[t_kind]
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (n, model.out_channels, size, size)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_scalar_t_equals_broadcast_vector():
    model = tiny()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert_close(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])), **EXACT)


def test_presets_run():
    for name in ("tiny", "small"):
        model = create_model(name).eval()
        size = model.image_size
        with torch.no_grad():
            out = model(torch.randn(2, model.in_channels, size, size), torch.tensor([1, 2]))
        assert out.shape == (2, model.out_channels, size, size)


def test_ddpm_cifar10_parameter_count():
    # Ho et al. report 35.7M; pesser's PyTorch port of their model has 35,746,307.
    model = create_model("ddpm_cifar10")
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e5) == 357
    assert params == 35_746_307


# -- configuration --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    config = PRESETS[name]
    text = json.dumps(config.to_dict())
    back = UNetConfig.from_dict(json.loads(text))
    assert back == config
    assert isinstance(back.channel_mult, tuple) and isinstance(back.attention_resolutions, tuple)
    assert create_model(json.loads(text)).config == config


def test_constructors_agree():
    a, b = UNet(TINY), UNet(**TINY.to_dict())
    assert a.config == b.config == TINY
    assert (a.image_size, a.in_channels, a.out_channels) == (8, 1, 1)
    assert create_model(TINY).config == TINY
    assert create_model("tiny", dropout=0.2, out_channels=2).config == UNetConfig(
        **dict(TINY.to_dict(), dropout=0.2, out_channels=2))
    with pytest.raises(TypeError, match="config"):
        UNet(TINY, image_size=8)


@pytest.mark.parametrize("bad, match", [
    (dict(image_size=9), "image_size"),                      # two levels: must be even
    (dict(image_size=30), "attention_resolutions"),          # sizes 30, 15: no 4x4 level for attention
    (dict(image_size=10, channel_mult=(1, 2, 2)), "image_size"),
    (dict(image_size=0), "image_size"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=-1), "out_channels"),
    (dict(base_channels=0), "base_channels"),
    (dict(base_channels=10), "num_groups"),                  # 10 channels, 4 groups
    (dict(num_groups=3), "num_groups"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(attention_resolutions=(3,)), "attention_resolutions"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=3), "num_heads"),                        # 32 channels at 4x4
    (dict(head_channels=12), "head_channels"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(resample_with_conv="yes"), "resample_with_conv"),
])
def test_config_validation_names_the_field(bad, match):
    fields = dict(TINY.to_dict(), **bad)
    with pytest.raises(ValueError, match=match):
        UNetConfig(**fields)


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict(dict(TINY.to_dict(), bogus=1))
    d = TINY.to_dict()
    del d["image_size"]
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig.from_dict(d)
    with pytest.raises(ValueError, match="bogus"):
        create_model("tiny", bogus=1)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="ddpm_cifar10.*small.*tiny"):
        create_model("cifar")


# -- input validation -----------------------------------------------------------------
@pytest.mark.parametrize("x_shape, match", [
    ((2, 3, 8, 8), r"x must have shape \[n, 1, H, W\]"),   # wrong channels
    ((2, 1, 9, 8), r"x must have shape .* divisible by 2"),
    ((2, 1, 8, 7), r"x must have shape .* divisible by 2"),
    ((1, 8, 8), r"x must have shape"),
])
def test_forward_rejects_bad_x(x_shape, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(x_shape), torch.zeros(x_shape[0], dtype=torch.int64))


def test_forward_rejects_bad_t():
    model = tiny()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        model(x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="t must"):
        model(x, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="t must"):
        model(x, 5)
    with pytest.raises(TypeError, match="x must"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


# -- attention ------------------------------------------------------------------------
def test_attention_goes_through_dispatch(monkeypatch):
    model = tiny()
    calls = []
    original = fastddpm.ops.attention

    def counting(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fastddpm.ops, "attention", counting)
    n_blocks = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert n_blocks == 4  # down: 1 block at 4x4; middle: 1; up: 2 blocks at 4x4
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    assert len(calls) == n_blocks
    # [B, heads, L, d]: 32 channels at 4x4 in 2 heads
    assert set(calls) == {(2, 2, 16, 16)}
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    assert len(calls) == n_blocks


def test_set_attention_backend_reaches_every_block_and_holds_under_compile(monkeypatch):
    """The model's own backend choice wins over an ``ops.use_backend`` around the call, in eager
    mode and when torch.compile traces the model (where a use_backend inside it would not hold)."""
    model = tiny().eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        expected = model(x, t)
    seen = []
    original = fastddpm.ops.attention

    def recording(q, k, v, *, backend=None):
        seen.append(backend)
        return original(q, k, v, backend=backend)

    monkeypatch.setattr(fastddpm.ops, "attention", recording)
    assert model.set_attention_backend("reference") is model
    with torch.no_grad(), fastddpm.ops.use_backend("cpp"):  # cpp has no attention: it would raise
        assert torch.equal(model(x, t), expected)
        assert seen == ["reference"] * 4
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x, t), expected)
    model.set_attention_backend(None)
    assert {m.attention_backend for m in model.modules() if isinstance(m, AttentionBlock)} == {None}
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_attention_backend("cuda")


def _reference_attention_block(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Ho et al.'s attention block written out with einsum, per head."""
    b, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    hn = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    wq, wk, wv = block.qkv.weight[:, :, 0, 0].chunk(3)
    bq, bk, bv = block.qkv.bias.chunk(3)
    flat = hn.reshape(b, c, h * w)
    q = (torch.einsum("oc,bcl->bol", wq, flat) + bq[:, None]).reshape(b, heads, d, h * w)
    k = (torch.einsum("oc,bcl->bol", wk, flat) + bk[:, None]).reshape(b, heads, d, h * w)
    v = (torch.einsum("oc,bcl->bol", wv, flat) + bv[:, None]).reshape(b, heads, d, h * w)
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(d), dim=-1)
    o = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(b, c, h * w)
    out = torch.einsum("oc,bcl->bol", block.proj_out.weight[:, :, 0, 0], o) + block.proj_out.bias[:, None]
    return x + out.reshape(b, c, h, w)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_matches_reference(heads, channels_last):
    block = AttentionBlock(32, heads, groups=8)
    _randomise_norms(block)
    x = torch.randn(2, 32, 5, 6)  # L = 30, not square
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
        expected = _reference_attention_block(block, x.contiguous())
    assert_close(out, expected, **FP32)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_loads_separate_qkv_state_dict():
    """Checkpoints with separate q, k, v 1x1 convs (Ho et al. / pesser's port) load and give the same model."""
    model = tiny()
    _randomise_norms(model)
    state = {}
    for key, value in model.state_dict().items():
        if ".qkv." in key:
            for part, chunk in zip("qkv", value.chunk(3)):
                state[key.replace(".qkv.", f".{part}.")] = chunk.clone()
        else:
            state[key] = value.clone()
    other = tiny()
    other.load_state_dict(state, strict=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 500])
    with torch.no_grad():
        assert_close(other(x, t), model(x, t), **EXACT)


# -- wiring ---------------------------------------------------------------------------
def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 250])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float64) / 3)
    args = t.double()[:, None] * freqs
    assert_close(emb, torch.cat([args.sin(), args.cos()], dim=1), **FP32)
    assert timestep_embedding(t, 7).shape == (3, 7)
    assert bool((timestep_embedding(t, 7)[:, -1] == 0).all())


def test_different_t_give_different_outputs():
    model = tiny()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        outs = [model(x, torch.tensor([t])) for t in (0, 1, 500, 999)]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)


@pytest.mark.parametrize("overrides", [{}, dict(resample_with_conv=False, in_channels=3, out_channels=6)])
def test_gradients_reach_every_parameter(overrides):
    model = tiny(**overrides).train()
    _randomise_norms(model)
    x = torch.randn(2, model.in_channels, 8, 8)
    model(x, torch.tensor([3, 700])).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().gt(0).any())]
    assert not missing, f"parameters without gradient: {missing}"


def test_dropout_is_used_in_training_only():
    model = tiny(dropout=0.5)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    model.eval()
    with torch.no_grad():
        assert_close(model(x, t), model(x, t), **EXACT)
        model.train()
        assert (model(x, t) - model(x, t)).abs().max() > 0


# -- memory format and low precision ---------------------------------------------------
def test_channels_last_matches_contiguous():
    model = tiny(in_channels=3)
    _randomise_norms(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 900])
    with torch.no_grad():
        expected = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    # convolution algorithms differ between layouts: float32 reassociation only
    assert_close(out, expected, atol=1e-4, rtol=1e-4)


def _bf16_tolerance(expected: torch.Tensor) -> dict:
    # BY_DTYPE[bf16] bounds one op's rounding (8-bit mantissa, ~4e-3 relative).
    # The network chains ~20 bf16 convolutions/matmuls (each summing up to 9*C
    # rounded products) through residuals, so errors compound: the measured
    # worst error is ~1% of the output's scale, and we allow 4x the one-op
    # bound, relative to that scale.
    tol = BY_DTYPE[torch.bfloat16]
    scale = float(expected.abs().max())
    return dict(atol=4 * tol["atol"] * scale, rtol=4 * tol["rtol"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_close_to_fp32(channels_last):
    model = tiny(in_channels=3)
    _randomise_norms(model)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, **_bf16_tolerance(expected))


def test_bf16_model_accepts_fp32_input():
    model = tiny().to(torch.bfloat16)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_inputs_are_contiguous(monkeypatch, heads, channels_last):
    """SDPA gets contiguous q, k, v (a strided one sends a CPU to the slow math kernel), and the
    block's output equals the old strided computation's within the attention tolerance."""
    block = AttentionBlock(32, heads, groups=8)
    _randomise_norms(block)
    x = torch.randn(3, 32, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append([(tuple(t.shape), t.stride(), t.is_contiguous()) for t in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    with torch.no_grad():
        expected = peers.strided_attention_forward(block, x)
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        with fastddpm.ops.use_backend("reference"):
            out = block(x)
    assert len(seen) == 1
    assert all(contiguous for _, _, contiguous in seen[0]), f"strided inputs to SDPA: {seen[0]}"
    if hasattr(torch, "_fused_sdp_choice"):  # the CPU kernel it picks: flash, not math
        q, k, v = block.qkv_heads(x)
        assert torch._fused_sdp_choice(q, k, v) == int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    assert_close(out, expected, **ATTENTION[torch.float32])
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
