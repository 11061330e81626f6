"""Flower server: FedAvg over gRPC for the tutorial's CIFAR-10 CNN (the tutorial's `start_server`).

`python3 server.py` runs the tutorial's three rounds. Every run writes a run directory:
config.json, metrics.csv, plot.png and a checkpoint per round; `--resume DIR` continues one.
The current Flower API (a ServerApp on the Message API) is server_app.py: same records, same checks.
"""

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import flwr as fl
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

import flags
from federation import config, privacy, records
from federation.legacy import NoClients, Screened, flower_strategy
from federation.rounds import open_run
from pipeline import options

GONE_GRACE = 5.0  # seconds to wait once every client that joined has left (a restarted client may be back)


class WaitingClientManager(SimpleClientManager):
    """Says how many clients are connected of how many are needed while it waits, and gives up (NoClients)
    after `patience` seconds, or GONE_GRACE seconds once every client that had joined has left."""

    def __init__(self, patience: float) -> None:
        super().__init__()
        self.patience = patience
        self.joined = self.left = 0

    def register(self, client) -> bool:
        registered = super().register(client)
        self.joined += registered
        return registered

    def unregister(self, client) -> None:
        self.left += client.cid in self.clients
        super().unregister(client)

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        began = time.monotonic()
        deadline = began + min(timeout, self.patience)
        while True:
            with self._cv:
                if self._cv.wait_for(
                    lambda: len(self.clients) >= num_clients, timeout=min(5.0, max(0.0, deadline - time.monotonic()))
                ):
                    return True
                connected = len(self.clients)
            now = time.monotonic()
            gone = connected == 0 and self.left > 0
            if gone and now - began >= GONE_GRACE:
                raise NoClients(
                    f"every client that joined has left ({self.left}; their terminals say why) and none came back "
                    f"within {GONE_GRACE:g} s: fix and restart them, then the server with --resume"
                )
            if now >= deadline:
                left = f"; {self.left} client(s) left mid-run (their terminals say why)" if self.left else ""
                raise NoClients(
                    f"only {connected} of the {num_clients} clients needed connected within --client-wait "
                    f"{self.patience:g} s{left}: start them, or lower --min-clients"
                )
            print(f"Waiting for clients: {connected} of {num_clients} connected", flush=True)


# ---------------------------------------------------------------- command line


def add_script_args(parser: flags.Parser) -> None:
    """Flags of the gRPC server process itself, shared with run.py."""
    parser.add_argument(
        "--round-timeout",
        type=flags.positive_float,
        default=None,
        help="seconds a round waits for its clients; late ones count as failures (default: no limit)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its last completed round; --rounds N runs it to round N",
    )
    parser.add_argument(
        "--certificates",
        nargs=3,
        type=flags.existing_file,
        metavar=("CA", "CERT", "KEY"),
        default=None,
        help="enable TLS with these PEM files (see certs.py)",
    )
    parser.add_argument(
        "--client-wait",
        type=flags.positive_float,
        default=300.0,
        help="seconds a round waits for --min-clients to be connected before the server gives up (exit 2); "
        f"{GONE_GRACE:g} s once every client that joined has left",
    )
    parser.add_argument(
        "--max-message-mb",
        type=flags.non_negative_float,
        default=0.0,
        help="gRPC's limit on one message, in MiB; larger updates are refused before they are read "
        "(default 0: twice the model's size, 16 MiB at least)",
    )


def check_resume(parser: flags.Parser, args: argparse.Namespace, given: set[str] = frozenset()) -> None:
    """--resume must name a run directory; its experiment settings replace the flags', but for a --rounds given
    (in `given`), which sets the run's new total (more extends it, fewer than it has done is refused), and a
    --dp-max-epsilon given, a new privacy budget."""
    if args.resume is None:
        return
    if not (args.resume / "config.json").is_file():
        parser.error(f"--resume {args.resume}: no config.json there, not a run directory")
    rounds = args.rounds
    saved = records.RunRecord(args.resume).config()
    for key in config.EXPERIMENT_KEYS:
        if key not in given or key not in config.RESUME_MAY_CHANGE:
            setattr(args, key, saved.get(key, getattr(args, key)))
    args.run_dir = args.resume
    if "rounds" in given:
        done = records.RunRecord(args.resume).last_round()
        if rounds < done:
            parser.error(f"--rounds {rounds}: {args.resume} has already completed {done} rounds")
        args.rounds = rounds


def parse_args(argv: list[str] | None = None) -> tuple[flags.Parser, argparse.Namespace]:
    """server.py's flags, checked; a resumed run's saved settings applied."""
    parser = config.server_parser("Flower server: federated learning over gRPC for the tutorial's CIFAR-10 CNN.")
    parser.add_argument(
        "--server-address",
        type=flags.host_port,
        default="127.0.0.1:8080",
        help="HOST:PORT to listen on; 0.0.0.0:8080 for clients on other machines",
    )
    add_script_args(parser)
    args = parser.parse_args(argv)
    check_resume(parser, args, flags.given(parser, argv))
    return parser, args


def announce_listening(address: str) -> None:
    """Print "Listening on ADDRESS (pid N)" once Flower's gRPC server is bound: run.py waits for this line."""

    def on_record(record: logging.LogRecord) -> bool:
        # start_server logs this right after its gRPC server has bound the port and started
        if str(record.msg).startswith("Flower ECE: gRPC server running"):
            print(f"Listening on {address} (pid {os.getpid()})", flush=True)
        return True

    logging.getLogger("flwr").addFilter(on_record)


def interrupted(prog: str) -> NoReturn:
    """Ctrl-C before the rounds began: one line, exit code 130."""
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)


def main() -> None:
    flags.quick_exit()
    parser, args = parse_args()
    options.check_device(parser, args.device)
    if args.certificates is None and not flags.is_loopback(args.server_address):
        print(
            f"WARNING: listening on {args.server_address} without TLS: updates travel in plain text. "
            "Use --certificates CA CERT KEY.",
            file=sys.stderr,
        )
    problem = flags.bind_problem(args.server_address)
    if problem:
        parser.error(f"cannot listen on --server-address {args.server_address} ({problem}): "
                     "is another server running there? Stop it, or choose another port")  # fmt: skip
    args.run_dir = str(args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.resume is None and records.RunRecord(args.run_dir).rows():
        parser.error(f"--run-dir {args.run_dir} already holds a run: use --resume {args.run_dir} to continue it")
    seen: list[int] = []  # a Ctrl-C during the load wins over the error it causes (a half-read image)

    def on_ctrl_c(signum, frame) -> NoReturn:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        try:
            rounds = open_run(parser, args, hint=" (or run the server with --no-central-eval)")
        except SystemExit:
            if seen:
                raise KeyboardInterrupt from None
            raise
    except KeyboardInterrupt:
        interrupted(parser.prog)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    record = rounds.record
    if rounds.rounds_left <= 0:
        print(f"{args.run_dir} already completed all {args.rounds} rounds")
        print(records.summary_table(record.rows()))
        return
    spent = rounds.budget_spent()
    if spent:  # a continued run whose budget is spent: said at once, not after waiting for clients
        record.close()
        print(f"Stopped after round {rounds.done} of {args.rounds}: {spent}", flush=True)
        return
    if args.resume:
        print(f"Resuming {args.run_dir} after round {rounds.done}: {rounds.rounds_left} round(s) left")
    certificates = tuple(p.read_bytes() for p in args.certificates) if args.certificates else None

    initial = ndarrays_to_parameters(rounds.weights)
    privacy.seed_noise(args, rounds.privacy.rounds if rounds.privacy else 0)
    announce_listening(args.server_address)
    stopped = False  # by a signal, through Flower's handler
    strategy = Screened(flower_strategy(args, initial), rounds, flags.NotedSignals())
    try:
        fl.server.start_server(
            server_address=args.server_address,
            config=fl.server.ServerConfig(num_rounds=rounds.rounds_left, round_timeout=args.round_timeout),
            strategy=strategy,
            client_manager=WaitingClientManager(args.client_wait),
            certificates=certificates,
            grpc_max_message_length=rounds.layout.message_bytes(args.max_message_mb),
        )
    except NoClients as e:  # one line, exit 2; the completed rounds stay on record, to --resume
        record.close()
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # gRPC's threads would keep the process alive
    except KeyboardInterrupt:
        stopped = True  # a second Ctrl-C while Flower shuts down
    except SystemExit as e:
        # Flower's SIGINT/SIGTERM handler ends start_server with code 0 ("terminated gracefully"), rounds or not
        if e.code not in (0, None):
            raise
        stopped = True
    except Exception as e:  # noqa: BLE001
        if not isinstance(e.__context__, SystemExit):  # a bug: show it, and end the process, which gRPC keeps alive
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        stopped = True  # Flower's signal handler raised its SystemExit inside our code, which then failed
    record.close()
    print(records.summary_table(record.rows()))
    print(f"Run directory: {args.run_dir} (config.json, metrics.csv, plot.png, checkpoints/)")
    if strategy.exhausted:  # the privacy budget ends the run: done, not failed
        print(f"Stopped after round {record.last_round()} of {args.rounds}: {strategy.exhausted}", flush=True)
        return
    if record.last_round() < args.rounds:
        message = f"{parser.prog}: error: the run stopped after round {record.last_round()} of {args.rounds}"
        if stopped:
            # Flower's handler also started a thread that ends the process with code 0 five seconds on: exit first
            print(message, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        sys.exit(message)


if __name__ == "__main__":
    main()
