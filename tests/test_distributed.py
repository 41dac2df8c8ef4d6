"""fastddpm.distributed: shards, and 2 gloo processes on the CPU drawing what one process draws."""
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastddpm
from fastddpm.distributed import dist_info, sample_distributed, shard_range
from fastddpm.models import create_model
from toy_models import LabelledPointwise, Pointwise
from tolerances import PEER, assert_close

WORLD_SIZE = 2
JOIN_SECONDS = 120  # the children finish in seconds; this only turns a hang into a failure




class FailsOnRank1(Pointwise):
    def forward(self, x, t):
        if dist.get_rank() == 1:
            raise ValueError("rank 1 cannot sample")
        return super().forward(x, t)


def tiny_unet():
    torch.manual_seed(0)
    return create_model("tiny", dropout=0.0).eval()


# name: (model factory, n, sample keyword arguments)
CASES = {
    "pointwise_5": (Pointwise, 5, dict(steps=5, seed=3)),                     # shards 3 + 2
    "pointwise_1": (Pointwise, 1, dict(steps=5, seed=3)),                     # shards 1 + 0
    "pointwise_offset": (Pointwise, 4, dict(steps=5, seed=7, sample_offset=9, batch_size=1)),
    "unet_3": (tiny_unet, 3, dict(steps=3, seed=1)),
    # labels, a per-sample model keyword and the doubled guidance batch, sliced with each shard's samples
    "labelled_guided_5": (LabelledPointwise, 5, dict(steps=4, seed=2, class_labels=[0, 2, 1, 1, 0], guidance_scale=2.5,
                                                     model_kwargs={"shift": torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05])},
                                                     sample_offset=3, batch_size=2)),
    "labelled_dpm_noise_3": (LabelledPointwise, 3, dict(sampler="dpm++2m", steps=4, class_labels=1, guidance_scale=3.0,
                                                        noise=torch.linspace(-2, 2, 3 * 72).reshape(3, 2, 6, 6))),
}


def _inpaint_args():
    """5 images, two masks, class-conditional guided RePaint: the images, masks and labels sliced per shard."""
    image = torch.linspace(-1, 1, 5 * 72).reshape(5, 2, 6, 6)
    mask = torch.zeros(5, 1, 6, 6)
    mask[:, :, :3] = 1
    mask[4] = 0
    return (LabelledPointwise(), image, mask), dict(steps=6, jump_length=2, jump_n_sample=2, seed=5, class_labels=[0, 1, 2, 0, 1],
                                                    guidance_scale=2.0, batch_size=2, progress=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every case, then a failing model; results and errors go to files."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                                timeout=timedelta(seconds=60))
        results = {"dist_info": torch.tensor(dist_info())}
        for name, (factory, n, kwargs) in CASES.items():
            results[name] = sample_distributed(factory(), n, **kwargs)
        args, kwargs = _inpaint_args()
        results["inpaint_5"] = fastddpm.inpaint(*args, distributed=True, **kwargs)
        try:
            sample_distributed(FailsOnRank1(), 3, steps=2)
        except Exception as e:  # noqa: BLE001
            results["error"] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """What each of 2 spawned gloo ranks returned, per case (one spawn for the module: startup is the cost)."""
    out_dir = tmp_path_factory.mktemp("distributed")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned children
    try:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(rank, port, str(out_dir)), daemon=True)
                 for rank in range(WORLD_SIZE)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_SECONDS)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    errors = "".join((out_dir / f"rank{r}.err").read_text() for r in range(WORLD_SIZE)
                     if (out_dir / f"rank{r}.err").exists())
    assert not hung, f"{len(hung)} rank(s) still running after {JOIN_SECONDS} s\n{errors}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _single_process(name):
    factory, n, kwargs = CASES[name]
    return fastddpm.sample(factory(), n, progress=False, **kwargs)


# -- two processes ---------------------------------------------------------------------------------
def test_each_rank_knows_its_place(gathered):
    assert [tuple(r["dist_info"].tolist()) for r in gathered] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("name", ["pointwise_5", "pointwise_1", "pointwise_offset", "labelled_guided_5",
                                  "labelled_dpm_noise_3"])
def test_batch_invariant_model_equals_one_process_exactly(gathered, name):
    expected = _single_process(name)
    for rank in range(WORLD_SIZE):
        assert torch.equal(gathered[rank][name], expected), f"rank {rank}"


def test_inpainting_equals_one_process_exactly(gathered):
    args, kwargs = _inpaint_args()
    expected = fastddpm.inpaint(*args, **kwargs)
    for rank in range(WORLD_SIZE):
        assert torch.equal(gathered[rank]["inpaint_5"], expected), f"rank {rank}"


def test_unet_equals_one_process(gathered):
    """Up to rounding: a U-Net's convolutions round differently for other batch sizes (~7e-7 per
    forward here), and x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies that by up to
    ~150 at t near T: 3e-6 to 1.3e-5 after 3 steps, by the attention kernel SDPA picks."""
    expected = _single_process("unet_3")
    for rank in range(WORLD_SIZE):
        assert_close(gathered[rank]["unet_3"], expected, **PEER, msg=f"rank {rank}")


def test_a_failing_rank_fails_every_rank_instead_of_hanging(gathered):
    assert gathered[1]["error"] == "ValueError: rank 1 cannot sample"
    assert gathered[0]["error"] == "RuntimeError: sample_distributed: sampling failed on rank(s) [1]; see their errors"


# -- one process --------------------------------------------------------------------------------------
def test_without_a_process_group_it_is_sample():
    assert not dist.is_initialized()
    assert dist_info() == (0, 1)
    got = sample_distributed(Pointwise(), 3, steps=4, seed=2, progress=False, sample_offset=5)
    assert torch.equal(got, fastddpm.sample(Pointwise(), 3, steps=4, seed=2, progress=False, sample_offset=5))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 64, 1001])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_cover_disjointly_and_balance(n, world_size):
    shards = [shard_range(n, r, world_size) for r in range(world_size)]
    covered = [i for start, count in shards for i in range(start, start + count)]
    assert covered == list(range(n))  # contiguous, in rank order, no overlap, nothing missing
    counts = [c for _, c in shards]
    assert max(counts) - min(counts) <= 1 and max(counts) == -(-n // world_size)
    assert counts == sorted(counts, reverse=True)  # rank 0 always has the largest shard


@pytest.mark.parametrize("args, error, match", [
    ((5, 2, 2), ValueError, r"rank must be in \[0, 2\)"),
    ((5, -1, 2), ValueError, "rank must be in"),
    ((5, 0, 0), ValueError, "world_size must be >= 1"),
    ((-1, 0, 2), ValueError, "n must be >= 0"),
    ((5.0, 0, 2), TypeError, "n must be an int"),
    ((5, True, 2), TypeError, "rank must be an int"),
])
def test_shard_range_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        shard_range(*args)


@pytest.mark.parametrize("n", [0, -2, 2.0, True])
def test_sample_distributed_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be a positive int"):
        sample_distributed(Pointwise(), n, steps=2)
