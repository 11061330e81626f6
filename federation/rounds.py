"""One run's rounds, the same in both faces: screen the replies, keep the global model, evaluate, record."""

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import cifar
import flags
from federation import model, privacy, robust, screening
from federation.config import EXPERIMENT_KEYS, RESUME_MAY_CHANGE, strategy_problem
from federation.records import CheckpointError, RunRecord, print_round
from pipeline import batches, models, sources

log = logging.getLogger("flwr")  # Flower's logger: our lines land where its own do, in both faces

Update = tuple[str, list[np.ndarray], int, dict]  # (client, arrays, num_examples, metrics)


def central_evaluator(
    data: sources.Data, net: torch.nn.Module, device: torch.device, mean_std: bool = True
) -> Callable[[list[np.ndarray]], tuple[float, float]]:
    """A function testing a global model on the full test set: weights -> (loss, accuracy)."""
    # uint8 on the device, converted a batch at a time exactly as the clients' batches are
    testloader = batches.Batches(data.test_x.to(device), data.test_y.to(device), batches.EVAL_BATCH_SIZE,
                                 mean_std=mean_std)  # fmt: skip
    net = net.to(device, memory_format=batches.memory_format(device))
    lock = threading.Lock()  # Flower may call from more than one thread

    def evaluate(weights: list[np.ndarray]) -> tuple[float, float]:
        with lock:
            models.set_weights(net, weights)
            return cifar.test(net, testloader, device)

    return evaluate


def server_classes(args: argparse.Namespace, data: sources.Data | None) -> int:
    """How many classes the server's model has: the data's, or --num-classes without data."""
    names = data.classes if data is not None else sources.class_names(args.data_root)
    if names is None:
        if args.num_classes:
            return args.num_classes
        raise sources.DataError(
            f"no data at --data-root {args.data_root} to take the number of classes from: pass --num-classes N"
        )
    return sources.checked_classes(names, args.num_classes)


class Rounds:
    """One run's rounds: screens every reply, keeps the global model, checkpoints, metrics and the plot.

    Both servers call it with plain arrays and numbers, in each round:
    begin -> screen_updates -> trained -> screen_evaluation... -> evaluated -> central -> end.
    Round numbers are absolute: a resumed run continues its numbering; round 0 is the initial model.
    """

    def __init__(self, args: argparse.Namespace, record: RunRecord, on_round: Callable[[dict], None] = print_round):
        self.args, self.record, self.on_round, self.num_rounds = args, record, on_round, args.rounds
        self.done = record.last_round()
        data = sources.load_arrays(args.data_root, args.cache_dir, args.image_size) if args.central_eval else None
        cpu = torch.device("cpu")
        net, self.layout = model.build(args.model, server_classes(args, data), args.image_size, args.seed, cpu)
        if args.dp != "none" and not all(self.layout.weights):  # Flower's wrappers clip and noise every array
            raise models.ModelError(
                f"--dp {args.dp} needs a model whose arrays are all trained weights; {args.model} has others "
                "(BatchNorm's running statistics and step counter), which would be released without noise"
            )
        if getattr(args, "secagg", False) and not all(self.layout.weights):
            raise models.ModelError(
                f"secagg=true needs a model whose arrays are all trained weights; {args.model} has others "
                "(BatchNorm's running statistics and step counter), which SecAgg+'s range of +-8 would clip"
            )
        self.template = models.get_weights(net)
        self.weights = record.load_checkpoint(self.done, self.layout) if self.done else self.template
        self.evaluate_central = None
        if data is not None:
            device = torch.device(args.device)
            self.evaluate_central = central_evaluator(data, net, device, args.normalize)
        self.title = f"Federated {data.name if data else 'learning'}: {args.strategy}, {args.model}"
        self.row: dict = {}
        self.work: dict[str, float] = {}
        self.started = 0.0
        self.clients: list[dict] = []  # the clients' training settings, as they report them
        self.client_rows: list[dict] = []  # clients.csv's rows of the round
        config = record.config() if (record.dir / "config.json").is_file() else {}
        self.run_id = config.get("run_id") or uuid.uuid4().hex  # what DP-SGD clients key their spend by
        self.dp_spent = record.client_epsilons()  # partition id -> the DP-SGD epsilon last reported for it
        self.privacy = None
        if args.dp != "none":
            # The latest spend, written before its release: a round released but not recorded (a crash while its
            # model was out for evaluation) still counts
            state = privacy.load_state(record.privacy_spend()) or privacy.load_state(record.privacy_state(self.done))
            self.privacy = privacy.Accountant(args, state)
        record.open_events()

    @property
    def rounds_left(self) -> int:
        """Rounds still to run."""
        return self.num_rounds - self.done

    def start(self, config: dict) -> None:
        """Write config.json; a new run gets its round-0 row, the initial model's centralized metrics."""
        self.record.create(config)
        if not self.record.rows():
            self.begin(0)
            self.central()
            if self.privacy:
                self.row["epsilon"] = 0.0
            self.end()

    def sampled(self, population: int, sample: int) -> None:
        """The round sampled `sample` of `population` clients: central DP's accountant needs both."""
        if self.privacy:
            self.privacy.start(population, sample)

    @property
    def dp_sample(self) -> int:
        """How many updates central DP averages a round (0: no central DP, or not known yet)."""
        return self.privacy.this_round if self.privacy else 0

    def fit_config(self) -> dict[str, str]:
        """What every client is told with its training instructions: the run, its DP-SGD spend on record, and
        central DP when it is on."""
        spent = {"dp_sgd_spent": json.dumps(self.dp_spent)} if self.dp_spent else {}
        return {"run": self.run_id, **spent, **self.eval_config()}

    def eval_config(self) -> dict[str, str]:
        """What every client is told with its evaluation instructions: central DP when it is on (the client
        then withholds its result, which no epsilon covers)."""
        return {"dp": self.args.dp} if self.privacy else {}

    def budget_spent(self) -> str | None:
        """Why a continued run's privacy budget allows no further round, or None."""
        if self.privacy is None or self.privacy.sample == 0 or self.rounds_left <= 0:
            return None
        try:
            self.privacy.check(self.done + 1)
        except privacy.BudgetExhausted as e:
            return str(e)
        return None

    def begin(self, server_round: int) -> None:
        """A round's clock starts once its clients are sampled, not while waiting for them; with a privacy
        budget, BudgetExhausted says the round would pass it (it is not run)."""
        if self.privacy and server_round:
            self.privacy.check(server_round)
        self.started = time.perf_counter()
        self.row, self.work = {"round": server_round, "strategy": self.args.strategy}, {}
        self.client_rows = []

    def reject(self, who: str, why: str) -> None:
        """Log an update refused before screening (a reply that holds no update at all)."""
        log.warning("Rejected update from client %s: %s", who, why)

    def screen_updates(self, updates: list[Update], summed: bool = False) -> list[tuple[int, list[np.ndarray] | None]]:
        """Which of the updates may be aggregated, each with its clipped arrays (None: as sent), in a canonical
        order (arrival order must not change a seeded run's sums); logs each one refused or clipped. `summed`:
        under SecAgg+ every update is the same sum of them all, each with its own client's metrics."""
        sound = []
        for i, (who, arrays, num_examples, metrics) in enumerate(updates):
            form = screening.update_problem(arrays, self.template, num_examples) or screening.metrics_problem(metrics)
            blown = None if form else screening.divergence(metrics)  # a client's own loss says it blew up
            problem = form or blown
            epsilon, part = metrics.get("dp_epsilon"), metrics.get("partition_id")
            if isinstance(epsilon, int | float) and isinstance(part, int) and part >= 0:
                self.dp_spent[str(part)] = max(float(epsilon), self.dp_spent.get(str(part), 0.0))
            self.client_rows.append({"round": self.row["round"], "client": who, "num_examples": num_examples,
                                     "verdict": "diverged" if blown else "rejected" if problem else
                                                "summed" if summed else "accepted",
                                     **{k: metrics.get(k) for k in ("partition_id", "train_loss", "dp_epsilon")}})  # fmt: skip
            if problem:
                self.reject(who, problem)
            else:
                sound.append(i)
        a = self.args
        verdicts = robust.screen([updates[i][1] for i in sound], self.weights, self.layout.weights, a.screen,
                                 a.clip_factor, a.max_update_norm, a.min_cosine, a.num_malicious)  # fmt: skip
        accepted, clipped, replaced = [], {}, {}
        for i, v in zip(sound, verdicts):
            if v.why:
                self.reject(updates[i][0], v.why)
                self.client_rows[i]["verdict"] = "rejected"
                continue
            accepted.append(i)
            if v.arrays is not None and v.note is None:  # mixed with its neighbours (--screen nnm)
                replaced[i] = v.arrays
                self.client_rows[i]["verdict"] = "mixed"
            elif v.arrays is not None:
                clipped[i] = v.arrays
                self.client_rows[i]["verdict"] = "clipped"
                # At the default factor half the honest updates are clipped each round: only a far one warns
                (log.warning if v.ratio > robust.FAR else log.info)("Clipped update from client %s: %s",
                                                                     updates[i][0], v.note)  # fmt: skip
            elif self.privacy and privacy.zero_change(updates[i][1], self.weights):
                replaced[i] = privacy.stand_in(self.weights)  # flwr 1.42's DP clipping divides by the norm
        self.row["clipped"] = len(clipped)
        clipped.update(replaced)
        conflict = screening.partition_conflict({updates[i][0]: updates[i][3] for i in accepted})
        if conflict:
            log.warning("Clients disagree on partitioning: %s", conflict)
        prints = {i: screening.fingerprint(updates[i][1]) for i in accepted}
        if len(set(prints.values())) < len(prints) and not summed:
            log.warning("Two clients sent identical updates: they train the same data with the same seed "
                        "(give each client its own --seed, or its own --partition-id)")  # fmt: skip
        return [(i, clipped.get(i)) for i in sorted(accepted, key=lambda i: (prints[i], i))]

    def trained(self, weights: list[np.ndarray] | None, metrics: list[tuple[int, dict]], rejected: int) -> None:
        """Record the round's aggregate (None: nothing accepted, the model is kept) and checkpoint it."""
        if self.privacy:  # on record before the noised model leaves the server; a model kept releases nothing new
            self.row["epsilon"] = self.privacy.step() if weights is not None else self.privacy.epsilon
            self.row["noise_only"] = int(weights is not None and not metrics)
            self.privacy.save(self.record.privacy_spend())
            self.privacy.save(self.record.privacy_state(self.row["round"]))
        if weights is not None:
            self.weights = self.layout.cast(weights)
        self.record.save_checkpoint(self.row["round"], self.weights, self.layout)
        # A DP-SGD client spent its data on its update whatever the server did with it: rejected ones count too
        epsilons = [r["dp_epsilon"] for r in self.client_rows if isinstance(r.get("dp_epsilon"), int | float)]
        if epsilons:
            self.row["client_epsilon"] = max(epsilons)
        self.work["fit"] = max((m.get("fit_seconds", 0.0) for _, m in metrics), default=0.0)
        self.row.update(
            train_loss=screening.weighted_average(metrics).get("train_loss"),
            fit_clients=len(metrics) if weights is not None else 0,
            rejected=rejected,
        )
        self._note_settings([m for _, m in metrics])

    def _note_settings(self, metrics: list[dict]) -> None:
        """Add clients' training settings not seen before to config.json (server.py cannot know them)."""
        fresh = False
        for m in metrics:
            settings = {k: m[k] for k in screening.CLIENT_SETTINGS if k in m}
            if settings and settings not in self.clients:
                self.clients.append(settings)
                fresh = True
        if fresh:
            config = self.record.config()
            config["clients_reported"] = self.clients
            self.record.create(config)

    def screen_evaluation(self, who: str, loss: float, num_examples: int, metrics: dict) -> bool:
        """Whether a client's evaluation may be averaged in; logs it when refused. One withheld under DP is
        not averaged, and is no fault."""
        if metrics.get("withheld") == 1:
            return False
        problem = screening.evaluation_problem(loss, num_examples, metrics)
        if problem:
            log.warning("Rejected evaluation from client %s: %s", who, problem)
        return problem is None

    def evaluated(self, results: list[tuple[int, float, dict]]) -> tuple[float | None, dict]:
        """Average the accepted (num_examples, loss, metrics) evaluations into the round's row."""
        total = sum(n for n, _, _ in results)
        loss = sum(n * lo for n, lo, _ in results) / total if total else None
        metrics = screening.weighted_average([(n, m) for n, _, m in results])
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
        if self.client_rows:
            self.record.append_clients(self.client_rows)
        self.done = self.row["round"]
        self.on_round(self.row)
        self.record.plot(f"{self.title} ({self.record.dir.name})")


def experiment(args: argparse.Namespace) -> dict:
    """The settings that define a run's experiment (a continued run must keep them; rounds may grow)."""
    return {
        k: getattr(args, k) for k in EXPERIMENT_KEYS if k not in ("rounds", *RESUME_MAY_CHANGE) and hasattr(args, k)
    }


def open_run(parser: flags.Parser, args: argparse.Namespace, clients: dict | None = None, hint: str = "") -> Rounds:
    """A run's rounds, new or continued, with its settings in config.json; bad settings end here (exit 2).

    `clients`: the clients' settings when the server knows them (the App's run config), kept in config.json
    and, like the server's, refused when they contradict the run being continued. `hint`: how to turn the
    centralized evaluation off, in the face's own words.
    """
    problem = strategy_problem(args)
    if problem:
        parser.error(problem)
    record = RunRecord(Path(args.run_dir))
    if record.rows() and (record.dir / "config.json").is_file():
        saved = record.config()
        now = {**experiment(args), **(clients or {})}
        before = {**{k: saved.get(k) for k in experiment(args)}, **{k: saved.get("clients", {}).get(k)
                                                                   for k in (clients or {})}}  # fmt: skip
        changed = [k for k in now if k in before and before[k] is not None and before[k] != now[k]]
        if changed:
            k = changed[0]
            parser.error(
                f"--run-dir {args.run_dir} holds a run with --{k.replace('_', '-')} {before[k]}, not {now[k]}: "
                "give another --run-dir for a new run, or the same settings to continue this one"
            )
    try:
        rounds = Rounds(args, record)
    except (sources.DataError, models.ModelError, CheckpointError) as e:
        parser.error(f"{e}{hint if isinstance(e, sources.DataError) and args.central_eval else ''}")
    if rounds.done and args.strategy == "fedadam":
        log.warning("fedadam's server-side moments restart on resume (they are not checkpointed)")
    log.info("Model: %s", rounds.layout.describe())
    if rounds.rounds_left > 0:
        config = {**vars(args), "layout": rounds.layout.record(), "run_id": rounds.run_id}
        if clients is not None:
            config["clients"] = clients
        rounds.start(json.loads(json.dumps(config, default=str)))
    return rounds
