"""Each client's share of a labelled set: flwr-datasets' partitioners, seeded, cached; and a held-out split."""

import contextlib
import hashlib
import importlib.metadata
import os
from pathlib import Path

import numpy as np
from torch import Tensor

PARTITIONERS = ("iid", "dirichlet")


def partition_indices(
    labels: Tensor,
    num_partitions: int,
    partition_id: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Indices of one client's share of a labelled set, from flwr-datasets' partitioners. With a cache_dir, kept
    there: a ClientApp starts a process per message, and importing flwr-datasets alone takes seconds."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} is not in 0..{num_partitions - 1}")
    path = cached_path(cache_dir, labels, num_partitions, partition_id, partitioner, alpha, seed)
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            return np.load(path)
    share = _partition(labels, num_partitions, partition_id, partitioner, alpha, seed)
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the partitioning next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, share)
            os.replace(tmp, path)  # readers never see half a file
    return share


def cached_path(cache_dir, labels: Tensor, *settings) -> Path | None:
    """Where a share is kept: named by the labels, the settings and flwr-datasets' version (None: no cache)."""
    if not cache_dir:
        return None
    h = hashlib.sha256(labels.numpy().tobytes())
    h.update(repr((settings, importlib.metadata.version("flwr-datasets"))).encode())
    return Path(cache_dir).expanduser() / "partitions" / f"{h.hexdigest()[:24]}.npy"


def _partition(
    labels: Tensor, num_partitions: int, partition_id: int, partitioner: str, alpha: float, seed: int
) -> np.ndarray:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

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
