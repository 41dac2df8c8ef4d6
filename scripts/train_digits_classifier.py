"""Train the digits classifier that ``fastddpm.metrics`` ships as its offline feature network.

    OMP_NUM_THREADS=1 python scripts/train_digits_classifier.py

Trains ``DigitsFeatureNet`` on the train split of ``digits_dataset(16)``
(``digits_classifier_split()``: a fixed 80/20 split), with random shifts of up
to one pixel, reports accuracy on the held-out 20 %, and writes
``fastddpm/assets/digits_classifier.safetensors`` (weights, with the
architecture, accuracy and command in the ``fastddpm`` metadata) and a ``.json``
sidecar, both atomically.  Deterministic for a given torch build on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys

import torch
import torch.nn.functional as F

from fastddpm.data import digits_dataset
from fastddpm.files import atomic_write, write_text_atomic
from fastddpm.metrics.features import (DIGITS_CLASSIFIER, METADATA_KEY, SPLIT_SEED, TEST_FRACTION, DigitsFeatureNet,
                                       digits_classifier_split)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills in)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net, x, y) -> float:
    net.eval()
    return float((net(x).argmax(1) == y).double().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DIGITS_CLASSIFIER))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = digits_dataset(16)
    train_idx, test_idx = digits_classifier_split(len(data))
    x_train, y_train = data.images[train_idx], data.labels[train_idx]
    x_test, y_test = data.images[test_idx], data.labels[test_idx]

    net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            b = perm[i:i + args.batch_size]
            loss = F.cross_entropy(net(random_shift(x_train[b], g)), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  "
                  f"test accuracy {accuracy(net, x_test, y_test):.4f}")

    train_acc, test_acc = accuracy(net, x_train, y_train), accuracy(net, x_test, y_test)
    print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} ({len(x_test)} held-out images)")
    meta = {
        "format": "fastddpm.feature_network", "format_version": 1,
        "architecture": {"class": "fastddpm.metrics.DigitsFeatureNet", "config": net.config,
                         "input": "[n, 1, 16, 16] in [-1, 1]", "features": "body output (post-ReLU)"},
        "data": {"dataset": "digits_dataset(16)", "split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
                 "n_train": len(x_train), "n_test": len(x_test)},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "optimizer": "AdamW(weight_decay=1e-4) + OneCycleLR", "augmentation": "random shift <= 1 px"},
        "accuracy": {"train": round(train_acc, 4), "test": round(test_acc, 4)},
        "command": "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv),
        "versions": {"torch": torch.__version__},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    text = json.dumps(meta, sort_keys=True)
    atomic_write(args.out, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    sidecar = args.out.rsplit(".", 1)[0] + ".json"
    write_text_atomic(sidecar, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
