"""Flower's strategies in both faces, and every reply screened before any strategy sees it."""

import argparse
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, copy_app
from test_app import app_env, flwr_run, run_config
from test_cifar import one_line_error
from test_federation import federate, processes_with, rows

import cifar
from federation import config, screening
from federation.model import Layout
from federation.records import RunRecord
from federation.rounds import Rounds
from pipeline import models

LEGACY = (
    "flwr.compat",
    "NumPyClient",
    "Client",
    "flwr.server.strategy",
    "ServerAppComponents",
    "server_fn",
    "client_fn",
)


@pytest.mark.parametrize("name", ["server_app.py", "client_app.py"])
def test_the_flower_app_is_built_on_the_message_api_alone(name):
    source = (ROOT / name).read_text()
    assert "@app.main()" in source or ("@app.train(" in source and "@app.evaluate()" in source)  # mods allowed
    for legacy in LEGACY:
        assert not re.search(rf"\b{re.escape(legacy)}\b", source), f"{name} uses {legacy}"


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (("--strategy", "bulyan", "--num-malicious", 1, "--min-clients", 6), "needs --min-clients >= 7"),
        (("--strategy", "krum", "--num-malicious", 2, "--min-clients", 6), "needs --min-clients >= 7"),
        (("--strategy", "fedtrimmedavg", "--trim-beta", 0.5), "--trim-beta"),
        (("--strategy", "fedsgd",), "--strategy"),
    ],
)  # fmt: skip
def test_impossible_strategy_settings_are_one_line_and_exit_code_2(forked, tmp_path, flags, complaint):
    line = one_line_error(forked.run("server.py", *flags, "--no-central-eval", "--run-dir", tmp_path / "run"))
    assert complaint in line and not (tmp_path / "run").exists()


def test_server_py_runs_fedprox_and_its_clients_train_with_the_proximal_term(tiny, tmp_path):
    codes, logs = federate(tmp_path, tiny, [(), ()], server_args=("--strategy", "fedprox", "--proximal-mu", 0.1))
    assert codes == [0, 0, 0], logs[0][-3000:]
    assert [int(r["round"]) for r in rows(tmp_path / "run")] == [1, 2, 3]
    assert all(log.count("proximal mu 0.1") == 3 for log in logs[1:])
    assert float(rows(tmp_path / "run")[-1]["centralized_accuracy"]) > 0.2  # chance is 0.1


@pytest.mark.slow
def test_clients_that_disagree_on_partitioning_are_reported_by_the_server(tiny, tmp_path):
    shares = [
        ("--num-partitions", 2, "--partition-id", i, "--partitioner", p) for i, p in ((0, "iid"), (1, "dirichlet"))
    ]
    codes, logs = federate(tmp_path, tiny, shares, server_args=("--rounds", 1))
    assert codes == [0, 0, 0], logs[0][-3000:]
    assert "Clients disagree on partitioning: clients use different --partitioner" in logs[0]


def test_partitions_from_one_scheme_agree_and_a_duplicate_id_does_not():
    scheme = screening.partition_scheme("iid", 3, 0.5, 0)
    same = {str(i): {"partition_id": i, "num_partitions": 3, "partition_scheme": scheme} for i in range(3)}
    assert screening.partition_conflict(same) is None
    same["2"]["partition_id"] = 1
    assert "same partition" in screening.partition_conflict(same)
    whole = {"a": {"partition_id": -1, "num_partitions": 0}, "b": same["0"]}
    assert "whole set" in screening.partition_conflict(whole)


def test_a_round_whose_every_update_is_rejected_keeps_the_model_and_says_so(tmp_path, caplog):
    args = config.server_parser("").parse_args(["--rounds", "2", "--no-central-eval", "--num-classes", "10"])
    rounds = Rounds(args, RunRecord(tmp_path))
    rounds.record.create({})
    before = [w.copy() for w in rounds.weights]
    rounds.begin(1)
    bad = [w.copy() for w in before]
    bad[0][:] = np.nan
    assert rounds.screen_updates([("7", bad, 10, {}), ("8", before[:-1], 10, {})]) == []  # neither accepted
    rounds.trained(None, [], rejected=2)
    rounds.evaluated([])
    rounds.end()
    assert all(np.array_equal(a, b) for a, b in zip(rounds.weights, before))
    row = rows(tmp_path)[0]
    assert (row["fit_clients"], row["rejected"]) == ("0", "2")
    saved = torch_load(rounds.record.checkpoint(1))
    assert all(np.array_equal(a, b) for a, b in zip(saved, before))
    assert "Rejected update from client 7: array 0 holds NaN" in caplog.text


def torch_load(path: Path) -> list[np.ndarray]:
    import torch

    return [v.numpy() for v in torch.load(path, weights_only=True).values()]


def simulate(tmp_path, tiny, app: Path = ROOT, nodes: int = 3, **config) -> tuple[int, str]:
    """`flwr run` on the Simulation Engine with `nodes` SuperNodes; returns (exit code, log)."""
    env = app_env(tmp_path / "flwr-home")
    try:
        code = flwr_run(
            env,
            "--run-config", run_config(tiny, tmp_path, **{"min-clients": nodes}, **config),
            "--federation-config", f"num-supernodes={nodes}",
            log=tmp_path / "flwr.log", app=app,
        )  # fmt: skip
    finally:  # the local SuperLink that `flwr run` started detaches: stop it
        for pid in processes_with("flower-superlink", str(tmp_path / "flwr-home")):
            os.kill(pid, signal.SIGTERM)
    return code, (tmp_path / "flwr.log").read_text()


@pytest.mark.slow
def test_the_app_screens_a_hostile_node_every_round_and_the_run_completes(tiny, tmp_path):
    app = copy_app(tmp_path / "hostile-app", "hostile_app:app", (ROOT / "tests" / "hostile_app.py",))
    code, log = simulate(tmp_path, tiny, app=app, rounds=4, partitioner="'iid'", holdout=0.2)
    assert code == 0, log[-4000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2, 3, 4]
    assert all((r["fit_clients"], r["rejected"]) == ("2", "1") for r in table)
    for complaint in ("reports metrics", "array 9 holds NaN or Inf", "holds arrays", "claims 1000000000000"):
        assert complaint in log, complaint
    assert log.count("Rejected evaluation from client") == 4
    assert float(table[-1]["centralized_accuracy"]) > 0.3


def strategy_args(name: str) -> argparse.Namespace:
    """The server's flags for `name` with 7 clients, f = 1, the other defaults as the parser gives them."""
    return config.server_parser("test").parse_args(["--strategy", name, "--min-clients", "7", "--num-malicious", "1"])


@pytest.mark.parametrize("name", config.STRATEGIES)
def test_every_strategy_aggregates_seven_updates_in_both_faces(name, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # Messages belong to a run and a sender; a ServerApp sets these
        monkeypatch.setattr(TaskIdentity, key, 1)
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    import server
    import server_app

    start = models.get_weights(cifar.make_net(0, "cpu"))
    layout = Layout.of(cifar.Net(), "cifar:Net")
    rng = np.random.default_rng(0)
    updates = [[w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in start] for _ in range(7)]
    metrics = {"train_loss": 1.0, "fit_seconds": 1.0, "partition_id": 0, "num_partitions": 7, "partition_scheme": 1}

    legacy = server.flower_strategy(strategy_args(name), ndarrays_to_parameters(start))
    legacy.initialize_parameters(None)  # fedadam keeps the current weights from here
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 100, metrics)) for u in updates]
    parameters, _ = legacy.aggregate_fit(1, results, [])
    assert all(np.isfinite(a).all() for a in parameters_to_ndarrays(parameters))

    current = server_app.flower_strategy(strategy_args(name))
    current.current_arrays = {k: w for k, w in zip(layout.keys, start)}  # what configure_train sets
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(layout.state_dict(u)),
                    "metrics": MetricRecord({**metrics, "num-examples": 100}),
                }
            ),
            dst_node_id=i + 1,
            message_type="train",
        )
        for i, u in enumerate(updates)
    ]
    arrays, _ = current.aggregate_train(1, replies)
    assert all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())
