"""Image-to-image (SDEdit) and sampling that begins part-way (``DiffusionConfig.begin_index``).

The peer is diffusers' img2img loop: ``set_timesteps(N)``, ``set_begin_index(t_start)`` (what its
img2img pipelines call; every scheduler here has ``order == 1``), ``add_noise`` at the start timestep,
then ``step`` over ``timesteps[t_start:]``.  Both sides get the same model, the same start noise
(the contract's slot K' that img2img draws) and the same step noises (slot i of step i), and x is
compared after every step.
"""
import math

import pytest
import torch

import fastddpm
from fastddpm import DDPM, multistep, ops
from fastddpm.img2img import img2img, start_step
from fastddpm.multistep import MultistepSampler, make_plan
from fastddpm.ops.reference import batch_noise
from fastddpm.schedule import NoiseSchedule
from tolerances import EXACT, PEER, PEER64, PEER_KARRAS32, assert_close
from toy_models import LabelledPointwise, Pointwise

T = 100
SHAPE = (3, 2, 6, 6)  # Pointwise's images


def _image(n=SHAPE[0], seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE[1:]), generator=g) * 2 - 1


def _scheduler(sampler):
    """A diffusers scheduler of T steps and the fastddpm process made from it (``from_diffusers``)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if sampler == "ddpm":
        sched = DDPMScheduler(num_train_timesteps=T, timestep_spacing="leading")
    elif sampler == "ddim":
        sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", clip_sample=False)
    elif sampler == "unipc":
        sched = UniPCMultistepScheduler(num_train_timesteps=T)
    else:
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=T, solver_order=3 if sampler == "dpm++3m" else 2,
            algorithm_type="sde-dpmsolver++" if sampler == "dpm++2m-sde" else "dpmsolver++")
    return sched, DDPM.from_diffusers(sched, **({"eta": 1.0} if sampler == "ddim" else {}))


def _diffusers_img2img(sched, sampler, model, image, strength, N, seed, monkeypatch):
    """diffusers' img2img loop fed the contract's noises; x after each step, in running order."""
    from diffusers.schedulers import scheduling_ddpm

    sched.set_timesteps(N)
    t_start = start_step(N, strength)
    if hasattr(sched, "set_begin_index"):  # as the pipelines: DDPM's and DDIM's steps read only t
        sched.set_begin_index(t_start * sched.order)
    timesteps = sched.timesteps[t_start * sched.order:]
    K = len(timesteps)
    n = image.shape[0]
    x = sched.add_noise(image, batch_noise(seed, 0, K, image.shape, "cpu"), timesteps[:1].repeat(n))
    xs = []
    for j, t in enumerate(timesteps.tolist()):
        z = batch_noise(seed, 0, K - 1 - j, image.shape, "cpu")  # step index K-1-j's slot
        out = model(x, torch.full((n,), t, dtype=torch.int64))
        if sampler == "ddpm":
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z)
            x = sched.step(out, t, x).prev_sample
        elif sampler == "ddim":
            x = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        elif sampler == "dpm++2m-sde":
            x = sched.step(out, t, x, variance_noise=z).prev_sample
        else:
            x = sched.step(out, t, x).prev_sample
        xs.append(x)
    return xs


# -- img2img against diffusers' loop ----------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"])
@pytest.mark.parametrize("strength, N", [(0.6, 10), (0.35, 20), (0.95, 20)])
def test_img2img_equals_the_diffusers_loop_step_for_step(sampler, strength, N, monkeypatch):
    model, image = Pointwise(), _image()
    sched, process = _scheduler(sampler)
    steps = []
    ours = img2img(model, image, strength=strength, steps=N, seed=7, process=process, progress=False,
                   callback=lambda i, t, x: steps.append((i, t, x.clone())))
    theirs = _diffusers_img2img(sched, sampler, model, image, strength, N, 7, monkeypatch)
    K = int(N * strength)
    assert len(steps) == len(theirs) == K
    assert [t for _, t, _ in steps] == sched.timesteps[N - K:].tolist()
    assert [i for i, _, _ in steps] == list(reversed(range(K)))  # the whole chain's step indices
    for j, ((_, t, x), want) in enumerate(zip(steps, theirs)):
        assert_close(x, want, **PEER, msg=f"{sampler} strength={strength} running step {j} (t={t})")
    assert torch.equal(ours, steps[-1][2])


def test_img2img_of_the_whole_unrespaced_chain_equals_diffusers(monkeypatch):
    """steps=None: DDPM over all T=50 timesteps (no respacing), begun at 50 - int(50 * 0.5) = 25."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=50)
    model, image = Pointwise(), _image()
    process = DDPM.from_diffusers(sched)
    xs = []
    img2img(model, image, strength=0.5, process=process, seed=2, progress=False,
            callback=lambda i, t, x: xs.append(x.clone()))
    theirs = _diffusers_img2img(sched, "ddpm", model, image, 0.5, 50, 2, monkeypatch)
    assert len(xs) == 25
    for j, (x, want) in enumerate(zip(xs, theirs)):
        assert_close(x, want, **PEER, msg=f"running step {j}")


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc"])
def test_img2img_on_karras_sigmas_noises_with_the_plans_start_sigma(sampler, monkeypatch):
    """On Karras sigmas the start sigma is not a timestep's: the image is noised with it, as
    diffusers' add_noise reads scheduler.sigmas[begin_index]."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cls = UniPCMultistepScheduler if sampler == "unipc" else DPMSolverMultistepScheduler
    sched = cls(num_train_timesteps=T, use_karras_sigmas=True)
    process = DDPM.from_diffusers(sched)
    # diffusers' float32 cumprod drifts from ours, which Karras' sigma_max carries into every sigma
    sched.alphas_cumprod = torch.as_tensor(process.schedule.alphas_cumprod64).float()
    model, image = Pointwise(), _image()
    xs = []
    img2img(model, image, strength=0.7, steps=10, seed=8, process=process, progress=False,
            callback=lambda i, t, x: xs.append(x.clone()))
    theirs = _diffusers_img2img(sched, sampler, model, image, 0.7, 10, 8, monkeypatch)
    assert len(xs) == len(theirs) == 7
    for j, (x, want) in enumerate(zip(xs, theirs)):
        assert_close(x, want, **PEER_KARRAS32, msg=f"{sampler} running step {j}")


# -- the begun multistep plan against diffusers' set_begin_index --------------------------------
@pytest.mark.parametrize("solver", multistep.SOLVERS)
@pytest.mark.parametrize("steps, begin", [(7, 1), (7, 4), (7, 6), (16, 3), (16, 13)])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
def test_begun_plan_equals_diffusers_after_set_begin_index(solver, steps, begin, karras, monkeypatch):
    """The plan from step ``begin`` on, stepped by MultistepSampler, equals diffusers' scheduler after
    ``set_begin_index(begin)`` on the same inputs, at float64 (diffusers made to compute in float64 on
    our schedule, as test_multistep does): warm-up orders, empty history, corrector, final orders."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    from test_multistep import _as_float64

    schedule = NoiseSchedule.make("linear", T)
    kw = dict(num_train_timesteps=T, use_karras_sigmas=karras)
    if solver == "unipc":
        sched = UniPCMultistepScheduler(**kw)
    else:
        sched = DPMSolverMultistepScheduler(**kw, solver_order=3 if solver == "dpm++3m" else 2,
                                            algorithm_type="sde-dpmsolver++" if solver.endswith("sde") else "dpmsolver++")
    _as_float64(sched, schedule, monkeypatch)
    sched.set_timesteps(steps)
    sched.set_begin_index(begin)
    plan = make_plan(schedule, solver, steps, karras_sigmas=karras, begin_index=begin)
    assert plan.num_steps == steps - begin and plan.begin_index == begin
    assert plan.timesteps[::-1].tolist() == sched.timesteps[begin:].tolist()
    assert_close(torch.as_tensor(plan.sigmas[::-1].copy()), sched.sigmas[begin:-1], **PEER64)

    g = torch.Generator().manual_seed(steps * 10 + begin)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ours = MultistepSampler(plan, x)
    for j, t in enumerate(sched.timesteps[begin:].tolist()):
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        kw = {"variance_noise": z} if solver.endswith("sde") else {}
        theirs = sched.step(out, t, x, **kw).prev_sample
        mine = ours.step(out, x, noise=z if solver.endswith("sde") else None)
        assert_close(mine, theirs, **PEER64, msg=f"{solver} steps={steps} begin={begin} running step {j}")
        x = theirs


def test_begun_plan_orders_warm_up_and_end_as_the_whole_plans():
    lin = NoiseSchedule.make("linear", T)
    assert multistep.solver_orders("dpm++3m", 10, 4).tolist() == [1, 2, 3, 3, 2, 1]  # K < 15: second at K-2
    assert multistep.solver_orders("dpm++3m", 16, 12).tolist() == [1, 2, 3, 1]
    assert multistep.solver_orders("unipc", 9, 7).tolist() == [1, 1]
    whole, begun = make_plan(lin, "dpm++2m", 12), make_plan(lin, "dpm++2m", 12, begin_index=5)
    assert begun.timesteps.tolist() == whole.timesteps[:7].tolist()
    first = dict(zip(multistep.TABLE_COLUMNS, begun.table[-1]))  # the first step run: no history
    assert first["p1"] == first["p2"] == 0 and first["u"] == 1 and first["cl"] == 0
    assert (begun.table[:-1] == whole.table[:6]).all()  # after the warm-up the rows are the whole plan's
    with pytest.raises(ValueError, match=r"begin_index must be an int in \[0, steps\) = \[0, 12\)"):
        make_plan(lin, "dpm++2m", 12, begin_index=12)


# -- DDPM/DDIM: the begun process is the tail of the whole chain ---------------------------------
@pytest.mark.parametrize("options", [{}, {"sampler": "ddim", "eta": 1.0}, {"variance": "fixed_large"}])
@pytest.mark.parametrize("steps", [None, 20])
def test_begun_ddpm_run_is_the_tail_of_the_whole_run(options, steps):
    model, b = Pointwise(), 8
    whole = DDPM.resolve(None, steps, {"num_timesteps": T, **options})
    begun = whole.with_options(begin_index=b)
    K = whole.num_steps
    assert begun.num_steps == K - b and begun.chain.timesteps == whole.chain.timesteps
    assert begun.schedule.timesteps == whole.schedule.timesteps[:K - b]
    assert torch.equal(begun.tables("cpu")["coefs"], whole.tables("cpu")["coefs"][:K - b])  # the same rows
    xs = {}
    kw = dict(n=3, seed=4, progress=False, engine=False)
    full = fastddpm.sample(model, process=whole, callback=lambda i, t, x: xs.setdefault(i, x.clone()), **kw)
    calls = []
    tail = fastddpm.sample(model, process=begun, noise=xs[K - b], callback=lambda i, t, x: calls.append(i), **kw)
    assert calls == list(reversed(range(K - b)))  # the same step indices, so the same noise slots
    assert_close(tail, full, **EXACT)


def test_sample_begin_index_option_respaces_first_then_begins():
    model, calls = Pointwise(), []
    fastddpm.sample(model, 1, steps=20, num_timesteps=T, begin_index=15, progress=False, engine=False,
                    callback=lambda i, t, x: calls.append(t))
    assert calls == list(DDPM(num_timesteps=T).respace(20).schedule.timesteps[:5][::-1])
    calls.clear()
    fastddpm.sample(model, 1, steps=12, sampler="dpm++2m", num_timesteps=T, begin_index=9, progress=False,
                    callback=lambda i, t, x: calls.append(t))
    assert calls == DDPM(num_timesteps=T, sampler="dpm++2m").multistep_plan(12).timesteps[:3][::-1].tolist()
    with pytest.raises(ValueError, match=r"begin_index=20 skips every step of this process's 20-step chain"):
        fastddpm.sample(model, 1, steps=20, num_timesteps=T, begin_index=20, progress=False)
    with pytest.raises(ValueError, match=r"begin_index must be an int in \[0, steps\) = \[0, 12\)"):
        fastddpm.sample(model, 1, steps=12, sampler="unipc", num_timesteps=T, begin_index=12, progress=False)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="begin_index must be an int >= 0"):
            DDPM(begin_index=bad)


def test_begin_index_round_trips_through_json_and_checkpoints(tmp_path):
    from fastddpm.cli import DEMO_MODEL

    begun = DDPM(num_timesteps=T).respace(20).with_options(begin_index=6)
    again = DDPM.from_json(begun.to_json())
    assert again.config == begun.config and again.chain.timesteps == begun.chain.timesteps
    assert again.schedule.timesteps == begun.schedule.timesteps and again.num_steps == 14
    assert torch.equal(again.tables("cpu")["coefs"], begun.tables("cpu")["coefs"])
    assert "begin_index=6" in repr(begun)
    solver = DDPM(sampler="unipc", begin_index=3)
    assert DDPM.from_dict(solver.to_dict()).multistep_plan(10).num_steps == 7
    model, process = fastddpm.load_model(DEMO_MODEL, device="cpu")
    path = fastddpm.save_model(tmp_path / "m.safetensors", model, process.respace(30).with_options(begin_index=4))
    _, loaded = fastddpm.load_model(path, device="cpu")
    assert loaded.config.begin_index == 4 and loaded.num_steps == 26
    assert loaded.schedule.timesteps == process.respace(30).schedule.timesteps[:26]


# -- the paths: engine, micro-batches, shards --------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++3m", "dpm++2m-sde", "unipc"])
def test_engine_micro_batches_and_offsets_equal_the_eager_loop(sampler):
    model, image = Pointwise(), _image(5)
    kw = dict(strength=0.7, steps=10, seed=3, sampler=sampler, num_timesteps=T, progress=False,
              **({"eta": 1.0} if sampler == "ddim" else {}))
    with ops.use_backend("reference"):
        eager = img2img(model, image, engine=False, **kw)
        assert_close(img2img(model, image, engine=True, **kw), eager, **EXACT, msg="engine")
        assert_close(img2img(model, image, engine=True, batch_size=2, **kw), eager, **EXACT, msg="engine batches")
        assert_close(img2img(model, image, engine=False, batch_size=2, **kw), eager, **EXACT, msg="batches")
        assert_close(img2img(model, image[3:], sample_offset=3, engine=False, **kw), eager[3:], **EXACT)
    assert not torch.equal(eager, img2img(model, image, **{**kw, "seed": 4}))


# -- strength 0 and 1 -----------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_strength_zero_is_the_image_and_one_is_a_plain_sample(sampler):
    model, image = Pointwise(), _image()
    kw = dict(steps=10, seed=5, sampler=sampler, num_timesteps=T, progress=False)
    same = img2img(model, image, strength=0.0, **kw)
    assert torch.equal(same, image) and same.data_ptr() != image.data_ptr()
    assert torch.equal(img2img(model, image, strength=0.09, **kw), image)  # int(10 * 0.09) = 0 steps
    assert torch.equal(img2img(model, image[0], strength=0.0, **kw), image[:1])  # [C, H, W]: n = 1
    assert_close(img2img(model, image, strength=1.0, **kw), fastddpm.sample(model, 3, **kw), **EXACT)
    low, high = (img2img(model, image, strength=s, **kw) for s in (0.3, 0.9))
    assert (low - image).abs().mean() < (high - image).abs().mean()  # the more strength, the further


# -- conditioning and guidance ----------------------------------------------------------------------
def test_class_conditional_with_guidance():
    model, image = LabelledPointwise(), _image()
    kw = dict(strength=0.5, steps=10, seed=1, sampler="dpm++2m", num_timesteps=T, progress=False,
              class_labels=[0, 1, 2], model_kwargs={"shift": torch.tensor([0.0, 0.1, -0.1])})
    guided = img2img(model, image, guidance_scale=3.0, **kw)
    assert model.calls == 5  # the 5 steps that run, one call on the doubled batch each
    assert guided.shape == image.shape and torch.isfinite(guided).all()
    assert not torch.equal(guided, img2img(model, image, **kw))
    with ops.use_backend("reference"):
        ddpm = dict(kw, sampler="ddpm", guidance_scale=2.0, guidance_batching="sequential")
        assert_close(img2img(model, image, engine=True, **ddpm), img2img(model, image, engine=False, **ddpm), **EXACT)


# -- errors, before any model call ------------------------------------------------------------------
@pytest.mark.parametrize("strength, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                             ("a", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_strength_raises_before_sampling(strength, error):
    model = LabelledPointwise()
    with pytest.raises(error, match="strength"):
        img2img(model, _image(), strength=strength, progress=False)
    assert model.calls == 0


@pytest.mark.parametrize("image, match", [
    (torch.zeros(2, 3, 6, 6), r"image has 3 channels, the model takes 2"),
    (torch.zeros(2, 2, 6, 5), r"image is 6x5, the model's images are 6x6"),
    (torch.zeros(2, 2, 8, 8), r"image is 8x8"),
    (torch.zeros(6, 6), r"image must be \[n, 2, 6, 6\]"),
    (torch.zeros(1, 2, 2, 6, 6), r"image must be \[n, 2, 6, 6\]"),
    (torch.zeros(0, 2, 6, 6), r"image must be \[n, 2, 6, 6\]"),
    (torch.full((1, 2, 6, 6), 255.0), r"image must be in the model's data range \[-1, 1\]"),
    (torch.full((1, 2, 6, 6), math.inf), r"image has values that are not finite"),
])
def test_bad_image_raises_before_sampling(image, match):
    model = LabelledPointwise()
    with pytest.raises(ValueError, match=match):
        img2img(model, image, progress=False)
    assert model.calls == 0


def test_other_errors_name_their_argument():
    model = LabelledPointwise()
    with pytest.raises(TypeError, match=r"image must be a float tensor in \[-1, 1\]"):
        img2img(model, torch.zeros(1, 2, 6, 6, dtype=torch.int64), progress=False)
    with pytest.raises(TypeError, match=r"image must be a float tensor in \[-1, 1\]"):
        img2img(model, [[0.0]], progress=False)
    for made in ("noise", "begin_index"):
        with pytest.raises(TypeError, match=f"img2img makes {made}= itself"):
            img2img(model, _image(), progress=False, **{made: 0})
    with pytest.raises(ValueError, match="class_labels must have one label per sample"):
        img2img(model, _image(), strength=0.0, class_labels=[0, 1], progress=False)
    with pytest.raises(ValueError, match=r"dpm\+\+3m is a 3-step method"):
        img2img(model, _image(), strength=0.0, steps=2, sampler="dpm++3m", progress=False)
    assert model.calls == 0
