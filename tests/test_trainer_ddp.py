"""The trainer on several processes: 2 CPU ranks (gloo) follow one process's trajectory.

With the global batch fixed, rank ``r`` computes rows ``r * b/2 ...`` of every micro-batch with the
timesteps, flips and noise offsets one process gives those rows, and DDP averages the gradients, so
the two runs differ only by floating-point rounding (the batch mean is summed in two halves).  Each
test spawns 2 processes (tiny preset, 8x8 digits, dropout 0: dropout masks differ per rank) and
compares their result with a run in this process.  Rank 1 gets an out_dir of its own, which must stay
absent: only rank 0 writes files.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastddpm import DDPM
from fastddpm.checkpoint import load_checkpoint
from fastddpm.data import ArrayDataset, digits_dataset
from fastddpm.models import create_model
from fastddpm.trainer import TrainConfig, Trainer

from tolerances import FP32, assert_close

WORLD = 2
TIMEOUT_S = 150  # a rank that hangs fails the test instead of blocking it (generous: CI runs two test processes on 2 cores)
N_IMAGES = 22  # 18 for training with val_fraction 0.2: epochs end mid-batch (global batch 8)
# Adam divides each gradient by its running RMS, so a rounding difference in a gradient component
# near zero becomes a difference in the update of up to ~lr, and it compounds over steps.  Measured
# after 6 steps at lr 2e-4 (Ho et al.'s): max |diff| ~5e-6, 99.9th percentile ~3e-8, most elements
# equal; another data/noise stream (seed 1) differs by ~4e-4 (median) on 98% of the elements.  So
# 1e-5 passes rounding only.  (At lr 1e-3 a handful of elements reach ~2e-5: the bound scales with lr.)
AFTER_STEPS = dict(atol=1e-5, rtol=1e-5)
BASE = dict(lr=2e-4, ema_decay=0.9, grad_clip=1.0, random_flip=True, log_every=1, mixed_precision="no")


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images():
    return ArrayDataset(digits_dataset(image_size=8).images[:N_IMAGES].numpy())


def _trainer(out_dir, dataset, resume=False, **config):
    torch.manual_seed(0)  # model init (DDP broadcasts rank 0's anyway)
    return Trainer(create_model("tiny", dropout=0.0), DDPM(), dataset, TrainConfig(**config), out_dir,
                   device="cpu", resume=resume, progress=False)


def _weights(trainer) -> dict:
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v.detach().clone() for k, v in trainer.ema_model.state_dict().items()})
    return out


def _first_step(trainer) -> dict:
    """Loss and gradients of step 0 (gradient clipping off: the raw averaged gradients)."""
    loss, _, _ = trainer.train_step(0)
    return {"loss": loss.clone(), **{f"grad.{i}": p.grad.clone() for i, p in enumerate(trainer.model.parameters())}}


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# -- the ranks -----------------------------------------------------------------------------
def _rank_main(rank, port, job, tmp):
    """One rank: join the group, run ``job(rank, tmp)``; rank 0 saves its result to ``tmp/rank0.pt``,
    a failing rank its traceback to ``tmp/error<rank>.txt``."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S))
        try:
            out = job(rank, tmp)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank == 0 and out is not None:
            torch.save(out, tmp / "rank0.pt")
    except BaseException:
        (tmp / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def _spawn(job, tmp, monkeypatch):
    """Run ``job`` on 2 spawned ranks; return what rank 0's job returned."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # the ranks join by tcp, not from a torchrun env
        monkeypatch.delenv(name, raising=False)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, job, tmp), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S + 30
    # a rank that fails ends the run at once (the other would wait for it until the timeout)
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(tmp.glob("error*.txt")))
    assert not alive or any(p.exitcode not in (None, 0) for p in procs), \
        f"ranks hung (killed after {TIMEOUT_S + 30} s)\n{errors}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    return torch.load(tmp / "rank0.pt")


# -- 1. same weights as one process ---------------------------------------------------------------
EQUAL = dict(steps=6, batch_size=8, val_fraction=0.2, val_every=3, checkpoint_every=3, **BASE)


def _job_equal(rank, tmp):
    images = _images()
    with pytest.raises(ValueError, match="batch_size=7 is the global micro-batch.*divisible by the world size 2"):
        _trainer(tmp / f"bad{rank}", images, **{**EQUAL, "batch_size": 7})
    first = _first_step(_trainer(tmp / f"first{rank}", images, **{**EQUAL, "grad_clip": None}))
    trainer = _trainer(tmp / f"run{rank}", images, **EQUAL)
    assert trainer.local_batch_size == 4 and trainer.world_size == 2
    result = trainer.train()
    return {"first": first, "weights": _weights(trainer), "result": result}


def test_two_ranks_train_like_one_process(tmp_path, monkeypatch):
    got = _spawn(_job_equal, tmp_path, monkeypatch)
    images = _images()
    want_first = _first_step(_trainer(tmp_path / "one_first", images, **{**EQUAL, "grad_clip": None}))
    for k, v in want_first.items():  # one step: only the halved sums' rounding differs
        assert_close(got["first"][k], v, **FP32, msg=k)
    one = _trainer(tmp_path / "one", images, **EQUAL)
    result = one.train()
    want = _weights(one)
    assert got["weights"].keys() == want.keys()
    for k, v in want.items():
        assert_close(got["weights"][k], v, **AFTER_STEPS, msg=k)

    # logs: the all-reduced train loss and the split validation loss are the global ones
    rows, want_rows = _rows(tmp_path / "run0"), _rows(tmp_path / "one")
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows] == [1, 2, 3, 4, 5, 6]
    for r, w in zip(rows, want_rows):
        for key in ("loss", "grad_norm", "val_loss", "val_loss_ema"):
            if w[key] is None:
                assert r[key] is None, (r, w)
            else:
                assert r[key] == pytest.approx(w[key], rel=1e-4), (key, r, w)
    assert got["result"]["val_loss"] == pytest.approx(result["val_loss"], rel=1e-4)

    # rank 0 wrote the run; rank 1 wrote nothing at all
    names = sorted(p.name for p in (tmp_path / "run0" / "checkpoints").glob("*.safetensors"))
    assert names == ["best.safetensors", "step_0000003.safetensors", "step_0000006.safetensors"]
    ckpt = load_checkpoint(tmp_path / "run0" / "checkpoints" / "step_0000006.safetensors")
    assert ckpt.metadata["world_size"] == 2 and ckpt.metadata["train_config"]["batch_size"] == 8
    for k, v in got["weights"].items():
        assert torch.equal(ckpt.tensors[k], v), k
    assert json.loads((tmp_path / "run0" / "config.json").read_text())["world_size"] == 2
    for d in ("bad1", "first1", "run1"):
        assert not (tmp_path / d).exists(), d


# -- 2. resume on another number of ranks ---------------------------------------------------------
# gradient accumulation too: micro-batches of 4 (2 per rank), 2 of them per step
RESUME = dict(batch_size=4, grad_accum=2, checkpoint_every=3, val_fraction=0.2, val_every=3, **BASE)


def _job_resume(rank, tmp):
    images = _images()
    # a 2-rank run of 3 steps, for one process to resume
    _trainer(tmp / f"two{rank}", images, steps=3, **RESUME).train()
    # a 1-process checkpoint (written by the parent) resumed on 2 ranks up to step 6
    resumed = _trainer(tmp / f"two_resumed{rank}", images, steps=6,
                       resume=tmp / "one_half" / "checkpoints" / "step_0000003.safetensors", **RESUME)
    assert resumed.step == 3
    resumed.train()
    return {"weights": _weights(resumed)}


def test_resume_on_any_number_of_ranks(tmp_path, monkeypatch):
    images = _images()
    _trainer(tmp_path / "one_half", images, steps=3, **RESUME).train()
    got = _spawn(_job_resume, tmp_path, monkeypatch)
    whole = _trainer(tmp_path / "one_whole", images, steps=6, **RESUME)
    whole.train()
    want = _weights(whole)

    # 2 ranks -> 1 process
    resumed = _trainer(tmp_path / "two0", images, steps=6, resume=True, **RESUME)
    assert resumed.step == 3
    resumed.train()
    for k, v in _weights(resumed).items():
        assert_close(v, want[k], **AFTER_STEPS, msg=f"2 ranks -> 1: {k}")
    # 1 process -> 2 ranks
    for k, v in got["weights"].items():
        assert_close(v, want[k], **AFTER_STEPS, msg=f"1 -> 2 ranks: {k}")
    rows = _rows(tmp_path / "two0")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r, w in zip(rows, _rows(tmp_path / "one_whole")):
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-4), (r, w)
    assert not (tmp_path / "two1").exists() and not (tmp_path / "two_resumed1").exists()


# -- 3. under torchrun, one shared out_dir -------------------------------------------------------
TORCHRUN_SCRIPT = """
import sys
import torch
from fastddpm import DDPM
from fastddpm.data import ArrayDataset, digits_dataset
from fastddpm.models import create_model
from fastddpm.trainer import TrainConfig, Trainer

torch.set_num_threads(1)
torch.manual_seed(0)
images = ArrayDataset(digits_dataset(image_size=8).images[:{n}].numpy())
config = TrainConfig.from_json(sys.argv[2])
trainer = Trainer(create_model("tiny", dropout=0.0), DDPM(), images, config, sys.argv[1], device="cpu",
                  progress=False)
assert trainer.world_size == 2 and torch.distributed.is_initialized()  # the trainer joined torchrun's group
trainer.train()
"""
TORCHRUN = dict(steps=4, batch_size=8, checkpoint_every=2, **BASE)


def test_torchrun_shared_out_dir(tmp_path):
    """``torchrun --nproc_per_node 2``: the Trainer joins the group itself; in one shared out_dir the
    files are those of a one-process run (each log row once) and the weights agree with it."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT.format(n=N_IMAGES)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path / "run"),
           TrainConfig(**TORCHRUN).to_json()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: a new session of their own
        out, _ = proc.communicate()
        pytest.fail(f"torchrun hung\n{out[-3000:]}")
    assert proc.returncode == 0, out[-6000:]

    one = _trainer(tmp_path / "one", _images(), **TORCHRUN)
    one.train()
    run, ref = tmp_path / "run", tmp_path / "one"
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert listing(run) == listing(ref)
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    ckpt = load_checkpoint(run / "checkpoints" / "step_0000004.safetensors")
    for k, v in _weights(one).items():
        assert_close(ckpt.tensors[k], v, **AFTER_STEPS, msg=k)
