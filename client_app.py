"""Flower ClientApp on the Message API: client.py's client, for `flwr run`.

Each SuperNode's node config gives its partition (`partition-id`, `num-partitions`); the run config
in pyproject.toml mirrors client.py's flags and is parsed by the same code.
"""

import functools
import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from federation import config, secure
from federation.participant import Participant
from federation.stopwatch import Stopwatch
from pipeline import sources

# Run-config keys named differently from client.py's flags; None: a server's key, not the client's
RENAMES = {"local-epochs": "epochs", "server-device": None}

app = ClientApp()

# A simulation runs many clients in one process: decode the data once per process
_shared_data = functools.cache(sources.load_arrays)


def participant(context: Context, watch: Stopwatch | None = None) -> Participant:
    """This node's client, from the run config and the node's partition."""
    parser = config.client_parser("The Flower App's client: pyproject.toml's run config, as client.py's flags.")
    node = {k: v for k, v in context.node_config.items() if k in ("partition-id", "num-partitions")}
    args = config.client_args_from_config(parser, {**context.run_config, **node}, RENAMES)
    config.check_partition_args(parser, args)
    # A DP-SGD client's accountant lives in the node's context from one round to the next
    history = json.loads(context.state["dp-sgd"]["history"]) if "dp-sgd" in context.state else None
    data = _shared_data(args.data_root, args.cache_dir, args.image_size)
    if watch:
        watch.mark("data")
    me = Participant(args, data, history)
    if watch:
        watch.mark("built")  # partition, batches and model
    return me


def client_side_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod when the server's central DP asks the clients to clip, else nothing (under
    SecAgg+ the train handler clips, in secure.fit_reply)."""
    clips = any(KEY_CLIPPING_NORM in c for c in msg.content.config_records.values()) and not secure.is_legacy(msg)
    return fixedclipping_mod(msg, context, call_next) if clips else call_next(msg, context)


def received(msg: Message) -> tuple[list, dict]:
    """The global model in the message (arrays in its state_dict's order) and the server's settings."""
    if secure.is_legacy(msg):
        return secure.received(msg)
    return msg.content["arrays"].to_numpy_ndarrays(), dict(msg.content.config_records.get("config", {}))


@app.train(mods=[secure.secure_aggregation, client_side_clipping])
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's data; reply with the new model and num-examples."""
    watch = Stopwatch("train")
    me = participant(context, watch)
    if me.batch_note:
        print(me.batch_note, flush=True)
    # FedProx sends its proximal term's weight; every other strategy trains plainly
    weights, settings = received(msg)
    mu = float(settings.get("proximal-mu", 0.0))
    spent = json.loads(str(settings.get("dp-sgd-spent", "{}")))
    weights, num_examples, metrics = me.fit(weights, mu, str(settings.get("run", "")), spent, "dp" in settings)
    watch.mark("worked")
    if me.dpsgd is not None:
        context.state["dp-sgd"] = ConfigRecord({"history": json.dumps(me.dpsgd.history())})
    if secure.is_legacy(msg):  # a SecAgg+ round: Flower's FitRes, for secaggplus_mod to mask
        return secure.fit_reply(msg, context, weights, num_examples, metrics, settings)
    content = RecordDict(
        {
            "arrays": ArrayRecord(me.layout.state_dict(weights)),
            "metrics": MetricRecord({**metrics, "num-examples": num_examples}),
        }
    )
    watch.mark("replied")
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Test the received model on this node's evaluation data."""
    watch = Stopwatch("evaluate")
    me = participant(context, watch)
    weights, settings = received(msg)
    loss, num_examples, metrics = me.evaluate(weights, "dp" in settings)
    watch.mark("worked")
    if secure.is_legacy(msg):
        return secure.evaluate_reply(msg, loss, num_examples, metrics)
    content = RecordDict({"metrics": MetricRecord({"loss": loss, **metrics, "num-examples": num_examples})})
    watch.mark("replied")
    return Message(content=content, reply_to=msg)
