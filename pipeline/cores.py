"""Clients on one machine share its cores: each takes cores // live client processes torch threads."""

import atexit
import contextlib
import os
import tempfile
from pathlib import Path

import torch


def machine_cores() -> int:
    """The cores this process may run on."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _process_token(pid: int) -> str | None:
    """The process's start time (Linux), to tell a live pid from a reused one; None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counting from after the command name


def _alive(pid: int, token: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    now = _process_token(pid)
    return now is None or not token or now == token


_registered: set[Path] = set()


class CoreShare:
    """This process's share of the machine's cores, among the client processes running on it.

    Every client registers in a per-user directory (a file named by its pid, removed at exit;
    files of dead processes are ignored and cleaned up). With `threads` given, `apply` sets that
    many torch threads; without, cores // live clients, at least 1: a client alone uses every
    core, two clients on two cores one each, so they do not oversubscribe.
    """

    def __init__(self, threads: int | None = None, registry: str | Path | None = None) -> None:
        self.threads = threads
        self.registry = Path(registry or Path(tempfile.gettempdir()) / f"flower-cifar-{os.getuid()}" / "clients")
        self._register()  # with fixed threads too: the others then take fewer
        self.apply()

    def _register(self) -> None:
        me = self.registry / str(os.getpid())
        if me in _registered:  # many clients in one process (a simulation): one entry
            return
        try:
            self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
            me.write_text(_process_token(os.getpid()) or "")
        except OSError:
            return  # no registry here: this client counts only itself
        _registered.add(me)
        atexit.register(me.unlink, missing_ok=True)

    def live_clients(self) -> int:
        """Client processes registered and alive, this one included."""
        live = 0
        try:
            entries = list(os.scandir(self.registry))
        except OSError:
            return 1
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                token = Path(entry.path).read_text().strip()
            except OSError:
                continue  # removed meanwhile
            if _alive(int(entry.name), token):
                live += 1
            else:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
        return max(1, live)

    def apply(self) -> int:
        """Set torch's thread count for the next training call; return it."""
        n = self.threads or max(1, machine_cores() // self.live_clients())
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n
