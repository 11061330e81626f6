"""The same code as a Flower App: Simulation Engine and Deployment Engine, real processes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ROOT, finish, free_port, wait_for_port
from test_federation import processes_with, rows
from test_safety import make_certs

FLWR_BIN = Path(sys.executable).parent
pytest.importorskip("ray", reason="the Simulation Engine needs flwr[simulation]")


def app_env(home: Path) -> dict:
    """Flower's state in a temporary home; the app runs in this environment, no `uv sync`."""
    return {
        **ENV,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PATH": f"{FLWR_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_config(tiny, tmp_path, rounds=2, **extra) -> str:
    items = {
        "num-server-rounds": rounds,
        "data-root": f"'{tiny}'",
        "cache-dir": f"'{tmp_path / 'cache'}'",
        "run-dir": f"'{tmp_path / 'run'}'",
        "lr": 0.02,
        "batch-size": 16,
        "local-epochs": 2,
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in items.items())


def flwr_run(env, *args, log: Path, timeout=300, app: Path = ROOT) -> int:
    with log.open("w") as f:
        return subprocess.run(
            [str(FLWR_BIN / "flwr"), "run", str(app), *args, "--stream"],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False,
        ).returncode  # fmt: skip


@pytest.mark.smoke
def test_simulation_engine_runs_the_app_with_partitioned_supernodes(tiny, tmp_path):
    env = app_env(tmp_path / "flwr-home")
    try:
        code = flwr_run(
            env,
            "--run-config", run_config(tiny, tmp_path, **{"min-clients": 3}),
            "--federation-config", "num-supernodes=3",
            log=tmp_path / "flwr.log",
        )  # fmt: skip
    finally:  # the local SuperLink that `flwr run` started detaches: stop it
        for pid in processes_with("flower-superlink", str(tmp_path / "flwr-home")):
            os.kill(pid, signal.SIGTERM)
    log = (tmp_path / "flwr.log").read_text()
    assert code == 0, log[-4000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2] and all(r["fit_clients"] == "3" for r in table)
    assert float(table[-1]["centralized_accuracy"]) > 0.2


def supernode(env: dict, superlink: str, i: int, log: Path, security: list[str]) -> subprocess.Popen:
    """A SuperNode holding partition i of 2."""
    return subprocess.Popen(
        [str(FLWR_BIN / "flower-supernode"), *security, "--superlink", superlink,
         "--node-config", f"partition-id={i} num-partitions=2", "--host", "127.0.0.1", "--port", str(free_port())],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.mark.parametrize("tls", [True], ids=["tls"])  # the insecure path is the same run without certificates
def test_deployment_engine_superlink_and_two_supernodes_run_the_app(tiny, tmp_path, tls):
    home = tmp_path / "flwr-home"
    env = app_env(home)
    # One HTTP port serves the Fleet, Control and Runtime APIs (flwr 1.42)
    port = free_port()
    link = f"127.0.0.1:{port}"
    home.mkdir()
    if tls:
        ca, cert, key = make_certs(tmp_path / "certs")
        link_security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        node_security = ["--root-certificates", str(ca)]
        connection = f'root-certificates = "{ca}"'
    else:
        link_security = node_security = ["--insecure"]
        connection = "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "{link}"\n{connection}\n'
    )
    superlink = subprocess.Popen(
        [str(FLWR_BIN / "flower-superlink"), *link_security, "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=(tmp_path / "superlink.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    nodes = [supernode(env, link, i, tmp_path / f"supernode{i}.log", node_security) for i in range(2)]
    try:
        # `flwr run` needs the SuperLink's API; the ServerApp itself waits for min-clients SuperNodes
        wait_for_port("127.0.0.1", port, proc=superlink)
        code = flwr_run(env, "deploy", "--run-config", run_config(tiny, tmp_path), log=tmp_path / "flwr.log")
    finally:
        for p in [superlink, *nodes]:
            p.terminate()
        finish([superlink, *nodes], timeout=30)
    log = (tmp_path / "flwr.log").read_text()
    assert code == 0, log[-3000:] + (tmp_path / "superlink.log").read_text()[-3000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2] and all(r["fit_clients"] == "2" for r in table)
