"""The mode names are declared once (``fastddpm.modes``) and every other spelling agrees:
the configs' fields, the reference, the Triton codes, and the C++ op's parser and enum."""
import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch

from backends import import_backend
from fastddpm import engine, modes, multistep, train_config
from fastddpm.config import DiffusionConfig
from fastddpm.ops import reference

ROOT = Path(__file__).resolve().parents[1]


def test_tuples_come_from_the_literals():
    assert modes.PREDICTIONS == ("epsilon", "x0", "v")
    assert modes.LOSSES == ("l2", "l1", "huber")
    assert modes.TRAIN_COMPILE_MODES == ("no",) + modes.TORCH_COMPILE_MODES
    assert (reference.PREDICTIONS, reference.VARIANCES, reference.LOSSES, reference.SAMPLERS) == (
        modes.PREDICTIONS, modes.VARIANCES, modes.LOSSES, modes.SAMPLERS)
    assert multistep.SOLVERS == modes.SOLVERS


def test_config_fields_are_the_literals():
    hints = get_type_hints(DiffusionConfig)
    assert get_args(hints["prediction"]) == modes.PREDICTIONS
    assert get_args(hints["variance"]) == modes.VARIANCES
    assert get_args(hints["loss"]) == modes.LOSSES
    assert get_args(hints["sampler"]) == modes.SAMPLERS + modes.SOLVERS + modes.TABLE_SAMPLERS + modes.KSAMPLERS
    assert modes.ALL_SAMPLERS == get_args(hints["sampler"])
    assert get_args(hints["final_sigmas_type"]) == ("zero", "sigma_min")
    assert get_args(get_type_hints(train_config.TrainConfig)["compile"]) == modes.TRAIN_COMPILE_MODES


def test_compile_modes_differ_on_purpose():
    """The engine turns compiling off with compile=False, a training config with "no"."""
    assert engine.COMPILE_MODES == modes.TORCH_COMPILE_MODES
    assert train_config.COMPILE_MODES == modes.TRAIN_COMPILE_MODES


def _enum(header: str, name: str) -> dict[str, int]:
    """``enum name : int { kA = 0, ... }`` as {"A": 0, ...}."""
    body = re.search(rf"enum {name} : int \{{([^}}]*)\}}", header).group(1)
    return {constant: int(code) for constant, code in re.findall(r"k(\w+) = (\d+)", body)}


@pytest.mark.parametrize("kind, parser, enum, names", [
    ("prediction", "parse_prediction", "Prediction", modes.PREDICTIONS),
    ("loss_type", "parse_loss_type", "LossType", modes.LOSSES),
])
def test_csrc_spellings_and_codes_agree(kind, parser, enum, names):
    """csrc/ops.cpp maps each name to the enum constant at the name's position in fastddpm.modes."""
    ops_cpp = (ROOT / "csrc" / "ops.cpp").read_text()
    header = (ROOT / "csrc" / "fused_math.h").read_text()
    body = re.search(rf"int {parser}\(const std::string& s\) \{{(.*?)\n\}}", ops_cpp, re.S).group(1)
    pairs = re.findall(r'if \(s == "([^"]+)"\) return k(\w+);', body)
    constants = _enum(header, enum)
    assert [name for name, _ in pairs] == list(names)
    assert [constants[constant] for _, constant in pairs] == list(range(len(names)))
    assert ", ".join(names) in body  # the error message lists them too


def test_triton_codes_agree():
    diffusion_loss = import_backend("fastddpm.kernels.diffusion_loss")
    assert list(diffusion_loss.PREDICTION_CODE) == list(modes.PREDICTIONS)
    assert list(diffusion_loss.LOSS_CODE) == list(modes.LOSSES)
    assert list(diffusion_loss.PREDICTION_CODE.values()) == list(range(len(modes.PREDICTIONS)))


def test_the_cpp_op_accepts_each_name_and_refuses_others():
    import_backend("fastddpm._C")
    from fastddpm.ops import cpp
    x = torch.zeros(2, 3)
    t = torch.tensor([0, 1])
    tables = torch.ones(4), torch.ones(4), torch.ones(4)
    for prediction in modes.PREDICTIONS:
        for loss_type in modes.LOSSES:
            cpp.diffusion_loss(x, x, t, *tables, 0, 0, prediction, loss_type, 1.0)
    with pytest.raises(RuntimeError, match="prediction must be one of epsilon, x0, v"):
        cpp.diffusion_loss(x, x, t, *tables, 0, 0, "sample", "l2", 1.0)
    with pytest.raises(RuntimeError, match="loss_type must be one of l2, l1, huber"):
        cpp.diffusion_loss(x, x, t, *tables, 0, 0, "epsilon", "l3", 1.0)
