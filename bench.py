"""Benchmark the project's pipeline against the tutorial's, on real CIFAR-10, and write BENCHMARKS.md.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python3 bench.py --data-root /tmp/cifar10-jpeg

Measures, in one run, medians of --repeats runs each (the two pipelines alternate, so drift
in the machine's speed hits both alike):
  1. centralized training (cifar.py, 2 epochs): seconds per epoch, process wall time, accuracy;
  2. federated, server + 2 clients, 3 rounds, end to end: the tutorial's setup (per-sample
     DataLoader, default torch threads in both clients) against the project's (fast pipeline,
     cores split between the clients);
  3. Flower's overhead per round: round wall time minus the slowest client's fit and evaluate;
  4. the same centralized figures on CUDA when a GPU is present.
"""

import csv
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import flwr
import torch
import torchvision

import cifar
import flags

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(HERE / name), *map(str, args)]


def centralized(data_root: str, cache: str, pipeline: str, device: str, epochs: int) -> dict:
    """One cifar.py run: seconds per epoch, process wall seconds, accuracy."""
    start = time.perf_counter()
    out = subprocess.run(
        script("cifar.py", "--data-root", data_root, "--cache-dir", cache, "--pipeline", pipeline,
               "--device", device, "--epochs", epochs),
        env=ENV, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    wall = time.perf_counter() - start
    per_epoch = float(re.search(r"\(([\d.]+) s/epoch\)", out).group(1))
    accuracy = float(re.search(r"Accuracy: ([\d.]+)", out).group(1))
    return {"epoch_s": per_epoch, "wall_s": wall, "accuracy": accuracy}


def federated(data_root: str, cache: str, setup: str, workdir: Path) -> dict:
    """Server + 2 clients, 3 rounds, the tutorial's experiment; wall time from start to all exited."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    data = ("--data-root", data_root, "--cache-dir", cache)
    client_flags = ("--pipeline", "tutorial") if setup == "tutorial" else ("--threads", max(1, os.cpu_count() // 2))
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            script("server.py", "--server-address", address, "--run-dir", run_dir / "run", "--no-central-eval", *data),
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                script("client.py", "--server-address", address, "--connect-timeout", 120, *data, *client_flags),
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    codes = [p.wait(timeout=1800) for p in procs]
    wall = time.perf_counter() - start
    if codes != [0, 0, 0]:
        raise RuntimeError(f"federated {setup} run failed with exit codes {codes}")
    with (run_dir / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    overhead = [float(r["flower_overhead_seconds"]) / float(r["seconds"]) for r in rows]
    return {
        "wall_s": wall,
        "accuracy": float(rows[-1]["distributed_accuracy"]),
        "round_s": statistics.median(float(r["seconds"]) for r in rows),
        "overhead": statistics.median(overhead),
        "overhead_s": statistics.median(float(r["flower_overhead_seconds"]) for r in rows),
    }


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def samples(runs: list[dict], key: str, fmt: str = "{:.2f}") -> str:
    return ", ".join(fmt.format(r[key]) for r in runs)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, flwr {flwr.__version__}"
    )


def main() -> None:
    parser = flags.Parser(description="Benchmark the fast pipeline against the tutorial's and write BENCHMARKS.md.")
    parser.add_argument("--data-root", required=True, help="real CIFAR-10 (torchvision directory or image folder)")
    parser.add_argument("--repeats", type=flags.positive_int, default=3, help="runs of each measurement (medians)")
    parser.add_argument("--epochs", type=flags.positive_int, default=2, help="centralized epochs per run")
    parser.add_argument("--skip-federated", action="store_true", help="only the centralized measurements")
    parser.add_argument("--out", type=Path, default=HERE / "BENCHMARKS.md", help="where the report goes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        print(f"Decoding {args.data_root} once into the cache (not timed)", flush=True)
        try:
            cifar.load_data(args.data_root, cache)
        except cifar.DataError as e:
            flags.die(str(e), parser.prog)

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        cent: dict[tuple[str, str], list[dict]] = {}
        for device in devices:
            for i in range(args.repeats):
                for pipeline in ("tutorial", "fast"):
                    r = centralized(args.data_root, cache, pipeline, device, args.epochs)
                    cent.setdefault((device, pipeline), []).append(r)
                    print(f"centralized {device} {pipeline} #{i + 1}: {r}", flush=True)

        fed: dict[str, list[dict]] = {}
        if not args.skip_federated:
            for i in range(args.repeats):
                for setup in ("tutorial", "project"):
                    r = federated(args.data_root, cache, setup, Path(tmp))
                    fed.setdefault(setup, []).append(r)
                    print(f"federated {setup} #{i + 1}: {r}", flush=True)

    command = f"python3 bench.py --data-root {args.data_root} --repeats {args.repeats}"
    lines = [
        "# Benchmarks",
        "",
        f"Measured {date.today()} on {machine()}.",
        f"Data: `{args.data_root}`. Medians of {args.repeats} runs; every run's figure in brackets.",
        "",
        f"Reproduce every figure below: `{command}`"
        + (" (add `--skip-federated` for the centralized part alone)." if not args.skip_federated else "."),
        "",
        "## Centralized training (`cifar.py`, batch 32, SGD lr 0.001 momentum 0.9, seed 0)",
        "",
        f"| device | pipeline | s/epoch | process wall s ({args.epochs} epochs) | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for (device, pipeline), runs in cent.items():
        lines.append(
            f"| {device} | {pipeline} | {median(runs, 'epoch_s'):.2f} [{samples(runs, 'epoch_s')}] "
            f"| {median(runs, 'wall_s'):.1f} [{samples(runs, 'wall_s', '{:.1f}')}] "
            f"| {median(runs, 'accuracy'):.4f} [{samples(runs, 'accuracy', '{:.4f}')}] |"
        )
    for device in devices:
        t, f = cent[(device, "tutorial")], cent[(device, "fast")]
        ratios = [a["epoch_s"] / b["epoch_s"] for a, b in zip(t, f)]
        lines.append("")
        lines.append(
            f"{device}: the fast pipeline is **{statistics.median(ratios):.2f}x** faster per epoch than the "
            f"tutorial's (per-run ratios {', '.join(f'{x:.2f}' for x in ratios)}); accuracy differs by "
            f"{abs(median(t, 'accuracy') - median(f, 'accuracy')) * 100:.2f} points."
        )
    if not torch.cuda.is_available():
        lines += ["", "No CUDA device on this machine: the GPU rows are missing, not measured."]
    if fed:
        t, p = fed["tutorial"], fed["project"]
        ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(t, p)]
        lines += [
            "",
            "## Federated: server.py + 2 client.py, 3 rounds, each client the full training set (the tutorial)",
            "",
            (
                "Tutorial setup: `client.py --pipeline tutorial` (per-sample DataLoader, torch's default threads in "
                "both clients). Project: `client.py --threads N/2` (fast pipeline). Server with `--no-central-eval` "
                "in both, as the tutorial has none. Wall time from starting the three processes until all exited."
            ),
            "",
            "| setup | end-to-end wall s | median round s | Flower overhead per round | final distributed accuracy |",
            "|---|---|---|---|---|",
        ]
        for name, runs in (("tutorial", t), ("project", p)):
            lines.append(
                f"| {name} | {median(runs, 'wall_s'):.1f} [{samples(runs, 'wall_s', '{:.1f}')}] "
                f"| {median(runs, 'round_s'):.2f} | {median(runs, 'overhead') * 100:.2f}% "
                f"({median(runs, 'overhead_s'):.3f} s) [{samples(runs, 'overhead', '{:.4f}')}] "
                f"| {median(runs, 'accuracy'):.4f} |"
            )
        lines += [
            "",
            (
                f"The project's federated run is **{statistics.median(ratios):.2f}x** faster end to end "
                f"(per-run ratios {', '.join(f'{x:.2f}' for x in ratios)}). Flower's overhead is the round's wall "
                "time minus the slowest client's fit and evaluate (as each client timed them), as a share of it."
            ),
        ]
    text = "\n".join(lines) + "\n"
    if args.out.exists():  # keep sections other tools added (scaling, load) below ours
        old = args.out.read_text()
        marker = "\n<!-- more -->\n"
        if marker in old:
            text += marker + old.split(marker, 1)[1]
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
