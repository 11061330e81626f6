"""Attack x defence: the attack suite (attacks.py) against each strategy, as real server and client processes."""

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import ENV, free_address, load_note, read_rows, script
from federation import backdoor
from pipeline import sources

# Each row: a server's flags. Flower's robust aggregators run alone (--screen none), to show what they bear
ROWS = {  # short name: (the table's label, server.py's flags)
    "plain": ("plain FedAvg (`--screen none`)", ("--strategy", "fedavg", "--screen", "none")),
    "default": ("**the default**: FedAvg behind the consensus screen (`--clip-factor 1`)", ()),
    "fedmedian": ("fedmedian", ("--strategy", "fedmedian", "--screen", "none")),
    "fedtrimmedavg": (
        "fedtrimmedavg (beta 0.2)",
        ("--strategy", "fedtrimmedavg", "--trim-beta", 0.2, "--screen", "none"),
    ),
    "krum": ("krum (f = 1)", ("--strategy", "krum", "--num-malicious", 1, "--screen", "none")),
    "bulyan": ("bulyan (f = 1)", ("--strategy", "bulyan", "--num-malicious", 1, "--screen", "none")),
    "screened-fedmedian": ("fedmedian behind the consensus screen", ("--strategy", "fedmedian")),
    "clip1": ("the consensus screen at `--clip-factor 1`", ("--clip-factor", 1)),
    "clip2": ("the consensus screen at `--clip-factor 2` (the default before 1)", ("--clip-factor", 2)),
    "clip05": ("the consensus screen at `--clip-factor 0.5`", ("--clip-factor", 0.5)),
    "nnm": ("NNM (f = 1) in the consensus screen (`--screen nnm`)", ("--screen", "nnm", "--num-malicious", 1)),
    "nnm2": ("NNM (f = 2) in the consensus screen", ("--screen", "nnm", "--num-malicious", 2)),
}
# Each attack column: the attacker's flags; "none" is the honest clients alone on the same shares
ATTACKS = {  # short name: (the table's label, attacks.py's flags)
    "none": ("none", ()),
    "reversed": ("reversed (boost 5)", ("--attack", "reversed", "--boost", 5)),
    "ipm": ("ipm (epsilon 0.5)", ("--attack", "ipm", "--epsilon", 0.5)),
    "labelflip": ("labelflip", ("--attack", "labelflip")),
    "noise": ("noise (5 x)", ("--attack", "noise", "--boost", 5)),
    "replacement": ("replacement (at the bound)", ("--attack", "replacement")),
    "alie": ("alie (z 1, 2 colluders)", ("--attack", "alie", "--z", 1, "--colluders", 2)),
    "backdoor": ("backdoor (boost: clients / attackers)", ("--attack", "backdoor")),
    "backdoor-scaled": ("backdoor, constrain-and-scale", ("--attack", "backdoor-scaled")),
    "backdoor-plain": ("backdoor, no boost (data poisoning)", ("--attack", "backdoor", "--boost", 1)),
    "minmax": ("min-max", ("--attack", "minmax")),
    "minsum": ("min-sum", ("--attack", "minsum")),
    "mimic": ("mimic", ("--attack", "mimic")),
}
BACKDOORS = ("backdoor", "backdoor-scaled", "backdoor-plain")
TARGET = 0  # the backdoors' target class (attacks.py's default)


def attackers_of(column: str, attackers: int) -> int:
    """How many attackers a column runs: ALIE's std needs two at least."""
    return max(2, attackers) if column == "alie" else attackers


def attack_flags(column: str, attackers: int, clients: int) -> tuple:
    """The attackers' flags for a column: the pooling attacks collude, a backdoor boosts by clients / attackers."""
    flags = ATTACKS[column][1]
    if column in ("minmax", "minsum", "mimic"):
        flags = (*flags, "--colluders", attackers)
    if column in ("backdoor", "backdoor-scaled"):
        flags = (*flags, "--boost", clients / attackers)
    return flags


def subset(data_root: str, per_class: int, out: Path) -> Path:
    """An image folder of the first `per_class` training images of each class (links) and the whole test set."""
    root = Path(data_root).expanduser()
    if not sources.is_image_folder(root):
        raise SystemExit(f"bench.py robustness: --data-root {root} must be an image folder (train/<class>/)")
    for split in ("train", "test"):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (out / split / cls.name).mkdir(parents=True)
            files = sorted(cls.iterdir())
            for f in files[:per_class] if split == "train" else files:
                (out / split / cls.name / f.name).symlink_to(f.resolve())
    return out


def federate(args, data: Path, cache: str, server_flags: tuple, attack: tuple, attackers: int, shares: int,
             partitioner: str, work: Path) -> dict:  # fmt: skip
    """One run: the honest clients (and `attackers` running `attack`) to the end; returns the final accuracy,
    the backdoor's success rate and the defence's tally. The honest clients hold shares 0.., the attackers the
    rest."""
    attackers = attackers if attack else 0
    address, run_dir = free_address(), Path(tempfile.mkdtemp(dir=work)) / "run"
    common = ("--server-address", address, "--data-root", data, "--cache-dir", cache)
    alpha = ("--alpha", args.alpha) if partitioner == "dirichlet" else ()
    part = ("--num-partitions", shares, "--partitioner", partitioner, *alpha) if partitioner != "none" else ()

    def train(i: int) -> tuple:  # the whole set each (none): a seed of its own; else the seed all share
        seed = args.seed + i if partitioner == "none" else args.seed
        return ("--lr", args.lr, "--epochs", args.epochs, "--threads", 1, "--seed", seed,
                *(("--partition-id", i) if part else ()))  # fmt: skip

    quiet = {"env": ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    logs = []
    server = [*common, "--rounds", args.rounds, "--min-clients", args.honest + attackers, "--run-dir", run_dir]
    procs = [subprocess.Popen(script("server.py", *server, *server_flags), **quiet)]
    try:
        for i in range(args.honest):
            procs.append(subprocess.Popen(script("client.py", *common, *part, *train(i)), **quiet))
        # What a reader of the README knows: the server's screen and its bounds
        told = ("--screen", "--clip-factor", "--max-update-norm")
        knows = tuple(x for i, f in enumerate(server_flags[:-1]) if f in told for x in (f, server_flags[i + 1]))
        for j in range(attackers):
            log = run_dir.parent / f"attacker{j}.log"
            logs.append(log)
            cmd = script("attacks.py", *common, *part, *train(args.honest + j), *attack, *knows,
                         "--collude-dir", run_dir.parent / "collude")  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=3600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes[0] == 2:  # the strategy refused this many clients (krum's 2f+3 with the honest ones alone)
        return {"refused": True}
    if codes[0] != 0:
        raise RuntimeError(f"server exited with {codes[0]} ({server_flags}, {attack})")
    rows = read_rows(run_dir)
    return {
        "accuracy": float(rows[-1]["centralized_accuracy"]),
        "success": backdoor.run_success(run_dir, str(data), cache, TARGET),
        "rejected": statistics.mean(int(r["rejected"] or 0) for r in rows),
        "clipped": statistics.mean(int(r["clipped"] or 0) for r in rows),
    }


def bench_robustness(args, cache: str) -> str:
    load_start = os.getloadavg()[0]
    results: dict[tuple[str, str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.data_root, args.per_class, Path(tmp) / "data")
        for partitioner in args.partitioners:
            for row in args.rows:
                server_flags = ROWS[row][1]
                for column, attack, attackers, shares in planned(args):
                    started = time.perf_counter()
                    r = federate(args, data, cache, server_flags, attack, attackers, shares, partitioner, Path(tmp))
                    results[(partitioner, row, column)] = r
                    print(f"{(partitioner, row, column)}: {r} ({time.perf_counter() - started:.0f} s)", flush=True)
    return report(args, results, load_start)


def planned(args) -> list[tuple[str, tuple, int, int]]:
    """Each column's (name, attackers' flags, attackers, shares): the same shares with and without the attackers
    (honest clients alone: one share each when no attack runs); ALIE's two colluders get a reference of their own."""
    shares = args.honest + args.attackers if args.attacks != ["none"] else args.honest
    runs = []
    for column in args.attacks:
        n = attackers_of(column, args.attackers)
        share = shares if column != "alie" else args.honest + n
        runs.append((column, attack_flags(column, n, args.honest + n), n, share))
    if "alie" in args.attacks and attackers_of("alie", args.attackers) != args.attackers:
        runs.append(("none-alie", (), 0, args.honest + attackers_of("alie", args.attackers)))
    return runs


def report(args, results: dict, load_start: float) -> str:
    alie_shares = args.honest + attackers_of("alie", args.attackers)
    columns = [c for c, *_ in planned(args)]
    labels = {**{k: v[0] for k, v in ATTACKS.items()}, "none-alie": f"none ({alie_shares} shares)"}
    shares = args.honest + (args.attackers if args.attacks != ["none"] else 0)  # as planned() draws them
    alie = f"; *none ({alie_shares} shares)* is ALIE's reference, of {alie_shares}" if "none-alie" in columns else ""
    lines = [
        (
            f"## Robustness: the attack suite against each strategy, {args.honest} honest clients and "
            f"{args.attackers} attacker(s)"
        ),
        "",
        (
            f"`python3 bench.py robustness --data-root {args.data_root} --per-class {args.per_class} "
            f"--rounds {args.rounds} --lr {args.lr} --epochs {args.epochs} --honest {args.honest} "
            f"--attackers {args.attackers} --alpha {args.alpha} --seed {args.seed}{f' --tag {args.tag}' if args.tag else ''} "
            f"--partitioners {' '.join(args.partitioners)} --rows {' '.join(args.rows)} --attacks {' '.join(args.attacks)}`"
            f": {args.honest} honest `client.py` and {args.attackers} attacker(s) (`attacks.py`; 2 colluders at least for ALIE) as real "
            f"processes with `server.py`, each client its own share (*none*: all) of a {args.per_class * 10:,}-image training "
            f"subset (the first {args.per_class} images of each class), {args.rounds} rounds of {args.epochs} "
            f"local epochs at lr {args.lr}, seed {args.seed}. Cells: centralized accuracy on the full 10,000-image "
            f"test set after the last round. *none* is the honest clients alone on the same shares (of {shares}"
            f"{alie}). In brackets: updates the defence rejected / clipped per round, on average (the honest "
            "clients' included). After the slash: the backdoor's success rate, the share of the test images of "
            f"classes other than {TARGET} that the final model puts in class {TARGET} once they carry the trigger "
            "(in the *none* column: the same images, a model no attacker touched)."
        ),
    ]
    for partitioner in args.partitioners:
        lines += ["", f"### {partitioner}{f' (alpha {args.alpha})' if partitioner == 'dirichlet' else ''}", "",
                  "| strategy | " + " | ".join(labels[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]  # fmt: skip
        for row in args.rows:
            cells = []
            for column in columns:
                r = results.get((partitioner, row, column))
                if r and r.get("refused"):
                    cells.append("refused: too few clients")
                    continue
                if not r:
                    cells.append("")
                    continue
                tally = f" [{r['rejected']:.1f}/{r['clipped']:.1f}]" if r["rejected"] or r["clipped"] else ""
                success = f" / {r['success']:.0%}" if column in (*BACKDOORS, "none") else ""
                cells.append(f"{r['accuracy']:.3f}{success}{tally}")
            lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + " |")
    lines += ["", load_note(load_start)]
    return "\n".join(lines)
