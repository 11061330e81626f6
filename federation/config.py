"""The federated experiment's configuration: the server's and the clients' flags, and the App's run config."""

import argparse

import flags
from federation import privacy, robust
from federation.robust import SCREENS
from pipeline import options
from pipeline.partitions import PARTITIONERS
from pipeline.sources import CACHE_DIR, DATA_ROOT

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "bulyan")
HOLDOUT_FRACTION = 0.1  # of a partition, kept back for the client's own evaluation
# FedAdam's tau, the same in both faces: Flower's legacy default (its Message-API class defaults to 1e-3)
FEDADAM_TAU = 1e-9


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
        help="krum, bulyan, --screen nnm: how many clients may be malicious (krum needs 2f+3 clients, bulyan 4f+3)",
    )
    parser.add_argument(
        "--server-lr", type=flags.positive_float, default=0.01, help="fedadam: the server's learning rate (eta)"
    )
    parser.add_argument(
        "--screen",
        choices=SCREENS,
        default="consensus",
        help="the poisoning defence before any strategy: consensus: with 3+ updates, reject one pointing away from "
        "their geometric median (cosine under --min-cosine) and clip the others to --clip-factor x the median distance "
        "from it; nnm: the same with nearest-neighbour mixing (each kept update the mean of its "
        "n - f nearest, f = --num-malicious, 1 at least) before the clip; none: plain aggregation (the updates' "
        "form is checked either way)",
    )
    parser.add_argument(
        "--min-cosine",
        type=flags.cosine,
        default=robust.MIN_COSINE,
        help="consensus screen: reject an update whose cosine with the round's geometric median is below this "
        "(honest updates on label-skewed shares can be near -0.05; reversed and IPM attacks sit near -1)",
    )
    parser.add_argument(
        "--clip-factor",
        type=flags.non_negative_float,
        default=robust.CLIP_FACTOR,
        help="consensus screen: clip an update farther from the geometric median than this many times the "
        "round's median distance (1: the farther half of the updates is pulled in, chosen by its worst case "
        "over the README's attack suite); 0: reject only",
    )
    parser.add_argument(
        "--max-update-norm",
        type=flags.non_negative_float,
        default=robust.MAX_UPDATE_NORM,
        help="reject any update that moves the model by more than this many times the global model's own "
        "norm (the trained weights only); 0: off",
    )
    parser.add_argument(
        "--run-dir", type=str, default="", help="where this run's records go (default: runs/<date-time>)"
    )


def strategy_problem(args: argparse.Namespace) -> str | None:
    """Why the chosen strategy (or privacy with it) cannot work with these settings, or None."""
    problem = privacy.central_problem(args)
    if problem:
        return problem
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
    parser.add_argument("--data-root", default=DATA_ROOT, help="the data, for the centralized evaluation (as cifar.py)")
    parser.add_argument(
        "--cache-dir",
        default=CACHE_DIR,
        help="where decoded image folders and clients' partitions are cached; '' to disable",
    )
    options.add_model_args(parser)
    privacy.add_central_args(parser)
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
    "model",
    "image_size",
    "num_classes",
    "strategy",
    "proximal_mu",
    "trim_beta",
    "num_malicious",
    "server_lr",
    "screen",
    "min_cosine",
    "clip_factor",
    "max_update_norm",
    "dp",
    "dp_clipping",
    "dp_noise",
    "dp_clip_norm",
    "dp_delta",
    "dp_max_epsilon",
)


RESUME_MAY_CHANGE = ("dp_max_epsilon",)  # besides --rounds: a stopping rule, not the experiment


def args_from_config(parser: flags.Parser, config: dict, renames: dict[str, str | None]) -> argparse.Namespace:
    """Parse a Flower run config (or node config) with the scripts' own parser: same flags, same checks.

    Keys are the flags without dashes ("batch-size"); `renames` maps config keys to other flags (None: not
    this parser's). A bad value raises flags.ConfigError, worded with the run config's keys.
    """
    parser.config_keys = {flag: key for key, flag in renames.items() if flag}
    known = parser._option_string_actions  # the other face's keys share the config: skip them
    argv = []
    for key, value in config.items():
        flag = renames.get(key, key)
        if flag is None or "--" + flag not in known:
            continue
        if isinstance(value, bool):
            argv.append("--" + flag if value else "--no-" + flag)
        else:
            argv += ["--" + flag, str(value)]
    return parser.parse_args(argv)


def client_args_from_config(parser: flags.Parser, config: dict, renames: dict[str, str | None]) -> argparse.Namespace:
    """A client's flags from a Flower run config; under dp-sgd, a training key left at the tutorial's value takes
    DP-SGD's (a run config holds every key, so "left at its default" is the only "not given" it can tell)."""
    args = args_from_config(parser, config, renames)
    privacy.dp_sgd_training(args, {k for k in privacy.DP_SGD_TRAINING if getattr(args, k) != parser.get_default(k)})
    return args


# ---------------------------------------------------------------- a client's side


def add_share_args(parser: flags.Parser, choices: tuple[str, ...] = PARTITIONERS) -> None:
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


def share_problem(args: argparse.Namespace, given: set[str], partitioned: bool) -> str | None:
    """A share flag given that does nothing with the others (e.g. --alpha without --partitioner dirichlet)."""
    if "alpha" in given and args.partitioner != "dirichlet":
        return f"--alpha applies to --partitioner dirichlet only, not {args.partitioner}"
    if not partitioned:
        for name in ("partitioner", "holdout"):
            if name in given and not (name == "partitioner" and args.partitioner == "none"):
                return f"--{name} applies to partitioned clients only (--partition-id and --num-partitions)"
    return None


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
    """A client's flags: data, model, training and partition (client.py's, and the App's run config's)."""
    parser = flags.Parser(description=description)
    options.add_data_args(parser)
    options.add_train_args(parser, epochs=1)
    add_partition_args(parser)
    privacy.add_dp_sgd_args(parser)
    # The tutorial's clients shuffle at random, each its own way; a seed makes one repeat
    parser.set_defaults(seed=None)
    for action in parser._actions:
        if action.dest == "seed":
            action.help = (
                "seeds this client's shuffle (plus its --partition-id) and the partitioning, which every client "
                "of a federation must share (default: a random shuffle, as in the tutorial; partitions from seed 0)"
            )
    return parser


def check_partition_args(parser: flags.Parser, args: argparse.Namespace, given: set[str] = frozenset()) -> None:
    """Both partition flags or neither, the id within range, no share flag that does nothing."""
    if (args.partition_id is None) != (args.num_partitions is None):
        parser.error("--partition-id and --num-partitions go together")
    if args.num_partitions is not None and args.partition_id >= args.num_partitions:
        parser.error(f"--partition-id {args.partition_id} is not in 0..{args.num_partitions - 1}")
    problem = share_problem(args, given, args.num_partitions is not None)
    if problem:
        parser.error(problem)
    if args.dp_sgd and args.pipeline != "fast":
        parser.error("--dp-sgd draws Poisson batches from --pipeline fast only")
