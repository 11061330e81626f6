"""Safe to expose, hard to break: validated updates, TLS, crashed clients."""

import math
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ENV, ROOT, finish, free_port, run, start, wait_for_port
from test_federation import FAST, data_flags, rows, seeded

import cifar
from federation import screening
from pipeline import models

TEMPLATE = models.get_weights(cifar.Net())


@pytest.mark.parametrize(
    "change, examples, complaint",
    [
        (lambda w: w[:-1], 10, "sent 9 arrays"),
        (lambda w: [np.zeros((2, 2), np.float32)] + w[1:], 10, "array 0 is float32[2, 2]"),
        (lambda w: w[:3] + [w[3].astype(np.float64)] + w[4:], 10, "array 3 is float64"),
        (lambda w: w[:2] + [np.full_like(w[2], np.nan)] + w[3:], 10, "NaN or Inf"),
        (lambda w: w[:5] + [np.full_like(w[5], np.inf)] + w[6:], 10, "NaN or Inf"),
        (lambda w: w, 0, "claims 0 examples"),
        (lambda w: w, -5, "claims -5 examples"),
        (lambda w: w, 10**12, "claims 1000000000000 examples"),
    ],
)
def test_every_kind_of_bad_update_is_named(change, examples, complaint):
    assert complaint in screening.update_problem(change(list(TEMPLATE)), TEMPLATE, examples)


def test_a_sound_update_passes():
    assert screening.update_problem([w * 0.5 for w in TEMPLATE], TEMPLATE, 500) is None


@pytest.mark.parametrize(
    "loss, examples, metrics",
    [(math.nan, 10, {"accuracy": 0.5}), (math.inf, 10, {"accuracy": 0.5}), (-1.0, 10, {"accuracy": 0.5}),
     (1.0, 10, {"accuracy": 1.5}), (1.0, 10, {"accuracy": -0.1}), (1.0, 10, {}), (1.0, 0, {"accuracy": 0.5})],
)  # fmt: skip
def test_every_kind_of_bad_evaluation_is_refused(loss, examples, metrics):
    assert screening.evaluation_problem(loss, examples, metrics) is not None
    assert screening.evaluation_problem(1.0, 10, {"accuracy": 0.5}) is None


@pytest.fixture(scope="module")
def honest_only(tiny, tmp_path_factory):
    """The honest clients alone for 3 rounds (rows of metrics.csv), run once per number of clients."""
    runs = {}

    def get(honest: int = 2) -> list[dict]:
        if honest not in runs:
            codes, table, log = three_rounds(tmp_path_factory.mktemp("honest"), "honest", honest=honest)
            assert codes == [0] * (honest + 1), log[-3000:]
            runs[honest] = table
        return runs[honest]

    return get


def three_rounds(tmp_path, name, hostile=(), honest=2, server_args=()):
    """Honest partitioned clients (plus hostile ones) for 3 rounds; returns exit codes, metrics rows, server log."""
    address = f"127.0.0.1:{free_port()}"
    base = tmp_path / name
    base.mkdir()
    common = ("--server-address", address, *data_flags(tmp_path.parent / "tiny0", tmp_path / "cache"))
    n = honest + len(hostile)
    procs = [
        start("server.py", *common, "--min-clients", n, "--run-dir", base / "run", *server_args,
              log=base / "server.log")
    ]  # fmt: skip
    for i in range(honest):
        procs.append(
            start("client.py", *common, *FAST, "--threads", 1, "--num-partitions", honest, "--partition-id", i, "--seed", 0,
                  log=base / f"client{i}.log")
        )  # fmt: skip
    for j, (updates, evals) in enumerate(hostile):
        log = (base / f"hostile{j}.log").open("w")
        procs.append(
            subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_client.py"), address, updates, evals],
                             env=ENV, stdout=log, stderr=subprocess.STDOUT)
        )  # fmt: skip
    codes = finish(procs)
    return codes, rows(base / "run"), (base / "server.log").read_text()


def test_hostile_clients_are_rejected_and_the_honest_result_is_unchanged(tiny, tmp_path, honest_only):
    hostile = [("shape,nan,examples0", "nanloss,accuracy5,examples0"), ("count,inf,dtype", "accuracy5,nanloss,nanloss")]
    codes, attacked, log = three_rounds(tmp_path, "attacked", hostile)
    assert codes == [0, 0, 0, 0, 0], log[-3000:]
    assert log.count("Rejected update from") == 6 and log.count("Rejected evaluation from") == 6
    assert [r["rejected"] for r in attacked] == ["2", "2", "2"]
    honest = honest_only()
    for a, h in zip(attacked, honest, strict=True):
        for key in ("centralized_accuracy", "distributed_accuracy"):
            assert float(a[key]) == pytest.approx(float(h[key]), abs=1e-3)
        assert math.isfinite(float(a["centralized_loss"]))


def test_a_client_killed_mid_round_is_a_failure_and_the_run_finishes_with_the_rest(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--min-clients", 2, "--run-dir", tmp_path / "run", log=tmp_path / "server.log")
    honest = [start("client.py", *common, *FAST, *seeded(i), log=tmp_path / f"c{i}.log") for i in range(2)]
    # The victim's fit is long, so it is surely mid-round when it dies
    victim = start("client.py", *common, "--lr", 0.001, "--epochs", 500, log=tmp_path / "victim.log")
    deadline = time.monotonic() + 120
    while "Received: train message" not in (tmp_path / "victim.log").read_text():  # Flower logs it as fit starts
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    assert finish([srv, *honest]) == [0, 0, 0], (tmp_path / "server.log").read_text()[-3000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    # The round it died in aggregates whoever else was sampled; later rounds both honest clients
    assert sum(int(r["rejected"]) for r in table) == 1 and all(int(r["fit_clients"]) >= 1 for r in table)
    assert table[-1]["fit_clients"] == "2"


def make_certs(out, hosts=("localhost", "127.0.0.1")):
    r = run("certs.py", "--out", out, "--hosts", *hosts)
    assert r.returncode == 0, r.stderr
    return out / "ca.crt", out / "server.crt", out / "server.key"


def test_a_tls_run_completes_and_a_client_with_the_wrong_ca_is_refused(tiny, tmp_path):
    ca, cert, key = make_certs(tmp_path / "certs")
    wrong_ca, _, _ = make_certs(tmp_path / "other")
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--rounds", 1, "--certificates", ca, cert, key, "--run-dir", tmp_path / "run",
                log=tmp_path / "server.log")  # fmt: skip
    wait_for_port("127.0.0.1", int(address.rpartition(":")[2]), proc=srv)  # refused by the server, not absent
    intruder = run("client.py", *common, "--root-certificates", wrong_ca, "--connect-timeout", 5, timeout=60)
    assert intruder.returncode == 1 and "Traceback" not in intruder.stderr
    assert f"a server listens at {address}, but no TLS connection was made within 5 s" in intruder.stderr
    clients = [
        start("client.py", *common, *FAST, *seeded(i), "--root-certificates", ca, log=tmp_path / f"c{i}.log")
        for i in range(2)
    ]
    assert finish([srv, *clients]) == [0, 0, 0], (tmp_path / "server.log").read_text()[-3000:]
    assert "SSL is enabled" in (tmp_path / "server.log").read_text()
    assert len(rows(tmp_path / "run")) == 1


def test_certs_refuses_to_overwrite_existing_keys(tmp_path):
    make_certs(tmp_path / "certs")
    r = run("certs.py", "--out", tmp_path / "certs")
    assert r.returncode == 2 and "not empty" in r.stderr


def test_listening_beyond_loopback_without_tls_warns(forked, tmp_path):
    r = forked.run("server.py", "--server-address", f"0.0.0.0:{free_port()}", "--data-root", tmp_path / "nope" , "--cache-dir", "",
            env={"https_proxy": "http://127.0.0.1:9"})  # fmt: skip
    assert "without TLS" in r.stderr


@pytest.mark.parametrize(
    "script, args, complaint",
    [
        ("client.py", ["--partition-id", "2", "--num-partitions", "2"], "--partition-id 2 is not in 0..1"),
        ("client.py", ["--partition-id", "0"], "go together"),
        ("client.py", ["--alpha", "0"], "--alpha"),
        ("client.py", ["--root-certificates", "/no/such/ca.crt"], "file not found"),
        ("server.py", ["--certificates", "a", "b", "c"], "file not found"),
        ("server.py", ["--resume", "/no/such/run"], "not a run directory"),
        ("run.py", ["--clients", "0"], "--clients"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(script, args, complaint):
    r = run(script, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and complaint in r.stderr, r.stderr


def test_fifty_clients_on_one_server_are_all_aggregated_every_round(tiny, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    r = run("bench.py", "--out", report, "load", "--data-root", tiny, "--cache-dir", tmp_path / "cache",
            "--clients", 50, "--shares", 50, "--rounds", 2, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = report.read_text()
    assert "Every round aggregated all 50 clients: **yes**" in text
    assert text.count("| 50 | 0 |") == 2  # two rounds, 50 aggregated, none rejected


POISON = ("far1e4,far1e4,far1e4", "honest,honest,honest")  # a model-replacement attack, every round


def test_a_poisoner_far_from_the_others_is_screened_out_and_the_honest_result_is_unchanged(tiny, tmp_path, honest_only):
    codes, attacked, log = three_rounds(tmp_path, "attacked", [POISON])
    assert codes == [0, 0, 0, 0], log[-3000:]
    assert log.count("it moves the model 1e+04, over --max-update-norm 10 x the global model's norm") == 3
    assert [(r["fit_clients"], r["rejected"]) for r in attacked] == [("2", "1")] * 3
    honest = honest_only()
    assert [r["centralized_accuracy"] for r in attacked] == [r["centralized_accuracy"] for r in honest]


def test_a_closer_poisoner_is_rejected_or_clipped_by_the_consensus_screen_every_round(tiny, tmp_path):
    codes, attacked, log = three_rounds(tmp_path, "attacked", [("far50,far50,far50", "honest,honest,honest")])
    assert codes == [0, 0, 0, 0], log[-3000:]
    assert "over --max-update-norm" not in log  # within the size bound: the consensus screen's to catch
    # An honest update beyond the median distance is clipped too, logged as info; one from far out warns
    far = [line for line in log.splitlines() if "Clipped update from client" in line and "WARNING" in line]
    assert log.count("points away from the round's consensus") + len(far) == 3, log[-3000:]
    assert float(attacked[-1]["centralized_accuracy"]) > 0.3
