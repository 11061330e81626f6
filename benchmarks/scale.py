"""Many clients: one server.py under load, and the Flower App on the Simulation Engine at growing sizes."""

import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import flwr
import torch

import client
from benchmarks.common import (
    ENV,
    FLWR_BIN,
    HERE,
    MemorySampler,
    flwr_env,
    free_address,
    read_rows,
    script,
    stop_local_superlink,
)
from federation import config
from federation.participant import Participant
from pipeline import sources


def swarm_client(address: str, args: argparse.Namespace, data: sources.Data, errors: list) -> None:
    try:
        c = client.CifarClient(Participant(args, data))
        flwr.client.start_client(server_address=address, client=c.to_client())
    except Exception as e:  # noqa: BLE001  (reported by the caller, whatever it was)
        errors.append(repr(e))


def bench_load(args, cache: str) -> str:
    """N lightweight clients (threads of one process, a tiny share each) on one server.py."""
    data = sources.load_arrays(args.data_root, cache)
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
            ns = config.client_parser("swarm").parse_args(
                ["--device", "cpu", "--seed", "0", "--partition-id", str(i), "--num-partitions", str(args.shares),
                 "--data-root", args.data_root, "--cache-dir", cache]
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


def simulate(args, cache: str, n: int, tmp: Path, extra: str = "", label: str = "", min_clients: int = 2) -> dict:
    """`flwr run .` with n SuperNodes, `extra` added to the run config; the run's figures."""
    home, run_dir = tmp / f"home-{n}{label}", tmp / f"run-{n}{label}"
    config = (
        f"num-server-rounds={args.rounds} fraction-fit={args.fraction} min-clients={min_clients} threads=1 "
        f"data-root='{args.data_root}' cache-dir='{cache}' run-dir='{run_dir}' {extra}"
    )
    cmd = [str(FLWR_BIN / "flwr"), "run", str(HERE), "--run-config", config, "--stream",
           "--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"]  # fmt: skip
    start = time.perf_counter()
    try:
        with MemorySampler() as mem:
            subprocess.run(cmd, env=flwr_env(home), cwd=HERE, check=True, timeout=3600,
                           stdout=(tmp / f"flwr-{n}{label}.log").open("w"), stderr=subprocess.STDOUT)  # fmt: skip
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
