"""The parts of ``fastddpm.Trainer`` (``fastddpm/trainer.py``: the loop and its wiring).

What makes a run reproducible and resumable exactly:

* data order: a permutation per epoch from a generator seeded by ``(seed, epoch)``;
  the position ``(epoch, index)`` is saved in each checkpoint;
* timesteps and flips: a generator seeded by ``(seed, step)``, no carried state;
* noise: the contract's ``normal(seed, offset)`` through ``ops.q_sample`` and
  ``ops.diffusion_loss`` with ``sample_offset`` the global example index
  (never torch's global RNG), so it is regenerated, not stored;
* dropout: torch's global RNG, whose state is saved in each checkpoint;
* the learning rate: a function of the step.

So 40 steps in one go and 20 steps + resume + 20 give the same tensors, bit
for bit, on the same device.  Metrics stay on the device and are read back
every ``log_every`` steps (and at validation, sampling and checkpoint steps).

Several processes (``torchrun``, ``torch.distributed`` initialised with more
than one rank; under ``torchrun`` the trainer initialises it itself, NCCL on
CUDA and gloo on the CPU): ``batch_size`` stays the *global* micro-batch and
must be divisible by the world size.  Every rank computes the same global
step (data positions, timesteps, flips) and takes its contiguous share of
each micro-batch, rows ``r * b/W ... (r+1) * b/W - 1``, with noise offsets
the examples' global indices; DistributedDataParallel averages the
gradients, which are then those of the global mean loss.  So W ranks follow
one process's trajectory up to floating-point rounding (sums split in other
places), dropout excepted: ranks > 0 draw their own dropout masks.  A
checkpoint holds global state only and resumes on any number of ranks.
Rank 0 alone writes files (checkpoints, logs, plots, samples); validation
is split over the ranks and the losses are summed with ``all_reduce``.

The parts:

* ``streams``: the seeded generator streams (data order, timesteps and flips, validation, dropout);
* ``batches``: the training and validation images and the exact-resume batch stream (flips by
  ``data.random_flip``'s halves);
* ``step``: the model as the steps run it (device, layout, DDP, compiled) and one optimizer step, the
  public ``train_step``;
* ``ema``: the EMA model and its update;
* ``meter``: the loop's device-side sums, non-finite steps, the smoothed loss;
* ``report``: the log row of a window, what ``train()`` returns;
* ``validation``: the validation loss;
* ``samples``: the EMA sample grid of a sampling step;
* ``checkpointing``: what a checkpoint holds besides the tensors, restoring it, when ``best`` is rewritten;
* ``rotation``: step checkpoint names, finding them, removing the old ones;
* ``resume``: what a resumed checkpoint must match, the optimizer state taken over;
* ``out_dir``: the output folder claimed (a run's or empty, locked, writable, with room) and its
  ``config.json``;
* ``plan``: the precision and layout a trainer picks, and why.

Tests: ``tests/test_train_batches.py``, ``tests/test_train_parts.py``; the whole loop and exact
resume in ``tests/test_trainer.py`` (``tests/test_trainer_ddp.py`` on several processes).
"""
