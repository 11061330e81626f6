"""Fast batches: uint8 images on the device, shuffled by index, floats a batch at a time; the tutorial's loaders."""

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline.sources import Data

EVAL_BATCH_SIZE = 1000  # evaluation has no gradients: big batches, same numbers


def drops_last(n: int, batch_size: int, batchnorm: bool) -> bool:
    """Whether an epoch skips its shorter last batch: for batch-norm models, whose running statistics a batch of
    a few images wrecks (a ResNet-18's loss goes from 2.3 to 1e7), when there is a full batch to train on."""
    return batchnorm and n > batch_size and n % batch_size != 0


def remainder_note(n: int, batch_size: int, batchnorm: bool) -> str | None:
    """One line when a batch-norm model's epochs drop a last batch, else None."""
    if not drops_last(n, batch_size, batchnorm):
        return None
    full, left = divmod(n, batch_size)
    return (
        f"BatchNorm model: {n} training images = {full} x {batch_size} + {left}; each epoch's last batch of {left} "
        "is dropped (a different one each epoch), since a batch that small wrecks batch-norm statistics"
    )


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
    """Reflect-pad 4, random crop back to the image size and random horizontal flip, on a whole batch at once.

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
        drop_last: bool = False,
    ):
        self.x, self.y, self.batch_size, self.augment, self.mean_std = x, y, batch_size, augment, mean_std
        self.drop_last = drop_last and len(y) > batch_size  # never every batch
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None
        # Augmentation draws from its own generator: the shuffle stays the tutorial's
        self.augment_generator = torch.Generator().manual_seed(seed + 1) if augment else None
        self.dataset = y  # len(loader.dataset), as with a DataLoader

    def __len__(self) -> int:
        return self._end() // self.batch_size if self.drop_last else -(-len(self.y) // self.batch_size)

    def _end(self) -> int:
        """Where an epoch's batches stop: the whole set, or the last full batch with drop_last."""
        n = len(self.y)
        return n - n % self.batch_size if self.drop_last else n

    def prepare(self, x: Tensor) -> Tensor:
        """A raw batch as the network takes it: uint8 images to floats; floats pass unchanged."""
        return to_float(x, self.mean_std) if x.dtype == torch.uint8 else x

    def raw_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches before `prepare`: images as stored (uint8), shuffled and augmented."""
        n, bs, end = len(self.y), self.batch_size, self._end()
        if self.generator is None:
            for i in range(0, end, bs):
                yield self.x[i : i + bs], self.y[i : i + bs]
            return
        # Consume the generator as DataLoader(shuffle=True) does: a worker seed, the
        # permutation, then the empty tail RandomSampler draws once it is exhausted
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator).to(self.y.device)
        for i in range(0, end, bs):
            idx = order[i : i + bs]
            x = self.x.index_select(0, idx)
            yield (augment(x, self.augment_generator) if self.augment else x), self.y.index_select(0, idx)
        torch.randperm(n, generator=self.generator)

    def poisson_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """DP-SGD's batches before `prepare`: each example drawn into each batch with probability
        batch_size / n (Poisson sampling, what the accountant assumes), len(self) batches an epoch."""
        n = len(self.y)
        rate = min(1.0, self.batch_size / n)
        for _ in range(-(-n // self.batch_size)):
            idx = torch.nonzero(torch.rand(n, generator=generator) < rate).squeeze(1).to(self.y.device)
            x = self.x.index_select(0, idx)
            yield (augment(x, self.augment_generator) if self.augment else x), self.y.index_select(0, idx)

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
    drop_last: bool = False,
) -> tuple[Batches, Batches]:
    """Fast loaders over (a subset of) the decoded data, kept as uint8 on the device; drop_last: see drops_last."""
    tx, ty, ex, ey = _subsets(data, train_idx, test_idx, test_from_train)
    train = Batches(tx.to(device), ty.to(device), batch_size, True, seed, augment, mean_std, drop_last)
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
    drop_last: bool = False,
):
    """The tutorial's pipeline, the baseline: per-sample PIL images and transforms in a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    steps = [transforms.ToTensor()]
    if mean_std:
        steps.append(transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    transform = transforms.Compose(steps)
    tx, ty, ex, ey = _subsets(data, train_idx, test_idx, test_from_train)
    crop_flip = [
        transforms.RandomCrop(data.image_size, padding=4, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
    ]
    train_transform = transforms.Compose(crop_flip + steps) if augment else transform
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(TutorialDataset(tx, ty, train_transform), batch_size, shuffle=True, generator=generator,
                       drop_last=drop_last and len(ty) > batch_size)  # fmt: skip
    test = DataLoader(TutorialDataset(ex, ey, transform), batch_size, shuffle=False)
    return train, test


def feed(loader: Iterable) -> tuple[Callable[[], Iterator], Callable[[Tensor], Tensor]]:
    """(batches as stored, what turns one into the network's input): Batches hand over uint8 images and
    convert them inside the training step; any other loader's batches are the input already."""
    if isinstance(loader, Batches):
        return loader.raw_batches, loader.prepare
    return loader.__iter__, lambda x: x
