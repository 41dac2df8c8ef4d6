"""The inpainting blend (RePaint, Lugmayr et al. 2022, Eq. 8-10) fused into ``ddpm_step``,
``ddpm_step_cast`` and ``ddpm_step_`` on every backend against the reference.

With ``known`` and ``mask`` (float32 of x's shape) and a ``[K, 8]`` table ``(a, b, c0, c1, sigma, c2,
ka, kb)`` the step is ``x_prev = mask * (ka * known + kb * z1) + (1 - mask) * step``, ``z1`` the
noise contract's normal of slot ``step + K + 1``.  Reference: ``fastddpm.ops.reference.inpaint_blend``
(used by ``reference.ddpm_step``); kernels: ``csrc/`` (``fused_math.h``'s ``inpaint_value``) and
``kernels/ddpm_step.py`` (``inpaint_blend``); schemas: ``fastddpm/ops/schemas.def``.
"""
import numpy as np
import pytest
import torch

from fastddpm import ops
from fastddpm.ops import reference
from backends import need
from op_cases import (DEVICE, DTYPES, LARGE_ODD_SHAPES, SAMPLE_OFFSET, SEED, SHAPES, TARGETS, T, coefficients, inputs,
                      namespace_op, rng_key, schedule, target_id, timesteps, variant_id)
from tolerances import EXACT, NORMAL_ULP, assert_close, fp32_at

pytestmark = pytest.mark.ops

DEVICE_OF = {"cpp": "cpu", "triton": DEVICE.type}  # where each backend's op is checked by opcheck
GUIDANCE_SCALE = 3.0
INPAINT_VARIANTS = [("epsilon", "ddpm", "fixed_small", 0.0), ("v", "ddim", "fixed_small", 0.5),
                    ("x0", "ddpm", "fixed_large", 0.0)]


def inpaint_table(variant=("epsilon", "ddpm", "fixed_small", 0.0), device="cpu") -> torch.Tensor:
    """The ``[K, 8]`` table: the step's six columns, then ``ka, kb = sqrt(abar_prev), sqrt(1 -
    abar_prev)`` (the known image forward-noised to the step's target level), float64 -> float32.
    Row 0 (the last step) has ``ka = 1, kb = 0``."""
    prediction, sampler, variance, eta = variant
    rows = reference.step_coefficients(schedule(), prediction, variance, sampler, eta)
    ac_prev = schedule().tables64()["alphas_cumprod_prev"]
    table = np.concatenate([rows, np.sqrt(ac_prev)[:, None], np.sqrt(1.0 - ac_prev)[:, None]], axis=1)
    return torch.as_tensor(table, dtype=torch.float64).to(torch.float32).to(device)


def known_and_mask(shape, device="cpu", seed=2):
    """An image to keep in [-1, 1] and a 0/1 float32 mask: a box kept in each sample plus scattered
    kept pixels, so rows, chunks and packs see both values."""
    g = torch.Generator().manual_seed(seed)
    known = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(shape, generator=g) < 0.3).float()
    mask[..., : shape[-1] // 2] = 1.0
    return known.to(device), mask.to(device)


def guided_inputs(shape, dtype, device="cpu"):
    """x, and the conditional and unconditional outputs as dim-0 views of one [2n, ...] output."""
    x, cond = inputs(shape, dtype, device)
    _, uncond = inputs(shape, dtype, device, seed=1)
    both = torch.cat([cond, uncond])
    return x, both[:shape[0]], both[shape[0]:]


def _three_forms_match_reference(backend, device, x, cond, step, table, clip, known, mask, msg, *, uncond=None,
                                 bounds=None):
    """``backend``'s functional step equals the reference's; its cast and in-place forms equal the
    functional one exactly.  Returns the functional result."""
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


# -- conformance: the three forms of every backend against the reference --------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variant", INPAINT_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_inpaint_step_matches_reference(target, variant, clip, dtype, shape):
    backend, device = target
    need(backend, "ddpm_step", device, dtype)
    table = inpaint_table(variant, device)
    x, out = inputs(shape, dtype, device)
    known, mask = known_and_mask(shape, device)
    _three_forms_match_reference(backend, device, x, out, timesteps(shape[0], device), table, clip, known, mask,
                                 f"inpaint {variant} clip={clip} {dtype}")


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("extras", ["guided", "thresholded", "guided-thresholded"])
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_inpaint_step_with_guidance_and_threshold(target, extras, dtype, shape):
    """The blend on top of classifier-free guidance and dynamic thresholding, fused in one pass."""
    backend, device = target
    need(backend, "ddpm_step", device, dtype)
    table = inpaint_table(("epsilon", "ddpm", "fixed_small", 0.0), device)
    x, cond, uncond = guided_inputs(shape, dtype, device)
    uncond = uncond if "guided" in extras else None
    step = timesteps(shape[0], device)
    bounds = None
    if "thresholded" in extras:
        bounds = ops.dynamic_threshold(x, cond, step, table[:, :6], ratio=0.9, max_value=3.0, uncond_output=uncond,
                                       guidance_scale=GUIDANCE_SCALE)
    known, mask = known_and_mask(shape, device)
    got = _three_forms_match_reference(backend, device, x, cond, step, table, False, known, mask,
                                       f"inpaint {extras} {dtype}", uncond=uncond, bounds=bounds)
    # the unknown region is the guided / thresholded step of the same op without the blend
    plain = ops.ddpm_step(x, cond, step, table[:, :6].contiguous(), seed=SEED, sample_offset=SAMPLE_OFFSET,
                          clip_denoised=False, uncond_output=uncond, guidance_scale=GUIDANCE_SCALE, threshold=bounds,
                          backend=backend)
    fill = mask == 0
    assert_close(got[fill], plain[fill], **EXACT, msg="unknown region")


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_inpaint_step_large_odd_shapes(target, shape):
    """Rows that straddle parallel tasks, chunks and packs read their own known/mask elements and z1."""
    backend, device = target
    dtype = torch.bfloat16 if backend == "cpp" else torch.float16
    need(backend, "ddpm_step", device, dtype)
    table = inpaint_table(("v", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs(shape, dtype, device)
    known, mask = known_and_mask(shape, device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=False, known=known, mask=mask)
    step = timesteps(shape[0], device)
    want = ops.ddpm_step(x, out, step, table, backend="reference", **kw)
    assert_close(ops.ddpm_step(x, out, step, table, backend=backend, **kw), want, **fp32_at(want.abs().max()))


# -- the blend's edges: mask 0 is today's step, the last step keeps known exactly ------------------
@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_inpaint_mask_zero_is_todays_step(target):
    """mask all zero: the same op's unblended step bit for bit (known ignored), in each form, guided
    or not, at a noisy and the last step."""
    backend, device = target
    if backend != "reference":
        need(backend, "ddpm_step_", device)
    table = inpaint_table(("epsilon", "ddpm", "fixed_large", 0.0), device)
    table6 = table[:, :6].contiguous()
    for dtype in DTYPES:
        if backend != "reference" and ops.unsupported(backend, "ddpm_step", torch.device(device), dtype):
            continue
        x, cond, uncond = guided_inputs((3, 5, 7, 9), dtype, device)
        known, _ = known_and_mask(x.shape, device)
        zeros = torch.zeros_like(x)
        for step in (timesteps(3, device), torch.zeros(3, dtype=torch.int64, device=device)):
            for u in (None, uncond):
                kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=True, uncond_output=u,
                          guidance_scale=GUIDANCE_SCALE, backend=backend)
                today = ops.ddpm_step(x, cond, step, table6, **kw)
                assert_close(ops.ddpm_step(x, cond, step, table, known=known, mask=zeros, **kw), today, **EXACT,
                             msg=f"mask 0 {dtype} guided={u is not None}")
                if backend == "reference":
                    continue
                x_buf, rng = x.clone(), rng_key(SEED, SAMPLE_OFFSET, device)
                ops.implementation("ddpm_step_", backend)(x_buf, cond, step, table, rng, True, None, u, GUIDANCE_SCALE,
                                                          None, known, zeros)
                assert_close(x_buf, today, **EXACT, msg="mask 0 in place")


@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_inpaint_last_step_keeps_known_exactly(target):
    """After the last step (row 0: ka = 1, kb = 0) the known pixels equal the input exactly and the
    others are today's step exactly; mask all one gives known itself, in each form."""
    backend, device = target
    if backend != "reference":
        need(backend, "ddpm_step_", device)
    table = inpaint_table(("epsilon", "ddpm", "fixed_small", 0.0), device)
    assert table[0, 6].item() == 1.0 and table[0, 7].item() == 0.0
    x, out = inputs((4, 3, 16, 16), torch.float32, device)
    known, mask = known_and_mask(x.shape, device)
    step = torch.zeros(4, dtype=torch.int64, device=device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=True, backend=backend)
    got = ops.ddpm_step(x, out, step, table, known=known, mask=mask, **kw)
    keep = mask == 1
    assert torch.equal(got[keep], known[keep])
    today = ops.ddpm_step(x, out, step, table[:, :6].contiguous(), **kw)
    assert torch.equal(got[~keep], today[~keep])
    ones = torch.ones_like(x)
    assert torch.equal(ops.ddpm_step(x, out, step, table, known=known, mask=ones, **kw), known)
    if backend == "reference":
        return
    x_cast, model_input = namespace_op(backend, "ddpm_step_cast")(x, out, step, table, SEED, 0, True, torch.float32,
                                                                  False, None, 1.0, None, known, ones)
    assert torch.equal(x_cast, known) and torch.equal(model_input, known)
    x_buf = x.clone()
    ops.implementation("ddpm_step_", backend)(x_buf, out, torch.tensor(0, device=device), table,
                                              rng_key(SEED, 0, device), True, None, None, 1.0, None, known, ones)
    assert torch.equal(x_buf, known)


# -- the noise: z1 is slot step + K + 1 of the sample's stream ------------------------------------
@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_inpaint_noise_is_slot_step_plus_K_plus_1(target):
    """With mask 1, ka = 0, kb = 1 the step returns z1 itself: the contract's normal of slot
    ``step + K + 1`` (reference.batch_noise), per sample whatever the batch (a sample of a batch of
    three equals the same global sample alone), in the functional and in-place forms."""
    backend, device = target
    if backend != "reference":
        need(backend, "ddpm_step_", device)
    K = 20
    table = inpaint_table(device=device)[:K].clone()
    table[:, 6], table[:, 7] = 0.0, 1.0
    shape = (3, 2, 5, 7)
    x, out = inputs(shape, torch.float32, device)
    known, _ = known_and_mask(shape, device)
    ones = torch.ones(shape, device=device)
    step = torch.tensor([K - 1, 0, 7], device=device)
    z1 = reference.batch_noise(SEED, SAMPLE_OFFSET, step + K + 1, shape, device)
    got = ops.ddpm_step(x, out, step, table, seed=SEED, sample_offset=SAMPLE_OFFSET, known=known, mask=ones,
                        backend=backend)
    assert_close(got, z1, **NORMAL_ULP, msg="z1")
    assert not torch.allclose(got, reference.batch_noise(SEED, SAMPLE_OFFSET, step, shape, device))
    for b in range(3):  # sample SAMPLE_OFFSET + b alone
        alone = ops.ddpm_step(x[b:b + 1], out[b:b + 1], step[b:b + 1], table, seed=SEED,
                              sample_offset=SAMPLE_OFFSET + b, known=known[b:b + 1], mask=ones[b:b + 1],
                              backend=backend)
        assert_close(alone[0], got[b], **EXACT, msg=f"sample {b} alone")
    if backend == "reference":
        return
    for k in (0, 7, K - 1):  # a shared device step counter, the key read from rng
        x_buf = x.clone()
        ops.implementation("ddpm_step_", backend)(x_buf, out, torch.tensor(k, device=device), table,
                                                  rng_key(SEED, SAMPLE_OFFSET, device), True, None, None, 1.0, None,
                                                  known, ones)
        assert_close(x_buf, reference.batch_noise(SEED, SAMPLE_OFFSET, k + K + 1, shape, device), **NORMAL_ULP,
                     msg=f"in place, step {k}")


def test_reference_inpaint_is_the_blend_written_out():
    """reference.ddpm_step with known is m * (ka known + kb z1) + (1 - m) * the unblended step,
    written out here; the dispatch takes both noises explicitly and draws z1 from slot step + K + 1."""
    table = inpaint_table(("v", "ddim", "fixed_small", 0.5))
    K = table.shape[0]
    x, cond, uncond = guided_inputs((3, 5, 7, 9), torch.float16)
    known, mask = known_and_mask(x.shape)
    step = timesteps(3)
    rows = table.index_select(0, step)
    noise = reference.batch_noise(SEED, SAMPLE_OFFSET, step, x.shape, "cpu")
    z1 = reference.batch_noise(SEED, SAMPLE_OFFSET, step + K + 1, x.shape, "cpu")
    step_part = reference.ddpm_step(x, cond, rows[:, :6], True, noise, uncond_output=uncond, guidance_scale=2.0)
    ka, kb = rows[:, 6].reshape(3, 1, 1, 1), rows[:, 7].reshape(3, 1, 1, 1)
    want = mask * (ka * known + kb * z1) + (1 - mask) * step_part
    got = reference.ddpm_step(x, cond, rows, True, noise, uncond_output=uncond, guidance_scale=2.0, known=known,
                              mask=mask, known_noise=z1)
    assert_close(got, want, **EXACT)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, uncond_output=uncond, guidance_scale=2.0, known=known, mask=mask)
    for extra in (dict(), dict(noise=noise), dict(known_noise=z1), dict(noise=noise, known_noise=z1)):
        assert_close(ops.ddpm_step(x, cond, step, table, backend="reference", **kw, **extra), want, **EXACT,
                     msg=str(sorted(extra)))
    # explicit other noises are used (the reference runs whatever backend is asked)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    moved = ops.ddpm_step(x, cond, step, table, known_noise=other, **kw)
    assert_close(moved, mask * (ka * known + kb * other) + (1 - mask) * step_part, **EXACT)


# -- bad inputs: errors naming the argument -------------------------------------------------------
def _bad_cases(x, table6, table8):
    """(id, coefs, kwargs, error, match) the dispatch rejects, naming the argument."""
    known, mask = known_and_mask(x.shape)
    return [
        ("known-without-mask", table8, dict(known=known), ValueError, "known was given without mask"),
        ("mask-without-known", table6, dict(mask=mask), ValueError, "mask was given without known"),
        ("known-noise-without-known", table6, dict(known_noise=known), ValueError,
         "known_noise was given without known"),
        ("known-shape", table8, dict(known=known[:1], mask=mask), ValueError, r"known must have shape \(3, 5, 7, 9\)"),
        ("known-broadcast", table8, dict(known=known[:, :1], mask=mask), ValueError, "known must have shape"),
        ("mask-shape", table8, dict(known=known, mask=mask[..., :1]), ValueError, r"mask must have shape"),
        ("known-dtype", table8, dict(known=known.half(), mask=mask), TypeError, r"known must have dtype in \(float32\)"),
        ("mask-dtype", table8, dict(known=known, mask=mask.bool()), TypeError, r"mask must have dtype in \(float32\)"),
        ("known-device", table8, dict(known=known.to("meta"), mask=mask), ValueError, "known must be on cpu"),
        ("mask-not-a-tensor", table8, dict(known=known, mask=1.0), TypeError, "mask must be a torch.Tensor"),
        ("known-noise-shape", table8, dict(known=known, mask=mask, known_noise=known[:1]), ValueError,
         "known_noise must have shape"),
        ("six-columns-with-known", table6, dict(known=known, mask=mask), ValueError,
         r"coefs must have shape \(K, 8\) with known"),
        ("eight-columns-without-known", table8, dict(), ValueError,
         r"coefs must have shape \(K, 6\).*8 columns are the inpainting table"),
        ("seven-columns-with-known", table8[:, :7], dict(known=known, mask=mask), ValueError,
         r"coefs must have shape \(K, 8\)"),
        ("five-columns-without-known", table6[:, :5].contiguous(), dict(), ValueError,
         r"coefs must have shape \(K, 6\)"),
    ]


_CASE_IDS = [c[0] for c in _bad_cases(torch.zeros(3, 5, 7, 9), torch.zeros(1, 6), torch.zeros(1, 8))]


@pytest.mark.parametrize("case", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_ddpm_step_rejects_bad_inpaint_inputs(case):
    table8 = inpaint_table()
    table6 = table8[:, :6].contiguous()
    x, out = inputs((3, 5, 7, 9), torch.float32)
    _, coefs, kw, error, match = _bad_cases(x, table6, table8)[case]
    for backend in ("reference", "cpp", "triton"):
        if backend != "reference" and ops.load_error(backend) is not None:
            continue
        with pytest.raises(error, match=match):
            ops.ddpm_step(x, out, timesteps(3), coefs, seed=SEED, backend=backend, **kw)


def test_ddpm_step_rejects_inpaint_noise_overflow():
    """The blend draws 2K + 1 slots: a table and image size that fit K + 1 slots but not 2K + 1 raise."""
    K, numel = 3, 2**30  # 4 slots fit 2**32 counters exactly, 7 do not
    x = torch.zeros(1, 1).expand(1, numel)  # metadata only: nothing of this size is allocated
    with pytest.raises(ValueError, match="noise counter overflow: 7 noise slots"):
        ops.ddpm_step(x, x, torch.tensor(0), torch.zeros(K, 8), seed=SEED, known=x, mask=x)


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_ops_reject_bad_inpaint_inputs(target):
    """The backend ops themselves (as the engine calls them): errors naming the argument, x unchanged."""
    backend, device = target
    need(backend, "ddpm_step_", device)
    table8 = inpaint_table(device=device)
    table6 = table8[:, :6].contiguous()
    x, out = inputs((2, 3, 4, 4), torch.float32, device)
    known, mask = known_and_mask(x.shape, device)
    step = timesteps(2, device)
    cases = [(table8, known, None, "known was given without mask"),
             (table6, None, mask, "mask was given without known"),
             (table8, known[:1], mask, "known must"), (table8, known, mask.double(), "mask must"),
             (table8, known, mask[..., :2], "mask must"),
             (table6, known, mask, r"coefs must have shape .K, 8"), (table8, None, None, r"coefs must have shape .K, 6")]
    for coefs, k, m, match in cases:
        error = RuntimeError if backend == "cpp" else ValueError
        x_buf = x.clone()
        with pytest.raises(error, match=match):
            ops.implementation("ddpm_step_", backend)(x_buf, out, step, coefs, rng_key(SEED, 0, device), True, None,
                                                      None, 1.0, None, k, m)
        assert torch.equal(x_buf, x)
        with pytest.raises(error, match=match):
            ops.implementation("ddpm_step", backend)(x, out, step, coefs, SEED, 0, True, None, 1.0, None, k, m)
        with pytest.raises(error, match=match):
            namespace_op(backend, "ddpm_step_cast")(x, out, step, coefs, SEED, 0, True, torch.float16, False, None,
                                                    1.0, None, k, m)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_inpaint_step_opcheck(backend):
    """torch.library.opcheck of the three step ops' blended signatures, unguided and guided."""
    device = DEVICE_OF[backend]
    need(backend, "ddpm_step_", device)
    table = inpaint_table(device=device)
    x, cond, uncond = guided_inputs((2, 3, 4, 4), torch.float16, device)
    known, mask = known_and_mask(x.shape, device)
    t = torch.tensor([0, T - 1], device=device)
    for u in (None, uncond):
        torch.library.opcheck(namespace_op(backend, "ddpm_step"),
                              (x, cond, t, table, SEED, 3, True, u, 7.5, None, known, mask))
        torch.library.opcheck(namespace_op(backend, "ddpm_step_cast"),
                              (x, cond, t, table, SEED, 3, False, torch.bfloat16, True, u, 0.5, None, known, mask))
        torch.library.opcheck(namespace_op(backend, "ddpm_step_"),
                              (x.clone(), cond, torch.tensor(7, device=device), table, rng_key(SEED, 3, device), True,
                               torch.empty(2, 3, 4, 4, dtype=torch.float16, device=device), u, -1.0,
                               torch.tensor([1.0, 2.5], device=device), known, mask))
