"""Differential privacy: the accountant's epsilon, clipping, noise, the budget and resume (real processes)."""

import argparse
import csv
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch
from conftest import finish, free_port, start
from test_app import app_env, flwr_run, run_config
from test_cifar import one_line_error
from test_federation import FAST, data_flags, processes_with, rows

from federation import config, privacy


def reference_epsilons(sigma: float, population: int, sample: int, rounds: int, delta: float = 1e-5) -> list[float]:
    """Central DP's epsilon after each round by dp_accounting alone: m of n clients a round, the Gaussian mean;
    every client each round is the plain Gaussian mechanism, a sample of them amplified (without replacement,
    replace-one neighbours, whose sensitivity is twice add-or-remove's: half the noise multiplier)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    orders = [1 + x / 20 for x in range(1, 200)] + list(range(12, 257, 4))
    if sample == population:
        accountant, event = RdpAccountant(orders), dp_accounting.GaussianDpEvent(sigma)
    else:
        accountant = RdpAccountant(orders, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            population, sample, dp_accounting.GaussianDpEvent(sigma / 2)
        )
    out = []
    for _ in range(rounds):
        accountant.compose(event)
        out.append(accountant.get_epsilon(delta))
    return out


def dp_args(*flags) -> argparse.Namespace:
    return config.server_parser("").parse_args(["--screen", "none", "--no-central-eval", "--num-classes", "10", *flags])


def test_epsilon_of_all_clients_every_round_matches_opacus_rdp_within_one_percent():
    from opacus.accountants import RDPAccountant

    accountant = privacy.Accountant(dp_args("--dp", "server-clipping", "--dp-noise", "1.3", "--dp-delta", "1e-5"))
    accountant.start(population=10, sample=10)  # every client, every round: no amplification
    for _ in range(20):
        ours = accountant.step()
    opacus = RDPAccountant()
    opacus.history = [(1.3, 1.0, 20)]
    theirs = opacus.get_epsilon(1e-5, alphas=list(privacy.ORDERS))
    assert ours == pytest.approx(theirs, rel=0.01), (ours, theirs)


def test_epsilon_of_m_of_n_without_replacement_is_dp_accountings_with_replace_one_and_half_the_noise():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = privacy.Accountant(dp_args("--dp", "server-clipping", "--dp-noise", "1.0"))
    accountant.start(population=100, sample=10)
    for _ in range(30):
        ours = accountant.step()
    # Replacing one client's data moves the sum of clipped updates by up to 2C; the noise's std is sigma*C
    reference = RdpAccountant(
        orders=list(privacy.ORDERS), neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5))
    reference.compose(event, 30)
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert 1 < ours < 100  # subsampling amplifies: without it, 30 releases at sigma 0.5 would cost far more


def test_the_accountants_state_restores_its_epsilon_and_the_budget_says_which_round(tmp_path):
    reference = privacy.Accountant(dp_args("--dp", "server-clipping", "--dp-noise", "4.0"))
    reference.start(100, 10)
    expected = [reference.step() for _ in range(10)]
    budget = (expected[5] + expected[6]) / 2  # enough for 6 rounds, not for 7
    args = dp_args("--dp", "server-clipping", "--dp-noise", "4.0", "--dp-max-epsilon", str(budget))
    accountant = privacy.Accountant(args)
    accountant.start(100, 10)
    spent = [accountant.step() for _ in range(3)]
    accountant.save(tmp_path / "state.json")
    again = privacy.Accountant(args, privacy.load_state(tmp_path / "state.json"))
    assert again.epsilon == spent[-1] == pytest.approx(expected[2]) and again.rounds == 3
    with pytest.raises(privacy.BudgetExhausted, match=f"round 7 would take epsilon past --dp-max-epsilon {budget:g}"):
        for r in range(4, 11):
            again.check(r)
            again.step()
    assert again.epsilon == pytest.approx(expected[5])


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (("--dp", "server-clipping"), "add --screen none"),
        (("--dp", "server-clipping", "--screen", "none", "--strategy", "fedmedian"), "needs a noised mean"),
        (("--dp", "client-clipping", "--screen", "none", "--dp-clipping", "adaptive"), "adaptive is refused"),
        (("--dp", "server-clipping", "--screen", "none", "--dp-noise", 0, "--dp-max-epsilon", 5), "no finite epsilon"),
        (
            ("--dp", "server-clipping", "--screen", "none", "--model", "tests/models.py:BatchNormNet"),
            "needs a model whose arrays are all trained weights",
        ),
    ],
)
def test_settings_privacy_cannot_hold_with_are_refused_at_start_in_one_line(forked, tmp_path, flags, complaint):
    line = one_line_error(
        forked.run("server.py", *flags, "--no-central-eval", "--num-classes", 10, "--run-dir", tmp_path / "r")
    )
    assert complaint in line and not (tmp_path / "r").exists()


def federate(tmp_path, tiny, name: str, server=(), clients=2, client_flags=()):
    """server.py and `clients` partitioned clients, to the end; returns (exit codes, rows, run dir)."""
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    run_dir = tmp_path / name
    procs = [start("server.py", *common, "--min-clients", clients, "--run-dir", run_dir, *server,
                   log=tmp_path / f"{name}.log")]  # fmt: skip
    for i in range(clients):
        procs.append(start("client.py", *common, *FAST, "--threads", 1, "--seed", 0, "--num-partitions", clients,
                           "--partition-id", i, *client_flags, log=tmp_path / f"{name}-{i}.log"))  # fmt: skip
    return finish(procs), rows(run_dir), run_dir


def weights(run_dir, r: int) -> np.ndarray:
    state = torch.load(run_dir / "checkpoints" / f"round-{r:03d}.pt", weights_only=True)
    return np.concatenate([v.numpy().ravel().astype(np.float64) for v in state.values()])


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    """The non-private run both clipping sides are compared with (rows of metrics.csv, and its run dir)."""
    codes, table, run_dir = federate(tmp_path_factory.mktemp("plain"), tiny, "plain", ("--screen", "none"))
    assert codes == [0, 0, 0]
    return table, run_dir


def withheld(run_dir, logs) -> None:
    """Assert that no record holds what no epsilon covers: losses, evaluations, exact example counts."""
    table = rows(run_dir)
    assert all(r["train_loss"] == "" and r["distributed_accuracy"] == "" for r in table), table
    with (run_dir / "clients.csv").open() as f:
        sent = list(csv.DictReader(f))
    assert sent and all(r["train_loss"] == "" and int(r["num_examples"]) % 100 == 0 for r in sent), sent
    for log in logs:  # each client's exact count, from its own log, is not what the server recorded
        text = log.read_text()
        exact = int(re.search(r"Client: (\d+) training", text).group(1))
        assert exact % 100 and "evaluate: withheld under differential privacy" in text


@pytest.mark.parametrize("side", ["server-clipping", "client-clipping"])
def test_without_noise_and_with_a_clip_above_every_update_central_dp_is_the_plain_run(tiny, tmp_path, side, plain):
    private = ("--screen", "none", "--dp", side, "--dp-noise", 0, "--dp-clip-norm", 1e6)
    codes, dp, _ = federate(tmp_path, tiny, "dp", private)
    assert codes == [0, 0, 0]
    # Equal shares: the equal weights of DP's mean are the shares' weights; only float rounding may differ
    for a, b in zip(dp, plain[0], strict=True):
        assert float(a["centralized_loss"]) == pytest.approx(float(b["centralized_loss"]), rel=1e-5)
        assert a["centralized_accuracy"] == b["centralized_accuracy"]
    assert all(r["epsilon"] == "inf" for r in dp)


@pytest.mark.parametrize("side", ["server-clipping", "client-clipping"])
def test_every_aggregated_update_is_within_the_clipping_norm(tiny, tmp_path, side):
    private = ("--screen", "none", "--dp", side, "--dp-noise", 0, "--dp-clip-norm", 0.05)
    codes, _, run_dir = federate(tmp_path, tiny, "dp", private, clients=3)
    assert codes == [0, 0, 0, 0]
    moved = [np.linalg.norm(weights(run_dir, r) - weights(run_dir, r - 1)) for r in (2, 3)]
    assert all(0.01 < m <= 0.05 * (1 + 1e-6) for m in moved), moved  # a mean of updates clipped to 0.05


def test_central_dp_noise_has_the_spread_sigma_c_over_m_and_the_seed_decides_it(tiny, tmp_path):
    # Clients that train 0 epochs send the model back unchanged: what the server releases is the noise alone
    private = ("--screen", "none", "--dp", "server-clipping", "--dp-noise", 2.0, "--dp-clip-norm", 0.1)
    runs = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 1), ("fresh", -1), ("fresh-again", -1)):
        codes, _, run_dir = federate(tmp_path, tiny, name, (*private, "--dp-seed", seed, "--rounds", 1),
                                     client_flags=("--epochs", 0))  # fmt: skip
        assert codes == [0, 0, 0]
        start_dir = run_dir  # round 1's model less the initial one (round 0 is not checkpointed: seed 0's Net)
        import cifar
        from pipeline import models

        initial = np.concatenate([w.ravel().astype(np.float64) for w in models.get_weights(cifar.make_net(0, "cpu"))])
        runs[name] = weights(start_dir, 1) - initial
    assert np.std(runs["a"]) == pytest.approx(2.0 * 0.1 / 2, rel=0.03)  # sigma * C / m
    assert not np.allclose(runs["a"], runs["b"]) and np.array_equal(runs["a"], runs["c"])
    # --dp-seed -1, the default: fresh noise from the operating system, the same spread, no two runs alike
    assert np.std(runs["fresh"]) == pytest.approx(2.0 * 0.1 / 2, rel=0.03)
    assert not np.allclose(runs["fresh"], runs["fresh-again"])
    assert not any(np.allclose(runs[f], runs[s]) for f in ("fresh", "fresh-again") for s in ("a", "b"))


def red_pixels(png) -> int:
    """Pixels of matplotlib's tab:red in a plot: the central-DP epsilon line's colour, no other series'."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(rgb - [214, 39, 40]).sum(axis=2) < 30).sum())


def test_the_budget_stops_the_run_cleanly_and_a_resumed_run_continues_its_epsilon(tiny, tmp_path, plain):
    private = ("--screen", "none", "--dp", "server-clipping", "--dp-noise", 5.0, "--dp-clip-norm", 1.0)
    codes, first, run_dir = federate(tmp_path, tiny, "dp", (*private, "--rounds", 2))
    assert codes == [0, 0, 0]
    spent = [float(r["epsilon"]) for r in first]
    expected = reference_epsilons(5.0, 2, 2, 4)  # both clients every round
    assert spent == pytest.approx(expected[:2], rel=1e-2)
    # The same epsilon in TensorBoard, the summary table and the plot (where the plain run draws none)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    scalars = events.Scalars("epsilon")
    assert [e.step for e in scalars] == [0, 1, 2] and [e.value for e in scalars] == pytest.approx([0, *spent])
    summary = (tmp_path / "dp.log").read_text().splitlines()
    header = next(line for line in summary if line.split()[:1] == ["round"])
    assert "epsilon" in header.split() and any(line.split()[:1] == ["2"] and first[-1]["epsilon"] in line.split()
                                               for line in summary)  # fmt: skip
    assert red_pixels(run_dir / "plot.png") > 200 and red_pixels(plain[1] / "plot.png") == 0
    withheld(run_dir, [tmp_path / f"dp-{i}.log" for i in range(2)])
    # Resumed to 6 rounds with a budget that allows one more: epsilon goes on from round 2's, then the run stops
    budget = (expected[2] + expected[3]) / 2
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--resume", run_dir, "--rounds", 6, "--dp-max-epsilon", budget,
                log=tmp_path / "resumed.log")  # fmt: skip
    clients = [start("client.py", *common, *FAST, "--threads", 1, "--seed", 0, "--num-partitions", 2,
                     "--partition-id", i, log=tmp_path / f"r{i}.log") for i in range(2)]  # fmt: skip
    assert finish([srv, *clients]) == [0, 0, 0], (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    table = rows(run_dir)
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    assert float(table[2]["epsilon"]) == pytest.approx(expected[2], rel=1e-2)
    assert f"Stopped after round 3 of 6: round 4 would take epsilon past --dp-max-epsilon {budget:g}" in log


def test_dp_sgd_clients_report_their_epsilon_and_the_server_records_each(tiny, tmp_path):
    codes, table, run_dir = federate(tmp_path, tiny, "dpsgd", ("--rounds", 2),
                                     client_flags=("--dp-sgd", "--dp-sgd-noise", 1.0, "--dp-sgd-clip", 1.0,
                                                   "--dp-sgd-ledger", tmp_path / "ledger"))  # fmt: skip
    assert codes == [0, 0, 0]
    spent = [float(r["client_epsilon"]) for r in table]
    assert 0 < spent[0] < spent[1] < 50
    clients = (run_dir / "clients.csv").read_text().splitlines()
    assert clients[0].startswith("round,client") and len(clients) == 1 + 2 * 2
    assert all(float(line.split(",")[5]) > 0 for line in clients[1:])
    saved = json.loads((run_dir / "config.json").read_text())["clients_reported"][0]
    assert saved["dp_sgd_noise"] == 1.0 and saved["dp_delta"] == 1e-5
    withheld(run_dir, [tmp_path / f"dpsgd-{i}.log" for i in range(2)])
    assert "Rejected evaluation" not in (tmp_path / "dpsgd.log").read_text()  # withheld is no fault


def simulate(tiny, tmp_path, nodes: int, dp: dict) -> int:
    """The App on the Simulation Engine, 2 rounds with `nodes` SuperNodes and the DP run config; its exit code."""
    env = app_env(tmp_path / "flwr-home")
    try:
        return flwr_run(env, "--run-config", run_config(tiny, tmp_path, rounds=2, **{"min-clients": 2}, **dp),
                        "--federation-config", f"num-supernodes={nodes}", log=tmp_path / "flwr.log")  # fmt: skip
    finally:  # the local SuperLink that `flwr run` started detaches: stop it
        for pid in processes_with("flower-superlink", str(tmp_path / "flwr-home")):
            os.kill(pid, signal.SIGTERM)


def test_central_dp_on_the_simulation_engine_reports_epsilon_every_round(tiny, tmp_path):
    # C small enough that the noise (sigma C / m) leaves a model the clients can train on
    dp = {
        "screen": "'none'",
        "dp": "'server-clipping'",
        "dp-noise": 1.0,
        "dp-clip-norm": 0.01,
        "fraction-fit": 0.5,
        "threads": 1,
    }
    code = simulate(tiny, tmp_path, 4, dp)
    log = (tmp_path / "flwr.log").read_text()
    assert code == 0, log[-4000:]
    table = rows(tmp_path / "run")
    assert all(r["fit_clients"] == "2" for r in table)
    spent = [float(r["epsilon"]) for r in table]
    assert spent == pytest.approx(reference_epsilons(1.0, 4, 2, 2), rel=1e-2)  # 2 of 4 clients a round
    assert "central DP noise with 0.0050 stdev added" in log and math.isfinite(spent[-1])
    # Under DP no record holds a loss, an evaluation or an exact count (each node holds 75 images)
    assert all(r["train_loss"] == "" and r["distributed_accuracy"] == "" for r in table)
    with (tmp_path / "run" / "clients.csv").open() as f:
        assert {r["num_examples"] for r in csv.DictReader(f)} == {"100"}


def test_the_apps_clients_clip_their_own_updates_with_a_small_clipping_norm(tiny, tmp_path):
    dp = {"screen": "'none'", "dp": "'client-clipping'", "dp-noise": 0.0, "dp-clip-norm": 0.05, "threads": 1}
    code = simulate(tiny, tmp_path, 2, dp)
    assert code == 0, (tmp_path / "flwr.log").read_text()[-4000:]
    moved = [np.linalg.norm(weights(tmp_path / "run", 2) - weights(tmp_path / "run", 1))]
    assert all(0.01 < m <= 0.05 * (1 + 1e-6) for m in moved), moved  # a mean of updates each clipped to 0.05
