"""Small models shared by tests."""
import torch


class Pointwise(torch.nn.Module):
    """A batch-invariant model (no cross-sample reductions): sample i's output
    cannot depend on the batch, so any difference between batch layouts or
    shards would come from the noise."""

    image_size, in_channels = 6, 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return torch.tanh(self.w * x + t.float().reshape(-1, 1, 1, 1) / 1000)


class LabelledPointwise(torch.nn.Module):
    """A batch-invariant class-conditional model in guided-diffusion's style (``model(x, t, y=...)``),
    with a null class ``num_classes`` for classifier-free guidance, and an optional per-sample
    keyword ``shift`` ``[n]`` (to carry ``model_kwargs``)."""

    image_size, in_channels = 6, 2
    num_classes, null_class = 3, 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.emb = torch.nn.Parameter(torch.tensor([0.4, -0.3, 0.1, 0.0]))
        self.calls = 0

    def forward(self, x, t, y=None, shift=None):
        self.calls += 1
        y = torch.full((x.shape[0],), self.null_class, dtype=torch.int64) if y is None else y
        out = torch.tanh(self.w * x + t.float().reshape(-1, 1, 1, 1) / 1000) + self.emb[y].reshape(-1, 1, 1, 1)
        if shift is not None:
            out = out + shift.reshape(-1, 1, 1, 1)
        return out
