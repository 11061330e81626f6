"""run.py as users and supervisors drive it: signals, resume, ports; and how server.py stops. Real processes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENV, ROOT, finish, free_port, run, start
from test_cifar import one_line_error
from test_federation import FAST, data_flags, rows, seeded
from test_safety import make_certs


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `condition` until it holds; fail if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def has_rows(run_dir: Path) -> bool:
    return (run_dir / "metrics.csv").is_file() and len(rows(run_dir)) > 0


def cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, bytes]:
    """Every process below `pid`, with its command line (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = cmdline(child)
                frontier.append(child)
    return {p: c for p, c in found.items() if c}


def still_running(procs: dict[int, bytes]) -> list[int]:
    """The processes of `procs` still alive (the same pid with the same command line)."""
    return [pid for pid, cmd in procs.items() if cmdline(pid) == cmd]


def launcher(tmp_path: Path, tiny: Path, *args) -> subprocess.Popen:
    """run.py in the background on the tiny set, on its default port, in its own session as a shell job."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *map(str, ("--run-dir", tmp_path / "run",
         *data_flags(tiny, tmp_path / "cache"), *FAST, *args))],
        cwd=ROOT, env=ENV, stdout=(tmp_path / "run.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_to_run_py_stops_its_server_and_clients_within_10_s(tiny, tmp_path, signum, code):
    proc = launcher(tmp_path, tiny, "--clients", 2, "--rounds", 500)
    wait_for(lambda: has_rows(tmp_path / "run"), proc, tmp_path / "run.log")
    children = descendants(proc.pid)
    names = b" ".join(children.values())
    assert names.count(b"client.py") == 2 and names.count(b"server.py") == 1, children
    signalled = time.monotonic()
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole foreground job
    else:
        proc.send_signal(signum)  # kill, docker stop, systemd: the main process
    assert finish([proc], timeout=10) == [code]
    while still_running(children) and time.monotonic() - signalled < 10:
        time.sleep(0.1)
    assert still_running(children) == []
    out = (tmp_path / "run.log").read_text()
    assert "stopping the server and clients" in out and "Traceback" not in out
    # The server was stopped, not killed, and says where: no traceback at the end of its log
    server_log = (tmp_path / "run" / "logs" / "server.log").read_text()
    done = len(rows(tmp_path / "run"))
    assert server_log.rstrip().endswith(f"the run stopped after round {done} of 500"), server_log[-2000:]
    assert "Traceback" not in server_log


def image_folder_with_a_pipe(tmp_path: Path, tiny: Path) -> tuple[Path, Path]:
    """Two classes of the tiny set, whose first training "image" is a named pipe: decoding it waits for the test."""
    data = tmp_path / "data"
    for split in ("train", "test"):
        os.makedirs(data / split)
        os.symlink(tiny / split / "class1", data / split / "class1")
    os.symlink(tiny / "test" / "class0", data / "test" / "class0")
    os.makedirs(data / "train" / "class0")
    fifo = data / "train" / "class0" / "0000.png"
    os.mkfifo(fifo)
    return data, fifo


def reader_held(fifo: Path, proc: subprocess.Popen, log: Path) -> int:
    """Wait until `proc` opens the pipe (it is decoding the data), then hold it reading; returns our end."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader has the pipe open
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)


@pytest.mark.parametrize("script", ["run.py", "server.py"])
def test_ctrl_c_while_loading_the_data_is_one_line_and_exit_130(tiny, tmp_path, script):
    data, fifo = image_folder_with_a_pipe(tmp_path, tiny)
    proc = start(script, "--run-dir", tmp_path / "run", "--data-root", data, "--cache-dir", "",
                 log=tmp_path / "out.log")  # fmt: skip
    end = reader_held(fifo, proc, tmp_path / "out.log")
    proc.send_signal(signal.SIGINT)
    os.close(end)  # the decoding thread reads an empty file and ends; the load winds down
    assert finish([proc], timeout=30) == [130]
    out = (tmp_path / "out.log").read_text()
    assert "Traceback" not in out and out.strip().splitlines()[-1] == f"{script}: interrupted", out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_py_stopped_mid_run_by_sigterm_or_ctrl_c_exits_non_zero_and_says_which_round(tiny, tmp_path, signum):
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--rounds", 500, "--run-dir", tmp_path / "run", log=tmp_path / "server.log")
    clients = [start("client.py", *common, *FAST, *seeded(i), log=tmp_path / f"c{i}.log") for i in range(2)]
    try:
        wait_for(lambda: has_rows(tmp_path / "run"), srv, tmp_path / "server.log")
        srv.send_signal(signum)
        code = finish([srv], timeout=30)[0]
    finally:
        for c in clients:
            c.kill()
            c.wait()
    log = (tmp_path / "server.log").read_text()
    done = len(rows(tmp_path / "run"))
    assert code == 1 and log.rstrip().endswith(f"server.py: error: the run stopped after round {done} of 500"), log
    assert "Traceback" not in log


# ---------------------------------------------------------------- resume


def test_a_resumed_run_py_run_reuses_its_flags_refuses_contradictions_and_extends(tiny, tmp_path):
    run_dir = tmp_path / "run"
    first = ("--clients", 2, "--partitioner", "none", "--epochs", 3, "--rounds", 1, "--run-dir", run_dir)
    r = run("run.py", *first, *data_flags(tiny, tmp_path / "cache"), "--lr", 0.02, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 3

    r = run("run.py", "--resume", run_dir)
    assert r.returncode == 0 and f"{run_dir} already completed all 1 rounds" in r.stdout, r.stdout + r.stderr
    line = one_line_error(run("run.py", "--resume", run_dir, "--clients", 1))
    assert "--clients 1 contradicts" in line and "--clients 2" in line
    line = one_line_error(run("run.py", "--resume", run_dir, "--partitioner", "iid"))
    assert "--partitioner iid contradicts" in line

    # Only --rounds given: the clients get the saved flags (the full set, 3 epochs), the run goes on to round 2
    r = run("run.py", "--resume", run_dir, "--rounds", 2, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [int(x["round"]) for x in rows(run_dir)] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["rounds"] == 2
    for i in range(2):
        log = (run_dir / "logs" / f"client-{i}.log").read_text()
        assert sum(line.startswith("---- ") for line in log.splitlines()) == 2  # both sessions, one after the other
        assert log.count("fit: 3 epoch(s) on 300 examples") == 2, log[-2000:]
    # Each session's server on a free port of its own (no --port given), clients started once it listened
    server_log = (run_dir / "logs" / "server.log").read_text()
    assert server_log.count("Listening on 127.0.0.1:") == 2
    line = one_line_error(run("run.py", "--resume", run_dir, "--rounds", 1))
    assert "has already completed 2 rounds" in line
    line = one_line_error(run("server.py", "--resume", run_dir, "--rounds", 1))
    assert "has already completed 2 rounds" in line


# ---------------------------------------------------------------- flags and ports


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--clients", "2", "--min-clients", "3"], "--min-clients 3 is more than --clients 2"),
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
    ],
)
def test_run_py_refuses_what_could_never_run(forked, tmp_path, args, complaint):
    line = one_line_error(forked.run("run.py", "--run-dir", tmp_path / "run", *args))
    assert complaint in line and not (tmp_path / "run").exists()


def test_run_py_refuses_a_port_something_else_listens_on(forked, tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        line = one_line_error(forked.run("run.py", "--port", port, "--run-dir", tmp_path / "run"))
    assert f"--port {port} is in use" in line and not (tmp_path / "run").exists()


@pytest.mark.smoke
def test_run_py_help_says_what_run_py_does_with_each_default_once():
    r = run("run.py", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and text.count("(default: ") > 10
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text), text
    assert "--min-clients MIN_CLIENTS clients needed to start a round (default: --clients, all of them)" in text
    assert "--threads THREADS torch CPU threads per client (default: cores / --clients, at least 1)" in text


def test_server_py_announces_its_address_and_pid_and_a_plaintext_client_of_a_tls_server_hears_of_tls(tiny, tmp_path):
    ca, cert, key = make_certs(tmp_path / "certs")
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--certificates", ca, cert, key, "--run-dir", tmp_path / "run",
                log=tmp_path / "server.log")  # fmt: skip
    try:
        listening = f"Listening on {address} (pid {srv.pid})"
        wait_for(lambda: listening in (tmp_path / "server.log").read_text(), srv, tmp_path / "server.log")
        r = run("client.py", *common, "--connect-timeout", 2, timeout=60)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"a server listens at {address}, but did not answer in plain text within 2 s" in r.stderr
    assert "if it uses TLS, pass --root-certificates CA" in r.stderr
