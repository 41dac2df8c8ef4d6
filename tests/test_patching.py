"""fastddpm.patching: diffusers attention through fastddpm.ops.attention, same outputs."""
import pytest
import torch

import fastddpm
from backends import need
from fastddpm import ops
from fastddpm.models import create_model
from fastddpm.patching import FastAttnProcessor, patch_attention, unpatch_attention
from tolerances import ATTENTION, FP32, assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

pytestmark = pytest.mark.ops


def tiny_unet() -> torch.nn.Module:
    """Attention at 4x4 (L = 16) with 16 channels in 4 heads of 4."""
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=4).eval()
    with torch.no_grad():  # GroupNorm starts as (1, 0): random affine parameters make the check see them
        for m in unet.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return unet


def processors(model):
    return [type(m.processor) for m in model.modules() if isinstance(m, Attention)]


@pytest.fixture
def count_attention(monkeypatch):
    calls = []
    original = ops.attention

    def counting(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "attention", counting)
    return calls


@torch.no_grad()
def test_patched_unet_equals_diffusers(count_attention):
    unet = tiny_unet()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 17, 999])
    expected = unet(x, t).sample
    assert set(processors(unet)) == {AttnProcessor2_0}
    assert patch_attention(unet) is unet
    assert processors(unet) == [FastAttnProcessor] * 4  # down 1, middle 1, up 2
    out = unet(x, t).sample
    assert_close(out, expected, **FP32)
    assert len(count_attention) == 4 and set(count_attention) == {(3, 4, 16, 4)}  # [B, heads, L, d]
    assert unpatch_attention(unet) is unet
    assert set(processors(unet)) == {AttnProcessor2_0}
    count_attention.clear()
    assert torch.equal(unet(x, t).sample, expected)
    assert not count_attention


@torch.no_grad()
def test_patched_unet_on_the_flash_kernel():
    """The fused kernel (interpreted on CPU) in place of diffusers' SDPA."""
    need("triton", "attention", "cpu")
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    expected = unet(x, t).sample
    patch_attention(unet)
    with ops.use_backend("triton"):
        out = unet(x, t).sample
    assert_close(out, expected, **ATTENTION[torch.float32])


def _attention_layer(**kwargs) -> Attention:
    layer = Attention(16, heads=4, dim_head=4, norm_num_groups=4, residual_connection=True, bias=True,
                      upcast_softmax=True, _from_deprecated_attn_block=True, **kwargs).eval()
    with torch.no_grad():
        layer.group_norm.weight.normal_(1.0, 0.2)
        layer.group_norm.bias.normal_(0.0, 0.2)
    return layer


@pytest.mark.parametrize("rescale", [1.0, 2.0])
@torch.no_grad()
def test_attention_layer_4d_and_3d_inputs(rescale, count_attention):
    layer = _attention_layer(rescale_output_factor=rescale)
    for x in (torch.randn(2, 16, 3, 5), torch.randn(2, 15, 16)):  # [B, C, H, W] and [B, L, C]
        expected = layer(x)
        layer.set_processor(FastAttnProcessor())
        assert_close(layer(x), expected, **FP32)
        layer.set_processor(AttnProcessor2_0())
    assert count_attention == [(2, 4, 15, 4)] * 2


@torch.no_grad()
def test_scale_qk_false_falls_back_to_sdpa_with_the_layer_scale(count_attention):
    """diffusers gives ``scale_qk=False`` layers the classic ``AttnProcessor`` (scale 1);
    the patched layer must agree with it, which ops.attention (scale d**-0.5) cannot."""
    layer = _attention_layer(scale_qk=False)
    assert type(layer.processor) is AttnProcessor and layer.scale == 1.0
    x = torch.randn(2, 16, 4, 4)
    expected = layer(x)
    layer.set_processor(FastAttnProcessor())
    assert_close(layer(x), expected, **FP32)
    assert not count_attention
    holder = torch.nn.Sequential(layer)  # a module holding diffusers layers is patched too
    patch_attention(holder)
    unpatch_attention(holder)
    assert type(layer.processor) is AttnProcessor  # diffusers' own choice for scale_qk=False


@torch.no_grad()
def test_mask_and_cross_attention_fall_back_to_sdpa(count_attention):
    layer = Attention(8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    mask = torch.tensor([[0.0, 0.0, -1e4], [0.0, -1e4, 0.0]])
    for kwargs in (dict(encoder_hidden_states=context), dict(encoder_hidden_states=context, attention_mask=mask)):
        layer.set_processor(AttnProcessor2_0())
        expected = layer(x, **kwargs)
        layer.set_processor(FastAttnProcessor())
        assert_close(layer(x, **kwargs), expected, **FP32)
    assert not count_attention
    self_layer = Attention(8, heads=2, dim_head=4).eval()
    mask = torch.zeros(2, 5)
    mask[0, 4] = -1e4
    expected = self_layer(x, attention_mask=mask)
    self_layer.set_processor(FastAttnProcessor())
    assert_close(self_layer(x, attention_mask=mask), expected, **FP32)
    assert not count_attention
    self_layer(x)
    assert count_attention == [(2, 2, 5, 4)]


def test_custom_processors_are_kept_with_a_warning():
    class Custom(AttnProcessor2_0):
        pass

    unet = tiny_unet()
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    layers[0].set_processor(Custom())
    with pytest.warns(RuntimeWarning, match=r"1 attention layer\(s\) keep their own processor: .*\(Custom\)"):
        patch_attention(unet)
    assert processors(unet) == [Custom] + [FastAttnProcessor] * 3
    unpatch_attention(unet)
    assert processors(unet) == [Custom] + [AttnProcessor2_0] * 3


def test_fastddpm_unet_is_returned_unchanged():
    model = create_model("tiny").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch_attention(model) is model and unpatch_attention(model) is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("model", [lambda x, t: x, torch.nn.Linear(2, 2), 42], ids=["callable", "module", "int"])
def test_other_models_are_rejected(model):
    with pytest.raises(TypeError, match="has no diffusers attention layers"):
        patch_attention(model)
    with pytest.raises(TypeError, match="has no diffusers attention layers"):
        unpatch_attention(model)


def test_diffusers_model_without_attention_is_left_alone():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, add_attention=False)
    assert patch_attention(unet) is unet


def test_sample_with_a_patched_unet(count_attention):
    unet = tiny_unet()
    expected = fastddpm.sample(unet, 2, steps=3, progress=False)
    count_attention.clear()
    patch_attention(unet)
    x = fastddpm.sample(unet, 2, steps=3, progress=False)
    assert x.shape == (2, 1, 8, 8)
    assert len(count_attention) == 3 * 4  # every step, every layer
    assert_close(x, expected, **FP32)
