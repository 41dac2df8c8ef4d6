"""The reference agrees with the public peers where they define the same thing.

Each comparison feeds both sides the same x_t, model output and noise over
every timestep, and compares with the PEER tolerance (our tables come from
float64, diffusers' from float32 cumprods).
"""
import pytest
import torch

from fastddpm import DDPM
from tolerances import PEER, assert_close

T = 1000
SHAPE = (2, 3, 4, 4)
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
DDP_OBJECTIVE = {"epsilon": "pred_noise", "x0": "pred_x0", "v": "pred_v"}


def _inputs(seed, t):
    g = torch.Generator().manual_seed(seed * 7919 + t)
    x = torch.randn(SHAPE, generator=g)
    out = torch.randn(SHAPE, generator=g)
    z = torch.randn(SHAPE, generator=g)
    return x, out, z


def _all_t(step=1):
    return list(range(0, T, step)) + [T - 1]


# -- DDPM step vs diffusers -------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
def test_step_matches_diffusers_ddpm(prediction, variance, clip, monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type=variance,
                          clip_sample=clip, prediction_type=DIFFUSERS_PREDICTION[prediction])
    process = DDPM(prediction=prediction, variance=variance, clip_denoised=clip)
    for t in _all_t(7):
        x, out, z = _inputs(1, t)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z)
        theirs = sched.step(out, t, x).prev_sample
        ours = process.step(out, t, x, noise=z)
        assert_close(ours, theirs, **PEER, msg=f"t={t}")


def test_respaced_step_matches_diffusers_ddpm_with_fewer_steps(monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_small")
    sched.set_timesteps(50)
    process = DDPM().respace(sched.timesteps.tolist())
    assert process.num_steps == 50
    for t in sched.timesteps.tolist():
        x, out, z = _inputs(2, t)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z)
        assert_close(process.step(out, t, x, noise=z), sched.step(out, t, x).prev_sample, **PEER, msg=f"t={t}")


# -- DDIM vs diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_matches_diffusers(eta, clip, prediction):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                          prediction_type=DIFFUSERS_PREDICTION[prediction], set_alpha_to_one=True)
    sched.set_timesteps(50)
    process = DDPM(sampler="ddim", eta=eta, clip_denoised=clip, prediction=prediction).respace(sched.timesteps.tolist())
    for t in sched.timesteps.tolist():
        x, out, z = _inputs(3, t)
        # we re-derive eps from the clipped x0 (improved-diffusion, GLIDE): diffusers' use_clipped_model_output
        theirs = sched.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z).prev_sample
        assert_close(process.step(out, t, x, noise=z), theirs, **PEER, msg=f"t={t}")


# -- DDPM step vs denoising-diffusion-pytorch -----------------------------------------------
class _FixedOutput(torch.nn.Module):
    """A stand-in Unet for GaussianDiffusion that returns a given tensor."""

    def __init__(self):
        super().__init__()
        self.channels, self.out_dim, self.self_condition = SHAPE[1], SHAPE[1], False
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.output = None

    def forward(self, x, t, x_self_cond=None):
        return self.output


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_step_matches_denoising_diffusion_pytorch(prediction, schedule, monkeypatch):
    from denoising_diffusion_pytorch import GaussianDiffusion

    net = _FixedOutput()
    gd = GaussianDiffusion(net, image_size=SHAPE[-1], timesteps=T, beta_schedule=schedule,
                           objective=DDP_OBJECTIVE[prediction], auto_normalize=False)
    process = DDPM(schedule=schedule, prediction=prediction)  # p_sample always clips x0
    for t in _all_t(11):
        x, out, z = _inputs(4, t)
        net.output = out
        monkeypatch.setattr(torch, "randn_like", lambda _x: z)
        theirs, _ = gd.p_sample(x, t)
        monkeypatch.undo()
        assert_close(process.step(out, t, x, noise=z), theirs, **PEER, msg=f"t={t}")


# -- forward process and targets -----------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_and_targets_match_peers(schedule):
    from denoising_diffusion_pytorch import GaussianDiffusion
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule])
    gd = GaussianDiffusion(_FixedOutput(), image_size=SHAPE[-1], timesteps=T, beta_schedule=schedule,
                           auto_normalize=False)
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in _all_t(13):
        tt = torch.full((SHAPE[0],), t, dtype=torch.int64)
        ours = DDPM(schedule=schedule).q_sample(x0, tt, noise=eps)
        assert_close(ours, sched.add_noise(x0, eps, tt), **PEER, msg=f"diffusers t={t}")
        assert_close(ours, gd.q_sample(x0, tt, eps), **PEER, msg=f"ddp t={t}")
        v = DDPM(schedule=schedule, prediction="v").training_target(x0, eps, tt)
        assert_close(v, sched.get_velocity(x0, eps, tt), **PEER, msg=f"diffusers v t={t}")
        assert_close(v, gd.predict_v(x0, tt, eps), **PEER, msg=f"ddp v t={t}")
        assert torch.equal(DDPM(schedule=schedule).training_target(x0, eps, tt), eps)
        assert torch.equal(DDPM(schedule=schedule, prediction="x0").training_target(x0, eps, tt), x0)


def test_loss_matches_denoising_diffusion_pytorch(monkeypatch):
    """Same model output, noise and t: the L2 loss equals GaussianDiffusion.p_losses where both
    define the same weighting: epsilon unweighted, and every type under min-SNR-gamma.  (Without
    min-SNR, their pred_x0/pred_v losses are weighted by SNR and SNR/(SNR+1); ours are plain MSE
    on the target, as diffusers' training scripts.)"""
    from denoising_diffusion_pytorch import GaussianDiffusion

    for prediction, gamma in [("epsilon", None), ("epsilon", 5.0), ("x0", 5.0), ("v", 5.0), ("v", 1.0)]:
        net = _FixedOutput()
        gd = GaussianDiffusion(net, image_size=SHAPE[-1], timesteps=T, beta_schedule="linear",
                               objective=DDP_OBJECTIVE[prediction], auto_normalize=False,
                               min_snr_loss_weight=gamma is not None, min_snr_gamma=gamma or 5)
        g = torch.Generator().manual_seed(6)
        x0, eps, out = (torch.randn(SHAPE, generator=g) for _ in range(3))
        t = torch.tensor([3, 900])
        net.output = out
        theirs = gd.p_losses(x0, t, noise=eps)
        process = DDPM(prediction=prediction, min_snr_gamma=gamma)
        ours = process.loss(lambda x, tt: out, x0, t, noise=eps)
        assert_close(ours, theirs, **PEER, msg=f"{prediction} gamma={gamma}")
