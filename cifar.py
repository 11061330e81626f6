"""PyTorch CIFAR-10: the tutorial's CNN, data loading, train and test.

`python3 cifar.py` is the centralized baseline that the federated code builds on.
"""

import argparse
import contextlib
import hashlib
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flags

DATA_ROOT = "~/data/cifar-10"
CACHE_DIR = "~/.cache/flower-cifar"
EVAL_BATCH_SIZE = 1000  # evaluation has no gradients: big batches, same numbers
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PARTITIONERS = ("iid", "dirichlet")


class Net(nn.Module):
    """The tutorial's CNN: two conv+pool blocks and three linear layers (62,006 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # not .view: works for channels_last activations too
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DataError(Exception):
    """The data is missing, malformed or unreadable; the message says where and how to fix it."""


class Data(NamedTuple):
    """CIFAR-10-shaped data as uint8 tensors [N, 3, 32, 32] and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]


# ---------------------------------------------------------------- data sources


def is_image_folder(root: Path) -> bool:
    """True when root looks like an image-folder tree (root/train/<class>/*)."""
    return (root / "train").is_dir() or (root / "test").is_dir()


def load_data(data_root: str | Path = DATA_ROOT, cache_dir: str | Path | None = CACHE_DIR) -> Data:
    """Load CIFAR-10 (torchvision, downloaded when missing) or an image-folder tree."""
    root = Path(data_root).expanduser()
    if is_image_folder(root):
        return _load_image_folder(root, cache_dir)
    return _load_torchvision(root)


def _load_torchvision(root: Path) -> Data:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(root, train=True, download=True)
        test = CIFAR10(root, train=False, download=True)
    except (OSError, RuntimeError) as e:  # no network, a bad download, no permission: say which
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({e}). "
            "Connect to the internet and run again, or pass --data-root DIR with your "
            "images in DIR/train/<class>/ and DIR/test/<class>/"
        ) from None

    def tensors(ds) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    return Data(*tensors(train), *tensors(test), list(train.classes))


def _scan_split(split: Path, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """List images as torchvision's ImageFolder orders them: sorted classes, sorted files."""
    if not split.is_dir():
        raise DataError(f"{split} is missing: an image folder needs train/<class>/ and test/<class>/")
    found = sorted(e.name for e in os.scandir(split) if e.is_dir())
    if not found:
        raise DataError(f"{split} has no class folders: put images in {split}/<class>/")
    if classes is not None and found != classes:
        raise DataError(f"{split} has classes {found}, but train/ has {classes}: they must match")
    files, labels = [], []
    for label, name in enumerate(found):
        for dirpath, _, names in sorted(os.walk(split / name, followlinks=True)):
            for fname in sorted(names):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))  # str, not Path: 60,000 of them
                    labels.append(label)
    if not files:
        raise DataError(f"{split} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files, labels, found


def _fingerprint(files: list[str]) -> str:
    """Hash of every file's name, size and mtime: any change invalidates the cache."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.BILINEAR)
            return np.asarray(img).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a broken file
        raise DataError(f"cannot read image {path}: {e}") from None


def _decode_all(files: list[str]) -> Tensor:
    # PIL releases the GIL while decoding, so threads use every core
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return torch.from_numpy(np.stack(list(pool.map(_decode, files, chunksize=256))))


def _load_image_folder(root: Path, cache_dir: str | Path | None) -> Data:
    try:
        train_files, train_y, classes = _scan_split(root / "train", None)
        test_files, test_y, _ = _scan_split(root / "test", classes)
        fingerprint = _fingerprint(train_files + test_files)
    except OSError as e:
        raise DataError(f"cannot read {root}: {e}") from None

    cache = None
    if cache_dir:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() / f"{key}.pt"
        # An unreadable cache is simply rebuilt below
        with contextlib.suppress(OSError, RuntimeError, KeyError, pickle.UnpicklingError):
            saved = torch.load(cache, weights_only=True)
            if saved["fingerprint"] == fingerprint:
                return Data(**{k: saved[k] for k in Data._fields})

    data = Data(
        _decode_all(train_files),
        torch.tensor(train_y, dtype=torch.int64),
        _decode_all(test_files),
        torch.tensor(test_y, dtype=torch.int64),
        classes,
    )
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"fingerprint": fingerprint, **data._asdict()}, tmp)
            os.replace(tmp, cache)  # atomic: readers never see half a cache
        except OSError:
            pass  # a read-only cache dir only costs the decoding next time
    return data


# ---------------------------------------------------------------- partitions


def partition_indices(
    labels: Tensor,
    num_partitions: int,
    partition_id: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Indices of one client's share of a labelled set, from flwr-datasets' partitioners."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} is not in 0..{num_partitions - 1}")
    # Shuffle first: IidPartitioner takes contiguous shards, and image folders are sorted by class
    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"label": labels.numpy()[order], "index": order})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=0,
            self_balancing=False,
            seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}: use one of {PARTITIONERS}")
    part.dataset = table
    return np.sort(np.asarray(part.load_partition(partition_id)["index"], dtype=np.int64))


def split_holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, held-out) with a seeded shuffle; held-out keeps >= 1 item."""
    shuffled = np.random.default_rng(seed).permutation(indices)
    n_out = max(1, round(len(indices) * fraction)) if len(indices) > 1 else 0
    return np.sort(shuffled[n_out:]), np.sort(shuffled[:n_out])


# ---------------------------------------------------------------- loaders


def normalize(x: Tensor, device: torch.device, mean_std: bool = True) -> Tensor:
    """uint8 images to floats exactly as ToTensor() + Normalize(0.5, 0.5) compute them.

    With mean_std=False, ToTensor() alone: values in [0, 1].
    """
    x = x.to(device).float().div(255)
    if mean_std:
        x = x.sub(0.5).div(0.5)
    # Stored channels_last, as the model's weights are: batches need no layout conversion
    return x.contiguous(memory_format=torch.channels_last)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Reflect-pad 4, random 32x32 crop and random horizontal flip, on a whole batch at once."""
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n), generator=generator).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    channel = torch.arange(c, device=dev)[None, :, None, None]
    crops = padded[batch, channel, rows, cols]  # one gather for the whole batch
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)[:, None, None, None]
    return torch.where(flip, crops.flip(3), crops).contiguous(memory_format=torch.channels_last)


class Batches:
    """Mini-batches of tensors already on the device: one randperm per epoch, no per-sample work.

    Draws its permutation exactly as DataLoader(shuffle=True) does, so with the same
    generator seed it yields the same batches as the tutorial's loader.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False, seed: int = 0, augment: bool = False
    ):
        self.x, self.y, self.batch_size, self.augment = x, y, batch_size, augment
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None
        # Augmentation draws from its own generator: the shuffle stays the tutorial's
        self.augment_generator = torch.Generator().manual_seed(seed + 1) if augment else None
        self.dataset = y  # len(loader.dataset), as with a DataLoader

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs = len(self.y), self.batch_size
        if self.generator is None:
            for i in range(0, n, bs):
                yield self.x[i : i + bs], self.y[i : i + bs]
            return
        # Consume the generator as DataLoader(shuffle=True) does: a worker seed, the
        # permutation, then the empty tail RandomSampler draws once it is exhausted
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator).to(self.y.device)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            x = self.x.index_select(0, idx)
            yield (augment(x, self.augment_generator) if self.augment else x), self.y.index_select(0, idx)
        torch.randperm(n, generator=self.generator)


def _subsets(data: Data, train_idx, test_idx, test_from_train: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and test tensors, optionally subsets; the test set can come from the training set."""
    tx, ty = data.train_x, data.train_y
    ex, ey = (tx, ty) if test_from_train else (data.test_x, data.test_y)
    if train_idx is not None:
        tx, ty = tx[train_idx], ty[train_idx]
    if test_idx is not None:
        ex, ey = ex[test_idx], ey[test_idx]
    return tx, ty, ex, ey


def make_loaders(
    data: Data,
    batch_size: int,
    device: torch.device,
    seed: int,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_from_train: bool = False,
    augment: bool = False,
    mean_std: bool = True,
) -> tuple[Batches, Batches]:
    """Fast loaders over (a subset of) the decoded data, normalized once on the device."""
    tx, ty, ex, ey = _subsets(data, train_idx, test_idx, test_from_train)
    train = Batches(normalize(tx, device, mean_std), ty.to(device), batch_size, True, seed, augment)
    test = Batches(normalize(ex, device, mean_std), ey.to(device), EVAL_BATCH_SIZE)
    return train, test


class TutorialDataset(torch.utils.data.Dataset):
    """Images served as torchvision's CIFAR10 serves them: a PIL image per sample, then the transform."""

    def __init__(self, x: Tensor, y: Tensor, transform) -> None:
        self.images = x.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC uint8, like CIFAR10.data
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def tutorial_loaders(
    data: Data,
    batch_size: int,
    seed: int,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_from_train: bool = False,
    augment: bool = False,
    mean_std: bool = True,
):
    """The tutorial's pipeline, the baseline: per-sample PIL images and transforms in a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    steps = [transforms.ToTensor()]
    if mean_std:
        steps.append(transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    transform = transforms.Compose(steps)
    crop_flip = [transforms.RandomCrop(32, padding=4, padding_mode="reflect"), transforms.RandomHorizontalFlip()]
    train_transform = transforms.Compose(crop_flip + steps) if augment else transform
    tx, ty, ex, ey = _subsets(data, train_idx, test_idx, test_from_train)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(TutorialDataset(tx, ty, train_transform), batch_size, shuffle=True, generator=generator)
    test = DataLoader(TutorialDataset(ex, ey, transform), batch_size, shuffle=False)
    return train, test


# ---------------------------------------------------------------- model, train, test


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_net(seed: int, device: torch.device) -> Net:
    """A freshly initialised Net, identical for identical seeds."""
    torch.manual_seed(seed)
    # channels_last lets oneDNN / cuDNN pick faster convolution kernels, same math
    return Net().to(device, memory_format=torch.channels_last)


def get_weights(net: nn.Module) -> list[np.ndarray]:
    """The model's state as a list of NumPy arrays (in state_dict order)."""
    return [v.detach().cpu().contiguous().numpy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, weights: list[np.ndarray]) -> None:
    """Load a list of NumPy arrays (in state_dict order) into the model."""
    keys = list(net.state_dict().keys())
    if len(weights) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays, got {len(weights)}")
    state = OrderedDict((k, torch.from_numpy(np.asarray(w))) for k, w in zip(keys, weights))
    net.load_state_dict(state, strict=True)


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
) -> float:
    """Train with SGD; return the mean training loss over all steps (nan for no steps)."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    net.train()
    # Losses accumulate on the device: no host sync per step, only when progress is shown
    total = torch.zeros((), device=device)
    steps = 0
    start = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
    for epoch in range(epochs):
        window = torch.zeros((), device=device)
        for i, (images, labels) in enumerate(trainloader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            if start:  # FedProx: keep the local model near the global one it started from
                loss = loss + proximal_mu / 2 * sum((p - s).pow(2).sum() for p, s in zip(net.parameters(), start))
            loss.backward()
            optimizer.step()
            window += loss.detach()
            steps += 1
            if i % 100 == 99:
                if on_progress is not None:
                    on_progress(epoch + 1, i + 1, window.item() / 100)
                total += window
                window.zero_()
        total += window
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


# ---------------------------------------------------------------- command line


def add_data_args(parser: flags.Parser) -> None:
    """Flags that say where the data is and how it is fed."""
    parser.add_argument(
        "--data-root",
        default=DATA_ROOT,
        help="torchvision CIFAR-10 directory (downloaded when missing), or an image-folder "
        "tree DIR/train/<class>/* and DIR/test/<class>/*",
    )
    parser.add_argument(
        "--cache-dir",
        default=CACHE_DIR,
        help="where decoded image folders are cached (rebuilt when the folder changes); '' to disable",
    )
    parser.add_argument(
        "--pipeline",
        choices=("fast", "tutorial"),
        default="fast",
        help="fast: decode once, tensors on the device, batches by index; "
        "tutorial: the tutorial's per-sample DataLoader (the baseline)",
    )


def add_train_args(parser: flags.Parser, epochs: int) -> None:
    """Flags of the training run; defaults are the tutorial's."""
    parser.add_argument("--epochs", type=flags.non_negative_int, default=epochs, help="epochs of training")
    parser.add_argument("--batch-size", type=flags.positive_int, default=32, help="training batch size")
    parser.add_argument("--lr", type=flags.positive_float, default=0.001, help="SGD learning rate")
    parser.add_argument("--momentum", type=flags.non_negative_float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=flags.non_negative_float, default=0.0, help="SGD weight decay")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="random crop (reflect-pad 4) and horizontal flip of training images, whole batches at once",
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Normalize((0.5,)*3, (0.5,)*3) after ToTensor, as the tutorial; --no-normalize keeps [0, 1]",
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda:0', ...")
    parser.add_argument(
        "--threads", type=flags.positive_int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument(
        "--seed", type=flags.non_negative_int, default=0, help="seeds initialisation, shuffling and partitions"
    )


def check_device(parser: flags.Parser, name: str) -> torch.device:
    """Resolve --device, or exit 2 with one line when it is not usable here."""
    try:
        device = resolve_device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {name} is not usable here: {str(e).splitlines()[0]}")
    return device


def main() -> None:
    parser = flags.Parser(description="Centralized PyTorch training of the tutorial's CNN on CIFAR-10.")
    add_data_args(parser)
    add_train_args(parser, epochs=2)
    args = parser.parse_args()
    device = check_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"Centralized PyTorch training on {device} ({args.pipeline} pipeline)")
    print("Load data")
    start = time.perf_counter()
    try:
        data = load_data(args.data_root, args.cache_dir)
    except DataError as e:
        flags.die(str(e), parser.prog)
    options = {"augment": args.augment, "mean_std": args.normalize}
    if args.pipeline == "tutorial":
        trainloader, testloader = tutorial_loaders(data, args.batch_size, args.seed, **options)
    else:
        trainloader, testloader = make_loaders(data, args.batch_size, device, args.seed, **options)
    loaded = time.perf_counter()
    print(
        f"Loaded {len(trainloader.dataset)} training and {len(testloader.dataset)} test images in {loaded - start:.1f} s"
    )

    print(f"Start training: {args.epochs} epoch(s) of {len(trainloader)} batches")
    net = make_net(args.seed, device)
    train(
        net,
        trainloader,
        args.epochs,
        device,
        args.lr,
        args.momentum,
        args.weight_decay,
        on_progress=lambda epoch, batch, loss: print(f"[{epoch}, {batch:5d}] loss: {loss:.3f}"),
    )
    trained = time.perf_counter()
    print("Evaluate model")
    loss, accuracy = test(net, testloader, device)
    print(f"Training took {trained - loaded:.1f} s ({(trained - loaded) / max(args.epochs, 1):.2f} s/epoch)")
    print(f"Loss: {loss:.4f} (mean per test example)")
    print(f"Accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
