"""Flower client: a NumPyClient wrapping cifar.py's train and test (the tutorial's `start_client`).

`python3 client.py` connects to server.py over gRPC. The current Flower API (a ClientApp on the
Message API) is client_app.py; both wrap the same `Participant`.
"""

import json
import math
import signal
import socket
import sys
import time
from typing import NoReturn

import flwr as fl
import grpc
import numpy as np
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

import flags
from federation import config, privacy
from federation.dpsgd import SpendMissing
from federation.participant import ModelMismatch, Participant
from pipeline import models, options
from pipeline.sources import DataError


class CifarClient(fl.client.NumPyClient):
    """Trains and evaluates the tutorial's Net on this client's data."""

    def __init__(self, participant: Participant, prog: str = "client.py") -> None:
        self.participant, self.prog = participant, prog

    def get_parameters(self, config) -> list[np.ndarray]:
        return models.get_weights(self.participant.net)

    def fit(self, parameters, config):
        # FedProx sends its proximal term's weight; every other strategy trains plainly
        try:
            weights, n, metrics = self.participant.fit(
                parameters, float(config.get("proximal_mu", 0.0)), str(config.get("run", "")),
                json.loads(str(config.get("dp_sgd_spent", "{}"))), central_dp="dp" in config,
            )  # fmt: skip
        except (ModelMismatch, SpendMissing) as e:
            fail(self.prog, str(e), 2)  # not an Exception: Flower's handler does not print it as a traceback
        if KEY_CLIPPING_NORM in config:  # central DP with client-side clipping: the update, clipped here
            compute_clip_model_update(weights, parameters, float(config[KEY_CLIPPING_NORM]))
        return weights, n, metrics

    def evaluate(self, parameters, config):
        try:
            return self.participant.evaluate(parameters, central_dp="dp" in config)
        except ModelMismatch as e:
            fail(self.prog, str(e), 2)


def fail(prog: str, message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with `code` (SystemExit passes Flower's exception handlers by)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class Stopped(BaseException):
    """Ctrl-C or SIGTERM (kill, systemd, docker stop): not an Exception, so no handler of Flower's takes it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop(signum: int, frame) -> NoReturn:
    raise Stopped(signum)


def wait_for_server(address: str, root_certificates: bytes | None, timeout: float, quiet: bool = False) -> bool:
    """Probe the server every quarter second until it answers or `timeout` seconds pass; say so every 5 s."""
    deadline = time.monotonic() + timeout
    said = -math.inf
    while True:
        if root_certificates is None:
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
        try:
            # A fresh channel tries at once; one kept open would wait out gRPC's own reconnect backoff
            grpc.channel_ready_future(channel).result(timeout=max(0.05, min(0.25, deadline - time.monotonic())))
            return True
        except grpc.FutureTimeoutError:
            pass
        finally:
            channel.close()
        now = time.monotonic()
        if now >= deadline:
            return False
        if not quiet and now - said >= 5:
            print(f"server {address} not reachable yet, retrying ({deadline - now:.0f} s left)", flush=True)
            said = now


def listens(address: str) -> bool:
    """Whether anything accepts a TCP connection at HOST:PORT (a server, whatever it speaks)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def main() -> None:
    flags.quick_exit()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        connect()
    except Stopped as e:
        print(f"client.py: {'interrupted' if e.signum == signal.SIGINT else 'terminated'}", file=sys.stderr)
        sys.exit(128 + e.signum)


def connect() -> None:
    """Parse the flags, load this client's data, wait for the server, then train and evaluate when asked."""
    parser = config.client_parser("Flower client training the tutorial's CNN on CIFAR-10.")
    parser.add_argument(
        "--server-address", type=flags.host_port, default="127.0.0.1:8080", help="the server's HOST:PORT"
    )
    parser.add_argument(
        "--root-certificates",
        type=flags.existing_file,
        default=None,
        help="CA certificate (PEM) to verify a TLS server; plain text without it",
    )
    parser.add_argument(
        "--connect-timeout",
        type=flags.positive_float,
        default=60.0,
        help="seconds to keep retrying while the server is not up",
    )
    args = parser.parse_args()
    given = flags.given(parser)
    config.check_partition_args(parser, args, given)
    taken = privacy.dp_sgd_training(args, given)
    options.check_device(parser, args.device)

    try:
        participant = Participant(args)
    except (DataError, models.ModelError) as e:
        flags.die(str(e), parser.prog)
    if taken:
        print(f"DP-SGD trains with its own {' '.join(taken)} (give the flag to change one)")
    for note in (participant.resize_note, participant.batch_note):
        if note:
            print(note)
    print(participant.describe(), flush=True)
    root_certificates = args.root_certificates.read_bytes() if args.root_certificates else None

    if not wait_for_server(args.server_address, root_certificates, args.connect_timeout):
        within = f"within {args.connect_timeout:g} s"
        if not listens(args.server_address):
            why = f"no server answered at {args.server_address} {within}: start server.py first, or check --server-address"
        elif root_certificates:
            why = (f"a server listens at {args.server_address}, but no TLS connection was made {within}: "
                   "--root-certificates must hold the CA that signed its certificate")  # fmt: skip
        else:
            why = (f"a server listens at {args.server_address}, but did not answer in plain text {within}: "
                   "if it uses TLS, pass --root-certificates CA")  # fmt: skip
        print(f"{parser.prog}: error: {why}", file=sys.stderr)
        sys.exit(1)
    try:
        fl.client.start_client(
            server_address=args.server_address,
            client=CifarClient(participant, parser.prog).to_client(),
            root_certificates=root_certificates,
            insecure=root_certificates is None,
        )
    except grpc.RpcError as e:  # the server went away mid-run (stopped, killed, its machine gone)
        status = f"{e.code().name}: {e.details()}" if hasattr(e, "code") else str(e)
        fail(parser.prog, f"lost the server at {args.server_address} ({status})", 1)


if __name__ == "__main__":
    main()
