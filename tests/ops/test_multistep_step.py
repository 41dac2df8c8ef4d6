"""The fused multistep solver update ``multistep_step_`` on every backend against the
reference (``fastddpm.ops.reference.multistep_step``).

Each solver's real table (``multistep.make_plan``) is run over all its steps; at every
step each backend gets the reference's own state (``x``, the history ring) and must
give the reference's ``x_next`` and advanced ring: odd and round shapes, model outputs
in float32/bfloat16/float16 (the reference computes from the same rounded output),
with and without the clip.  The SDE noise is the contract's (slot = step index): equal
to ``reference.batch_noise``, across backends, and across batch splits.  Also: the
dispatch, ``opcheck`` of both namespaces' ops, bad inputs.  The optional model input the
op writes (``x_next`` in bf16/fp16, contiguous or channels_last) against the reference.
GPU (``gpu`` marker): the CUDA and Triton ops against the reference, and inside a
captured CUDA graph driven by a device step counter.
"""
from functools import lru_cache

import pytest
import torch

from fastddpm import multistep, ops
from fastddpm.ops import reference
from fastddpm.schedule import NoiseSchedule
from backends import need
from op_cases import T, namespace_op, rng_key, target_id
from tolerances import BY_DTYPE, EXACT, FMA_FP32, FP32, assert_close

pytestmark = pytest.mark.ops

HAS_CUDA = torch.cuda.is_available()
SEED = 0x0123_4567_89AB
SAMPLE_OFFSET = 3
STEPS = 6
SHAPES = [(3, 5, 7, 9), (4, 3, 16, 16), (5, 123)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = ["cpp", "triton"]
SLOTS = reference.MULTISTEP_HISTORY_SLOTS  # [4, *shape]: the ring of three stored predictions, then x_last
X_LAST = reference.MULTISTEP_RING


@lru_cache(maxsize=None)
def _plan(solver, prediction="epsilon", spacing="linspace", karras=False, kind="linear", steps=STEPS):
    return multistep.make_plan(NoiseSchedule.make(kind, T), solver, steps, prediction, spacing, karras)


def _table(solver, device="cpu", **kw):
    return _plan(solver, **kw).tensors(device)[0]


def _outputs(shape, dtype, steps, device="cpu"):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(shape, generator=g) * 1.5).to(device=device, dtype=dtype) for _ in range(steps)]


def _start_history(shape, device="cpu", full=False):
    """A starting ring: zero but a non-zero x_last (every term of a solver table is exercised), or
    (``full``) every slot random, so that a table's H1, H2 and H3 are all non-zero from the start."""
    history = torch.zeros((SLOTS, *shape), device=device)
    (history if full else history[X_LAST]).normal_()
    return history


def _check_steps(backend, table, shape, dtype, clip, stochastic, tol, device="cpu", full_history=False):
    """Run the reference over every row of ``table``; at each step the backend gets copies of the
    reference's state and must produce its x_next and history."""
    K = table.shape[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    history = _start_history(shape, device, full_history)
    for i, out in zip(reversed(range(K)), _outputs(shape, dtype, K, device)):
        step = torch.tensor(i, device=device)
        got_history = history.clone()
        got = ops.multistep_step(x, out, got_history, step, table, seed=SEED, sample_offset=SAMPLE_OFFSET,
                                 clip_denoised=clip, stochastic=stochastic, backend=backend)
        noise = reference.batch_noise(SEED, SAMPLE_OFFSET, i, shape, device) if stochastic else None
        x = reference.multistep_step(x, out, history, step, table, clip, noise)
        assert got.dtype == torch.float32
        assert_close(got, x, **tol, msg=f"{backend} x_next at step {i}")
        assert_close(got_history, history, **tol, msg=f"{backend} history at step {i}")
    return x


# -- every backend against the reference -------------------------------------------------------
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("backend", FAST)
def test_matches_reference(backend, solver, shape, dtype, clip):
    need(backend, "multistep_step", "cpu", dtype)
    plan = _plan(solver)
    # float32 out of the same rounded model output as the reference's: FP32 for every dtype
    _check_steps(backend, _table(solver), shape, dtype, clip, plan.stochastic, FP32)


@pytest.mark.parametrize("options", [dict(prediction="v", spacing="trailing"), dict(prediction="x0", karras=True),
                                     dict(kind="cosine", steps=16)], ids=["v-trailing", "x0-karras", "cosine-16"])
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("backend", FAST)
def test_other_tables_match_reference(backend, solver, options):
    need(backend, "multistep_step", "cpu")
    _check_steps(backend, _table(solver, **options), (2, 3, 8, 8), torch.float32, False, _plan(solver).stochastic,
                 FP32)


# -- linear multistep (LMS, PLMS, DEIS): p3 reads a third stored prediction, hx stores E = D + hx x ----
LMS_STEPS = 7  # seven calls: the ring of three wraps twice, every slot is written and read back
COLUMN = {name: i for i, name in enumerate(reference.MULTISTEP_COLUMNS)}


def _lms_table(device="cpu", steps=LMS_STEPS, seed=5):
    """A ``[steps, 14]`` table whose every coefficient is random and non-zero, p3 and hx included
    (magnitudes in [0.1, 0.5], random signs, ``a`` near 1), so each term of the update moves the
    result and a slot mix-up anywhere shows."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 0.1 + 0.4 * torch.rand(steps, reference.MULTISTEP_WIDTH, generator=g)
    sign = torch.randint(0, 2, (steps, reference.MULTISTEP_WIDTH), generator=g) * 2.0 - 1.0
    table = magnitude * sign
    table[:, COLUMN["a"]] += 1.0
    return table.to(device)


def test_lms_table_exercises_the_new_columns():
    table = _lms_table()
    assert table.shape == (LMS_STEPS, 14) and LMS_STEPS > reference.MULTISTEP_RING
    assert bool((table[:, COLUMN["p3"]].abs() >= 0.1).all()) and bool((table[:, COLUMN["hx"]].abs() >= 0.1).all())


@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("backend", FAST)
def test_lms_columns_match_reference(backend, shape, dtype, clip, stochastic):
    """Random non-zero p3 and hx over seven consecutive steps from a random ring: every backend gives
    the reference's x_next and its ring (E in slot step % 3, x_corr in slot 3) at every step."""
    need(backend, "multistep_step", "cpu", dtype)
    _check_steps(backend, _lms_table(), shape, dtype, clip, stochastic, FP32, full_history=True)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("backend", FAST)
def test_lms_columns_thresholded_match_reference(backend, dtype, guided):
    """The same with dynamic thresholding (guided or not): E = D + hx x is made of the thresholded D."""
    need(backend, "multistep_step", "cpu", dtype)
    _check_thresholded_steps(backend, _lms_table(), (3, 5, 7, 9), dtype, True, True, guided, FP32, full_history=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("backend", FAST)
def test_lms_columns_guided_match_reference(backend, dtype):
    need(backend, "multistep_step", "cpu", dtype)
    table = _lms_table()
    x = torch.randn((5, 123), generator=torch.Generator().manual_seed(1))
    history = _start_history((5, 123), full=True)
    for i, (cond, uncond) in zip(reversed(range(LMS_STEPS)), _guided_outputs((5, 123), dtype, LMS_STEPS)):
        got_history = history.clone()
        got = ops.multistep_step(x, cond, got_history, torch.tensor(i), table, uncond_output=uncond,
                                 guidance_scale=GUIDANCE_SCALE, backend=backend)
        x = reference.multistep_step(x, cond, history, torch.tensor(i), table, False, None, uncond_output=uncond,
                                     guidance_scale=GUIDANCE_SCALE)
        assert_close(got, x, **FP32, msg=f"{backend} guided x_next at step {i}")
        assert_close(got_history, history, **FP32, msg=f"{backend} guided history at step {i}")


@pytest.mark.parametrize("backend", FAST)
def test_lms_columns_write_the_model_input(backend):
    need(backend, "multistep_step", "cpu", torch.float16)
    _check_model_input_steps(backend, "dpm++2m-sde", (4, 3, 16, 16), torch.float16, torch.channels_last, FP32,
                             table=_lms_table(), full_history=True)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_ring_of_three_reads_one_two_and_three_calls_back(backend):
    """The ring's meaning, not just agreement with the reference: with D = out and E = D + hx x, a row
    whose only predictor term is p1 (p2, p3) returns the E stored one (two, three) calls back, zero
    before there were that many; x_corr = x (u = 1) lands in slot 3 and cl reads it back next call."""
    need(backend, "multistep_step", "cpu") if backend != "reference" else None
    shape, hx = (2, 3, 5), 0.5
    outs = _outputs(shape, torch.float32, LMS_STEPS)
    for lag, name in enumerate(("p1", "p2", "p3"), start=1):
        table = torch.zeros(LMS_STEPS, reference.MULTISTEP_WIDTH)
        table[:, COLUMN["b"]], table[:, COLUMN["u"]], table[:, COLUMN["hx"]], table[:, COLUMN[name]] = 1, 1, hx, 1
        x, history, stored = torch.randn(shape), multistep.new_history(torch.zeros(shape)), []
        for i, out in zip(reversed(range(LMS_STEPS)), outs):
            x_next = ops.multistep_step(x, out, history, torch.tensor(i), table, backend=backend)
            want = stored[-lag] if len(stored) >= lag else torch.zeros(shape)
            assert_close(x_next, want, **EXACT, msg=f"{backend} {name} at step {i}")
            stored.append(out + hx * x)
            assert_close(history[i % 3], stored[-1], **EXACT, msg=f"{backend} E in slot {i % 3} at step {i}")
            assert_close(history[X_LAST], x, **EXACT, msg=f"{backend} x_corr at step {i}")
            x = x_next + 1.0  # a new x, so each stored E differs
    # cl reads x_last: the previous call's x_corr
    table = torch.zeros(LMS_STEPS, reference.MULTISTEP_WIDTH)
    table[:, COLUMN["u"]], table[:, COLUMN["cl"]], table[:, COLUMN["cx"]] = 1, 1, 1
    history = multistep.new_history(torch.zeros(shape))
    x0, x1 = torch.randn(shape), torch.randn(shape)
    ops.multistep_step(x0, outs[0], history, torch.tensor(4), table, backend=backend)
    assert_close(ops.multistep_step(x1, outs[1], history, torch.tensor(3), table, backend=backend), x1 + x0, **EXACT)


def _two_slot_update(x, out, history, step, table, clip, noise):
    """The 12-column update over a ring of two (slot step % 2) and x_last, as it was before p3 and hx."""
    a, b, u, cl, k0, k1, k2, cx, p0, p1, p2, cz = table[int(step), :12].to(history.dtype)
    d = a * x.to(history.dtype) + b * out.to(history.dtype)
    d = d.clamp(-1.0, 1.0) if clip else d
    cur = int(step) % 2
    h2, h1 = history[cur].clone(), history[1 - cur]
    x_corr = u * x + cl * history[2] + k0 * d + k1 * h1 + k2 * h2
    x_next = cx * x_corr + p0 * d + p1 * h1 + p2 * h2
    if noise is not None:
        x_next = x_next + cz * noise
    history[cur], history[2] = d, x_corr
    return x_next


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("solver", multistep.SOLVERS)
def test_zero_p3_and_hx_is_the_two_slot_update(solver, clip):
    """Every solver table has p3 = hx = 0 and gives, over a whole run, the two-slot update's samples
    bit for bit: the ring of three holds the same D values at the slots H1 and H2 name."""
    table, stochastic = _table(solver), _plan(solver).stochastic
    assert not table[:, COLUMN["p3"]].any() and not table[:, COLUMN["hx"]].any()
    shape = (3, 5, 7, 9)
    x = old_x = torch.randn(shape)
    history, old_history = _start_history(shape), torch.zeros((3, *shape))
    old_history[2] = history[X_LAST]
    for i, out in zip(reversed(range(table.shape[0])), _outputs(shape, torch.float32, table.shape[0])):
        noise = reference.batch_noise(SEED, SAMPLE_OFFSET, i, shape, "cpu") if stochastic else None
        x = reference.multistep_step(x, out, history, torch.tensor(i), table, clip, noise)
        old_x = _two_slot_update(old_x, out, old_history, torch.tensor(i), table, clip, noise)
        assert_close(x, old_x, **EXACT, msg=f"x_next at step {i}")


# -- the SDE noise: the contract's, on every backend and any batch split ---------------------------
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_sde_noise_is_independent_of_the_batch_split(backend):
    need(backend, "multistep_step", "cpu")
    table = _table("dpm++2m-sde")
    shape = (5, 2, 6, 6)
    x0 = torch.randn(shape)
    outs = _outputs(shape, torch.float32, table.shape[0])

    def run(rows, sample_offset):
        x, history = x0[rows].clone(), torch.zeros((SLOTS, *x0[rows].shape))
        for i, out in zip(reversed(range(table.shape[0])), outs):
            x = ops.multistep_step(x, out[rows], history, torch.tensor(i), table, seed=SEED,
                                   sample_offset=sample_offset, stochastic=True, backend=backend)
        return x

    whole = run(slice(0, 5), SAMPLE_OFFSET)
    split = torch.cat([run(slice(0, 2), SAMPLE_OFFSET), run(slice(2, 5), SAMPLE_OFFSET + 2)])
    assert_close(split, whole, **EXACT, msg="split batch")
    # the noise is there and follows the key
    assert not torch.equal(run(slice(0, 5), SAMPLE_OFFSET + 1), whole)
    with_no_noise = torch.zeros_like(whole)
    x, history = x0.clone(), torch.zeros((SLOTS, *shape))
    for i, out in zip(reversed(range(table.shape[0])), outs):
        x = ops.multistep_step(x, out, history, torch.tensor(i), table, stochastic=False, backend=backend)
    with_no_noise.copy_(x)
    assert not torch.equal(with_no_noise, whole)


def test_sde_noise_equal_across_backends():
    available = [b for b in ["reference"] + FAST if b in ops.available_backends("multistep_step", "cpu")]
    if len(available) < 2:
        pytest.skip("one backend only")
    table = _table("dpm++2m-sde")
    shape = (3, 3, 9, 7)
    x0, out = torch.randn(shape), torch.randn(shape)
    results = {}
    for backend in available:
        history = torch.zeros((SLOTS, *shape))
        results[backend] = ops.multistep_step(x0, out, history, torch.tensor(STEPS - 1), table, seed=SEED,
                                              sample_offset=SAMPLE_OFFSET, stochastic=True, backend=backend)
    for backend in available[1:]:
        assert_close(results[backend], results[available[0]], **FP32, msg=f"{backend} vs {available[0]}")


# -- the in-place op itself -------------------------------------------------------------------------
def _inplace_op(backend):
    """The backend's torch operator ``multistep_step_`` (skipped, or failed where the backend is
    required, if it cannot run here)."""
    need(backend, "multistep_step_", "cpu")
    return namespace_op(backend, "multistep_step_")


def _op_args(shape=(2, 3, 4, 4), dtype=torch.float32, step=STEPS - 2):
    x = torch.randn(shape)
    return (x, torch.randn(shape).to(dtype), torch.randn((SLOTS, *shape)), torch.tensor(step),
            _table("dpm++2m-sde"), rng_key(SEED, SAMPLE_OFFSET))


@pytest.mark.parametrize("step_shape", [(), (1,)], ids=["0-dim", "[1]"])
@pytest.mark.parametrize("backend", FAST)
def test_inplace_op_updates_x_and_history(backend, step_shape):
    op = _inplace_op(backend)
    x, out, history, step, table, rng = _op_args()
    want_history = history.clone()
    want = reference.multistep_step(x, out, want_history, step, table, True,
                                    reference.batch_noise(SEED, SAMPLE_OFFSET, int(step), x.shape, "cpu"))
    x_buf, h_buf = x.clone(), history.clone()
    op(x_buf, out, h_buf, step.reshape(step_shape), table, rng, True, True, None, None, 1.0, None)
    assert_close(x_buf, want, **FP32, msg=f"{backend} x")
    assert_close(h_buf, want_history, **FP32, msg=f"{backend} history")


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    op = _inplace_op(backend)
    for dtype, clip, stochastic in [(torch.float32, True, True), (torch.float16, False, False)]:
        x, out, history, step, table, rng = _op_args(dtype=dtype)
        torch.library.opcheck(op, (x, out, history, step, table, rng, clip, stochastic, None, None, 1.0, None))
    for model_dtype, layout in [(torch.float16, torch.contiguous_format), (torch.float16, torch.channels_last),
                                (torch.float32, torch.channels_last)]:
        x, out, history, step, table, rng = _op_args()
        model_input = torch.empty(x.shape, dtype=model_dtype, memory_format=layout)
        torch.library.opcheck(op, (x, out, history, step, table, rng, True, True, model_input, None, 1.0, None))


# -- the model input: x_next in the model's dtype and layout, written by the op ----------------------
LAYOUTS = [torch.contiguous_format, torch.channels_last]
MODEL_INPUT_CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS
                     if len(shape) == 4 or layout is torch.contiguous_format]


def _model_input_case_id(case):
    shape, layout = case
    return f"{target_id(shape)}-{'channels_last' if layout is torch.channels_last else 'contiguous'}"


def _check_model_input_steps(backend, solver, shape, model_dtype, layout, tol, device="cpu", table=None,
                             full_history=False):
    """Every row of the solver's table: the op, given the reference's state (float32 x and model
    output) and a model-input buffer, writes the reference's x_next and history, and x_next in the
    buffer's dtype and layout: its own x_next cast (exactly), the reference's within the dtype's
    tolerance.  ``table``: in place of the solver's (``solver`` then only says whether it is stochastic)."""
    op = ops.implementation("multistep_step_", backend)
    table = _table(solver, device) if table is None else table.to(device)
    stochastic = _plan(solver).stochastic
    K = table.shape[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    history = _start_history(shape, device, full_history)
    model_input = torch.empty(shape, dtype=model_dtype, device=device, memory_format=layout)
    for i, out in zip(reversed(range(K)), _outputs(shape, torch.float32, K, device)):
        step = torch.tensor(i, device=device)
        x_buf, h_buf = x.clone(), history.clone()
        model_input.fill_(float("nan"))  # every element must be written
        op(x_buf, out, h_buf, step, table, rng_key(SEED, SAMPLE_OFFSET, device), True, stochastic, model_input, None, 1.0, None)
        noise = reference.batch_noise(SEED, SAMPLE_OFFSET, i, shape, device) if stochastic else None
        x = reference.multistep_step(x, out, history, step, table, True, noise)
        assert_close(x_buf, x, **tol, msg=f"{backend} x_next at step {i}")
        assert_close(h_buf, history, **tol, msg=f"{backend} history at step {i}")
        assert model_input.dtype == model_dtype and model_input.is_contiguous(memory_format=layout)
        assert_close(model_input, x_buf.to(model_dtype), **EXACT, msg=f"{backend} model input at step {i}")
        assert_close(model_input, x.to(model_dtype), **BY_DTYPE[model_dtype],
                     msg=f"{backend} model input vs the reference at step {i}")


@pytest.mark.parametrize("case", MODEL_INPUT_CASES, ids=_model_input_case_id)
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=target_id)
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("backend", FAST)
def test_inplace_op_writes_the_model_input(backend, solver, model_dtype, case):
    need(backend, "multistep_step", "cpu", model_dtype)
    shape, layout = case
    _check_model_input_steps(backend, solver, shape, model_dtype, layout, FP32)


def _bad_model_inputs(x):
    """(id, model_input, error by backend or None for the default, match)."""
    if HAS_CUDA:
        other_device = [("device", torch.empty(x.shape, dtype=torch.float16, device="cuda"), None, "model_input must")]
    else:  # a meta model_input with a CPU x dispatches to the fake implementation, which checks it
        other_device = [("device", torch.empty(x.shape, dtype=torch.float16, device="meta"), RuntimeError,
                         r"model_input must be a float32/float16/bfloat16 tensor of shape \(2, 3, 4, 4\) on cpu")]
    return [
        ("shape", torch.empty((2, 3, 4, 5), dtype=torch.float16), None, "model_input must have"),
        ("batch", torch.empty((1, 3, 4, 4), dtype=torch.bfloat16), None, "model_input must have"),
        ("int32", torch.empty(x.shape, dtype=torch.int32), None, "model_input must be float32, float16 or bfloat16"),
        ("int64", torch.empty(x.shape, dtype=torch.int64), None, "model_input must be float32, float16 or bfloat16"),
        ("strided", torch.empty((2, 3, 4, 8), dtype=torch.float16)[..., ::2], None,
         "model_input must be contiguous or channels_last"),
    ] + other_device


@pytest.mark.parametrize("backend", FAST)
def test_ops_reject_a_bad_model_input_naming_it(backend):
    """A wrong shape, device or an integer dtype: an error naming model_input, before anything is written."""
    op = _inplace_op(backend)
    x, out, history, step, table, rng = _op_args()
    for name, model_input, error, match in _bad_model_inputs(x):
        error = error or (RuntimeError if backend == "cpp" else ValueError)
        x_buf, h_buf = x.clone(), history.clone()
        with pytest.raises(error, match=match):
            op(x_buf, out, h_buf, step, table, rng, True, True, model_input, None, 1.0, None)
        assert torch.equal(x_buf, x) and torch.equal(h_buf, history), name


# -- dispatch ---------------------------------------------------------------------------------------
def test_dispatch_covers_multistep_step():
    assert "multistep_step" in ops.OPS
    cpu = torch.device("cpu")
    assert "reference" in ops.available_backends("multistep_step", cpu)
    for backend in FAST:
        if ops.load_error(backend) is None:
            assert ops.implementation("multistep_step", backend) is ops.implementation("multistep_step_", backend)
            assert ops.implementation("multistep_step_", backend) is not None, backend
    if "cpp" in ops.available_backends("multistep_step", cpu):
        assert ops.select_backend("multistep_step", cpu, torch.float32) == "cpp"


def test_float64_runs_on_the_reference():
    """A float64 run (float64 history) is the reference's: automatic dispatch picks it, a forced
    fast backend says it cannot."""
    table = _table("unipc").double()
    x, out = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    history = multistep.new_history(x)
    want_history = history.clone()
    got = ops.multistep_step(x, out, history, torch.tensor(3), table)
    want = reference.multistep_step(x, out, want_history, torch.tensor(3), table, False, None)
    assert got.dtype == torch.float64
    assert_close(got, want, **EXACT)
    assert_close(history, want_history, **EXACT)
    for backend in FAST:
        if ops.load_error(backend) is None:
            with pytest.raises(RuntimeError, match=f"backend '{backend}' was requested for multistep_step"):
                ops.multistep_step(x, out, history, torch.tensor(3), table, backend=backend)


# -- bad input --------------------------------------------------------------------------------------
def _bad_cases():
    shape = (2, 3, 4, 4)
    x, out, history = torch.randn(shape), torch.randn(shape), torch.zeros((SLOTS, *shape))
    table, step = _table("dpm++2m"), torch.tensor(2)
    return [
        ("table-columns", (x, out, history, step, table[:, :12]), ValueError, r"table must have shape \(K, 14\)"),
        ("table-1d", (x, out, history, step, table[0]), ValueError, "table must be 2-D"),
        ("history-shape", (x, out, history[:3], step, table), ValueError, r"history must have shape \(4, 2, 3, 4, 4\)"),
        ("history-dtype", (x, out, history.half(), step, table), TypeError, "history must have dtype"),
        ("history-vs-x", (x, out, history.double(), step, table), TypeError, "x must have history's dtype"),
        ("out-shape", (x, out[:1], history, step, table), ValueError, "model_output must have shape"),
        ("step-dtype", (x, out, history, step.int(), table), TypeError, "step must have dtype"),
        ("step-per-sample", (x, out, history, torch.tensor([2, 2]), table), ValueError, "step must hold one value"),
        ("step-past-the-table", (x, out, history, torch.tensor(STEPS), table), ValueError,
         r"step must lie in \[0, 5\]"),
        ("step-negative", (x, out, history, torch.tensor(-1), table), ValueError, r"step must lie in \[0, 5\]"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_dispatch_rejects_bad_inputs(case):
    _, args, error, match = case
    with pytest.raises(error, match=match):
        ops.multistep_step(*args)


@pytest.mark.parametrize("backend", FAST)
def test_ops_reject_bad_inputs_naming_the_argument(backend):
    """The fast ops themselves (called directly, as the engine does): metadata errors name the argument;
    a CPU step index is range-checked too (a device one is not read: that would synchronise)."""
    op = _inplace_op(backend)
    x, out, history, step, table, rng = _op_args()
    error = RuntimeError if backend == "cpp" else ValueError
    cases = [
        ((x, out, history, step, table[:, :12], rng), "table must"),
        ((x, out, history[:3], step, table, rng), "history must"),
        ((x, out, history.double(), step, table, rng), "history must"),
        ((x, out, history, torch.tensor([1, 1]), table, rng), "step must"),
        ((x, out, history, step, table, rng[:1]), "rng must"),
        ((x, out[:1], history, step, table, rng), "model_output must"),
    ]
    cases.append(((x, out, history, torch.tensor(STEPS), table, rng), r"step must lie in \[0, 5\]"))
    cases.append(((x, out, history, torch.tensor(-1), table, rng), r"step must lie in"))
    for args, match in cases:
        x_buf, h_buf = args[0].clone(), args[2].clone()
        with pytest.raises(error, match=match):
            op(x_buf, args[1], h_buf, *args[3:], True, True, None, None, 1.0, None)


def test_public_update_routes_through_the_dispatch(monkeypatch):
    """multistep.multistep_update is ops.multistep_step (one reference, one dispatch)."""
    calls = []
    real = ops.multistep_step
    monkeypatch.setattr(ops, "multistep_step", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(2, 3, 4, 4)
    multistep.multistep_update(x, torch.randn_like(x), multistep.new_history(x), torch.tensor(1), _table("unipc"))
    assert len(calls) == 1


# -- GPU -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=target_id)
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("backend", FAST)
def test_cuda_matches_reference(backend, solver, shape, dtype):
    need(backend, "multistep_step", "cuda", dtype)
    table = _table(solver, "cuda")
    tol = FMA_FP32 if dtype == torch.float32 else BY_DTYPE[dtype]
    for clip in (True, False):
        _check_steps(backend, table, shape, dtype, clip, _plan(solver).stochastic, tol, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=target_id)
@pytest.mark.parametrize("backend", FAST)
def test_cuda_lms_columns_match_reference(backend, shape, dtype):
    need(backend, "multistep_step", "cuda", dtype)
    tol = FMA_FP32 if dtype == torch.float32 else BY_DTYPE[dtype]
    for clip, stochastic in ((True, True), (False, False)):
        _check_steps(backend, _lms_table("cuda"), shape, dtype, clip, stochastic, tol, device="cuda",
                     full_history=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", MODEL_INPUT_CASES + [((8, 3, 64, 64), torch.channels_last)],
                         ids=_model_input_case_id)
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=target_id)
@pytest.mark.parametrize("solver", ["dpm++3m", "dpm++2m-sde"])
@pytest.mark.parametrize("backend", FAST)
def test_cuda_writes_the_model_input(backend, solver, model_dtype, case):
    need(backend, "multistep_step", "cuda", model_dtype)
    shape, layout = case
    _check_model_input_steps(backend, solver, shape, model_dtype, layout, FMA_FP32, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
def test_cuda_sde_noise_equals_cpu(backend):
    need(backend, "multistep_step", "cuda")
    table = _table("dpm++2m-sde")
    shape = (4, 3, 16, 16)
    x, out = torch.randn(shape), torch.randn(shape)
    want = ops.multistep_step(x, out, torch.zeros((SLOTS, *shape)), torch.tensor(STEPS - 1), table, seed=SEED,
                              sample_offset=SAMPLE_OFFSET, stochastic=True, backend="reference")
    got = ops.multistep_step(x.cuda(), out.cuda(), torch.zeros((SLOTS, *shape), device="cuda"),
                             torch.tensor(STEPS - 1, device="cuda"), table.cuda(), seed=SEED,
                             sample_offset=SAMPLE_OFFSET, stochastic=True, backend=backend)
    assert_close(got, want, **FMA_FP32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
def test_cuda_graph_with_device_step_counter(backend):
    """The in-place op inside a captured CUDA graph: the step index and the noise key are device
    tensors (the graph decrements the step itself), so one graph replays every step."""
    need(backend, "multistep_step", "cuda", torch.bfloat16)
    op = ops.implementation("multistep_step_", backend)
    table = _table("dpm++2m-sde", "cuda")
    K, shape = table.shape[0], (4, 3, 16, 16)
    x0 = torch.randn(shape, device="cuda")
    outs = _outputs(shape, torch.bfloat16, K, "cuda")
    x, history, out_buf = x0.clone(), torch.zeros((SLOTS, *shape), device="cuda"), outs[0].clone()
    step, rng = torch.tensor(K - 1, device="cuda"), rng_key(SEED, SAMPLE_OFFSET, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        op(x.clone(), out_buf, history.clone(), step.clone(), table, rng, True, True, None, None, 1.0, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, out_buf, history, step, table, rng, True, True, None, None, 1.0, None)
        step.sub_(1)
    x.copy_(x0)
    history.zero_()
    step.fill_(K - 1)
    want, want_history = x0.clone(), torch.zeros_like(history)
    for i, out in zip(reversed(range(K)), outs):
        out_buf.copy_(out)
        graph.replay()
        want = reference.multistep_step(want, out, want_history, torch.tensor(i, device="cuda"), table, True,
                                        reference.batch_noise(SEED, SAMPLE_OFFSET, i, shape, "cuda"))
    torch.cuda.synchronize()
    assert step.item() == -1
    assert_close(x, want, **FMA_FP32)
    assert_close(history, want_history, **FMA_FP32)


# -- classifier-free guidance: out = u + w (c - u), fused into the update ------------------------------
GUIDANCE_SCALE = 7.5


def _guided_outputs(shape, dtype, steps, device="cpu", channels_last=False):
    """Per step, the conditional and unconditional outputs as the halves (dim-0 views) of one
    ``[2n, ...]`` model output, as a guided model call returns them."""
    pairs = []
    for cond, uncond in zip(_outputs(shape, dtype, steps, device), _outputs(shape, dtype, 2 * steps, device)[steps:]):
        both = torch.cat([cond, uncond])
        if channels_last:
            both = both.to(memory_format=torch.channels_last)
        pairs.append((both[:shape[0]], both[shape[0]:]))
    return pairs


def _check_guided_steps(backend, table, shape, dtype, clip, stochastic, tol, w=GUIDANCE_SCALE, device="cpu",
                        channels_last=False):
    """As ``_check_steps``, guided: at each step the backend gets the reference's state and the two
    outputs and must give the reference's x_next and history."""
    K = table.shape[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    history = _start_history(shape, device)
    for i, (cond, uncond) in zip(reversed(range(K)), _guided_outputs(shape, dtype, K, device, channels_last)):
        step = torch.tensor(i, device=device)
        got_history = history.clone()
        got = ops.multistep_step(x, cond, got_history, step, table, seed=SEED, sample_offset=SAMPLE_OFFSET,
                                 clip_denoised=clip, stochastic=stochastic, uncond_output=uncond, guidance_scale=w,
                                 backend=backend)
        noise = reference.batch_noise(SEED, SAMPLE_OFFSET, i, shape, device) if stochastic else None
        x = reference.multistep_step(x, cond, history, step, table, clip, noise, uncond_output=uncond,
                                     guidance_scale=w)
        assert_close(got, x, **tol, msg=f"{backend} guided x_next at step {i}")
        assert_close(got_history, history, **tol, msg=f"{backend} guided history at step {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("backend", FAST)
def test_guided_matches_reference(backend, solver, shape, dtype):
    need(backend, "multistep_step", "cpu", dtype)
    for clip in (True, False):
        _check_guided_steps(backend, _table(solver), shape, dtype, clip, _plan(solver).stochastic, FP32)


@pytest.mark.parametrize("backend", FAST)
def test_guided_channels_last_views_and_model_input(backend):
    """channels_last halves of a [2n, ...] output give the contiguous halves' result, in place with a
    channels_last model input too."""
    need(backend, "multistep_step_", "cpu", torch.float16)
    op = ops.implementation("multistep_step_", backend)
    shape = (3, 5, 7, 9)
    (cond, uncond), = _guided_outputs(shape, torch.float16, 1)
    (cond_cl, uncond_cl), = _guided_outputs(shape, torch.float16, 1, channels_last=True)
    assert uncond_cl.is_contiguous(memory_format=torch.channels_last) and not uncond_cl.is_contiguous()
    x, _, history, step, table, rng = _op_args(shape)
    results = []
    for c, u in ((cond, uncond), (cond_cl, uncond_cl)):
        x_buf, h_buf = x.clone(), history.clone()
        model_input = torch.empty(shape, dtype=torch.float16, memory_format=torch.channels_last)
        op(x_buf, c, h_buf, step, table, rng, True, True, model_input, u, 2.0, None)
        assert_close(model_input, x_buf.half(), **EXACT, msg="model input")
        results.append((x_buf, h_buf))
    assert_close(results[1][0], results[0][0], **EXACT)
    assert_close(results[1][1], results[0][1], **EXACT)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, -2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_guided_update_is_the_combine_then_the_update(dtype, w):
    """The reference's guided update is u + w (c - u), written out here in the compute dtype (float64
    for a float64 run), followed by the unguided reference update."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    table = _table("unipc").to(compute)
    shape = (2, 3, 4, 4)
    x = torch.randn(shape, dtype=compute)
    (cond, uncond), = _guided_outputs(shape, dtype, 1)
    history = torch.randn((SLOTS, *shape), dtype=compute)
    want_history = history.clone()
    got = reference.multistep_step(x, cond, history, torch.tensor(3), table, True, None, uncond_output=uncond,
                                   guidance_scale=w)
    combined = uncond.to(compute) + w * (cond.to(compute) - uncond.to(compute))
    want = reference.multistep_step(x, combined, want_history, torch.tensor(3), table, True, None)
    assert got.dtype == compute
    assert_close(got, want, **EXACT)
    assert_close(history, want_history, **EXACT)
    assert torch.equal(reference.guided_output(cond, uncond, w, compute), combined)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_guidance_scale_one_is_the_conditional_update(backend):
    """w = 1 is the conditional model alone (to float32 rounding of u + (c - u)); uncond_output None is
    today's update whatever guidance_scale says."""
    need(backend, "multistep_step", "cpu") if backend != "reference" else None
    table = _table("dpm++2m-sde")
    shape = (3, 5, 7, 9)
    (cond, uncond), = _guided_outputs(shape, torch.float32, 1)
    x, history = torch.randn(shape), torch.randn((SLOTS, *shape))

    def run(**kw):
        h = history.clone()
        return ops.multistep_step(x, cond, h, torch.tensor(4), table, seed=SEED, stochastic=True, backend=backend,
                                  **kw), h

    plain, plain_history = run()
    one, one_history = run(uncond_output=uncond, guidance_scale=1.0)
    assert_close(one, plain, **FP32)
    assert_close(one_history, plain_history, **FP32)
    ignored, ignored_history = run(uncond_output=None, guidance_scale=9.0)
    assert_close(ignored, plain, **EXACT)
    assert_close(ignored_history, plain_history, **EXACT)
    assert not torch.equal(run(uncond_output=uncond, guidance_scale=2.0)[0], plain)


def _bad_guidance_cases():
    shape = (2, 3, 4, 4)
    x, out, history = torch.randn(shape), torch.randn(shape), torch.zeros((SLOTS, *shape))
    return [
        ("uncond-shape", out[:1], 2.0, ValueError, r"uncond_output must have shape \(2, 3, 4, 4\)"),
        ("uncond-dtype", out.half(), 2.0, TypeError, r"uncond_output must have dtype in \(float32\)"),
        ("uncond-device", out.to("meta"), 2.0, ValueError, "uncond_output must be on cpu"),
        ("scale-nan", out, float("nan"), ValueError, "guidance_scale must be finite"),
        ("scale-inf", out, -float("inf"), ValueError, "guidance_scale must be finite"),
        ("scale-str", out, "7.5", TypeError, "guidance_scale must be a real number"),
    ], (x, out, history)


@pytest.mark.parametrize("case", range(len(_bad_guidance_cases()[0])), ids=[c[0] for c in _bad_guidance_cases()[0]])
def test_dispatch_rejects_bad_guidance(case):
    cases, (x, out, history) = _bad_guidance_cases()
    _, uncond, w, error, match = cases[case]
    for backend in ["reference"] + FAST:
        if backend != "reference" and ops.load_error(backend) is not None:
            continue
        with pytest.raises(error, match=match):
            ops.multistep_step(x, out, history, torch.tensor(2), _table("dpm++2m"), uncond_output=uncond,
                               guidance_scale=w, backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_ops_reject_bad_guidance_naming_it(backend):
    """The in-place ops themselves: a wrong uncond_output or a non-finite scale is an error naming it,
    before anything is written."""
    op = _inplace_op(backend)
    x, out, history, step, table, rng = _op_args()
    error = RuntimeError if backend == "cpp" else ValueError
    for uncond, w, match in [(out[:1], 2.0, "uncond_output must have"), (out.half(), 2.0, "uncond_output must have"),
                             (out, float("nan"), "guidance_scale must be finite"),
                             (None, float("inf"), "guidance_scale must be finite")]:
        x_buf, h_buf = x.clone(), history.clone()
        with pytest.raises(error, match=match):
            op(x_buf, out, h_buf, step, table, rng, True, True, None, uncond, w, None)
        assert torch.equal(x_buf, x) and torch.equal(h_buf, history)


@pytest.mark.parametrize("backend", FAST)
def test_guided_opcheck(backend):
    op = _inplace_op(backend)
    for dtype, clip, stochastic, w in [(torch.float32, True, True, 7.5), (torch.float16, False, False, -0.5)]:
        x, out, history, step, table, rng = _op_args(dtype=dtype)
        both = torch.cat([out, out.flip(0)])
        torch.library.opcheck(op, (x, both[:2], history, step, table, rng, clip, stochastic, None, both[2:], w, None))
    x, out, history, step, table, rng = _op_args()
    model_input = torch.empty(x.shape, dtype=torch.float16, memory_format=torch.channels_last)
    torch.library.opcheck(op, (x, out, history, step, table, rng, True, True, model_input, torch.randn_like(out), 3.0, None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=target_id)
@pytest.mark.parametrize("solver", ["dpm++3m", "dpm++2m-sde", "unipc"])
@pytest.mark.parametrize("backend", FAST)
def test_cuda_guided_matches_reference(backend, solver, shape, dtype):
    need(backend, "multistep_step", "cuda", dtype)
    tol = FMA_FP32 if dtype == torch.float32 else BY_DTYPE[dtype]
    _check_guided_steps(backend, _table(solver, "cuda"), shape, dtype, True, _plan(solver).stochastic, tol,
                        device="cuda", channels_last=len(shape) == 4)


# -- dynamic thresholding: D = clamp(D, -s, s) / s with per-sample bounds, fused into the update -----
RATIO, MAX_VALUE = 0.9, 3.0


def _check_thresholded_steps(backend, table, shape, dtype, clip, stochastic, guided, tol, device="cpu",
                             full_history=False):
    """As ``_check_guided_steps``, thresholded: at each step the bounds of the reference's state
    (``ops.dynamic_threshold``), and the backend must give the reference's x_next and history."""
    K = table.shape[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    history = _start_history(shape, device, full_history)
    for i, (cond, uncond) in zip(reversed(range(K)), _guided_outputs(shape, dtype, K, device)):
        uncond = uncond if guided else None
        step = torch.tensor(i, device=device)
        bounds = ops.dynamic_threshold(x, cond, step, table, ratio=RATIO, max_value=MAX_VALUE, uncond_output=uncond,
                                       guidance_scale=GUIDANCE_SCALE)
        got_history = history.clone()
        got = ops.multistep_step(x, cond, got_history, step, table, seed=SEED, sample_offset=SAMPLE_OFFSET,
                                 clip_denoised=clip, stochastic=stochastic, uncond_output=uncond,
                                 guidance_scale=GUIDANCE_SCALE, threshold=bounds, backend=backend)
        noise = reference.batch_noise(SEED, SAMPLE_OFFSET, i, shape, device) if stochastic else None
        x = reference.multistep_step(x, cond, history, step, table, clip, noise, uncond_output=uncond,
                                     guidance_scale=GUIDANCE_SCALE, threshold=bounds)
        assert_close(got, x, **tol, msg=f"{backend} thresholded x_next at step {i}")
        assert_close(got_history, history, **tol, msg=f"{backend} thresholded history at step {i}")


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES, ids=target_id)
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("backend", FAST)
def test_thresholded_matches_reference(backend, solver, shape, dtype, guided):
    need(backend, "multistep_step", "cpu", dtype)
    for clip in (True, False):
        _check_thresholded_steps(backend, _table(solver), shape, dtype, clip, _plan(solver).stochastic, guided, FP32)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("solver", ["dpm++2m", "unipc"])
def test_reference_thresholded_update_is_diffusers_threshold_then_the_update(solver, guided):
    """The reference's thresholded update is diffusers' _threshold_sample on D = a x + b out, then the
    unthresholded update with that D (a table whose a, b are 0, 1, fed the thresholded D)."""
    diffusers = pytest.importorskip("diffusers")
    table = _table(solver)
    shape = (3, 5, 7, 9)
    x = torch.randn(shape) * 3
    (cond, uncond), = _guided_outputs(shape, torch.float32, 1)
    uncond = uncond if guided else None
    history = torch.randn((SLOTS, *shape))
    want_history = history.clone()
    step = torch.tensor(3)
    bounds = ops.dynamic_threshold(x, cond, step, table, ratio=RATIO, max_value=MAX_VALUE, uncond_output=uncond,
                                   guidance_scale=GUIDANCE_SCALE)
    got = reference.multistep_step(x, cond, history, step, table, True, None, uncond_output=uncond,
                                   guidance_scale=GUIDANCE_SCALE, threshold=bounds)
    a, b = table[3, 0], table[3, 1]
    d = a * x + b * reference.guided_output(cond, uncond, GUIDANCE_SCALE)
    scheduler = diffusers.DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=RATIO,
                                                      sample_max_value=MAX_VALUE)
    peer = scheduler._threshold_sample(d.clone())
    as_x0 = table.clone()
    as_x0[:, 0], as_x0[:, 1] = 0.0, 1.0
    want = reference.multistep_step(x, peer, want_history, step, as_x0, False, None)
    assert_close(got, want, **FP32)
    assert_close(history, want_history, **FP32)
    assert bool((bounds > 1).any())


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_threshold_one_is_the_clip_and_none_is_today(backend):
    need(backend, "multistep_step", "cpu") if backend != "reference" else None
    table = _table("dpm++2m-sde")
    shape = (3, 5, 7, 9)
    (cond, _), = _guided_outputs(shape, torch.float32, 1)
    x, history = torch.randn(shape) * 3, torch.randn((SLOTS, *shape))

    def run(**kw):
        h = history.clone()
        return ops.multistep_step(x, cond, h, torch.tensor(4), table, seed=SEED, stochastic=True, backend=backend,
                                  **kw), h

    clipped, clipped_history = run(clip_denoised=True)
    for clip in (True, False):
        ones, ones_history = run(clip_denoised=clip, threshold=torch.ones(3))
        assert_close(ones, clipped, **EXACT)
        assert_close(ones_history, clipped_history, **EXACT)
        none, none_history = run(clip_denoised=clip, threshold=None)
        plain, plain_history = run(clip_denoised=clip)
        assert_close(none, plain, **EXACT)
        assert_close(none_history, plain_history, **EXACT)
    assert not torch.equal(run(threshold=torch.full((3,), 2.0))[0], clipped)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_dispatch_rejects_bad_threshold(backend):
    if backend != "reference" and ops.load_error(backend) is not None:
        pytest.skip(f"{backend} not loaded")
    shape = (2, 3, 4, 4)
    x, out, history = torch.randn(shape), torch.randn(shape), torch.zeros((SLOTS, *shape))
    for bad, error, match in [(torch.ones(2, dtype=torch.float64), TypeError, "threshold must have dtype"),
                              (torch.ones(3), ValueError, r"threshold must have shape \(2,\)"),
                              (torch.ones(2, device="meta"), ValueError, "threshold must be on cpu")]:
        with pytest.raises(error, match=match):
            ops.multistep_step(x, out, history, torch.tensor(2), _table("dpm++2m"), threshold=bad, backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_ops_reject_bad_threshold_naming_it(backend):
    op = _inplace_op(backend)
    x, out, history, step, table, rng = _op_args()
    error = RuntimeError if backend == "cpp" else ValueError
    for bad in (torch.ones(2, dtype=torch.float64), torch.ones(3), torch.ones(2, 1)):
        x_buf, h_buf = x.clone(), history.clone()
        with pytest.raises(error, match="threshold must"):
            op(x_buf, out, h_buf, step, table, rng, True, True, None, None, 1.0, bad)
        assert torch.equal(x_buf, x) and torch.equal(h_buf, history)


@pytest.mark.parametrize("backend", FAST)
def test_thresholded_opcheck(backend):
    op = _inplace_op(backend)
    bounds = torch.tensor([1.0, 2.5])
    for dtype, clip, stochastic, w in [(torch.float32, True, True, 7.5), (torch.float16, False, False, -0.5)]:
        x, out, history, step, table, rng = _op_args(dtype=dtype)
        both = torch.cat([out, out.flip(0)])
        torch.library.opcheck(op, (x, both[:2], history, step, table, rng, clip, stochastic, None, None, 1.0, bounds))
        torch.library.opcheck(op, (x, both[:2], history, step, table, rng, clip, stochastic, None, both[2:], w,
                                   bounds))


@pytest.mark.gpu
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=target_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 3, 64, 64)], ids=target_id)
@pytest.mark.parametrize("solver", ["dpm++3m", "dpm++2m-sde", "unipc"])
@pytest.mark.parametrize("backend", FAST)
def test_cuda_thresholded_matches_reference(backend, solver, shape, dtype, guided):
    need(backend, "multistep_step", "cuda", dtype)
    tol = FMA_FP32 if dtype == torch.float32 else BY_DTYPE[dtype]
    _check_thresholded_steps(backend, _table(solver, "cuda"), shape, dtype, True, _plan(solver).stochastic, guided,
                             tol, device="cuda")
