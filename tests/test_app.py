"""The same code as a Flower App: Simulation Engine and Deployment Engine, real processes."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ROOT, free_port
from test_federation import processes_with, rows

FLWR_BIN = Path(sys.executable).parent


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


def flwr_run(env, *args, log: Path, timeout=300, app: Path = ROOT, engine: str = "simulation") -> int:
    """`flwr run` of the App, its output in `log`; a simulation skips the test where Ray is not installed."""
    if engine == "simulation" and importlib.util.find_spec("ray") is None:
        pytest.skip("the Simulation Engine needs flwr[simulation] (Ray)")
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


# The Deployment Engine (a SuperLink with TLS and SuperNodes that authenticate): tests/test_auth.py


# Where the App's run config means to differ from the scripts' flags: TOML has no None
RUN_CONFIG_OWN = {
    "threads": 0,  # the flag's None: 0 means the same (the cores shared among the clients)
    "seed": 0,  # the tutorial's client.py is unseeded (random); a simulation repeats exactly
}


def test_the_apps_run_config_holds_the_scripts_defaults():
    import tomllib

    import client_app
    import server_app
    from federation import config

    toml = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    faces = ((config.server_parser("s"), server_app.RENAMES), (config.client_parser("c"), client_app.RENAMES))
    differ, checked = {}, set()
    for parser, renames in faces:
        actions = parser._option_string_actions
        for key, value in toml.items():
            flag = renames.get(key, key)
            if flag is None or f"--{flag}" not in actions:
                continue
            checked.add(key)
            default = parser.get_default(actions[f"--{flag}"].dest)
            if default != value:  # 1 == 1.0 in Python: an int written for a float flag is the same value
                differ[key] = (value, default)
    assert {k: v for k, (v, _) in differ.items()} == RUN_CONFIG_OWN, differ
    assert {"clip-factor", "min-cosine", "max-update-norm", "screen", "lr", "num-server-rounds"} <= checked
