"""Flower server: FedAvg over gRPC for the tutorial's CIFAR-10 CNN.

`python3 server.py` runs the tutorial's three rounds with `flwr.server.start_server`; `app` is
the same strategy as a Flower ServerApp for `flwr run`. Every run writes a run directory:
config.json, metrics.csv, plot.png and a checkpoint per round; `--resume DIR` continues one.
"""

import argparse
import csv
import json
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime
from logging import WARNING
from pathlib import Path

import flwr as fl
import numpy as np
import torch
from flwr.app import Context
from flwr.common import log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerAppComponents
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from flwr.serverapp import ServerApp

import cifar
import flags

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
APP_RUNS = "~/flower-cifar/runs"  # where the Flower App's runs go unless run-dir says otherwise
MAX_EXAMPLES = 10_000_000  # a claimed dataset size above this is absurd for this task
# gRPC refuses any message above this before it is decoded; the model is 62,006 float32 (248 KB), so 16 MiB
# leaves room to spare while a client can no longer make the server buffer flwr's default of 2 GiB per message
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


# ---------------------------------------------------------------- validation


def update_problem(arrays: list[np.ndarray], template: list[np.ndarray], num_examples: int) -> str | None:
    """Why a client's model update must not be aggregated, or None when it is sound."""
    if not 0 < num_examples <= MAX_EXAMPLES:
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
    if not 0 < num_examples <= MAX_EXAMPLES:
        return f"claims {num_examples} examples (must be 1..{MAX_EXAMPLES})"
    if not math.isfinite(loss) or loss < 0:
        return f"reports loss {loss}"
    accuracy = metrics.get("accuracy")
    if not isinstance(accuracy, int | float) or not 0 <= accuracy <= 1:
        return f"reports accuracy {accuracy!r} (must be a number in [0, 1])"
    return None


def weighted_average(metrics: list[tuple[int, dict]]) -> dict:
    """Example-weighted mean of every numeric metric the clients sent."""
    total = sum(n for n, _ in metrics)
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, int | float)}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in metrics) / total for k in sorted(keys)} if total else {}


# ---------------------------------------------------------------- run records


class RunRecord:
    """A run directory: config.json, metrics.csv (one row per round), plot.png, checkpoints/."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.metrics = run_dir / "metrics.csv"
        self.checkpoints = run_dir / "checkpoints"

    def create(self, config: dict) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "config.json", json.dumps(config, indent=2).encode())
        if not self.metrics.exists():
            _atomic_write(self.metrics, (",".join(FIELDS) + "\n").encode())

    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def rows(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        with self.metrics.open(newline="") as f:
            return list(csv.DictReader(f))

    def last_round(self) -> int:
        rows = self.rows()
        return int(rows[-1]["round"]) if rows else 0

    def append(self, row: dict) -> None:
        # One line per round, flushed to disk before the next round starts
        with self.metrics.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: _fmt(row.get(k)) for k in FIELDS})
            f.flush()
            os.fsync(f.fileno())

    def checkpoint(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:03d}.pt"

    def save_checkpoint(self, server_round: int, weights: list[np.ndarray]) -> None:
        keys = cifar.Net().state_dict().keys()
        state = OrderedDict((k, torch.from_numpy(np.array(w))) for k, w in zip(keys, weights))
        tmp = self.checkpoint(server_round).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint(server_round))

    def load_checkpoint(self, server_round: int) -> list[np.ndarray]:
        state = torch.load(self.checkpoint(server_round), weights_only=True)
        return [v.numpy() for v in state.values()]

    def plot(self) -> Path:
        """Accuracy and loss against round, from metrics.csv."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- strategy


class CifarFedAvg(FedAvg):
    """FedAvg that validates every result, evaluates centrally and records each round.

    Rounds are numbered from `first_round` on, so a resumed run keeps its numbering.
    """

    def __init__(self, *, weights, record, num_rounds, first_round=1, evaluate_fn=None, on_round=print, **kwargs):
        super().__init__(
            initial_parameters=ndarrays_to_parameters(weights),
            evaluate_fn=evaluate_fn,
            fit_metrics_aggregation_fn=weighted_average,
            evaluate_metrics_aggregation_fn=weighted_average,
            **kwargs,
        )
        self.template = [np.asarray(w) for w in weights]
        self.weights = self.template
        self.record, self.num_rounds, self.offset, self.on_round = record, num_rounds, first_round - 1, on_round
        self.row: dict = {}
        self.started = 0.0
        self.work: dict[str, float] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        # The round's clock starts once its clients are sampled, not while waiting for them
        self.started = time.perf_counter()
        self.row = {"round": server_round + self.offset}
        self.work = {}
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        accepted, rejected = [], []
        for proxy, res in results:
            try:
                problem = update_problem(parameters_to_ndarrays(res.parameters), self.template, res.num_examples)
            except (ValueError, OSError, EOFError) as e:  # bytes that are no arrays at all
                problem = f"sent unreadable parameters ({e})"
            if problem:
                log(WARNING, "Rejected update from client %s: %s", proxy.cid, problem)
                rejected.append((proxy, res))
            else:
                accepted.append((proxy, res))
        parameters, metrics = super().aggregate_fit(server_round, accepted, list(failures) + rejected)
        if parameters is not None:
            self.weights = parameters_to_ndarrays(parameters)
        self.record.save_checkpoint(server_round + self.offset, self.weights)
        self.work["fit"] = max((r.metrics.get("fit_seconds", 0.0) for _, r in accepted), default=0.0)
        self.row.update(
            train_loss=metrics.get("train_loss"),
            fit_clients=len(accepted),
            rejected=len(rejected) + len(failures),
        )
        return parameters, metrics

    def evaluate(self, server_round, parameters):
        if server_round == 0 and self.offset > 0:
            return None  # a resumed run's starting model was evaluated in its own round
        start = time.perf_counter()
        result = super().evaluate(server_round, parameters)
        if result is not None and server_round > 0:
            self.row.update(centralized_loss=result[0], centralized_accuracy=result[1]["accuracy"])
            self.work["central"] = time.perf_counter() - start  # our own work, not Flower's overhead
        return result

    def aggregate_evaluate(self, server_round, results, failures):
        accepted = []
        for proxy, res in results:
            problem = evaluation_problem(res.loss, res.num_examples, res.metrics)
            if problem:
                log(WARNING, "Rejected evaluation from client %s: %s", proxy.cid, problem)
            else:
                accepted.append((proxy, res))
        loss, metrics = super().aggregate_evaluate(server_round, accepted, failures)
        self.work["evaluate"] = max((r.metrics.get("eval_seconds", 0.0) for _, r in accepted), default=0.0)
        seconds = time.perf_counter() - self.started
        self.row.update(
            distributed_loss=loss,
            distributed_accuracy=metrics.get("accuracy"),
            seconds=seconds,
            flower_overhead_seconds=seconds - sum(self.work.values()),
        )
        self.record.append(self.row)
        self.on_round(self.row)
        if server_round + self.offset == self.num_rounds:
            self.record.plot()
        return loss, metrics


class WaitingClientManager(SimpleClientManager):
    """Says how many clients are connected of how many are needed while it waits."""

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                if self._cv.wait_for(
                    lambda: len(self.clients) >= num_clients, timeout=min(5.0, max(0.0, deadline - time.monotonic()))
                ):
                    return True
                connected = len(self.clients)
            if time.monotonic() >= deadline:
                return False
            print(f"Waiting for clients: {connected} of {num_clients} connected", flush=True)


def central_evaluator(data_root: str, cache_dir: str, device: torch.device, mean_std: bool = True):
    """An evaluate_fn that tests the global model on the full test set."""
    data = cifar.load_data(data_root, cache_dir)
    x = cifar.normalize(data.test_x, device, mean_std)  # exactly as the clients see their data
    testloader = cifar.Batches(x, data.test_y.to(device), cifar.EVAL_BATCH_SIZE)
    net = cifar.make_net(0, device)
    lock = threading.Lock()

    def evaluate(server_round, weights, config):
        with lock:
            cifar.set_weights(net, weights)
            loss, accuracy = cifar.test(net, testloader, device)
        return loss, {"accuracy": accuracy}

    return evaluate


def build_strategy(cfg: argparse.Namespace, record: RunRecord, on_round=print) -> tuple[CifarFedAvg, int]:
    """The strategy for a (possibly resumed) run, and how many rounds Flower still has to run."""
    done = record.last_round()
    if done:
        weights = record.load_checkpoint(done)
    else:
        weights = cifar.get_weights(cifar.make_net(cfg.seed, torch.device("cpu")))
    evaluate_fn = None
    if cfg.central_eval:
        device = cifar.resolve_device(cfg.device)
        evaluate_fn = central_evaluator(cfg.data_root, cfg.cache_dir, device, cfg.normalize)
    strategy = CifarFedAvg(
        weights=weights,
        record=record,
        num_rounds=cfg.rounds,
        first_round=done + 1,
        evaluate_fn=evaluate_fn,
        on_round=on_round,
        fraction_fit=cfg.fraction_fit,
        fraction_evaluate=cfg.fraction_fit,
        min_fit_clients=cfg.min_clients,
        min_evaluate_clients=cfg.min_clients,
        min_available_clients=cfg.min_clients,
    )
    return strategy, cfg.rounds - done


def print_round(row: dict) -> None:
    """One line per finished round."""

    def num(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.4f}"

    print(
        f"Round {row['round']}: distributed accuracy {num('distributed_accuracy')} loss {num('distributed_loss')}"
        f" | centralized accuracy {num('centralized_accuracy')} loss {num('centralized_loss')}"
        f" | {row.get('fit_clients', 0)} clients, {row.get('rejected', 0)} rejected, {row['seconds']:.1f} s",
        flush=True,
    )


def summary_table(rows: list[dict]) -> str:
    """The run's rounds as a fixed-width table."""
    cols = [f for f in FIELDS if f not in ("fit_clients", "rejected", "flower_overhead_seconds")]
    lines = ["  ".join(f"{c:>20}" if i else f"{c:>5}" for i, c in enumerate(cols))]
    for r in rows:
        lines.append("  ".join((f"{r[c] or '-':>20}" if i else f"{r[c]:>5}") for i, c in enumerate(cols)))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

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
)


def add_server_args(parser: flags.Parser) -> None:
    """Flags of the federated experiment, shared with run.py."""
    parser.add_argument("--rounds", type=flags.positive_int, default=3, help="rounds of federated learning")
    parser.add_argument("--min-clients", type=flags.positive_int, default=2, help="clients needed to start a round")
    parser.add_argument(
        "--fraction-fit",
        type=flags.fraction,
        default=1.0,
        help="fraction of connected clients sampled each round (at least --min-clients)",
    )
    parser.add_argument(
        "--round-timeout",
        type=flags.positive_float,
        default=None,
        help="seconds a round waits for its clients; late ones count as failures (default: no limit)",
    )
    parser.add_argument(
        "--central-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the global model on the full test set every round (needs the data)",
    )
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where this run's records go (default: runs/<date-time>)"
    )
    parser.add_argument(
        "--resume", type=Path, default=None, metavar="RUN_DIR", help="continue a run from its last completed round"
    )
    parser.add_argument(
        "--certificates",
        nargs=3,
        type=flags.existing_file,
        metavar=("CA", "CERT", "KEY"),
        default=None,
        help="enable TLS with these PEM files (see certs.py)",
    )


def check_resume(parser: flags.Parser, args: argparse.Namespace) -> None:
    """--resume must name a run directory; its experiment settings replace the flags'."""
    if args.resume is None:
        return
    if not (args.resume / "config.json").is_file():
        parser.error(f"--resume {args.resume}: no config.json there, not a run directory")
    saved = RunRecord(args.resume).config()
    for key in EXPERIMENT_KEYS:
        setattr(args, key, saved.get(key, getattr(args, key)))
    args.run_dir = args.resume


def parse_args(argv: list[str] | None = None) -> tuple[flags.Parser, argparse.Namespace]:
    parser = flags.Parser(description="Flower server: FedAvg over gRPC for the tutorial's CIFAR-10 CNN.")
    parser.add_argument(
        "--server-address",
        type=flags.host_port,
        default="127.0.0.1:8080",
        help="HOST:PORT to listen on; 0.0.0.0:8080 for clients on other machines",
    )
    add_server_args(parser)
    cifar.add_data_args(parser)
    parser.add_argument("--device", default="cpu", help="device for the centralized evaluation")
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalize test images as the clients do (their --normalize)",
    )
    parser.add_argument("--seed", type=flags.non_negative_int, default=0, help="seeds the initial global model")
    args = parser.parse_args(argv)
    check_resume(parser, args)
    return parser, args


def main() -> None:
    parser, args = parse_args()
    cifar.check_device(parser, args.device)
    if args.certificates is None and not flags.is_loopback(args.server_address):
        print(
            f"WARNING: listening on {args.server_address} without TLS: updates travel in plain text. Use --certificates CA CERT KEY.",
            file=sys.stderr,
        )

    run_dir = args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    record = RunRecord(run_dir)
    if args.resume is None and record.rows():
        parser.error(f"--run-dir {run_dir} already holds a run: use --resume {run_dir} to continue it")
    config = json.loads(json.dumps(vars(args), default=str))  # the resolved flags, paths as text
    try:
        strategy, rounds_left = build_strategy(args, record, print_round)
    except cifar.DataError as e:
        flags.die(f"{e} (or run the server with --no-central-eval)", parser.prog)
    if rounds_left <= 0:
        print(f"{run_dir} already completed all {args.rounds} rounds")
        print(summary_table(record.rows()))
        return
    record.create(config)
    if args.resume:
        print(f"Resuming {run_dir} after round {record.last_round()}: {rounds_left} round(s) left")
    certificates = tuple(p.read_bytes() for p in args.certificates) if args.certificates else None

    fl.server.start_server(
        server_address=args.server_address,
        config=fl.server.ServerConfig(num_rounds=rounds_left, round_timeout=args.round_timeout),
        strategy=strategy,
        client_manager=WaitingClientManager(),
        certificates=certificates,
        grpc_max_message_length=MAX_MESSAGE_BYTES,
    )
    rows = record.rows()
    print(summary_table(rows))
    print(f"Run directory: {run_dir} (config.json, metrics.csv, plot.png, checkpoints/)")
    if record.last_round() < args.rounds:
        sys.exit(f"{parser.prog}: error: the run stopped after round {record.last_round()} of {args.rounds}")


# ---------------------------------------------------------------- Flower App


def server_fn(context: Context) -> ServerAppComponents:
    """The same strategy and records, configured from the Flower App's run config."""
    rc = context.run_config
    cfg = argparse.Namespace(
        rounds=int(rc["num-server-rounds"]),
        min_clients=int(rc["min-clients"]),
        fraction_fit=float(rc["fraction-fit"]),
        seed=int(rc["seed"]),
        central_eval=bool(rc["central-eval"]),
        normalize=bool(rc["normalize"]),
        data_root=str(Path(str(rc["data-root"])).expanduser()),
        cache_dir=str(rc.get("cache-dir", cifar.CACHE_DIR)),
        device=str(rc.get("server-device", "cpu")),
    )
    # A run-dir that already holds rounds is continued, as server.py --resume does
    run_dir = Path(str(rc["run-dir"]) or f"{APP_RUNS}/{datetime.now():%Y%m%d-%H%M%S}")
    record = RunRecord(run_dir.expanduser().resolve())
    record.create({k: getattr(cfg, k) for k in EXPERIMENT_KEYS})
    strategy, rounds_left = build_strategy(cfg, record, print_round)
    return ServerAppComponents(strategy=strategy, config=fl.server.ServerConfig(num_rounds=rounds_left))


app = ServerApp(server_fn=server_fn)


if __name__ == "__main__":
    main()
