"""What a new user meets in the second hour: defaults, records, stopping, repeating (real processes)."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ENV, ROOT, finish, free_port, run, script_cmd, start
from test_app import app_env, flwr_run
from test_cifar import one_line_error
from test_federation import FAST, data_flags, federate, processes_with, rows, wait_for_line

import cifar
import flags
from federation.records import RunRecord
from pipeline import batches, cache, sources


def simulate(tmp_path, env, config: str, nodes: int = 2, log: str = "flwr.log") -> tuple[int, str]:
    try:
        code = flwr_run(env, "--run-config", config, "--federation-config", f"num-supernodes={nodes}",
                        log=tmp_path / log)  # fmt: skip
    finally:
        for pid in processes_with("flower-superlink", env["FLWR_HOME"]):
            os.kill(pid, signal.SIGTERM)
    return code, (tmp_path / log).read_text()


def untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


def test_app_runs_go_under_home_each_new_one_trains_and_a_continued_one_refuses_changed_client_settings(tiny, tmp_path):
    home = tmp_path / "home"
    env = {**app_env(tmp_path / "flwr-home"), "HOME": str(home)}
    before = untracked()
    data = f"data-root='{tiny}' cache-dir='{tmp_path / 'cache'}' local-epochs=1"
    config = f"num-server-rounds=1 {data}"
    try:
        code, log = simulate(tmp_path, env, config)
        assert code == 0, log[-3000:]
        runs = sorted((home / "flower-cifar" / "runs").iterdir())
        assert len(runs) == 1 and [int(r["round"]) for r in RunRecord(runs[0]).rows()] == [0, 1]
        assert untracked() == before  # nothing written into the project
        clients = json.loads((runs[0] / "config.json").read_text())["clients"]  # the clients' settings too
        assert clients["lr"] == 0.001 and clients["epochs"] == 1 and clients["partitioner"] == "iid"
        # A second run with no run-dir is a new run, here with another of Flower's strategies
        code, log = simulate(tmp_path, env, config + " strategy='fedmedian'", log="second.log")
        assert code == 0 and "already completed" not in log and "FedMedian" in log, log[-3000:]
        second = sorted(set((home / "flower-cifar" / "runs").iterdir()) - set(runs))
        assert len(second) == 1 and RunRecord(second[0]).config()["strategy"] == "fedmedian"
        # Continuing the first run with another client learning rate is refused, and Flower marks the run failed
        code, log = simulate(tmp_path, env, f"num-server-rounds=2 {data} lr=0.05 run-dir='{runs[0]}'",
                             log="changed.log")  # fmt: skip
        assert f"run-dir {runs[0]} holds a run with lr 0.001, not 0.05" in log, log[-3000:]
        assert [int(r["round"]) for r in rows(runs[0])] == [1]
        status = subprocess.run([str(Path(env["PATH"].split(os.pathsep)[0]) / "flwr"), "ls", "--format", "json"],
                                env=env, capture_output=True, text=True, check=False)  # fmt: skip
        # Flower's record of the three runs: the two new ones completed, the refused continuation failed
        statuses = sorted(r["status"] for r in json.loads(status.stdout)["runs"])
        assert statuses == ["finished:completed", "finished:completed", "finished:failed"], status.stdout[-2000:]
    finally:  # `flwr ls` may have started a local SuperLink of its own
        for pid in processes_with("flower-superlink", env["FLWR_HOME"]):
            os.kill(pid, signal.SIGTERM)


def app_run_config(**changes) -> dict:
    """pyproject.toml's run config, as the ServerApp's context holds it, with some keys changed."""
    import tomllib

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **changes}


def test_app_config_errors_are_worded_with_the_run_configs_keys(tiny, tmp_path):
    import server_app

    with pytest.raises(flags.ConfigError) as e:
        server_app.open_app_run(app_run_config(**{"data-root": str(tmp_path / "no" / "such"),
                                                  "run-dir": str(tmp_path / "run")}))  # fmt: skip
    assert "or set central-eval=false" in str(e.value) and "--data-root" not in str(e.value)
    with pytest.raises(flags.ConfigError, match="run config key lr: '0' is not a number > 0"):
        server_app.open_app_run(app_run_config(lr=0, **{"data-root": str(tiny), "run-dir": str(tmp_path / "run")}))
    assert not (tmp_path / "run").exists()


@pytest.mark.smoke
def test_the_tutorials_two_clients_without_seeds_train_differently(tiny, tmp_path):
    # The README's three terminals, as typed: no seeds, no partitions
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    procs = [start("server.py", *common, "--rounds", 2, "--run-dir", tmp_path / "run", log=tmp_path / "s.log")]
    procs += [start("client.py", *common, *FAST, log=tmp_path / f"c{i}.log") for i in range(2)]
    assert finish(procs) == [0, 0, 0], (tmp_path / "s.log").read_text()[-3000:]
    fits = [[line for line in (tmp_path / f"c{i}.log").read_text().splitlines() if line.startswith("fit:")]
            for i in range(2)]  # fmt: skip
    assert len(fits[0]) == 2 and fits[0][0].split("loss")[1] != fits[1][0].split("loss")[1]
    assert "(random; --seed N repeats it)" in (tmp_path / "c0.log").read_text()
    assert "identical updates" not in (tmp_path / "s.log").read_text()


def test_seeded_run_py_federations_repeat_exactly(tiny, tmp_path):
    tables = []
    for name in ("a", "b"):
        r = run("run.py", "--clients", 2, "--rounds", 2, "--run-dir", tmp_path / name,
                *data_flags(tiny, tmp_path / "cache"), *FAST, timeout=240)  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:]
        tables.append([{k: v for k, v in row.items() if "seconds" not in k} for row in rows(tmp_path / name)])
    assert tables[0] == tables[1]


@pytest.mark.parametrize(
    "signum, code, word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_client_stopped_mid_training_says_so_in_one_line(tiny, tmp_path, signum, code, word):
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--min-clients", 1, "--run-dir", tmp_path / "run", log=tmp_path / "s.log")
    client = start("client.py", *common, "--epochs", 500, log=tmp_path / "c.log")
    try:
        wait_for_line(tmp_path / "c.log", "Received: train message", client)
        client.send_signal(signum)
        assert finish([client], timeout=30) == [code]
    finally:
        srv.kill()
        srv.wait()
    out = (tmp_path / "c.log").read_text()
    assert out.rstrip().endswith(f"client.py: {word}") and "Traceback" not in out, out[-2000:]


def test_a_client_whose_server_is_stopped_says_so_in_one_line(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--rounds", 500, "--min-clients", 1, "--run-dir", tmp_path / "run",
                log=tmp_path / "s.log")  # fmt: skip
    client = start("client.py", *common, *FAST, log=tmp_path / "c.log")
    wait_for_line(tmp_path / "c.log", "Received: evaluate message", client)
    srv.send_signal(signal.SIGTERM)
    assert finish([srv, client], timeout=60)[1] == 1
    out = (tmp_path / "c.log").read_text()
    assert "Traceback" not in out and out.rstrip().splitlines()[-1].startswith("client.py: error: lost the server")


def test_the_records_name_the_run_start_at_round_0_keep_tensorboard_events_and_the_checkpoint_it_reports(
    tiny, tmp_path
):
    codes, logs = federate(tmp_path, tiny, [(), ()], server_args=("--rounds", 2, "--strategy", "fedmedian"))
    assert codes == [0, 0, 0], logs[0][-3000:]
    table = RunRecord(tmp_path / "run").rows()
    assert [r["round"] for r in table] == ["0", "1", "2"] and {r["strategy"] for r in table} == {"fedmedian"}
    assert float(table[0]["centralized_accuracy"]) == pytest.approx(0.1, abs=0.05)  # the untrained model
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["layout"]["parameters"] == 62_006 and saved["strategy"] == "fedmedian"
    assert {c["lr"] for c in saved["clients_reported"]} == {0.01} and saved["clients_reported"][0]["epochs"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("centralized_accuracy")] == [0, 1, 2]
    assert "Round 0 (the initial model): centralized accuracy" in logs[0]
    # The last checkpoint is the model the last round reported on
    net = cifar.Net()
    net.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "round-002.pt", weights_only=True))
    data = sources.load_arrays(tiny, tmp_path / "cache")
    loss, accuracy = cifar.test(net, batches.Batches(batches.normalize(data.test_x, "cpu"), data.test_y, 1000), "cpu")
    assert accuracy == pytest.approx(float(table[-1]["centralized_accuracy"]), abs=1e-6)
    assert loss == pytest.approx(float(table[-1]["centralized_loss"]), rel=1e-4)


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--clients", "2", "--strategy", "bulyan", "--num-malicious", "1"], "bulyan with --num-malicious 1 needs"),
        (["--partitioner", "none", "--alpha", "0.1"], "--alpha applies to --partitioner dirichlet only"),
    ],
)
def test_run_py_refuses_bad_combinations_in_one_line_and_leaves_nothing(tmp_path, args, complaint):
    r = subprocess.run(script_cmd("run.py", *args), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    line = one_line_error(r)
    assert complaint in line and list(tmp_path.iterdir()) == []  # not even runs/<date-time>/


def test_decoding_shows_progress_and_the_cache_keeps_the_three_most_recently_used(tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "d", 3, 1)
    r = run("cifar.py", "--data-root", folder, "--cache-dir", tmp_path / "cache", "--epochs", 0)
    assert "Decoding 40 images: 100%" in r.stdout
    for i in range(5):  # five more caches, of the same images at other sizes
        sources.load_arrays(folder, tmp_path / "cache", image_size=32 + i)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == cache.CACHE_KEEP == 3
