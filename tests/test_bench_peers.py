"""The benchmarks' baselines are defined once, in ``benchmarks/peers.py``, and are what they say."""
import ast
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import peers  # noqa: E402

from fastddpm.models.presets import PRESETS, create_model  # noqa: E402

# what a benchmark would define again if it kept its own copy of a baseline
BASELINE_NAMES = {"diffusers_loop", "_diffusers_loop", "AsDDPMPytorchModel", "_AsDDPMPytorchModel",
                  "diffusers_unet_kwargs", "ddp_unet_kwargs", "ddpm_pytorch_sampler", "GOOGLE_DDPM_CIFAR10_32",
                  "DIFFUSERS_CONFIGS", "param_count"}


def _definitions(path: Path):
    """(name, line) of the functions, classes and assigned names of a module, and the lines of its dict
    literals or dict(...) calls that spell a UNet2DModel's blocks."""
    tree = ast.parse(path.read_text())
    names, configs = [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append((node.name, node.lineno))
        elif isinstance(node, ast.Assign):
            names += [(t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            if any(k.arg == "block_out_channels" for k in node.keywords):
                configs.append(node.lineno)
    return names, configs


@pytest.mark.parametrize("path", sorted(p.name for p in BENCH.glob("*.py") if p.name != "peers.py"))
def test_no_benchmark_defines_a_baseline_again(path):
    names, configs = _definitions(BENCH / path)
    again = [(n, line) for n, line in names if n in BASELINE_NAMES]
    assert again == [] and configs == [], f"{path} defines {again} and UNet2DModel configs at {configs}: " \
                                          f"import them from benchmarks/peers.py"


def test_the_check_sees_a_baseline_defined_again(tmp_path):
    copy = tmp_path / "bench_x.py"
    copy.write_text("def _diffusers_loop(unet):\n    pass\n\nC = dict(sample_size=8, block_out_channels=(8,))\n")
    names, configs = _definitions(copy)
    assert ("_diffusers_loop", 1) in names and configs == [4]


def test_diffusers_architecture_is_google_ddpm_cifar10_32():
    kwargs = peers.diffusers_unet_kwargs(PRESETS["ddpm_cifar10"])
    assert kwargs.pop("dropout") == PRESETS["ddpm_cifar10"].dropout
    assert kwargs == peers.GOOGLE_DDPM_CIFAR10_32


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_diffusers_model_has_the_presets_parameters(preset):
    from diffusers import UNet2DModel

    model = UNet2DModel(**peers.diffusers_preset_kwargs(preset))
    assert peers.param_count(model) == peers.param_count(create_model(preset))


def test_the_samplers_run_on_one_model(one_thread):
    """diffusers' loop and denoising-diffusion-pytorch's sampler around the same tiny model."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**peers.diffusers_preset_kwargs("tiny")).eval()
    c = unet.config
    x = peers.diffusers_loop(unet, DDPMScheduler(num_train_timesteps=peers.NUM_TIMESTEPS), 2, 2, "cpu")
    assert x.shape == (2, c.in_channels, c.sample_size, c.sample_size) and bool(torch.isfinite(x).all())
    y = peers.ddpm_pytorch_sampler(unet, "cpu")(2, 2)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
