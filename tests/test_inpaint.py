"""``fastddpm.inpaint``: RePaint and replace, against diffusers' ``RePaintScheduler`` given the same model
and noise, on every backend, with conditioning; the known pixels exact; bad input refused up front."""
import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import DDPM, ops
from fastddpm.inpaint import inpaint
from fastddpm.repaint import repaint_visits, walk_tables
from fastddpm.ops import reference
from backends import BACKENDS, need
from tolerances import EXACT, FP32, PEER, assert_close
from toy_models import LabelledPointwise, Pointwise

T = 40
BETAS = np.linspace(1e-4, 0.2, T)  # a short chain that still ends near pure noise (abar_T ~ 0.02)
SHAPE = (Pointwise.in_channels, Pointwise.image_size, Pointwise.image_size)


def _image(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=g) * 2 - 1


def _mask(n=1):
    m = torch.zeros(n, 1, SHAPE[1], SHAPE[2])
    m[..., : SHAPE[1] // 2, :] = 1  # keep the top half
    return m


def _process(**options):
    options = dict(dict(schedule="custom", betas=tuple(BETAS), num_timesteps=T, sampler="ddim", eta=0.0,
                        clip_denoised=False), **options)
    return DDPM(**options)


def _diffusers_repaint(model, image, mask, steps, jump_length, jump_n_sample, noises, eta=0.0):
    """diffusers' RePaintPipeline loop (pipeline_repaint.py) on our toy model, its randn fed ``noises``."""
    from diffusers import RePaintScheduler
    from diffusers.schedulers import scheduling_repaint

    sched = RePaintScheduler(num_train_timesteps=T, trained_betas=BETAS.astype(np.float32), clip_sample=False, eta=eta)
    sched.set_timesteps(steps, jump_length, jump_n_sample)
    queue = iter(noises)
    original = scheduling_repaint.randn_tensor
    scheduling_repaint.randn_tensor = lambda *a, **k: next(queue).clone()
    try:
        x = next(queue).clone()
        t_last = sched.timesteps[0] + 1
        for t in sched.timesteps:
            if t < t_last:
                out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.int64))
                x = sched.step(out, t, x, image, mask, None).prev_sample
            else:
                x = sched.undo_step(x, t_last, None)
            t_last = t
    finally:
        scheduling_repaint.randn_tensor = original
    return x, sched.timesteps


def _contract_noises(visits, seed, n):
    """The noises our inpaint draws, in the order diffusers' loop asks for them: x_T (slot V), then per
    visit ``v`` (row ``r = V - 1 - v``) the known region's z1 (slot V + 1 + r) for a reverse one, z (slot r)
    for an up one."""
    V = len(visits)
    shape = (n, *SHAPE)
    noises = [reference.batch_noise(seed, 0, V, shape, "cpu")]
    for v, (up, _k) in enumerate(visits):
        r = V - 1 - v
        noises.append(reference.batch_noise(seed, 0, r if up else V + 1 + r, shape, "cpu"))
    return noises


# -- the walk ------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, j, r", [(40, 5, 3), (250, 10, 10), (25, 10, 10), (7, 3, 2), (10, 10, 10), (5, 1, 4)])
def test_walk_is_diffusers(steps, j, r):
    from diffusers import RePaintScheduler

    sched = RePaintScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps, j, r)
    visits = repaint_visits(steps, j, r)
    gap = 1000 // steps
    assert len(visits) == len(sched.timesteps)
    theirs = sched.timesteps.tolist()
    last = theirs[0] + gap
    for (up, k), t in zip(visits, theirs):
        assert up == (t >= last)
        assert k == (last // gap if up else t // gap)  # an up visit is undo_step(t_last)
        last = t
    assert sum(not up for up, _ in visits) == steps + (r - 1) * j * len(range(0, steps - j, j))


# -- the peer ------------------------------------------------------------------------------
@pytest.mark.parametrize("jump_length, jump_n_sample", [(5, 3), (4, 1), (10, 2)])
def test_repaint_equals_diffusers_repaint(jump_length, jump_n_sample):
    """The whole RePaint run with ``steps = T`` (diffusers' undo_step is one beta per step then; with fewer
    steps it multiplies the betas from t_last up, one step off the respaced chain's: see the respaced test),
    DDIM eta=0 as diffusers' pipeline default, the same noises."""
    model, n = Pointwise(), 2
    image, mask = _image(n), _mask(n)
    visits = repaint_visits(T, jump_length, jump_n_sample)
    noises = _contract_noises(visits, seed=5, n=n)
    theirs, _ = _diffusers_repaint(model, image, mask, T, jump_length, jump_n_sample, noises)
    ours = inpaint(model, image, mask, jump_length=jump_length, jump_n_sample=jump_n_sample, seed=5,
                   process=_process(), progress=False)
    assert_close(ours, theirs, **PEER)


def test_replace_respaced_equals_diffusers_without_jumps():
    """10 of 40 steps, diffusers' timesteps (leading: 0, 4, ..., 36) as our respaced chain's; no jumps."""
    model, n, steps = Pointwise(), 3, 10
    image, mask = _image(n, seed=2), _mask(1)
    process = _process().respace([i * (T // steps) for i in range(steps)])
    visits = repaint_visits(steps, 10, 1)
    theirs, _ = _diffusers_repaint(model, image, mask, steps, 10, 1, _contract_noises(visits, seed=9, n=n))
    ours = inpaint(model, image, mask, method="replace", seed=9, process=process, progress=False)
    assert_close(ours, theirs, **PEER)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_one_step_equals_diffusers_with_eta(eta):
    """diffusers' RePaint step reuses one noise for the unknown region's variance and the known region;
    ours draws two (z and z1), so with eta > 0 the step is compared with both given that one noise."""
    from diffusers import RePaintScheduler
    from diffusers.schedulers import scheduling_repaint

    steps, n = 10, 2
    sched = RePaintScheduler(num_train_timesteps=T, trained_betas=BETAS.astype(np.float32), clip_sample=False, eta=eta)
    sched.set_timesteps(steps, 10, 1)
    process = _process(eta=eta).respace([i * (T // steps) for i in range(steps)])
    visits = repaint_visits(steps, 10, 1)
    table = torch.as_tensor(walk_tables(process, visits)["reverse"], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    image, mask = _image(n), _mask(n).expand(n, *SHAPE).contiguous()
    for v, (_, k) in enumerate(visits):
        x, out, z = (torch.randn((n, *SHAPE), generator=g) for _ in range(3))
        t = k * (T // steps)
        original = scheduling_repaint.randn_tensor
        scheduling_repaint.randn_tensor = lambda *a, **kw: z
        try:
            theirs = sched.step(out, t, x, image, mask, None).prev_sample
        finally:
            scheduling_repaint.randn_tensor = original
        step = torch.full((n,), len(visits) - 1 - v, dtype=torch.int64)  # the row of visit v
        ours = ops.ddpm_step(x, out, step, table, seed=0, clip_denoised=False, noise=z, known_noise=z,
                             known=image, mask=mask)
        assert_close(ours, theirs, **PEER, msg=f"t={t}")


# -- what the user gets -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["repaint", "replace"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_known_pixels_are_the_input_exactly(method, sampler):
    image, mask = _image(3), _mask(1)
    x = inpaint(Pointwise(), image, mask, method=method, jump_length=4, jump_n_sample=2, steps=12, seed=3,
                process=_process(sampler=sampler, clip_denoised=True), progress=False)
    keep = mask.expand_as(x).bool()
    assert_close(x[keep], image[keep], **EXACT)
    assert not torch.equal(x[~keep], image[~keep])
    assert bool(x.abs().max() < 10)


def test_mask_forms_and_all_kept():
    image = _image(2)
    m2 = _mask(1)[0, 0]
    results = [inpaint(Pointwise(), image, m, steps=6, method="replace", process=_process(), progress=False)
               for m in (m2, m2[None], m2[None, None].expand(2, 1, -1, -1), m2.bool(),
                         m2.expand(2, SHAPE[0], -1, -1))]
    for r in results[1:]:
        assert_close(r, results[0], **EXACT)
    full = inpaint(Pointwise(), image, torch.ones(SHAPE[1:]), steps=6, process=_process(), progress=False)
    assert_close(full, image, **EXACT)


def test_replace_is_repaint_without_resampling():
    image, mask = _image(2), _mask(2)
    a = inpaint(Pointwise(), image, mask, method="replace", steps=12, process=_process(), progress=False)
    b = inpaint(Pointwise(), image, mask, method="repaint", jump_n_sample=1, steps=12, process=_process(),
                progress=False)
    assert_close(a, b, **EXACT)


def test_images_do_not_depend_on_the_batch():
    image, mask = _image(4), _mask(4)
    kwargs = dict(steps=8, jump_length=3, jump_n_sample=2, seed=11, process=_process(sampler="ddpm"), progress=False)
    whole = inpaint(Pointwise(), image, mask, **kwargs)
    split = inpaint(Pointwise(), image, mask, batch_size=3, **kwargs)
    third = inpaint(Pointwise(), image[2:3], mask[2:3], sample_offset=2, **kwargs)
    assert_close(split, whole, **EXACT)
    assert_close(third, whole[2:3], **FP32)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("method", ["repaint", "replace"])
def test_engine_equals_the_eager_loop(backend, method):
    """The engine (static known/mask buffers, the walk's up rows, micro-batches through one cached engine)
    against the eager loop, on each backend; a second call reuses the engine."""
    if backend != "reference":
        need(backend, "ddpm_step", "cpu")
    from fastddpm.engine import cached_engines, clear_engine_cache

    clear_engine_cache()
    image, mask = _image(5), _mask(5)
    mask[3] = 0  # another mask for one image: the buffers are refilled per batch
    kwargs = dict(method=method, steps=10, jump_length=3, jump_n_sample=2, seed=4, process=_process(sampler="ddpm"),
                  progress=False, class_labels=None)
    with ops.use_backend(backend):
        eager = inpaint(Pointwise(), image, mask, engine=False, **kwargs)
        model = Pointwise()
        engine = inpaint(model, image, mask, engine=True, batch_size=2, **kwargs)
        again = inpaint(model, image, mask, engine=True, batch_size=2, **kwargs)
    assert_close(engine, eager, **FP32)
    assert_close(again, engine, **EXACT)
    assert len(cached_engines()) == 2  # [2, ...] and the last [1, ...] batch, reused by the second call
    keep = mask.expand_as(engine).bool()
    assert_close(engine[keep], image[keep], **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_equal_the_reference(backend):
    need(backend, "ddpm_step", "cpu")
    image, mask = _image(3), _mask(1)
    kwargs = dict(steps=10, jump_length=3, jump_n_sample=2, seed=4, process=_process(sampler="ddpm"), progress=False)
    with ops.use_backend("reference"):
        ref = inpaint(Pointwise(), image, mask, **kwargs)
    with ops.use_backend(backend):
        got = inpaint(Pointwise(), image, mask, **kwargs)
    assert_close(got, ref, **dict(atol=1e-4, rtol=1e-4))
    keep = mask.expand_as(got).bool()
    assert_close(got[keep], image[keep], **EXACT)


def test_class_conditional_guided_inpainting():
    model = LabelledPointwise()
    image, mask = _image(3), _mask(1)
    kwargs = dict(steps=8, jump_length=3, jump_n_sample=2, seed=2, process=_process(), progress=False)
    plain = inpaint(model, image, mask, class_labels=[0, 1, 2], **kwargs)
    model.calls = 0
    guided = inpaint(model, image, mask, class_labels=[0, 1, 2], guidance_scale=3.0, **kwargs)
    visits = repaint_visits(8, 3, 2)
    assert model.calls == sum(not up for up, _ in visits)  # one call on the doubled batch per reverse visit
    keep = mask.expand_as(guided).bool()
    assert_close(guided[keep], image[keep], **EXACT)
    assert not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="class_labels"):
        inpaint(model, image, mask, class_labels=[0, 1, 7], **kwargs)


def test_callback_edits_x_and_noise_is_x_T():
    image, mask = _image(2), _mask(2)
    seen = []
    x_T = torch.zeros((2, *SHAPE))
    kwargs = dict(steps=5, method="replace", process=_process(), progress=False)
    a = inpaint(Pointwise(), image, mask, noise=x_T, callback=lambda v, t, x: seen.append((v, t)), **kwargs)
    assert [v for v, _ in seen] == list(range(5)) and seen[0][1] == T - 1  # linspace keeps both ends
    b = inpaint(Pointwise(), image, mask, noise=x_T, callback=lambda v, t, x: x * 0 if v == 4 else None, **kwargs)
    assert torch.equal(b, torch.zeros_like(b))
    assert not torch.equal(a, b)


# -- bad input, refused before any model call ---------------------------------------------
class _Counting(Pointwise):
    calls = 0

    def forward(self, x, t):
        type(self).calls += 1
        return super().forward(x, t)


@pytest.mark.parametrize("change, error, match", [
    (dict(mask=torch.ones(5, 5)), ValueError, "mask must broadcast"),
    (dict(mask=torch.ones(3, 1, 6, 6)), ValueError, "mask must broadcast"),
    (dict(mask=torch.full((6, 6), 0.5)), ValueError, "mask must be binary"),
    (dict(mask=np.ones((6, 6))), TypeError, "mask must be a tensor"),
    (dict(image=torch.zeros(2, 3, 6, 6)), ValueError, r"image has shape \(2, 3, 6, 6\); the model takes \[n, 2, 6, 6\]"),
    (dict(image=torch.zeros(2, 2, 8, 8)), ValueError, r"image has shape \(2, 2, 8, 8\); the model takes \[n, 2, 6, 6\]"),
    (dict(image=torch.full((2, *SHAPE), 2.0)), ValueError, r"image must be in the model's data range"),
    (dict(image=torch.full((2, *SHAPE), float("nan"))), ValueError, "image"),
    (dict(image=torch.zeros(2, *SHAPE, dtype=torch.int64)), TypeError, "image must be a float tensor"),
    (dict(method="fill"), ValueError, "method must be one of"),
    (dict(jump_length=0), ValueError, "jump_length"),
    (dict(jump_n_sample=1.5), ValueError, "jump_n_sample"),
    (dict(sampler="dpm++2m"), ValueError, "one-step samplers"),
    (dict(noise=torch.zeros(2, 2, 5, 5)), ValueError, "noise"),
    (dict(begin_index=3), ValueError, "begin_index"),
    (dict(steps=0), ValueError, "steps"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_bad_input_is_refused_before_sampling(change, error, match):
    args = dict(image=_image(2), mask=_mask(1)[0, 0])
    args.update({k: change.pop(k) for k in ("image", "mask") if k in change})
    _Counting.calls = 0
    with pytest.raises(error, match=match):
        inpaint(_Counting(), args["image"], args["mask"], progress=False, **change)
    assert _Counting.calls == 0


def test_walk_graphs_follow_the_walk():
    """The CUDA-graph path's plan, checked on a CPU (captures stubbed): one graph per run of same-kind rows,
    at most steps_per_graph long, captured once per (kind, length), replayed in the walk's order."""
    from fastddpm.plan import make_plan
    from fastddpm.request import SamplingRequest
    from fastddpm.repaint import Inpainting
    from fastddpm.sampler_engine import SamplerEngine

    image, mask = _image(1), _mask(1).expand(1, *SHAPE).contiguous()
    request = SamplingRequest.make(1, inpainting=Inpainting(image, mask, 3, 3))
    import dataclasses

    from fastddpm.adapters import ModelAdapter

    plan = make_plan(ModelAdapter(Pointwise()), 1, SHAPE, torch.device("cpu"), cuda_graph=False)
    plan = dataclasses.replace(plan, steps_per_graph=4)
    engine = SamplerEngine(Pointwise(), _process().respace(9), (1, *SHAPE), plan, request=request)
    captured = []
    engine._capture = lambda length, seed, offset, up=False: captured.append((up, length)) or (up, length)
    sets = engine._walk_graphs(0, 0)
    rows = [up for (up, length), _, _ in sets for _ in range(length)]
    assert rows == list(reversed(engine.walk.up_rows))  # row V-1 first
    assert all(length <= 4 and replays == 1 for _, length, replays in sets)
    assert len(captured) == len(set(captured)) < len(sets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_walk_equals_the_eager_loop(backend):
    need(backend, "ddpm_step", "cuda")
    image, mask = _image(3).cuda(), _mask(3).cuda()
    kwargs = dict(steps=10, jump_length=3, jump_n_sample=2, seed=4, process=_process(sampler="ddpm"), progress=False,
                  device="cuda")
    model = Pointwise().cuda()
    with ops.use_backend(backend):
        eager = inpaint(model, image, mask, engine=False, **kwargs)
        graphed = inpaint(model, image, mask, engine=True, cuda_graph=True, dtype=torch.float32, **kwargs)
    assert_close(graphed, eager, **dict(atol=1e-4, rtol=1e-4))
    keep = mask.expand_as(graphed).bool()
    assert_close(graphed[keep], image[keep], **EXACT)


@pytest.mark.parametrize("family", ["fastddpm", "diffusers", "diffusers_pipeline"])
def test_model_families(family):
    """fastddpm's UNet (class-conditional, guided), a diffusers UNet2DModel with class embeddings, and a
    diffusers pipeline (its scheduler as the process): the kept pixels exact, the hole filled."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    if family == "fastddpm":
        model, kwargs = fastddpm.create_model("tiny", num_classes=3, image_size=8, in_channels=1, dropout=0.0).eval(), \
            dict(class_labels=[0, 2], guidance_scale=2.0)
    else:
        model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                            norm_num_groups=4, num_class_embeds=4 if family == "diffusers" else None).eval()
        kwargs = dict(class_labels=[1, 3]) if family == "diffusers" else {}
        if family == "diffusers_pipeline":
            model = DDPMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=50, clip_sample=False))
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.ones(8, 8)
    mask[2:6, 2:6] = 0
    x = inpaint(model, image, mask, steps=6, jump_length=2, jump_n_sample=2, progress=False, **kwargs)
    keep = mask.bool().expand_as(x)
    assert_close(x[keep], image[keep], **EXACT)
    assert bool(torch.isfinite(x).all()) and not torch.equal(x[~keep], image[~keep])
