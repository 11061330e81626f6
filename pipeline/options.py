"""Command-line flags of a training run (data, model, optimiser, device), defaults the tutorial's."""

import argparse

import torch

import flags
from pipeline.models import MODEL
from pipeline.sources import CACHE_DIR, DATA_ROOT, IMAGE_SIZE


def add_data_args(parser: flags.Parser) -> None:
    """Flags that say where the data is, how it is fed, and which model takes it."""
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
    add_model_args(parser)


def add_model_args(parser: flags.Parser) -> None:
    """Flags of the model and the shape of what it is fed."""
    parser.add_argument(
        "--model",
        default=MODEL,
        help="the model, MODULE:NAME or path/to/file.py:NAME, NAME a class or a function returning a model "
        "(torchvision.models:resnet18); called with num_classes=<the data's classes> when it takes that argument",
    )
    parser.add_argument(
        "--image-size",
        type=flags.positive_int,
        default=IMAGE_SIZE,
        help="images are resized to this square size (the tutorial's Net takes 32)",
    )
    parser.add_argument(
        "--num-classes",
        type=flags.non_negative_int,
        default=0,
        help="classes of the data, checked against it; 0: as many as the data has",
    )


def add_train_args(parser: flags.Parser, epochs: int) -> None:
    """Flags of the training run; defaults are the tutorial's."""
    parser.add_argument("--epochs", type=flags.non_negative_int, default=epochs, help="epochs of training")
    parser.add_argument(
        "--batch-size",
        type=flags.positive_int,
        default=32,
        help="training batch size; a model with batch-norm layers drops each epoch's shorter last batch (a batch "
        "of a few images wrecks its running statistics), saying so in one line",
    )
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
        type=flags.non_negative_int,
        default=None,
        help="torch CPU threads (default, or 0: all cores; clients on one machine divide them among the client "
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


def show_progress(done: int, total: int) -> None:
    """Decoding progress, a line every quarter (decoding CIFAR-10 takes a while on a small machine)."""
    if done == total or done * 4 // total > (done - max(1, total // 20)) * 4 // total:
        print(f"Decoding {total} images: {100 * done // total}%", flush=True)


def resolve_device(name: torch.device | str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(parser: flags.Parser, name: str) -> torch.device:
    """Resolve --device, or exit 2 with one line when it is not usable here."""
    try:
        device = resolve_device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {name} is not usable here: {str(e).splitlines()[0]}")
    return device
