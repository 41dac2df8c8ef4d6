"""The DDPM process: schedule + prediction type + variance + loss, with the
operations users call (``q_sample``, ``loss``, ``step``, ``sample``)."""
from __future__ import annotations

import contextlib
import json
import math
import numbers
from dataclasses import dataclass

import torch

from . import interop, ksamplers, lmsolvers, multistep, ops, singlestep
from .adapters import ModelAdapter
from .checks import FLOAT_DTYPES, check_tensor, check_timesteps, is_int
from .config import DiffusionConfig
from .modes import MULTISTEP_SAMPLERS, SOLVER_ORDERS
from .noise import check_seed
from .ops import reference
from .schedule import NoiseSchedule, spaced_timesteps
from .thresholding import step_threshold

__all__ = ["DDPM", "StepOutput"]

NOISE_SAMPLES = 2**32  # the noise contract counts samples with 32 bits: offset + n beyond it would repeat noise


def _check_sample_offset(sample_offset, n: int) -> int:
    ok = is_int(sample_offset)
    if not ok or not 0 <= sample_offset <= NOISE_SAMPLES - n:
        raise ValueError(f"sample_offset must be an int in [0, 2**32 - n] = [0, {NOISE_SAMPLES - n}] for n={n} "
                         f"samples (the noise contract numbers 2**32 samples per seed), got {sample_offset!r}")
    return sample_offset


@dataclass
class StepOutput:
    """What ``DDPM.step(..., return_dict=True)`` returns (diffusers' ``SchedulerOutput`` fields).

    :param prev_sample: float32 ``x_{t-1}``.
    :param pred_original_sample: float32 ``x0_hat`` the step used (clipped if ``clip_denoised``).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class DDPM:
    """A diffusion process (Ho et al. 2020), optionally respaced for sampling.

    ``DDPM()`` is the original: 1000 linear steps, epsilon prediction, clipped
    x0, fixed_small variance.  Options are the fields of ``DiffusionConfig``::

        process = DDPM(schedule="cosine", prediction="v")
        fast = process.respace(50)          # 50-step sampler of the same model

    :param config: a ``DiffusionConfig`` (default: the original DDPM).
    :param noise_schedule: an explicit (e.g. respaced) ``NoiseSchedule``; default made from the config.
    :param options: overrides of config fields.
    """

    def __init__(self, config: DiffusionConfig | None = None, *, noise_schedule: NoiseSchedule | None = None,
                 **options):
        config = config if config is not None else DiffusionConfig()
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"config must be a DiffusionConfig, got {type(config).__name__}")
        self.config = config.replace(**options) if options else config
        if noise_schedule is None:
            noise_schedule = self._base_schedule()
        elif not isinstance(noise_schedule, NoiseSchedule):
            raise TypeError(f"noise_schedule must be a NoiseSchedule, got {type(noise_schedule).__name__}")
        self.chain = noise_schedule  # the whole sampling chain: T steps, or the respaced ones
        self.schedule = self._begun(noise_schedule)  # the part that runs (all of it unless begin_index)
        self._tables: dict = {}

    # -- structure ----------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Steps of this process (T, or fewer when respaced; less ``begin_index`` for DDPM/DDIM)."""
        return self.schedule.num_timesteps

    def _begun(self, chain: NoiseSchedule) -> NoiseSchedule:
        """The chain from ``begin_index`` on: its first ``K - begin_index`` steps (a multistep solver begins
        part-way in its plan instead, ``multistep_plan``).  Skipping the leading steps of the reverse
        process keeps the rest exactly (``NoiseSchedule.truncate``): row ``i`` and noise slot ``i`` of
        step ``i`` are the whole chain's, so a run from the start timestep is the tail of a whole run."""
        begin = self.config.begin_index
        if begin == 0 or self.is_multistep:
            return chain
        if begin >= chain.num_timesteps:
            raise ValueError(f"begin_index={begin} skips every step of this process's {chain.num_timesteps}-step "
                             f"chain: it must be < {chain.num_timesteps} (the steps of the sampling plan)")
        return chain.truncate(chain.num_timesteps - begin)

    def _base_schedule(self) -> NoiseSchedule:
        c = self.config
        return NoiseSchedule.make(c.betas if c.schedule == "custom" else c.schedule, c.num_timesteps,
                                  table_dtype=c.table_dtype)

    def respace(self, steps) -> "DDPM":
        """The same model sampled over ``steps`` kept timesteps (int or list).  An int keeps them by the
        config's ``timestep_spacing`` (``schedule.spaced_timesteps``: diffusers' rules; ``linspace`` is
        improved-diffusion's, both ends kept)."""
        if isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and \
                self.config.timestep_spacing != "linspace":
            steps = self._spaced(int(steps))
        return DDPM(self.config, noise_schedule=self._base_schedule().respace(steps))  # begin_index re-applied

    def _spaced(self, steps: int) -> list[int]:
        """``leading``/``trailing`` timesteps; for DDIM also diffusers' constraint: its ``DDIMScheduler``
        steps from ``t`` to ``t - T // steps``, which must be the next kept timestep (as ours)."""
        T, spacing = self.config.num_timesteps, self.config.timestep_spacing
        keep = spaced_timesteps(T, steps, spacing)
        if self.config.sampler == "ddim":
            gap = T // steps
            if any(b - a != gap for a, b in zip(keep, keep[1:])) or keep[0] >= gap:
                raise ValueError(f"timestep_spacing={spacing!r} with DDIM needs steps that divide num_timesteps={T} "
                                 f"(diffusers' DDIMScheduler steps t -> t - {T}//steps, which is not the next "
                                 f"{spacing} timestep for steps={steps}); use timestep_spacing='leading' or such steps")
        return keep

    @classmethod
    def from_diffusers(cls, scheduler_or_config, *, use_clipped_model_output: bool = False, **options) -> "DDPM":
        """The process equal to a diffusers ``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``
        or ``UniPCMultistepScheduler`` (or its config); fields fastddpm cannot represent raise ValueError.
        See ``fastddpm.interop.diffusion_config``."""
        return cls(interop.diffusion_config(scheduler_or_config, use_clipped_model_output=use_clipped_model_output,
                                            **options))

    @classmethod
    def resolve(cls, process: "DDPM | None", steps: int | None, options: dict) -> "DDPM":
        """The process a sampler runs for ``sample(..., steps=steps, process=process, **options)``.

        Every sampler (the eager loop, the engine, and through them the distributed one) resolves its
        arguments here, so they run the same process.

        :param process: a ``DDPM``, or None for ``DDPM(**options)``.
        :param steps: the number of sampling steps: a respacing of the process when fewer than its steps
            (None: the process's own); a multistep solver's steps are its model calls instead
            (``multistep_plan``), not a respacing, so they are left to it.
        :param options: config fields set on top of ``process`` (``with_options``).
        :return: the process to run.
        """
        if process is None:
            process = cls(**options)
        elif not isinstance(process, DDPM):
            raise TypeError(f"process must be a fastddpm.DDPM, got {type(process).__name__}")
        elif options:
            process = process.with_options(**options)
        if process.is_multistep:
            return process
        if steps is not None:
            if not is_int(steps) or steps < 1:
                raise ValueError(f"steps must be a positive int, got {steps!r}")
            if steps > process.config.num_timesteps:
                raise ValueError(f"steps must be <= num_timesteps={process.config.num_timesteps}, got {steps}")
            if steps != process.chain.num_timesteps:  # the whole chain's steps: begin_index skips some of them
                process = process.respace(steps)
        return process

    def with_options(self, **options) -> "DDPM":
        """A copy with some config fields changed (the chain is kept if respaced; ``begin_index`` applies
        to it anew)."""
        schedule_fields = {"num_timesteps", "schedule", "betas", "table_dtype"}
        keep = None if schedule_fields & set(options) else self.chain
        return DDPM(self.config.replace(**options), noise_schedule=keep)

    def tables(self, device) -> dict[str, torch.Tensor]:
        """Device float32 tables used by the ops (cached per device)."""
        key = str(torch.device(device))
        if key not in self._tables:
            c = self.config
            s = self.schedule
            as32 = lambda a: torch.as_tensor(a, dtype=torch.float64).to(torch.float32).to(device)  # noqa: E731
            self._tables[key] = {
                "sqrt_alphas_cumprod": s.table("sqrt_alphas_cumprod", device),
                "sqrt_one_minus_alphas_cumprod": s.table("sqrt_one_minus_alphas_cumprod", device),
                "loss_weights": as32(reference.loss_weights(s, c.prediction, c.min_snr_gamma)),
                # a multistep solver's own table is its plan's (``multistep_plan``); step() is DDPM's
                "coefs": as32(self.step_coefficients()),
                "timesteps": s.timesteps_tensor(device),
            }
        return self._tables[key]

    @property
    def is_multistep(self) -> bool:
        """Whether the sampler runs on the multistep table (``modes.MULTISTEP_SAMPLERS``): a multistep solver
        (``fastddpm.multistep``), ``dpm-solver`` (``fastddpm.singlestep``), ``deis`` or ``pndm``
        (``fastddpm.lmsolvers``) or a k-sampler (``fastddpm.ksamplers``)."""
        return self.config.sampler in MULTISTEP_SAMPLERS

    def step_coefficients(self):
        """The float64 ``[K, 6]`` one-step table of this process (``reference.step_coefficients``): DDPM's, or
        DDIM's with ``eta`` and, where ``set_alpha_to_one=False``, its last step onto the full schedule's
        ``abar_0``; with ``ddim_direction="raw"`` DDIM's direction from the raw output (diffusers'
        ``clip_sample``)."""
        c = self.config
        final = None if c.set_alpha_to_one or c.sampler != "ddim" else float(self._base_schedule().alphas_cumprod64[0])
        raw = c.sampler == "ddim" and c.ddim_direction == "raw"
        return reference.step_coefficients(self.schedule, c.prediction, c.variance, self._one_step_sampler, c.eta,
                                           final_alpha_cumprod=final, direction="raw" if raw else "clipped")

    @property
    def _one_step_sampler(self) -> str:
        return "ddpm" if self.is_multistep else self.config.sampler

    def multistep_plan(self, steps: int | None = None) -> multistep.MultistepPlan:
        """The timesteps and coefficient table of this process's multistep solver over ``steps``
        model calls (default ``multistep.DEFAULT_STEPS``), from the full (unrespaced) schedule; with
        ``begin_index`` the plan from that step on (``steps - begin_index`` model calls)."""
        c = self.config
        if not self.is_multistep:
            raise ValueError(f"sampler={c.sampler!r} does not run on the multistep table {MULTISTEP_SAMPLERS}")
        steps = multistep.DEFAULT_STEPS if steps is None else steps
        if c.sampler in multistep.SOLVERS:
            dpm = c.sampler != "unipc"
            return multistep.make_plan(self._base_schedule(), c.sampler, steps, c.prediction, c.timestep_spacing,
                                       c.karras_sigmas, c.lambda_min_clipped, bool(c.clip_denoised), c.thresholding,
                                       begin_index=c.begin_index, lower_order_final=c.lower_order_final,
                                       final_sigmas_type=c.final_sigmas_type, euler_at_final=c.euler_at_final,
                                       use_lu_lambdas=c.use_lu_lambdas, algorithm=c.algorithm_type if dpm
                                       else "dpmsolver++", solver_type=c.solver_type if dpm else "midpoint")
        if c.begin_index and c.sampler == "pndm":
            raise ValueError(f"begin_index={c.begin_index} is not supported by sampler={c.sampler!r} yet: use a "
                             f"multistep solver ({', '.join(multistep.SOLVERS)}), dpm-solver, deis, a k-sampler "
                             f"or ddpm/ddim")
        order = c.solver_order if c.solver_order is not None else SOLVER_ORDERS.get(c.sampler, (None, None))[1]
        clip, schedule = bool(c.clip_denoised), self._base_schedule()
        if c.sampler in ksamplers.KSAMPLERS:  # steps: sigma steps (ksamplers.model_calls gives the calls)
            return ksamplers.make_kplan(schedule, c.sampler, steps, c.prediction, c.timestep_spacing, c.sigma_schedule,
                                        c.final_sigmas_type, clip, c.thresholding,
                                        order=order if c.sampler == "lms" else None, s_churn=c.s_churn,
                                        s_tmin=c.s_tmin, s_tmax=math.inf if c.s_tmax is None else c.s_tmax,
                                        s_noise=c.s_noise, begin_index=c.begin_index)
        for name, unused in (("karras_sigmas", c.karras_sigmas and c.sampler == "pndm"),
                             ("lambda_min_clipped", c.lambda_min_clipped is not None and c.sampler != "dpm-solver")):
            if unused:
                raise ValueError(f"{name}={getattr(c, name)!r} is not used by sampler={c.sampler!r} (diffusers' "
                                 f"scheduler has none): leave it at its default")
        if c.sampler == "pndm":
            return lmsolvers.make_pndm_plan(schedule, steps, c.prediction, c.timestep_spacing, clip, c.thresholding,
                                            set_alpha_to_one=c.set_alpha_to_one, steps_offset=c.steps_offset)
        if c.sampler == "deis":
            return lmsolvers.make_deis_plan(schedule, steps, c.prediction, c.timestep_spacing, c.karras_sigmas, clip,
                                            c.thresholding, order=order, lower_order_final=c.lower_order_final,
                                            begin_index=c.begin_index)
        return singlestep.make_singlestep_plan(schedule, steps, c.prediction, c.timestep_spacing, c.karras_sigmas,
                                               c.lambda_min_clipped, clip, c.thresholding, order=order,
                                               algorithm=c.algorithm_type, solver_type=c.solver_type,
                                               lower_order_final=c.lower_order_final,
                                               final_sigmas_type=c.final_sigmas_type, begin_index=c.begin_index)

    def _step_index(self, t, n: int, device) -> torch.Tensor:
        """Model timesteps -> this process's step indices (identity unless respaced).  Every method that
        takes ``t`` (``q_sample``, ``training_target``, ``loss``, ``step``) takes model timesteps."""
        if not self.schedule.is_respaced:
            return check_timesteps("t", t, n, self.num_steps, device)
        t = check_timesteps("t", t, n, self.config.num_timesteps, device)
        kept = self.tables(device)["timesteps"]
        idx = torch.searchsorted(kept, t)
        if bool((idx >= kept.numel()).any()) or bool((kept[idx.clamp(max=kept.numel() - 1)] != t).any()):
            raise ValueError(f"t must be one of this respaced process's timesteps {list(self.schedule.timesteps)[:8]}...")
        return idx

    # -- forward process and training ----------------------------------------------------
    def q_sample(self, x0, t, noise=None, *, seed: int = 0, sample_offset: int = 0):
        """``x_t`` for clean images ``x0`` at per-sample (or scalar) model timesteps ``t`` (for a respaced
        process, its kept timesteps, as ``step`` takes them).

        :param noise: explicit noise; default: the noise contract's for ``seed``.
        """
        check_tensor("x0", x0, dtypes=FLOAT_DTYPES, min_ndim=2)
        idx = self._step_index(t, x0.shape[0], x0.device)
        tb = self.tables(x0.device)
        return ops.q_sample(x0, idx, tb["sqrt_alphas_cumprod"], tb["sqrt_one_minus_alphas_cumprod"],
                            seed=check_seed(seed), sample_offset=_check_sample_offset(sample_offset, x0.shape[0]),
                            noise=noise)

    def training_target(self, x0, noise, t):
        """What the model is trained to output for ``(x0, noise, t)``."""
        check_tensor("x0", x0, dtypes=FLOAT_DTYPES, min_ndim=2)
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES, shape=x0.shape)
        idx = self._step_index(t, x0.shape[0], x0.device)
        tb = self.tables(x0.device)
        return reference.training_target(self.config.prediction, x0, noise, idx, tb["sqrt_alphas_cumprod"],
                                         tb["sqrt_one_minus_alphas_cumprod"])

    def loss(self, model, x0, t=None, *, seed: int | None = None, sample_offset: int = 0, noise=None,
             generator: torch.Generator | None = None, model_kwargs: dict | None = None):
        """The training loss of ``model`` on a batch ``x0`` (a 0-dim tensor).

        :param t: model timesteps; default uniform over the process's steps from ``generator``.
        :param seed: noise seed; default drawn from ``generator`` (or torch's global RNG).
        :param model_kwargs: more keywords for every model call, e.g. a class-conditional model's
            labels as its family takes them (``ModelAdapter(model).label_kwargs(labels)``).
        """
        check_tensor("x0", x0, dtypes=FLOAT_DTYPES, min_ndim=2)
        n = x0.shape[0]
        if t is None:
            idx = torch.randint(0, self.num_steps, (n,), generator=generator).to(x0.device)
        else:
            idx = self._step_index(t, n, x0.device)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
        adapter = ModelAdapter(model)
        return self.training_loss(lambda x, tt, **kw: adapter.check_output(adapter(x, tt, **kw), x), x0, idx,
                                  seed=check_seed(seed), sample_offset=_check_sample_offset(sample_offset, n),
                                  noise=noise, model_kwargs=model_kwargs)

    def training_loss(self, model, x0, t, *, seed: int, sample_offset: int = 0, noise=None, autocast=None,
                      model_kwargs: dict | None = None):
        """The loss on the hot path: no value checks (``t`` must be a valid int64 ``[n]`` on
        ``x0``'s device), so nothing synchronises with a GPU.

        :param model: ``model(x_t, timesteps, **model_kwargs)``; an output with ``.sample`` (diffusers) is
            unwrapped.
        :param autocast: a context manager around the model call (mixed precision), or None.
        :param model_kwargs: more keywords for the model call (class labels), or None.
        """
        tb = self.tables(x0.device)
        x_t = ops.q_sample(x0, t, tb["sqrt_alphas_cumprod"], tb["sqrt_one_minus_alphas_cumprod"],
                           seed=seed, sample_offset=sample_offset, noise=noise)
        with autocast if autocast is not None else contextlib.nullcontext():
            out = model(x_t, tb["timesteps"][t], **(model_kwargs or {}))
        if hasattr(out, "sample"):
            out = out.sample
        return ops.diffusion_loss(out, x0, t, tb["sqrt_alphas_cumprod"], tb["sqrt_one_minus_alphas_cumprod"],
                                  tb["loss_weights"], seed=seed, sample_offset=sample_offset,
                                  prediction=self.config.prediction, loss_type=self.config.loss,
                                  huber_delta=self.config.huber_delta, noise=noise)

    # -- reverse process ----------------------------------------------------------------
    def step(self, model_output, t, x_t, noise=None, *, seed: int | None = None, sample_offset: int | None = None,
             generator: torch.Generator | None = None, return_dict: bool = False):
        """One reverse step ``x_t -> x_{t-1}`` (diffusers' ``scheduler.step(model_output, timestep, sample)``).

        :param model_output: the model's prediction for ``(x_t, t)``.
        :param t: model timestep(s): int or ``[n]``; for a respaced process, one of its kept timesteps.
        :param x_t: current sample.
        :param noise: explicit standard normals; default: the noise contract's (slot = step index).
        :param seed, sample_offset: the noise contract's seed (default 0) and first sample index.
        :param generator: draw the noise diffusers' way instead, ``torch.randn(x_t.shape, generator=generator,
            dtype=model_output.dtype)`` on the generator's device, and only where diffusers' step draws it
            (DDPM: model timestep > 0; DDIM: ``eta > 0``), so a generator advances as in ``DDPMScheduler.step``
            / ``DDIMScheduler.step``.  This leaves the noise contract: the noise depends on the batch layout
            and the generator's state, not on ``(seed, sample index, step)``.
        :param return_dict: return a ``StepOutput(prev_sample, pred_original_sample)`` instead of a tensor.
        :return: float32 ``x_{t-1}``, or a ``StepOutput``.
        """
        if self.is_multistep:
            raise ValueError(f"sampler={self.config.sampler!r} keeps a history of model outputs: step with "
                             "fastddpm.multistep.MultistepSampler(process.multistep_plan(steps), x)")
        check_tensor("x_t", x_t, dtypes=FLOAT_DTYPES, min_ndim=2)
        check_tensor("model_output", model_output, dtypes=FLOAT_DTYPES, shape=x_t.shape, device=x_t.device)
        idx = self._step_index(t, x_t.shape[0], x_t.device)
        if generator is not None:
            noise = self._generator_noise(generator, noise, seed, sample_offset, t, model_output, x_t)
        coefs = self.tables(x_t.device)["coefs"]
        threshold = step_threshold(x_t.float(), model_output, idx, coefs, self.config.thresholding)
        x_prev = ops.ddpm_step(x_t.float(), model_output, idx, coefs, seed=check_seed(0 if seed is None else seed),
                               sample_offset=_check_sample_offset(sample_offset or 0, x_t.shape[0]),
                               clip_denoised=bool(self.config.clip_denoised), noise=noise, threshold=threshold)
        if not return_dict:
            return x_prev
        return StepOutput(x_prev, reference.predict_x0(x_t, model_output, coefs.index_select(0, idx),
                                                       bool(self.config.clip_denoised), threshold=threshold))

    def _generator_noise(self, generator, noise, seed, sample_offset, t, model_output, x_t) -> torch.Tensor:
        """``step``'s noise from a ``torch.Generator``, drawn where diffusers draws it (zeros elsewhere)."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        given = [name for name, v in (("noise", noise), ("seed", seed), ("sample_offset", sample_offset))
                 if v is not None]
        if given:
            given = "/".join(g + "=" for g in given)
            raise ValueError(f"give generator= or {given}, not both: generator draws the noise "
                             "diffusers' way, seed/sample_offset are the noise contract's, noise is explicit")
        if self.config.sampler == "ddim":
            draws = self.config.eta > 0
        else:
            draws = bool((torch.as_tensor(t) > 0).any())
        if not draws:
            return torch.zeros_like(x_t, dtype=torch.float32)
        z = torch.randn(x_t.shape, generator=generator, device=generator.device, dtype=model_output.dtype)
        return z.to(device=x_t.device, dtype=torch.float32)

    def sample(self, model, n: int, **kwargs):
        """Removed: sampling is ``fastddpm.sample(model, n, process=self)``.

        The sampler depends on this class (it builds the default process and
        resolves every one with :meth:`resolve`), so a method here that called
        it would close an import cycle; the one way to sample is the front door.
        """
        raise AttributeError("DDPM.sample was removed: call fastddpm.sample(model, n, process=process) "
                             "with the same keyword arguments")

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"config": ..., "timesteps": the respaced chain's}``: the whole chain, with ``begin_index``
        in the config, so ``from_dict`` makes the same chain and begins it at the same step."""
        d = {"config": self.config.to_dict()}
        if self.chain.is_respaced:
            d["timesteps"] = list(self.chain.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DDPM":
        if not isinstance(d, dict) or "config" not in d:
            raise ValueError("a DDPM dict needs a 'config' entry")
        process = cls(DiffusionConfig.from_dict(d["config"]))
        return process.respace(d["timesteps"]) if "timesteps" in d else process

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DDPM":
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        c = self.config
        steps = f", steps={self.chain.num_timesteps}" if self.chain.is_respaced else ""
        steps += f", begin_index={c.begin_index}" if c.begin_index else ""
        return (f"DDPM(T={c.num_timesteps}, schedule={c.schedule!r}, prediction={c.prediction!r}, "
                f"variance={c.variance!r}, clip_denoised={c.clip_denoised}, sampler={c.sampler!r}{steps})")
