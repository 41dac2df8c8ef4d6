"""``fastddpm.Trainer``: the DDPM training loop (Ho et al. Algorithm 1), resumable bit for bit.

Each step draws ``x0`` from the data, ``t ~ U{0..T-1}`` and ``eps`` from the
noise contract, and descends ``|| target - model(x_t, t) ||^2`` (or the
process's loss).  A run resumes exactly: 40 steps in one go and 20 steps +
resume + 20 give the same tensors, bit for bit, on the same device; under
``torchrun`` W ranks follow one process's trajectory up to rounding.  How,
and the parts this module puts together, are in ``fastddpm.training``
(``training/__init__.py``).

The step itself is the fast one wherever the device has it: the noising and
the loss are the fused ops of ``fastddpm.ops`` (Triton or C++ on a GPU, C++
on a CPU; the noise is regenerated in the backward, never stored), bf16
autocast with the model in channels_last on a GPU (``mixed_precision``,
``channels_last``), ``torch.compile`` of the model if asked for
(``compile``), Adam(W) with ``fused=True`` on CUDA, the EMA as one
``_foreach_lerp_``, and fastddpm's U-Net attention through the fused kernel.
A non-finite step stops training (``nonfinite='error'``) or is left out on
the device (``'skip'``).

Class-conditional training (``TrainConfig(class_cond=True)``): the model is conditional
(``create_model(..., num_classes=K)``, or a diffusers ``UNet2DModel(num_class_embeds=K + 1)``, whose
``fastddpm_null_class`` the trainer sets to K), the dataset has labels (``dataset.labels`` and
``dataset.class_names``, checked here against K; or ``(images, labels)``), and each step's labels reach
the model by its family's keyword (``ModelAdapter.label_kwargs``), each replaced by the null class with
probability ``cond_drop`` (classifier-free guidance, Ho & Salimans 2022) from the seeded step stream.

The output directory (checkpoints, metrics, the loss curve, samples, ``config.json``) is described in
``training/out_dir.py``; a folder that holds anything else and no fastddpm ``config.json`` is refused.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter
from .checkpoint import load_checkpoint, save_checkpoint
from .data import load_dataset
from .dataset_labels import dataset_labels
from .diffusion import DDPM
from .distributed import dist_info, join_torchrun_group, process_device
from .run_dir import RunDirLock
from .run_log import RunLog
from .stop_signals import StopOnSignal
from .train_config import TrainConfig
from .training.batches import TrainBatches, check_dataset, model_image_shape
from .training.checkpointing import checkpoint_state, estimated_checkpoint_bytes, is_new_best, restore_checkpoint
from .training.ema import EMA
from .training.meter import StepMeter
from .training.out_dir import claim_out_dir, write_run_config
from .training.plan import resolve_channels_last, resolve_precision, training_reasons
from .training.report import train_result, window_row
from .training.resume import check_resumable
from .training.rotation import checkpoints_in, latest_checkpoint, remove_old_checkpoints, step_name, step_of
from .training.samples import save_sample_grid
from .training.schedule import due_after
from .training.step import learning_rate, make_optimizer, prepare_model, train_step
from .training.streams import dropout_seed
from .training.validation import validation_losses

__all__ = ["TrainConfig", "Trainer"]



def _conditional_classes(model: nn.Module) -> tuple[int, int]:
    """``(K, null class)`` of a model to train class-conditionally: fastddpm's ``UNet(num_classes=K)``
    (null class K), or a diffusers ``UNet2DModel(num_class_embeds=K + 1)``, whose ``fastddpm_null_class``
    is set to K here (the adapter and checkpoints read it)."""
    adapter = ModelAdapter(model)
    if adapter.kind == "diffusers":
        embeds = getattr(model.config, "num_class_embeds", None)
        if not embeds or embeds < 2 or getattr(model.config, "class_embed_type", None) is not None:
            raise ValueError(f"class_cond=True needs a diffusers UNet2DModel with num_class_embeds=K + 1 (K classes "
                             f"and the null class K), got num_class_embeds={embeds!r}")
        if getattr(model, "fastddpm_null_class", None) is None:
            model.fastddpm_null_class = embeds - 1
        elif model.fastddpm_null_class != embeds - 1:
            raise ValueError(f"the model's fastddpm_null_class {model.fastddpm_null_class} is not its last class "
                             f"embedding {embeds - 1}")
        return embeds - 1, embeds - 1
    if adapter.kind != "fastddpm" or adapter.num_classes is None or adapter.null_class is None:
        raise ValueError(f"class_cond=True needs a class-conditional model: create_model(preset, num_classes=K) "
                         f"(or a diffusers UNet2DModel(num_class_embeds=K + 1)); {type(model).__name__} has no "
                         f"classes")
    return adapter.num_classes, adapter.null_class


# -- the trainer ---------------------------------------------------------------------------
class Trainer:
    """Train ``model`` on ``dataset`` with the loss of ``process``.

    ::

        trainer = Trainer(create_model("small"), DDPM(), load_dataset("digits"),
                          TrainConfig(steps=5000, batch_size=64), "runs/digits")
        metrics = trainer.train()

    :param model: an ``nn.Module`` ``model(x_t, t) -> prediction`` (fastddpm's ``UNet``
        for ``load_model`` to rebuild it from a checkpoint).
    :param process: the ``DDPM`` (not respaced) whose loss is trained.
    :param dataset: a sized dataset of float32 ``[C, H, W]`` tensors in [-1, 1]; with ``class_cond`` one
        with ``labels`` (and ``class_names``), e.g. ``load_dataset("digits")``, or a pair ``(images,
        labels)`` of an array or tensor and its labels.
    :param config: a ``TrainConfig`` (or its dict).
    :param out_dir: where checkpoints, logs and samples go (created).  A folder that holds other
        files and is not a fastddpm run is refused; while the trainer writes there (construction,
        ``resume``, ``train``) it holds the folder's lock, and a second trainer is refused.
    :param device: default: CUDA if available (under several processes, GPU ``LOCAL_RANK``), else CPU.
    :param resume: True: continue from the newest checkpoint in ``out_dir/checkpoints``
        if there is one (start fresh otherwise); a path: continue from that checkpoint.
        Every rank loads it; it may come from a run on another number of ranks.
    :param progress: show a tqdm bar (on rank 0).

    Under ``torchrun`` (or with ``torch.distributed`` initialised by the caller) every rank
    constructs the Trainer with the same arguments; see the module docstring.
    """

    def __init__(self, model: nn.Module, process: DDPM, dataset, config: TrainConfig | dict | None = None,
                 out_dir="runs/fastddpm", device=None, *, resume=False, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(process, DDPM):
            raise TypeError(f"process must be a fastddpm.DDPM, got {type(process).__name__}")
        if process.schedule.is_respaced:
            raise ValueError("process is respaced (a sampler); train with the full process and respace to sample")
        config = TrainConfig() if config is None else config
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.process = process
        self.device = process_device(device)
        join_torchrun_group(self.device)
        self.rank, self.world_size = dist_info()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size={config.batch_size} is the global micro-batch and must be divisible by "
                             f"the world size {self.world_size} (each rank computes batch_size / world_size)")
        self.local_batch_size = config.batch_size // self.world_size
        if self.device.type == "cuda" and self.world_size > 1:
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(config.mixed_precision, self.device)
        self.channels_last = resolve_channels_last(config.channels_last, self.device, self.precision)
        self.reasons = training_reasons(config, self.device, self.precision, self.channels_last)
        self.progress = progress
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"

        # self.model: the plain module (EMA, checkpoints, validation); self.train_model: what the steps call
        self.num_classes = self.null_class = self.class_names = None
        if config.class_cond:
            self.num_classes, self.null_class = _conditional_classes(model)
        self.model, self.ddp, self.train_model = prepare_model(model, self.device, channels_last=self.channels_last,
                                                               world_size=self.world_size, compile_mode=config.compile)
        self.ema = EMA(self.model, config.ema_decay_at)
        self.ema_model = self.ema.model
        self.params = self.ema.source_params  # the trainable parameters
        if not self.params:
            raise ValueError("model has no trainable parameters")
        self._adapter = ModelAdapter(self.model)  # the plain module's family: DDP or compiled wrappers hide it
        self.optimizer = make_optimizer(self.params, config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        if isinstance(dataset, tuple):
            dataset = load_dataset(dataset)
        self.image_shape = check_dataset(dataset, model_image_shape(self.model))
        self.dataset = dataset
        labels = self._class_setup(dataset) if config.class_cond else None
        self.batches = TrainBatches.split(
            dataset, config.val_fraction, config.seed, num_steps=process.num_steps, batch_size=config.batch_size,
            grad_accum=config.grad_accum, random_flip=config.random_flip, device=self.device, rank=self.rank,
            world_size=self.world_size, labels=labels, cond_drop=config.cond_drop if labels is not None else 0.0,
            null_class=self.null_class)
        self.train_indices, self.val_indices = self.batches.train_indices, self.batches.val_indices
        # rank 0 holds the run directory's lock while it writes there: here and in train()
        self._lock = RunDirLock(self.out_dir)
        if self.is_main:
            claim_out_dir(self.out_dir, self._lock, config.keep_last, config.keep_best,
                          self.estimated_checkpoint_bytes())
        try:
            self._init_state(resume)
        finally:
            self._lock.release()

    def _class_setup(self, dataset) -> torch.Tensor:
        """The dataset's labels, checked against the model's classes; records the class names on the model
        (and its EMA copy), so checkpoints and ``load_model`` carry them."""
        found = dataset_labels(dataset)
        if found is None:
            raise ValueError(f"class_cond=True needs a dataset with class labels, but {type(dataset).__name__} has "
                             f"none (digits, an image folder of one subfolder per class, an .npz with a 'y' or "
                             f"'labels' array, or (images, labels) have them)")
        labels, names = found
        k = self.num_classes
        if len(names) != k:
            raise ValueError(f"the dataset has {len(names)} classes ({', '.join(names[:10])}"
                             f"{', ...' if len(names) > 10 else ''}) but the model {k}: build it with "
                             f"num_classes={len(names)}")
        self.class_names = names
        for m in (self.model, self.ema_model):
            m.class_names = list(names)
        return labels

    def label_kwargs(self, labels: torch.Tensor) -> dict:
        """How the trained model takes class labels: ``{keyword: labels}`` (its family's, ``ModelAdapter``)."""
        return self._adapter.label_kwargs(labels)

    def explain(self) -> str:
        """What this trainer runs with and why, one choice a line."""
        return "\n".join(self.reasons)

    def _init_state(self, resume) -> None:
        """The training state (all of it goes into each checkpoint): step 0, or the checkpoint's."""
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.last_val: dict | None = None
        self.elapsed_before = 0.0
        self.meter = StepMeter(self.device)  # device-side sums of the loop, the smoothed loss
        self.skipped_steps = 0  # nonfinite='skip': steps left out so far
        self.log = RunLog(self.out_dir, writes=self.is_main)
        self._resumed_from: Path | None = None
        if resume:
            self.resume(None if resume is True else resume, missing_ok=resume is True)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files."""
        return self.rank == 0

    # -- setup -------------------------------------------------------------------------
    def estimated_checkpoint_bytes(self) -> int:
        """Model + EMA + Adam's two moments, plus a little."""
        return estimated_checkpoint_bytes(self.model)

    # -- step pieces ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warmup to ``lr``."""
        return learning_rate(self.config, step)

    def train_step(self, step: int):
        """Optimizer step ``step`` (0-based) on the next batch of the stream, then the EMA update: what
        ``train()`` runs each step.  Returns ``training.step.train_step``'s ``(loss, grad_norm, ok)``."""
        c = self.config
        x0, t, labels = self.batches.next_batch(step)
        out = train_step(self.train_model, self.optimizer, self.process, x0, t, step=step, lr=self.lr_at(step),
                         seed=c.seed, batch_size=c.batch_size, grad_accum=c.grad_accum, params=self.params,
                         grad_clip=c.grad_clip, nonfinite=c.nonfinite, precision=self.precision,
                         scaler=self.scaler, ddp=self.ddp, rank=self.rank, world_size=self.world_size,
                         labels=labels, label_kwargs=self.label_kwargs)
        self.ema.update(step, out[2])
        return out

    # -- validation and samples ------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the model and of the EMA model on the held-out images, with fixed
        timesteps (spread evenly over [0, T)) and fixed noise: the same every call."""
        was_training = self.model.training
        self.model.eval()
        try:
            return validation_losses({"val_loss": self.model, "val_loss_ema": self.ema_model}, self.process,
                                     self.batches, self.config.seed, self.precision, label_kwargs=self.label_kwargs)
        finally:
            self.model.train(was_training)

    def save_samples(self, step: int) -> Path:
        """An EMA sample grid at ``out_dir/samples/step_XXXXXXX.png`` (seed 0: comparable across steps); one
        row per class in a class-conditional run."""
        return save_sample_grid(self.ema_model, self.process, self.out_dir / "samples" / f"{step_name(step)}.png",
                                n=self.config.sample_n, steps=self.config.sample_steps, device=self.device,
                                num_classes=self.num_classes)

    # -- checkpoints -----------------------------------------------------------------------
    @staticmethod
    def checkpoints_in(out_dir) -> list[Path]:
        """The ``step_*.safetensors`` checkpoints of a run, oldest first."""
        return checkpoints_in(out_dir)

    @staticmethod
    def latest_checkpoint(out_dir) -> Path | None:
        """The newest step checkpoint of a run (None if it has none)."""
        return latest_checkpoint(out_dir)

    def _state(self) -> dict:
        return checkpoint_state(process=self.process, config=self.config, step=self.step, batches=self.batches,
                                best_metric=self.best_metric, best_step=self.best_step, last_val=self.last_val,
                                meter=self.meter, skipped_steps=self.skipped_steps, elapsed=self._elapsed(),
                                precision=self.precision, scaler=self.scaler, world_size=self.world_size)

    def save(self, path) -> Path:
        """Write a resumable checkpoint of the current state at ``path`` (on rank 0; other ranks write
        nothing and return ``path``)."""
        if not self.is_main:
            return Path(path)
        return save_checkpoint(path, model=self.model, ema=self.ema_model, optimizer=self.optimizer,
                               state=self._state())

    def _checkpoint(self) -> Path:
        """A step checkpoint, and older ones beyond ``keep_last`` removed (rank 0 only)."""
        path = self.save(self.checkpoint_dir / f"{step_name(self.step)}.safetensors")
        if self.is_main:
            remove_old_checkpoints(self.out_dir, self.step, self.config.keep_last)
        return path

    def _improves(self, metric: float | None) -> bool:
        """Record ``metric`` as the best if it is; True when ``best.safetensors`` should be rewritten."""
        if not self.config.keep_best or not is_new_best(metric, self.best_metric):
            return False
        self.best_metric, self.best_step = metric, self.step
        return True

    def resume(self, path=None, *, missing_ok: bool = False) -> int:
        """Continue from a checkpoint (default: the newest in ``out_dir/checkpoints``).

        Restores model, EMA, optimizer, grad scaler, data position, RNG state and
        log files (rows after the checkpoint's step are dropped).  Every rank calls it;
        the checkpoint's state is global, so it may come from another number of ranks.
        :return: the step resumed at (0 if ``missing_ok`` and there is none).
        :raises RunDirInUseError: another trainer is writing in ``out_dir``.
        """
        locked_here = self.is_main and not self._lock.held
        if locked_here:
            self._lock.acquire()
        try:
            return self._resume(path, missing_ok)
        finally:
            if locked_here:
                self._lock.release()

    def _resume(self, path, missing_ok: bool) -> int:
        if path is None:
            path = self.latest_checkpoint(self.out_dir)
            if path is None:
                if missing_ok:
                    return 0
                raise FileNotFoundError(f"no checkpoint to resume from in {str(self.checkpoint_dir)!r}")
        ckpt = load_checkpoint(path)
        where = repr(str(ckpt.path))
        later = [p.name for p in self.checkpoints_in(self.out_dir) if step_of(p) > ckpt.step]
        if later and self.is_main:
            warnings.warn(f"resuming from step {ckpt.step} of {where} while {str(self.checkpoint_dir)!r} holds later "
                          f"checkpoints ({', '.join(later)}); they will be overwritten as training reaches them",
                          RuntimeWarning, stacklevel=3)
        check_resumable(ckpt, self.model, self.process, self.config, self.train_indices.numel())
        done = restore_checkpoint(ckpt, model=self.model, ema_model=self.ema_model, optimizer=self.optimizer,
                                  scaler=self.scaler, batches=self.batches, meter=self.meter)
        self.step, self.skipped_steps, self.elapsed_before = done.step, done.skipped_steps, done.elapsed
        self.best_metric, self.best_step, self.last_val = done.best_metric, done.best_step, done.last_val
        ckpt.restore_rng()  # rank 0's dropout stream: the checkpoint holds no other
        if self.is_main:
            self.log.truncate(self.step)
        else:  # a stream of its own, from the step (so dropout on ranks > 0 is not resumed bit for bit)
            torch.manual_seed(dropout_seed(self.config.seed, self.rank, self.step))
        self._resumed_from = ckpt.path
        return self.step

    def plot_loss(self) -> Path | None:
        """``out_dir/loss.png`` from the logged rows (rank 0 only; None elsewhere)."""
        return self.log.plot()

    def _elapsed(self) -> float:
        start = getattr(self, "_t_start", None)
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> dict:
        """Train up to ``config.steps``; returns the final metrics.

        SIGINT (Ctrl-C) or SIGTERM in a single process: the step under way is finished, a checkpoint
        written and the metrics returned early, with ``stopped_by`` the signal's name (None after a
        full run); a second signal raises ``SystemExit(128 + signum)`` at once.

        :raises FloatingPointError: a non-finite loss (named by step), before any checkpoint holds it.
        :raises RunDirInUseError: another trainer (in any process) is writing in ``out_dir``.
        """
        if self.is_main:
            self._lock.acquire()
        try:
            return self._train()
        finally:
            self._lock.release()

    def _train(self) -> dict:
        c = self.config
        if self.step == 0 and self._resumed_from is None:
            if self.checkpoints_in(self.out_dir):
                raise ValueError(f"out_dir {str(self.out_dir)!r} already holds checkpoints of a run: pass "
                                 f"resume=True (--resume on the command line) to continue it, or choose another "
                                 f"out_dir")
            # dropout draws from the global RNG; rank 0's state is checkpointed
            torch.manual_seed(c.seed if self.is_main else dropout_seed(c.seed, self.rank, 0))
            self.log.start()
        if self.is_main:
            write_run_config(self.out_dir, self.model, self.process, self.config, precision=self.precision,
                             device=self.device, world_size=self.world_size)

        self._t_start = time.perf_counter()
        meter = self.meter
        meter.reset()
        t_window = time.perf_counter()
        t_saved = t_window  # when the last checkpoint was written (checkpoint_minutes)
        last_row: dict = {}
        last_ckpt: Path | None = None
        has_val = self.val_indices.numel() > 0
        bar = tqdm(total=c.steps, initial=self.step, disable=not (self.progress and self.is_main), desc="training",
                   unit="step", dynamic_ncols=True)
        # SIGINT/SIGTERM: finish the step, checkpoint, return (one process only: ranks would stop at other steps)
        stopper = StopOnSignal(enabled=self.world_size == 1)
        try:
            with stopper:
                while self.step < c.steps:
                    step = self.step
                    stopper.doing = f"step {step + 1}"
                    loss, grad_norm, ok = self.train_step(step)
                    self.step = done = step + 1
                    meter.add(done, loss, grad_norm, ok)  # device-side bookkeeping: no host synchronisation
                    bar.update(1)

                    stop = stopper.received is not None
                    # time-based checkpoints: rank 0's clock decides (other ranks write nothing, and nothing
                    # below is collective but validation, which keeps to its step schedule)
                    overdue = bool(c.checkpoint_minutes) and time.perf_counter() - t_saved >= 60 * c.checkpoint_minutes
                    due = due_after(c, done, has_val=has_val, stop=stop, overdue=overdue)
                    if not due:
                        continue

                    # never validate, sample or save a poisoned model
                    meter.check(self.step, lambda: self.latest_checkpoint(self.out_dir))
                    now = time.perf_counter()
                    mean_loss, mean_norm, window, kept = meter.take_window(skipping=ok is not None)
                    self.skipped_steps += window - kept
                    row = window_row(done, loss=mean_loss, lr=self.lr_at(step), grad_norm=mean_norm, steps=window,
                                     kept=kept, images_per_step=c.effective_batch_size, seconds=now - t_window,
                                     elapsed=self._elapsed())
                    if due.validate:
                        self.last_val = self.validate()
                        row.update(self.last_val)
                    self.log.append(row)
                    last_row = row
                    bar.set_postfix(loss=f"{row['loss']:.4f}" if kept else "skipped",
                                    **({"val": f"{row['val_loss']:.4f}"} if due.validate else {}))
                    if due.sample and self.is_main:
                        self.save_samples(done)
                    # best: by validation loss where validated, else by smoothed train loss at checkpoints
                    metric = (row["val_loss"] if due.validate else
                              self.smoothed_loss() if not has_val and due.checkpoint else None)
                    improved = self._improves(metric)  # decided first, so the step checkpoint records it
                    if due.checkpoint:
                        last_ckpt = self._checkpoint()
                        self.plot_loss()
                        t_saved = time.perf_counter()
                    if improved:
                        self.save(self.checkpoint_dir / "best.safetensors")
                    t_window = time.perf_counter()  # do not count validation, samples and saving as training time
                    if stop:
                        break
        finally:
            bar.close()
            self.elapsed_before = self._elapsed()
            self._t_start = None
        if self.world_size > 1:
            dist.barrier()  # every rank returns once rank 0's last checkpoint is on disk
        return train_result(step=self.step, last_row=last_row, smoothed_loss=self.smoothed_loss(),
                            last_val=self.last_val, best_metric=self.best_metric, best_step=self.best_step,
                            skipped_steps=self.skipped_steps, elapsed=self.elapsed_before,
                            checkpoint=str(last_ckpt or self.latest_checkpoint(self.out_dir) or ""),
                            stopped_by=stopper.received)

    def smoothed_loss(self) -> float | None:
        """Bias-corrected exponential moving average of the train loss (None before any step)."""
        return self.meter.smoothed_loss()
