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
    backdoor     a pixel-pattern backdoor (BadNets' trigger, federation/backdoor.py): --poison-fraction of its
                 images stamped and relabelled --target-class, its update then boosted --boost times (model
                 replacement, Bagdasaryan et al. 2020: boost = the clients a round), the boost capped just inside
                 the server's --max-update-norm. It stamps before its own --augment, whose crops and flips
                 then move its trigger (a weaker attack)
    backdoor-scaled  constrain-and-scale against the published screen (the same paper): its honest update plus
                 the backdoor's difference, scaled to just inside the clip radius it estimates from a second honest
                 run, so it is neither clipped nor rejected; with --screen none, as backdoor
    minmax       min-max (Shejwalkar & Houmansadr, NDSS 2021), non-omniscient: the mean of the colluders' own
                 updates minus gamma x --deviation, gamma the largest whose farthest distance to any of those
                 updates stays within their own largest pairwise distance
    minsum       min-sum (the same paper): gamma the largest whose sum of squared distances to them stays within
                 the largest such sum among them (the paper's bound; the authors' code uses the smallest)
    mimic        Mimic (Karimireddy et al. 2022): every colluder sends the same one of their own honest updates
                 (the farthest from their mean), over-weighting one client's data (byzfl)
min-max and min-sum pool --colluders clients' updates in --collude-dir as alie does; a lone attacker
(--colluders 1) estimates the spread from --estimates honest runs of its own instead: reruns on the same
data, whose spread is only the shuffle's, so its gamma is small and its update close to honest.
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
from federation import backdoor, config, robust
from federation.participant import Participant
from pipeline import batches, options
from pipeline.sources import DataError

ATTACKS = ("reversed", "ipm", "labelflip", "noise", "replacement", "alie", "backdoor", "backdoor-scaled", "minmax",
           "minsum", "mimic")  # fmt: skip
POOLED = ("alie", "minmax", "minsum", "mimic")  # attacks whose colluders pool their updates
RETRAINED = ("labelflip", "replacement", "backdoor", "backdoor-scaled")  # attacks that train on altered data


def add_attack_args(parser: flags.Parser) -> None:
    """The attack and its parameters, and what the attacker knows of the server's defence."""
    parser.add_argument("--attack", choices=ATTACKS, required=True, help="the attack (see the module's docstring)")
    parser.add_argument(
        "--boost", type=flags.positive_float, default=5.0, help="reversed, noise, backdoor: how many times"
    )
    parser.add_argument("--epsilon", type=flags.positive_float, default=0.5, help="ipm: the scale of -own update")
    parser.add_argument("--z", type=flags.positive_float, default=1.0, help="alie: standard deviations pushed")
    parser.add_argument("--colluders", type=flags.positive_int, default=2, help="alie, minmax, minsum, mimic: how "
                        "many pool their updates (1: a lone attacker)")  # fmt: skip
    parser.add_argument("--collude-dir", type=Path, default=None, help="the folder the colluders share")
    parser.add_argument("--estimates", type=flags.positive_int, default=2, help="minmax, minsum alone: extra "
                        "honest runs it estimates the spread from")  # fmt: skip
    parser.add_argument("--deviation", choices=("unit", "std", "sign"), default="unit",
                        help="minmax, minsum: the direction pushed against (the mean's unit vector, the "
                        "coordinates' std, or the mean's sign)")  # fmt: skip
    parser.add_argument("--target-class", type=flags.non_negative_int, default=0, help="backdoor: its target")
    parser.add_argument("--poison-fraction", type=flags.fraction, default=0.5, help="backdoor: images stamped")
    parser.add_argument(
        "--screen", choices=robust.SCREENS, default="consensus", help="replacement, backdoor: the server's"
    )
    parser.add_argument(
        "--clip-factor", type=flags.non_negative_float, default=robust.CLIP_FACTOR,
        help="replacement, backdoor: the server's",
    )  # fmt: skip
    parser.add_argument(
        "--max-update-norm", type=flags.non_negative_float, default=robust.MAX_UPDATE_NORM,
        help="replacement: the server's",
    )  # fmt: skip


class Attacker:
    """Participant's fit, poisoned; evaluation stays honest. Quacks like a Participant for both client faces."""

    def __init__(self, participant: Participant, args: argparse.Namespace) -> None:
        self.me, self.args = participant, args
        self.net, self.layout = participant.net, participant.layout
        self.altered = None  # the training set of an attack that trains on altered data
        self.rng = np.random.default_rng(participant.shuffle_seed)
        if args.attack in RETRAINED:
            loader = participant.trainloader
            if not isinstance(loader, batches.Batches):
                raise DataError(f"--attack {args.attack} alters the data of the fast pipeline only")
            if args.attack.startswith("backdoor"):
                if args.target_class >= participant.num_classes:
                    raise DataError(f"--target-class {args.target_class}: the data has {participant.num_classes}")
                x, y = backdoor.poison(loader.x, loader.y, args.target_class, args.poison_fraction,
                                       participant.shuffle_seed)  # fmt: skip
            else:
                x, y = loader.x, participant.num_classes - 1 - loader.y
            self.altered = batches.Batches(x, y, loader.batch_size, True, participant.shuffle_seed, loader.augment,
                                           loader.mean_std, loader.drop_last)  # fmt: skip

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
            poison = self._altered_change(weights, proximal_mu)
        elif a.attack == "replacement":
            poison = self._replacement(weights, own, self._altered_change(weights, proximal_mu), proximal_mu)
        elif a.attack == "backdoor" or (a.attack == "backdoor-scaled" and a.screen == "none"):
            poison = self._bounded(weights, a.boost * self._altered_change(weights, proximal_mu))
        elif a.attack == "backdoor-scaled":
            poison = self._replacement(weights, own, self._altered_change(weights, proximal_mu), proximal_mu)
        else:
            pool = self._pool(weights, own, proximal_mu)
            poison = self._pooled_attack(pool)
        print(f"attack {a.attack}: sent a change of length {np.linalg.norm(poison):.3g} "
              f"(its honest one: {np.linalg.norm(own):.3g})", flush=True)  # fmt: skip
        return robust.apply_change(poison, honest, weights, mask), n, metrics

    def _altered_change(self, weights, proximal_mu) -> np.ndarray:
        """Its change when trained from the global model on its altered data (flipped labels, or poisoned)."""
        honest_loader = self.me.trainloader
        self.me.trainloader = self.altered
        try:
            trained, _, _ = self.me.fit(weights, proximal_mu)
        finally:
            self.me.trainloader = honest_loader
        return robust.change(trained, weights, self.layout.weights)

    def _bounded(self, weights, poison: np.ndarray) -> np.ndarray:
        """A change cut to just inside the server's --max-update-norm, which would reject it whole."""
        bound = robust.size_bound(weights, self.layout.weights, self.args.max_update_norm)
        size = float(np.linalg.norm(poison))
        return poison * (0.99 * bound / size) if bound and size > 0.99 * bound else poison

    def _replacement(self, weights, own, target, proximal_mu) -> np.ndarray:
        """Towards `target` (a change), as far as the server's bound lets it (estimated from own data)."""
        a = self.args
        if a.screen != "none" and a.clip_factor:
            # The consensus is near its own update; the honest spread it estimates from a second honest run
            again = robust.change(self.me.fit(weights, proximal_mu)[0], weights, self.layout.weights)
            spread = np.linalg.norm(again - own) / np.sqrt(2)
            step = target - own
            return own + step / max(np.linalg.norm(step), 1e-12) * a.clip_factor * spread * 0.99
        if a.max_update_norm:
            bound = robust.size_bound(weights, self.layout.weights, a.max_update_norm)
            return target / max(np.linalg.norm(target), 1e-12) * bound * 0.99
        return target * a.boost

    def _pool(self, weights, own, proximal_mu) -> np.ndarray:
        """The colluders' own honest updates for this global model, one a row; a lone attacker's own runs."""
        a = self.args
        if a.colluders == 1:
            extra = [robust.change(self.me.fit(weights, proximal_mu)[0], weights, self.layout.weights)
                     for _ in range(a.estimates)]  # fmt: skip
            return np.stack([own, *extra])
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
        return np.stack([np.load(p) for p in pooled[: a.colluders]])

    def _pooled_attack(self, pool: np.ndarray) -> np.ndarray:
        """What every colluder sends, from the pool of their honest updates."""
        a = self.args
        if a.attack == "alie":
            return byzfl().ALittleIsEnough(tau=float(a.z))(pool)
        if a.attack == "mimic":
            farthest = int(np.argmax(np.linalg.norm(pool - pool.mean(axis=0), axis=1)))
            return byzfl().Mimic(epsilon=farthest)(pool)
        return min_max(pool, a.deviation, summed=a.attack == "minsum")


def min_max(pool: np.ndarray, deviation: str = "unit", summed: bool = False, steps: int = 40) -> np.ndarray:
    """Min-max (or with `summed`, min-sum) of Shejwalkar & Houmansadr: mean - gamma x deviation for the largest
    gamma (bisection from 10, as their code does) whose largest distance (sum of squared distances) to the pool's
    updates stays within the pool's own largest."""
    mean = pool.mean(axis=0)
    if deviation == "unit":
        push = mean / max(float(np.linalg.norm(mean)), 1e-12)
    elif deviation == "std":
        push = pool.std(axis=0)
    else:
        push = np.sign(mean)
    pairwise = np.linalg.norm(pool[:, None, :] - pool[None, :, :], axis=2)
    limit = (pairwise**2).sum(axis=1).max() if summed else pairwise.max()

    def within(gamma: float) -> bool:
        distances = np.linalg.norm(pool - (mean - gamma * push), axis=1)
        return ((distances**2).sum() if summed else distances.max()) <= limit

    gamma, step, best = 10.0, 5.0, 0.0
    for _ in range(steps):  # their search: up while it succeeds, down while it fails, halving the step
        if within(gamma):
            best, gamma = gamma, gamma + step
        else:
            gamma -= step
        step /= 2
    return mean - best * push


def byzfl():
    """byzfl's attacks, imported only when an attack needs them (importing byzfl takes seconds)."""
    from byzfl import attacks

    return attacks


def check_attack_args(parser: flags.Parser, args: argparse.Namespace) -> None:
    """Settings an attack needs."""
    if args.attack in POOLED and args.colluders > 1 and args.collude_dir is None:
        parser.error(f"--attack {args.attack} needs --collude-dir, a folder all its --colluders share")
    if args.attack == "alie" and args.colluders < 2:
        parser.error("--attack alie needs --colluders 2 or more: its std is of their updates")
    if args.attack in RETRAINED and args.pipeline != "fast":
        parser.error(f"--attack {args.attack} alters the data of --pipeline fast only")


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
