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


def test_server_py_keeps_the_model_when_every_update_of_a_round_is_rejected(tiny, tmp_path):
    model = ("--model", "tests/models.py:RunawayBuffer")  # its batches of 2 blow it up: the update is rejected
    codes, logs = federate(tmp_path, tiny, [(*model, "--batch-size", 2)], ("--rounds", 1, "--min-clients", 1, *model))
    assert codes == [0, 0], logs[0][-3000:]
    (row,) = rows(tmp_path / "run")
    assert (row["fit_clients"], row["rejected"]) == ("0", "1") and "(no update accepted: model kept)" in logs[0]
    kept = torch_load(RunRecord(tmp_path / "run").checkpoint(1))
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from models import RunawayBuffer

    initial = models.get_weights(models.build(RunawayBuffer, 10, 32, seed=0))  # the server's seeded round-0 model
    assert len(kept) == len(initial) and all(np.array_equal(a, b) for a, b in zip(kept, initial))


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


def strategy_args(name: str, *extra: str) -> argparse.Namespace:
    """The server's flags for `name` with 7 clients, f = 1, the other defaults as the parser gives them."""
    return config.server_parser("test").parse_args(
        ["--strategy", name, "--min-clients", "7", "--num-malicious", "1", *extra]
    )


# numpy references, written from the papers' definitions, over updates stacked as [client, ...] arrays
def krum_pick(flat: np.ndarray, f: int) -> int:
    """Krum (Blanchard et al. 2017): the update with the least sum of squared distances to its n-f-2 nearest."""
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    k = max(1, len(flat) - f - 2)
    return int(np.argmin([np.sort(np.delete(row, i))[:k].sum() for i, row in enumerate(d)]))


def reference(name: str, updates: list[list[np.ndarray]], counts: list[int], start, beta=0.2, f=1, eta=0.01):
    stack = [np.stack([u[j] for u in updates]).astype(np.float64) for j in range(len(start))]
    flat = np.stack([np.concatenate([a.ravel() for a in u]) for u in updates]).astype(np.float64)
    n = np.array(counts, dtype=np.float64)
    mean = [np.tensordot(n / n.sum(), s, axes=1) for s in stack]
    if name in ("fedavg", "fedprox"):
        return mean
    if name == "fedadam":  # one Adam step from the start (beta1 0.9, beta2 0.99, tau 1e-9), bias-corrected
        step = eta * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
        return [w + step * 0.1 * (m - w) / (np.sqrt(0.01 * (m - w) ** 2) + 1e-9) for w, m in zip(start, mean)]
    if name == "fedmedian":
        return [np.median(s, axis=0) for s in stack]
    if name == "fedtrimmedavg":
        cut = int(beta * len(updates))
        return [np.sort(s, axis=0)[cut : len(updates) - cut].mean(axis=0) for s in stack]
    if name == "krum":
        return [s[krum_pick(flat, f)] for s in stack]
    assert name == "bulyan"  # El Mhamdi et al. 2018: theta = n-2f picked by Krum, then beta = theta-2f closest
    left, chosen = list(range(len(updates))), []
    for _ in range(len(updates) - 2 * f):
        best = left[krum_pick(flat[left], f)]
        chosen.append(best)
        left.remove(best)
    keep = len(chosen) - 2 * f
    out = []
    for s in stack:
        picked = s[chosen]
        order = np.argsort(np.abs(picked - np.median(picked, axis=0)), axis=0, kind="stable")[:keep]
        out.append(np.take_along_axis(picked, order, axis=0).mean(axis=0))
    return out


# Each strategy, and the settings that must reach it (a trim of 2 of 7 per side, not the default's 1; Krum's f)
CASES = {**{name: () for name in config.STRATEGIES}, "fedtrimmedavg-0.3": ("--trim-beta", "0.3"),
         "krum-f2": ("--num-malicious", "2")}  # fmt: skip
# Krum's updates: along one line, where each f (0, 1, 2) picks another one (Krum's score sums n-f-2 distances)
KRUM_LINE = [0.0, 0.1, 0.5, 1.2, 1.3, 1.6, 1.8]


@pytest.mark.parametrize("case", CASES)
def test_every_strategy_aggregates_as_its_numpy_reference_in_both_faces(case, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # Messages belong to a run and a sender; a ServerApp sets these
        monkeypatch.setattr(TaskIdentity, key, 1)
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    import server_app
    from federation.legacy import flower_strategy

    name, flags = case.split("-")[0], CASES[case]
    start = models.get_weights(cifar.make_net(0, "cpu"))
    layout = Layout.of(cifar.Net(), "cifar:Net")
    rng = np.random.default_rng(0)
    # Spread apart (one update far off) and weighted unequally, so that every rule gives another answer
    updates = [[w + rng.normal(0, 0.01 * (1 + 5 * (i == 6)), w.shape).astype(w.dtype) for w in start]
               for i in range(7)]  # fmt: skip
    given = dict(zip(flags[::2], flags[1::2]))
    beta, f = float(given.get("--trim-beta", 0.2)), int(given.get("--num-malicious", 1))
    if name == "krum":
        direction = [rng.normal(0, 1, w.shape) for w in start]
        norm = np.sqrt(sum(float((d**2).sum()) for d in direction))
        updates = [[(w + 0.1 * x * d / norm + rng.normal(0, 1e-6, w.shape)).astype(w.dtype)
                    for w, d in zip(start, direction)] for x in KRUM_LINE]  # fmt: skip
        flat = np.stack([np.concatenate([a.ravel() for a in u]) for u in updates]).astype(np.float64)
        assert krum_pick(flat, f) != krum_pick(flat, 0)  # f matters here: a strategy without it picks another
    counts = [100 * (i + 1) for i in range(7)]
    want = reference(name, updates, counts, start, beta=beta, f=f)
    assert max(np.abs(a - b).max() for a, b in zip(want, start)) > 1e-3  # the reference moved the model
    metrics = {"train_loss": 1.0, "fit_seconds": 1.0, "partition_id": 0, "num_partitions": 7, "partition_scheme": 1}

    legacy = flower_strategy(strategy_args(name, *flags), ndarrays_to_parameters(start))
    legacy.initialize_parameters(None)  # fedadam keeps the current weights from here
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), n, metrics))
               for u, n in zip(updates, counts)]  # fmt: skip
    parameters, _ = legacy.aggregate_fit(1, results, [])
    for got, expected in zip(parameters_to_ndarrays(parameters), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)

    current = server_app.flower_strategy(strategy_args(name, *flags))
    current.current_arrays = {k: w for k, w in zip(layout.keys, start)}  # what configure_train sets
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord(layout.state_dict(u)), "metrics": MetricRecord({**metrics, "num-examples": n})}),
            dst_node_id=i + 1,
            message_type="train",
        )
        for i, (u, n) in enumerate(zip(updates, counts))
    ]  # fmt: skip
    arrays, _ = current.aggregate_train(1, replies)
    for got, expected in zip(arrays.to_numpy_ndarrays(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
