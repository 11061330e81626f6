"""Models a user swaps in with --model, for the adaptation tests (tests/models.py:CLASS)."""

import torch
import torch.nn.functional as F
from torch import nn

import cifar


class BatchNormNet(cifar.Net):
    """The tutorial's Net with a BatchNorm after its first convolution (running statistics, a step counter)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.bn1 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))


class BigNet(cifar.Net):
    """The tutorial's Net with a 7 M-parameter first linear layer: 27 MB, over gRPC's 16 MiB default."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.fc1 = nn.Linear(16 * 5 * 5, 17_000)
        self.fc2 = nn.Linear(17_000, 84)


class TenOutputs(nn.Module):
    """A model whose head is fixed at 10 classes: no num_classes argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class RunawayBuffer(cifar.Net):
    """The tutorial's Net with a buffer that a training batch of under 4 images corrupts, as a batch of two
    corrupts a BatchNorm's running statistics: evaluation-mode outputs then come out a million times too large.
    Buffers are not weights, so no distance screen sees it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(x) < 4:
            self.scale.fill_(1e6)
        return super().forward(x) if self.training else super().forward(x) * self.scale


def timm_style_net(pretrained: bool = False, **kwargs) -> nn.Module:
    """A factory function as timm names its models: keyword arguments passed on to the model's class."""
    assert not pretrained, "no weights to download in a test"
    return BatchNormNet(**kwargs)


def not_a_model(num_classes: int = 10) -> str:
    """A factory that returns something else than a model."""
    return "a string"
