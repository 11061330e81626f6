"""A client's local job, the same in both client faces: its share of the data, its model, fit and evaluate."""

import argparse
import os
import time
from pathlib import Path

import numpy as np

import cifar
from federation import model, screening
from pipeline import batches, cores, models, options, partitions, sources


class ModelMismatch(Exception):
    """The server sent a model that does not fit this client's (another --model, or data with other classes)."""


class Participant:
    """One client's data share, model and local work; both client faces wrap it.

    Without partition flags the client trains on the full training set and evaluates on the test
    set (the tutorial). With --num-partitions it trains on its own partition less --holdout, and
    evaluates on the held-out part, as a real client with only its own data would.
    """

    def __init__(self, args: argparse.Namespace, data: sources.Data | None = None, dp_history=None) -> None:
        self.args = args
        self.device = options.resolve_device(args.device)
        self.cores = cores.CoreShare(args.threads)  # --threads, or this machine's cores among its live clients
        data = data or sources.load_arrays(args.data_root, args.cache_dir, args.image_size)
        seed = args.seed if args.seed is not None else 0  # the partitioning every client must share
        train_idx = test_idx = None
        test_from_train = False
        if args.num_partitions:
            if args.num_partitions > len(data.train_y):
                raise sources.DataError(
                    f"--num-partitions {args.num_partitions} is more than the {len(data.train_y)} training images: "
                    "use fewer partitions"
                )
            share = partitions.partition_indices(
                data.train_y, args.num_partitions, args.partition_id, args.partitioner, args.alpha, seed, args.cache_dir
            )
            if len(share) < 2:
                raise sources.DataError(
                    f"partition {args.partition_id} of {args.num_partitions} holds {len(share)} of "
                    f"{len(data.train_y)} training images: too few to train on; use fewer partitions"
                )
            if args.holdout > 0:
                train_idx, test_idx = partitions.split_holdout(share, args.holdout, seed + args.partition_id)
                test_from_train = True
            else:
                train_idx = share
        # Each client shuffles its own way: from --seed and its partition, or at random as the tutorial's did
        self.shuffle_seed = (
            args.seed + (args.partition_id or 0) if args.seed is not None else int.from_bytes(os.urandom(4), "big")
        )
        self.num_classes = data.num_classes(args.num_classes)
        self.net, self.layout = model.build(args.model, self.num_classes, data.image_size, seed, self.device)
        batchnorm = models.has_batchnorm(self.net)
        subset = (train_idx, test_idx, test_from_train)
        kwargs = {"augment": args.augment, "mean_std": args.normalize, "drop_last": batchnorm}
        if args.pipeline == "tutorial":
            self.trainloader, self.testloader = batches.tutorial_loaders(
                data, args.batch_size, self.shuffle_seed, *subset, **kwargs
            )
        else:
            self.trainloader, self.testloader = batches.make_loaders(
                data, args.batch_size, self.device, self.shuffle_seed, *subset, **kwargs
            )
        self.resize_note = data.resize_note()
        self.batch_note = batches.remainder_note(self.num_train, args.batch_size, batchnorm)
        self.dpsgd = None
        if getattr(args, "dp_sgd", False):  # Opacus is imported only when asked for
            from federation.dpsgd import DpSgd

            self.dpsgd = DpSgd(self.net, args.model, args, self.shuffle_seed, dp_history)
        parted = bool(args.num_partitions)
        self.identity = {
            "partition_id": args.partition_id if parted else -1,
            "num_partitions": args.num_partitions or 0,
            "partition_scheme": screening.partition_scheme(args.partitioner, args.num_partitions, args.alpha, seed)
            if parted
            else 0,
        }

    @property
    def num_train(self) -> int:
        """Training examples this client holds."""
        return len(self.trainloader.dataset)

    @property
    def num_test(self) -> int:
        """Evaluation examples this client holds."""
        return len(self.testloader.dataset)

    def describe(self) -> str:
        """What this client trains, in one line."""
        seeded = "" if self.args.seed is not None else " (random; --seed N repeats it)"
        return (
            f"Client: {self.num_train} training and {self.num_test} evaluation examples, {self.layout.describe()}, "
            f"shuffle seed {self.shuffle_seed}{seeded}"
        )

    def load(self, weights: list[np.ndarray]) -> None:
        """Take the global model; ModelMismatch when it is not this client's model."""
        if len(weights) != len(self.layout.keys):
            problem = f"it has {len(weights)} arrays, this client's {self.layout.model} has {len(self.layout.keys)}"
        else:
            problem = self.layout.mismatch(list(self.layout.keys), [np.shape(w) for w in weights])
        if problem:
            raise ModelMismatch(
                f"the server's model does not fit this client's ({problem}): start the server and the clients "
                "with the same --model, and data with the same classes (or the same --num-classes)"
            )
        models.set_weights(self.net, weights)

    def share(self) -> str:
        """This client's data share, as its DP-SGD ledger names it."""
        a, parted = self.args, self.identity["num_partitions"] > 0
        where = str(Path(a.data_root).expanduser().resolve())
        return f"{where}/{self.identity['partition_scheme']}/{self.identity['partition_id']}" + (
            "" if parted else f"/whole/{self.shuffle_seed}"
        )

    def fit(
        self,
        weights: list[np.ndarray],
        proximal_mu: float = 0.0,
        run: str = "",
        spent: dict | None = None,
        central_dp: bool = False,
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train from the global weights; return (new weights, examples, metrics). `run`: the server's run id;
        `spent`: the DP-SGD epsilon the run has on record per partition id (for a client's ledger);
        `central_dp`: the server says the run is under central DP. Under any DP, what no epsilon covers is
        withheld (see `private_metrics`)."""
        start = time.perf_counter()
        self.cores.apply()  # the clients running now share the cores
        self.load(weights)
        before = self.probe()
        a = self.args
        if self.dpsgd is not None:
            if proximal_mu:
                raise ModelMismatch("DP-SGD clips each example's gradient: it does not add FedProx's proximal term")
            if run:
                on_record = (spent or {}).get(str(self.identity["partition_id"]), 0.0)
                self.dpsgd.attach(run, self.share(), on_record if self.identity["num_partitions"] else 0.0)
            loss = self.dpsgd.train(self.trainloader, a.epochs, self.device)
            self.dpsgd.record()  # the spend is on record before the update leaves
        else:
            loss = cifar.train(
                self.net,
                self.trainloader,
                a.epochs,
                self.device,
                a.lr,
                a.momentum,
                a.weight_decay,
                proximal_mu=proximal_mu,
                cuda_graph=getattr(a, "cuda_graph", True),
                # Every 100 steps, the cores again shared among the clients alive now: one that started alone
                # (a Deployment Engine message, started a poll earlier than the other's) gives a core back
                on_progress=lambda *_: self.cores.apply(),
            )
        after = self.probe()
        seconds = time.perf_counter() - start
        prox = f", proximal mu {proximal_mu:g}" if proximal_mu else ""
        private = {}
        if self.dpsgd is not None:
            private = {"dp_epsilon": self.dpsgd.epsilon(a.dp_delta), "dp_sgd_noise": a.dp_sgd_noise,
                       "dp_sgd_clip": a.dp_sgd_clip, "dp_delta": a.dp_delta}  # fmt: skip
            prox += f", DP-SGD epsilon {private['dp_epsilon']:.3f} at delta {a.dp_delta:g}"
        print(
            f"fit: {a.epochs} epoch(s) on {self.num_train} examples{prox}, loss {loss:.4f}, {seconds:.1f} s", flush=True
        )
        if screening.diverged(before, after):
            print(f"WARNING: the model diverged in training: loss {before:.3g} before, {after:.3g} after, on "
                  f"{min(self.num_test, screening.PROBE_EXAMPLES)} evaluation examples (learning rate too high? "
                  "a BatchNorm model fed tiny batches?); the server rejects this update", flush=True)  # fmt: skip
        settings = {
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "momentum": a.momentum,
            "weight_decay": a.weight_decay,
            "augment": int(a.augment),
            "normalize": int(a.normalize),
            "proximal_mu": proximal_mu,
        }
        probes = {"loss_before": before, "loss_after": after}
        metrics = {"train_loss": loss, "fit_seconds": seconds, **self.identity, **settings, **private, **probes}
        if central_dp or self.dpsgd is not None:
            return models.get_weights(self.net), screening.coarse_count(self.num_train), private_metrics(metrics)
        return models.get_weights(self.net), self.num_train, metrics

    def probe(self) -> float:
        """The model's mean loss on the first PROBE_EXAMPLES of this client's evaluation data (eval mode)."""
        first, n = [], 0
        for images, labels in self.testloader:
            first.append((images[: screening.PROBE_EXAMPLES - n], labels[: screening.PROBE_EXAMPLES - n]))
            n += len(first[-1][1])
            if n >= screening.PROBE_EXAMPLES:
                break
        loss, _ = cifar.test(self.net, first, self.device)
        return loss

    def evaluate(self, weights: list[np.ndarray], central_dp: bool = False) -> tuple[float, int, dict]:
        """Test the global weights on this client's evaluation data; return (loss, examples, metrics). Under
        DP no epsilon covers the result: withheld, untested (loss 0 and `withheld` 1, which the server skips)."""
        if central_dp or self.dpsgd is not None:
            print("evaluate: withheld under differential privacy (no epsilon covers it)", flush=True)
            return 0.0, screening.coarse_count(self.num_test), {"withheld": 1}
        start = time.perf_counter()
        self.load(weights)
        loss, accuracy = cifar.test(self.net, self.testloader, self.device)
        seconds = time.perf_counter() - start
        print(f"evaluate: loss {loss:.4f}, accuracy {accuracy:.4f} on {self.num_test} examples", flush=True)
        return loss, self.num_test, {"accuracy": accuracy, "eval_seconds": seconds}


def private_metrics(metrics: dict) -> dict:
    """What a client under DP sends with its update: its identity, settings and epsilon; its losses (the
    blow-up probe's too) and timing are withheld, since no epsilon covers them."""
    kept = {k: v for k, v in metrics.items() if k not in screening.WITHHELD}
    return {**kept, "withheld": 1}
