"""One command: server.py and N client.py processes on loopback, each client its own data.

    python3 run.py --clients 4 --partitioner dirichlet --alpha 0.5 --rounds 5

Starts clients only once its own server says it is listening, shows each round as it ends,
stops every process on Ctrl-C, SIGTERM or as soon as one fails, and ends with the run's
results table. Its flags are saved in RUN_DIR/run.json, so `--resume RUN_DIR` continues the
same experiment.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import flags
import server
from federation import config, model, privacy, records
from pipeline import models, options, partitions, sources

HERE = Path(__file__).resolve().parent
SHOWN = ("Round ", "Waiting for clients", "Resuming", "Stopped after round", "Rejected", "ERROR", "error:")
RUN_JSON = "run.json"  # run.py's own flags, next to the server's config.json
# Flags that may change from one session of a run to the next; every other flag is the experiment's.
# --rounds may change too: more rounds extend a resumed run.
SESSION_FLAGS = ("resume", "run_dir", "port", "threads", "device", "certificates", "round_timeout", "client_wait")


class Stop(Exception):
    """Ctrl-C or SIGTERM: stop every process and exit with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Turns SIGINT and SIGTERM into Stop in the main thread; deferred while a child is being started."""

    def __init__(self) -> None:
        self.holding, self.pending, self.stopping = False, 0, False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame) -> None:
        if self.stopping:
            return  # the first signal's cleanup is under way
        if self.holding:
            self.pending = signum
            return
        self.stopping = True
        raise Stop(signum)

    @contextmanager
    def hold(self):
        """Defer a stop until the block is done, so that no child starts without being tracked."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            self.stopping = True
            raise Stop(self.pending)


@dataclass
class Launch:
    """The children to stop (each in its own session: a terminal's Ctrl-C reaches run.py alone), and the run."""

    stops: StopSignals
    procs: list[subprocess.Popen] = field(default_factory=list)
    echoer: threading.Thread | None = None
    run_dir: Path | None = None

    def start(self, cmd: list[str], **popen) -> subprocess.Popen:
        """Start a child in its own session and track it; a stop waits until it is tracked."""
        with self.stops.hold():
            proc = subprocess.Popen(cmd, start_new_session=True, **popen)
            self.procs.append(proc)
        return proc

    def stop(self) -> None:
        stop(self.procs)
        if self.echoer:
            self.echoer.join(timeout=5)  # the server's last lines reach its log


def client_command(args, address: str, i: int) -> list[str]:
    """client.py's command line for client i."""
    cmd = [
        *("--server-address", address, "--data-root", args.data_root, "--cache-dir", args.cache_dir),
        *("--pipeline", args.pipeline, "--epochs", args.epochs, "--batch-size", args.batch_size),
        *("--lr", args.lr, "--momentum", args.momentum, "--device", args.device),
        *("--threads", args.threads, "--weight-decay", args.weight_decay),
        *("--model", args.model, "--image-size", args.image_size, "--num-classes", args.num_classes),
        "--augment" if args.augment else "--no-augment",
        "--normalize" if args.normalize else "--no-normalize",
        "--cuda-graph" if args.cuda_graph else "--no-cuda-graph",
        "--dp-sgd" if args.dp_sgd else "--no-dp-sgd",
        *("--dp-sgd-noise", args.dp_sgd_noise, "--dp-sgd-clip", args.dp_sgd_clip, "--dp-delta", args.dp_delta),
        *("--dp-sgd-mode", args.dp_sgd_mode),
        "--dp-seed",
        args.dp_seed,
    ]
    if args.partitioner != "none":
        cmd += ["--partition-id", i, "--num-partitions", args.clients, "--partitioner", args.partitioner]
        cmd += ["--holdout", args.holdout, "--seed", args.seed]
        if args.partitioner == "dirichlet":
            cmd += ["--alpha", args.alpha]
    else:  # the whole set each: a seed of its own, or the clients would train alike
        cmd += ["--seed", args.seed + i]
    if args.certificates:
        cmd += ["--root-certificates", args.certificates[0]]
    return [sys.executable, str(HERE / "client.py"), *map(str, cmd)]


def server_command(args, address: str) -> list[str]:
    """server.py's command line."""
    cmd = [
        *("--server-address", address, "--rounds", args.rounds, "--min-clients", args.min_clients),
        *("--fraction-fit", args.fraction_fit, "--run-dir", args.run_dir, "--seed", args.seed),
        *("--data-root", args.data_root, "--cache-dir", args.cache_dir),
        *("--model", args.model, "--image-size", args.image_size, "--num-classes", args.num_classes),
        *("--max-message-mb", args.max_message_mb, "--client-wait", args.client_wait),
        *("--strategy", args.strategy, "--proximal-mu", args.proximal_mu, "--trim-beta", args.trim_beta),
        *("--num-malicious", args.num_malicious, "--server-lr", args.server_lr),
        *("--screen", args.screen, "--min-cosine", args.min_cosine, "--clip-factor", args.clip_factor),
        *("--max-update-norm", args.max_update_norm, "--dp", args.dp, "--dp-clipping", args.dp_clipping),
        *("--dp-noise", args.dp_noise, "--dp-clip-norm", args.dp_clip_norm, "--dp-delta", args.dp_delta),
        *("--dp-max-epsilon", args.dp_max_epsilon, "--dp-seed", args.dp_seed),
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


def echo(stream, log: Path, ready: threading.Event, marker: str) -> None:
    """Copy the server's output to its log and its progress lines to the terminal; set `ready` at `marker`."""
    with log.open("a") as f:
        for line in stream:
            f.write(line)
            f.flush()
            if line.startswith(marker):
                ready.set()
            if line.startswith(SHOWN) or any(s in line for s in SHOWN[4:]):
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


# ---------------------------------------------------------------- command line


def flag_text(key: str, value) -> str:
    """A flag as it is typed: --epochs 5, --no-augment."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def as_json(value):
    """A flag's value as run.json holds it (paths as text)."""
    return json.loads(json.dumps(value, default=str))


def parse_args(argv: list[str] | None = None) -> tuple[flags.Parser, argparse.Namespace, set[str]]:
    """run.py's flags, and which of them were given on the command line."""
    parser = flags.Parser(description="Start a server and N clients on this machine and run federated learning.")
    parser.add_argument("--clients", type=flags.positive_int, default=2, help="number of client processes")
    parser.add_argument(
        "--port", type=flags.port, default=0, help="server port on 127.0.0.1 (refused when in use); 0: a free one"
    )
    config.add_share_args(parser, choices=("none", *partitions.PARTITIONERS))
    config.add_server_args(parser)
    server.add_script_args(parser)
    options.add_data_args(parser)
    options.add_train_args(parser, epochs=1)
    privacy.add_central_args(parser)
    privacy.add_dp_sgd_args(parser, delta=False)  # the server's --dp-delta serves both
    # run.py computes these two from --clients, so their help says so instead of the scripts' own
    for action in parser._actions:
        if action.dest == "min_clients":
            action.default, action.help = None, "clients needed to start a round (default: --clients, all of them)"
        elif action.dest == "threads":
            action.default, action.help = None, "torch CPU threads per client (default: cores / --clients, at least 1)"
        elif action.dest == "resume":
            action.help = (
                f"continue a run from its last completed round with the flags it was started with (RUN_DIR/{RUN_JSON});"
                " --rounds N runs it to round N"
            )
    args = parser.parse_args(argv)
    return parser, args, flags.given(parser, argv)


def restore(parser: flags.Parser, args: argparse.Namespace, given: set[str]) -> None:
    """--resume DIR: the experiment's flags come from DIR/run.json; a given flag that contradicts them is refused."""
    explicit = {key: as_json(getattr(args, key)) for key in given}
    server.check_resume(parser, args, given)  # a run directory; the server's settings; --rounds
    path = Path(args.resume) / RUN_JSON
    if not path.is_file():
        print(f"run.py: {path} not found (not started by run.py): the clients get the flags given", flush=True)
        return
    saved = json.loads(path.read_text())
    for key, value in saved.items():
        if key in SESSION_FLAGS or key in ("rounds", *config.RESUME_MAY_CHANGE) or not hasattr(args, key):
            continue
        if key in explicit and explicit[key] != value:
            parser.error(
                f"{flag_text(key, explicit[key])} contradicts the run in {args.resume}, which has "
                f"{flag_text(key, value)} ({path}): leave it out to continue the same experiment"
            )
        setattr(args, key, value)


def resolve(parser: flags.Parser, args: argparse.Namespace, given: set[str]) -> None:
    """Fill in what the flags leave open and refuse what cannot run."""
    privacy.dp_sgd_training(args, given)  # the clients get them as given flags; a resumed run's own come next
    if args.resume is not None:
        restore(parser, args, given)
    options.check_device(parser, args.device)
    args.min_clients = args.min_clients or args.clients
    if args.min_clients > args.clients:
        parser.error(f"--min-clients {args.min_clients} is more than --clients {args.clients}: no round could start")
    problem = config.strategy_problem(args) or config.share_problem(args, given, args.partitioner != "none")
    if problem:
        parser.error(problem)
    # Clients on one machine share its cores instead of oversubscribing them
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.clients)
    args.run_dir = str(args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.resume is None and records.RunRecord(Path(args.run_dir)).rows():
        parser.error(f"--run-dir {args.run_dir} already holds a run: use --resume {args.run_dir} to continue it")


def claim_port(parser: flags.Parser, port: int) -> int:
    """`port` if nothing listens on it (else exit 2), or a free port for 0."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Flower's own check: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            parser.error(f"--port {port} is in use on 127.0.0.1: choose another port, or --port 0 for a free one")
        return s.getsockname()[1]


def save_flags(args: argparse.Namespace) -> None:
    """RUN_DIR/run.json: the flags that define the experiment, for --resume."""
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = {k: as_json(v) for k, v in vars(args).items() if k not in SESSION_FLAGS}
    tmp = run_dir / (RUN_JSON + ".tmp")
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    os.replace(tmp, run_dir / RUN_JSON)


# ---------------------------------------------------------------- launch


def launch(run: Launch) -> int:
    """Check the flags and data, start the server, then the clients once it listens; returns the exit code."""
    parser, args, given = parse_args()
    resolve(parser, args, given)
    run_dir = Path(args.run_dir)
    done = records.RunRecord(run_dir).last_round()
    if args.resume is not None and done >= args.rounds:
        print(f"{run_dir} already completed all {args.rounds} rounds")
        print(records.summary_table(records.RunRecord(run_dir).rows()))
        return 0
    port = claim_port(parser, args.port)

    # Decode the data once here so that the clients start from a warm cache, not N decodes at once
    print(f"Preparing data from {args.data_root}", flush=True)
    try:
        data = sources.load_arrays(args.data_root, args.cache_dir, args.image_size, options.show_progress)
        _, layout = model.build(args.model, data.num_classes(args.num_classes), data.image_size, 0, "cpu")
    except (sources.DataError, models.ModelError) as e:
        flags.die(str(e), parser.prog)
    if data.resize_note():
        print(data.resize_note())
    print(f"Model: {layout.describe()}", flush=True)
    del data

    save_flags(args)
    address = f"127.0.0.1:{port}"
    logs_dir = run_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    logs = [logs_dir / "server.log"] + [logs_dir / f"client-{i}.log" for i in range(args.clients)]
    # A resumed run's sessions follow one another in the same logs
    header = f"---- {datetime.now():%Y-%m-%d %H:%M:%S} run.py {' '.join(sys.argv[1:])}\n"
    for log in logs:
        with log.open("a") as f:
            f.write(header)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    print(
        f"Starting the server on {address} ({args.rounds} rounds, {args.clients} clients, {args.partitioner} partitions)"
    )
    run.run_dir = run_dir
    srv = run.start(server_command(args, address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ready = threading.Event()
    # The server's own line, on its own output: a foreign server on the port can never pass for it
    run.echoer = threading.Thread(
        target=echo, args=(srv.stdout, logs[0], ready, f"Listening on {address} (pid {srv.pid})"), daemon=True
    )
    run.echoer.start()
    while not ready.wait(timeout=0.2):
        if srv.poll() is not None:
            run.echoer.join(timeout=5)
            print(f"run.py: the server exited with code {srv.returncode} before it listened:\n{tail(logs[0])}")
            return 1
    print(f"Server ready (pid {srv.pid}); starting {args.clients} clients (logs in {logs_dir})", flush=True)
    clients = []
    for i in range(args.clients):
        with logs[i + 1].open("a") as log:
            clients.append(run.start(client_command(args, address, i), stdout=log, stderr=subprocess.STDOUT, env=env))
    code = supervise(srv, clients, logs)
    run.echoer.join(timeout=5)
    return code


def main() -> None:
    flags.quick_exit()
    run = Launch(StopSignals())
    try:
        code = launch(run)
    except Stop as e:
        what = "interrupted" if e.signum == signal.SIGINT else "terminated"
        print(f"\nrun.py: {what}" + ("; stopping the server and clients" if run.procs else ""), flush=True)
        run.stop()
        code = 128 + e.signum
    if run.procs:
        rows = records.RunRecord(run.run_dir).rows()
        if rows:
            print(records.summary_table(rows))
        print(f"Run directory: {run.run_dir}")
    sys.exit(code)


if __name__ == "__main__":
    main()
