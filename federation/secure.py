"""SecAgg+ in the App, Flower's own protocol: the server learns only the sum of the sampled clients' updates.

flwr 1.42 offers SecAgg+ for its legacy Strategy API alone (`SecAggPlusWorkflow` with `secaggplus_mod`, as
Flower's fl-dp-sa example uses it), so a SecAgg+ run goes through federation/legacy.py's strategies, and its
messages hold Flower's legacy FitIns/FitRes records; this module speaks them for both sides.
"""

import argparse

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

import flags
from federation.legacy import Screened, flower_strategy
from federation.rounds import Rounds

NEEDS_EACH_UPDATE = ("fedmedian", "fedtrimmedavg", "krum", "bulyan")  # rules that look at single updates


def add_args(parser: flags.Parser) -> None:
    """The App's SecAgg+ settings (server.py's gRPC server has no workflows, so no SecAgg+)."""
    parser.add_argument(
        "--secagg",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SecAgg+: the server learns only the sum of each round's updates (needs screen none; "
        "central DP only with client-clipping)",
    )
    parser.add_argument(
        "--secagg-shares",
        type=flags.positive_float,
        default=1.0,
        help="each client's neighbours, which it agrees masks and shares its keys with: a fraction of the round's "
        "clients (1: all, SecAgg's quadratic cost), or an odd count of at least 3 (SecAgg+: for 100 clients and more)",
    )
    parser.add_argument(
        "--secagg-threshold",
        type=flags.fraction,
        default=0.6,
        help="the fraction of those shares that rebuilds a key (at least 2): clients may drop out of a round "
        "while that many of every client's neighbours stay, and the server with fewer learns no update",
    )
    parser.add_argument(
        "--secagg-max-weight",
        type=flags.positive_int,
        default=50000,
        help="the most examples a client may weigh its update by (a client with more fails its round); "
        "the smaller, the finer a client's weighted update is quantised",
    )
    parser.add_argument(
        "--secagg-timeout",
        type=flags.non_negative_float,
        default=0.0,
        help="seconds each SecAgg+ stage waits for its clients (0: until the SuperLink finds a silent "
        "SuperNode gone, about a minute)",
    )


def problem(args: argparse.Namespace) -> str | None:
    """Why these settings cannot run under SecAgg+, in the run config's words, or None."""
    if not args.secagg:
        return None
    if args.screen != "none":
        return (f'secagg=true: the server sees only the sum of the updates, and screen="{args.screen}" needs each '
                'one: set screen="none"')  # fmt: skip
    if args.strategy in NEEDS_EACH_UPDATE:
        return (f'secagg=true: strategy="{args.strategy}" needs each update, and the server sees only their sum: '
                'use fedavg, fedprox or fedadam')  # fmt: skip
    if args.dp == "server-clipping":
        return 'secagg=true: the server cannot clip updates it never sees: use dp="client-clipping"'
    if args.min_clients < 2:
        return "secagg=true: a sum of one update is that update: set min-clients to 2 or more"
    k = args.secagg_shares
    if k > 1 and (k != int(k) or k < 3 or k % 2 == 0):
        return f"secagg-shares {k:g}: a fraction up to 1, or an odd count of neighbours of at least 3"
    if k > args.min_clients:
        return (
            f"secagg-shares {k:g} neighbours is more than a round's min-clients {args.min_clients}: raise min-clients"
        )
    return None


def neighbours(args: argparse.Namespace) -> int | float:
    """secagg-shares as Flower's workflow takes it: a float is a fraction of the round's clients, an int a count."""
    return int(args.secagg_shares) if args.secagg_shares > 1 else args.secagg_shares


def run(grid, context: Context, rounds: Rounds) -> str | None:
    """The rounds left, each one's updates summed under SecAgg+ (the strategy sees only the sum); why the run
    stopped early (its privacy budget), or None."""
    args = rounds.args
    strategy = Screened(flower_strategy(args, ndarrays_to_parameters(rounds.weights)), rounds, summed=True)
    secagg = SecAggPlusWorkflow(
        num_shares=neighbours(args),
        reconstruction_threshold=args.secagg_threshold,
        max_weight=1 if args.dp != "none" else args.secagg_max_weight,  # central DP's clients all weigh 1
        timeout=args.secagg_timeout or None,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds.rounds_left), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
    return strategy.exhausted


# ---------------------------------------------------------------- a client's side


def is_secagg(msg: Message) -> bool:
    """Whether the message is a stage of SecAgg+."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod on SecAgg+'s messages (it calls the train handler at the masking stage)."""
    return secaggplus_mod(msg, context, call_next) if is_secagg(msg) else call_next(msg, context)


def is_legacy(msg: Message) -> bool:
    """Whether the message holds Flower's legacy FitIns or EvaluateIns (a SecAgg+ run's)."""
    return any(k in msg.content.array_records for k in ("fitins.parameters", "evaluateins.parameters"))


def received(msg: Message) -> tuple[list[np.ndarray], dict]:
    """The legacy message's global model and its config, the keys spelled as the Message API's ("proximal-mu")."""
    ins = (compat.recorddict_to_fitins if "fitins.parameters" in msg.content.array_records
           else compat.recorddict_to_evaluateins)(msg.content, keep_input=True)  # fmt: skip
    return parameters_to_ndarrays(ins.parameters), {k.replace("_", "-"): v for k, v in ins.config.items()}


def fit_reply(msg: Message, context: Context, weights: list, num_examples: int, metrics: dict, settings: dict):
    """The FitRes that secaggplus_mod masks: under central DP the update clipped here and weighed 1 (the mean
    of m updates DP's noise is scaled for); otherwise weighed by its examples, at most secagg-max-weight."""
    if "dp" in settings:
        num_examples = 1
    clip = settings.get(KEY_CLIPPING_NORM.replace("_", "-"))
    if clip is not None:
        compute_clip_model_update(weights, received(msg)[0], float(clip))
    state = context.state.config_records.get(RECORD_KEY_STATE, {})
    limit = state.get("max_weight", num_examples)
    if num_examples > limit:  # SecAgg+'s quantisation would overflow: the sum would be wrong, silently
        raise ValueError(f"this client weighs its update by {num_examples} examples, more than secagg-max-weight "
                         f"{limit:g}: raise secagg-max-weight")  # fmt: skip
    # Each value times its weight is clipped to SecAgg+'s range before quantising: one beyond it, silently
    reach, span = max(float(np.abs(w).max()) for w in weights if w.size), state.get("clipping_range", 8.0)
    if reach * num_examples / limit > span:
        raise ValueError(f"this client's model holds a value of {reach:.4g}, beyond SecAgg+'s range of +-{span:g} "
                         f"at its weight {num_examples}/{limit:g} (a BatchNorm step counter grows with training): "
                         "raise secagg-max-weight")  # fmt: skip
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), num_examples, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def evaluate_reply(msg: Message, loss: float, num_examples: int, metrics: dict) -> Message:
    """The legacy EvaluateRes of a SecAgg+ run's evaluation."""
    res = EvaluateRes(Status(Code.OK, ""), loss, num_examples, metrics)
    return Message(RecordDict(compat.evaluateres_to_recorddict(res)), reply_to=msg)
