"""Flower client: a NumPyClient wrapping cifar.py's train and test (the tutorial's `start_client`).

`python3 client.py` connects to server.py over gRPC. The current Flower API (a ClientApp on the
Message API) is client_app.py; both wrap the same `federation.Participant`.
"""

import sys
import time

import flwr as fl
import grpc
import numpy as np

import cifar
import federation
import flags


class CifarClient(fl.client.NumPyClient):
    """Trains and evaluates the tutorial's Net on this client's data."""

    def __init__(self, participant: federation.Participant) -> None:
        self.participant = participant

    def get_parameters(self, config) -> list[np.ndarray]:
        return cifar.get_weights(self.participant.net)

    def fit(self, parameters, config):
        # FedProx sends its proximal term's weight; every other strategy trains plainly
        return self.participant.fit(parameters, proximal_mu=float(config.get("proximal_mu", 0.0)))

    def evaluate(self, parameters, config):
        return self.participant.evaluate(parameters)


def wait_for_server(address: str, root_certificates: bytes | None, timeout: float, quiet: bool = False) -> bool:
    """Probe the server with backoff until it answers or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        if root_certificates is None:
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
        try:
            left = deadline - time.monotonic()
            grpc.channel_ready_future(channel).result(timeout=max(0.1, min(delay, left)))
            return True
        except grpc.FutureTimeoutError:
            pass
        finally:
            channel.close()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not quiet:
            print(f"server {address} not reachable yet, retrying ({left:.0f} s left)", flush=True)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 8.0)


def main() -> None:
    parser = federation.client_parser("Flower client training the tutorial's CNN on CIFAR-10.")
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
    federation.check_partition_args(parser, args)
    cifar.check_device(parser, args.device)

    try:
        participant = federation.Participant(args)
    except cifar.DataError as e:
        flags.die(str(e), parser.prog)
    root_certificates = args.root_certificates.read_bytes() if args.root_certificates else None

    if not wait_for_server(args.server_address, root_certificates, args.connect_timeout):
        hint = (
            " and that --root-certificates holds the CA that signed the server's certificate"
            if root_certificates
            else "; if the server uses TLS, pass --root-certificates CA"
        )
        print(
            f"{parser.prog}: error: no server answered at {args.server_address} within "
            f"{args.connect_timeout:g} s: start server.py first, or check --server-address{hint}",
            file=sys.stderr,
        )
        sys.exit(1)
    fl.client.start_client(
        server_address=args.server_address,
        client=CifarClient(participant).to_client(),
        root_certificates=root_certificates,
        insecure=root_certificates is None,
    )


if __name__ == "__main__":
    main()
