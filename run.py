"""One command: server.py and N client.py processes on loopback, each client its own data.

    python3 run.py --clients 4 --partitioner dirichlet --alpha 0.5 --rounds 5

Waits for the server before starting clients, shows each round as it ends, stops every
process on Ctrl-C or as soon as one fails, and ends with the run's results table.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import cifar
import client
import federation
import flags
import server

HERE = Path(__file__).resolve().parent
SHOWN = ("Round ", "Waiting for clients", "Resuming", "Rejected", "ERROR", "error:")


def client_command(args, address: str, i: int) -> list[str]:
    """client.py's command line for client i."""
    cmd = [
        *("--server-address", address, "--data-root", args.data_root, "--cache-dir", args.cache_dir),
        *("--pipeline", args.pipeline, "--epochs", args.epochs, "--batch-size", args.batch_size),
        *("--lr", args.lr, "--momentum", args.momentum, "--device", args.device),
        *("--threads", args.threads, "--seed", args.seed, "--weight-decay", args.weight_decay),
        "--augment" if args.augment else "--no-augment",
        "--normalize" if args.normalize else "--no-normalize",
    ]
    if args.partitioner != "none":
        cmd += ["--partition-id", i, "--num-partitions", args.clients, "--partitioner", args.partitioner]
        cmd += ["--alpha", args.alpha, "--holdout", args.holdout]
    if args.certificates:
        cmd += ["--root-certificates", args.certificates[0]]
    return [sys.executable, str(HERE / "client.py"), *map(str, cmd)]


def server_command(args, address: str) -> list[str]:
    """server.py's command line."""
    cmd = [
        *("--server-address", address, "--rounds", args.rounds, "--min-clients", args.min_clients),
        *("--fraction-fit", args.fraction_fit, "--run-dir", args.run_dir, "--seed", args.seed),
        *("--data-root", args.data_root, "--cache-dir", args.cache_dir),
        *("--strategy", args.strategy, "--proximal-mu", args.proximal_mu, "--trim-beta", args.trim_beta),
        *("--num-malicious", args.num_malicious, "--server-lr", args.server_lr),
        *("--screen-factor", args.screen_factor, "--max-update-norm", args.max_update_norm),
        "--central-eval" if args.central_eval else "--no-central-eval",
        "--normalize" if args.normalize else "--no-normalize",
    ]
    if args.round_timeout:
        cmd += ["--round-timeout", args.round_timeout]
    if args.resume:
        cmd += ["--resume", args.resume]
    if args.certificates:
        cmd += ["--certificates", *args.certificates]
    return [sys.executable, str(HERE / "server.py"), *map(str, cmd)]


def echo(stream, log: Path) -> None:
    """Copy the server's output to its log, and its progress lines to the terminal."""
    with log.open("w") as f:
        for line in stream:
            f.write(line)
            f.flush()
            if line.startswith(SHOWN) or any(s in line for s in SHOWN[3:]):
                print(line.rstrip(), flush=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then SIGKILL what outlives 5 seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def tail(path: Path, lines: int = 5) -> str:
    return "\n".join("    " + s for s in path.read_text(errors="replace").splitlines()[-lines:])


def supervise(srv: subprocess.Popen, clients: list[subprocess.Popen], logs: list[Path]) -> int:
    """Wait for the run to end; stop everything as soon as any process fails. Returns an exit code."""
    procs = [srv, *clients]
    names = ["server"] + [f"client {i}" for i in range(len(clients))]
    while True:
        for p, name, log in zip(procs, names, logs):
            code = p.poll()
            if code not in (None, 0):
                print(f"run.py: {name} exited with code {code}; stopping the others. Its last lines ({log}):")
                print(tail(log), flush=True)
                stop(procs)
                return 1
        if srv.poll() == 0:
            # The server is done and has told its clients to disconnect
            deadline = time.monotonic() + 30
            while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
                time.sleep(0.1)
            stop(clients)
            return 0
        time.sleep(0.2)


def main() -> None:
    parser = flags.Parser(description="Start a server and N clients on this machine and run federated learning.")
    parser.add_argument("--clients", type=flags.positive_int, default=2, help="number of client processes")
    parser.add_argument(
        "--port", type=flags.non_negative_int, default=8080, help="server port on 127.0.0.1 (0: any free port)"
    )
    federation.add_share_args(parser, choices=("none", *cifar.PARTITIONERS))
    federation.add_server_args(parser)
    server.add_script_args(parser)
    cifar.add_data_args(parser)
    cifar.add_train_args(parser, epochs=1)
    parser.set_defaults(min_clients=None, threads=None)
    args = parser.parse_args()
    server.check_resume(parser, args)
    cifar.check_device(parser, args.device)
    args.min_clients = args.min_clients or args.clients
    # Clients on one machine share its cores instead of oversubscribing them
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.clients)
    args.run_dir = args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.resume is None and federation.RunRecord(args.run_dir).rows():
        parser.error(f"--run-dir {args.run_dir} already holds a run: use --resume {args.run_dir} to continue it")

    # Decode the data once here so that the clients start from a warm cache, not N decodes at once
    print(f"Preparing data from {args.data_root}", flush=True)
    try:
        cifar.load_data(args.data_root, args.cache_dir)
    except cifar.DataError as e:
        flags.die(str(e), parser.prog)

    port = args.port
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    logs_dir = Path(args.run_dir) / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    logs = [logs_dir / "server.log"] + [logs_dir / f"client-{i}.log" for i in range(args.clients)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    print(
        f"Starting the server on {address} ({args.rounds} rounds, {args.clients} clients, {args.partitioner} partitions)"
    )
    srv = subprocess.Popen(
        server_command(args, address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    echoer = threading.Thread(target=echo, args=(srv.stdout, logs[0]), daemon=True)
    echoer.start()
    clients: list[subprocess.Popen] = []
    code = 1
    try:
        ca = args.certificates[0].read_bytes() if args.certificates else None
        while not client.wait_for_server(address, ca, timeout=1.0, quiet=True):
            if srv.poll() is not None:
                echoer.join(timeout=5)
                print(f"run.py: the server exited with code {srv.returncode} before it was ready:\n{tail(logs[0])}")
                sys.exit(1)
        print(f"Server ready; starting {args.clients} clients (logs in {logs_dir})", flush=True)
        for i in range(args.clients):
            with logs[i + 1].open("w") as log:
                clients.append(
                    subprocess.Popen(client_command(args, address, i), stdout=log, stderr=subprocess.STDOUT, env=env)
                )
        code = supervise(srv, clients, logs)
    except KeyboardInterrupt:
        print("\nrun.py: interrupted; stopping the server and clients", flush=True)
        srv.send_signal(signal.SIGINT)
        stop([srv, *clients])
        code = 130
    echoer.join(timeout=5)
    rows = federation.RunRecord(Path(args.run_dir)).rows()
    if rows:
        print(federation.summary_table(rows))
    print(f"Run directory: {args.run_dir}")
    sys.exit(code)


if __name__ == "__main__":
    main()
