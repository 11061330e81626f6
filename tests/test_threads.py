"""Clients on one machine share its cores: each takes cores // live clients torch threads."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import ENV, ROOT

from pipeline import cores, models

# A client process in miniature: registers as client.py does, then answers "count" with
# how many clients it sees alive and how many threads it takes, until its stdin closes
CLIENT = """
import sys
from pipeline import cores, models
share = cores.CoreShare(int(sys.argv[2]) if len(sys.argv) > 2 else None, registry=sys.argv[1])
print("registered", flush=True)
for line in sys.stdin:
    print(share.live_clients(), share.apply(), flush=True)
"""
CORES = cores.machine_cores()


class Client:
    def __init__(self, registry, threads: int | None = None):
        args = [str(registry)] + ([str(threads)] if threads else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, *args],
            cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout.readline().strip() == "registered"  # the probe: registered before we go on

    def count(self) -> tuple[int, int]:
        """(live clients, threads) as this client sees them now."""
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        live, threads = self.proc.stdout.readline().split()
        return int(live), int(threads)

    def exit(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def clients(tmp_path):
    started: list[Client] = []

    def start(threads: int | None = None) -> Client:
        started.append(Client(tmp_path / "registry", threads))
        return started[-1]

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def test_a_client_alone_takes_every_core(clients):
    a = clients()
    assert a.count() == (1, CORES)
    a.exit()


def test_two_clients_split_the_cores_and_the_survivor_takes_them_back(clients, tmp_path):
    a, b = clients(), clients()
    assert a.count() == (2, max(1, CORES // 2))
    assert b.count() == (2, max(1, CORES // 2))
    b.exit()
    assert a.count() == (1, CORES)
    a.exit()
    assert list((tmp_path / "registry").iterdir()) == []  # each removed its own entry at exit


def test_a_killed_client_no_longer_counts_and_its_entry_is_cleaned_up(clients, tmp_path):
    a, b = clients(), clients()
    os.kill(b.proc.pid, signal.SIGKILL)  # no chance to remove its entry
    b.proc.wait()
    assert (tmp_path / "registry" / str(b.proc.pid)).exists()
    assert a.count() == (1, CORES)
    assert not (tmp_path / "registry" / str(b.proc.pid)).exists()
    a.exit()


def test_threads_given_are_kept_and_the_client_still_counts_for_the_others(clients):
    fixed, auto = clients(threads=3), clients()
    assert fixed.count() == (2, 3)
    assert auto.count() == (2, max(1, CORES // 2))
    fixed.exit()
    auto.exit()


def test_an_entry_whose_pid_was_reused_by_another_process_is_ignored(clients, tmp_path):
    a = clients()
    # This test process is alive, but started at another time than the entry says
    (tmp_path / "registry" / str(os.getpid())).write_text("1")
    assert a.count() == (1, CORES)
    a.exit()


# Waits for a line, then registers as a client would, says so, and stays alive until its stdin closes
LATECOMER = """
import sys
from pipeline import cores, models
sys.stdin.readline()
share = cores.CoreShare(registry=sys.argv[1])
print("registered", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(CORES < 2, reason="sharing needs two cores")
def test_a_client_that_started_alone_gives_cores_back_when_another_starts_mid_training(tiny, tmp_path):
    import threading

    import torch

    from federation import config
    from federation.participant import Participant

    # 135 training images a batch at a time: training re-shares the cores at step 100 of each of its epochs
    args = config.client_parser("").parse_args(["--data-root", str(tiny), "--cache-dir", str(tmp_path), "--epochs",
                                                "8", "--batch-size", "1", "--num-partitions", "2", "--partition-id", "0"])  # fmt: skip
    me = Participant(args)  # registers this process as a client, alone: every core
    other = subprocess.Popen([sys.executable, "-c", LATECOMER, str(me.cores.registry)], cwd=ROOT, env=ENV,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        # A Deployment Engine message's process, started a poll later: it registers while this one trains
        start_late = threading.Timer(0.5, lambda: (other.stdin.write("go\n"), other.stdin.flush()))
        start_late.start()
        me.fit(models.get_weights(me.net))
        assert other.stdout.readline().strip() == "registered"
        assert torch.get_num_threads() == CORES // 2  # given back mid-training, not at the next round
    finally:
        start_late.cancel()
        other.stdin.close()
        other.wait(timeout=30)
        torch.set_num_threads(threads)
