"""Both faces' screening wrappers in process, against numpy: what reaches the strategy, what is recorded."""

import csv
import logging

import numpy as np
import pytest
from conftest import make_image_folder
from test_strategies import krum_pick, strategy_args

from federation import config, robust
from federation.records import RunRecord
from federation.rounds import Rounds, open_run

METRICS = {"train_loss": 1.0, "fit_seconds": 1.0, "partition_id": 0, "num_partitions": 7, "partition_scheme": 1}


def updates_around(start, n, seed=0):
    rng = np.random.default_rng(seed)
    return [[w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in start] for _ in range(n)]


def bad_replies(start):
    nan = [w.copy() for w in start]
    nan[3][0] = np.nan
    return [nan, start[:-1]]  # NaN, and one array short


def rounds_for(tmp_path, *flags) -> Rounds:
    args = config.server_parser("").parse_args(["--no-central-eval", "--num-classes", "10", *map(str, flags)])
    rounds = Rounds(args, RunRecord(tmp_path))
    rounds.record.create({})
    return rounds


def verdicts(tmp_path) -> list[str]:
    with (tmp_path / "clients.csv").open() as f:
        return [r["verdict"] for r in csv.DictReader(f)]


def reference(name, good):
    stack = [np.stack([u[j] for u in good]) for j in range(len(good[0]))]
    if name == "fedmedian":
        return [np.median(s, axis=0) for s in stack]
    flat = np.stack([np.concatenate([a.ravel() for a in u]) for u in good]).astype(np.float64)
    return [s[krum_pick(flat, 1)] for s in stack]


@pytest.mark.parametrize("name", ["fedmedian", "krum"])
def test_server_py_screens_every_reply_then_its_strategy_aggregates_exactly_the_good_ones(tmp_path, name):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from federation import legacy

    rounds = rounds_for(tmp_path, "--strategy", name, "--min-clients", 5, "--num-malicious", 1, "--screen", "none")
    start = rounds.weights
    good = updates_around(start, 5)
    strategy = legacy.Screened(legacy.flower_strategy(strategy_args(name), ndarrays_to_parameters(start)), rounds)
    proxies = [type("Proxy", (), {"cid": f"c{i}"})() for i in range(7)]
    results = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 100, METRICS))
               for p, u in zip(proxies, [*good, *bad_replies(start)])]  # fmt: skip
    rounds.begin(1)
    parameters, _ = strategy.aggregate_fit(1, results, [])
    for got, want in zip(parameters_to_ndarrays(parameters), reference(name, good), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    rounds.evaluated([])
    rounds.end()
    row = RunRecord(tmp_path).rows()[-1]
    assert (row["fit_clients"], row["rejected"]) == ("5", "2") and verdicts(tmp_path) == ["accepted"] * 5 + [
        "rejected"
    ] * 2
    # A round with nothing sound: the model is kept, and the round says 0 clients
    rounds.begin(2)
    parameters, _ = strategy.aggregate_fit(2, results[5:], [])
    assert all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(parameters), rounds.weights))
    assert rounds.row["fit_clients"] == 0 and rounds.row["rejected"] == 2


@pytest.mark.parametrize("name", ["fedmedian", "krum"])
def test_the_apps_server_screens_every_reply_then_its_strategy_aggregates_exactly_the_good_ones(
    tmp_path, name, monkeypatch
):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import server_app

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    rounds = rounds_for(tmp_path, "--strategy", name, "--min-clients", 5, "--num-malicious", 1, "--screen", "none")
    start, layout = rounds.weights, rounds.layout
    good = updates_around(start, 5, seed=1)
    nan, _ = bad_replies(start)  # the short reply is the legacy face's case: the App's arrays go by name
    contents = [RecordDict({"arrays": ArrayRecord(layout.state_dict(u)), "metrics": MetricRecord({**METRICS,
                "num-examples": 100})}) for u in [*good, nan]]  # fmt: skip
    missing = RecordDict(
        {"arrays": ArrayRecord(layout.state_dict(start)), "metrics": MetricRecord({"num-examples": 9})}
    )
    replies = [Message(c, dst_node_id=i + 1, message_type="train") for i, c in enumerate([*contents, missing])]
    strategy = server_app.Screened(server_app.flower_strategy(strategy_args(name)), rounds)
    strategy.inner.current_arrays = ArrayRecord(layout.state_dict(start))
    rounds.begin(1)
    arrays, _ = strategy.aggregate_train(1, replies)
    for got, want in zip(arrays.to_numpy_ndarrays(), reference(name, good), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    rounds.evaluated([])
    rounds.end()
    row = RunRecord(tmp_path).rows()[-1]
    assert (row["fit_clients"], row["rejected"]) == ("5", "2")
    assert sorted(verdicts(tmp_path)) == ["accepted"] * 5 + ["rejected"]  # the reply without metrics: no update


def test_fewer_than_three_updates_get_only_the_size_bound():
    rng = np.random.default_rng(0)
    weights = [np.full(1000, 1.0, np.float32)]
    base = rng.normal(0, 0.1, 1000)
    honest, reversed_ = [(1 + base).astype(np.float32)], [(1 - 5 * base).astype(np.float32)]
    huge = [(1 + 1e3 * base).astype(np.float32)]  # 100 x the global model's norm: over --max-update-norm 10
    two = robust.screen([honest, reversed_], weights, (True,))
    assert all(v.why is None and v.arrays is None for v in two)  # no consensus from two: both pass as sent
    assert "over --max-update-norm" in robust.screen([honest, huge], weights, (True,))[1].why
    three = robust.screen([honest, [(1 + base * 1.1).astype(np.float32)], reversed_], weights, (True,))
    assert "points away" in three[2].why  # from three on, the consensus screen applies


def test_central_dp_averages_with_equal_weights_whatever_the_example_counts(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from federation import legacy

    rounds = rounds_for(tmp_path, "--dp", "server-clipping", "--screen", "none", "--dp-noise", 0,
                        "--dp-clip-norm", 1e6)  # fmt: skip
    start = rounds.weights
    ups = updates_around(start, 2, seed=2)
    args = rounds.args
    strategy = legacy.Screened(legacy.flower_strategy(args, ndarrays_to_parameters(start)), rounds)
    strategy.inner.num_sampled_clients = 2
    strategy.inner.current_round_params = start  # what configure_fit sets
    rounds.sampled(2, 2)
    rounds.begin(1)
    proxies = [type("Proxy", (), {"cid": f"c{i}"})() for i in range(2)]
    results = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), n, METRICS))
               for p, u, n in zip(proxies, ups, (10, 990))]  # fmt: skip
    parameters, _ = strategy.aggregate_fit(1, results, [])
    for got, a, b in zip(parameters_to_ndarrays(parameters), *ups, strict=True):
        np.testing.assert_allclose(got, (a.astype(np.float64) + b) / 2, rtol=1e-5, atol=1e-7)  # not 1:99


def test_dp_sgd_refuses_a_batchnorm_model_in_one_line(forked, tmp_path):
    tiny = make_image_folder(tmp_path / "tiny", n_train=2, n_test=1)
    r = forked.run("client.py", "--dp-sgd", "--model", "tests/models.py:BatchNormNet", "--data-root", tiny,
                   "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert r.returncode == 2 and "DP-SGD (Opacus) cannot train tests/models.py:BatchNormNet" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resuming_fedadam_warns_that_its_moments_restart(tmp_path, caplog):
    rounds = rounds_for(tmp_path / "run", "--strategy", "fedadam")
    rounds.begin(1)
    rounds.trained([w + 0.01 for w in rounds.weights], [(10, METRICS)], 0)
    rounds.evaluated([])
    rounds.end()
    parser = config.server_parser("")
    args = parser.parse_args(["--no-central-eval", "--num-classes", "10", "--strategy", "fedadam", "--rounds", "2",
                              "--run-dir", str(tmp_path / "run")])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="flwr"):
        open_run(parser, args)
    assert "fedadam's server-side moments restart on resume" in caplog.text


def test_an_update_withheld_under_dp_needs_no_losses_but_one_without_them_otherwise_is_rejected(tmp_path, caplog):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    import server_app
    from federation import screening

    private = {k: v for k, v in METRICS.items() if k not in ("train_loss", "fit_seconds")}
    assert screening.metrics_problem({**private, "withheld": 1}) is None
    assert screening.metrics_problem(private) == "sent no train_loss, fit_seconds"
    rounds = rounds_for(tmp_path)
    arrays = ArrayRecord(rounds.layout.state_dict(rounds.weights))
    for metrics, ok in (({**private, "withheld": 1}, True), (private, False)):
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({**metrics, "num-examples": 100})})
        if ok:
            assert server_app.unpack_update(content, rounds.layout)[1] == 100
        else:
            with pytest.raises(ValueError, match="reports metrics"):
                server_app.unpack_update(content, rounds.layout)
    # A withheld evaluation is skipped without a word; a bad one is rejected, and logged
    with caplog.at_level(logging.WARNING):
        assert not rounds.screen_evaluation("c1", 0.0, 100, {"withheld": 1})
    assert "Rejected evaluation" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert not rounds.screen_evaluation("c2", float("nan"), 100, {"accuracy": 0.5})
    assert "Rejected evaluation from client c2" in caplog.text
    assert rounds.screen_evaluation("c3", 1.0, 100, {"accuracy": 0.5})
