"""NIID-Bench's FedAvg rows on CIFAR-10 (Li et al., arXiv 2102.02079), through run.py, without the screen."""

import subprocess
import time
from pathlib import Path

from benchmarks.common import ENV, read_rows, script


def bench_niid(args, cache: str) -> str:
    """FedAvg on CIFAR-10 as NIID-Bench runs it, via run.py; one row per partitioner."""
    rows = []
    for partitioner in args.partitioners:
        run_dir = Path(args.runs) / f"niid-{partitioner}"
        cmd = script(
            "run.py", "--clients", 10, "--partitioner", partitioner, "--alpha", 0.5, "--rounds", args.rounds,
            "--epochs", 10, "--batch-size", 64, "--lr", 0.01, "--momentum", 0.9, "--weight-decay", 1e-5,
            "--augment", "--no-normalize", "--holdout", 0, "--fraction-fit", 1.0, "--screen", "none", "--port", 0,
            "--data-root", args.data_root, "--cache-dir", cache, "--run-dir", run_dir,
        )  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, env=ENV, check=True)
        wall = time.perf_counter() - start
        table = read_rows(run_dir)
        best = max(float(r["centralized_accuracy"]) for r in table)
        rows.append((partitioner, len(table), float(table[-1]["centralized_accuracy"]), best, wall))
        print(f"niid {partitioner}: {rows[-1]}", flush=True)
    paper = {"iid": "71.7", "dirichlet": "63.4"}
    lines = [
        f"## NIID-Bench: FedAvg on CIFAR-10 (Li et al., arXiv 2102.02079): {', '.join(args.partitioners)}",
        "",
        (
            f"`python3 bench.py niid --data-root {args.data_root} --rounds {args.rounds} "
            f"--partitioners {' '.join(args.partitioners)}`, which runs, per row, "
            f"`python3 run.py --clients 10 --partitioner {'|'.join(args.partitioners)} --alpha 0.5 --rounds {args.rounds} "
            "--epochs 10 "
            "--batch-size 64 --lr 0.01 --momentum 0.9 --weight-decay 1e-5 --augment --no-normalize --holdout 0 "
            "--screen none`: 10 clients all sampled each round, the same Net, plain FedAvg as the paper's. Accuracy is the global model's on the full "
            "10,000-image test set (the JPEG copy of CIFAR-10 may cost about a point)."
        ),
        "",
        "| partition | rounds | final test accuracy | best round's | Flower baseline (niid_bench) | wall time |",
        "|---|---|---|---|---|---|",
        *(
            f"| {p}{' (alpha 0.5)' if p == 'dirichlet' else ''} | {n} | {acc * 100:.1f}% | {best * 100:.1f}% "
            f"| {paper[p]}% | {wall / 60:.0f} min |"
            for p, n, acc, best, wall in rows
        ),
    ]
    return "\n".join(lines)
