"""Benchmarks on real CIFAR-10; each command rewrites its own section of BENCHMARKS.md.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/data
    python3 bench.py pipeline --data-root /tmp/data/cifar10-jpeg     # cifar.py vs the tutorial's own, time and memory
    python3 bench.py federated --data-root /tmp/data/cifar10-jpeg    # server.py + 2 client.py, as the README runs them
    python3 bench.py load --data-root /tmp/data/cifar10-jpeg         # 50 clients on one server
    python3 bench.py scale --data-root /tmp/data/cifar10-jpeg        # Simulation Engine, 10 to 1,000 clients
    python3 bench.py profile --data-root /tmp/data/cifar10-jpeg      # what bounds a training step
    python3 bench.py niid --data-root /tmp/data/cifar10-jpeg         # NIID-Bench's FedAvg rows
    python3 bench.py robustness --data-root /tmp/data/cifar10-jpeg   # the attack suite against each strategy
    python3 bench.py privacy --data-root /tmp/data/cifar10-jpeg      # accuracy against epsilon, both kinds of DP
    python3 bench.py deployment --data-root /tmp/data/cifar10-jpeg   # a round in the three faces, and its parts
    python3 bench.py dpsgd --data-root /tmp/data/cifar10-jpeg        # DP-SGD's epoch by Opacus mode; its tuning
    python3 bench.py secagg --data-root /tmp/data/cifar10-jpeg       # SecAgg+'s round against plain aggregation

Timings are medians of several runs; where two setups are compared they alternate, so a
drift in the machine's speed hits both alike. The benchmarks themselves live in benchmarks/.
"""

from pathlib import Path

import torch

import flags
from benchmarks import deployment, dpsgd, niid, privacy, robustness, scale, secagg, speed
from benchmarks.common import HERE, write_section
from federation.dpsgd import GRAD_SAMPLE_MODES
from federation.privacy import DP_SGD_TRAINING
from pipeline import partitions, sources


def main() -> None:
    flags.quick_exit()
    parser = flags.Parser(description="Benchmarks on real CIFAR-10; each writes its section of BENCHMARKS.md.")
    parser.add_argument("--out", type=Path, default=HERE / "BENCHMARKS.md", help="the report")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="cifar.py against the tutorial's own cifar.py: time and memory")
    p.add_argument("--repeats", type=flags.positive_int, default=3, help="runs of each measurement (medians)")
    p.add_argument("--epochs", type=flags.positive_int, default=2, help="centralized epochs per run")
    p.add_argument(
        "--devices",
        nargs="+",
        choices=("cpu", "cuda"),
        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
        help="devices to measure on",
    )
    p = sub.add_parser("federated", help="server.py + 2 client.py, the tutorial's setup against the README's")
    p.add_argument("--repeats", type=flags.positive_int, default=3, help="runs of each setup (medians)")
    p.add_argument(
        "--setups", nargs="+", choices=("tutorial", "project"), default=["tutorial", "project"], help="setups to run"
    )
    p = sub.add_parser("load", help="many lightweight clients on one server")
    p.add_argument("--clients", type=flags.positive_int, default=50, help="clients connected at once")
    p.add_argument("--shares", type=flags.positive_int, default=1000, help="the training set in this many shares")
    p.add_argument("--rounds", type=flags.positive_int, default=3, help="rounds")
    p = sub.add_parser("scale", help="the Flower App on the Simulation Engine at growing client counts")
    p.add_argument("--clients", type=flags.positive_int, nargs="+", default=[10, 100, 1000], help="federation sizes")
    p.add_argument("--fraction", type=flags.fraction, default=0.1, help="fraction of clients sampled per round")
    p.add_argument("--rounds", type=flags.positive_int, default=3, help="rounds per run")
    p = sub.add_parser("profile", help="where a training step's time goes, eager and compiled")
    p.add_argument("--steps", type=flags.positive_int, default=300, help="steps per measurement")
    p = sub.add_parser("robustness", help="the attack suite against each strategy (attack x defence)")
    p.add_argument("--per-class", type=flags.positive_int, default=1000, help="training images per class")
    p.add_argument("--honest", type=flags.positive_int, default=4, help="honest clients")
    p.add_argument("--attackers", type=flags.positive_int, default=1, help="attackers beside them (ALIE: 2 at least)")
    p.add_argument("--alpha", type=flags.positive_float, default=0.5, help="dirichlet: the concentration")
    p.add_argument("--tag", default="", help="a suffix for this run's section (rows measured apart from others)")
    p.add_argument("--rounds", type=flags.positive_int, default=10, help="rounds per run")
    p.add_argument("--epochs", type=flags.positive_int, default=1, help="local epochs")
    p.add_argument("--lr", type=flags.positive_float, default=0.02, help="the clients' learning rate")
    p.add_argument("--seed", type=flags.non_negative_int, default=0, help="the clients' seed")
    p.add_argument(
        "--partitioners",
        nargs="+",
        choices=("none", *partitions.PARTITIONERS),
        default=list(partitions.PARTITIONERS),
        help="the clients' shares (none: every client the whole subset)",
    )
    p.add_argument("--rows", nargs="+", choices=list(robustness.ROWS), default=list(robustness.ROWS), help="strategies")
    p.add_argument(
        "--attacks", nargs="+", choices=list(robustness.ATTACKS), default=list(robustness.ATTACKS), help="attacks"
    )
    p = sub.add_parser("privacy", help="accuracy against epsilon: central DP (Simulation) and DP-SGD (three terminals)")
    p.add_argument("--faces", nargs="+", choices=("central", "dp-sgd"), default=["central", "dp-sgd"], help="which DP")
    p.add_argument("--epsilons", type=flags.positive_float, nargs="+", default=[1.0, 4.0, 8.0], help="targets")
    p.add_argument("--delta", type=flags.fraction, default=1e-5, help="delta of every epsilon")
    p.add_argument("--rounds", type=flags.positive_int, default=10, help="rounds per run")
    p.add_argument("--epochs", type=flags.positive_int, default=1, help="local epochs per round")
    p.add_argument("--lr", type=flags.positive_float, default=0.02, help="the clients' learning rate")
    p.add_argument("--seed", type=flags.non_negative_int, default=0, help="the clients' seed")
    p.add_argument("--clients", type=flags.positive_int, default=100, help="central DP: simulated clients")
    p.add_argument("--fraction", type=flags.fraction, default=0.1, help="central DP: fraction sampled per round")
    p.add_argument("--min-sampled", type=flags.positive_int, default=2, help="central DP: clients sampled at least")
    p.add_argument("--clip-norm", type=flags.positive_float, default=0.1, help="central DP: each update's bound C")
    p.add_argument(
        "--batch-size", type=flags.positive_int, default=None, help="DP-SGD: expected batch (default: its own)"
    )
    p.add_argument("--dp-sgd-lr", type=flags.positive_float, default=None, help="DP-SGD: lr (default: its own)")
    p.add_argument("--dp-sgd-clip", type=flags.positive_float, default=1.0, help="DP-SGD: per-example bound")
    p.add_argument("--model", default="cifar:Net", help="DP-SGD: the model, as client.py's --model")
    p = sub.add_parser("niid", help="NIID-Bench's FedAvg rows (IID and Dirichlet 0.5)")
    p.add_argument("--rounds", type=flags.positive_int, default=50, help="rounds (the paper: 50)")
    p.add_argument("--partitioners", nargs="+", choices=partitions.PARTITIONERS, default=list(partitions.PARTITIONERS))
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where the run directories go")
    p = sub.add_parser("deployment", help="a round in the three faces; where a Deployment Engine round goes")
    p.add_argument("--rounds", type=flags.positive_int, default=4, help="rounds per run")
    p.add_argument("--epochs", type=flags.positive_int, default=1, help="local epochs")
    p.add_argument("--repeats", type=flags.positive_int, default=1, help="runs of each face")
    p = sub.add_parser("dpsgd", help="DP-SGD on one client: an epoch by Opacus mode; accuracy by setting")
    p.add_argument("--parts", nargs="+", choices=("speed", "tuning"), default=["speed", "tuning"], help="what to run")
    p.add_argument("--modes", nargs="+", choices=GRAD_SAMPLE_MODES, default=list(GRAD_SAMPLE_MODES), help="speed")
    p.add_argument("--repeats", type=flags.positive_int, default=3, help="speed: epochs of each setup (medians)")
    p.add_argument("--threads", type=flags.positive_int, default=1, help="torch threads (a client's share of 2)")
    p.add_argument("--models", nargs="+", default=["cifar:Net", "cifar:DpNet"], help="tuning: the models")
    p.add_argument("--lrs", type=flags.positive_float, nargs="+", default=[0.25, 0.5, 1.0], help="tuning: lr")
    p.add_argument(
        "--batch-sizes",
        type=flags.positive_int,
        nargs="+",
        default=[DP_SGD_TRAINING["batch_size"]],
        help="tuning: batches",
    )
    p.add_argument("--epochs", type=flags.positive_int, default=15, help="tuning: epochs, the budget's horizon")
    p.add_argument("--epsilon", type=flags.positive_float, default=8.0, help="tuning: epsilon after --epochs")
    p.add_argument("--delta", type=flags.fraction, default=1e-5, help="tuning: delta")
    p.add_argument("--clip", type=flags.positive_float, default=1.0, help="tuning: --dp-sgd-clip")
    p.add_argument("--seed", type=flags.non_negative_int, default=0, help="seed")
    p = sub.add_parser("secagg", help="SecAgg+ against plain aggregation: a round's time, every client sampled")
    p.add_argument("--clients", type=flags.positive_int, nargs="+", default=[10, 100], help="federation sizes")
    p.add_argument("--rounds", type=flags.positive_int, default=4, help="rounds per run")
    p.add_argument("--repeats", type=flags.positive_int, default=1, help="runs of each mode")
    p.add_argument("--shares", type=flags.positive_float, default=1.0, help="secagg-shares: a fraction, or a count")
    p.set_defaults(fraction=1.0)
    for p in sub.choices.values():
        p.add_argument("--data-root", required=True, help="real CIFAR-10 (torchvision directory or image folder)")
        p.add_argument("--cache-dir", default=sources.CACHE_DIR, help="decoded-image cache")
    args = parser.parse_args()

    print(f"Loading {args.data_root} (decoded once into the cache, not timed)", flush=True)
    try:
        sources.load_arrays(args.data_root, args.cache_dir)
    except sources.DataError as e:
        flags.die(str(e), parser.prog)
    run = {
        "pipeline": speed.bench_pipeline,
        "federated": speed.bench_federated,
        "load": scale.bench_load,
        "scale": scale.bench_scale,
        "profile": speed.bench_profile,
        "niid": niid.bench_niid,
        "robustness": robustness.bench_robustness,
        "privacy": privacy.bench_privacy,
        "deployment": deployment.bench_deployment,
        "dpsgd": dpsgd.bench_dpsgd,
        "secagg": secagg.bench_secagg,
    }
    # NIID rows take long: each partitioner's row is its own section, written when it is done
    name = "-".join([args.command, *args.partitioners]) if args.command in ("niid", "robustness") else args.command
    if args.command == "robustness":
        name += f"-h{args.honest}-{args.per_class}"
        if args.attackers != 1:
            name += f"-a{args.attackers}"
        if "dirichlet" in args.partitioners and args.alpha != 0.5:
            name += f"-alpha{args.alpha:g}"
        if args.tag:
            name += f"-{args.tag}"
    if args.command == "dpsgd":
        name = "-".join([args.command, *args.parts]) + (
            "-lr-" + "-".join(map(str, args.lrs)) if "tuning" in args.parts else ""
        )
        if "tuning" in args.parts and args.batch_sizes != [DP_SGD_TRAINING["batch_size"]]:
            name += "-batch-" + "-".join(map(str, args.batch_sizes))
    if args.command == "privacy":
        name = "-".join([args.command, *args.faces]) + ("" if args.model == "cifar:Net" else "-" + args.model)
        if args.batch_size and "dp-sgd" in args.faces:  # not DP-SGD's own batch
            name += f"-batch{args.batch_size}"
        if args.seed:
            name += f"-seed{args.seed}"
        if "central" in args.faces and (args.clients, args.fraction) != (100, 0.1):  # user-level DP at scale
            name += f"-{args.clients}-clients-{args.fraction:g}"
    if args.command == "secagg":
        name += "-" + "-".join(map(str, args.clients)) + f"-shares-{args.shares:g}"
    if args.command == "pipeline" and args.devices != ["cpu"]:  # a GPU machine's rows beside the CPU's
        name = "-".join([args.command, *args.devices])
    if args.command == "federated" and torch.cuda.is_available():
        name += "-cuda"
    write_section(args.out, name, run[args.command](args, args.cache_dir))


if __name__ == "__main__":
    main()
