"""SecAgg+ in the App: the server sees only each round's sum, on both engines, with a client that drops out."""

import csv
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from conftest import finish, free_port, wait_for_port
from test_app import FLWR_BIN, app_env, flwr_run, run_config
from test_federation import processes_with, rows
from test_new_user import app_run_config

import flags
from federation import model
from pipeline import models

QUANTUM = 16 / 2**22  # SecAgg+'s step: clipping range [-8, 8] over 2**22 levels (Flower's defaults)


def checkpoint(run_dir, r: int) -> list[np.ndarray]:
    """The global model after round r (round 0: the server's seeded initial model, which it does not save)."""
    if r == 0:
        return models.get_weights(model.build("cifar:Net", 10, 32, 0, torch.device("cpu"))[0])
    state = torch.load(run_dir / "checkpoints" / f"round-{r:03d}.pt", weights_only=True)
    return [v.numpy() for v in state.values()]


def client_rows(run_dir) -> list[dict]:
    with (run_dir / "clients.csv").open() as f:
        return list(csv.DictReader(f))


def simulate(tiny, tmp_path, name: str, rounds: int, **extra) -> str:
    """The App on the Simulation Engine with 3 SuperNodes; its log (the run must succeed)."""
    env = app_env(tmp_path / f"home-{name}")
    config = run_config(tiny, tmp_path, rounds=rounds, **{"min-clients": 3, "run-dir": f"'{tmp_path / name}'"}, **extra)
    try:
        code = flwr_run(env, "--run-config", config, "--federation-config", "num-supernodes=3",
                        log=tmp_path / f"{name}.log")  # fmt: skip
    finally:  # the local SuperLink that `flwr run` started detaches: stop it
        for pid in processes_with("flower-superlink", str(tmp_path / f"home-{name}")):
            os.kill(pid, signal.SIGTERM)
    log = (tmp_path / f"{name}.log").read_text()
    assert code == 0, log[-4000:]
    return log


def test_a_secagg_round_on_the_simulation_engine_is_plain_fedavgs_within_the_quantisation_step(tiny, tmp_path):
    simulate(tiny, tmp_path, "plain", 1, screen="'none'")
    weight = 100  # each SuperNode trains on 90 images: a weight limit near them keeps the step fine
    log = simulate(tiny, tmp_path, "secagg", 2, screen="'none'", secagg="true", **{"secagg-max-weight": weight})
    assert log.count("Secure aggregation completed.") == 2, log[-4000:]
    table = rows(tmp_path / "secagg")
    assert [r["fit_clients"] for r in table] == ["3", "3"]
    plain, summed = checkpoint(tmp_path / "plain", 1), checkpoint(tmp_path / "secagg", 1)
    counts = [int(r["num_examples"]) for r in client_rows(tmp_path / "secagg") if r["round"] == "1"]
    # Each client's weighted model is rounded stochastically, by under a step; the mean divides the sum by the weights
    bound = QUANTUM * weight * len(counts) / sum(counts)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(checkpoint(tmp_path / "plain", 0), plain))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(plain, summed))
    assert moved > 100 * bound and worst <= bound * 1.01 + 1e-7, (moved, worst, bound)
    assert {r["verdict"] for r in client_rows(tmp_path / "secagg")} == {"summed"}
    assert float(table[-1]["centralized_accuracy"]) > 0.2


@pytest.mark.parametrize(
    "changes, complaint",
    [
        ({}, 'screen="consensus" needs each one'),
        ({"screen": "none", "strategy": "krum"}, 'strategy="krum" needs each update'),
        ({"screen": "none", "dp": "server-clipping"}, 'use dp="client-clipping"'),
        ({"screen": "none", "min-clients": 1}, "set min-clients to 2 or more"),
        ({"screen": "none", "secagg-shares": 4.0, "min-clients": 9}, "an odd count of neighbours of at least 3"),
        ({"screen": "none", "secagg-shares": 5.0, "min-clients": 3}, "more than a round's min-clients 3"),
        # BatchNorm's step counter passes SecAgg+'s range within a round or two at a client's weight
        ({"screen": "none", "model": "tests.models:BatchNormNet"}, "all trained weights; tests.models:BatchNormNet"),
    ],
)
def test_secagg_beside_what_needs_single_updates_is_refused_in_one_line(tiny, tmp_path, changes, complaint):
    import server_app

    config = app_run_config(secagg=True, **{"data-root": str(tiny), "run-dir": str(tmp_path / "run")}, **changes)
    with pytest.raises(flags.ConfigError) as e:
        server_app.open_app_run(config)
    assert complaint in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def supernode(env: dict, link: str, i: int, log) -> subprocess.Popen:
    """A SuperNode holding partition i of 3, in a process group of its own (with its ClientApps)."""
    return subprocess.Popen(
        [str(FLWR_BIN / "flower-supernode"), "--insecure", "--superlink", link,
         "--node-config", f"partition-id={i} num-partitions=3", "--host", "127.0.0.1", "--port", str(free_port())],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def kill_at_masking(node: subprocess.Popen, log, killed: list) -> None:
    """Kill the SuperNode and its ClientApp once its third SecAgg+ message (the masking stage, which trains)
    has come: its masked update never leaves."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and node.poll() is None:
        if log.read_text().count("Receiving: train message") >= 3:
            os.killpg(node.pid, signal.SIGKILL)
            killed.append(time.monotonic())
            return
        time.sleep(0.02)


def test_a_supernode_killed_mid_round_under_secagg_and_dp_leaves_the_round_to_the_others_as_a_zero_update(
    tiny, tmp_path
):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = app_env(home)
    port = free_port()
    link = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "d"\n\n[superlink.d]\naddress = "{link}"\ninsecure = true\n'
    )
    superlink = subprocess.Popen(
        [str(FLWR_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=(tmp_path / "superlink.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs, killed = [superlink], []
    clip = 0.05
    try:
        wait_for_port("127.0.0.1", port, proc=superlink)
        logs = [tmp_path / f"node{i}.log" for i in range(3)]
        nodes = [supernode(env, link, i, logs[i]) for i in range(3)]
        procs += nodes
        watcher = threading.Thread(target=kill_at_masking, args=(nodes[2], logs[2], killed), daemon=True)
        watcher.start()
        # The defaults but for the DP ones: SecAgg+ over all 3 (threshold 2), central DP clipped on each client
        dp = {"screen": "'none'", "dp": "'client-clipping'", "dp-noise": 0.0, "dp-clip-norm": clip, "threads": 1}
        config = run_config(tiny, tmp_path, rounds=1, **{"min-clients": 2, "secagg": "true"}, **dp)
        began = time.monotonic()
        code = flwr_run(env, "d", "--run-config", config, log=tmp_path / "flwr.log", engine="deployment", timeout=420)
        watcher.join(timeout=5)
    finally:
        for p in procs[1:]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        superlink.terminate()
        finish(procs, timeout=30)
    log = (tmp_path / "flwr.log").read_text()
    assert killed, "the third SuperNode never reached the masking stage"
    assert code == 0, log[-4000:] + (tmp_path / "superlink.log").read_text()[-2000:]
    table = rows(tmp_path / "run")
    assert [(r["fit_clients"], r["rejected"]) for r in table] == [("2", "1")], table  # without the killed node
    assert log.count("Secure aggregation completed.") == 1
    # Round 1 sampled 3: DP's mean counts the dropped one as a zero update, the two others each clipped to C
    moved = np.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(checkpoint(tmp_path / "run", 1),
                                                                     checkpoint(tmp_path / "run", 0))))  # fmt: skip
    assert 0.2 * clip < moved <= clip * 2 / 3 * (1 + 1e-3), moved
    print(f"killed {killed[0] - began:.1f} s after the run began")
