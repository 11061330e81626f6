"""server.py and client.py as real processes on loopback."""

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import finish, free_port, run, start
from test_cifar import one_line_error

import cifar
from federation import config
from federation.model import Layout
from federation.records import RunRecord
from federation.rounds import Rounds
from pipeline import models

FAST = ("--lr", 0.01, "--epochs", 3, "--batch-size", 16)  # the tiny set learns in a few rounds, steadily


def data_flags(root, cache):
    return ("--data-root", root, "--cache-dir", cache)


def seeded(i: int, extra: tuple = ()) -> tuple:
    """A reproducible client: the whole set with a seed of its own, or a partition with the seed all share."""
    if "--seed" in extra:
        return ()
    return ("--seed", 0) if "--num-partitions" in extra else ("--seed", i)


def wait_for_line(log: Path, text: str, proc, timeout: float = 120) -> None:
    """Poll a process's log until it shows `text`; fail if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text()):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def federate(tmp_path, tiny, clients, server_args=(), client_args=(), server_first=True):
    """Run server.py and one client.py per entry of `clients` (extra flags each) to the end."""
    address = f"127.0.0.1:{free_port()}"
    cache = tmp_path / "cache"
    server = lambda: start(
        "server.py", "--server-address", address, "--run-dir", tmp_path / "run",
        *data_flags(tiny, cache), *server_args, log=tmp_path / "server.log",
    )  # fmt: skip
    procs = [server()] if server_first else []
    for i, extra in enumerate(clients):
        procs.append(
            start("client.py", "--server-address", address, *data_flags(tiny, cache), *FAST, *seeded(i, extra),
                  *client_args, *extra, log=tmp_path / f"client{i}.log")
        )  # fmt: skip
    if not server_first:  # the clients are up and retrying before the server exists
        for i, proc in enumerate(procs):
            wait_for_line(tmp_path / f"client{i}.log", "not reachable yet, retrying", proc)
        procs.insert(0, server())
    codes = finish(procs)
    logs = [(tmp_path / "server.log").read_text()] + [
        (tmp_path / f"client{i}.log").read_text() for i in range(len(clients))
    ]
    return codes, logs


def rows(run_dir):
    """metrics.csv's rows of the rounds trained (round 0, the initial model, left out)."""
    with (run_dir / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["round"] != "0"]


@pytest.mark.smoke
def test_server_and_two_clients_complete_three_rounds_with_aggregated_accuracy(tiny, tmp_path):
    codes, logs = federate(tmp_path, tiny, [(), ()])
    assert codes == [0, 0, 0], logs[0][-3000:]
    server_log = logs[0]
    for r in (1, 2, 3):
        assert f"Round {r}: distributed accuracy" in server_log
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    assert all(r["fit_clients"] == "2" for r in table)
    assert float(table[-1]["distributed_accuracy"]) > 0.3  # chance is 0.1
    assert float(table[-1]["centralized_accuracy"]) > 0.3


def test_clients_started_before_their_server_retry_and_the_server_spots_that_they_send_identical_updates(
    tiny, tmp_path
):
    same = ("--seed", 3)  # two clients with one seed on the whole set: the same update
    codes, logs = federate(tmp_path, tiny, [same, same], server_args=("--rounds", 1), server_first=False)
    assert codes == [0, 0, 0], logs
    assert "not reachable yet, retrying" in logs[1]
    assert "Two clients sent identical updates" in logs[0]


def test_a_client_without_a_server_gives_up_after_its_connect_timeout(tiny, tmp_path):
    began = time.monotonic()
    r = run(
        "client.py", "--server-address", f"127.0.0.1:{free_port()}", "--connect-timeout", 3, *data_flags(tiny, tmp_path)
    )
    assert r.returncode == 1 and "no server answered" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - began < 60


@pytest.mark.parametrize(
    "script, flag, value",
    [
        ("server.py", "--rounds", "0"),
        ("server.py", "--server-address", "localhost"),
        ("server.py", "--server-address", "127.0.0.1:99999"),
        ("server.py", "--fraction-fit", "1.5"),
        ("server.py", "--min-clients", "0"),
        ("client.py", "--server-address", "no-port-here"),
        ("client.py", "--batch-size", "0"),
        ("client.py", "--epochs", "-2"),
    ],
)
def test_bad_flags_are_one_line_and_exit_code_2(forked, script, flag, value):
    line = one_line_error(forked.run(script, flag, value))
    assert flag in line or value in line


def test_run_py_starts_four_partitioned_clients_and_completes(tiny, tmp_path):
    r = run(
        "run.py", "--clients", 4, "--rounds", 2, "--port", 0, "--partitioner", "dirichlet", "--alpha", 1.0,
        "--run-dir", tmp_path / "run", *data_flags(tiny, tmp_path / "cache"), *FAST, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Round 2: distributed accuracy" in r.stdout and "centralized_accuracy" in r.stdout
    table = rows(tmp_path / "run")
    assert [int(x["round"]) for x in table] == [1, 2] and all(x["fit_clients"] == "4" for x in table)
    assert (tmp_path / "run" / "plot.png").stat().st_size > 10_000
    assert len(list((tmp_path / "run" / "logs").glob("client-*.log"))) == 4
    for i in range(4):  # each client trained on its own share, not the full set
        assert "on 300 examples" not in (tmp_path / "run" / "logs" / f"client-{i}.log").read_text()


def test_run_py_with_missing_data_says_so_in_one_line_before_starting_anything(forked, tmp_path):
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)  # no test/ split
    line = one_line_error(
        forked.run(
            "run.py", "--port", 0, "--data-root", tmp_path / "d", "--cache-dir", "", "--run-dir", tmp_path / "run"
        )
    )
    assert "has no images" in line and not (tmp_path / "run").exists()


def processes_with(*needles: str) -> list[int]:
    """PIDs whose command line holds every needle (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(n in text for n in needles):
            found.append(int(cmdline.parent.name))
    return found


def test_run_py_stops_every_process_when_one_client_dies(tiny, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = start(
        "run.py", "--clients", 3, "--rounds", 50, "--port", port, "--run-dir", tmp_path / "run",
        *data_flags(tiny, tmp_path / "cache"), *FAST, log=tmp_path / "run.log",
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.csv").exists() or not rows(tmp_path / "run"):
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "run.log").read_text()
        time.sleep(0.1)
    victims = processes_with("client.py", address)
    assert len(victims) == 3
    os.kill(victims[1], signal.SIGKILL)
    assert finish([proc], timeout=60) == [1]
    out = (tmp_path / "run.log").read_text()
    assert "exited with code -9; stopping the others" in out
    time.sleep(0.5)
    assert processes_with("client.py", address) == [] and processes_with("server.py", address) == []


def test_server_killed_mid_run_resumes_at_the_next_round_and_records_each_round_once(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    common = ("--server-address", address, *data_flags(tiny, cache))
    srv = start("server.py", *common, "--rounds", 3, "--run-dir", run_dir, log=tmp_path / "s1.log")
    clients = [start("client.py", *common, *FAST, *seeded(i), log=tmp_path / f"c{i}.log") for i in range(2)]
    deadline = time.monotonic() + 120
    # Round 1 recorded, plot included (plot.png is redrawn every round: a stopped run has one)
    while not (run_dir / "metrics.csv").exists() or len(rows(run_dir)) < 1 or not (run_dir / "plot.png").exists():
        assert time.monotonic() < deadline and srv.poll() is None
        time.sleep(0.05)
    srv.kill()  # SIGKILL: no chance to clean up
    srv.wait()
    for c in clients:
        c.kill()
        c.wait()
    done = len(rows(run_dir))
    assert done < 3
    assert (run_dir / "plot.png").stat().st_size > 10_000
    assert json.loads((run_dir / "config.json").read_text())["run_dir"] == str(run_dir)

    srv = start("server.py", *common, "--resume", run_dir, log=tmp_path / "s2.log")
    clients = [start("client.py", *common, *FAST, *seeded(i), log=tmp_path / f"d{i}.log") for i in range(2)]
    assert finish([srv, *clients]) == [0, 0, 0], (tmp_path / "s2.log").read_text()[-3000:]
    assert f"Resuming {run_dir} after round {done}" in (tmp_path / "s2.log").read_text()
    assert [int(r["round"]) for r in rows(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"round-00{i}.pt" for i in (1, 2, 3)]


def test_resumed_rounds_start_from_the_last_checkpoint_with_the_rounds_left(tmp_path):
    import numpy as np

    record = RunRecord(tmp_path)
    record.create({})
    weights = [w + 1 for w in models.get_weights(cifar.Net())]
    record.save_checkpoint(1, weights, Layout.of(cifar.Net(), "cifar:Net"))
    record.append({"round": 1, "seconds": 1.0})
    args = config.server_parser("").parse_args(["--rounds", "3", "--no-central-eval", "--num-classes", "10"])
    rounds = Rounds(args, record)
    assert rounds.done == 1 and rounds.rounds_left == 2
    assert all(np.array_equal(a, b) for a, b in zip(rounds.weights, weights))
