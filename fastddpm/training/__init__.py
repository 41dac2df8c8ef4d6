"""The parts of ``fastddpm.Trainer`` (``fastddpm/trainer.py``: the loop, checkpoints, resume).

* ``streams``: the seeded generator streams (data order, timesteps and flips, validation, dropout);
* ``batches``: the training and validation images and the exact-resume batch stream;
* ``step``: one optimizer step, the public ``train_step``;
* ``ema``: the EMA model and its update;
* ``rotation``: step checkpoint names, finding them, removing the old ones;
* ``plan``: the precision and layout a trainer picks, and why.
"""
