"""Shared fixtures: tiny learnable image folders, real CIFAR-10 subsets, real processes."""

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Ten well-separated colours: class k is colour k plus noise, learnable in a few epochs
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128],
     [170, 110, 40], [255, 250, 200]]
)  # fmt: skip
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="the whole suite, not only the smoke tier")


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: part of the smoke tier that plain `pytest` runs (under 2 minutes)")


def pytest_collection_modifyitems(config, items):
    """Plain `pytest` runs the smoke tier; `pytest --full` (and .ci/run) everything."""
    if (
        config.getoption("--full")
        or config.getoption("keyword")
        or config.args_source != pytest.Config.ArgsSource.TESTPATHS
    ):
        return  # tests asked for by file or name run whatever their tier
    smoke = [item for item in items if item.get_closest_marker("smoke")]
    config.hook.pytest_deselected(items=[item for item in items if not item.get_closest_marker("smoke")])
    items[:] = smoke


def pytest_report_header(config):
    if not config.getoption("--full") and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        return "smoke tier: the tutorial's scripts end to end and one test per face; `pytest --full` runs everything"


def make_image_folder(
    root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0, classes: int = 10, size: int = 32
) -> Path:
    """Write root/{train,test}/<class>/*.png: colour classes (ten by default) with pixel noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, colour in enumerate(PALETTE[:classes]):
            d = root / split / f"class{k:02d}" if classes > 10 else root / split / f"class{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny learnable image-folder dataset (300 train, 100 test images)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory) -> Path:
    """Real CIFAR-10 from ../shared: 500 train and 100 test images per class."""
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"real CIFAR-10 copy not found at {SHARED_CIFAR}")
    out = tmp_path_factory.mktemp("cifar")
    limits = {"train": 500, "test": 100}
    with tarfile.open(SHARED_CIFAR) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/NNNN.jpg
            if member.isfile() and len(parts) == 4 and int(Path(parts[3]).stem) < limits[parts[1]]:
                tar.extract(member, out, filter="data")
    return out / "cifar10-jpeg"


def copy_app(dst: Path, clientapp: str, extra: tuple[Path, ...] = ()) -> Path:
    """A copy of the Flower App (its modules and packages) whose ClientApp is `clientapp` ("module:app")."""
    dst.mkdir()
    for f in [*ROOT.glob("*.py"), *extra]:
        shutil.copy(f, dst)
    for package in ("pipeline", "federation"):
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    toml = (ROOT / "pyproject.toml").read_text().replace('"client_app:app"', f'"{clientapp}"')
    (dst / "pyproject.toml").write_text(toml)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 60, proc: subprocess.Popen | None = None) -> float:
    """Seconds until `host:port` accepts a TCP connection; fails the test after `timeout` or if `proc` exits."""
    began = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return time.monotonic() - began
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the process meant to listen on {host}:{port} exited with {proc.returncode}")
            if time.monotonic() - began > timeout:
                raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def script_cmd(script: str, *args) -> list[str]:
    """The command line that runs one of the project's scripts with this Python."""
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run(script: str, *args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts to completion and capture its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def start(script: str, *args, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start one of the project's scripts in the background, output to `log`."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT, env=env or ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[int]:
    """Wait for every process; kill them all if any outlives the timeout."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class Forked:
    """The project's scripts, each run in a fork of one interpreter that has imported torch and Flower
    (tests/forkrun.py): a process of its own with its own exit code and output, without the 3-4 s
    import. For the many tests that only watch a script refuse its input."""

    def __init__(self) -> None:
        self.worker: subprocess.Popen | None = None

    def run(
        self, script: str, *args, cwd: Path = ROOT, env: dict | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """`script` with `args`, in `cwd`, with `env`'s variables added to the test environment's."""
        if self.worker is None or self.worker.poll() is not None:
            self.worker = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "forkrun.py")], cwd=ROOT, env=ENV, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
        argv = [str(a) for a in args]
        self.worker.stdin.write(json.dumps({"script": script, "args": argv, "cwd": str(cwd), "env": env or {}}) + "\n")
        self.worker.stdin.flush()
        ready, _, _ = select.select([self.worker.stdout], [], [], timeout)
        if not ready:  # the script did not end: stop it and its worker, fail the test
            self.close()
            raise AssertionError(f"{script} {' '.join(argv)} still running after {timeout} s")
        reply = json.loads(self.worker.stdout.readline())
        return subprocess.CompletedProcess([script, *argv], reply["code"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, 9)
            self.worker.wait()


@pytest.fixture(scope="session")
def forked():
    """Run a script as `python SCRIPT ARGS` would, in a fork of a warm interpreter (see Forked)."""
    scripts = Forked()
    yield scripts
    scripts.close()
