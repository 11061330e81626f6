"""The decoded-image cache: one file per image folder and size, rebuilt when a file changes, a few kept."""

import contextlib
import hashlib
import os
import pickle
import time
from pathlib import Path

import torch

CACHE_KEEP = 3  # decoded folders kept (~185 MB each for CIFAR-10): the least recently used go first


def fingerprint(files: list[str]) -> str:
    """Hash of every file's name, size and mtime: any change invalidates the cache."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def path_for(cache_dir: str | Path, root: Path, image_size: int) -> Path:
    """Where the decoded arrays of `root` at `image_size` live."""
    key = hashlib.sha256(f"{root.resolve()}\0{image_size}".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{key}.pt"


def read(path: Path, expected: str) -> dict | None:
    """The cached arrays if they were decoded from files with this fingerprint, else None."""
    # An unreadable cache is simply rebuilt
    with contextlib.suppress(OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError):
        saved = torch.load(path, weights_only=True)
        if saved["fingerprint"] == expected:
            # Recently used: pruned last. The access time marks it; the modification time stays the write's
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
            return saved
    return None


def write(path: Path, payload: dict) -> None:
    """Save atomically (readers never see half a cache), then prune the oldest entries."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError:
        return  # a read-only cache dir only costs the decoding next time
    prune(path.parent)


def prune(cache_dir: Path, keep: int = CACHE_KEEP) -> None:
    """Remove all but the `keep` most recently used entries."""
    with contextlib.suppress(OSError):
        entries = sorted(cache_dir.glob("*.pt"), key=lambda p: p.stat().st_atime_ns, reverse=True)
        for old in entries[keep:]:
            with contextlib.suppress(OSError):
                old.unlink()
