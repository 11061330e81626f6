"""What every client reply must pass before it is aggregated: form, finiteness, size, partition claims."""

import hashlib
import math

import numpy as np

MAX_EXAMPLES = 10_000_000  # a claimed dataset size above this is absurd for this task
# What a client reports with each update besides its model; the server screens and averages these
TRAIN_METRICS = ("train_loss", "fit_seconds", "partition_id", "num_partitions", "partition_scheme")
# and the training settings it used, which the server records (server.py cannot know them otherwise)
CLIENT_SETTINGS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "augment", "normalize", "proximal_mu",
                   "dp_sgd_noise", "dp_sgd_clip", "dp_delta")  # fmt: skip
# dp_epsilon: a DP-SGD client's epsilon so far; loss_before/after: its model on its own evaluation data;
# withheld: 1 from a client under DP, which sends none of WITHHELD (no epsilon covers them)
OPTIONAL_METRICS = (*CLIENT_SETTINGS, "dp_epsilon", "loss_before", "loss_after", "withheld")
WITHHELD = ("train_loss", "fit_seconds", "loss_before", "loss_after")
COUNT_STEP = 100  # under DP a client's example count is sent rounded to this: its exact size is no one's business
PROBE_EXAMPLES = 256  # of a client's evaluation data, tested before and after training to catch a blow-up
EVAL_METRICS = ("accuracy", "eval_seconds")
AVERAGED = ("train_loss", "accuracy")  # the rest are timings and identities, not means worth taking


def update_problem(arrays: list[np.ndarray], template: list[np.ndarray], num_examples: int) -> str | None:
    """Why a client's model update must not be aggregated, or None when it is sound."""
    if not isinstance(num_examples, int) or not 0 < num_examples <= MAX_EXAMPLES:
        return f"claims {num_examples} examples (must be 1..{MAX_EXAMPLES})"
    if len(arrays) != len(template):
        return f"sent {len(arrays)} arrays, the model has {len(template)}"
    for i, (a, t) in enumerate(zip(arrays, template)):
        if a.shape != t.shape or a.dtype != t.dtype:
            return f"array {i} is {a.dtype}{list(a.shape)}, the model's is {t.dtype}{list(t.shape)}"
        if not np.isfinite(a).all():
            return f"array {i} holds NaN or Inf"
    return None


DIVERGED_FACTOR = 100  # honest ResNet-18 clients, early on, reach ~6x their starting loss; a blown-up one 1e7x


def diverged(before: float, after: float) -> bool:
    """Whether a model blew up in training: its loss after over DIVERGED_FACTOR x its loss before (at least
    0.1), or not finite. A ResNet-18 that met a batch of two goes from 2.3 to 1e7 and beyond."""
    return not math.isfinite(after) or after > DIVERGED_FACTOR * max(before, 0.1)


def divergence(metrics: dict) -> str | None:
    """Why a client's own numbers say its model blew up in training, or None."""
    before, after = metrics.get("loss_before"), metrics.get("loss_after")
    if isinstance(before, int | float) and isinstance(after, int | float) and diverged(before, after):
        return (
            f"its model diverged in training (loss on its own evaluation data {before:.3g} before, {after:.3g} after)"
        )
    return None


def coarse_count(num_examples: int) -> int:
    """An example count as a client under DP sends it: to the nearest COUNT_STEP, at least COUNT_STEP."""
    return max(COUNT_STEP, round(num_examples / COUNT_STEP) * COUNT_STEP)


def required_metrics(metrics: dict) -> tuple[str, ...]:
    """The metrics an update must carry: all of TRAIN_METRICS, less the WITHHELD ones from a client under DP."""
    if metrics.get("withheld") == 1:
        return tuple(k for k in TRAIN_METRICS if k not in WITHHELD)
    return TRAIN_METRICS


def metrics_problem(metrics: dict) -> str | None:
    """Why an update's metrics are not what a client of this project reports, or None."""
    missing = [k for k in required_metrics(metrics) if not isinstance(metrics.get(k), int | float)]
    return f"sent no {', '.join(missing)}" if missing else None


def evaluation_problem(loss: float, num_examples: int, metrics: dict) -> str | None:
    """Why a client's evaluation result must not be averaged in, or None."""
    if not isinstance(num_examples, int) or not 0 < num_examples <= MAX_EXAMPLES:
        return f"claims {num_examples} examples (must be 1..{MAX_EXAMPLES})"
    if not isinstance(loss, int | float) or not math.isfinite(loss) or loss < 0:
        return f"reports loss {loss}"
    accuracy = metrics.get("accuracy")
    if not isinstance(accuracy, int | float) or not 0 <= accuracy <= 1:
        return f"reports accuracy {accuracy!r} (must be a number in [0, 1])"
    return None


def weighted_average(metrics: list[tuple[int, dict]]) -> dict:
    """Example-weighted mean of the metrics worth averaging (losses and accuracies)."""
    total = sum(n for n, _ in metrics)
    keys = {k for _, m in metrics for k in m if k in AVERAGED}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in metrics) / total for k in sorted(keys)} if total else {}


def fingerprint(arrays: list[np.ndarray]) -> str:
    """A hash of an update's bytes: the same update, the same fingerprint."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def partition_scheme(partitioner: str, num_partitions: int, alpha: float, seed: int) -> int:
    """A number that clients sharing one partitioning agree on (and others, almost surely, do not)."""
    text = f"{partitioner}/{num_partitions}/{alpha if partitioner == 'dirichlet' else ''}/{seed}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1  # fits any int metric


def partition_conflict(reports: dict[str, dict]) -> str | None:
    """Why the clients' reported shares of the data cannot be one partitioning, or None."""
    parted = {who: m for who, m in reports.items() if m.get("num_partitions", 0) > 0}
    if not parted:
        return None
    if len(parted) < len(reports):
        return "some clients train on the whole set, others on a partition: their data overlaps"
    if len({m.get("partition_scheme") for m in parted.values()}) > 1:
        return "clients use different --partitioner/--num-partitions/--alpha/--seed: their shares overlap"
    ids = [m.get("partition_id") for m in parted.values()]
    if len(set(ids)) < len(ids):
        return f"two clients hold the same partition (ids {sorted(ids)})"
    return None
