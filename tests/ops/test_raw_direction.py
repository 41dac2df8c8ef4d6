"""``ddpm_step``'s sixth column ``c2``: ``x_prev = c0 x0_hat + c1 x + c2 out + sigma z`` on every backend
against the reference, in the three forms (functional, cast, in place), with and without guidance,
dynamic thresholding and inpainting.

``c2`` weights the raw (guided) model output: DDIM's ``direction="raw"`` rows
(``reference.step_coefficients``; diffusers' ``DDIMScheduler`` with ``clip_sample=True``, whose step
direction is the unclipped output's epsilon) have it non-zero; every other table has ``c2 = 0``, where
the term is not added at all (so an inf output that the clip bounds stays bounded).  Reference:
``fastddpm.ops.reference.ddpm_step``; kernels: ``csrc/fused_math.h`` (``ddpm_step_value``),
``kernels/ddpm_step.py``.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastddpm import ops
from fastddpm.ops import reference
from backends import need
from op_cases import (DTYPES, LARGE_ODD_SHAPES, SAMPLE_OFFSET, SEED, T, TARGETS, inputs, namespace_op, rng_key,
                      schedule, target_id, timesteps)
from tolerances import EXACT, fp32_at, assert_close

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
GUIDANCE_SCALE = 3.0
SHAPES = [(3, 5, 7, 9), (4, 3, 16, 16), (5, 123)]  # odd, round, 2-D
EXTRAS = ["clip", "noclip", "guided", "thresholded", "guided-thresholded"]


def raw_table(prediction, eta=0.5, device="cpu", inpaint=False) -> torch.Tensor:
    """DDIM's raw-direction rows over the op-test schedule (c2 != 0 but at row 0 for epsilon), float32;
    with ``inpaint`` the blend's ``ka, kb`` appended (``[K, 8]``)."""
    rows = reference.step_coefficients(schedule(), prediction, "fixed_small", "ddim", eta, direction="raw")
    if inpaint:
        ac_prev = schedule().tables64()["alphas_cumprod_prev"]
        rows = np.concatenate([rows, np.sqrt(ac_prev)[:, None], np.sqrt(1.0 - ac_prev)[:, None]], axis=1)
    return torch.as_tensor(rows, dtype=torch.float64).to(torch.float32).to(device)


def guided_inputs(shape, dtype, device="cpu"):
    """x, and the conditional and unconditional outputs as dim-0 views of one [2n, ...] output."""
    x, cond = inputs(shape, dtype, device)
    _, uncond = inputs(shape, dtype, device, seed=1)
    both = torch.cat([cond, uncond])
    return x, both[:shape[0]], both[shape[0]:]


def known_and_mask(shape, device="cpu"):
    g = torch.Generator().manual_seed(2)
    known = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(shape, generator=g) < 0.4).float()
    return known.to(device), mask.to(device)


def _case(extras, x, cond, uncond, step, table):
    """(uncond, clip, bounds) of the extras."""
    uncond = uncond if "guided" in extras else None
    bounds = None
    if "thresholded" in extras:
        bounds = ops.dynamic_threshold(x, cond, step, table[:, :reference.COEF_WIDTH], ratio=0.9, max_value=3.0,
                                       uncond_output=uncond, guidance_scale=GUIDANCE_SCALE)
    return uncond, extras != "noclip", bounds


def _three_forms(backend, device, x, cond, step, table, clip, uncond, bounds, known, mask, msg):
    """The functional op equals the reference; the cast and in-place forms equal it exactly."""
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=clip, uncond_output=uncond,
              guidance_scale=GUIDANCE_SCALE, threshold=bounds, known=known, mask=mask)
    got = ops.ddpm_step(x, cond, step, table, backend=backend, **kw)
    want = ops.ddpm_step(x, cond, step, table, backend="reference", **kw)
    assert got.dtype == torch.float32
    assert_close(got, want, **fp32_at(want.abs().max()), msg=msg)
    x_cast, model_input = namespace_op(backend, "ddpm_step_cast")(x, cond, step, table, SEED, SAMPLE_OFFSET, clip,
                                                                  torch.float16, False, uncond, GUIDANCE_SCALE,
                                                                  bounds, known, mask)
    assert_close(x_cast, got, **EXACT, msg=f"{msg} cast")
    assert_close(model_input, got.half(), **EXACT, msg=f"{msg} cast model input")
    x_buf = x.clone()
    ops.implementation("ddpm_step_", backend)(x_buf, cond, step, table, rng_key(SEED, SAMPLE_OFFSET, device), clip,
                                              None, uncond, GUIDANCE_SCALE, bounds, known, mask)
    assert_close(x_buf, got, **EXACT, msg=f"{msg} in place")
    return got


# -- conformance -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_raw_direction_step_matches_reference(target, prediction, extras, dtype, shape):
    backend, device = target
    need(backend, "ddpm_step_", device, dtype)
    table = raw_table(prediction, device=device)
    assert bool((table[1:, 5] != 0).all())
    x, cond, uncond = guided_inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    uncond, clip, bounds = _case(extras, x, cond, uncond, step, table)
    _three_forms(backend, device, x, cond, step, table, clip, uncond, bounds, None, None,
                 f"raw {prediction} {extras} {dtype}")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_raw_direction_inpaint_step_matches_reference(target, prediction, extras, dtype, shape):
    """The [K, 8] table (c2, then ka, kb): the blend on top of the raw direction's step."""
    backend, device = target
    need(backend, "ddpm_step_", device, dtype)
    table = raw_table(prediction, device=device, inpaint=True)
    x, cond, uncond = guided_inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    uncond, clip, bounds = _case(extras, x, cond, uncond, step, table)
    known, mask = known_and_mask(shape, device)
    got = _three_forms(backend, device, x, cond, step, table, clip, uncond, bounds, known, mask,
                       f"raw inpaint {prediction} {extras} {dtype}")
    plain = ops.ddpm_step(x, cond, step, table[:, :6].contiguous(), seed=SEED, sample_offset=SAMPLE_OFFSET,
                          clip_denoised=clip, uncond_output=uncond, guidance_scale=GUIDANCE_SCALE, threshold=bounds,
                          backend=backend)
    fill = mask == 0
    assert_close(got[fill], plain[fill], **EXACT, msg="unknown region: the unblended step")


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_raw_direction_large_odd_shapes(target, shape):
    """Rows across tasks, chunks and packs read their own row's c2."""
    backend, device = target
    dtype = torch.bfloat16 if backend == "cpp" else torch.float16
    need(backend, "ddpm_step", device, dtype)
    table = raw_table("x0", eta=1.0, device=device)
    x, out = inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=True)
    want = ops.ddpm_step(x, out, step, table, backend="reference", **kw)
    assert_close(ops.ddpm_step(x, out, step, table, backend=backend, **kw), want, **fp32_at(want.abs().max()))


@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_c2_is_the_raw_output_term(target):
    """A row with only c2 (and sigma 0) returns c2 * out: the guided output itself, unclipped."""
    backend, device = target
    if backend != "reference":
        need(backend, "ddpm_step_", device)
    table = torch.zeros(4, 6, device=device)
    table[:, 1], table[:, 5] = 1.0, torch.tensor([0.5, -2.0, 3.0, 1.0])  # x0_hat = out (clipped, unused)
    x, cond, uncond = guided_inputs((4, 3, 5, 7), torch.float32, device)
    step = torch.arange(4, device=device)
    got = ops.ddpm_step(x, cond, step, table, seed=SEED, clip_denoised=True, uncond_output=uncond,
                        guidance_scale=GUIDANCE_SCALE, backend=backend)
    guided = reference.guided_output(cond, uncond, GUIDANCE_SCALE)
    assert_close(got, table[:, 5].reshape(4, 1, 1, 1) * guided, **EXACT)


@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_c2_zero_adds_no_term_even_for_inf_outputs(target):
    """c2 = 0 (every DDPM row, DDIM's clipped rows): the step is c0 clip(x0_hat) + c1 x + sigma z bit
    for bit, and an inf output that the clip bounds gives a finite x_prev (no 0 * inf), in each form."""
    backend, device = target
    if backend != "reference":
        need(backend, "ddpm_step_", device)
    rows = reference.step_coefficients(schedule(), "epsilon", "fixed_large", "ddpm")
    assert np.all(rows[:, 5] == 0.0)
    table = torch.as_tensor(rows).to(torch.float32).to(device)
    x, out = inputs((3, 5, 7, 9), torch.float32, device)
    out = out.clone()
    out[:, :, 0] = float("inf")
    out[:, :, 1] = -float("inf")
    step = timesteps(3, device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=True, backend=backend)
    got = ops.ddpm_step(x, out, step, table, **kw)
    assert bool(torch.isfinite(got).all())
    r = table.index_select(0, step).reshape(3, 6, 1, 1, 1).unbind(1)
    noise = reference.batch_noise(SEED, SAMPLE_OFFSET, step, x.shape, device)
    x0 = (r[0] * x + r[1] * out).clamp(-1.0, 1.0)
    want = r[2] * x0 + r[3] * x + r[4] * noise
    # the reference bit for bit; a kernel's normals are the contract's to a few ulp
    assert_close(got, want, **(EXACT if backend == "reference" else fp32_at(want.abs().max())))
    if backend == "reference":
        return
    x_buf = x.clone()
    ops.implementation("ddpm_step_", backend)(x_buf, out, step, table, rng_key(SEED, SAMPLE_OFFSET, device), True,
                                              None, None, 1.0, None, None, None)
    assert_close(x_buf, got, **EXACT)


# -- the coefficients --------------------------------------------------------------------------------
def test_widths_are_one_constant_per_side():
    """reference.COEF_COLUMNS / INPAINT_COEF_COLUMNS are what csrc/fused_math.h and the Triton kernel read."""
    header = (ROOT / "csrc" / "fused_math.h").read_text()
    constants = {name: int(value) for name, value in re.findall(r"constexpr int (k\w+) = (\d+);", header)}
    assert reference.COEF_COLUMNS == ("a", "b", "c0", "c1", "sigma", "c2")
    assert reference.INPAINT_COEF_COLUMNS == reference.COEF_COLUMNS + ("ka", "kb")
    assert constants["kCoefColumns"] == reference.COEF_WIDTH == 6
    assert constants["kInpaintColumns"] == reference.INPAINT_COEF_WIDTH == 8
    assert constants["kMultistepColumns"] == reference.MULTISTEP_WIDTH
    assert constants["kHistorySlots"] == reference.MULTISTEP_HISTORY_SLOTS
    assert "row[0], row[1], row[2], row[3], row[4], row[5]" in header  # load_step_coefs: c2 is column 5
    assert "InpaintCoefs{row[6], row[7]}" in header
    source = (ROOT / "kernels" / "ddpm_step.py").read_text()
    assert "STEP_COLUMNS: tl.constexpr = tl.constexpr(COEF_WIDTH)" in source
    assert "INPAINT_COLUMNS: tl.constexpr = tl.constexpr(INPAINT_COEF_WIDTH)" in source


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", reference.PREDICTIONS)
def test_raw_rows(prediction, eta):
    """raw: c0 = sqrt(abar_prev), sigma as the clipped rows', and without a clip the same step:
    c0 x0 + c1 x + c2 out == the clipped row's for x0 = a x + b out (float64)."""
    s = schedule()
    clipped = reference.step_coefficients(s, prediction, sampler="ddim", eta=eta)
    raw = reference.step_coefficients(s, prediction, sampler="ddim", eta=eta, direction="raw")
    assert raw.shape == clipped.shape == (T, 6) and np.all(clipped[:, 5] == 0.0)
    np.testing.assert_array_equal(raw[:, [0, 1, 4]], clipped[:, [0, 1, 4]])
    np.testing.assert_allclose(raw[:, 2], np.sqrt(s.tables64()["alphas_cumprod_prev"]), rtol=1e-15)
    a, b = clipped[:, 0], clipped[:, 1]
    # the x and out weights of both rows: c0 (a x + b out) + c1 x + c2 out
    for col, (xs, os) in enumerate([(clipped[:, 2] * a + clipped[:, 3], clipped[:, 2] * b),
                                    (raw[:, 2] * a + raw[:, 3], raw[:, 2] * b + raw[:, 5])]):
        if col == 0:
            want_x, want_o = xs, os
        else:
            np.testing.assert_allclose(xs, want_x, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(os, want_o, rtol=1e-9, atol=1e-9)


def test_direction_is_checked():
    for sampler in ("ddpm",):
        with pytest.raises(ValueError, match="direction='raw' is DDIM's"):
            reference.step_coefficients(schedule(), sampler=sampler, direction="raw")
    with pytest.raises(ValueError, match=r"direction must be one of \('clipped', 'raw'\)"):
        reference.step_coefficients(schedule(), sampler="ddim", direction="unclipped")
    for prediction in reference.PREDICTIONS:
        for variance in reference.VARIANCES:
            assert np.all(reference.step_coefficients(schedule(), prediction, variance)[:, 5] == 0.0)


def test_the_process_reads_ddim_direction():
    """DDPM.step_coefficients passes direction="raw" where its config's ddim_direction says so (a DDIM
    process), and today's rows otherwise."""
    from fastddpm.diffusion import DDPM

    process = DDPM(num_timesteps=T, sampler="ddim", eta=0.5).respace(10)
    today = process.step_coefficients()
    assert np.all(today[:, 5] == 0.0)

    class Config:
        def __init__(self, config):
            self._config = config

        def __getattr__(self, name):
            return "raw" if name == "ddim_direction" else getattr(self._config, name)

    process.config = Config(process.config)
    raw = process.step_coefficients()
    want = reference.step_coefficients(process.schedule, "epsilon", "fixed_small", "ddim", 0.5, direction="raw")
    np.testing.assert_array_equal(raw, want)
