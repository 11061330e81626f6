"""What the tutorial's scripts and the Flower App share: flags, validation, run records, resume, strategy choice.

server.py (start_server) and server_app.py (Message API) adapt Flower's two strategy interfaces to `Rounds`,
which screens every reply, keeps the run directory and evaluates centrally; client.py (NumPyClient) and
client_app.py (Message API) wrap `Participant`, one client's data, model and local training. Nothing here
imports Flower, so both faces get the same behaviour from the same lines.
"""

import argparse
import csv
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import cifar
import flags

log = logging.getLogger("flwr")  # Flower's logger: our lines land where its own do, in both faces

FIELDS = [
    "round",
    "train_loss",
    "distributed_loss",
    "distributed_accuracy",
    "centralized_loss",
    "centralized_accuracy",
    "fit_clients",
    "rejected",
    "seconds",
    "flower_overhead_seconds",
]
MAX_EXAMPLES = 10_000_000  # a claimed dataset size above this is absurd for this task
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "bulyan")
# What a client reports with each update besides its model; the server screens and averages these
TRAIN_METRICS = ("train_loss", "fit_seconds", "partition_id", "num_partitions", "partition_scheme")
EVAL_METRICS = ("accuracy", "eval_seconds")
AVERAGED = ("train_loss", "accuracy")  # the rest are timings and identities, not means worth taking
HOLDOUT_FRACTION = 0.1  # of a partition, kept back for the client's own evaluation


# ---------------------------------------------------------------- flags


def add_server_args(parser: flags.Parser) -> None:
    """Flags of the federated experiment, the same for server.py, run.py and the App's run config."""
    parser.add_argument("--rounds", type=flags.positive_int, default=3, help="rounds of federated learning")
    parser.add_argument("--min-clients", type=flags.positive_int, default=2, help="clients needed to start a round")
    parser.add_argument(
        "--fraction-fit",
        type=flags.fraction,
        default=1.0,
        help="fraction of connected clients sampled each round (at least --min-clients)",
    )
    parser.add_argument(
        "--central-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the global model on the full test set every round (needs the data)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedavg",
        help="Flower's aggregation strategy: fedavg (the tutorial's), fedprox, fedadam, or the robust "
        "fedmedian, fedtrimmedavg, krum, bulyan",
    )
    parser.add_argument(
        "--proximal-mu", type=flags.non_negative_float, default=0.1, help="fedprox: weight of the proximal term"
    )
    parser.add_argument(
        "--trim-beta",
        type=flags.proportion,
        default=0.2,
        help="fedtrimmedavg: fraction of the largest and of the smallest values cut per coordinate (< 0.5)",
    )
    parser.add_argument(
        "--num-malicious",
        type=flags.non_negative_int,
        default=0,
        help="krum, bulyan: how many clients may be malicious (krum needs 2f+3 clients, bulyan 4f+3)",
    )
    parser.add_argument(
        "--server-lr", type=flags.positive_float, default=0.01, help="fedadam: the server's learning rate (eta)"
    )
    parser.add_argument(
        "--screen-factor",
        type=flags.non_negative_float,
        default=10.0,
        help="distance screen: with 3+ updates in a round, reject one whose L2 distance from the current global "
        "model is over this many times the round's median distance; 0: off",
    )
    parser.add_argument(
        "--max-update-norm",
        type=flags.non_negative_float,
        default=1000.0,
        help="distance screen: reject any update whose L2 distance from the current global model is over this "
        "(honest updates of this CNN move it by well under 100); 0: off",
    )
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where this run's records go (default: runs/<date-time>)"
    )


def strategy_problem(args: argparse.Namespace) -> str | None:
    """Why the chosen strategy cannot work with these settings, or None."""
    f, n = args.num_malicious, args.min_clients
    if args.strategy == "krum" and n < 2 * f + 3:
        return f"krum with --num-malicious {f} needs --min-clients >= {2 * f + 3} (2f+3), not {n}"
    if args.strategy == "bulyan" and n < 4 * f + 3:
        return f"bulyan with --num-malicious {f} needs --min-clients >= {4 * f + 3} (4f+3), not {n}"
    if args.strategy == "fedtrimmedavg" and args.trim_beta >= 0.5:
        return f"--trim-beta {args.trim_beta} must be below 0.5"
    return None


def server_parser(description: str) -> flags.Parser:
    """The server's flags: server.py's (less its gRPC ones) and the App's run config's."""
    parser = flags.Parser(description=description)
    add_server_args(parser)
    parser.add_argument(
        "--data-root", default=cifar.DATA_ROOT, help="the data, for the centralized evaluation (as cifar.py)"
    )
    parser.add_argument(
        "--cache-dir", default=cifar.CACHE_DIR, help="where decoded image folders are cached; '' to disable"
    )
    parser.add_argument("--device", default="cpu", help="device for the centralized evaluation")
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalize test images as the clients do (their --normalize)",
    )
    parser.add_argument("--seed", type=flags.non_negative_int, default=0, help="seeds the initial global model")
    return parser


# What a resumed run takes from its config.json rather than from the command line
EXPERIMENT_KEYS = (
    "rounds",
    "min_clients",
    "fraction_fit",
    "seed",
    "central_eval",
    "normalize",
    "data_root",
    "cache_dir",
    "strategy",
    "proximal_mu",
    "trim_beta",
    "num_malicious",
    "server_lr",
    "screen_factor",
    "max_update_norm",
)


def args_from_config(parser: flags.Parser, config: dict, renames: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse a Flower run config (or node config) with the scripts' own parser: same flags, same checks.

    Keys are the flags without dashes ("batch-size"); `renames` maps config keys to other flags.
    """
    renames = renames or {}
    known = parser._option_string_actions  # the other face's keys share the config: skip them
    argv = []
    for key, value in config.items():
        flag = "--" + str(renames.get(key, key))
        if renames.get(key, key) is None or flag not in known:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the model's arrays


@functools.cache
def model_keys() -> list[str]:
    """The Net's state_dict keys, in order: the names of the arrays that travel."""
    return list(cifar.Net().state_dict())


def state_dict(weights: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    """Arrays in the model's order as a Net state_dict."""
    return OrderedDict((k, torch.from_numpy(np.array(w))) for k, w in zip(model_keys(), weights, strict=True))


# ---------------------------------------------------------------- validation


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


def update_distance(arrays: list[np.ndarray], weights: list[np.ndarray]) -> float:
    """L2 distance between a client's model and the global one, over all arrays."""
    return math.sqrt(sum(float(np.sum((a.astype(np.float64) - w) ** 2)) for a, w in zip(arrays, weights)))


def weighted_average(metrics: list[tuple[int, dict]]) -> dict:
    """Example-weighted mean of the metrics worth averaging (losses and accuracies)."""
    total = sum(n for n, _ in metrics)
    keys = {k for _, m in metrics for k in m if k in AVERAGED}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in metrics) / total for k in sorted(keys)} if total else {}


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


# ---------------------------------------------------------------- run records


class RunRecord:
    """A run directory: config.json, metrics.csv (one row per round), plot.png, checkpoints/."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.metrics = run_dir / "metrics.csv"
        self.checkpoints = run_dir / "checkpoints"

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
        """Add one round's row, on disk before the next round starts."""
        with self.metrics.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: _fmt(row.get(k)) for k in FIELDS})
            f.flush()
            os.fsync(f.fileno())

    def checkpoint(self, server_round: int) -> Path:
        """Path of a round's checkpoint (a Net state_dict)."""
        return self.checkpoints / f"round-{server_round:03d}.pt"

    def save_checkpoint(self, server_round: int, weights: list[np.ndarray]) -> None:
        """Save the global model after a round, atomically."""
        tmp = self.checkpoint(server_round).with_suffix(".tmp")
        torch.save(state_dict(weights), tmp)
        os.replace(tmp, self.checkpoint(server_round))

    def load_checkpoint(self, server_round: int) -> list[np.ndarray]:
        """A round's global model as arrays in state_dict order."""
        state = torch.load(self.checkpoint(server_round), weights_only=True)
        return [v.numpy() for v in state.values()]

    def plot(self) -> Path:
        """Accuracy and loss against round, from metrics.csv."""
        plt = _pyplot()

        rows = self.rows()
        rounds = [int(r["round"]) for r in rows]

        def series(key: str) -> list[float]:
            return [float(r[key]) if r[key] else math.nan for r in rows]

        fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (
            ("centralized_accuracy", "centralized (test set)"),
            ("distributed_accuracy", "distributed (clients)"),
        ):
            acc.plot(rounds, series(key), marker="o", label=label)
        for key, label in (
            ("centralized_loss", "centralized (test set)"),
            ("distributed_loss", "distributed (clients)"),
            ("train_loss", "training (clients)"),
        ):
            loss.plot(rounds, series(key), marker="o", label=label)
        acc.set(title="Accuracy", xlabel="round", ylabel="accuracy")
        loss.set(title="Loss (mean per example)", xlabel="round", ylabel="cross-entropy")
        for ax in (acc, loss):
            ax.grid(alpha=0.3)
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(f"Federated CIFAR-10: {self.dir.name}")
        fig.tight_layout()
        path = self.dir / "plot.png"
        fig.savefig(path.with_suffix(".tmp.png"), dpi=100)
        plt.close(fig)
        os.replace(path.with_suffix(".tmp.png"), path)
        return path


def _pyplot():
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

    kept = " (no update accepted: model kept)" if row.get("fit_clients") == 0 else ""
    print(
        f"Round {row['round']}: distributed accuracy {num('distributed_accuracy')} loss {num('distributed_loss')}"
        f" | centralized accuracy {num('centralized_accuracy')} loss {num('centralized_loss')}"
        f" | {row.get('fit_clients', 0)} clients, {row.get('rejected', 0)} rejected, {row['seconds']:.1f} s{kept}",
        flush=True,
    )


def summary_table(rows: list[dict]) -> str:
    """The run's rounds as a fixed-width table."""
    cols = [f for f in FIELDS if f not in ("fit_clients", "rejected", "flower_overhead_seconds")]
    lines = ["  ".join(f"{c:>20}" if i else f"{c:>5}" for i, c in enumerate(cols))]
    for r in rows:
        lines.append("  ".join((f"{r[c] or '-':>20}" if i else f"{r[c]:>5}") for i, c in enumerate(cols)))
    return "\n".join(lines)


# ---------------------------------------------------------------- one run's rounds


def central_evaluator(
    data_root: str, cache_dir: str, device: torch.device, mean_std: bool = True
) -> Callable[[list[np.ndarray]], tuple[float, float]]:
    """A function testing a global model on the full test set: weights -> (loss, accuracy)."""
    data = cifar.load_arrays(data_root, cache_dir)
    # uint8 on the device, converted a batch at a time exactly as the clients' batches are
    testloader = cifar.Batches(data.test_x.to(device), data.test_y.to(device), cifar.EVAL_BATCH_SIZE, mean_std=mean_std)
    net = cifar.make_net(0, device)
    lock = threading.Lock()  # Flower may call from more than one thread

    def evaluate(weights: list[np.ndarray]) -> tuple[float, float]:
        with lock:
            cifar.set_weights(net, weights)
            return cifar.test(net, testloader, device)

    return evaluate


class Rounds:
    """One run's rounds: screens every reply, keeps the global model, checkpoints, metrics and the plot.

    Both servers call it with plain arrays and numbers, in each round:
    begin -> screen_updates -> trained -> screen_evaluation... -> evaluated -> end.
    Round numbers are absolute: a resumed run continues its numbering.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        record: RunRecord,
        on_round: Callable[[dict], None] = print_round,
    ) -> None:
        self.record, self.on_round, self.num_rounds = record, on_round, args.rounds
        self.screen_factor = getattr(args, "screen_factor", 0.0)
        self.max_update_norm = getattr(args, "max_update_norm", 0.0)
        self.done = record.last_round()
        self.template = cifar.get_weights(cifar.make_net(args.seed, torch.device("cpu")))
        self.weights = record.load_checkpoint(self.done) if self.done else self.template
        self.evaluate_central = None
        if args.central_eval:
            device = cifar.resolve_device(getattr(args, "device", "cpu"))
            self.evaluate_central = central_evaluator(args.data_root, args.cache_dir, device, args.normalize)
        self.row: dict = {}
        self.work: dict[str, float] = {}
        self.started = 0.0
        _pyplot()  # imported now, not mid-round, where a Ctrl-C could break the import halfway

    @property
    def rounds_left(self) -> int:
        """Rounds still to run."""
        return self.num_rounds - self.done

    def begin(self, server_round: int) -> None:
        """A round's clock starts once its clients are sampled, not while waiting for them."""
        self.started = time.perf_counter()
        self.row, self.work = {"round": server_round}, {}

    def screen_updates(self, updates: list[tuple[str, list[np.ndarray], int, dict]]) -> list[bool]:
        """Which of (client, arrays, num_examples, metrics) may be aggregated; logs each one refused."""
        verdicts = []
        for who, arrays, num_examples, metrics in updates:
            problem = update_problem(arrays, self.template, num_examples)
            if problem is None:
                missing = [k for k in TRAIN_METRICS if not isinstance(metrics.get(k), int | float)]
                if missing:
                    problem = f"sent no {', '.join(missing)}"
            if problem:
                log.warning("Rejected update from client %s: %s", who, problem)
            verdicts.append(problem is None)
        self._screen_distances(updates, verdicts)
        conflict = partition_conflict({u[0]: u[3] for u, ok in zip(updates, verdicts) if ok})
        if conflict:
            log.warning("Clients disagree on partitioning: %s", conflict)
        return verdicts

    def _screen_distances(self, updates: list, verdicts: list[bool]) -> None:
        """The distance screen: refuse sound-looking updates that would drag the model far away."""
        sound = [i for i, ok in enumerate(verdicts) if ok]
        distance = {i: update_distance(updates[i][1], self.weights) for i in sound}
        median = float(np.median(list(distance.values()))) if len(sound) >= 3 else 0.0
        for i in sound:
            why = None
            if self.max_update_norm and distance[i] > self.max_update_norm:
                why = f"over --max-update-norm {self.max_update_norm:g}"
            elif self.screen_factor and median > 0 and distance[i] > self.screen_factor * median:
                why = f"over --screen-factor {self.screen_factor:g} x the round's median {median:.3g}"
            if why:
                log.warning(
                    "Rejected update from client %s: it moves the model %.3g from the global one, %s",
                    updates[i][0],
                    distance[i],
                    why,
                )
                verdicts[i] = False

    def trained(self, weights: list[np.ndarray] | None, metrics: list[tuple[int, dict]], rejected: int) -> None:
        """Record the round's aggregate (None: nothing accepted, the model is kept) and checkpoint it."""
        if weights is not None:
            self.weights = [np.asarray(w) for w in weights]
        self.record.save_checkpoint(self.row["round"], self.weights)
        self.work["fit"] = max((m.get("fit_seconds", 0.0) for _, m in metrics), default=0.0)
        self.row.update(
            train_loss=weighted_average(metrics).get("train_loss"),
            fit_clients=len(metrics) if weights is not None else 0,
            rejected=rejected,
        )

    def screen_evaluation(self, who: str, loss: float, num_examples: int, metrics: dict) -> bool:
        """Whether a client's evaluation may be averaged in; logs it when refused."""
        problem = evaluation_problem(loss, num_examples, metrics)
        if problem:
            log.warning("Rejected evaluation from client %s: %s", who, problem)
        return problem is None

    def evaluated(self, results: list[tuple[int, float, dict]]) -> tuple[float | None, dict]:
        """Average the accepted (num_examples, loss, metrics) evaluations into the round's row."""
        total = sum(n for n, _, _ in results)
        loss = sum(n * lo for n, lo, _ in results) / total if total else None
        metrics = weighted_average([(n, m) for n, _, m in results])
        self.work["evaluate"] = max((m.get("eval_seconds", 0.0) for _, _, m in results), default=0.0)
        self.row.update(distributed_loss=loss, distributed_accuracy=metrics.get("accuracy"))
        return loss, metrics

    def central(self) -> tuple[float, float] | None:
        """Test the current global model on the full test set (None when central evaluation is off)."""
        if self.evaluate_central is None:
            return None
        start = time.perf_counter()
        loss, accuracy = self.evaluate_central(self.weights)
        self.work["central"] = time.perf_counter() - start  # our own work, not Flower's overhead
        self.row.update(centralized_loss=loss, centralized_accuracy=accuracy)
        return loss, accuracy

    def end(self) -> None:
        """Write the round's row and the plot (every round: a stopped run has one too)."""
        seconds = time.perf_counter() - self.started
        self.row.update(seconds=seconds, flower_overhead_seconds=seconds - sum(self.work.values()))
        self.record.append(self.row)
        self.done = self.row["round"]
        self.on_round(self.row)
        self.record.plot()


def open_run(parser: flags.Parser, args: argparse.Namespace) -> Rounds:
    """A run's rounds, new or resumed, with its settings in config.json; bad settings end here (exit 2)."""
    problem = strategy_problem(args)
    if problem:
        parser.error(problem)
    try:
        rounds = Rounds(args, RunRecord(Path(args.run_dir)))
    except cifar.DataError as e:
        flags.die(f"{e} (or run the server with --no-central-eval)", parser.prog)
    if rounds.done and args.strategy == "fedadam":
        log.warning("fedadam's server-side moments restart on resume (they are not checkpointed)")
    if rounds.rounds_left > 0:
        rounds.record.create(vars(args))
    return rounds


# ---------------------------------------------------------------- a client's side


def add_share_args(parser: flags.Parser, choices: tuple[str, ...] = cifar.PARTITIONERS) -> None:
    """How the training set is shared out between clients, and what a client evaluates on."""
    parser.add_argument(
        "--partitioner",
        choices=choices,
        default="iid",
        help="iid: equal random shares; dirichlet: label skew drawn from Dir(alpha)"
        + ("; none: every client gets all of it (the tutorial)" if "none" in choices else ""),
    )
    parser.add_argument(
        "--alpha", type=flags.positive_float, default=0.5, help="Dirichlet concentration: smaller is more skewed"
    )
    parser.add_argument(
        "--holdout",
        type=flags.proportion,
        default=HOLDOUT_FRACTION,
        help="share of a client's partition kept back for its evaluation; 0: train on all of it and evaluate "
        "on the test set",
    )


def add_partition_args(parser: flags.Parser) -> None:
    """Flags that give a client its own share of the training data."""
    parser.add_argument(
        "--partition-id", type=flags.non_negative_int, default=None, help="this client's partition, 0..num-partitions-1"
    )
    parser.add_argument(
        "--num-partitions",
        type=flags.positive_int,
        default=None,
        help="split the training set into this many shares (default: every client gets all of it, as in the tutorial)",
    )
    add_share_args(parser)


def client_parser(description: str) -> flags.Parser:
    """A client's flags: data, training and partition (client.py's, and the App's run config's)."""
    parser = flags.Parser(description=description)
    cifar.add_data_args(parser)
    cifar.add_train_args(parser, epochs=1)
    add_partition_args(parser)
    return parser


def check_partition_args(parser: flags.Parser, args: argparse.Namespace) -> None:
    """Both partition flags or neither, and the id within range."""
    if (args.partition_id is None) != (args.num_partitions is None):
        parser.error("--partition-id and --num-partitions go together")
    if args.num_partitions is not None and args.partition_id >= args.num_partitions:
        parser.error(f"--partition-id {args.partition_id} is not in 0..{args.num_partitions - 1}")


class Participant:
    """One client's data share, model and local work; both client faces wrap it.

    Without partition flags the client trains on the full training set and evaluates on the test
    set (the tutorial). With --num-partitions it trains on its own partition less --holdout, and
    evaluates on the held-out part, as a real client with only its own data would.
    """

    def __init__(self, args: argparse.Namespace, data: cifar.Data | None = None) -> None:
        self.args = args
        self.device = cifar.resolve_device(args.device)
        self.cores = cifar.CoreShare(args.threads)  # --threads, or this machine's cores among its live clients
        data = data or cifar.load_arrays(args.data_root, args.cache_dir)
        train_idx = test_idx = None
        test_from_train = False
        if args.num_partitions:
            if args.num_partitions > len(data.train_y):
                raise cifar.DataError(
                    f"--num-partitions {args.num_partitions} is more than the {len(data.train_y)} training images: "
                    "use fewer partitions"
                )
            share = cifar.partition_indices(
                data.train_y, args.num_partitions, args.partition_id, args.partitioner, args.alpha, args.seed
            )
            if len(share) < 2:
                raise cifar.DataError(
                    f"partition {args.partition_id} of {args.num_partitions} holds {len(share)} of "
                    f"{len(data.train_y)} training images: too few to train on; use fewer partitions"
                )
            if args.holdout > 0:
                train_idx, test_idx = cifar.split_holdout(share, args.holdout, args.seed + args.partition_id)
                test_from_train = True
            else:
                train_idx = share
        # Each client shuffles differently, but reproducibly from the one --seed
        shuffle_seed = args.seed + (args.partition_id or 0)
        subset = (train_idx, test_idx, test_from_train)
        options = {"augment": args.augment, "mean_std": args.normalize}
        if args.pipeline == "tutorial":
            self.trainloader, self.testloader = cifar.tutorial_loaders(
                data, args.batch_size, shuffle_seed, *subset, **options
            )
        else:
            self.trainloader, self.testloader = cifar.make_loaders(
                data, args.batch_size, self.device, shuffle_seed, *subset, **options
            )
        self.net = cifar.make_net(args.seed, self.device)
        parted = bool(args.num_partitions)
        self.identity = {
            "partition_id": args.partition_id if parted else -1,
            "num_partitions": args.num_partitions or 0,
            "partition_scheme": partition_scheme(args.partitioner, args.num_partitions, args.alpha, args.seed)
            if parted
            else 0,
        }

    @property
    def num_train(self) -> int:
        """Training examples this client holds."""
        return len(self.trainloader.dataset)

    @property
    def num_test(self) -> int:
        """Evaluation examples this client holds."""
        return len(self.testloader.dataset)

    def fit(self, weights: list[np.ndarray], proximal_mu: float = 0.0) -> tuple[list[np.ndarray], int, dict]:
        """Train from the global weights; return (new weights, examples, metrics)."""
        start = time.perf_counter()
        self.cores.apply()  # the clients running now share the cores
        cifar.set_weights(self.net, weights)
        a = self.args
        loss = cifar.train(
            self.net,
            self.trainloader,
            a.epochs,
            self.device,
            a.lr,
            a.momentum,
            a.weight_decay,
            proximal_mu=proximal_mu,
            cuda_graph=getattr(a, "cuda_graph", True),
        )
        seconds = time.perf_counter() - start
        prox = f", proximal mu {proximal_mu:g}" if proximal_mu else ""
        print(
            f"fit: {a.epochs} epoch(s) on {self.num_train} examples{prox}, loss {loss:.4f}, {seconds:.1f} s", flush=True
        )
        metrics = {"train_loss": loss, "fit_seconds": seconds, **self.identity}
        return cifar.get_weights(self.net), self.num_train, metrics

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, int, dict]:
        """Test the global weights on this client's evaluation data; return (loss, examples, metrics)."""
        start = time.perf_counter()
        cifar.set_weights(self.net, weights)
        loss, accuracy = cifar.test(self.net, self.testloader, self.device)
        seconds = time.perf_counter() - start
        print(f"evaluate: loss {loss:.4f}, accuracy {accuracy:.4f} on {self.num_test} examples", flush=True)
        return loss, self.num_test, {"accuracy": accuracy, "eval_seconds": seconds}
