"""The model as it travels: its arrays' names, shapes and dtypes, which are trained weights, its size."""

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import models

MIN_MESSAGE_BYTES = 16 * 1024 * 1024  # gRPC's limit never goes below this (the tutorial's Net is 242 KiB)


@dataclass(frozen=True)
class Layout:
    """The arrays of a model's state_dict, in order; `weights` marks the trained float parameters.

    Buffers (BatchNorm's running statistics and its num_batches_tracked step counter) travel and are
    averaged too, but they are not weights: a distance between two models counts the weights only.
    """

    model: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    weights: tuple[bool, ...]

    @classmethod
    def of(cls, net: nn.Module, model: str) -> "Layout":
        """The layout of a built model; `model` is its --model name."""
        trained = {name for name, p in net.named_parameters() if p.requires_grad}
        state = net.state_dict()
        return cls(
            model=model,
            keys=tuple(state),
            shapes=tuple(tuple(v.shape) for v in state.values()),
            dtypes=tuple(str(v.dtype).removeprefix("torch.") for v in state.values()),
            weights=tuple(k in trained and v.is_floating_point() for k, v in state.items()),
        )

    @property
    def num_parameters(self) -> int:
        """Trained weights, counted one by one."""
        return sum(math.prod(s) for s, w in zip(self.shapes, self.weights) if w)

    @property
    def nbytes(self) -> int:
        """Bytes of every array, as they travel."""
        return sum(math.prod(s) * torch.empty(0, dtype=getattr(torch, d)).element_size()
                   for s, d in zip(self.shapes, self.dtypes))  # fmt: skip

    def message_bytes(self, limit_mb: float = 0) -> int:
        """gRPC's message limit: `limit_mb` MiB when given, else twice the model with 16 MiB at least."""
        return int(limit_mb * 2**20) if limit_mb else max(MIN_MESSAGE_BYTES, 2 * self.nbytes)

    def describe(self) -> str:
        """'cifar:Net, 62,006 weights in 10 arrays (242 KiB)'."""
        return f"{self.model}, {self.num_parameters:,} weights in {len(self.keys)} arrays ({_size(self.nbytes)})"

    def record(self) -> dict:
        """What config.json keeps of the model, to refuse a checkpoint of another one."""
        return {"model": self.model, "parameters": self.num_parameters, "arrays": dict(zip(self.keys, self.shapes))}

    def mismatch(self, keys: list[str], shapes: list[tuple[int, ...]]) -> str | None:
        """How a set of named arrays differs from this model, or None when it fits."""
        if list(keys) != list(self.keys):
            missing = [k for k in self.keys if k not in keys]
            extra = [k for k in keys if k not in self.keys]
            return f"its arrays differ from {self.model}'s (missing {missing or 'none'}, extra {extra or 'none'})"
        for k, got, want in zip(keys, shapes, self.shapes):
            if tuple(got) != tuple(want):
                return f"its {k} is {list(got)}, {self.model}'s is {list(want)}"
        return None

    def state_dict(self, arrays: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
        """Arrays in the model's order as a state_dict, each in the model's dtype."""
        return OrderedDict(
            (k, torch.from_numpy(np.asarray(a, dtype=d)))
            for k, a, d in zip(self.keys, arrays, self.dtypes, strict=True)
        )

    def cast(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Arrays in the model's dtypes (an average of int64 step counters comes back as floats)."""
        return [np.asarray(np.rint(a) if d.startswith("int") else a, dtype=d) for a, d in zip(arrays, self.dtypes)]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def build(spec: str, num_classes: int, image_size: int, seed: int, device: torch.device) -> tuple[nn.Module, Layout]:
    """The --model built for the data (seeded), and its layout; ModelError says in one line what does not fit."""
    net = models.build(models.load_class(spec), num_classes, image_size, seed, device)
    return net, Layout.of(net, spec)
