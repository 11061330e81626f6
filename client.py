"""Flower client: a NumPyClient wrapping cifar.py's train and test.

`python3 client.py` connects to server.py over gRPC (the tutorial's way); `app` is the same
client as a Flower ClientApp for `flwr run` (Simulation and Deployment Engines).
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import flwr as fl
import grpc
import numpy as np
import torch
from flwr.app import Context
from flwr.clientapp import ClientApp

import cifar
import flags

HOLDOUT_FRACTION = 0.1  # of a partition, kept back for the client's own evaluation


class CifarClient(fl.client.NumPyClient):
    """Trains and evaluates the tutorial's Net on this client's data."""

    def __init__(self, net, trainloader, testloader, device, epochs=1, **optimizer):
        self.net, self.trainloader, self.testloader = net, trainloader, testloader
        self.device, self.epochs, self.optimizer = device, epochs, optimizer  # lr, momentum, weight_decay

    def get_parameters(self, config) -> list[np.ndarray]:
        return cifar.get_weights(self.net)

    def fit(self, parameters, config):
        start = time.perf_counter()
        cifar.set_weights(self.net, parameters)
        loss = cifar.train(self.net, self.trainloader, self.epochs, self.device, **self.optimizer)
        seconds = time.perf_counter() - start
        print(
            f"fit: {self.epochs} epoch(s) on {len(self.trainloader.dataset)} examples, loss {loss:.4f}, {seconds:.1f} s"
        )
        metrics = {"train_loss": loss, "fit_seconds": seconds}
        return cifar.get_weights(self.net), len(self.trainloader.dataset), metrics

    def evaluate(self, parameters, config):
        start = time.perf_counter()
        cifar.set_weights(self.net, parameters)
        loss, accuracy = cifar.test(self.net, self.testloader, self.device)
        seconds = time.perf_counter() - start
        print(f"evaluate: loss {loss:.4f}, accuracy {accuracy:.4f} on {len(self.testloader.dataset)} examples")
        return loss, len(self.testloader.dataset), {"accuracy": accuracy, "eval_seconds": seconds}


def build_client(args: argparse.Namespace, data: cifar.Data | None = None) -> CifarClient:
    """Load this client's share of the data and wrap it in a CifarClient.

    Without partition flags every client trains on the full training set and evaluates
    on the test set (the tutorial). With --num-partitions, a client trains on 90% of its
    own partition and evaluates on the held-out 10% (--holdout), as a real client with only
    its own data would; the server judges the global model on the full test set.
    """
    device = cifar.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_idx = test_idx = None
    test_from_train = False
    data = data or cifar.load_data(args.data_root, args.cache_dir)
    if args.num_partitions:
        share = cifar.partition_indices(
            data.train_y, args.num_partitions, args.partition_id, args.partitioner, args.alpha, args.seed
        )
        if args.holdout > 0:
            train_idx, test_idx = cifar.split_holdout(share, args.holdout, args.seed + args.partition_id)
            test_from_train = True
        else:
            train_idx = share
    # Each client shuffles differently, but reproducibly from the one --seed
    shuffle_seed = args.seed + (args.partition_id or 0)
    subset = (train_idx, test_idx, test_from_train)
    options = {"augment": args.augment, "mean_std": args.normalize}
    if args.pipeline == "tutorial":
        loaders = cifar.tutorial_loaders(data, args.batch_size, shuffle_seed, *subset, **options)
    else:
        loaders = cifar.make_loaders(data, args.batch_size, device, shuffle_seed, *subset, **options)
    net = cifar.make_net(args.seed, device)
    optimizer = {"lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay}
    return CifarClient(net, *loaders, device, args.epochs, **optimizer)


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


def add_share_args(parser: flags.Parser, choices: tuple[str, ...] = cifar.PARTITIONERS) -> None:
    """How the training set is shared out between clients, and what a client evaluates on."""
    parser.add_argument(
        "--partitioner",
        choices=choices,
        default="iid",
        help="iid: equal random shares; dirichlet: label skew drawn from Dir(alpha)"
        + ("; none: every client gets all of it (the tutorial)" if "none" in choices else ""),
    )
    parser.add_argument(
        "--alpha", type=flags.positive_float, default=0.5, help="Dirichlet concentration: smaller is more skewed"
    )
    parser.add_argument(
        "--holdout",
        type=flags.proportion,
        default=HOLDOUT_FRACTION,
        help="share of a client's partition kept back for its evaluation; 0: train on all of it and evaluate "
        "on the test set",
    )


def add_partition_args(parser: flags.Parser) -> None:
    """Flags that give a client its own share of the training data."""
    parser.add_argument(
        "--partition-id", type=flags.non_negative_int, default=None, help="this client's partition, 0..num-partitions-1"
    )
    parser.add_argument(
        "--num-partitions",
        type=flags.positive_int,
        default=None,
        help="split the training set into this many shares (default: every client gets all of it, as in the tutorial)",
    )
    add_share_args(parser)


def check_partition_args(parser: flags.Parser, args: argparse.Namespace) -> None:
    """Both partition flags or neither, and the id within range."""
    if (args.partition_id is None) != (args.num_partitions is None):
        parser.error("--partition-id and --num-partitions go together")
    if args.num_partitions is not None and args.partition_id >= args.num_partitions:
        parser.error(f"--partition-id {args.partition_id} is not in 0..{args.num_partitions - 1}")


def main() -> None:
    parser = flags.Parser(description="Flower client training the tutorial's CNN on CIFAR-10.")
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
    cifar.add_data_args(parser)
    cifar.add_train_args(parser, epochs=1)
    add_partition_args(parser)
    args = parser.parse_args()
    check_partition_args(parser, args)
    cifar.check_device(parser, args.device)

    try:
        client = build_client(args)
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
        client=client.to_client(),
        root_certificates=root_certificates,
        insecure=root_certificates is None,
    )


# ---------------------------------------------------------------- Flower App


# A simulation runs many clients in one process: decode the data once per process
_shared_data = functools.cache(cifar.load_data)


def client_fn(context: Context):
    """Build this node's client from the run config and the node's partition."""
    args = run_config_args(context.run_config, context.node_config)
    return build_client(args, _shared_data(args.data_root, args.cache_dir)).to_client()


def run_config_args(run_config: dict, node_config: dict) -> argparse.Namespace:
    """The client's flags from a Flower App's run config (keys as in pyproject.toml)."""
    num_partitions = node_config.get("num-partitions")
    return argparse.Namespace(
        data_root=str(Path(str(run_config["data-root"])).expanduser()),
        cache_dir=str(run_config.get("cache-dir", cifar.CACHE_DIR)),
        pipeline=str(run_config.get("pipeline", "fast")),
        epochs=int(run_config["local-epochs"]),
        batch_size=int(run_config["batch-size"]),
        lr=float(run_config["lr"]),
        momentum=float(run_config["momentum"]),
        weight_decay=float(run_config["weight-decay"]),
        augment=bool(run_config["augment"]),
        normalize=bool(run_config["normalize"]),
        device=str(run_config.get("device", "auto")),
        threads=int(run_config.get("threads", 0)) or None,
        seed=int(run_config["seed"]),
        partition_id=int(node_config["partition-id"]) if num_partitions else None,
        num_partitions=int(num_partitions) if num_partitions else None,
        partitioner=str(run_config["partitioner"]),
        alpha=float(run_config["alpha"]),
        holdout=float(run_config["holdout"]),
    )


app = ClientApp(client_fn=client_fn)


if __name__ == "__main__":
    main()
