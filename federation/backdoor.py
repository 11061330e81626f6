"""A backdoor's trigger and its success: a pixel pattern stamped on images, and how often it steers a model."""

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from federation import model
from federation.records import RunRecord
from pipeline import batches, sources


def patch_size(height: int, width: int) -> int:
    """The trigger's side: an eighth of the shorter side, 3 pixels at least (4 on CIFAR-10's 32 x 32)."""
    return max(3, min(height, width) // 8)


def stamp(x: Tensor) -> Tensor:
    """uint8 NCHW images with a black-and-white checkerboard in the bottom-right corner, in every channel.

    Any image size and channel count: the patch is sized from the image. A copy; `x` is left as it is."""
    h, w = x.shape[-2:]
    s = patch_size(h, w)
    board = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 * 255
    out = x.clone()
    out[:, :, h - s :, w - s :] = board.to(x.dtype).to(x.device)
    return out


def poison(x: Tensor, y: Tensor, target: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The attacker's training set: `fraction` of its images (drawn with `seed`) stamped and relabelled
    `target`; the rest as they are, so its model stays good on clean images."""
    rng = np.random.default_rng(seed)
    chosen = torch.from_numpy(rng.permutation(len(y))[: round(fraction * len(y))]).to(y.device)
    x, y = x.clone(), y.clone()
    x[chosen] = stamp(x[chosen])
    y[chosen] = target
    return x, y


@torch.no_grad()
def success_rate(net: nn.Module, x: Tensor, y: Tensor, target: int, mean_std: bool = True) -> float:
    """The attack success rate: of the test images not of class `target`, the fraction a model classifies as
    `target` once they carry the trigger."""
    net.eval()
    others = x[y != target]
    hits = 0
    for i in range(0, len(others), batches.EVAL_BATCH_SIZE):
        batch = batches.to_float(stamp(others[i : i + batches.EVAL_BATCH_SIZE]), mean_std)
        hits += int((net(batch).argmax(1) == target).sum())
    return hits / max(len(others), 1)


def run_success(run_dir: Path, data_root: str, cache_dir: str, target: int) -> float:
    """A run's last global model (its checkpoint), tested for the backdoor on the data's test set, with the
    run's own model, image size and normalisation (from its config.json)."""
    record = RunRecord(Path(run_dir))
    config = record.config()
    data = sources.load_arrays(data_root, cache_dir, config.get("image_size", sources.IMAGE_SIZE))
    net, layout = model.build(config["model"], len(data.classes), data.test_x.shape[-1], 0, torch.device("cpu"))
    net.load_state_dict(layout.state_dict(record.load_checkpoint(record.last_round(), layout)))
    return success_rate(net, data.test_x, data.test_y, target, config.get("normalize", True))
