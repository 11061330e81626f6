"""Benchmarks on real CIFAR-10; each command rewrites its own section of BENCHMARKS.md.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python3 bench.py pipeline --data-root /tmp/cifar10-jpeg     # cifar.py vs the tutorial's own, time and memory
    python3 bench.py federated --data-root /tmp/cifar10-jpeg    # server.py + 2 client.py, as the README runs them
    python3 bench.py load --data-root /tmp/cifar10-jpeg         # 50 clients on one server
    python3 bench.py scale --data-root /tmp/cifar10-jpeg        # Simulation Engine, 10 to 1,000 clients
    python3 bench.py profile --data-root /tmp/cifar10-jpeg      # what bounds a training step
    python3 bench.py niid --data-root /tmp/cifar10-jpeg         # NIID-Bench's FedAvg rows

Timings are medians of several runs; where two setups are compared they alternate, so a
drift in the machine's speed hits both alike.
"""

import argparse
import csv
import os
import pickle
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import flwr
import torch
import torchvision

import cifar
import client
import federation
import flags

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
FLWR_BIN = Path(sys.executable).parent


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(HERE / name), *map(str, args)]


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def read_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def fmt_runs(runs: list[dict], key: str, spec: str = ".2f") -> str:
    """'median [run1, run2, ...]' of one measured key."""
    values = [r[key] for r in runs]
    return f"{statistics.median(values):{spec}} [{', '.join(f'{v:{spec}}' for v in values)}]"


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, flwr {flwr.__version__}"
    )


def write_section(out: Path, name: str, body: str) -> None:
    """Replace (or append) this command's section of the report, keeping the others."""
    begin, end = f"<!-- bench {name} -->", f"<!-- /bench {name} -->"
    text = out.read_text() if out.exists() else "# Benchmarks\n\nEvery figure below comes from `bench.py`.\n"
    block = f"{begin}\n{body.strip()}\n\n_Measured {date.today()} on {machine()}._\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.write_text(text)
    print(block)


class MemorySampler:
    """Peak memory in use on the machine above its level at start (from /proc/meminfo)."""

    def __enter__(self):
        self.base = self.peak = self._used()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _used(self) -> int:
        info = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def peak_gib(self) -> float:
        return (self.peak - self.base) / 2**30


# ---------------------------------------------------------------- pipeline

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


def write_torchvision_copy(data: cifar.Data, root: Path) -> Path:
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


# Peak memory as `/usr/bin/time -v` measures it: the child's maximum resident set size from wait4.
# A child forked straight from this (large) process would inherit its high-water mark, so a small
# process in between starts the command and writes the figure (KiB) to the file it is given.
PEAK_RSS_RUNNER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def with_peak_rss(cmd: list, record: Path) -> list[str]:
    """cmd, run so that its peak resident memory (KiB) lands in `record`."""
    return [sys.executable, "-c", PEAK_RSS_RUNNER, str(record), *map(str, cmd)]


def peak_rss_mib(record: Path) -> float:
    return int(record.read_text()) / 1024


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command to its end: wall seconds, peak resident memory (MiB), and its output lines
    with the second each arrived."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "rss"
        start = time.perf_counter()
        proc = subprocess.Popen(
            with_peak_rss(cmd, record), env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
        code = proc.wait()
        wall = time.perf_counter() - start
        if code != 0:
            tail = "\n".join(line for _, line in lines[-20:])
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {code}:\n{tail}")
        return {"wall_s": wall, "rss_mib": peak_rss_mib(record), "lines": lines}


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


def load_note(start: float) -> str:
    """What else ran: the 1-minute load average when the measurements started and when they ended."""
    return (
        f"1-minute load average: {start:.1f} when the runs started, {os.getloadavg()[0]:.1f} when they ended "
        f"({os.cpu_count()} cores; above the core count other work shared the machine and times are inflated, "
        "peak memory is not)."
    )


def bench_pipeline(args, cache: str) -> str:
    """cifar.py's variants against the tutorial's own cifar.py, alternating, on each device."""
    load_start = os.getloadavg()[0]
    data_flags = ("--data-root", args.data_root, "--cache-dir", cache, "--epochs", args.epochs)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tutorial_script = write_torchvision_copy(cifar.load_arrays(args.data_root, cache), Path(tmp))
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


# ---------------------------------------------------------------- load: many clients, one server


def swarm_client(address: str, args: argparse.Namespace, data: cifar.Data, errors: list) -> None:
    try:
        c = client.CifarClient(federation.Participant(args, data))
        flwr.client.start_client(server_address=address, client=c.to_client())
    except Exception as e:  # noqa: BLE001  (reported by the caller, whatever it was)
        errors.append(repr(e))


def bench_load(args, cache: str) -> str:
    """N lightweight clients (threads of one process, a tiny share each) on one server.py."""
    data = cifar.load_arrays(args.data_root, cache)
    torch.set_num_threads(1)
    address = free_address()
    with tempfile.TemporaryDirectory() as tmp, MemorySampler() as mem:
        run_dir = Path(tmp) / "run"
        server = subprocess.Popen(
            script("server.py", "--server-address", address, "--min-clients", args.clients, "--rounds", args.rounds,
                   "--run-dir", run_dir, "--data-root", args.data_root, "--cache-dir", cache),
            env=ENV, stdout=(Path(tmp) / "server.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not client.wait_for_server(address, None, 120, quiet=True):
            raise RuntimeError("server did not start")
        errors: list[str] = []
        threads = []
        for i in range(args.clients):
            ns = argparse.Namespace(
                device="cpu", threads=None, pipeline="fast", seed=0, epochs=1, batch_size=32, lr=0.001,
                momentum=0.9, weight_decay=0.0, augment=False, normalize=True, holdout=0.1,
                partition_id=i, num_partitions=args.shares, partitioner="iid", alpha=0.5,
                data_root=args.data_root, cache_dir=cache,
            )  # fmt: skip
            t = threading.Thread(target=swarm_client, args=(address, ns, data, errors), daemon=True)
            t.start()
            threads.append(t)
        code = server.wait(timeout=1800)
        for t in threads:
            t.join(timeout=60)
        rows = read_rows(run_dir)
    ok = (
        code == 0
        and not errors
        and len(rows) == args.rounds
        and all(int(r["fit_clients"]) == args.clients for r in rows)
    )
    lines = [
        f"## Load: {args.clients} clients on one server",
        "",
        (
            f"`python3 bench.py load --data-root {args.data_root} --clients {args.clients}`: one server.py process; "
            f"{args.clients} clients as threads of one process, each with 1/{args.shares} of the training set "
            f"(~{50000 // args.shares} images), all on loopback; {args.rounds} rounds."
        ),
        "",
        "| round | clients aggregated | rejected or failed | round, s | centralized accuracy |",
        "|---|---|---|---|---|",
        *(
            f"| {r['round']} | {r['fit_clients']} | {r['rejected']} | {float(r['seconds']):.2f} "
            f"| {float(r['centralized_accuracy']):.4f} |"
            for r in rows
        ),
        "",
        (
            f"Every round aggregated all {args.clients} clients: **{'yes' if ok else 'NO'}** "
            f"(server exit code {code}, client errors: {errors or 'none'}). "
            f"Peak memory in use, all processes: {mem.peak_gib:.2f} GiB above idle."
        ),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- scale: the Simulation Engine


def flwr_env(home: Path) -> dict:
    ports = [free_address().rsplit(":", 1)[1] for _ in range(2)]
    return {
        **ENV,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # run in this environment, no `uv sync`
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": ports[0],
        "FLWR_LOCAL_CONTROL_API_PORT": ports[1],
        "PATH": f"{FLWR_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def stop_local_superlink(home: Path) -> None:
    """`flwr run` leaves a detached local SuperLink running: stop the one of this FLWR_HOME."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in text and str(home) in text:
            os.kill(int(cmdline.parent.name), signal.SIGTERM)


def simulate(args, cache: str, n: int, tmp: Path) -> dict:
    home, run_dir = tmp / f"home-{n}", tmp / f"run-{n}"
    config = (
        f"num-server-rounds={args.rounds} fraction-fit={args.fraction} min-clients=2 threads=1 "
        f"data-root='{args.data_root}' cache-dir='{cache}' run-dir='{run_dir}'"
    )
    cmd = [str(FLWR_BIN / "flwr"), "run", str(HERE), "--run-config", config, "--stream",
           "--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"]  # fmt: skip
    start = time.perf_counter()
    try:
        with MemorySampler() as mem:
            subprocess.run(cmd, env=flwr_env(home), cwd=HERE, check=True, timeout=3600,
                           stdout=(tmp / f"flwr-{n}.log").open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    finally:
        stop_local_superlink(home)
    rows = read_rows(run_dir)
    return {
        "n": n,
        "wall_s": time.perf_counter() - start,
        "round_s": [float(r["seconds"]) for r in rows],
        "sampled": int(rows[-1]["fit_clients"]),
        "accuracy": float(rows[-1]["centralized_accuracy"]),
        "peak_gib": mem.peak_gib,
    }


def bench_scale(args, cache: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for n in args.clients:
            r = simulate(args, cache, n, Path(tmp))
            print(f"simulation {n} clients: {r}", flush=True)
            results.append(r)
    clients = " ".join(map(str, args.clients))
    lines = [
        "## Scale: the Flower App on the Simulation Engine",
        "",
        (
            f"`python3 bench.py scale --data-root {args.data_root} --clients {clients}`: `flwr run .` with "
            f"`num-supernodes=N client-resources-num-cpus=1`, IID shares, `fraction-fit={args.fraction}`, "
            f"{args.rounds} rounds, centralized evaluation every round. Round time is the server's, from sampling "
            "to the end of evaluation (the first round includes starting the workers); peak memory is all memory "
            "in use on the machine above its idle level, sampled every 0.2 s."
        ),
        "",
        (
            "| clients | sampled per round | round 1, s | later rounds, s (median) | whole run, s | peak memory, GiB "
            "| final centralized accuracy |"
        ),
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['n']} | {r['sampled']} | {r['round_s'][0]:.1f} | {statistics.median(r['round_s'][1:]):.1f} "
            f"| {r['wall_s']:.0f} | {r['peak_gib']:.2f} | {r['accuracy']:.4f} |"
            for r in results
        ),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- NIID-Bench


def bench_niid(args, cache: str) -> str:
    """FedAvg on CIFAR-10 as NIID-Bench runs it, via run.py; one row per partitioner."""
    rows = []
    for partitioner in args.partitioners:
        run_dir = Path(args.runs) / f"niid-{partitioner}"
        cmd = script(
            "run.py", "--clients", 10, "--partitioner", partitioner, "--alpha", 0.5, "--rounds", args.rounds,
            "--epochs", 10, "--batch-size", 64, "--lr", 0.01, "--momentum", 0.9, "--weight-decay", 1e-5,
            "--augment", "--no-normalize", "--holdout", 0, "--fraction-fit", 1.0, "--port", 0,
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
            "--batch-size 64 --lr 0.01 --momentum 0.9 --weight-decay 1e-5 --augment --no-normalize --holdout 0`: "
            "10 clients all sampled each round, the same Net. Accuracy is the global model's on the full "
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


# ---------------------------------------------------------------- profile: what bounds a training step


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

    data = cifar.load_arrays(args.data_root, cache)
    cpu = torch.device("cpu")
    batches, _ = cifar.make_loaders(data, 32, cpu, seed=0)
    rows = []
    for threads in (1, os.cpu_count()):
        torch.set_num_threads(threads)
        net = cifar.make_net(0, cpu)
        rows.append((f"eager, channels-last, {threads} thread(s)", step_time(net, batches, args.steps)))
    net = cifar.make_net(0, cpu).to(memory_format=torch.contiguous_format)
    nchw = ((x.contiguous(), y) for x, y in cifar.make_loaders(data, 32, cpu, seed=0)[0])
    rows.append((f"eager, NCHW, {os.cpu_count()} threads", step_time(net, nchw, args.steps)))
    compiled = torch.compile(cifar.make_net(0, cpu))
    first = step_time(compiled, batches, 1, warmup=0)  # includes compiling
    rows.append((f"torch.compile (its first step: {first / 1000:.1f} s)", step_time(compiled, batches, args.steps)))
    net = cifar.make_net(0, cpu)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, foreach=True)
    it = iter(batches)
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


def main() -> None:
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
    p = sub.add_parser("niid", help="NIID-Bench's FedAvg rows (IID and Dirichlet 0.5)")
    p.add_argument("--rounds", type=flags.positive_int, default=50, help="rounds (the paper: 50)")
    p.add_argument("--partitioners", nargs="+", choices=cifar.PARTITIONERS, default=list(cifar.PARTITIONERS))
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where the run directories go")
    for p in sub.choices.values():
        p.add_argument("--data-root", required=True, help="real CIFAR-10 (torchvision directory or image folder)")
        p.add_argument("--cache-dir", default=cifar.CACHE_DIR, help="decoded-image cache")
    args = parser.parse_args()

    print(f"Loading {args.data_root} (decoded once into the cache, not timed)", flush=True)
    try:
        cifar.load_arrays(args.data_root, args.cache_dir)
    except cifar.DataError as e:
        flags.die(str(e), parser.prog)
    run = {
        "pipeline": bench_pipeline,
        "federated": bench_federated,
        "load": bench_load,
        "scale": bench_scale,
        "profile": bench_profile,
        "niid": bench_niid,
    }
    # NIID rows take long: each partitioner's row is its own section, written when it is done
    name = "-".join([args.command, *args.partitioners]) if args.command == "niid" else args.command
    if args.command == "pipeline" and args.devices != ["cpu"]:  # a GPU machine's rows beside the CPU's
        name = "-".join([args.command, *args.devices])
    if args.command == "federated" and torch.cuda.is_available():
        name += "-cuda"
    write_section(args.out, name, run[args.command](args, args.cache_dir))


if __name__ == "__main__":
    main()
