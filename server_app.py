"""Flower ServerApp on the Message API: the same experiment as server.py, for `flwr run`.

Runs on the Simulation Engine (`flwr run .`) and the Deployment Engine (a SuperLink with SuperNodes).
The run config in pyproject.toml mirrors server.py's flags and is parsed by the same code; the run
directory, checks, strategies and resume are federation/'s, as for server.py.
"""

from collections.abc import Iterable
from datetime import datetime
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flower

import client_app
import flags
from federation import config, privacy, screening, secure
from federation.model import Layout
from federation.privacy import BudgetExhausted
from federation.rounds import Rounds, open_run

APP_RUNS = "~/flower-cifar/runs"  # where the App's runs go unless run-dir says otherwise
# Run-config keys named differently from server.py's flags; None: a client's key, not the server's
RENAMES = {"num-server-rounds": "rounds", "server-device": "device", "device": None}
# The clients' run-config settings that define the experiment (kept in config.json, checked on continuing)
CLIENT_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "augment", "normalize", "partitioner",
               "alpha", "holdout", "pipeline", "seed")  # fmt: skip

app = ServerApp()


def average_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the losses and accuracies in the replies."""
    pairs = [(int(c["metrics"][weight_key]), dict(c["metrics"])) for c in contents]
    return MetricRecord(screening.weighted_average(pairs))


def flower_strategy(args) -> flower.Strategy:
    """The chosen strategy, Flower's own Message-API implementation of it."""
    sampling = {
        "fraction_train": args.fraction_fit,
        "fraction_evaluate": args.fraction_fit,
        "min_train_nodes": args.min_clients,
        "min_evaluate_nodes": args.min_clients,
        "min_available_nodes": args.min_clients,
        "train_metrics_aggr_fn": average_metrics,
        "evaluate_metrics_aggr_fn": average_metrics,
    }
    f = args.num_malicious
    inner = {
        "fedavg": lambda: flower.FedAvg(**sampling),
        "fedprox": lambda: flower.FedProx(**sampling, proximal_mu=args.proximal_mu),
        "fedadam": lambda: flower.FedAdam(**sampling, eta=args.server_lr, tau=config.FEDADAM_TAU),
        "fedmedian": lambda: flower.FedMedian(**sampling),
        "fedtrimmedavg": lambda: flower.FedTrimmedAvg(**sampling, beta=args.trim_beta),
        "krum": lambda: flower.Krum(**sampling, num_malicious_nodes=f),
        "bulyan": lambda: flower.Bulyan(**sampling, num_malicious_nodes=f),
    }[args.strategy]()
    if args.dp == "none":
        return inner
    # Central DP, Flower's wrapper; how many clients it averages is set once they are sampled
    wrapper = {
        "server-clipping": flower.DifferentialPrivacyServerSideFixedClipping,
        "client-clipping": flower.DifferentialPrivacyClientSideFixedClipping,
    }[args.dp]
    return wrapper(inner, args.dp_noise, args.dp_clip_norm, num_sampled_clients=1)


def unpack_update(content: RecordDict, layout: Layout) -> tuple[list, int, dict]:
    """A train reply's (arrays in the model's order, num-examples, metrics); ValueError names what is wrong."""
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise ValueError("must hold exactly one ArrayRecord and one MetricRecord")
    arrays = next(iter(content.array_records.values()))
    if list(arrays.keys()) != list(layout.keys):
        raise ValueError(f"holds arrays {list(arrays.keys())}, the model's are {list(layout.keys)}")
    metrics = dict(next(iter(content.metric_records.values())))
    required = {"num-examples", *screening.required_metrics(metrics)}
    if not required <= set(metrics) <= required | set(screening.OPTIONAL_METRICS):
        raise ValueError(f"reports metrics {sorted(metrics)}, expected {sorted(required)} and the training settings")
    return arrays.to_numpy_ndarrays(), metrics.pop("num-examples"), metrics


class Screened(flower.Strategy):
    """Flower's strategy, fed only screened replies; `Rounds` keeps the records."""

    def __init__(self, inner: flower.Strategy, rounds: Rounds) -> None:
        self.inner, self.rounds, self.offset = inner, rounds, rounds.done

    def summary(self) -> None:
        log(INFO, "\t├──> Flower's %s, every reply screened first", type(self.inner).__name__)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        for key, value in self.rounds.fit_config().items():
            config[key.replace("_", "-")] = value
        messages = list(self.inner.configure_train(server_round + self.offset, arrays, config, grid))
        if self.rounds.privacy:
            self.inner.num_sampled_clients = len(messages)
            self.rounds.sampled(len(list(grid.get_node_ids())), len(messages))
        self.rounds.begin(server_round + self.offset)  # BudgetExhausted ends the run before this round
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        updates, failed = [], 0
        for msg in replies:
            who = msg.metadata.src_node_id
            if msg.has_error():
                log(INFO, "Update from client %s failed: %s", who, msg.error.reason)
                failed += 1
                continue
            try:
                arrays, num_examples, metrics = unpack_update(msg.content, self.rounds.layout)
            except (ValueError, KeyError, TypeError) as e:
                arrays, num_examples, metrics = [], 0, {}
                self.rounds.reject(str(who), f"the reply {e}")
            updates.append((msg, (str(who), arrays, num_examples, metrics)))
        sound = [(msg, u) for msg, u in updates if u[1]]
        accepted = []
        for i, clipped in self.rounds.screen_updates([u for _, u in sound]):
            msg, u = sound[i]
            if clipped is not None:  # the strategy aggregates the clipped update in its place
                (key,) = msg.content.array_records
                msg.content[key] = ArrayRecord(self.rounds.layout.state_dict(clipped))
            accepted.append((msg, u))
        inputs = [m for m, _ in accepted]
        if self.rounds.dp_sample:  # central DP: a mean of exactly m updates with equal weights
            unchanged = self.rounds.layout.state_dict(privacy.stand_in(self.rounds.weights))  # a missing update: zero
            inputs = equal_weights(inputs, self.rounds.dp_sample, unchanged)
        arrays, metrics = (None, None)
        if inputs:
            arrays, metrics = self.inner.aggregate_train(server_round + self.offset, inputs)
        weights = None if arrays is None else [arrays[k].numpy() for k in self.rounds.layout.keys]
        self.rounds.trained(weights, [(u[2], u[3]) for _, u in accepted], len(replies) - len(accepted))
        return ArrayRecord(self.rounds.layout.state_dict(self.rounds.weights)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        for key, value in self.rounds.eval_config().items():
            config[key] = value
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                m = dict(msg.content["metrics"])
                n, loss = m.pop("num-examples"), m.pop("loss")
            except (KeyError, TypeError):
                n, loss, m = 0, float("nan"), {}
            if self.rounds.screen_evaluation(str(msg.metadata.src_node_id), loss, n, m):
                accepted.append((n, loss, m))
        loss, metrics = self.rounds.evaluated(accepted)
        return None if loss is None else MetricRecord({"loss": loss, **metrics})

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn, called after every round: central evaluation, then the round's records."""
        if server_round == 0:
            return None  # the starting model is no round's result
        result = self.rounds.central()
        self.rounds.end()
        return None if result is None else MetricRecord({"loss": result[0], "accuracy": result[1]})


def equal_weights(replies: list[Message], count: int, unchanged: dict) -> list[Message]:
    """`count` replies of weight 1: these, then stand-ins holding the unchanged global model (a zero update)."""
    template = dict(replies[0].content["metrics"]) if replies else {}
    for msg in replies:
        msg.content["metrics"]["num-examples"] = 1
    stand_ins = [
        Message(
            RecordDict({"arrays": ArrayRecord(unchanged), "metrics": MetricRecord({**template, "num-examples": 1})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        for _ in range(count - len(replies))
    ]
    return [*replies, *stand_ins]


def open_app_run(run_config: dict) -> Rounds:
    """The run the run config describes, new or continued; flags.ConfigError says why it cannot run."""
    parser = config.server_parser("The Flower App's server: pyproject.toml's run config, as server.py's flags.")
    secure.add_args(parser)
    args = config.args_from_config(parser, run_config, RENAMES)
    if secure.problem(args):
        parser.error(secure.problem(args))
    client_parser = config.client_parser("The Flower App's clients")
    client_args = config.client_args_from_config(client_parser, run_config, client_app.RENAMES)
    clients = {k: getattr(client_args, k) for k in CLIENT_KEYS}
    # A run-dir that already holds rounds is continued (with the same settings), as server.py --resume does
    args.run_dir = str(Path(args.run_dir or f"{APP_RUNS}/{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve())
    args.data_root = str(Path(args.data_root).expanduser())
    return open_run(parser, args, clients, hint=" (or set central-eval=false)")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or continue) the experiment that the run config describes."""
    try:
        rounds = open_app_run(context.run_config)
    except flags.ConfigError as e:  # the reason in one line; raised on, for Flower to end the run as failed
        log(ERROR, "The run config cannot run: %s", e)
        raise
    args = rounds.args
    if rounds.rounds_left <= 0:
        log(INFO, "%s already completed all %s rounds", args.run_dir, args.rounds)
        return
    spent = rounds.budget_spent()
    if spent:  # a continued run whose budget is spent: said at once, not after waiting for nodes
        rounds.record.close()
        log(INFO, "Stopped after round %s of %s: %s", rounds.done, args.rounds, spent)
        return
    if rounds.done:
        log(INFO, "Resuming %s after round %s: %s round(s) left", args.run_dir, rounds.done, rounds.rounds_left)
    privacy.seed_noise(args, rounds.privacy.rounds if rounds.privacy else 0)
    if args.secagg:  # Flower's SecAgg+ workflow, on its legacy strategies: the server sees only each round's sum
        stopped = secure.run(grid, context, rounds)
    else:
        strategy = Screened(flower_strategy(args), rounds)
        try:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(rounds.layout.state_dict(rounds.weights)),
                num_rounds=rounds.rounds_left,
                evaluate_fn=strategy.end_round,
            )
            stopped = None
        except BudgetExhausted as e:  # done, not failed
            stopped = str(e)
    if stopped:
        log(INFO, "Stopped after round %s of %s: %s", rounds.done, args.rounds, stopped)
    rounds.record.close()
    log(INFO, "Run directory: %s (config.json, metrics.csv, plot.png, checkpoints/)", rounds.record.dir)
