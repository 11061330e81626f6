"""The attack suite: a client that trains on its own data, then poisons its update as the literature does.

    python3 attacks.py --attack reversed --boost 5 --partition-id 2 --num-partitions 3   # + client.py's flags

A research tool beside the tutorial's client.py, to test a server's defence with real processes. Each
attack needs only the attacker's own data and the global model it receives, never an honest update:
    reversed     the global model moved back along its own honest update, --boost times as far
    ipm          inner product manipulation (Xie et al. 2020): -epsilon x its own update (byzfl)
    labelflip    honest training on flipped labels (class c becomes C-1-c)
    noise        its own update plus Gaussian noise, --boost times the update's own length
    replacement  model replacement (Bagdasaryan et al. 2020) towards the label-flipped model, scaled to just
                 inside the bound the server applies (its --screen, --clip-factor, --max-update-norm, which the
                 attacker is told, as a reader of the README would be)
    alie         "A little is enough" (Baruch et al. 2019): --colluders clients pool their own updates in
                 --collude-dir and all send mean + z x std of them, coordinate by coordinate (byzfl)
The Flower App's face is attack_app.py.
"""

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

import client
import flags
from federation import config, robust
from federation.participant import Participant
from pipeline import batches, options
from pipeline.sources import DataError

ATTACKS = ("reversed", "ipm", "labelflip", "noise", "replacement", "alie")


def add_attack_args(parser: flags.Parser) -> None:
    """The attack and its parameters, and what the attacker knows of the server's defence."""
    parser.add_argument("--attack", choices=ATTACKS, required=True, help="the attack (see the module's docstring)")
    parser.add_argument("--boost", type=flags.positive_float, default=5.0, help="reversed, noise: how many times")
    parser.add_argument("--epsilon", type=flags.positive_float, default=0.5, help="ipm: the scale of -own update")
    parser.add_argument("--z", type=flags.positive_float, default=1.0, help="alie: standard deviations pushed")
    parser.add_argument("--colluders", type=flags.positive_int, default=2, help="alie: how many pool their updates")
    parser.add_argument("--collude-dir", type=Path, default=None, help="alie: the folder the colluders share")
    parser.add_argument("--screen", choices=robust.SCREENS, default="consensus", help="replacement: the server's")
    parser.add_argument("--clip-factor", type=flags.non_negative_float, default=2.0, help="replacement: the server's")
    parser.add_argument(
        "--max-update-norm", type=flags.non_negative_float, default=10.0, help="replacement: the server's"
    )


class Attacker:
    """Participant's fit, poisoned; evaluation stays honest. Quacks like a Participant for both client faces."""

    def __init__(self, participant: Participant, args: argparse.Namespace) -> None:
        self.me, self.args = participant, args
        self.net, self.layout = participant.net, participant.layout
        self.flipped = None
        self.rng = np.random.default_rng(participant.shuffle_seed)
        if args.attack in ("labelflip", "replacement"):
            loader = participant.trainloader
            if not isinstance(loader, batches.Batches):
                raise DataError("--attack labelflip and replacement flip the labels of the fast pipeline only")
            flipped = participant.num_classes - 1 - loader.y
            self.flipped = batches.Batches(loader.x, flipped, loader.batch_size, True,
                                           participant.shuffle_seed, loader.augment, loader.mean_std)  # fmt: skip

    def evaluate(self, weights, central_dp: bool = False):
        return self.me.evaluate(weights, central_dp)

    def fit(
        self,
        weights: list[np.ndarray],
        proximal_mu: float = 0.0,
        run: str = "",
        spent: dict | None = None,
        central_dp: bool = False,
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train honestly (the metrics look honest, withheld under DP as an honest client's are), then send the
        attack's update instead."""
        a, mask = self.args, self.layout.weights
        honest, n, metrics = self.me.fit(weights, proximal_mu, run, spent, central_dp)
        own = robust.change(honest, weights, mask)
        if a.attack == "reversed":
            poison = -a.boost * own
        elif a.attack == "ipm":
            poison = byzfl().InnerProductManipulation(tau=float(a.epsilon))(own[None, :])
        elif a.attack == "noise":
            noise = self.rng.standard_normal(own.shape)
            poison = own + noise / np.linalg.norm(noise) * a.boost * np.linalg.norm(own)
        elif a.attack == "labelflip":
            poison = self._flipped_change(weights, proximal_mu)
        elif a.attack == "replacement":
            poison = self._replacement(weights, own, proximal_mu)
        else:
            poison = self._alie(weights, own)
        print(f"attack {a.attack}: sent a change of length {np.linalg.norm(poison):.3g} "
              f"(its honest one: {np.linalg.norm(own):.3g})", flush=True)  # fmt: skip
        return robust.apply_change(poison, honest, weights, mask), n, metrics

    def _flipped_change(self, weights, proximal_mu) -> np.ndarray:
        honest_loader = self.me.trainloader
        self.me.trainloader = self.flipped
        try:
            trained, _, _ = self.me.fit(weights, proximal_mu)
        finally:
            self.me.trainloader = honest_loader
        return robust.change(trained, weights, self.layout.weights)

    def _replacement(self, weights, own, proximal_mu) -> np.ndarray:
        """Towards the label-flipped model, as far as the server's bound lets it (estimated from own data)."""
        a = self.args
        target = self._flipped_change(weights, proximal_mu)
        if a.screen == "consensus" and a.clip_factor:
            # The consensus is near its own update; the honest spread it estimates from a second honest run
            again = robust.change(self.me.fit(weights, proximal_mu)[0], weights, self.layout.weights)
            spread = np.linalg.norm(again - own) / np.sqrt(2)
            step = target - own
            return own + step / max(np.linalg.norm(step), 1e-12) * a.clip_factor * spread * 0.99
        if a.max_update_norm:
            bound = a.max_update_norm * robust.norm(weights, self.layout.weights)
            return target / max(np.linalg.norm(target), 1e-12) * bound * 0.99
        return target * a.boost

    def _alie(self, weights, own) -> np.ndarray:
        """Pool the colluders' own updates for this global model, then all send mean + z x std."""
        a = self.args
        key = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()[:16]
        folder = a.collude_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"writing-{os.getpid()}.npy"  # not a colluder's update until it is renamed
        np.save(tmp, own)
        os.replace(tmp, folder / f"{os.getpid()}.npy")
        deadline = time.monotonic() + 600
        while len(pooled := sorted(folder.glob("[0-9]*.npy"))) < a.colluders:
            if time.monotonic() > deadline:
                raise RuntimeError(f"alie: only {len(pooled)} of {a.colluders} colluders in {folder} after 600 s")
            time.sleep(0.05)
        updates = np.stack([np.load(p) for p in pooled[: a.colluders]])
        return byzfl().ALittleIsEnough(tau=float(a.z))(updates)


def byzfl():
    """byzfl's attacks, imported only when an attack needs them (importing byzfl takes seconds)."""
    from byzfl import attacks

    return attacks


def check_attack_args(parser: flags.Parser, args: argparse.Namespace) -> None:
    """Settings an attack needs."""
    if args.attack == "alie" and args.collude_dir is None:
        parser.error("--attack alie needs --collude-dir, a folder all its --colluders share")
    if args.attack in ("labelflip", "replacement") and args.pipeline != "fast":
        parser.error(f"--attack {args.attack} flips the labels of --pipeline fast only")


def main() -> None:
    flags.quick_exit()
    parser = config.client_parser("A poisoning client for testing a server's defence (the attack suite).")
    add_attack_args(parser)
    parser.add_argument("--server-address", type=flags.host_port, default="127.0.0.1:8080", help="the server")
    parser.add_argument("--connect-timeout", type=flags.positive_float, default=60.0, help="seconds to keep retrying")
    args = parser.parse_args()
    config.check_partition_args(parser, args, flags.given(parser))
    check_attack_args(parser, args)
    options.check_device(parser, args.device)
    try:
        attacker = Attacker(Participant(args), args)
    except DataError as e:
        flags.die(str(e), parser.prog)
    if not client.wait_for_server(args.server_address, None, args.connect_timeout, quiet=True):
        flags.die(f"no server answered at {args.server_address}", parser.prog)
    import flwr as fl

    print(f"Attacker ({args.attack}): {attacker.me.describe()}", flush=True)
    fl.client.start_client(server_address=args.server_address, client=client.CifarClient(attacker).to_client())
    sys.exit(0)


if __name__ == "__main__":
    main()
