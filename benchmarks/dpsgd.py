"""DP-SGD on one client's share, in one process: an epoch's cost by Opacus mode, and accuracy by setting."""

import math
import os
import statistics
import time

import torch

import cifar
from benchmarks.common import load_note
from federation import config, privacy
from federation.participant import Participant
from flags import given
from pipeline import batches, sources

SHARE = ("--num-partitions", "2", "--partition-id", "0", "--holdout", "0")  # half the training set, as a client


def client(args, cache: str, *flags: str) -> Participant:
    """A client of the three terminals' second half-share, built as client.py builds it."""
    parser = config.client_parser("bench")
    argv = ["--data-root", args.data_root, "--cache-dir", cache, "--threads", str(args.threads),
            "--seed", str(args.seed), *SHARE, *flags]  # fmt: skip
    a = parser.parse_args(argv)
    privacy.dp_sgd_training(a, given(parser, argv))
    return Participant(a)


def epoch_seconds(me: Participant) -> float:
    """One epoch of the client's training, DP-SGD or plain, timed."""
    torch.set_num_threads(me.args.threads)
    began = time.perf_counter()
    if me.dpsgd is not None:
        me.dpsgd.train(me.trainloader, 1, me.device)
    else:
        cifar.train(me.net, me.trainloader, 1, me.device, lr=me.args.lr, momentum=me.args.momentum)
    return time.perf_counter() - began


def speed(args, cache: str) -> list[dict]:
    """Seconds per epoch: DP-SGD in each mode and plain SGD, at DP-SGD's batch and the tutorial's 32, alternating."""
    setups = {f"DP-SGD, {m}": ("--dp-sgd", "--dp-sgd-mode", m) for m in args.modes}
    batch = privacy.DP_SGD_TRAINING["batch_size"]
    setups |= {f"plain SGD, batch {batch}": ("--batch-size", str(batch)), "plain SGD, batch 32 (the tutorial)": ()}
    clients = {name: client(args, cache, *flags) for name, flags in setups.items()}
    times = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, me in clients.items():
            times[name].append(epoch_seconds(me))
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)
    return [{"setup": name, "runs": runs, "median": statistics.median(runs)} for name, runs in times.items()]


def tuning(args, cache: str) -> list[dict]:
    """Test accuracy after --epochs epochs of DP-SGD at the noise that spends --epsilon, for each setting."""
    rows = []
    for model in args.models:
        for lr in args.lrs:
            for batch in args.batch_sizes:
                me = client(args, cache, "--dp-sgd", "--model", model, "--lr", str(lr), "--batch-size", str(batch),
                            "--dp-sgd-clip", str(args.clip), "--dp-seed", str(args.seed))  # fmt: skip
                rate = batch / me.num_train
                noise = noise_for(args.epsilon, args.delta, rate, args.epochs * math.ceil(1 / rate))
                me.args.dp_sgd_noise = noise
                torch.set_num_threads(args.threads)
                curve = []
                for _ in range(args.epochs):
                    me.dpsgd.train(me.trainloader, 1, me.device)
                    curve.append(cifar.test(me.net, test_loader(args, cache, me), me.device)[1])
                row = {"model": model, "lr": lr, "batch": batch, "noise": noise, "curve": curve,
                       "epsilon": me.dpsgd.epsilon(args.delta)}  # fmt: skip
                print(row, flush=True)
                rows.append(row)
    return rows


def test_loader(args, cache: str, me: Participant):
    """The full test set, normalised as the client's training images."""
    data = sources.load_arrays(args.data_root, cache)
    return batches.make_loaders(data, 1000, me.device, 0, mean_std=me.args.normalize)[1]


def noise_for(epsilon: float, delta: float, rate: float, steps: int) -> float:
    """Opacus's noise multiplier for `epsilon` after `steps` Poisson batches at `rate`."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps)


def bench_dpsgd(args, cache: str) -> str:
    load_start = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    lines = ["## DP-SGD on one client: an epoch's cost, and accuracy by setting", ""]
    if "speed" in args.parts:
        rows = speed(args, cache)
        base = next(r["median"] for r in rows if r["setup"].endswith("(the tutorial)"))
        same = next(r["median"] for r in rows if r["setup"].startswith("plain SGD, batch ") and "32" not in r["setup"])
        lines += [(f"`python3 bench.py dpsgd --data-root {args.data_root} --parts speed --modes {' '.join(args.modes)} "
                   f"--repeats {args.repeats} --threads {args.threads}`: one epoch over a client's half of the "
                   f"training set (25,000 images), {args.threads} thread(s) as each of two clients on this machine "
                   "gets; DP-SGD at its own defaults ("
                   + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in privacy.DP_SGD_TRAINING.items())
                   + f"). Median of {args.repeats}, the setups alternating."), "",
                  "| setup | s per epoch | runs | x plain at the same batch | x the tutorial's plain epoch |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            runs = ", ".join(f"{v:.2f}" for v in r["runs"])
            lines.append(f"| {r['setup']} | {r['median']:.2f} | {runs} | {r['median'] / same:.2f} "
                         f"| {r['median'] / base:.2f} |")  # fmt: skip
        lines.append("")
    if "tuning" in args.parts:
        rows = tuning(args, cache)
        lines += [(f"`python3 bench.py dpsgd --data-root {args.data_root} --parts tuning --models {' '.join(args.models)} "
                   f"--lrs {' '.join(map(str, args.lrs))} --batch-sizes {' '.join(map(str, args.batch_sizes))} "
                   f"--epochs {args.epochs} --epsilon {args.epsilon} --clip {args.clip} --threads {args.threads}`: DP-SGD on a client's half "
                   f"of the training set, each setting's noise the one that spends epsilon {args.epsilon:g} "
                   f"(delta {args.delta:g}) in {args.epochs} epochs; test accuracy (the full test set) after each "
                   "epoch. Momentum 0.9, seed 0."), "",
                  "| model | lr | batch | noise | epsilon | accuracy by epoch |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            curve = " ".join(f"{a:.3f}" for a in r["curve"])
            lines.append(f"| {r['model']} | {r['lr']:g} | {r['batch']} | {r['noise']:.3f} | {r['epsilon']:.2f} "
                         f"| {curve} |")  # fmt: skip
        lines.append("")
    lines.append(load_note(load_start))
    return "\n".join(lines)
