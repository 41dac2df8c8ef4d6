"""``ddpm_step`` (one reverse step) and its cast and in-place forms on every backend against the
reference.

Reference: ``fastddpm.ops.reference.ddpm_step`` (coefficients: ``reference.step_coefficients``);
kernels: ``csrc/`` and ``kernels/ddpm_step.py``; schemas: ``fastddpm/ops/schemas.def``
(``ddpm_step``, ``ddpm_step_cast``, ``ddpm_step_``); benchmark: ``benchmarks/bench_ops.py``.
The in-place ``ddpm_step_`` (what the sampler engine replays, from ``ops.implementation``)
reads its noise key from a device tensor: it must equal the functional op bit for bit.
"""
import pytest
import torch

from fastddpm import ops
from fastddpm.ops import reference
from backends import need
from op_cases import (DTYPES, LARGE_ODD_SHAPES, RNG_KEYS, SAMPLE_OFFSET, SEED, SHAPES, T, TARGETS, coefficients,
                      inputs, namespace_op, rng_key, target_id, timesteps, variant_id)
from op_cases import DEVICE, STEP_VARIANTS
from tolerances import EXACT, FP32, fp32_at, assert_close

pytestmark = pytest.mark.ops


DEVICE_OF = {"cpp": "cpu", "triton": DEVICE.type}  # where each backend's op is checked by opcheck


def functional(backend):
    return ops.implementation("ddpm_step", backend)


@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_matches_reference(target, variant, clip, dtype, shape):
    backend, device = target
    need(backend, "ddpm_step", device, dtype)
    coefs = coefficients(variant, device)
    x, out = inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=clip)
    got = ops.ddpm_step(x, out, step, coefs, backend=backend, **kw)
    want = ops.ddpm_step(x, out, step, coefs, backend="reference", **kw)
    assert got.dtype == torch.float32
    # on a GPU (FMA contraction) x_t's terms reach ~1/sqrt(abar) ~ 160 * out at t=T-1 for epsilon:
    # the error is relative to that magnitude there
    tol = fp32_at(want.abs().max()) if device == "cuda" else FP32
    assert_close(got, want, **tol, msg=f"ddpm_step {variant} clip={clip} {dtype}")


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_large_odd_shapes(target, shape):
    """Rows that straddle parallel tasks and chunks."""
    backend, device = target
    dtype = torch.bfloat16 if backend == "cpp" else torch.float16
    need(backend, "ddpm_step", device, dtype)
    coefs = coefficients(("v", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs(shape, dtype, device)
    step = timesteps(shape[0], device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=False)
    got = ops.ddpm_step(x, out, step, coefs, backend=backend, **kw)
    assert_close(got, ops.ddpm_step(x, out, step, coefs, backend="reference", **kw), **FP32, msg="ddpm_step")


@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("step_shape", [(), (1,), "expanded"], ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_single_step_index(target, step_shape, shape):
    """A step index shared by the batch (a 0-dim/[1] device counter, or an expanded 0-dim) is
    read in the kernel: the same result as a per-sample [n] step."""
    backend, device = target
    need(backend, "ddpm_step", device)
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs(shape, torch.float32, device)
    k = torch.tensor(T // 3, device=device)
    step = k.expand(shape[0]) if step_shape == "expanded" else k.reshape(step_shape)
    got = functional(backend)(x, out, step, coefs, SEED, SAMPLE_OFFSET, True, None, 1.0, None, None, None)
    want = functional(backend)(x, out, k.repeat(shape[0]), coefs, SEED, SAMPLE_OFFSET, True, None, 1.0, None, None,
                               None)
    assert_close(got, want, **EXACT)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("model_dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_cast_and_inplace(target, shape, model_dtype, channels_last):
    """The low-precision copy for the next model call is x_prev rounded, in the asked layout;
    the in-place form writes the same into given buffers."""
    backend, device = target
    need(backend, "ddpm_step", device, model_dtype)
    coefs = coefficients(("v", "ddim", "fixed_small", 0.5), device)
    x, out = inputs(shape, torch.float16, device)
    step = timesteps(shape[0], device)
    x_prev = functional(backend)(x, out, step, coefs, SEED, SAMPLE_OFFSET, True, None, 1.0, None, None, None)
    x_cast, model_input = namespace_op(backend, "ddpm_step_cast")(x, out, step, coefs, SEED, SAMPLE_OFFSET, True,
                                                                  model_dtype, channels_last, None, 1.0, None, None,
                                                                  None)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert model_input.dtype == model_dtype and model_input.is_contiguous(memory_format=layout)
    assert_close(x_cast, x_prev, **EXACT)
    assert_close(model_input, x_prev.to(model_dtype), **EXACT, msg="model input")
    x_buf = x.clone()
    buf = torch.empty(shape, dtype=model_dtype, device=device).to(memory_format=layout)
    ops.implementation("ddpm_step_", backend)(x_buf, out, step, coefs, rng_key(SEED, SAMPLE_OFFSET, device), True, buf,
                                              None, 1.0, None, None, None)
    assert_close(x_buf, x_prev, **EXACT)
    assert_close(buf, model_input, **EXACT)


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=target_id)
@pytest.mark.parametrize("key", RNG_KEYS, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_inplace_rng_equals_functional(target, key, shape, dtype, clip):
    """``ddpm_step_`` reads (seed, sample_offset) from the tensor rng: bit for bit the functional
    op given them as ints, for a per-sample and a shared step index, with no model input, one
    of the output's dtype and a float16 channels_last one."""
    backend, device = target
    need(backend, "ddpm_step_", device, dtype)
    seed, sample_offset = key
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)  # sigma > 0 at every step
    x, out = inputs(shape, dtype, device)
    inplace = ops.implementation("ddpm_step_", backend)
    for step in (timesteps(shape[0], device), torch.tensor(T // 2, device=device)):
        want = functional(backend)(x, out, step.expand(shape[0]), coefs, seed, sample_offset, clip, None, 1.0, None,
                                   None, None)
        for model_input in (None, torch.empty(shape, dtype=dtype, device=device),
                            torch.empty(shape, dtype=torch.float16, device=device).to(memory_format=torch.channels_last)):
            x_buf = x.clone()
            inplace(x_buf, out, step, coefs, rng_key(seed, sample_offset, device), clip, model_input, None, 1.0, None,
                    None, None)
            assert_close(x_buf, want, **EXACT, msg=f"x, step {tuple(step.shape)}")
            if model_input is not None:
                assert_close(model_input, x_buf.to(model_input.dtype), **EXACT, msg="model input")
    # the key is what rng holds: another seed or sample offset draws other noise
    for other in ((seed ^ 1, sample_offset), (seed, sample_offset + 1)):
        x_buf = x.clone()
        inplace(x_buf, out, step, coefs, rng_key(*other, device), clip, None, None, 1.0, None, None, None)
        assert not torch.equal(x_buf, want), other


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_last_step_adds_no_noise(target):
    backend, device = target
    need(backend, "ddpm_step", device)
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)
    x, out = inputs((2, 1, 8, 8), torch.float32, device)
    step = torch.zeros(2, dtype=torch.int64, device=device)
    got = functional(backend)(x, out, step, coefs, SEED, 0, True, None, 1.0, None, None, None)
    want = reference.ddpm_step(x, out, coefs[step], True, torch.zeros_like(x))
    assert_close(got, want, **FP32)


@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=variant_id)
def test_ddpm_step_backends_agree(variant):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    need("cpp", "ddpm_step", device)
    need("triton", "ddpm_step", device)
    coefs = coefficients(variant, device)
    x, out = inputs((3, 5, 7, 9), torch.float32, device)
    step = timesteps(3, device)
    for clip in (True, False):
        got, cpp = (ops.ddpm_step(x, out, step, coefs, seed=SEED, sample_offset=1, clip_denoised=clip, backend=b)
                    for b in ("triton", "cpp"))
        assert_close(got, cpp, **fp32_at(cpp.abs().max()))


# -- classifier-free guidance: out = u + w (c - u), fused into the step ------------------------------
GUIDANCE_SCALE = 7.5  # diffusers' default
GUIDED_VARIANTS = [("epsilon", "ddpm", "fixed_small", 0.0), ("v", "ddim", "fixed_small", 0.5),
                   ("x0", "ddpm", "fixed_large", 0.0)]


def guided_inputs(shape, dtype, device="cpu", channels_last=False):
    """x, and the conditional and unconditional outputs as the two halves (dim-0 views) of one
    ``[2n, ...]`` model output, as a guided model call returns them (channels_last if asked)."""
    x, cond = inputs(shape, dtype, device)
    _, uncond = inputs(shape, dtype, device, seed=1)
    both = torch.cat([cond, uncond])
    if channels_last:
        both = both.to(memory_format=torch.channels_last)
    return x, both[:shape[0]], both[shape[0]:]


@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variant", GUIDED_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_guided_matches_reference(target, variant, clip, dtype, shape):
    """The guided step of each backend, in its three forms (functional, cast, in place), equals the
    reference's; the outputs are dim-0 views of one [2n, ...] batch."""
    backend, device = target
    need(backend, "ddpm_step", device, dtype)
    coefs = coefficients(variant, device)
    x, cond, uncond = guided_inputs(shape, dtype, device)
    _three_forms_match_reference(backend, device, x, cond, uncond, timesteps(shape[0], device), coefs, clip, None,
                                 f"guided ddpm_step {variant} clip={clip} {dtype}")


def _three_forms_match_reference(backend, device, x, cond, uncond, step, coefs, clip, bounds, msg):
    """``backend``'s functional step equals the reference's, and its cast and in-place forms equal
    the functional one exactly (guided by ``uncond``, thresholded by ``bounds`` where given)."""
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=clip, uncond_output=uncond,
              guidance_scale=GUIDANCE_SCALE, threshold=bounds)
    got = ops.ddpm_step(x, cond, step, coefs, backend=backend, **kw)
    want = ops.ddpm_step(x, cond, step, coefs, backend="reference", **kw)
    assert_close(got, want, **fp32_at(want.abs().max()), msg=msg)
    x_cast, model_input = namespace_op(backend, "ddpm_step_cast")(x, cond, step, coefs, SEED, SAMPLE_OFFSET, clip,
                                                                  torch.float16, False, uncond, GUIDANCE_SCALE, bounds,
                                                                  None, None)
    assert_close(x_cast, got, **EXACT, msg="cast")
    assert_close(model_input, got.half(), **EXACT, msg="cast model input")
    x_buf = x.clone()
    ops.implementation("ddpm_step_", backend)(x_buf, cond, step, coefs, rng_key(SEED, SAMPLE_OFFSET, device), clip,
                                              None, uncond, GUIDANCE_SCALE, bounds, None, None)
    assert_close(x_buf, got, **EXACT, msg="in place")


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16], ids=target_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 16, 16)], ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_guided_channels_last_views(target, shape, model_dtype):
    """Guided with channels_last halves of a [2n, ...] model output (the layout a channels_last
    model returns), and a channels_last model input: the contiguous halves' result."""
    backend, device = target
    need(backend, "ddpm_step_", device, model_dtype)
    coefs = coefficients(("epsilon", "ddpm", "fixed_large", 0.0), device)
    x, cond, uncond = guided_inputs(shape, torch.float16, device)
    _, cond_cl, uncond_cl = guided_inputs(shape, torch.float16, device, channels_last=True)
    assert uncond_cl.is_contiguous(memory_format=torch.channels_last) and not uncond_cl.is_contiguous()
    step = timesteps(shape[0], device)
    want = functional(backend)(x, cond, step, coefs, SEED, SAMPLE_OFFSET, True, uncond, 3.0, None, None, None)
    got = functional(backend)(x, cond_cl, step, coefs, SEED, SAMPLE_OFFSET, True, uncond_cl, 3.0, None, None, None)
    assert_close(got, want, **EXACT)
    x_buf = x.clone()
    buf = torch.empty(shape, dtype=model_dtype, device=device).to(memory_format=torch.channels_last)
    ops.implementation("ddpm_step_", backend)(x_buf, cond_cl, step, coefs, rng_key(SEED, SAMPLE_OFFSET, device), True,
                                              buf, uncond_cl, 3.0, None, None, None)
    assert_close(x_buf, want, **EXACT)
    assert_close(buf, want.to(model_dtype), **EXACT, msg="model input")


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, -2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
def test_reference_guided_step_is_the_combine_then_the_step(dtype, w):
    """The reference's guided step is u + w (c - u), written out here in float32, followed by the
    unguided reference step (and predict_x0 the same)."""
    coefs = coefficients(("epsilon", "ddpm", "fixed_small", 0.0))
    x, cond, uncond = guided_inputs((3, 5, 7, 9), dtype)
    step = timesteps(3)
    rows = coefs.index_select(0, step)
    noise = reference.batch_noise(SEED, SAMPLE_OFFSET, step, x.shape, "cpu")
    combined = uncond.float() + w * (cond.float() - uncond.float())
    for clip in (True, False):
        got = reference.ddpm_step(x, cond, rows, clip, noise, uncond_output=uncond, guidance_scale=w)
        assert_close(got, reference.ddpm_step(x, combined, rows, clip, noise), **EXACT, msg=f"w={w} clip={clip}")
        assert_close(reference.predict_x0(x, cond, rows, clip, uncond_output=uncond, guidance_scale=w),
                     reference.predict_x0(x, combined, rows, clip), **EXACT, msg="predict_x0")
    dispatched = ops.ddpm_step(x, cond, step, coefs, seed=SEED, sample_offset=SAMPLE_OFFSET, uncond_output=uncond,
                               guidance_scale=w, backend="reference")
    assert_close(dispatched, reference.ddpm_step(x, combined, rows, True, noise), **EXACT, msg="dispatch")


@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_ddpm_step_guidance_scale_one_is_the_conditional_step(target):
    """w = 1 is the conditional model alone (to float32 rounding of u + (c - u)); uncond_output None
    is today's step whatever guidance_scale says."""
    backend, device = target
    need(backend, "ddpm_step", device) if backend != "reference" else None
    coefs = coefficients(("v", "ddpm", "fixed_small", 0.0), device)
    for dtype in DTYPES:
        if backend != "reference" and ops.unsupported(backend, "ddpm_step", torch.device(device), dtype):
            continue
        x, cond, uncond = guided_inputs((3, 5, 7, 9), dtype, device)
        step = timesteps(3, device)
        kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, backend=backend)
        plain = ops.ddpm_step(x, cond, step, coefs, **kw)
        one = ops.ddpm_step(x, cond, step, coefs, uncond_output=uncond, guidance_scale=1.0, **kw)
        assert_close(one, plain, **fp32_at(plain.abs().max()), msg=f"w=1 {dtype}")
        assert_close(ops.ddpm_step(x, cond, step, coefs, uncond_output=None, guidance_scale=5.0, **kw), plain,
                     **EXACT, msg="uncond_output None")
        assert not torch.equal(ops.ddpm_step(x, cond, step, coefs, uncond_output=uncond, guidance_scale=2.0, **kw),
                               plain)


def _bad_guidance(cond):
    """(id, uncond_output, guidance_scale, error, match) the dispatch rejects, naming the argument."""
    return [
        ("uncond-shape", cond[:1], 2.0, ValueError, r"uncond_output must have shape \(3, 5, 7, 9\)"),
        ("uncond-dtype", cond.half(), 2.0, TypeError, r"uncond_output must have dtype in \(float32\)"),
        ("uncond-device", cond.to("meta"), 2.0, ValueError, "uncond_output must be on cpu"),
        ("uncond-not-a-tensor", 1.0, 2.0, TypeError, "uncond_output must be a torch.Tensor"),
        ("scale-nan", cond, float("nan"), ValueError, "guidance_scale must be finite"),
        ("scale-inf", cond, float("inf"), ValueError, "guidance_scale must be finite"),
        ("scale-nan-unguided", None, float("nan"), ValueError, "guidance_scale must be finite"),
        ("scale-bool", cond, True, TypeError, "guidance_scale must be a real number"),
        ("scale-tensor", cond, torch.tensor(2.0), TypeError, "guidance_scale must be a real number"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_guidance(torch.zeros(3, 5, 7, 9)))),
                         ids=[c[0] for c in _bad_guidance(torch.zeros(3, 5, 7, 9))])
def test_ddpm_step_rejects_bad_guidance(case):
    coefs = coefficients()
    x, cond = inputs((3, 5, 7, 9), torch.float32)
    _, uncond, w, error, match = _bad_guidance(cond)[case]
    for backend in ("reference", "cpp", "triton"):
        if backend != "reference" and ops.load_error(backend) is not None:
            continue
        with pytest.raises(error, match=match):
            ops.ddpm_step(x, cond, timesteps(3), coefs, seed=SEED, uncond_output=uncond, guidance_scale=w,
                          backend=backend)


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_ops_reject_bad_guidance(target):
    """The backend ops themselves (as the engine calls them): errors naming the argument, x unchanged."""
    backend, device = target
    need(backend, "ddpm_step_", device)
    coefs = coefficients(device=device)
    x, cond, uncond = guided_inputs((2, 3, 4, 4), torch.float32, device)
    step = timesteps(2, device)
    error = RuntimeError if backend == "cpp" else ValueError
    cases = [(uncond[:1], 2.0, "uncond_output must have"), (uncond.half(), 2.0, "uncond_output must have"),
             (uncond, float("nan"), "guidance_scale must be finite"),
             (None, float("inf"), "guidance_scale must be finite")]
    for bad, w, match in cases:
        x_buf = x.clone()
        with pytest.raises(error, match=match):
            ops.implementation("ddpm_step_", backend)(x_buf, cond, step, coefs, rng_key(SEED, 0, device), True, None,
                                                      bad, w, None, None, None)
        assert torch.equal(x_buf, x)
        with pytest.raises(error, match=match):
            functional(backend)(x, cond, step, coefs, SEED, 0, True, bad, w, None, None, None)
        with pytest.raises(error, match=match):
            namespace_op(backend, "ddpm_step_cast")(x, cond, step, coefs, SEED, 0, True, torch.float16, False, bad, w,
                                                    None, None, None)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_ddpm_step_guided_opcheck(backend):
    """torch.library.opcheck of the three step ops' guided signatures (a dim-0 view as uncond_output)."""
    need(backend, "ddpm_step_", DEVICE_OF[backend])
    device = DEVICE_OF[backend]
    coefs = coefficients(device=device)
    x, cond, uncond = guided_inputs((2, 3, 4, 4), torch.float16, device)
    t = torch.tensor([0, T - 1], device=device)
    torch.library.opcheck(namespace_op(backend, "ddpm_step"),
                          (x, cond, t, coefs, SEED, 3, True, uncond, 7.5, None, None, None))
    torch.library.opcheck(namespace_op(backend, "ddpm_step_cast"),
                          (x, cond, t, coefs, SEED, 3, False, torch.bfloat16, True, uncond, 0.5, None, None, None))
    torch.library.opcheck(namespace_op(backend, "ddpm_step_"),
                          (x.clone(), cond, torch.tensor(7, device=device), coefs, rng_key(SEED, 3, device), True,
                           torch.empty(2, 3, 4, 4, dtype=torch.float16, device=device), uncond, -1.0, None, None, None))


# -- dynamic thresholding: x0 = clamp(x0_hat, -s, s) / s with per-sample bounds, fused into the step ----
RATIO, MAX_VALUE = 0.9, 3.0  # the bounds differ across the samples of timesteps(n) (some are 1, some 3)
THRESHOLD_VARIANTS = [("epsilon", "ddpm", "fixed_small", 0.0), ("v", "ddim", "fixed_small", 0.5),
                      ("x0", "ddpm", "fixed_large", 0.0)]


def diffusers_threshold_sample(sample, ratio, max_value):
    """diffusers' ``DDPMScheduler._threshold_sample`` (Saharia et al. 2022), written out as a peer:
    per sample, s = clamp(quantile(|x0|, ratio), 1, max_value); x0 = clamp(x0, -s, s) / s."""
    n = sample.shape[0]
    flat = sample.float().reshape(n, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape)


def threshold_inputs(shape, dtype, device, variant, guided):
    """x, the model output(s), step, coefs and the reference's bounds of this step's x0_hat."""
    coefs = coefficients(variant, device)
    x, cond, uncond = guided_inputs(shape, dtype, device)
    uncond = uncond if guided else None
    step = timesteps(shape[0], device)
    bounds = ops.dynamic_threshold(x, cond, step, coefs, ratio=RATIO, max_value=MAX_VALUE, uncond_output=uncond,
                                   guidance_scale=GUIDANCE_SCALE)
    return x, cond, uncond, step, coefs, bounds


@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variant", THRESHOLD_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_thresholded_matches_reference(target, variant, clip, guided, dtype, shape):
    """The thresholded step of each backend, in its three forms (functional, cast, in place), with
    and without guidance, equals the reference's (the bound replaces the clip either way)."""
    backend, device = target
    need(backend, "ddpm_step", device, dtype)
    x, cond, uncond, step, coefs, bounds = threshold_inputs(shape, dtype, device, variant, guided)
    _three_forms_match_reference(backend, device, x, cond, uncond, step, coefs, clip, bounds,
                                 f"thresholded ddpm_step {variant} clip={clip} guided={guided} {dtype}")


@pytest.mark.parametrize("shape", LARGE_ODD_SHAPES, ids=target_id)
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_thresholded_large_odd_shapes(target, shape):
    """Rows that straddle parallel tasks and chunks read their own sample's bound."""
    backend, device = target
    dtype = torch.bfloat16 if backend == "cpp" else torch.float16
    need(backend, "ddpm_step", device, dtype)
    x, cond, _, step, coefs, _ = threshold_inputs(shape, dtype, device, ("epsilon", "ddpm", "fixed_large", 0.0), False)
    bounds = torch.linspace(1.0, 4.0, shape[0], device=device)
    kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, clip_denoised=False, threshold=bounds)
    want = ops.ddpm_step(x, cond, step, coefs, backend="reference", **kw)
    assert_close(ops.ddpm_step(x, cond, step, coefs, backend=backend, **kw), want, **fp32_at(want.abs().max()))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
def test_reference_thresholded_step_is_diffusers_threshold_then_the_step(dtype, guided, sampler):
    """The reference's thresholded step is diffusers' _threshold_sample on the (guided) x0_hat, both
    written out here and diffusers' own, followed by the step with that x0: c0 x0 + c1 x + sigma z."""
    diffusers = pytest.importorskip("diffusers")
    variant = ("epsilon", sampler, "fixed_small", 0.5 if sampler == "ddim" else 0.0)
    x, cond, uncond, step, coefs, bounds = threshold_inputs((3, 5, 7, 9), dtype, "cpu", variant, guided)
    rows = coefs.index_select(0, step)
    noise = reference.batch_noise(SEED, SAMPLE_OFFSET, step, x.shape, "cpu")
    x0_hat = reference.predict_x0(x, cond, rows, False, uncond_output=uncond, guidance_scale=GUIDANCE_SCALE)
    peer = diffusers_threshold_sample(x0_hat, RATIO, MAX_VALUE)
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=RATIO, sample_max_value=MAX_VALUE)
    assert_close(scheduler._threshold_sample(x0_hat.clone()), peer, **EXACT, msg="diffusers' own _threshold_sample")
    s = torch.clamp(torch.quantile(x0_hat.abs().reshape(3, -1), RATIO, dim=1), 1, MAX_VALUE)
    assert_close(bounds, s, **EXACT, msg="dynamic_threshold")
    assert bool((bounds > 1).any()) and bool((bounds < MAX_VALUE).any() or (bounds == 1).any())
    c0, c1, sigma = (rows[:, i].reshape(3, 1, 1, 1) for i in (2, 3, 4))
    want = c0 * peer + c1 * x + sigma * noise
    for clip in (True, False):
        got = reference.ddpm_step(x, cond, rows, clip, noise, uncond_output=uncond, guidance_scale=GUIDANCE_SCALE,
                                  threshold=bounds)
        assert_close(got, want, **FP32, msg=f"clip={clip}")
        assert_close(reference.predict_x0(x, cond, rows, clip, uncond_output=uncond, guidance_scale=GUIDANCE_SCALE,
                                          threshold=bounds), peer, **EXACT, msg="predict_x0")
    dispatched = ops.ddpm_step(x, cond, step, coefs, seed=SEED, sample_offset=SAMPLE_OFFSET, uncond_output=uncond,
                               guidance_scale=GUIDANCE_SCALE, threshold=bounds, backend="reference")
    assert_close(dispatched, want, **FP32, msg="dispatch")


@pytest.mark.parametrize("target", [("reference", "cpu")] + TARGETS, ids=target_id)
def test_ddpm_step_threshold_one_is_the_clip_and_none_is_today(target):
    """s = 1 for every sample is the plain clip (whatever clip_denoised says), bit for bit; threshold
    None is today's step; a bound > 1 changes it."""
    backend, device = target
    need(backend, "ddpm_step", device) if backend != "reference" else None
    coefs = coefficients(("v", "ddpm", "fixed_small", 0.0), device)
    for dtype in DTYPES:
        if backend != "reference" and ops.unsupported(backend, "ddpm_step", torch.device(device), dtype):
            continue
        x, cond, uncond = guided_inputs((3, 5, 7, 9), dtype, device)
        step = timesteps(3, device)
        for u in (None, uncond):
            kw = dict(seed=SEED, sample_offset=SAMPLE_OFFSET, uncond_output=u, guidance_scale=2.0, backend=backend)
            clipped = ops.ddpm_step(x, cond, step, coefs, clip_denoised=True, **kw)
            ones = torch.ones(3, device=device)
            for clip in (True, False):
                assert_close(ops.ddpm_step(x, cond, step, coefs, clip_denoised=clip, threshold=ones, **kw), clipped,
                             **EXACT, msg=f"s=1 clip={clip} {dtype}")
                assert_close(ops.ddpm_step(x, cond, step, coefs, clip_denoised=clip, threshold=None, **kw),
                             ops.ddpm_step(x, cond, step, coefs, clip_denoised=clip, **kw), **EXACT, msg="None")
            assert not torch.equal(ops.ddpm_step(x, cond, step, coefs, threshold=ones * 2, **kw), clipped)


def _bad_thresholds(x):
    """(id, threshold, error, match) the dispatch rejects, naming the argument."""
    n = x.shape[0]
    return [
        ("dtype", torch.ones(n, dtype=torch.float64), TypeError, r"threshold must have dtype in \(float32\)"),
        ("shape-long", torch.ones(n + 1), ValueError, r"threshold must have shape \(3,\)"),
        ("shape-0-dim", torch.tensor(1.0), ValueError, r"threshold must have shape \(3,\)"),
        ("shape-2-d", torch.ones(n, 1), ValueError, r"threshold must have shape \(3,\)"),
        ("device", torch.ones(n, device="meta"), ValueError, "threshold must be on cpu"),
        ("not-a-tensor", 1.0, TypeError, "threshold must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_thresholds(torch.zeros(3)))),
                         ids=[c[0] for c in _bad_thresholds(torch.zeros(3))])
def test_ddpm_step_rejects_bad_threshold(case):
    coefs = coefficients()
    x, cond = inputs((3, 5, 7, 9), torch.float32)
    _, bad, error, match = _bad_thresholds(x)[case]
    for backend in ("reference", "cpp", "triton"):
        if backend != "reference" and ops.load_error(backend) is not None:
            continue
        with pytest.raises(error, match=match):
            ops.ddpm_step(x, cond, timesteps(3), coefs, seed=SEED, threshold=bad, backend=backend)


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_ddpm_step_ops_reject_bad_threshold(target):
    """The backend ops themselves (as the engine calls them): errors naming the argument, x unchanged."""
    backend, device = target
    need(backend, "ddpm_step_", device)
    coefs = coefficients(device=device)
    x, cond = inputs((2, 3, 4, 4), torch.float32, device)
    step = timesteps(2, device)
    for bad in (torch.ones(2, dtype=torch.float64, device=device), torch.ones(3, device=device),
                torch.ones(2, 1, device=device), torch.ones(2, device="meta")):
        # a meta bound sends a Triton op to its fake (fakes.py), which raises RuntimeError too
        error = RuntimeError if backend == "cpp" or bad.is_meta else ValueError
        x_buf = x.clone()
        with pytest.raises(error, match="threshold must"):
            ops.implementation("ddpm_step_", backend)(x_buf, cond, step, coefs, rng_key(SEED, 0, device), True, None,
                                                      None, 1.0, bad, None, None)
        assert torch.equal(x_buf, x)
        with pytest.raises(error, match="threshold must"):
            functional(backend)(x, cond, step, coefs, SEED, 0, True, None, 1.0, bad, None, None)
        with pytest.raises(error, match="threshold must"):
            namespace_op(backend, "ddpm_step_cast")(x, cond, step, coefs, SEED, 0, True, torch.float16, False, None,
                                                    1.0, bad, None, None)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_ddpm_step_thresholded_opcheck(backend):
    """torch.library.opcheck of the three step ops' thresholded signatures, unguided and guided."""
    need(backend, "ddpm_step_", DEVICE_OF[backend])
    device = DEVICE_OF[backend]
    coefs = coefficients(device=device)
    x, cond, uncond = guided_inputs((2, 3, 4, 4), torch.float16, device)
    t = torch.tensor([0, T - 1], device=device)
    bounds = torch.tensor([1.0, 2.5], device=device)
    for u in (None, uncond):
        torch.library.opcheck(namespace_op(backend, "ddpm_step"),
                              (x, cond, t, coefs, SEED, 3, True, u, 7.5, bounds, None, None))
        torch.library.opcheck(namespace_op(backend, "ddpm_step_cast"),
                              (x, cond, t, coefs, SEED, 3, False, torch.bfloat16, True, u, 0.5, bounds, None, None))
        torch.library.opcheck(namespace_op(backend, "ddpm_step_"),
                              (x.clone(), cond, torch.tensor(7, device=device), coefs, rng_key(SEED, 3, device), True,
                               torch.empty(2, 3, 4, 4, dtype=torch.float16, device=device), u, -1.0, bounds, None,
                               None))


# -- ops.dynamic_threshold: the per-sample bounds, from the table's a, b at the step ------------------
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
def test_dynamic_threshold_is_diffusers_bound(dtype, guided):
    """The bounds equal diffusers' s of the step's x0_hat, lie in [1, max_value], and a 0-dim, [1]
    and expanded step give the same bounds as the per-sample [n] step."""
    coefs = coefficients(("epsilon", "ddpm", "fixed_small", 0.0))
    x, cond, uncond = guided_inputs((4, 3, 16, 16), dtype)
    uncond = uncond if guided else None
    step = timesteps(4)
    kw = dict(ratio=0.995, max_value=2.0, uncond_output=uncond, guidance_scale=3.0)
    got = ops.dynamic_threshold(x, cond, step, coefs, **kw)
    out = reference.guided_output(cond, uncond, 3.0)
    rows = coefs.index_select(0, step)
    x0_hat = rows[:, 0].reshape(4, 1, 1, 1) * x + rows[:, 1].reshape(4, 1, 1, 1) * out
    s = torch.clamp(torch.quantile(x0_hat.reshape(4, -1).abs(), 0.995, dim=1), min=1, max=2.0)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert_close(got, s, **EXACT)
    assert bool(((got >= 1) & (got <= 2.0)).all())
    k = torch.tensor(T // 2)
    one = ops.dynamic_threshold(x, cond, k.repeat(4), coefs, **kw)
    for shared in (k, k.reshape(1), k.expand(4)):
        assert_close(ops.dynamic_threshold(x, cond, shared, coefs, **kw), one, **EXACT, msg=str(tuple(shared.shape)))


@pytest.mark.parametrize("case", ["ratio-0", "ratio-above-1", "ratio-nan", "ratio-bool", "max-0", "max-inf",
                                  "table-width", "step-shape", "step-dtype", "out-shape", "uncond-shape"])
def test_dynamic_threshold_rejects_bad_inputs(case):
    coefs = coefficients()
    x, cond = inputs((3, 5, 7, 9), torch.float32)
    args = dict(x=x, model_output=cond, step=timesteps(3), table=coefs)
    kw = dict(ratio=0.995, max_value=1.0)
    error, match = ValueError, None
    if case.startswith("ratio"):
        kw["ratio"] = {"ratio-0": 0.0, "ratio-above-1": 1.5, "ratio-nan": float("nan"), "ratio-bool": True}[case]
        match = "ratio must"
    elif case.startswith("max"):
        kw["max_value"] = {"max-0": 0.0, "max-inf": float("inf")}[case]
        match = "max_value must"
    elif case == "table-width":
        args["table"], match = coefs[:, :4], r"table must have shape \(K, 6\) or \(K, 14\)"
    elif case == "step-shape":
        args["step"], match = timesteps(2), "step must be 0-dim or have shape"
    elif case == "step-dtype":
        args["step"], error, match = timesteps(3).int(), TypeError, "step must have dtype"
    elif case == "out-shape":
        args["model_output"], match = cond[:2], "model_output must have shape"
    else:
        kw["uncond_output"], match = cond[:1], "uncond_output must have shape"
    with pytest.raises(error, match=match):
        ops.dynamic_threshold(**args, **kw)
