"""A ClientApp whose partition 0 answers each round with a different bad reply (for the tests).

The other nodes are client_app.py's honest handlers. Round r's bad update is UPDATES[r - 1].
"""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import client_app

UPDATES = ("no-num-examples", "nan", "wrong-keys", "huge-examples")
EVALUATIONS = ("no-num-examples", "accuracy5", "nanloss", "negative-loss")

app = ClientApp()


def hostile(context: Context) -> bool:
    return int(context.node_config.get("partition-id", -1)) == 0


@app.train()
def train(msg: Message, context: Context) -> Message:
    if not hostile(context):
        return client_app.train(msg, context)
    kind = UPDATES[(int(msg.content["config"]["server-round"]) - 1) % len(UPDATES)]
    state = msg.content["arrays"].to_torch_state_dict()
    metrics = {"train_loss": 1.0, "fit_seconds": 0.1, "partition_id": 0, "num_partitions": 3, "partition_scheme": 1}
    metrics["num-examples"] = 10**12 if kind == "huge-examples" else 100
    if kind == "no-num-examples":
        del metrics["num-examples"]
    if kind == "nan":
        state["fc3.bias"][:] = np.nan
    if kind == "wrong-keys":
        del state["fc3.bias"]
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if not hostile(context):
        return client_app.evaluate(msg, context)
    kind = EVALUATIONS[(int(msg.content["config"]["server-round"]) - 1) % len(EVALUATIONS)]
    metrics = {"loss": 1.0, "accuracy": 0.5, "eval_seconds": 0.1, "num-examples": 100}
    if kind == "no-num-examples":
        del metrics["num-examples"]
    metrics["accuracy"] = 5.0 if kind == "accuracy5" else 0.5
    metrics["loss"] = {"nanloss": float("nan"), "negative-loss": -1.0}.get(kind, 1.0)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
