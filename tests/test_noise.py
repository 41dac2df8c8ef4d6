"""The noise contract: our PyTorch Philox/Box-Muller equals Triton's tl.randn."""
import pytest
import torch

from fastddpm import noise
from fastddpm.ops.reference import batch_noise
from tolerances import NORMAL_ULP, assert_close

pytestmark = pytest.mark.ops

# Random123's known-answer vectors for philox4x32-10: (counter, key, result).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    seed = key[0] | (key[1] << 32)
    out = noise.philox4x32(seed, *c)
    assert tuple(int(o) for o in out) == expected


def _triton_noise(seed, offsets):
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, int_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        off = tl.load(off_ptr + idx, mask=mask)
        tl.store(out_ptr + idx, tl.randn(seed, off), mask=mask)
        i1, _, _, _ = tl.randint4x(seed, off)
        tl.store(int_ptr + idx, i1, mask=mask)

    n = offsets.numel()
    out = torch.empty(n, dtype=torch.float32)
    ints = torch.empty(n, dtype=torch.int32)
    kernel[(triton.cdiv(n, 1024),)](out, ints, offsets, seed, n, BLOCK=1024)
    return out, ints


@pytest.mark.parametrize("seed", [0, 1, 1234567, 2**40 + 3, 2**63 - 1])
def test_matches_triton_randn(seed):
    if torch.cuda.is_available():
        pytest.skip("the interpreter comparison runs on CPU; GPU kernels are compared in their own tests")
    g = torch.Generator().manual_seed(seed % 1000)
    offsets = torch.cat([
        torch.arange(64, dtype=torch.int64),
        torch.randint(0, 2**62, (1000,), generator=g, dtype=torch.int64),
        torch.tensor([2**32 - 1, 2**32, 2**63 - 1], dtype=torch.int64),
    ])
    tri, tri_ints = _triton_noise(seed, offsets)
    i1, _, _, _ = noise.philox4x32(seed, offsets & 0xFFFFFFFF, (offsets >> 32) & 0xFFFFFFFF)
    i1 = torch.where(i1 >= 2**31, i1 - 2**32, i1).to(torch.int32)
    assert torch.equal(i1, tri_ints), "Philox integers must be bit-identical to Triton's"
    assert_close(noise.normal(seed, offsets), tri, **NORMAL_ULP)


def test_normal_statistics():
    z = noise.normal(42, torch.arange(200_000, dtype=torch.int64))
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1.0) < 0.01
    assert z.abs().max().item() < 6.0  # Box-Muller with u1 >= 1e-7 bounds |z| by ~5.68


def test_offsets_layout():
    off = noise.noise_offsets(torch.tensor([0, 5]), torch.tensor([3, 3]), numel=4)
    assert off.tolist() == [[12, 13, 14, 15], [(5 << 32) + 12, (5 << 32) + 13, (5 << 32) + 14, (5 << 32) + 15]]


def test_batch_noise_independent_of_batch_layout():
    full = batch_noise(7, 0, 2, (6, 1, 3, 3), "cpu")
    part = batch_noise(7, 2, 2, (3, 1, 3, 3), "cpu")
    assert torch.equal(full[2:5], part)
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(batch_noise(7, 0, 1, (1, 1, 3, 3), "cpu"), full[:1])  # slots differ


def test_seed_validation():
    with pytest.raises(ValueError, match="seed must be in"):
        noise.check_seed(-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        noise.check_seed(1.5)
    with pytest.raises(TypeError, match="offsets must be int64"):
        noise.normal(0, torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="noise counter overflow"):
        noise.check_noise_capacity(numel=2**23, slots=1001, last_sample=0)
