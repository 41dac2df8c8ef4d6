"""fastddpm.engine: the plan, the eager engine against fastddpm.sample, the cache,
micro-batching and bad overrides on CPU; CUDA graphs on a GPU (``gpu`` marker)."""
import dataclasses

import pytest
import torch

import fastddpm
from fastddpm import DDPM, ops
from fastddpm.engine import (EngineCache, SamplerEngine, cached_engines, clear_engine_cache, engine_sample,
                             last_plan, make_plan)
from backends import need
from toy_models import Pointwise
from tolerances import BY_DTYPE, EXACT, FP32, PEER, assert_close

pytestmark = pytest.mark.ops

HAS_CUDA = torch.cuda.is_available()


def eager_sample(*args, **kwargs):
    """``fastddpm.sample``'s eager loop, the reference the engine is held to (on a CPU
    ``fastddpm.sample`` itself runs the engine by default)."""
    return fastddpm.sample(*args, engine=False, **kwargs)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_engine_cache()
    yield
    clear_engine_cache()


class GaussianDenoiser(torch.nn.Module):
    """The exact epsilon-predictor for data ~ N(mean, std^2) per pixel: a "trained"
    model whose samples have known statistics."""

    def __init__(self, mean=0.2, std=0.3, channels=3, image_size=8):
        super().__init__()
        self.mean, self.std, self.in_channels, self.image_size = mean, std, channels, image_size
        self.register_buffer("alphas_cumprod",
                             torch.as_tensor(DDPM().schedule.alphas_cumprod64, dtype=torch.float32))

    def forward(self, x, t):
        abar = self.alphas_cumprod.gather(0, t).reshape(-1, 1, 1, 1)
        # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: E[eps | x_t] for Gaussian x0
        var = abar * self.std ** 2 + 1 - abar
        return ((x.float() - abar.sqrt() * self.mean) * (1 - abar).sqrt() / var).to(x.dtype)


def _tiny_unet():
    torch.manual_seed(0)
    return fastddpm.create_model("tiny").eval()


def _diffusers_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


# -- the plan ----------------------------------------------------------------------------
def test_plan_on_cpu_is_eager_and_says_why():
    plan = make_plan(Pointwise(), 4, (2, 6, 6), "cpu")
    assert (plan.cuda_graph, plan.compile, plan.dtype, plan.channels_last, plan.steps_per_graph, plan.micro_batch) \
        == (False, None, torch.float32, False, 1, 4)
    assert plan.backend == ops.select_backend("ddpm_step", torch.device("cpu"), torch.float32)
    text = plan.explain()
    for choice in ("cuda_graph=False", "compile=None", "dtype=torch.float32", "channels_last=False",
                   f"backend={plan.backend!r}", "micro_batch=4"):
        assert choice in text, text
    with ops.use_backend("reference"):
        assert make_plan(Pointwise(), 4, (2, 6, 6), "cpu").backend == "reference"


def test_plan_overrides_are_kept():
    plan = make_plan(Pointwise(), 10, (2, 6, 6), "cpu", dtype=torch.bfloat16, backend="reference", compile=True,
                     micro_batch=3, cuda_graph=False, channels_last=True)
    assert (plan.dtype, plan.backend, plan.compile, plan.micro_batch, plan.cuda_graph, plan.channels_last) == \
        (torch.bfloat16, "reference", "default", 3, False, True)
    assert all("requested" in r for r in plan.reasons if r.split("=")[0] in
               ("dtype", "backend", "compile", "micro_batch", "cuda_graph", "channels_last"))
    assert make_plan(Pointwise(), 2, (2, 6, 6), "cpu", compile="max-autotune-no-cudagraphs").compile == \
        "max-autotune-no-cudagraphs"
    assert make_plan(Pointwise(), 2, (2, 6, 6), "cpu", micro_batch=50).micro_batch == 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs a CUDA device"),
    (dict(cuda_graph="yes"), TypeError, "cuda_graph must be"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(dtype=torch.int32), TypeError, "dtype must be float32, float16 or bfloat16"),
    (dict(dtype=torch.float64), TypeError, "dtype must be float32, float16 or bfloat16"),
    (dict(compile="fastest"), ValueError, "compile must be"),
    (dict(micro_batch=0), ValueError, "micro_batch must be a positive int"),
    (dict(steps_per_graph=4), ValueError, "steps_per_graph needs cuda_graph=True"),
    (dict(steps_per_graph=0), ValueError, "steps_per_graph must be a positive int"),
    (dict(channels_last="no"), TypeError, "channels_last must be"),
])
def test_bad_overrides(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_plan(Pointwise(), 2, (2, 6, 6), "cpu", **kwargs)
    with pytest.raises(error, match=match):
        engine_sample(Pointwise(), 2, steps=2, progress=False, **kwargs)


def test_bad_plan_inputs():
    with pytest.raises(ValueError, match="channels_last=True needs"):
        make_plan(lambda x, t: x, 2, (12,), "cpu", channels_last=True)
    with pytest.raises(ValueError, match="n must be a positive int"):
        make_plan(Pointwise(), 0, (2, 6, 6), "cpu")
    with pytest.raises(ValueError, match="disagree"):
        engine_sample(Pointwise(), 4, steps=2, progress=False, batch_size=2, micro_batch=3)
    with pytest.raises(ValueError, match="does not shard"):
        engine_sample(Pointwise(), 4, steps=2, progress=False, distributed=True)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_plan(Pointwise(), 2, (2, 6, 6), "cuda")


# -- the eager engine is fastddpm.sample ------------------------------------------------------
@pytest.mark.parametrize("steps, options", [
    (None, {}),
    (25, {"prediction": "v", "variance": "fixed_large", "clip_denoised": False}),
    (25, {"sampler": "ddim", "eta": 0.5, "schedule": "cosine"}),
])
def test_pointwise_equals_sample_exactly_on_reference(steps, options):
    model = Pointwise()
    with ops.use_backend("reference"):
        expected = eager_sample(model, 3, steps=steps, seed=11, progress=False, **options)
        got = engine_sample(model, 3, steps=steps, seed=11, progress=False, **options)
    assert_close(got, expected, **EXACT)
    assert last_plan().backend == "reference" and not last_plan().cuda_graph


@pytest.mark.parametrize("make_model, steps", [(_tiny_unet, 4), (_diffusers_unet, 4)], ids=["tiny_unet", "diffusers"])
def test_unets_equal_sample_exactly_on_reference(make_model, steps, one_thread):
    model = make_model()
    with ops.use_backend("reference"):
        expected = eager_sample(model, 2, steps=steps, seed=5, progress=False)
        got = engine_sample(model, 2, steps=steps, seed=5, progress=False)
    assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("model_factory", [Pointwise, _tiny_unet], ids=["pointwise", "tiny_unet"])
def test_automatic_backend_within_fp32(model_factory, one_thread):
    model = model_factory()
    expected = eager_sample(model, 3, steps=10, seed=2, progress=False)
    x, plan = engine_sample(model, 3, steps=10, seed=2, progress=False, return_plan=True)
    assert plan is last_plan()
    assert_close(x, expected, **FP32)


def test_shards_callback_and_bf16_inputs():
    model = Pointwise()
    full = engine_sample(model, 5, steps=8, seed=3, progress=False)
    assert_close(engine_sample(model, 2, steps=8, seed=3, progress=False, sample_offset=3), full[3:], **EXACT)
    frames, ref_frames = [], []
    x = engine_sample(model, 2, steps=8, seed=3, progress=False,
                      callback=lambda i, t, x: frames.append((i, t, x)))
    eager_sample(model, 2, steps=8, seed=3, progress=False, callback=lambda i, t, x: ref_frames.append((i, t, x)))
    assert [f[:2] for f in frames] == [f[:2] for f in ref_frames]
    assert torch.equal(frames[-1][2], x)
    frames[-1][2].add_(1)  # a copy: the engine's buffer is not handed out
    assert not torch.equal(frames[-1][2], x)
    for (_, _, a), (_, _, b) in zip(frames[:-1], ref_frames[:-1]):
        assert_close(a, b, **FP32)
    bf16 = engine_sample(model, 2, steps=8, seed=3, progress=False, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and last_plan().dtype == torch.bfloat16
    # the model reads the engine's bfloat16 copy of x, every update is float32: the same images as the
    # eager float32 loop on a model that rounds its input to bfloat16 (one dtype compared: FP32, as above)
    rounded = eager_sample(lambda x, t: model(x.to(torch.bfloat16), t), 2, steps=8, seed=3, progress=False,
                           image_size=6, channels=2)
    assert_close(bf16, rounded, **FP32)
    assert not torch.equal(bf16, full[:2])  # the dtype was used


@pytest.mark.parametrize("sampler, op", [("ddpm", "ddpm_step"), ("dpm++3m", "multistep_step"),
                                         ("dpm++2m-sde", "multistep_step")])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_step_writes_x_and_the_channels_last_model_input(backend, sampler, op):
    """The in-place op of each fast backend (the Triton one interpreted on CPU), ddpm_step_ or
    multistep_step_, writes the float16 channels_last model input itself (the engine runs no copy
    after it): the engine's result against the reference backend's, and the model input is x cast."""
    need(backend, op, "cpu", torch.float16)
    model = Pointwise()
    kw = dict(steps=6, seed=8, progress=False, sampler=sampler, dtype=torch.float16, channels_last=True)
    ref = engine_sample(model, 3, backend="reference", **kw)
    got = engine_sample(model, 3, backend=backend, **kw)
    assert_close(got, ref, **BY_DTYPE[torch.float16])
    engine = cached_engines()[-1]
    assert engine.plan.backend == backend and engine.model_input.dtype == torch.float16
    assert engine.model_input.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(engine.model_input, engine.x.to(torch.float16))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_engine_equals_sample_exactly_for_every_key(backend):
    """The fused step reads the noise key from the engine's rng buffer, which each run
    rewrites: one engine, several (seed, sample_offset), each bit for bit
    fastddpm.sample on the same backend (which passes the key as ints)."""
    need(backend, "ddpm_step", "cpu")
    model = Pointwise()
    process = DDPM().respace(5)
    engine = SamplerEngine(model, process, (3, 2, 6, 6), make_plan(model, 3, (2, 6, 6), "cpu", backend=backend))
    results = []
    for seed, sample_offset in [(11, 0), (2**40 + 5, 7), (11, 0)]:
        with ops.use_backend(backend):
            expected = eager_sample(model, 3, process=process, seed=seed, sample_offset=sample_offset,
                                       progress=False)
        results.append(engine.run(seed, sample_offset))
        assert_close(results[-1], expected, **EXACT, msg=f"seed {seed}, sample_offset {sample_offset}")
        assert engine.rng.tolist() == [seed, sample_offset]
    assert not torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# -- the multistep solvers in the engine ---------------------------------------------------------
@pytest.mark.parametrize("solver", ["dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_multistep_engine_equals_sample(backend, solver):
    """Each solver through the engine (device step counter, static history ring, the fused
    in-place update) is bit for bit fastddpm.sample's eager loop on the same backend, for two keys
    in a row on one engine (the ring is reset between runs)."""
    need(backend, "multistep_step", "cpu")
    model = Pointwise()
    kw = dict(steps=7, progress=False, sampler=solver, clip_denoised=True)
    for seed, sample_offset in [(11, 0), (2**40 + 5, 4)]:
        with ops.use_backend(backend):
            expected = fastddpm.sample(model, 3, seed=seed, sample_offset=sample_offset, **kw)
        got, plan = engine_sample(model, 3, seed=seed, sample_offset=sample_offset, backend=backend,
                                  return_plan=True, **kw)
        assert_close(got, expected, **EXACT, msg=f"{backend} {solver} seed {seed}")
    (engine,) = cached_engines()
    assert engine.runs == 2 and engine.num_steps == 7 and engine.coefs.shape == (7, 14)
    assert engine.history.shape == (4, 3, 2, 6, 6) and engine.step.item() == -1


def test_multistep_engine_steps_callback_and_model_input():
    """steps is the solver's model calls (default 20; another count is another engine), the callback
    sees the solver's timesteps, and a low-precision model input follows x."""
    model = Pointwise()
    kw = dict(progress=False, sampler="unipc", seed=2)
    _, plan = engine_sample(model, 2, return_plan=True, **kw)
    assert cached_engines()[-1].num_steps == 20
    assert "automatic choice for multistep_step" in plan.explain(), plan.explain()
    engine_sample(model, 2, steps=5, **kw)
    assert [e.num_steps for e in cached_engines()] == [20, 5]
    frames, ref_frames = [], []
    engine_sample(model, 2, steps=5, callback=lambda i, t, x: frames.append((i, t)), **kw)
    fastddpm.sample(model, 2, steps=5, callback=lambda i, t, x: ref_frames.append((i, t)), **kw)
    assert frames == ref_frames and [f[0] for f in frames] == [4, 3, 2, 1, 0]
    half = engine_sample(model, 2, steps=5, dtype=torch.float16, channels_last=True, **kw)
    engine = cached_engines()[-1]
    assert torch.equal(engine.model_input, engine.x.to(torch.float16))
    assert_close(half, fastddpm.sample(model, 2, steps=5, dtype=torch.float16, **kw), **BY_DTYPE[torch.float16])


def test_multistep_engine_shards_like_sample():
    model = Pointwise()
    kw = dict(steps=6, seed=3, progress=False, sampler="dpm++2m-sde")
    full = engine_sample(model, 5, **kw)
    assert_close(engine_sample(model, 2, sample_offset=3, **kw), full[3:], **EXACT)
    assert_close(engine_sample(model, 5, micro_batch=2, **kw), full, **EXACT)


def test_micro_batches_equal_one_batch():
    model = Pointwise()
    one = engine_sample(model, 5, steps=6, seed=9, progress=False)
    split = engine_sample(model, 5, steps=6, seed=9, progress=False, micro_batch=2)
    assert last_plan().micro_batch == 2
    assert_close(split, one, **EXACT)
    assert_close(engine_sample(model, 5, steps=6, seed=9, progress=False, batch_size=2), one, **EXACT)
    # batches of 2, 2 and 1: two engines, the batch-of-2 one ran twice
    shapes = sorted(e.shape[0] for e in cached_engines())
    assert shapes == [1, 2, 5]


def test_a_trained_like_model_samples_its_data_distribution():
    x = engine_sample(GaussianDenoiser(), 256, seed=1, progress=False)  # all 1000 steps: few steps of
    # fixed_small variance under-disperse
    assert abs(x.mean().item() - 0.2) < 0.02 and abs(x.std().item() - 0.3) < 0.03


# -- the cache ----------------------------------------------------------------------------------
def test_second_call_reuses_the_engine():
    model = Pointwise()
    first = engine_sample(model, 3, steps=5, seed=0, progress=False)
    (engine,) = cached_engines()
    second = engine_sample(model, 3, steps=5, seed=0, progress=False)
    assert cached_engines() == [engine] and engine.runs == 2
    assert torch.equal(first, second)
    other_seed = engine_sample(model, 3, steps=5, seed=1, progress=False)
    assert cached_engines() == [engine] and not torch.equal(other_seed, first)


@pytest.mark.parametrize("change", [dict(n=4), dict(steps=6), dict(dtype=torch.bfloat16), dict(backend="reference"),
                                    dict(prediction="v")])
def test_cache_misses_when_the_engine_would_differ(change):
    model = Pointwise()
    kwargs = dict(n=3, steps=5, seed=0, progress=False)
    engine_sample(model, **kwargs)
    (engine,) = cached_engines()
    engine_sample(model, **{**kwargs, **change})
    assert len(cached_engines()) == 2 and cached_engines()[0] is engine


def test_cache_misses_when_the_weights_move():
    model = Pointwise()
    engine_sample(model, 2, steps=3, progress=False)
    model.w = torch.nn.Parameter(torch.tensor(0.5))
    engine_sample(model, 2, steps=3, progress=False)
    assert len(cached_engines()) == 2


def test_an_engine_cache_holds_its_own_engines_plan_and_time():
    """The run state lives in an ``EngineCache``: one given to ``engine_sample`` gets the engines, the
    plan and the time, the default one (``cached_engines``, ``last_plan``) is left alone, and it drops
    its least recently used engine beyond ``max_engines``."""
    model = Pointwise()
    expected = engine_sample(model, 2, steps=4, seed=1, progress=False)
    (default_engine,), default_plan = cached_engines(), last_plan()
    mine = EngineCache(max_engines=2)
    x, plan = engine_sample(model, 2, steps=4, seed=1, progress=False, cache=mine, return_plan=True)
    assert torch.equal(x, expected)
    assert mine.last_plan is plan and plan is not default_plan and mine.last_seconds > 0
    (first,) = mine.engines()
    assert first is not default_engine and first.runs == 1
    assert cached_engines() == [default_engine] and last_plan() is default_plan
    engine_sample(model, 3, steps=4, progress=False, cache=mine)
    engine_sample(model, 2, steps=4, progress=False, cache=mine)  # a hit: first becomes the most recent
    engine_sample(model, 4, steps=4, progress=False, cache=mine)  # a third engine: the n=3 one goes
    assert len(mine.engines()) == 2 and mine.engines()[0] is first and first.runs == 2
    mine.clear()
    assert mine.engines() == [] and cached_engines() == [default_engine]


def test_engine_directly():
    process = DDPM().respace(4)
    model = Pointwise()
    plan = make_plan(model, 2, (2, 6, 6), "cpu", backend="reference")
    engine = SamplerEngine(model, process, (2, 2, 6, 6), plan)
    with ops.use_backend("reference"):
        expected = eager_sample(model, 2, process=process, seed=7, sample_offset=4, progress=False)
    assert_close(engine.run(7, 4), expected, **EXACT)
    assert engine.step.ndim == 0 and engine.step.dtype == torch.int64 and engine.step.item() == -1
    with pytest.raises(ValueError, match="sample_offset must be"):
        engine.run(7, -1)
    with pytest.raises(TypeError, match="callback must be callable"):
        engine.run(7, 0, callback=3)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        SamplerEngine(model, process, (2, 2, 6, 6), dataclasses.replace(plan, cuda_graph=True))


def test_compiled_model_is_compiled_once(one_thread):
    from torch._dynamo.utils import counters

    model = Pointwise()
    expected = eager_sample(model, 3, steps=5, seed=1, progress=False)
    assert_close(engine_sample(model, 3, steps=5, seed=1, progress=False, compile=True), expected, **FP32)
    assert last_plan().compile == "default"
    compiled = counters["frames"]["ok"]
    assert compiled >= 1
    assert_close(engine_sample(model, 3, steps=5, seed=1, progress=False, compile=True), expected, **FP32)
    assert counters["frames"]["ok"] == compiled and len(cached_engines()) == 1


# -- CUDA graphs ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager(dtype):
    model = _tiny_unet().cuda()
    kw = dict(steps=20, seed=4, progress=False, dtype=dtype)
    eager = engine_sample(model, 4, cuda_graph=False, **kw)
    graph, plan = engine_sample(model, 4, cuda_graph=True, return_plan=True, **kw)
    assert plan.cuda_graph and plan.channels_last == (dtype != torch.float32)
    tol = PEER if dtype == torch.float32 else BY_DTYPE[dtype]
    assert_close(graph, eager, **tol)


def _run_without_host_sync(engine):
    """``engine.run(0, 0)`` with CUDA's sync debug mode set to raise on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return engine.run(0, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("steps_per_graph", [1, 3])
def test_graph_loop_does_not_synchronise_or_recapture(steps_per_graph):
    model = _tiny_unet().cuda()
    kw = dict(steps=10, seed=0, progress=False, steps_per_graph=steps_per_graph)
    first = engine_sample(model, 4, **kw)
    (engine,) = cached_engines()
    captures = engine.captures
    assert captures == (1 if steps_per_graph == 1 else 2)  # 10 = 3 * 3 + 1
    again = _run_without_host_sync(engine)
    assert engine.captures == captures
    second = engine_sample(model, 4, **kw)
    assert cached_engines() == [engine] and engine.captures == captures
    assert torch.equal(again, first) and torch.equal(second, first)
    eager = engine_sample(model, 4, cuda_graph=False, **{k: v for k, v in kw.items() if k != "steps_per_graph"})
    assert_close(first, eager, **BY_DTYPE[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("steps_per_graph", [1, 3])
def test_graphs_are_captured_once_for_every_seed(steps_per_graph):
    """The fused step reads (seed, sample_offset) from the engine's rng buffer, so a call
    with another seed or micro-batch offset replays the graphs captured by the first:
    ``captures`` stays put, and every result equals the eager engine's."""
    model = _tiny_unet().cuda()
    kw = dict(steps=10, progress=False, steps_per_graph=steps_per_graph)
    first = engine_sample(model, 4, seed=4, **kw)
    (engine,) = cached_engines()
    assert engine.plan.cuda_graph and engine.plan.backend != "reference"
    captures = engine.captures
    results = {(4, 0): first}
    for seed, sample_offset in [(2**40 + 1, 0), (4, 6), (4, 0)]:
        results[seed, sample_offset] = engine_sample(model, 4, seed=seed, sample_offset=sample_offset, **kw)
        assert cached_engines() == [engine] and engine.captures == captures
    assert torch.equal(results[4, 0], first)
    assert not torch.equal(results[2**40 + 1, 0], first) and not torch.equal(results[4, 6], first)
    eager_kw = {k: v for k, v in kw.items() if k != "steps_per_graph"}
    for (seed, sample_offset), graph in results.items():
        eager = engine_sample(model, 4, seed=seed, sample_offset=sample_offset, cuda_graph=False, **eager_kw)
        assert_close(graph, eager, **BY_DTYPE[torch.bfloat16], msg=f"seed {seed}, sample_offset {sample_offset}")


@pytest.mark.gpu
def test_reference_step_graphs_are_recaptured_for_a_new_seed():
    """The reference step takes the key as Python ints, which a graph bakes in."""
    model = Pointwise().cuda()
    kw = dict(steps=5, progress=False, backend="reference", dtype=torch.float32)
    first = engine_sample(model, 3, seed=1, **kw)
    (engine,) = cached_engines()
    assert engine.plan.cuda_graph and engine.captures == 1
    assert torch.equal(engine_sample(model, 3, seed=1, **kw), first) and engine.captures == 1
    other = engine_sample(model, 3, seed=2, **kw)
    assert engine.captures == 2
    with ops.use_backend("reference"):
        expected = eager_sample(model, 3, steps=5, seed=2, progress=False)
    assert_close(other, expected, **PEER)


@pytest.mark.gpu
def test_graph_matches_the_reference_sampler_in_fp32():
    model = Pointwise().cuda()
    expected = eager_sample(model, 3, steps=25, seed=11, progress=False)
    got = engine_sample(model, 3, steps=25, seed=11, progress=False, dtype=torch.float32)
    assert last_plan().cuda_graph
    assert_close(got, expected, **PEER)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["dpm++2m", "dpm++2m-sde", "unipc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multistep_graph_replay_equals_eager(solver, dtype):
    """A multistep solver's loop captured as CUDA graphs (model call + fused update, the step
    counter and the history ring on the device) equals the eager engine and fastddpm.sample."""
    model = _tiny_unet().cuda()
    kw = dict(steps=8, seed=4, progress=False, dtype=dtype, sampler=solver)
    eager = engine_sample(model, 4, cuda_graph=False, **kw)
    graph, plan = engine_sample(model, 4, cuda_graph=True, return_plan=True, **kw)
    engine = cached_engines()[-1]
    assert plan.cuda_graph and plan.backend != "reference" and engine.captures == 1
    tol = PEER if dtype == torch.float32 else BY_DTYPE[dtype]
    assert_close(graph, eager, **tol)
    again = engine_sample(model, 4, cuda_graph=True, **kw)  # replayed, not recaptured; the ring was reset
    assert engine.captures == 1 and torch.equal(again, graph)
    if dtype == torch.float32:
        assert_close(graph, fastddpm.sample(model, 4, **kw), **PEER)


@pytest.mark.gpu
def test_multistep_graph_loop_does_not_synchronise():
    model = _tiny_unet().cuda()
    first = engine_sample(model, 4, steps=6, seed=0, progress=False, sampler="dpm++2m-sde", steps_per_graph=3)
    (engine,) = cached_engines()
    again = _run_without_host_sync(engine)
    assert torch.equal(again, first) and engine.captures == 1


@pytest.mark.gpu
def test_bf16_and_fp32_sample_the_same_distribution():
    model = GaussianDenoiser().cuda()  # buffers only: the device must be given
    kw = dict(seed=1, progress=False, device="cuda")
    fp32 = engine_sample(model, 512, dtype=torch.float32, **kw)
    bf16 = engine_sample(model, 512, dtype=torch.bfloat16, **kw)
    for x in (fp32, bf16):
        assert abs(x.mean().item() - 0.2) < 0.02 and abs(x.std().item() - 0.3) < 0.03
    assert abs(fp32.mean().item() - bf16.mean().item()) < 0.01
    assert abs(fp32.std().item() - bf16.std().item()) < 0.01
