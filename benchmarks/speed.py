"""Speed and memory: cifar.py against the tutorial's own, the three-terminal flow, a training step's profile."""

import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cifar
from benchmarks.common import (
    ENV,
    HERE,
    fmt_runs,
    free_address,
    load_note,
    measure,
    peak_rss_mib,
    read_rows,
    script,
    with_peak_rss,
)
from pipeline import batches, sources

# The tutorial's own cifar.py reads torchvision's pickled CIFAR-10; this machine's copy is JPEG, so
# bench.py writes the same arrays in torchvision's format, whose checksums then differ: skip them.
# Its peak GPU memory is printed at exit, as cifar.py prints its own.
TUTORIAL_RUNNER = """
import atexit, runpy, sys, torch, torchvision.datasets.cifar as c
c.check_integrity = lambda *a, **k: True
c.CIFAR10._check_integrity = lambda self: True
if torch.cuda.is_available():
    atexit.register(lambda: print(f"Peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"))
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def write_torchvision_copy(data: sources.Data, root: Path) -> Path:
    """The decoded images in torchvision's CIFAR-10 layout (pickled batches of 10,000); returns the script."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = data.train_x.reshape(len(data.train_y), -1).numpy(), data.train_y.tolist()
    for i in range(5):
        part = slice(i * len(y) // 5, (i + 1) * len(y) // 5)
        with (folder / f"data_batch_{i + 1}").open("wb") as f:
            pickle.dump({"data": x[part], "labels": y[part]}, f)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": data.test_x.reshape(len(data.test_y), -1).numpy(), "labels": data.test_y.tolist()}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": data.classes}, f)
    code = (HERE / "reference" / "tutorial_cifar.py").read_text()
    script_path = root / "tutorial_cifar.py"
    script_path.write_text(code.replace('DATA_ROOT = "~/data/cifar-10"', f"DATA_ROOT = {str(root)!r}"))
    return script_path


def centralized(cmd: list[str], env: dict | None = None) -> dict:
    """One centralized run: seconds per epoch, whole process, peak memory, accuracy."""
    r = measure(cmd, env)
    text = "\n".join(line for _, line in r["lines"])
    # An epoch is the time from epoch 1's 100th batch to epoch 2's: the same for any script that prints
    # the tutorial's progress lines, and free of start-up and evaluation
    marks = {line.split("]")[0] + "]": t for t, line in r["lines"] if re.match(r"\[[12], +100\]", line)}
    printed = re.search(r"\(([\d.]+) s/epoch\)", text)
    if len(marks) == 2:
        epoch_s = marks["[2,   100]"] - marks["[1,   100]"]
    else:  # fewer than 100 batches an epoch: cifar.py's own figure, or none
        epoch_s = float(printed.group(1)) if printed else float("nan")
    gpu = re.search(r"Peak GPU memory: (\d+) MiB", text)
    return {
        "epoch_s": epoch_s,
        "wall_s": r["wall_s"],
        "rss_mib": r["rss_mib"],
        "gpu_mib": float(gpu.group(1)) if gpu else float("nan"),
        "accuracy": float(re.search(r"Accuracy:\s+([\d.]+)", text).group(1)),
    }


def bench_pipeline(args, cache: str) -> str:
    """cifar.py's variants against the tutorial's own cifar.py, alternating, on each device."""
    load_start = os.getloadavg()[0]
    data_flags = ("--data-root", args.data_root, "--cache-dir", cache, "--epochs", args.epochs)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tutorial_script = write_torchvision_copy(sources.load_arrays(args.data_root, cache), Path(tmp))
        for device in args.devices:
            variants = {
                "the tutorial's own cifar.py": (
                    [sys.executable, "-c", TUTORIAL_RUNNER, str(tutorial_script)],
                    {**ENV, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else ENV,
                ),
                "`cifar.py --pipeline tutorial`": (
                    script("cifar.py", *data_flags, "--device", device, "--pipeline", "tutorial"),
                    None,
                ),
            }
            if device == "cuda":
                variants["`cifar.py --no-cuda-graph`"] = (
                    script("cifar.py", *data_flags, "--device", device, "--no-cuda-graph"),
                    None,
                )
            variants["`cifar.py`"] = (script("cifar.py", *data_flags, "--device", device), None)
            if args.epochs != 2:  # the tutorial's script trains 2 epochs, always
                variants.pop("the tutorial's own cifar.py")
            for i in range(args.repeats):
                for name, (cmd, env) in variants.items():
                    r = centralized(cmd, env)
                    runs.setdefault((device, name), []).append(r)
                    print(f"centralized {device} {name} #{i + 1}: {r}", flush=True)

    lines = [
        "## Pipeline: `cifar.py` against the tutorial's own `cifar.py`",
        "",
        (
            f"`python3 bench.py pipeline --data-root {args.data_root} --devices {' '.join(args.devices)} "
            f"--repeats {args.repeats}`: medians of {args.repeats} runs, each run's figure in brackets; the "
            "variants alternate. The tutorial's own script (`reference/tutorial_cifar.py`, verbatim) reads the "
            "same decoded images, written in torchvision's pickled format. An epoch is timed from epoch 1's "
            "100th batch to epoch 2's; the whole process from start to exit. Peak RSS is the process's maximum "
            "resident memory (as `/usr/bin/time -v` reports it); peak GPU memory is "
            "`torch.cuda.max_memory_allocated()`."
        ),
        "",
        f"### Centralized, {args.epochs} epochs, batch 32, SGD lr 0.001 momentum 0.9, seed 0",
        "",
        "| device | run | s/epoch | whole process, s | peak RSS, MiB | peak GPU memory, MiB | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for (device, name), rs in runs.items():
        gpu = fmt_runs(rs, "gpu_mib", ".0f") if device == "cuda" else ""
        lines.append(
            f"| {device} | {name} | {fmt_runs(rs, 'epoch_s')} | {fmt_runs(rs, 'wall_s', '.1f')} "
            f"| {fmt_runs(rs, 'rss_mib', '.0f')} | {gpu} | {fmt_runs(rs, 'accuracy', '.4f')} |"
        )
    for device in args.devices:
        fast = runs[(device, "`cifar.py`")]
        for name in ("the tutorial's own cifar.py", "`cifar.py --pipeline tutorial`"):
            if (device, name) not in runs:
                continue
            base = runs[(device, name)]
            epoch = statistics.median(a["epoch_s"] / b["epoch_s"] for a, b in zip(base, fast))
            whole = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(base, fast))
            memory = statistics.median(b["rss_mib"] / a["rss_mib"] for a, b in zip(base, fast))
            lines += ["", (f"{device}: `cifar.py` against {name}: **{epoch:.2f}x** its speed per epoch, "
                          f"**{whole:.2f}x** for the whole process, {memory:.2f}x its peak RSS "
                          "(medians of the ratios within each round of runs).")]  # fmt: skip
    lines += ["", load_note(load_start)]
    return "\n".join(lines)


def federated(data_root: str, cache: str, setup: str, workdir: Path) -> dict:
    """Server + 2 clients, 3 rounds, the tutorial's experiment; wall time from start to all exited."""
    address, run_dir = free_address(), Path(tempfile.mkdtemp(dir=workdir)) / "run"
    data = ("--data-root", data_root, "--cache-dir", cache)
    # The project's clients run as the README shows them, without thread flags: they share the cores themselves.
    # The tutorial's each take torch's default, as its own client.py does
    tutorial = ("--pipeline", "tutorial", "--threads", torch.get_num_threads())
    client_flags = tutorial if setup == "tutorial" else ()
    quiet = {"env": ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    records = [run_dir.parent / f"rss-{i}" for i in range(3)]
    server = script("server.py", "--server-address", address, "--run-dir", run_dir, "--no-central-eval", *data)
    start = time.perf_counter()
    procs = [subprocess.Popen(with_peak_rss(server, records[0]), **quiet)]
    for record in records[1:]:
        cmd = script("client.py", "--server-address", address, *data, *client_flags)
        procs.append(subprocess.Popen(with_peak_rss(cmd, record), **quiet))
    codes = [p.wait(timeout=3600) for p in procs]
    wall = time.perf_counter() - start
    if codes != [0, 0, 0]:
        raise RuntimeError(f"federated {setup} run failed with exit codes {codes}")
    rows = read_rows(run_dir)
    return {
        "wall_s": wall,
        "accuracy": float(rows[-1]["distributed_accuracy"]),
        "round_s": statistics.median(float(r["seconds"]) for r in rows),
        "overhead": 100 * statistics.median(float(r["flower_overhead_seconds"]) / float(r["seconds"]) for r in rows),
        "server_mib": peak_rss_mib(records[0]),
        "client_mib": max(peak_rss_mib(r) for r in records[1:]),
    }


def bench_federated(args, cache: str) -> str:
    load_start = os.getloadavg()[0]
    fed: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for setup in args.setups:
                r = federated(args.data_root, cache, setup, Path(tmp))
                fed.setdefault(setup, []).append(r)
                print(f"federated {setup} #{i + 1}: {r}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"## Federated: server.py + 2 client.py on one machine ({device}), 3 rounds, every client the full set",
        "",
        (
            f"`python3 bench.py federated --data-root {args.data_root} --setups {' '.join(args.setups)} "
            f"--repeats {args.repeats}`. Tutorial setup: `client.py --pipeline tutorial --threads "
            f"{torch.get_num_threads()}` (torch's default, as in the tutorial's own client). Project: the README's "
            "commands as written, `server.py` and `client.py` without thread flags. The server runs "
            "`--no-central-eval` in both, as the tutorial's has none. Wall time from starting the three processes "
            "until all have exited. Flower's overhead is a round's wall time minus its slowest client's fit and "
            "evaluate. Peak RSS per process as `/usr/bin/time -v` reports it (the larger client's)."
        ),
        "",
        (
            "| setup | end to end, s | median round, s | Flower overhead per round "
            "| peak RSS server / client, MiB | final accuracy |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, rs in fed.items():
        lines.append(
            f"| {name} | {fmt_runs(rs, 'wall_s', '.1f')} | {fmt_runs(rs, 'round_s')} "
            f"| {fmt_runs(rs, 'overhead', '.2f')} % | {fmt_runs(rs, 'server_mib', '.0f')} / "
            f"{fmt_runs(rs, 'client_mib', '.0f')} | {fmt_runs(rs, 'accuracy', '.4f')} |"
        )
    if len(fed) == 2:
        ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(fed["tutorial"], fed["project"])]
        lines += ["", (f"End to end the project is **{statistics.median(ratios):.2f}x** as fast "
                      f"(ratios within each pair of runs: {', '.join(f'{x:.2f}' for x in ratios)}).")]  # fmt: skip
    lines += ["", load_note(load_start)]
    return "\n".join(lines)


def step_time(net, batches, steps: int, warmup: int = 20) -> float:
    """Milliseconds per SGD step (batch 32), after a warm-up."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, foreach=True)
    it = iter(batches)

    def step():
        x, y = next(it)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def bench_profile(args, cache: str) -> str:
    """Where a fast-pipeline training step spends its time, and what the alternatives cost."""
    from torch.profiler import profile

    data = sources.load_arrays(args.data_root, cache)
    cpu = torch.device("cpu")
    loader, _ = batches.make_loaders(data, 32, cpu, seed=0)
    rows = []
    for threads in (1, os.cpu_count()):
        torch.set_num_threads(threads)
        net = cifar.make_net(0, cpu)
        rows.append((f"eager, channels-last, {threads} thread(s)", step_time(net, loader, args.steps)))
    net = cifar.make_net(0, cpu).to(memory_format=torch.contiguous_format)
    nchw = ((x.contiguous(), y) for x, y in batches.make_loaders(data, 32, cpu, seed=0)[0])
    rows.append((f"eager, NCHW, {os.cpu_count()} threads", step_time(net, nchw, args.steps)))
    compiled = torch.compile(cifar.make_net(0, cpu))
    first = step_time(compiled, loader, 1, warmup=0)  # includes compiling
    rows.append((f"torch.compile (its first step: {first / 1000:.1f} s)", step_time(compiled, loader, args.steps)))
    net = cifar.make_net(0, cpu)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, foreach=True)
    it = iter(loader)
    with profile() as prof:
        for _ in range(args.steps):
            x, y = next(it)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [(e.key, 100 * e.self_cpu_time_total / total, e.self_cpu_time_total / args.steps) for e in events[:8]]
    lines = [
        "## Profile: what bounds a training step on this CPU",
        "",
        (
            f"`python3 bench.py profile --data-root {args.data_root}`: {args.steps} SGD steps at batch 32 on real "
            "CIFAR-10 batches from the fast pipeline."
        ),
        "",
        "| variant | ms per step |",
        "|---|---|",
        *(f"| {name} | {ms:.2f} |" for name, ms in rows),
        "",
        f"Self time per operator (eager, channels-last, {os.cpu_count()} threads; the profiler adds its own cost):",
        "",
        "| operator | share | µs per step |",
        "|---|---|---|",
        *(f"| `{name}` | {share:.1f}% | {us:.0f} |" for name, share, us in top),
    ]
    return "\n".join(lines)
