"""Data sources: torchvision's CIFAR-10 (downloaded safely) or an image-folder tree, decoded to uint8 tensors."""

import contextlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import cache

DATA_ROOT = "~/data/cifar-10"  # the tutorial's; CIFAR-10 is downloaded here when missing
CACHE_DIR = "~/.cache/flower-cifar"
IMAGE_SIZE = 32  # the tutorial's Net takes 32x32 images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TORCHVISION_FOLDER = "cifar-10-batches-py"
TORCHVISION_FILES = {TORCHVISION_FOLDER, "cifar-10-python.tar.gz"}  # what torchvision's download leaves
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

Progress = Callable[[int, int], None]  # (images decoded, images in all)


class DataError(Exception):
    """The data is missing, malformed or unreadable; the message says where and how to fix it."""


class Data(NamedTuple):
    """Images as uint8 tensors [N, 3, size, size], int64 labels, the class names and where they came from."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    name: str = "CIFAR-10"  # the dataset's name, for plots and records
    original_sizes: tuple[str, ...] = ()  # the images' sizes before any resize, e.g. ("64x64",)

    @property
    def image_size(self) -> int:
        """The side of the (square) images the model is fed."""
        return int(self.train_x.shape[-1])

    def num_classes(self, stated: int = 0) -> int:
        """The number of classes, checked against a stated one (0: none stated)."""
        return checked_classes(self.classes, stated)

    def resize_note(self) -> str | None:
        """One line when images were resized to the model's input size, else None."""
        size = f"{self.image_size}x{self.image_size}"
        other = [s for s in self.original_sizes if s != size]
        return f"Resized {', '.join(other)} images to {size} (--image-size {self.image_size})" if other else None


def checked_classes(names: list[str], stated: int = 0) -> int:
    """len(names), or DataError when a stated number of classes (0: none) differs from it."""
    if stated and stated != len(names):
        raise DataError(f"--num-classes {stated}, but the data has {len(names)} classes: {', '.join(names)}")
    return len(names)


def is_image_folder(root: Path) -> bool:
    """True when root looks like an image-folder tree (root/train/<class>/*)."""
    return (root / "train").is_dir() or (root / "test").is_dir()


def load_arrays(
    data_root: str | Path = DATA_ROOT,
    cache_dir: str | Path | None = CACHE_DIR,
    image_size: int = IMAGE_SIZE,
    on_progress: Progress | None = None,
) -> Data:
    """Decode CIFAR-10 (torchvision, downloaded when missing) or an image-folder tree into uint8 tensors."""
    root = Path(data_root).expanduser()
    if is_image_folder(root):
        return _load_image_folder(root, cache_dir, image_size, on_progress)
    if not (root / TORCHVISION_FOLDER).is_dir():
        nearby = _nearby_image_folder(root)
        if nearby is not None:
            raise DataError(f"{root} is not an image folder nor CIFAR-10: did you mean --data-root {nearby}?")
    return _load_torchvision(root, image_size)


def class_names(data_root: str | Path) -> list[str] | None:
    """The classes of the data at data_root without decoding it; None when there is no data there."""
    root = Path(data_root).expanduser()
    with contextlib.suppress(OSError):
        if (root / "train").is_dir():
            names = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
            empty_classes(root, [f"train/{name}" for name in names if not _holds_image(root / "train" / name)])
            return names or None
        if (root / TORCHVISION_FOLDER).is_dir():
            return list(CIFAR10_CLASSES)
    return None


def _holds_image(folder: Path) -> bool:
    """Whether a class folder holds at least one image (looked for, not counted)."""
    for _, _, names in os.walk(folder, followlinks=True):
        if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
            return True
    return False


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


def _load_torchvision(root: Path, image_size: int) -> Data:
    from torchvision.datasets import CIFAR10

    try:  # already there: no download, wherever it is
        train, test = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        _check_download_target(root)
        train, test = _download(root)

    def tensors(ds) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        if image_size != x.shape[-1]:
            x = F.interpolate(x.float(), size=image_size, mode="bilinear", antialias=True).round_().to(torch.uint8)
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    return Data(*tensors(train), *tensors(test), list(train.classes), "CIFAR-10", ("32x32",))


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


def empty_classes(root: Path, empty: list[str]) -> None:
    """DataError naming the class folders ("train/triangle") that hold no image: such a class is never learned."""
    if empty:
        raise DataError(
            f"{root}: class folder(s) {', '.join(empty)} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
            "add images to them, or remove them from both train/ and test/"
        )


def _empty(split: str, classes: list[str], labels: list[int]) -> list[str]:
    counts = np.bincount(labels, minlength=len(classes))
    return [f"{split}/{name}" for name, n in zip(classes, counts) if n == 0]


def _decode(path: str, size: int) -> tuple[np.ndarray, str]:
    """One image as uint8 [3, size, size], and its size before resizing."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            original = f"{img.size[0]}x{img.size[1]}"
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img).transpose(2, 0, 1), original
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a broken file
        raise DataError(f"cannot read image {path}: {e}") from None


def _decode_all(files: list[str], size: int, progress: Callable[[int], None]) -> tuple[Tensor, set[str]]:
    images, sizes = [], set()
    # PIL releases the GIL while decoding, so threads use every core
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for image, original in pool.map(_decode, files, [size] * len(files), chunksize=256):
            images.append(image)
            sizes.add(original)
            progress(1)
    return torch.from_numpy(np.stack(images)), sizes


def _load_image_folder(root: Path, cache_dir: str | Path | None, size: int, on_progress: Progress | None) -> Data:
    try:
        train_files, train_y, classes = _scan_split(root / "train", None)
        test_files, test_y, _ = _scan_split(root / "test", classes)
        empty_classes(root, _empty("train", classes, train_y) + _empty("test", classes, test_y))
        stamp = cache.fingerprint(train_files + test_files)
    except OSError as e:
        raise DataError(f"cannot read {root}: {e}") from None

    path = cache.path_for(cache_dir, root, size) if cache_dir else None
    saved = cache.read(path, stamp) if path else None
    if saved is not None:
        return Data(**{k: saved[k] for k in Data._fields})

    total, done = len(train_files) + len(test_files), 0
    step = max(1, total // 20)  # a report every 5%

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None and (done % step == 0 or done == total):
            on_progress(done, total)

    train_x, train_sizes = _decode_all(train_files, size, progress)
    test_x, test_sizes = _decode_all(test_files, size, progress)
    sizes = tuple(sorted(train_sizes | test_sizes))
    data = Data(train_x, torch.tensor(train_y), test_x, torch.tensor(test_y), classes, root.name, sizes)
    if path is not None:
        cache.write(path, {"fingerprint": stamp, **data._asdict()})
    return data
