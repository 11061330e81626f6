"""What privacy costs: accuracy against epsilon for central DP (Simulation Engine) and DP-SGD (three terminals)."""

import argparse
import math
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import (
    ENV,
    FLWR_BIN,
    HERE,
    flwr_env,
    free_address,
    load_note,
    read_rows,
    script,
    stop_local_superlink,
)
from federation import privacy

FIT_LINE = re.compile(r"fit: (\d+) epoch\(s\) on \d+ examples.*, ([\d.]+) s")


def central_epsilon(args, noise: float) -> float:
    """The epsilon Flower's accountant reports after args.rounds rounds of central DP at this noise."""
    dp = argparse.Namespace(dp="server-clipping", dp_noise=noise, dp_delta=args.delta, dp_max_epsilon=0.0)
    accountant = privacy.Accountant(dp)
    accountant.start(args.clients, max(args.min_sampled, int(args.clients * args.fraction)))
    return accountant.projected(args.rounds)


def calibrate(epsilon_of, target: float) -> float:
    """The smallest noise multiplier (to 0.1 %) whose epsilon is at most `target` (bisection)."""
    low, high = 0.05, 1.0
    while epsilon_of(high) > target:
        low, high = high, high * 2
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon_of(mid) > target else (low, mid)
    return high


def dp_sgd_noise(args, target: float) -> float:
    """Opacus's noise multiplier for a client's `target` epsilon over its rounds x epochs of Poisson batches."""
    from opacus.accountants.utils import get_noise_multiplier

    n = 50_000 // 2 - round(50_000 // 2 * 0.1)  # each client's half, less the 10% it holds out (--holdout)
    rate = dp_sgd_batch(args) / n
    steps = args.rounds * args.epochs * math.ceil(1 / rate)
    return get_noise_multiplier(target_epsilon=target, target_delta=args.delta, sample_rate=rate, steps=steps)


def dp_sgd_batch(args) -> int:
    """DP-SGD's expected batch: --batch-size, or DP-SGD's own default."""
    return args.batch_size or privacy.DP_SGD_TRAINING["batch_size"]


def dp_sgd_flags(args, noise: float) -> tuple:
    """client.py's flags for DP-SGD at `noise`, or for the plain client (noise 0): each at its own defaults
    unless the benchmark sets --batch-size or --dp-sgd-lr, the same epochs either way."""
    if not noise:
        return ("--epochs", args.epochs)
    given = (("--batch-size", args.batch_size) if args.batch_size else ()) + (
        ("--lr", args.dp_sgd_lr) if args.dp_sgd_lr else ()
    )
    return ("--dp-sgd", "--dp-sgd-noise", noise, "--dp-sgd-clip", args.dp_sgd_clip, "--epochs", args.epochs, *given)


def simulate(args, cache: str, dp: dict, work: Path) -> dict:
    """One App run on the Simulation Engine; the final accuracy and epsilon."""
    home, run_dir = Path(tempfile.mkdtemp(dir=work)), work / f"run-{len(os.listdir(work))}"
    settings = {"num-server-rounds": args.rounds, "fraction-fit": args.fraction, "min-clients": args.min_sampled,
                "threads": 1, "lr": args.lr, "local-epochs": args.epochs, "screen": "'none'", "seed": args.seed,
                "data-root": f"'{args.data_root}'", "cache-dir": f"'{cache}'", "run-dir": f"'{run_dir}'", **dp}  # fmt: skip
    config = " ".join(f"{k}={v}" for k, v in settings.items())
    cmd = [str(FLWR_BIN / "flwr"), "run", str(HERE), "--run-config", config, "--stream",
           "--federation-config", f"num-supernodes={args.clients} client-resources-num-cpus=1"]  # fmt: skip
    try:
        with (work / "flwr.log").open("a") as log:
            subprocess.run(cmd, env=flwr_env(home), cwd=HERE, check=True, timeout=7200, stdout=log,
                           stderr=subprocess.STDOUT)  # fmt: skip
    finally:
        stop_local_superlink(home)
    rows = read_rows(run_dir)
    if len(rows) < args.rounds:
        raise RuntimeError(f"the run stopped after {len(rows)} of {args.rounds} rounds: see {work / 'flwr.log'}")
    return {"accuracy": float(rows[-1]["centralized_accuracy"]), "epsilon": rows[-1].get("epsilon") or "inf"}


def three_terminals(args, cache: str, client_flags: tuple, work: Path) -> dict:
    """server.py and two client.py (each half the training set) to the end; accuracy, epsilon, seconds per epoch."""
    address, run_dir = free_address(), Path(tempfile.mkdtemp(dir=work)) / "run"
    common = ("--server-address", address, "--data-root", args.data_root, "--cache-dir", cache, "--model", args.model)
    server = script("server.py", *common, "--rounds", args.rounds, "--run-dir", run_dir)
    procs = [subprocess.Popen(server, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    logs = [run_dir.parent / f"client{i}.log" for i in range(2)]
    try:
        for i, log in enumerate(logs):
            cmd = script("client.py", *common, "--num-partitions", 2, "--partition-id", i, "--seed", args.seed,
                         "--threads", 1, *client_flags)  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=7200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0, 0, 0]:
        raise RuntimeError(f"exit codes {codes} ({client_flags}): see {logs[0]}")
    fits = [m for log in logs for m in FIT_LINE.finditer(log.read_text())]
    rows = read_rows(run_dir)
    return {
        "accuracy": float(rows[-1]["centralized_accuracy"]),
        "epsilon": rows[-1].get("client_epsilon") or "inf",
        "epoch_s": statistics.median(float(m[2]) / int(m[1]) for m in fits),
    }


def bench_privacy(args, cache: str) -> str:
    load_start = os.getloadavg()[0]
    central, local = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "central" in args.faces:
            for target in [*args.epsilons, math.inf]:
                noise = 0.0 if math.isinf(target) else calibrate(lambda s: central_epsilon(args, s), target)
                dp = {"dp": '"server-clipping"', "dp-noise": noise, "dp-clip-norm": args.clip_norm,
                      "dp-delta": args.delta} if noise else {}  # fmt: skip
                r = {"target": target, "noise": noise, **simulate(args, cache, dp, work)}
                print(f"central DP {r}", flush=True)
                central.append(r)
        if "dp-sgd" in args.faces:
            for target in [*args.epsilons, math.inf]:
                noise = 0.0 if math.isinf(target) else dp_sgd_noise(args, target)
                r = {"target": target, "noise": noise, **three_terminals(args, cache, dp_sgd_flags(args, noise), work)}
                print(f"DP-SGD {r}", flush=True)
                local.append(r)
    return report(args, central, local, load_start)


def report(args, central: list[dict], local: list[dict], load_start: float) -> str:
    command = (f"python3 bench.py privacy --data-root {args.data_root} --faces {' '.join(args.faces)} "
               f"--epsilons {' '.join(map(str, args.epsilons))} --rounds {args.rounds} --epochs {args.epochs} "
               f"--lr {args.lr} --clients {args.clients} --fraction {args.fraction} --clip-norm {args.clip_norm} "
               f"--dp-sgd-clip {args.dp_sgd_clip} --model {args.model}"
               + (f" --batch-size {args.batch_size}" if args.batch_size else "")
               + (f" --dp-sgd-lr {args.dp_sgd_lr}" if args.dp_sgd_lr else ""))  # fmt: skip
    sampled = max(args.min_sampled, int(args.clients * args.fraction))
    lines = ["## Privacy: accuracy against epsilon", "", (f"`{command}`, delta {args.delta:g}, seed {args.seed}. "
             "Each noise multiplier is the smallest that keeps the run's final epsilon at or under the target "
             "(the target inf: no DP at all, the non-private run). Accuracy: centralized, the full test set, "
             "after the last round.")]  # fmt: skip
    if central:
        lines += ["", (f"### Central (user-level) DP: the App on the Simulation Engine, {args.clients} clients, "
                  f"{sampled} sampled per round"), "",
                  (f"`--dp server-clipping --dp-clip-norm {args.clip_norm}`, FedAvg without the consensus screen "
                  f"(DP refuses it), IID shares of the 50,000 training images ({50_000 // args.clients} each), "
                  f"{args.rounds} rounds of {args.epochs} local epoch(s) at lr {args.lr}. Epsilon from Flower's RDP "
                  "accountant (sampling without replacement, one client's data replaced)."), "",
                  "| target epsilon | noise multiplier | epsilon spent | accuracy |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['target']:g} | {r['noise']:.3f} | {r['epsilon']} | {r['accuracy']:.4f} |" for r in central]
    if local:
        base = next((r["epoch_s"] for r in local if not r["noise"]), None)
        lr = args.dp_sgd_lr or privacy.DP_SGD_TRAINING["lr"]
        lines += ["", "### Sample-level DP-SGD (Opacus): server.py and two client.py, each half the training set", "",
                  (f"`client.py --model {args.model} --dp-sgd --dp-sgd-clip {args.dp_sgd_clip} --epochs {args.epochs}`"
                  f", Poisson batches of {dp_sgd_batch(args)} expected at lr {lr} (momentum 0.9), {args.rounds} "
                  f"rounds of {args.epochs} local epochs ({args.rounds * args.epochs} in all), FedAvg behind the "
                  "consensus screen. The non-private row (inf) is `client.py` without `--dp-sgd`: the tutorial's "
                  "batches of 32 at lr 0.001, the same epochs. Epsilon: each client's own, from Opacus's RDP "
                  "accountant over all its steps. Seconds per epoch: each client's fit time, median over clients "
                  "and rounds, both clients training at once on this machine, one thread each."), "",
                  "| target epsilon | noise multiplier | epsilon spent | accuracy | s per epoch | x the non-private |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in local:
            ratio = f"{r['epoch_s'] / base:.2f}" if base else ""
            lines.append(f"| {r['target']:g} | {r['noise']:.3f} | {r['epsilon']} | {r['accuracy']:.4f} "
                         f"| {r['epoch_s']:.1f} | {ratio} |")  # fmt: skip
    lines += ["", load_note(load_start)]
    return "\n".join(lines)
