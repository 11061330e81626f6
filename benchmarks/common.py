"""What every benchmark shares: running the project's scripts, timing and memory, the report's sections."""

import csv
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import flwr
import torch
import torchvision

HERE = Path(__file__).resolve().parent.parent  # the project
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
FLWR_BIN = Path(sys.executable).parent


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(HERE / name), *map(str, args)]


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.csv's rows of the rounds trained (round 0, the initial model, left out)."""
    with (run_dir / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["round"] != "0"]


def fmt_runs(runs: list[dict], key: str, spec: str = ".2f") -> str:
    """'median [run1, run2, ...]' of one measured key."""
    values = [r[key] for r in runs]
    return f"{statistics.median(values):{spec}} [{', '.join(f'{v:{spec}}' for v in values)}]"


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, flwr {flwr.__version__}"
    )


def write_section(out: Path, name: str, body: str) -> None:
    """Replace (or append) this command's section of the report, keeping the others."""
    begin, end = f"<!-- bench {name} -->", f"<!-- /bench {name} -->"
    text = out.read_text() if out.exists() else "# Benchmarks\n\nEvery figure below comes from `bench.py`.\n"
    block = f"{begin}\n{body.strip()}\n\n_Measured {date.today()} on {machine()}._\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.write_text(text)
    print(block)


class MemorySampler:
    """Peak memory in use on the machine above its level at start (from /proc/meminfo)."""

    def __enter__(self):
        self.base = self.peak = self._used()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _used(self) -> int:
        info = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def peak_gib(self) -> float:
        return (self.peak - self.base) / 2**30


# Peak memory as `/usr/bin/time -v` measures it: the child's maximum resident set size from wait4.
# A child forked straight from this (large) process would inherit its high-water mark, so a small
# process in between starts the command and writes the figure (KiB) to the file it is given.
PEAK_RSS_RUNNER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def with_peak_rss(cmd: list, record: Path) -> list[str]:
    """cmd, run so that its peak resident memory (KiB) lands in `record`."""
    return [sys.executable, "-c", PEAK_RSS_RUNNER, str(record), *map(str, cmd)]


def peak_rss_mib(record: Path) -> float:
    return int(record.read_text()) / 1024


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command to its end: wall seconds, peak resident memory (MiB), and its output lines
    with the second each arrived."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "rss"
        start = time.perf_counter()
        proc = subprocess.Popen(
            with_peak_rss(cmd, record), env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
        code = proc.wait()
        wall = time.perf_counter() - start
        if code != 0:
            tail = "\n".join(line for _, line in lines[-20:])
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {code}:\n{tail}")
        return {"wall_s": wall, "rss_mib": peak_rss_mib(record), "lines": lines}


def load_note(start: float) -> str:
    """What else ran: the 1-minute load average when the measurements started and when they ended."""
    return (
        f"1-minute load average: {start:.1f} when the runs started, {os.getloadavg()[0]:.1f} when they ended "
        f"({os.cpu_count()} cores; above the core count other work shared the machine and times are inflated, "
        "peak memory is not)."
    )


def flwr_env(home: Path) -> dict:
    ports = [free_address().rsplit(":", 1)[1] for _ in range(2)]
    return {
        **ENV,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # run in this environment, no `uv sync`
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": ports[0],
        "FLWR_LOCAL_CONTROL_API_PORT": ports[1],
        "PATH": f"{FLWR_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def stop_local_superlink(home: Path) -> None:
    """`flwr run` leaves a detached local SuperLink running: stop the one of this FLWR_HOME."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in text and str(home) in text:
            os.kill(int(cmdline.parent.name), signal.SIGTERM)
