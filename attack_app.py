"""The attack suite as a Flower ClientApp: attackers among client_app.py's honest nodes, for `flwr run`.

A node attacks when its node config says `attack="..."` (a SuperNode of the Deployment Engine), or when
the run config has `attack` and `attackers = N` and the node holds one of the last N partitions (the
Simulation Engine, in a copy of this App whose pyproject.toml names `attack_app:app` and these keys).
The parameters are attacks.py's flags, named attack-boost, attack-epsilon, attack-z, attack-target-class,
attack-poison-fraction, attack-estimates, attack-deviation; and collude-dir, colluders.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import attacks
import client_app
from federation import config

PARAMETERS = ("boost", "epsilon", "z", "target-class", "poison-fraction", "estimates", "deviation")
RENAMES = {**client_app.RENAMES, **{f"attack-{k}": k for k in PARAMETERS}}
ATTACK_KEYS = ("attack", *(f"attack-{k}" for k in PARAMETERS), "collude-dir", "colluders")

app = ClientApp()


def attack_config(context: Context) -> dict | None:
    """This node's attack settings, or None for an honest node."""
    node, run = context.node_config, context.run_config
    if "attack" in node:
        return {k: node[k] for k in ATTACK_KEYS if k in node}
    attackers = int(run.get("attackers", 0))
    partition, partitions = int(node.get("partition-id", -1)), int(node.get("num-partitions", 0))
    if run.get("attack", "none") != "none" and partitions - attackers <= partition < partitions:
        return {k: run[k] for k in ATTACK_KEYS if k in run}
    return None


def attacker(context: Context, settings: dict) -> attacks.Attacker:
    """The node's client, poisoning."""
    parser = config.client_parser("attack_app's attacker")
    attacks.add_attack_args(parser)
    node = {k: v for k, v in context.node_config.items() if k in ("partition-id", "num-partitions")}
    # The server's defence settings come from the same run config: the attacker knows them
    args = config.args_from_config(parser, {**context.run_config, **node, **settings}, RENAMES)
    attacks.check_attack_args(parser, args)
    return attacks.Attacker(client_app.participant(context), args)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Honest nodes train as client_app.py's; attackers send their poisoned update."""
    settings = attack_config(context)
    if settings is None:
        return client_app.train(msg, context)
    me = attacker(context, settings)
    weights, num_examples, metrics = me.fit(client_app.received(msg)[0])
    content = RecordDict(
        {
            "arrays": ArrayRecord(me.layout.state_dict(weights)),
            "metrics": MetricRecord({**metrics, "num-examples": num_examples}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Everyone evaluates honestly."""
    return client_app.evaluate(msg, context)
