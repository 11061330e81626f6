"""PyTorch CIFAR-10: the tutorial's CNN, data loading, train and test.

`python3 cifar.py` is the centralized baseline that the federated code builds on.
"""

import argparse
import atexit
import contextlib
import hashlib
import os
import pickle
import shutil
import tempfile
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
TORCHVISION_FOLDER = "cifar-10-batches-py"
TORCHVISION_FILES = {TORCHVISION_FOLDER, "cifar-10-python.tar.gz"}  # what torchvision's download leaves


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


def load_arrays(data_root: str | Path = DATA_ROOT, cache_dir: str | Path | None = CACHE_DIR) -> Data:
    """Decode CIFAR-10 (torchvision, downloaded when missing) or an image-folder tree into uint8 tensors."""
    root = Path(data_root).expanduser()
    if is_image_folder(root):
        return _load_image_folder(root, cache_dir)
    if not (root / TORCHVISION_FOLDER).is_dir():
        nearby = _nearby_image_folder(root)
        if nearby is not None:
            raise DataError(f"{root} is not an image folder nor CIFAR-10: did you mean --data-root {nearby}?")
    return _load_torchvision(root)


def _nearby_image_folder(root: Path) -> Path | None:
    """An image-folder tree one level above root (root is its train/ or test/) or below it (its only one)."""
    with contextlib.suppress(OSError):
        if root.name in ("train", "test") and (root.parent / "train").is_dir() and (root.parent / "test").is_dir():
            return root.parent
        below = [d for d in root.iterdir() if d.is_dir() and (d / "train").is_dir() and (d / "test").is_dir()]
        if len(below) == 1:
            return below[0]
    return None


def _check_download_target(root: Path) -> None:
    """Refuse to download anywhere but the default location, or a new or empty directory with a parent."""
    if root == Path(DATA_ROOT).expanduser():
        return
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-root {root} is not a directory")
    if not root.exists():
        if not root.parent.is_dir():
            raise DataError(
                f"--data-root {root}: {root.parent} does not exist, so CIFAR-10 is not downloaded there; "
                "check the path, or create the directory first"
            )
        return
    if not {e.name for e in os.scandir(root)} <= TORCHVISION_FILES:
        raise DataError(
            f"--data-root {root} holds neither CIFAR-10 nor an image folder (train/<class>/, test/<class>/), "
            "and CIFAR-10 is only downloaded into a new or empty directory: check the path"
        )


def _load_torchvision(root: Path) -> Data:
    from torchvision.datasets import CIFAR10

    try:  # already there: no download, wherever it is
        train, test = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        _check_download_target(root)
        train, test = _download(root)

    def tensors(ds) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    return Data(*tensors(train), *tensors(test), list(train.classes))


def _download(root: Path):
    """Download CIFAR-10 into root; on failure remove what this call created."""
    from torchvision.datasets import CIFAR10

    created = root
    while not created.parent.exists():
        created = created.parent
    existing = set(os.listdir(root)) if root.exists() else None
    try:
        return CIFAR10(root, train=True, download=True), CIFAR10(root, train=False, download=True)
    except BaseException as e:
        # Nothing half-written left behind: not the directories, not a partial archive
        if existing is None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for name in set(os.listdir(root)) - existing:
                shutil.rmtree(root / name, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.remove(root / name)
        if not isinstance(e, OSError | RuntimeError):  # Ctrl-C and the like: cleaned up, passed on
            raise
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({e}). "
            "Connect to the internet and run again, or pass --data-root DIR with your "
            "images in DIR/train/<class>/ and DIR/test/<class>/"
        ) from None


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


def memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last on CPU, where oneDNN runs it ~8% faster; NCHW on CUDA, where channels_last is slower."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def to_float(x: Tensor, mean_std: bool = True) -> Tensor:
    """uint8 images to floats exactly as ToTensor() + Normalize(0.5, 0.5) compute them, on x's device.

    With mean_std=False, ToTensor() alone: values in [0, 1].
    """
    # Layout first, on the 1-byte values; the float ops keep it
    x = x.contiguous(memory_format=memory_format(x.device)).float().div_(255)
    return x.sub_(0.5).div_(0.5) if mean_std else x


def normalize(x: Tensor, device: torch.device | str, mean_std: bool = True) -> Tensor:
    """uint8 images moved to the device and converted by to_float, all at once."""
    return to_float(x.to(device), mean_std)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Reflect-pad 4, random 32x32 crop and random horizontal flip, on a whole batch at once.

    One gather whose indices reflect at the borders: no padded copy, and any dtype (uint8 too).
    """
    n, c, h, w = x.shape
    dev = x.device
    dy, dx = torch.randint(0, 9, (2, n), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)

    def reflect(i: Tensor, size: int) -> Tensor:  # as F.pad(mode="reflect") maps a padded index
        i = i.abs()
        return torch.where(i >= size, 2 * (size - 1) - i, i)

    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(0), cols)  # a flipped crop reads its columns backwards
    rows = reflect(dy[:, None] + torch.arange(h, device=dev) - 4, h)[:, None, :, None]
    cols = reflect(dx[:, None] + cols - 4, w)[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    channel = torch.arange(c, device=dev)[None, :, None, None]
    return x[batch, channel, rows, cols]


class Batches:
    """Mini-batches of tensors already on the device: one randperm per epoch, no per-sample work.

    Images stay uint8 (a quarter of float32's memory) and become floats a batch at a time, with
    exactly the numbers ToTensor() + Normalize() give. Draws its permutation exactly as
    DataLoader(shuffle=True) does, so with the same generator seed it yields the same batches as
    the tutorial's loader.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        mean_std: bool = True,
    ):
        self.x, self.y, self.batch_size, self.augment, self.mean_std = x, y, batch_size, augment, mean_std
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None
        # Augmentation draws from its own generator: the shuffle stays the tutorial's
        self.augment_generator = torch.Generator().manual_seed(seed + 1) if augment else None
        self.dataset = y  # len(loader.dataset), as with a DataLoader

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def prepare(self, x: Tensor) -> Tensor:
        """A raw batch as the network takes it: uint8 images to floats; floats pass unchanged."""
        return to_float(x, self.mean_std) if x.dtype == torch.uint8 else x

    def raw_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches before `prepare`: images as stored (uint8), shuffled and augmented."""
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

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.raw_batches():
            yield self.prepare(x), y


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
    """Fast loaders over (a subset of) the decoded data, kept as uint8 on the device."""
    tx, ty, ex, ey = _subsets(data, train_idx, test_idx, test_from_train)
    train = Batches(tx.to(device), ty.to(device), batch_size, True, seed, augment, mean_std)
    test = Batches(ex.to(device), ey.to(device), EVAL_BATCH_SIZE, mean_std=mean_std)
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
        trainloader, testloader = tutorial_loaders(data, batch_size, seed)
    else:
        trainloader, testloader = make_loaders(data, batch_size, resolve_device(device), seed)
    return trainloader, testloader, {"trainset": len(trainloader.dataset), "testset": len(testloader.dataset)}


# ---------------------------------------------------------------- model, train, test


def resolve_device(name: torch.device | str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_net(seed: int, device: torch.device) -> Net:
    """A freshly initialised Net, identical for identical seeds."""
    torch.manual_seed(seed)
    return Net().to(device, memory_format=memory_format(device))


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
            self.replay = self.backend.capture(self.step, *self.static)
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        self.replay()
        self.replays += 1


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
    # Batches hands over uint8 images and converts them inside the step (inside the graph on CUDA)
    prepare = getattr(trainloader, "prepare", None)
    batches = getattr(trainloader, "raw_batches", None) or trainloader.__iter__
    net.train()
    # Losses accumulate on the device: no host sync per step, only when progress is shown
    window = torch.zeros((), device=device)

    def step(images: Tensor, labels: Tensor) -> None:
        optimizer.zero_grad()
        loss = criterion(net(prepare(images) if prepare else images), labels)
        window.add_(loss.detach())
        if proximal_mu > 0:
            loss = loss + proximal_mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start))
        loss.backward()
        optimizer.step()

    backend = graph_backend(device) if cuda_graph else None
    run = GraphedStep(step, backend=backend) if backend else step
    total = torch.zeros((), device=device)
    steps = 0
    for epoch in range(epochs):
        for i, (images, labels) in enumerate(batches()):
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


# ---------------------------------------------------------------- cores shared between clients


def machine_cores() -> int:
    """The cores this process may run on."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _process_token(pid: int) -> str | None:
    """The process's start time (Linux), to tell a live pid from a reused one; None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counting from after the command name


def _alive(pid: int, token: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    now = _process_token(pid)
    return now is None or not token or now == token


_registered: set[Path] = set()


class CoreShare:
    """This process's share of the machine's cores, among the client processes running on it.

    Every client registers in a per-user directory (a file named by its pid, removed at exit;
    files of dead processes are ignored and cleaned up). With `threads` given, `apply` sets that
    many torch threads; without, cores // live clients, at least 1: a client alone uses every
    core, two clients on two cores one each, so they do not oversubscribe.
    """

    def __init__(self, threads: int | None = None, registry: str | Path | None = None) -> None:
        self.threads = threads
        self.registry = Path(registry or Path(tempfile.gettempdir()) / f"flower-cifar-{os.getuid()}" / "clients")
        self._register()  # with fixed threads too: the others then take fewer
        self.apply()

    def _register(self) -> None:
        me = self.registry / str(os.getpid())
        if me in _registered:  # many clients in one process (a simulation): one entry
            return
        try:
            self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
            me.write_text(_process_token(os.getpid()) or "")
        except OSError:
            return  # no registry here: this client counts only itself
        _registered.add(me)
        atexit.register(me.unlink, missing_ok=True)

    def live_clients(self) -> int:
        """Client processes registered and alive, this one included."""
        live = 0
        try:
            entries = list(os.scandir(self.registry))
        except OSError:
            return 1
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                token = Path(entry.path).read_text().strip()
            except OSError:
                continue  # removed meanwhile
            if _alive(int(entry.name), token):
                live += 1
            else:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
        return max(1, live)

    def apply(self) -> int:
        """Set torch's thread count for the next training call; return it."""
        n = self.threads or max(1, machine_cores() // self.live_clients())
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n


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
        "--threads",
        type=flags.positive_int,
        default=None,
        help="torch CPU threads (default: all cores; clients on one machine divide them among the client "
        "processes running there)",
    )
    parser.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, capture the training step once as a CUDA graph and replay it (--no-cuda-graph: eager steps)",
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
        data = load_arrays(args.data_root, args.cache_dir)
    except DataError as e:
        flags.die(str(e), parser.prog)
    options = {"augment": args.augment, "mean_std": args.normalize}
    if args.pipeline == "tutorial":
        trainloader, testloader = tutorial_loaders(data, args.batch_size, args.seed, **options)
    else:
        trainloader, testloader = make_loaders(data, args.batch_size, device, args.seed, **options)
    del data  # the loaders hold what they need
    loaded = time.perf_counter()
    print(
        f"Loaded {len(trainloader.dataset)} training and {len(testloader.dataset)} test images in {loaded - start:.1f} s"
    )

    net = make_net(args.seed, device)
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
