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
