"""CUDA-graph capture of a training step: captured once, replayed for every batch of the same shape."""

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)
Step = Callable[[Tensor, Tensor], None]


class CudaGraphs:
    """How GraphedStep warms up and captures on CUDA (PyTorch's "whole network capture")."""

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        """Run eagerly on a side stream, as capture requires of the steps before it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, step: Step, x: Tensor, y: Tensor) -> Callable[[], None]:
        """Record step(x, y) once (nothing runs); return what replays it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x, y)
        return graph.replay


def graph_backend(device: torch.device) -> CudaGraphs | None:
    """What captures training steps as graphs on this device; None: steps run eagerly."""
    return CudaGraphs() if device.type == "cuda" else None


class GraphedStep:
    """A training step captured once as a CUDA graph and replayed for every batch of the captured shape.

    The first `warmup` batches train eagerly (real steps, as capture needs), then the next one is
    captured into static input buffers; a batch of another shape (an epoch's shorter last batch)
    trains eagerly on the same parameters and optimizer state. Every batch is trained on exactly
    once, in order, by the same step function: the results are eager's, up to float rounding.
    """

    def __init__(self, step: Step, warmup: int = 3, backend=None) -> None:
        self.step, self.warmup = step, warmup
        self.backend = backend or CudaGraphs()
        self.shape: tuple | None = None
        self.static: tuple[Tensor, Tensor] | None = None
        self.replay: Callable[[], None] | None = None
        self.eager_steps = self.replays = 0

    def __call__(self, x: Tensor, y: Tensor) -> None:
        shape = (x.shape, x.dtype, y.shape, y.dtype)
        self.shape = self.shape or shape
        if shape != self.shape:
            self.step(x, y)  # outside the graph: same parameters, same optimizer state
            self.eager_steps += 1
            return
        if self.replay is None:
            if self.eager_steps < self.warmup:
                with self.backend.warmup():
                    self.step(x, y)
                self.eager_steps += 1
                return
            self.static = (x.clone(), y.clone())
            try:
                self.replay = self.backend.capture(self.step, *self.static)
            except RuntimeError as e:  # a step capture cannot record: train eagerly from here on
                log.warning("CUDA graph capture failed (%s): training eagerly", str(e).splitlines()[0])
                self.warmup = float("inf")
                self.step(x, y)
                self.eager_steps += 1
                return
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        self.replay()
        self.replays += 1


def runner(step: Step, device: torch.device, cuda_graph: bool = True) -> Step:
    """The step as training calls it: replayed as a CUDA graph on CUDA (unless cuda_graph=False), else eager."""
    backend = graph_backend(device) if cuda_graph else None
    return GraphedStep(step, backend=backend) if backend else step
