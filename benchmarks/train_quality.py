"""The quality check of ``bench_train.py --quality``: the fast training path reaches the
reference path's Fréchet distance.

``run_quality`` trains the ``small`` preset on digits twice from the same seed and
initial weights, once with the reference stage and once with a fast stage, samples
both EMA models with the same sampler and noise, and compares their Fréchet
distances to the digits (``fastddpm.metrics.fid``, feature ``digits``) within a
tolerance.  The module docstring of ``bench_train.py`` gives the recipe and the
tolerance.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import environment, error_line, free_memory, write_results
from train_rows import PACKAGES, STAGE_BY_NAME, T, BenchConfig, Skipped, fastddpm_trainer

from fastddpm import DDPM, ops

QUALITY_COLUMNS = ["path", "stage", "steps", "train_s", "images/s", "samples", "sample_steps", "fd", "note"]


def run_quality(cfg: BenchConfig, stage_name: str, steps: int, n_samples: int, sample_steps: int | None,
                rel_tol: float, abs_tol: float, name: str, out_dir) -> tuple[Path, Path]:
    """Train ``small`` on digits with the reference path and with ``stage_name``'s path, then
    compare the Fréchet distances of their samples to the digits."""
    from fastddpm.data import digits_dataset
    from fastddpm.metrics import fid
    from fastddpm.sampling import sample

    digits = digits_dataset(16)
    rows = []
    # the README's recipe for the shipped digits model, shortened; the EMA averages the second half only,
    # so that short runs do not sample a model dragged back towards its random start
    recipe = dict(steps=steps, lr=5e-4, warmup_steps=min(100, steps // 10), ema_decay=0.999, ema_start=steps // 2,
                  checkpoint_every=0, keep_best=False, keep_last=1, log_every=steps, val_every=0, sample_every=0)
    for path, stage in (("reference", STAGE_BY_NAME["reference"]), ("fast", STAGE_BY_NAME[stage_name])):
        row = dict(path=path, stage=stage.name, steps=steps, samples=n_samples, sample_steps=sample_steps or T)
        try:
            with tempfile.TemporaryDirectory(prefix="bench_train_quality_") as tmp:
                trainer, ops_backend, _ = fastddpm_trainer(stage, cfg, digits, tmp, **recipe)
                t0 = time.perf_counter()
                with ops.use_backend(ops_backend):
                    trainer.train()
                row["train_s"] = time.perf_counter() - t0
                row["images/s"] = steps * cfg.batch / row["train_s"]
                # the same sampler (automatic backends) and noise for both: only the training differs
                images = sample(trainer.ema_model.set_attention_backend(None), n_samples, steps=sample_steps,
                                seed=cfg.seed + 1, progress=False, process=DDPM(), device=cfg.device)
            row["fd"] = fid(images, digits.images, feature="digits")
        except Skipped as e:
            row["note"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 -- recorded in the results
            row["note"] = f"failed: {error_line(e)}"
        finally:
            free_memory(cfg.device)
        rows.append(row)
        print(f"{path:9s} {stage.name:10s} " + (f"FD {row['fd']:.2f}  ({row['train_s']:.1f} s training)"
                                                if "fd" in row else row.get("note", "")))
    ref, fast = (r.get("fd") for r in rows)
    key = "goal: fast path reaches the reference path's FD"
    if ref is None or fast is None:
        verdict = "not evaluated: a path failed"
    else:
        allowed = ref + max(rel_tol * ref, abs_tol)
        verdict = f"{'met' if fast <= allowed else 'not met'}: {fast:.2f} vs {ref:.2f} (allowed <= {allowed:.2f})"
    print(f"{key}: {verdict}")
    meta = environment(cfg.device, PACKAGES) | {
        "preset": cfg.preset, "batch": cfg.batch, "train steps": steps, "seed": cfg.seed,
        "recipe": {k: v for k, v in recipe.items() if k in ("lr", "warmup_steps", "ema_decay", "ema_start")},
        "reference images": f"digits ({len(digits)})", "feature": "digits",
        "tolerance": f"max({rel_tol:g} x FD_reference, {abs_tol:g})", key: verdict,
    }
    json_path, md_path = write_results(name, rows, QUALITY_COLUMNS, meta, out_dir=out_dir)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path
