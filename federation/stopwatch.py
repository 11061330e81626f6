"""Where one ClientApp message's process spends its time, as a JSON line per process (`bench.py deployment`)."""

import atexit
import json
import os
import time
from pathlib import Path

ENV = "FLOWER_CIFAR_TIMINGS"  # a file; when set, each ClientApp process appends its marks to it at exit


def process_started() -> float | None:
    """When this process started, on time.time()'s clock (from Linux's /proc, 10 ms steps; None elsewhere)."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Marks on time.time()'s clock from process start to exit; records nothing unless $FLOWER_CIFAR_TIMINGS is set."""

    def __init__(self, kind: str) -> None:
        self.path = os.environ.get(ENV)
        self.marks: dict = {"kind": kind, "born": process_started(), "entered": time.time()}
        if self.path:
            atexit.register(self._write)  # after Flower has pushed the reply and is exiting

    def mark(self, name: str) -> None:
        """Note that `name` is done now."""
        self.marks[name] = time.time()

    def _write(self) -> None:
        self.marks["exited"] = time.time()
        with open(self.path, "a") as f:  # one short line per process: appends do not interleave
            f.write(json.dumps(self.marks) + "\n")
