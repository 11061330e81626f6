"""server.py and client.py as real processes on loopback."""

import csv
import time

import pytest
import torch
from conftest import finish, free_port, run, start
from test_cifar import one_line_error

import cifar

FAST = ("--lr", 0.02, "--epochs", 2, "--batch-size", 16)  # the tiny set learns in a few rounds


def data_flags(root, cache):
    return ("--data-root", root, "--cache-dir", cache)


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
            start("client.py", "--server-address", address, *data_flags(tiny, cache), *FAST, *client_args, *extra,
                  log=tmp_path / f"client{i}.log")
        )  # fmt: skip
    if not server_first:
        time.sleep(3)  # the clients are up and retrying before the server exists
        procs.insert(0, server())
    codes = finish(procs)
    logs = [(tmp_path / "server.log").read_text()] + [
        (tmp_path / f"client{i}.log").read_text() for i in range(len(clients))
    ]
    return codes, logs


def rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


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


def test_a_client_started_before_its_server_retries_and_the_run_completes(tiny, tmp_path):
    codes, logs = federate(tmp_path, tiny, [(), ()], server_args=("--rounds", 1), server_first=False)
    assert codes == [0, 0, 0], logs
    assert "not reachable yet, retrying" in logs[1]


def test_a_client_without_a_server_gives_up_after_its_connect_timeout(tiny, tmp_path):
    began = time.monotonic()
    r = run(
        "client.py", "--server-address", f"127.0.0.1:{free_port()}", "--connect-timeout", 3, *data_flags(tiny, tmp_path)
    )
    assert r.returncode == 1 and "no server answered" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - began < 60


def test_saved_checkpoint_loads_into_net_and_reproduces_the_reported_centralized_accuracy(tiny, tmp_path):
    codes, logs = federate(tmp_path, tiny, [(), ()], server_args=("--rounds", 2))
    assert codes == [0, 0, 0], logs[0][-3000:]
    net = cifar.Net()
    net.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "round-002.pt", weights_only=True))
    data = cifar.load_data(tiny, tmp_path / "cache")
    loss, accuracy = cifar.test(net, cifar.Batches(cifar.normalize(data.test_x, "cpu"), data.test_y, 1000), "cpu")
    last = rows(tmp_path / "run")[-1]
    assert accuracy == pytest.approx(float(last["centralized_accuracy"]), abs=1e-6)
    assert loss == pytest.approx(float(last["centralized_loss"]), rel=1e-4)


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
def test_bad_flags_are_one_line_and_exit_code_2(script, flag, value):
    line = one_line_error(run(script, flag, value))
    assert flag in line or value in line
