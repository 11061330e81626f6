"""The model: which class or factory (--model MODULE:NAME), built for the data's classes and image size, and checked."""

import importlib
import importlib.util
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.batches import memory_format

MODEL = "cifar:Net"  # the tutorial's CNN


class ModelError(Exception):
    """The model cannot be loaded, built or fed this data; the message says why in one line."""


Factory = Callable[..., nn.Module]  # an nn.Module class, or a function returning a model (torchvision's resnet18)


def load_class(spec: str) -> Factory:
    """The model named by 'module:NAME' (importable) or 'path/to/file.py:NAME': an nn.Module class or a factory
    function such as torchvision.models:resnet18 (its weights are not downloaded: it is built untrained)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ModelError(
            f"--model {spec!r} is not MODULE:NAME (e.g. cifar:Net, torchvision.models:resnet18, or my_model.py:MyNet)"
        )
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise ModelError(f"--model {spec}: file {where} not found")
            found = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(found)
            sys.modules.setdefault(path.stem, module)  # pickling and dataclasses look modules up by name
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's module may raise anything at import)
        raise ModelError(f"--model {spec}: importing {where} failed: {_first_line(e)}") from None
    factory = getattr(module, name, None)
    is_class = isinstance(factory, type)
    is_function = callable(factory) and not is_class and not isinstance(factory, nn.Module)
    if not (is_class and issubclass(factory, nn.Module)) and not is_function:
        raise ModelError(f"--model {spec}: {where} has no nn.Module class or model function {name}")
    return factory


def takes_num_classes(factory: Factory) -> bool:
    """Whether the factory takes num_classes: by name, or through **kwargs (torchvision's and timm's factories)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


def build(
    cls: Factory, num_classes: int, image_size: int, seed: int = 0, device: torch.device | str = "cpu"
) -> nn.Module:
    """A freshly initialised model (identical for identical seeds), checked against the data's shape."""
    torch.manual_seed(seed)
    name = f"{cls.__module__}.{getattr(cls, '__qualname__', cls.__name__)}"
    try:
        net = cls(num_classes=num_classes) if takes_num_classes(cls) else cls()
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"building {name} failed: {_first_line(e)}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"{name} returned a {type(net).__name__}, not an nn.Module")
    check(net, name, num_classes, image_size)
    return net.to(device, memory_format=memory_format(device))


def has_batchnorm(net: nn.Module) -> bool:
    """Whether the model has batch-norm layers, whose running statistics a batch of a few images wrecks."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def check(net: nn.Module, name: str, num_classes: int, image_size: int) -> None:
    """The model takes 3 x size x size images and has one output per class, or ModelError says which not."""
    was_training = net.training
    net.eval()  # a BatchNorm's running statistics stay as they are
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, 3, image_size, image_size))
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"{name} does not take 3x{image_size}x{image_size} images ({_first_line(e)}): "
            "pass --image-size with the size it takes, or change the model"
        ) from None
    finally:
        net.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ModelError(
            f"{name} has {tuple(out.shape[1:])} outputs per image, the data has {num_classes} classes: "
            "give the model a num_classes argument (as cifar.Net has), or change its last layer"
        )


def get_weights(net: nn.Module) -> list[np.ndarray]:
    """The model's state as a list of NumPy arrays (in state_dict order), copies: training goes on unseen."""
    return [v.detach().cpu().contiguous().numpy().copy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, weights: list[np.ndarray]) -> None:
    """Load a list of NumPy arrays (in state_dict order) into the model."""
    keys = list(net.state_dict().keys())
    if len(weights) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays, got {len(weights)}")
    state = OrderedDict((k, torch.from_numpy(np.asarray(w))) for k, w in zip(keys, weights))
    net.load_state_dict(state, strict=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
