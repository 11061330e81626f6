"""A run's records: config.json, metrics.csv, plot.png, TensorBoard events and a checkpoint per round."""

import contextlib
import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from federation.model import Layout

FIELDS = [
    "round",
    "strategy",
    "train_loss",
    "distributed_loss",
    "distributed_accuracy",
    "centralized_loss",
    "centralized_accuracy",
    "fit_clients",
    "rejected",
    "clipped",
    "epsilon",
    "client_epsilon",
    "seconds",
    "flower_overhead_seconds",
]
SCALARS = ("train_loss", "distributed_loss", "distributed_accuracy", "centralized_loss", "centralized_accuracy",
           "fit_clients", "rejected", "clipped", "epsilon", "client_epsilon", "seconds")  # fmt: skip


CLIENT_FIELDS = ["round", "client", "partition_id", "num_examples", "train_loss", "dp_epsilon", "verdict"]


class CheckpointError(Exception):
    """A checkpoint that does not fit the current model; the message says how in one line."""


class RunRecord:
    """A run directory: config.json, metrics.csv (one row per round, round 0 the initial model), plot.png,
    TensorBoard events (`tensorboard --logdir RUN_DIR`) and checkpoints/round-NNN.pt."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.metrics = self.dir / "metrics.csv"
        self.checkpoints = self.dir / "checkpoints"
        self._events = None

    def create(self, config: dict) -> None:
        """Write config.json (replacing it) and an empty metrics.csv if there is none."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "config.json", json.dumps(config, indent=2, default=str).encode())
        if not self.metrics.exists():
            _atomic_write(self.metrics, (",".join(FIELDS) + "\n").encode())

    def config(self) -> dict:
        """The run's saved settings."""
        return json.loads((self.dir / "config.json").read_text())

    def rows(self) -> list[dict]:
        """metrics.csv as dicts of strings."""
        if not self.metrics.is_file():
            return []
        with self.metrics.open(newline="") as f:
            return list(csv.DictReader(f))

    def last_round(self) -> int:
        """The last round recorded (0 for none)."""
        rows = self.rows()
        return int(rows[-1]["round"]) if rows else 0

    def append(self, row: dict) -> None:
        """Add one round's row, on disk before the next round starts, and its TensorBoard scalars."""
        with self.metrics.open(newline="") as f:
            fields = next(csv.reader(f))  # the file's own columns, should they ever differ
        with self.metrics.open("a", newline="") as f:
            csv.DictWriter(f, fields, extrasaction="ignore").writerow({k: _fmt(row.get(k)) for k in fields})
            f.flush()
            os.fsync(f.fileno())
        self._tensorboard(row)

    def open_events(self) -> None:
        """Start the TensorBoard event file (imported now, not mid-round, where a Ctrl-C could break it)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is in requirements.txt; without it, only the CSV and the plot
            return
        self._events = SummaryWriter(log_dir=str(self.dir))

    def _tensorboard(self, row: dict) -> None:
        if self._events is None:
            return
        for key in SCALARS:
            if isinstance(row.get(key), int | float):
                self._events.add_scalar(key, row[key], row["round"])
        self._events.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self._events is not None:
            self._events.close()
            self._events = None

    def checkpoint(self, server_round: int) -> Path:
        """Path of a round's checkpoint (a state_dict of the run's model)."""
        return self.checkpoints / f"round-{server_round:03d}.pt"

    def privacy_spend(self) -> Path:
        """Path of the central-DP accountant's state after the latest noised release, written before the release."""
        return self.checkpoints / "privacy.json"

    def privacy_state(self, server_round: int) -> Path:
        """Path of the central-DP accountant's state after a round, beside its checkpoint."""
        return self.checkpoints / f"round-{server_round:03d}.privacy.json"

    def client_epsilons(self) -> dict[str, float]:
        """clients.csv's largest DP-SGD epsilon per partition id (partitioned clients only)."""
        path, spent = self.dir / "clients.csv", {}
        if path.is_file():
            with path.open(newline="") as f:
                for r in csv.DictReader(f):
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        if int(r["partition_id"]) >= 0 and r["dp_epsilon"]:
                            spent[r["partition_id"]] = max(float(r["dp_epsilon"]), spent.get(r["partition_id"], 0.0))
        return spent

    def append_clients(self, rows: list[dict]) -> None:
        """clients.csv: each client's update of each round, and what the server did with it."""
        path = self.dir / "clients.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, CLIENT_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({k: _fmt(r.get(k)) for k in CLIENT_FIELDS} for r in rows)

    def save_checkpoint(self, server_round: int, weights: list[np.ndarray], layout: Layout) -> None:
        """Save the global model after a round, atomically."""
        tmp = self.checkpoint(server_round).with_suffix(".tmp")
        torch.save(layout.state_dict(weights), tmp)
        os.replace(tmp, self.checkpoint(server_round))

    def load_checkpoint(self, server_round: int, layout: Layout) -> list[np.ndarray]:
        """A round's global model as arrays in the model's order; CheckpointError if it is another model's."""
        path = self.checkpoint(server_round)
        try:
            state = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        problem = layout.mismatch(list(state), [tuple(v.shape) for v in state.values()])
        if problem:
            raise CheckpointError(
                f"{path} is not a checkpoint of the current model: {problem}. Resume with the model the run was "
                "started with, or start a new run"
            )
        return [v.numpy() for v in state.values()]

    def plot(self, title: str) -> Path:
        """Accuracy and loss against round, from metrics.csv; accuracy on a fixed [0, 1] axis."""
        plt = pyplot()
        rows = self.rows()
        rounds = [int(r["round"]) for r in rows]

        def series(key: str) -> list[float]:
            return [float(r[key]) if r.get(key) else math.nan for r in rows]

        # Markers shrink and lines dash from one series to the next: equal values stay visible
        styles = [
            {"marker": "o", "ms": 8, "ls": "-"},
            {"marker": "s", "ms": 5, "ls": "--"},
            {"marker": "^", "ms": 3, "ls": ":"},
        ]
        fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.2))
        for style, (key, label) in zip(
            styles,
            (("centralized_accuracy", "centralized (test set)"), ("distributed_accuracy", "distributed (clients)")),
        ):
            acc.plot(rounds, series(key), label=label, **style)
        for style, (key, label) in zip(
            styles,
            (
                ("centralized_loss", "centralized (test set)"),
                ("distributed_loss", "distributed (clients)"),
                ("train_loss", "training (clients)"),
            ),
        ):
            loss.plot(rounds, series(key), label=label, **style)
        acc.set(title="Accuracy", xlabel="round (0: the initial model)", ylabel="accuracy", ylim=(0, 1))
        for key, label, colour in (("epsilon", "epsilon (central DP)", "tab:red"),
                                   ("client_epsilon", "epsilon (clients' DP-SGD, highest)", "tab:purple")):  # fmt: skip
            if any(r.get(key) for r in rows):  # privacy spent, on its own axis
                spent = acc.twinx()
                spent.plot(rounds, series(key), color=colour, ls="-.", marker="x", label=label)
                spent.set_ylabel("epsilon")
                spent.legend(loc="lower right")
        loss.set(title="Loss (mean per example)", xlabel="round (0: the initial model)", ylabel="cross-entropy")
        for ax in (acc, loss):
            ax.grid(alpha=0.3)
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(title)
        fig.tight_layout()
        path = self.dir / "plot.png"
        fig.savefig(path.with_suffix(".tmp.png"), dpi=100)
        plt.close(fig)
        os.replace(path.with_suffix(".tmp.png"), path)
        return path


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def print_round(row: dict) -> None:
    """One line per finished round."""

    def num(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.4f}"

    if row["round"] == 0:
        print(f"Round 0 (the initial model): centralized accuracy {num('centralized_accuracy')} "
              f"loss {num('centralized_loss')}", flush=True)  # fmt: skip
        return
    kept = " (no update accepted: model kept)" if row.get("fit_clients") == 0 else ""
    if row.get("fit_clients") == 0 and row.get("noise_only"):
        kept = " (no update accepted: a model with the noise alone was released, and counted in epsilon)"
    epsilon = f" | epsilon {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""
    if row.get("client_epsilon") is not None:
        epsilon += f" | clients' epsilon up to {row['client_epsilon']:.3f}"
    print(
        f"Round {row['round']}: distributed accuracy {num('distributed_accuracy')} loss {num('distributed_loss')}"
        f" | centralized accuracy {num('centralized_accuracy')} loss {num('centralized_loss')}"
        f" | {row.get('fit_clients', 0)} clients, {row.get('rejected', 0)} rejected, {row.get('clipped', 0)} clipped"
        f"{epsilon}, "
        f"{row['seconds']:.1f} s{kept}",
        flush=True,
    )


def summary_table(rows: list[dict]) -> str:
    """The run's rounds as a fixed-width table."""
    hidden = {"strategy", "fit_clients", "rejected", "clipped", "flower_overhead_seconds"}
    for key in ("epsilon", "client_epsilon"):
        if not any(r.get(key) for r in rows):
            hidden.add(key)
    cols = [f for f in FIELDS if f not in hidden and (not rows or f in rows[0])]
    lines = ["  ".join(f"{c:>20}" if i else f"{c:>5}" for i, c in enumerate(cols))]
    for r in rows:
        lines.append("  ".join((f"{r[c] or '-':>20}" if i else f"{r[c]:>5}") for i, c in enumerate(cols)))
    return "\n".join(lines)
