"""Reference math properties, the dispatch, configs, and input validation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastddpm import DDPM, DiffusionConfig, ops
from fastddpm.ops import reference, registry
from fastddpm.schedule import NoiseSchedule
from tolerances import FP32, NORMAL_ULP, assert_close

LINEAR = NoiseSchedule.make("linear", 1000)


# -- the math ------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddim_eta_one_is_ddpm_fixed_small(prediction):
    ddpm = reference.step_coefficients(LINEAR, prediction, "fixed_small", "ddpm")
    ddim = reference.step_coefficients(LINEAR, prediction, "fixed_small", "ddim", eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-9, atol=1e-12)


def test_sigma_zero_at_the_last_step_and_for_deterministic_ddim():
    for variance in ("fixed_small", "fixed_large"):
        assert reference.step_coefficients(LINEAR, variance=variance)[0, 4] == 0.0
    assert np.all(reference.step_coefficients(LINEAR, sampler="ddim", eta=0.0)[:, 4] == 0.0)
    large = reference.step_coefficients(LINEAR, variance="fixed_large")
    np.testing.assert_allclose(large[1:, 4], np.sqrt(LINEAR.betas[1:]))


def test_x0_hat_recovers_x0_for_every_prediction():
    """Feeding the exact target makes a*x_t + b*out equal x0 (Eq. 4 inverted)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 1, 3, 3, generator=g) * 2 - 1, torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    for prediction in ("epsilon", "x0", "v"):
        process = DDPM(prediction=prediction, clip_denoised=False)
        x_t = process.q_sample(x0, t, noise=eps)
        target = process.training_target(x0, eps, t)
        coefs = process.tables("cpu")["coefs"][t]
        x0_hat = coefs[:, 0].reshape(-1, 1, 1, 1) * x_t + coefs[:, 1].reshape(-1, 1, 1, 1) * target
        assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3, msg=prediction)  # 1/sqrt(abar) amplifies rounding at t=999


def test_clip_denoised_clamps_x0_hat():
    x = torch.zeros(1, 1, 2, 2)
    out = torch.full((1, 1, 2, 2), 5.0)
    coefs = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(reference.ddpm_step(x, out, coefs, True, torch.zeros_like(x)), torch.ones_like(x))
    assert torch.equal(reference.ddpm_step(x, out, coefs, False, torch.zeros_like(x)), out)
    # c2 weighs the raw output: the clip does not reach it
    raw = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 0.5]])
    assert torch.equal(reference.ddpm_step(x, out, raw, True, torch.zeros_like(x)), torch.full_like(x, 3.5))


def _huber(a, b, delta=0.5):
    d = (a - b).abs()
    return torch.where(d < delta, 0.5 * d ** 2, delta * (d - 0.5 * delta)).mean()


@pytest.mark.parametrize("loss_type, fn", [("l2", lambda a, b: ((a - b) ** 2).mean()),
                                           ("l1", lambda a, b: (a - b).abs().mean()), ("huber", _huber)])
def test_losses(loss_type, fn):
    g = torch.Generator().manual_seed(1)
    out, x0, eps = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([1, 2, 3])
    process = DDPM(loss=loss_type, huber_delta=0.5)
    ours = process.loss(lambda x, tt: out, x0, t, noise=eps)
    assert_close(ours, fn(out, eps), **FP32)


def test_min_snr_weights():
    snr = LINEAR.tables64()["snr"]
    w = reference.loss_weights(LINEAR, "epsilon", 5.0)
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr)
    np.testing.assert_allclose(reference.loss_weights(LINEAR, "v", 5.0), np.minimum(snr, 5.0) / (snr + 1))
    assert np.all(reference.loss_weights(LINEAR, "x0", None) == 1.0)
    assert w[-1] == pytest.approx(1.0) and w[0] < 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_min_snr_weights_weigh_the_x0_error_by_min_snr_gamma(prediction):
    """What min-SNR promises (Hang et al. 2023): a model output off by ``err``, turned into an x0
    estimate by the sampler's own ``x0 = a x_t + b out`` (``step_coefficients``), costs
    ``min(SNR, gamma) * (x0 error)^2`` under its type's weighted loss, for every type."""
    gamma = 5.0
    tab = LINEAR.tables64()
    w = reference.loss_weights(LINEAR, prediction, gamma)
    coefs = reference.step_coefficients(LINEAR, prediction)
    x0, eps, err = 0.3, -1.1, 0.01
    for t in (0, 10, 300, 999):
        sa, so = math.sqrt(tab["alphas_cumprod"][t]), math.sqrt(1 - tab["alphas_cumprod"][t])
        xt = sa * x0 + so * eps
        target = {"epsilon": eps, "x0": x0, "v": sa * eps - so * x0}[prediction]
        x0_hat = coefs[t, 0] * xt + coefs[t, 1] * (target + err)
        expected = min(tab["snr"][t], gamma) * (x0_hat - x0) ** 2
        assert w[t] * err ** 2 == pytest.approx(expected, rel=1e-8), t


def test_loss_gradient_flows_to_the_model():
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    loss = DDPM().loss(lambda x, t: net(x), torch.randn(2, 1, 4, 4), seed=3)
    loss.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_loss_draws_fresh_noise_and_t_when_not_given():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 4, 4)
    a = DDPM().loss(lambda x, t: torch.zeros_like(x), x0, generator=g)
    b = DDPM().loss(lambda x, t: torch.zeros_like(x), x0, generator=g)
    assert a.item() != b.item()


def test_q_sample_uses_the_contract_noise():
    x0 = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([999, 999])
    x_t = DDPM().q_sample(x0, t, seed=5)
    eps = reference.batch_noise(5, 0, 0, x0.shape, "cpu")
    # whichever backend runs it: the same normals to within a few ulp
    assert_close(x_t, eps * LINEAR.table("sqrt_one_minus_alphas_cumprod")[999], **NORMAL_ULP)


# -- config and serialisation -------------------------------------------------------------------
def test_config_round_trip():
    c = DiffusionConfig(schedule="cosine", prediction="v", min_snr_gamma=5.0, sampler="ddim", eta=0.3)
    assert DiffusionConfig.from_json(c.to_json()) == c
    custom = DiffusionConfig(schedule="custom", betas=[0.1, 0.2])
    assert custom.num_timesteps == 2 and DiffusionConfig.from_dict(custom.to_dict()) == custom
    process = DDPM(c).respace(10)
    again = DDPM.from_json(process.to_json())
    assert again.schedule.timesteps == process.schedule.timesteps and again.config == c


@pytest.mark.parametrize("kwargs, match", [
    (dict(prediction="score"), "prediction must be one of"),
    (dict(variance="learned"), "variance must be one of"),
    (dict(loss="l3"), "loss must be one of"),
    (dict(eta=-1.0), "eta must be a float >= 0"),
    (dict(num_timesteps=0), "num_timesteps must be a positive int"),
    (dict(schedule="custom"), "schedule='custom' needs betas"),
    (dict(betas=[0.1]), "betas can only be given with schedule='custom'"),
    (dict(min_snr_gamma=0), "min_snr_gamma must be > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown diffusion config keys"):
        DiffusionConfig.from_dict({"colour": 1})


# -- validation at the API -------------------------------------------------------------------
def test_step_and_q_sample_validate_inputs():
    p = DDPM()
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        p.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        p.q_sample(x, torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        p.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        p.q_sample(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"model_output must have shape \(2, 1, 4, 4\)"):
        p.step(torch.zeros(2, 1, 4, 5), 3, x)
    with pytest.raises(TypeError, match="x_t must have dtype in"):
        p.step(x, 3, x.to(torch.int64))
    with pytest.raises(ValueError, match="t must be one of this respaced process"):
        p.respace(10).step(x, 500, x)
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        p.q_sample([[0.0]], 1)


def test_ops_validate_metadata():
    coefs = torch.zeros(10, 6)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"coefs must have shape \(K, 6\)"):
        ops.ddpm_step(x, x, torch.tensor(1), torch.zeros(10, 4), seed=0)
    with pytest.raises(TypeError, match="x must have dtype in"):
        ops.ddpm_step(x.half(), x, torch.tensor(1), coefs, seed=0)
    with pytest.raises(TypeError, match="t must have dtype in"):
        ops.ddpm_step(x, x, torch.tensor(1, dtype=torch.int32), coefs, seed=0)
    with pytest.raises(ValueError, match="must be on one device"):
        ops.ddpm_step(x, x.to("meta"), torch.tensor(1), coefs, seed=0)
    with pytest.raises(TypeError, match="k must have dtype in"):
        ops.attention(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8).half(), torch.zeros(1, 1, 4, 8))


# -- dispatch ----------------------------------------------------------------------------------
def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setitem(registry._load_errors, "triton", "failed to load: not here")
    monkeypatch.delitem(registry._loaded, "triton", raising=False)
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' was requested for ddpm_step"):
            ops.select_backend("ddpm_step", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("FASTDDPM_BACKEND", "magic")
    with pytest.raises(ValueError, match="FASTDDPM_BACKEND must be one of"):
        ops.select_backend("ddpm_step", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("magic"):
            pass


def test_automatic_choice_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    monkeypatch.setitem(registry._load_errors, "cpp", "failed to load: ImportError: boom")
    monkeypatch.delitem(registry._loaded, "cpp", raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(RuntimeWarning, match="backend 'cpp' failed to load"):
        assert ops.select_backend("ddpm_step", torch.device("cpu"), torch.float32) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.select_backend("q_sample", torch.device("cpu"), torch.float32) == "reference"


def test_reference_backend_is_always_available():
    assert "reference" in ops.available_backends("ddpm_step", "cpu")
    with ops.use_backend("reference"):
        assert ops.select_backend("attention", torch.device("cpu"), torch.float16) == "reference"


def test_dispatch_traces_under_torch_compile_fullgraph():
    """Backend resolution runs at trace time (module imports cannot be traced),
    so a model calling the ops compiles as one graph even on its first call."""
    from fastddpm.models import create_model

    model = create_model("tiny").eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 500])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(x, t), model(x, t), **FP32)

    def step(x, out, i, coefs):
        return ops.ddpm_step(x, out, i, coefs, seed=1, sample_offset=0, clip_denoised=True)

    coefs = DDPM().tables("cpu")["coefs"]
    args = (torch.randn(2, 3), torch.randn(2, 3), torch.tensor([3, 999]), coefs)
    for backend in ops.available_backends("ddpm_step", "cpu"):  # the reference is always among them
        torch._dynamo.reset()
        with ops.use_backend(backend):
            assert_close(torch.compile(step, fullgraph=True, backend="eager")(*args), step(*args), **FP32)


# -- respaced processes: one meaning of t -------------------------------------------------------
def test_respaced_processes_take_model_timesteps_everywhere():
    full, fast = DDPM(), DDPM().respace(10)
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert fast.schedule.timesteps[-1] == 999
    # the respaced process keeps alphas_cumprod at its timesteps: noising at 999 is the full process's 999
    assert_close(fast.q_sample(x0, 999, noise=eps), full.q_sample(x0, 999, noise=eps), **FP32)
    assert_close(fast.q_sample(x0, 555, noise=eps), full.q_sample(x0, 555, noise=eps), **FP32)
    assert torch.equal(DDPM(prediction="v").respace(10).training_target(x0, eps, 999),
                       DDPM(prediction="v").training_target(x0, eps, 999))
    for call in (lambda: fast.q_sample(x0, 5), lambda: fast.training_target(x0, eps, 5),
                 lambda: fast.loss(lambda x, t: x, x0, 5), lambda: fast.step(x0, 5, x0)):
        with pytest.raises(ValueError, match="t must be one of this respaced process's timesteps"):
            call()


def test_respace_takes_a_count_or_a_list_and_round_trips():
    with pytest.raises(TypeError, match="steps must be a number of steps"):
        DDPM().respace("10")
    with pytest.raises(TypeError, match="respace timesteps must be ints"):
        DDPM().respace([0.5, 10])
    first_ten = DDPM().respace(list(range(10)))
    assert first_ten.schedule.is_respaced and first_ten.num_steps == 10
    again = DDPM.from_dict(first_ten.to_dict())
    assert again.num_steps == 10 and again.schedule.timesteps == tuple(range(10))
    assert again.config.num_timesteps == 1000
    assert not DDPM().respace(1000).schedule.is_respaced  # every step kept: the process itself


def test_sample_offset_is_bounded():
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"sample_offset must be an int in \[0, 2\*\*32 - n\]"):
        DDPM().q_sample(x0, 3, sample_offset=2**32)
    with pytest.raises(ValueError, match="sample_offset"):
        DDPM().step(x0, 3, x0, sample_offset=2**32 - 1)
    with pytest.raises(ValueError, match="sample_offset"):
        DDPM().q_sample(x0, 3, sample_offset=-1)
    DDPM().q_sample(x0, 3, sample_offset=2**32 - 2)


@pytest.mark.parametrize("T", [10, 19, 20])
def test_small_T_linear_schedule_names_the_fix(T):
    with pytest.raises(ValueError, match=rf"linear schedule with num_timesteps={T} has beta_T = .* >= 21"):
        DDPM(num_timesteps=T)
    DDPM(num_timesteps=21)
    DDPM(num_timesteps=T, schedule="cosine")
    with pytest.raises(ValueError, match=r"betas must be finite and in \(0, 1\)"):
        DDPM(schedule="custom", betas=[0.5, 1.0])
    with pytest.raises(ValueError, match="num_timesteps must be a positive int <= 100000"):
        DDPM(num_timesteps=2_000_000_000)
