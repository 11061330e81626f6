"""bench.py deployment: one experiment's round in the three faces, and where a Deployment Engine round goes."""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
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
from federation import stopwatch

# A ClientApp that does nothing and a ServerApp that runs FedAvg's rounds on a model of the Net's size, with no
# torch anywhere: what a Deployment Engine round costs Flower alone, whatever an app does (the floor)
FLOOR_APP = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        [project]
        name = "floor"
        version = "1.0.0"
        dependencies = ["flwr"]
        [tool.hatch.build.targets.wheel]
        packages = ["."]
        [tool.flwr.app]
        publisher = "bench"
        [tool.flwr.app.components]
        serverapp = "floor:server"
        clientapp = "floor:client"
        [tool.flwr.app.config]
        rounds = 3
        out = ""
    """,
    "floor.py": """
        import time
        import numpy as np
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp
        from flwr.serverapp.strategy import FedAvg

        client = ClientApp()
        server = ServerApp()

        @client.train()
        def train(msg, context):
            metrics = MetricRecord({"num-examples": 1})
            return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

        @client.evaluate()
        def evaluate(msg, context):
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})}), reply_to=msg)

        @server.main()
        def main(grid, context):
            marks = []
            def tick(server_round, arrays):
                marks.append(time.time())
            strategy = FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
            strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(62006, np.float32)]),
                           num_rounds=int(context.run_config["rounds"]), evaluate_fn=tick)
            with open(context.run_config["out"], "w") as f:
                f.write(" ".join(str(b - a) for a, b in zip(marks, marks[1:])))
    """,
}


def three_terminals(args, cache: str, tmp: Path) -> list[float]:
    """server.py and two client.py, each half the training set: the rounds' seconds."""
    address, run_dir = free_address(), tmp / "terminals"
    data = ("--data-root", args.data_root, "--cache-dir", cache)
    procs = [subprocess.Popen(script("server.py", "--server-address", address, "--rounds", args.rounds, "--run-dir",
                                     run_dir, *data), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]  # fmt: skip
    for i in range(2):
        cmd = script("client.py", "--server-address", address, *data, "--epochs", args.epochs, "--partitioner",
                     "iid", "--num-partitions", 2, "--partition-id", i)  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    if [p.wait(timeout=3600) for p in procs] != [0, 0, 0]:
        raise RuntimeError("the three-terminal run failed")
    return [float(r["seconds"]) for r in read_rows(run_dir)]


def run_config(args, cache: str, run_dir: Path) -> str:
    return (f"num-server-rounds={args.rounds} local-epochs={args.epochs} partitioner='iid' min-clients=2 "
            f"data-root='{args.data_root}' cache-dir='{cache}' run-dir='{run_dir}'")  # fmt: skip


def simulation(args, cache: str, tmp: Path) -> list[float]:
    """`flwr run .` with two simulated SuperNodes: the rounds' seconds."""
    home, run_dir = tmp / "sim-home", tmp / "simulation"
    cmd = [str(FLWR_BIN / "flwr"), "run", str(HERE), "--run-config", run_config(args, cache, run_dir), "--stream",
           "--federation-config", "num-supernodes=2"]  # fmt: skip
    try:
        subprocess.run(cmd, env=flwr_env(home), cwd=HERE, check=True, timeout=3600,
                       stdout=(tmp / "simulation.log").open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    finally:
        stop_local_superlink(home)
    return [float(r["seconds"]) for r in read_rows(run_dir)]


def deployment(args, cache: str, tmp: Path, name: str, app: Path, config: str, env_extra: dict) -> dict:
    """The README's Deployment Engine commands on loopback: an insecure SuperLink, two SuperNodes with
    partitions 0 and 1 of 2, `flwr run APP bench`; each ClientApp process's stopwatch marks."""
    home = tmp / f"{name}-home"
    home.mkdir()
    link, timings = free_address(), tmp / f"{name}-timings.jsonl"
    (home / "config.toml").write_text(f'[superlink.bench]\naddress = "{link}"\ninsecure = true\n')
    env = {**flwr_env(home), stopwatch.ENV: str(timings), **env_extra}
    host, port = link.rsplit(":", 1)
    logs = [(tmp / f"{name}-{part}.log").open("w") for part in ("superlink", "node0", "node1")]
    procs = [subprocess.Popen([str(FLWR_BIN / "flower-superlink"), "--insecure", "--host", host, "--port", port],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT)]  # fmt: skip
    try:
        listening(link, procs[0])
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(FLWR_BIN / "flower-supernode"), "--insecure", "--superlink", link, "--node-config",
                 f"partition-id={i} num-partitions=2", "--port", free_address().rsplit(":", 1)[1]],
                env=env, stdout=logs[1 + i], stderr=subprocess.STDOUT))  # fmt: skip
        log = tmp / f"{name}.log"
        done = subprocess.run([str(FLWR_BIN / "flwr"), "run", str(app), "bench", "--run-config", config, "--stream"],
                              env=env, cwd=app, timeout=3600, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{name}: flwr run failed:\n{log.read_text()[-3000:]}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    marks = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    return {"marks": marks}


def listening(address: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until something accepts connections at HOST:PORT (a probe, not a sleep)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens at {address}") from None
            time.sleep(0.1)


def our_deployment(args, cache: str, tmp: Path, name: str, env_extra: dict) -> dict:
    run_dir = tmp / name
    result = deployment(args, cache, tmp, name, HERE, run_config(args, cache, run_dir), env_extra)
    return {**result, "round_s": [float(r["seconds"]) for r in read_rows(run_dir)]}


def floor_deployment(args, cache: str, tmp: Path, name: str, env_extra: dict) -> dict:
    app, out = tmp / "floor-app", tmp / f"{name}-rounds.txt"
    app.mkdir(exist_ok=True)
    for file, text in FLOOR_APP.items():
        (app / file).write_text(textwrap.dedent(text).lstrip())
    result = deployment(args, cache, tmp, name, app, f"rounds={args.rounds} out='{out}'", env_extra)
    return {**result, "round_s": [float(x) for x in out.read_text().split()]}


def import_seconds(code: str, repeats: int = 5) -> float:
    """Median wall time of `python -c CODE` in a fresh process."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=HERE, env=ENV, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(marks: list[dict], kind: str) -> dict[str, float]:
    """Median seconds of each stage of the `kind` messages' processes."""
    stages = (("start", "born", "entered"), ("data", "entered", "data"), ("build", "data", "built"),
              ("work", "built", "worked"), ("reply", "worked", "replied"), ("exit", "replied", "exited"))  # fmt: skip
    ours = [m for m in marks if m["kind"] == kind and m.get("born")]
    return {stage: statistics.median(m[b] - m[a] for m in ours) for stage, a, b in stages} if ours else {}


FACES = ("three terminals", "Simulation Engine", "Deployment Engine", "Deployment Engine, task poll 0.05 s",
         "floor: Flower alone (an app that does nothing)")  # fmt: skip
FAST_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}  # Flower's knob (default 1 s) for starting a message


def run_face(face: str, args, cache: str, work: Path) -> dict:
    """One run of one face: its rounds' seconds (and a Deployment Engine's stopwatch marks)."""
    if face == "three terminals":
        return {"round_s": three_terminals(args, cache, work)}
    if face == "Simulation Engine":
        return {"round_s": simulation(args, cache, work)}
    if face.startswith("floor"):
        return floor_deployment(args, cache, work, "floor", {})
    fast = "poll" in face
    return our_deployment(args, cache, work, "fast" if fast else "deploy", FAST_POLL if fast else {})


def bench_deployment(args, cache: str) -> str:
    load_start = os.getloadavg()[0]
    faces: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            work = Path(tmp) / f"r{i}"
            work.mkdir()
            for face in FACES:
                r = run_face(face, args, cache, work)
                faces.setdefault(face, []).append(r)
                print(f"{face} #{i + 1}: rounds {[round(s, 1) for s in r['round_s']]}", flush=True)
    imports = {
        "python": import_seconds("pass"),
        "flwr": import_seconds("import flwr.supernode.runtime.run_clientapp"),
        "app": import_seconds("import flwr.supernode.runtime.run_clientapp, client_app"),
    }
    return report(args, faces, imports, load_start)


def median_round(runs: list[dict]) -> float:
    return statistics.median(s for r in runs for s in r["round_s"])


def report(args, faces: dict, imports: dict, load_start: float) -> str:
    base = median_round(faces["three terminals"])
    how = (
        f"`python3 bench.py deployment --data-root {args.data_root} --rounds {args.rounds} --repeats "
        f"{args.repeats}`: two clients, each half of the training set (IID), {args.epochs} local epoch(s), the "
        "defaults otherwise (batch 32, lr 0.001, centralized evaluation every round), all on this machine. "
        "Three terminals: `server.py` and two `client.py --num-partitions 2 --partition-id I`. Simulation: "
        "`flwr run .` with `num-supernodes=2`. Deployment: the README's commands, an insecure `flower-superlink`, "
        'two `flower-supernode --node-config "partition-id=I num-partitions=2"`, `flwr run . bench`, with '
        "`FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`. A round is the server's, from sampling to the end of "
        "centralized evaluation (metrics.csv's `seconds`); the floor's, from one round's end to the next's."
    )
    lines = [
        "## Deployment: one round in the three faces, and where a Deployment Engine round goes",
        "",
        how,
        "",
        "| face | median round, s | x three terminals | rounds, s |",
        "|---|---|---|---|",
    ]
    for face, runs in faces.items():
        all_rounds = ", ".join(f"{s:.1f}" for r in runs for s in r["round_s"])
        lines.append(f"| {face} | {median_round(runs):.1f} | {median_round(runs) / base:.1f}x | {all_rounds} |")
    deploy = [m for r in faces["Deployment Engine"] for m in r["marks"]]
    header = (
        "| message | process start to the handler | data load | partition, batches, model | fit or evaluate "
        "| reply | exit (reply pushed) | whole process |"
    )
    intro = (
        "Each message of the Deployment Engine is a fresh `flwr-clientapp` process. Where its time goes (medians "
        f"over the run's messages, in seconds, from the marks `client_app.py` writes when `{stopwatch.ENV}` is set):"
    )
    lines += ["", intro, "", header, "|---|---|---|---|---|---|---|---|"]
    for kind in ("train", "evaluate"):
        b = breakdown(deploy, kind)
        if b:
            cells = " | ".join(f"{b[k]:.2f}" for k in ("start", "data", "build", "work", "reply", "exit"))
            lines.append(f"| {kind} | {cells} | {sum(b.values()):.2f} |")
    parts = (
        f'Of "process start to the handler", measured apart in fresh processes (medians of 5, each with its exit): '
        f"the interpreter {imports['python']:.2f} s; Flower's ClientApp runtime imported "
        f"{imports['flwr'] - imports['python']:.2f} s; `client_app` (torch and the project) "
        f"{imports['app'] - imports['flwr']:.2f} s more. Together they are about the whole of it: Flower's pulling "
        "of the message and unpacking of the app take little beside them."
    )
    lines += ["", parts, "", load_note(load_start)]
    return "\n".join(lines)
