"""A client that answers every round with a different kind of bad result (for the tests).

python hostile_client.py ADDRESS UPDATE_KINDS EVAL_KINDS   (comma-separated, one per round)
"""

import sys
from pathlib import Path

import flwr as fl
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client import wait_for_server

# What an honest client reports besides its model (federation.screening.TRAIN_METRICS): a poisoner mimics it
HONEST_METRICS = {"train_loss": 1.0, "fit_seconds": 1.0, "partition_id": -1, "num_partitions": 0, "partition_scheme": 0}


def poisoned(weights: list[np.ndarray], distance: float, seed: int) -> list[np.ndarray]:
    """The global model pushed `distance` (L2) along a random direction: finite, well-formed, ruinous."""
    rng = np.random.default_rng(seed)
    direction = [rng.standard_normal(w.shape) for w in weights]
    scale = distance / np.sqrt(sum(float(np.sum(d**2)) for d in direction))
    return [(w + scale * d).astype(w.dtype) for w, d in zip(weights, direction)]


def bad_update(kind: str, weights: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    w = [a.copy() for a in weights]
    if kind.startswith("far"):  # far<distance>, e.g. far1e4
        return poisoned(w, float(kind[3:]), seed=len(kind)), 135
    if kind == "shape":
        w[0] = np.zeros((7, 7), dtype=np.float32)
    elif kind == "count":
        w = w[:-1]
    elif kind == "nan":
        w[2][0] = np.nan
    elif kind == "inf":
        w[4][:] = np.inf
    elif kind == "dtype":
        w[1] = w[1].astype(np.float64)
    elif kind == "examples0":
        return w, 0
    elif kind == "examples-huge":
        return w, 10**12
    elif kind == "oversized":  # 80 MB, well above the server's gRPC message limit
        w[0] = np.zeros(20_000_000, dtype=np.float32)
    return w, 100


def bad_evaluation(kind: str) -> tuple[float, int, dict]:
    return {
        "honest": (2.3, 15, {"accuracy": 0.1}),
        "nanloss": (float("nan"), 100, {"accuracy": 0.5}),
        "accuracy5": (1.0, 100, {"accuracy": 5.0}),
        "examples0": (1.0, 0, {"accuracy": 0.5}),
    }[kind]


class Hostile(fl.client.NumPyClient):
    def __init__(self, updates: list[str], evals: list[str]) -> None:
        self.updates, self.evals = updates, evals

    def fit(self, parameters, config):
        kind = self.updates.pop(0)
        weights, n = bad_update(kind, parameters)
        return weights, n, HONEST_METRICS if kind.startswith("far") else {}

    def evaluate(self, parameters, config):
        return bad_evaluation(self.evals.pop(0))


if __name__ == "__main__":
    address, updates, evals = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    assert wait_for_server(address, None, timeout=60, quiet=True)
    fl.client.start_client(server_address=address, client=Hostile(updates, evals).to_client())
