"""Privacy through a real run: epsilon across crashes, restarts and resumes, fresh noise, late clients (real
processes where the behaviour is about them)."""

import csv
import itertools
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ENV, ROOT, finish, free_port, run, start
from test_federation import FAST, data_flags, rows
from test_privacy import dp_args, reference_epsilons

from federation import config, privacy
from federation.records import RunRecord
from federation.rounds import Rounds

# Noise std sigma C / m = 0.025 on each weight: a model the clients can still train
CENTRAL = ("--screen", "none", "--dp", "server-clipping", "--dp-noise", 5.0, "--dp-clip-norm", 0.01)


def until(test, what: str, timeout: float = 120, procs=()) -> None:
    """Poll `test()` until it is true; fail when time runs out or one of `procs` has exited."""
    deadline = time.monotonic() + timeout
    while not test():
        assert all(p.poll() is None for p in procs), f"a process exited while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def clients(address, tiny, tmp_path, ids=(0, 1), n=2, script="client.py", extra=(), tag="c"):
    """Partitioned clients `ids` of `n` (client.py, or a stand-in script with its flags), started now."""
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"), *FAST, "--threads", 1, "--seed", 0)
    return [
        subprocess.Popen(
            [sys.executable, str(ROOT / script), *map(str, (*common, "--num-partitions", n, "--partition-id", i, *extra))],
            cwd=ROOT, env=ENV, stdout=(tmp_path / f"{tag}{i}.log").open("w"), stderr=subprocess.STDOUT,
        )
        for i in ids
    ]  # fmt: skip


def test_central_epsilon_counts_a_model_released_before_a_crash_and_the_resumed_run_goes_on_from_it(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"), "--run-dir", run_dir, *CENTRAL)
    server = start("server.py", *common, "--rounds", 2, log=tmp_path / "server.log")
    slow = clients(address, tiny, tmp_path, script="tests/slow_client.py", tag="slow")  # they never end evaluating
    spend = RunRecord(run_dir).privacy_spend()
    until(lambda: spend.is_file(), "round 1's noised model", procs=[server])
    server.kill()  # round 1's model is at the clients for evaluation: released, on no row of metrics.csv
    for p in (server, *slow):
        p.kill()
        p.wait()
    assert rows(run_dir) == []
    # Resumed: round 1 again, then round 2; three noised models have left the server in all
    server = start("server.py", *common, "--resume", run_dir, "--rounds", 2, log=tmp_path / "resumed.log")
    codes = finish([server, *clients(address, tiny, tmp_path)])
    assert codes == [0, 0, 0], (tmp_path / "resumed.log").read_text()[-3000:]
    table = rows(run_dir)
    assert [r["round"] for r in table] == ["1", "2"]
    expected = reference_epsilons(5.0, 2, 2, 3)  # every client every round, three releases
    assert [float(r["epsilon"]) for r in table] == pytest.approx(expected[1:], rel=1e-2)


def test_a_dp_sgd_client_restarted_mid_run_goes_on_from_its_spend_and_refuses_without_it(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    server = start("server.py", "--server-address", address, *data_flags(tiny, tmp_path / "cache"), "--run-dir",
                   run_dir, "--rounds", 4, log=tmp_path / "server.log")  # fmt: skip
    dp = ("--dp-sgd", "--dp-sgd-ledger", tmp_path / "ledger")
    first = clients(address, tiny, tmp_path, extra=dp)
    until(lambda: len(rows(run_dir)) >= 1 if (run_dir / "metrics.csv").is_file() else False, "round 1",
          procs=[server])  # fmt: skip
    first[0].kill()  # client 0 dies after its first update; it is started again
    first[0].wait()
    # Partition 0 again, on a machine without its ledger: refused
    (elsewhere,) = clients(address, tiny, tmp_path, ids=(0,), extra=("--dp-sgd", "--dp-sgd-ledger", tmp_path / "x"),
                           tag="elsewhere")  # fmt: skip
    assert elsewhere.wait(timeout=120) == 2
    assert "has DP-SGD epsilon" in (tmp_path / "elsewhere0.log").read_text()
    (again,) = clients(address, tiny, tmp_path, ids=(0,), extra=dp, tag="again")
    assert finish([server, first[1], again]) == [0, 0, 0], (tmp_path / "server.log").read_text()[-3000:]
    with (run_dir / "clients.csv").open() as f:
        spent = [float(r["dp_epsilon"]) for r in csv.DictReader(f) if r["partition_id"] == "0" and r["dp_epsilon"]]
    assert len(spent) >= 2 and all(a < b for a, b in itertools.pairwise(spent)), spent  # never back to round 1's


def test_seeded_noise_never_repeats_from_one_round_or_resume_to_the_next():
    args = dp_args("--dp", "server-clipping", "--dp-seed", "3")
    privacy.seed_noise(args, releases=0)
    first = np.random.normal(size=8)
    privacy.seed_noise(args, releases=2)  # a run resumed after two released models
    resumed = np.random.normal(size=8)
    privacy.seed_noise(args, releases=0)
    assert np.array_equal(first, np.random.normal(size=8)) and not np.allclose(first, resumed)
    # DP-SGD: each round's client (the App builds one per message) seeds from the steps taken so far
    import cifar
    from federation.dpsgd import DpSgd

    flags = config.client_parser("").parse_args(["--dp-sgd", "--dp-seed", "3"])
    round1 = DpSgd(cifar.Net(), "cifar:Net", flags, seed=0)
    round2 = DpSgd(cifar.Net(), "cifar:Net", flags, seed=0, history=[(1.0, 0.1, 30)])
    draws = [torch.randn(8, generator=d.noise) for d in (round1, round2)]
    assert not torch.allclose(*draws)


def test_clients_joining_and_leaving_a_central_dp_run_are_taken_and_epsilon_stays_right(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    server = start("server.py", "--server-address", address, *data_flags(tiny, tmp_path / "cache"), "--run-dir",
                   run_dir, "--rounds", 7, *CENTRAL, log=tmp_path / "server.log")  # fmt: skip
    early = clients(address, tiny, tmp_path, ids=(0, 1), n=3, extra=("--epochs", 15))  # rounds of a few seconds

    def taken() -> list[str]:
        return [r["fit_clients"] for r in rows(run_dir)] if (run_dir / "metrics.csv").is_file() else []

    until(lambda: "[ROUND 1]" in (tmp_path / "server.log").read_text(), "round 1", procs=[server])
    (late,) = clients(address, tiny, tmp_path, ids=(2,), n=3, tag="late")  # joins a round or two later
    until(lambda: "3" in taken(), "a round with the late client", procs=[server])
    early[1].kill()  # and one of the first two leaves, mid-round or between rounds
    early[1].wait()
    assert finish([server, early[0], late]) == [0, 0, 0], (tmp_path / "server.log").read_text()[-3000:]
    assert taken()[0] == "2" and "3" in taken() and taken()[-1] == "2", taken()
    # Every client every round is one Gaussian mechanism whatever their number: one release a round
    expected = reference_epsilons(5.0, 2, 2, 7)
    assert [float(r["epsilon"]) for r in rows(run_dir)] == pytest.approx(expected, rel=1e-2)


def test_run_py_shows_the_budget_stop_and_a_spent_budget_resumed_stops_at_once(tiny, tmp_path):
    budget = reference_epsilons(5.0, 2, 2, 2)[0] * 1.05  # one round's worth
    flags = ("--clients", 2, "--rounds", 3, *data_flags(tiny, tmp_path / "cache"), "--run-dir", tmp_path / "run",
             "--partitioner", "iid", *FAST, *CENTRAL, "--dp-max-epsilon", budget)  # fmt: skip
    r = run("run.py", *flags, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Stopped after round 1 of 3: round 2 would take epsilon past --dp-max-epsilon" in r.stdout
    began = time.monotonic()
    again = run("server.py", "--resume", tmp_path / "run", "--server-address", f"127.0.0.1:{free_port()}")
    assert again.returncode == 0 and "Stopped after round 1 of 3: round 2 would take epsilon past" in again.stdout
    assert time.monotonic() - began < 60 and "Waiting for clients" not in again.stdout


def test_rejected_dp_sgd_clients_count_in_the_rounds_client_epsilon_and_a_noise_only_release_is_said(tmp_path, capsys):
    args = config.server_parser("").parse_args(["--no-central-eval", "--num-classes", "10", *map(str, CENTRAL)])
    rounds = Rounds(args, RunRecord(tmp_path))
    rounds.record.create({})
    rounds.sampled(2, 2)
    rounds.begin(1)
    bad = [w.copy() for w in rounds.weights]
    bad[0][:] = np.nan
    metrics = {"train_loss": 1.0, "fit_seconds": 1.0, "partition_id": 0, "num_partitions": 2, "partition_scheme": 1,
               "dp_epsilon": 0.106}  # fmt: skip
    assert rounds.screen_updates([("7", bad, 10, metrics)]) == []
    noised = [w + 0.01 for w in rounds.weights]  # what the DP wrapper returns for a mean of stand-ins: noise alone
    rounds.trained(noised, [], rejected=1)
    rounds.evaluated([])
    rounds.end()
    row = rows(tmp_path)[0]
    assert float(row["client_epsilon"]) == pytest.approx(0.106) and row["fit_clients"] == "0"
    assert "a model with the noise alone was released, and counted in epsilon" in capsys.readouterr().out
    assert float(row["epsilon"]) > 0
