"""PyTorch CIFAR-10: the tutorial's CNN, data loading, train and test.

`python3 cifar.py` is the centralized baseline that the federated code builds on. The machinery
underneath (decoding and caching the images, fast batches, CUDA graphs) lives in pipeline/.
"""

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flags
from pipeline import batches, graphs, models, options
from pipeline.sources import CACHE_DIR, DATA_ROOT, DataError, load_arrays

__all__ = ["DATA_ROOT", "DpNet", "Net", "load_data", "main", "test", "train"]


class Net(nn.Module):
    """The tutorial's CNN: two conv+pool blocks and three linear layers (62,006 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # not .view: works for channels_last activations too
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DpNet(nn.Module):
    """Net made ready for DP-SGD (--model cifar:DpNet): tanh and GroupNorm, wider convolutions, a narrower head.

    Clipped, noised gradients favour bounded activations (tanh: Papernot et al. 2021) and few parameters in
    the dense layers, where the noise is spread over the most weights; GroupNorm normalises without the
    batch statistics that DP-SGD (Opacus) refuses. 66,058 parameters for 10 classes, the size of Net's 62,006.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 16, 5), nn.GroupNorm(4, 16)
        self.conv2, self.norm2 = nn.Conv2d(16, 32, 5), nn.GroupNorm(4, 32)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.tanh(self.norm1(self.conv1(x))))
        x = self.pool(torch.tanh(self.norm2(self.conv2(x))))
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))


def load_data(
    data_root: str | Path = DATA_ROOT,
    cache_dir: str | Path | None = CACHE_DIR,
    batch_size: int = 32,
    device: torch.device | str = "auto",
    pipeline: str = "fast",
    seed: int = 0,
) -> tuple[Iterable, Iterable, dict[str, int]]:
    """The tutorial's load_data: (trainloader, testloader, num_examples), the fast loaders by default."""
    data = load_arrays(data_root, cache_dir)
    if pipeline == "tutorial":
        trainloader, testloader = batches.tutorial_loaders(data, batch_size, seed)
    else:
        trainloader, testloader = batches.make_loaders(data, batch_size, options.resolve_device(device), seed)
    return trainloader, testloader, {"trainset": len(trainloader.dataset), "testset": len(testloader.dataset)}


def train(
    net: nn.Module,
    trainloader: Iterable,
    epochs: int,
    device: torch.device,
    lr: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    on_progress: Callable[[int, int, float], None] | None = None,
    proximal_mu: float = 0.0,
    cuda_graph: bool = True,
) -> float:
    """Train with SGD; return the mean training loss (cross-entropy) over all steps (nan for no steps).

    proximal_mu > 0 adds FedProx's proximal term (mu/2)*||w - w_start||^2, w_start being the
    weights this call starts from. On CUDA, cuda_graph replays each step as one captured graph
    (the proximal term included); elsewhere, or with cuda_graph=False, steps run eagerly.
    """
    device = torch.device(device)
    criterion = nn.CrossEntropyLoss()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    raw_batches, prepare = batches.feed(trainloader)  # uint8 images become floats inside the step
    net.train()
    window = torch.zeros((), device=device)  # losses add up on the device: no host sync per step

    def step(images: Tensor, labels: Tensor) -> None:
        optimizer.zero_grad()
        loss = criterion(net(prepare(images)), labels)
        window.add_(loss.detach())
        if proximal_mu > 0:
            loss = loss + proximal_mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start))
        loss.backward()
        optimizer.step()

    run = graphs.runner(step, device, cuda_graph)  # on CUDA: captured once, then replayed
    total = torch.zeros((), device=device)
    steps = 0
    for epoch in range(epochs):
        for i, (images, labels) in enumerate(raw_batches()):
            run(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            steps += 1
            if i % 100 == 99:
                if on_progress is not None:
                    on_progress(epoch + 1, i + 1, window.item() / 100)
                total += window
                window.zero_()
        total += window
        window.zero_()
    return total.item() / steps if steps else float("nan")


@torch.inference_mode()
def test(net: nn.Module, testloader: Iterable, device: torch.device) -> tuple[float, float]:
    """Return (mean cross-entropy loss per example, accuracy) on the loader's data."""
    net.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for images, labels in testloader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        outputs = net(images)
        loss += F.cross_entropy(outputs, labels, reduction="sum")
        correct += (outputs.argmax(1) == labels).sum()
        total += labels.size(0)
    if total == 0:
        raise ValueError("cannot evaluate on an empty test set")
    return loss.item() / total, correct.item() / total


def make_net(seed: int, device: torch.device, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """A freshly initialised Net, identical for identical seeds."""
    return models.build(Net, num_classes, image_size, seed, device)


def main() -> None:
    flags.quick_exit()
    parser = flags.Parser(description="Centralized PyTorch training of the tutorial's CNN on CIFAR-10.")
    options.add_data_args(parser)
    options.add_train_args(parser, epochs=2)
    args = parser.parse_args()
    device = options.check_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"Centralized PyTorch training on {device} ({args.pipeline} pipeline)")
    print("Load data")
    start = time.perf_counter()
    try:
        data = load_arrays(args.data_root, args.cache_dir, args.image_size, options.show_progress)
        num_classes = data.num_classes(args.num_classes)
        model = Net if args.model == models.MODEL else models.load_class(args.model)
        net = models.build(model, num_classes, data.image_size, args.seed, device)
    except (DataError, models.ModelError) as e:
        flags.die(str(e), parser.prog)
    if data.resize_note():
        print(data.resize_note())
    batchnorm = models.has_batchnorm(net)
    kwargs = {"augment": args.augment, "mean_std": args.normalize, "drop_last": batchnorm}
    if args.pipeline == "tutorial":
        trainloader, testloader = batches.tutorial_loaders(data, args.batch_size, args.seed, **kwargs)
    else:
        trainloader, testloader = batches.make_loaders(data, args.batch_size, device, args.seed, **kwargs)
    loaded = time.perf_counter()
    print(
        f"Loaded {len(trainloader.dataset)} training and {len(testloader.dataset)} test images "
        f"({num_classes} classes, {data.image_size}x{data.image_size}) in {loaded - start:.1f} s"
    )
    del data  # the loaders hold what they need
    note = batches.remainder_note(len(trainloader.dataset), args.batch_size, batchnorm)
    if note:
        print(note)

    if args.epochs:
        graph = " as a CUDA graph" if device.type == "cuda" and args.cuda_graph else ""
        print(f"Start training: {args.epochs} epoch(s) of {len(trainloader)} batches{graph}")
        train(
            net,
            trainloader,
            args.epochs,
            device,
            args.lr,
            args.momentum,
            args.weight_decay,
            on_progress=lambda epoch, batch, loss: print(f"[{epoch}, {batch:5d}] loss: {loss:.3f}"),
            cuda_graph=args.cuda_graph,
        )
    trained = time.perf_counter()
    print("Evaluate model")
    loss, accuracy = test(net, testloader, device)
    if args.epochs:
        print(f"Training took {trained - loaded:.1f} s ({(trained - loaded) / args.epochs:.2f} s/epoch)")
    else:
        print("No training (--epochs 0): the initial model was evaluated")
    print(f"Loss: {loss:.4f} (mean per test example)")
    print(f"Accuracy: {accuracy:.4f}")
    if device.type == "cuda":
        print(f"Peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
