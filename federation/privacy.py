"""Differential privacy: central (user-level) DP's flags, checks and accountant, and clients' DP-SGD with Opacus.

Central DP (`--dp server-clipping|client-clipping`) runs Flower's fixed-clipping wrappers: each sampled
client's update is clipped to --dp-clip-norm C, the updates are averaged with equal weights, and Gaussian
noise of std --dp-noise x C / m is added (m clients sampled of N). Flower's RDP accountant
(flwr.supercore.privacy_accounting) tracks the epsilon of the released models at --dp-delta: m of N
sampled without replacement, neighbours differing in one client's data (replace-one, sensitivity 2C),
or all N every round with no amplification (add/remove-one, sensitivity C).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np

import flags
from federation.dpsgd import GRAD_SAMPLE_MODES

DP_MODES = ("none", "server-clipping", "client-clipping")
DP_STRATEGIES = ("fedavg", "fedprox")  # a noised mean: what the Gaussian mechanism's epsilon describes
# RDP orders: Opacus's default fine ones up to 11, coarser above (sampling without replacement costs per order)
ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + [12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64])


class BudgetExhausted(Exception):
    """The next round would take epsilon past --dp-max-epsilon; the message says where the run stands."""


def add_central_args(parser: flags.Parser) -> None:
    """The server's flags of central (user-level) differential privacy."""
    parser.add_argument(
        "--dp",
        choices=DP_MODES,
        default="none",
        help="central differential privacy of the global model (Flower's fixed-clipping wrappers): each update "
        "clipped to --dp-clip-norm by the server, or by the clients; Gaussian noise added to their mean",
    )
    parser.add_argument(
        "--dp-clipping",
        choices=("fixed", "adaptive"),
        default="fixed",
        help="central DP: the clipping norm (adaptive is refused: see the README)",
    )
    parser.add_argument(
        "--dp-noise", type=flags.non_negative_float, default=1.0, help="central DP: the noise multiplier sigma"
    )
    parser.add_argument(
        "--dp-clip-norm", type=flags.positive_float, default=1.0, help="central DP: each update's L2 bound C"
    )
    add_delta_arg(parser)
    add_seed_arg(parser)
    parser.add_argument(
        "--dp-max-epsilon",
        type=flags.non_negative_float,
        default=0.0,
        help="central DP: stop before a round would take epsilon past this budget; 0: no budget",
    )


def add_seed_arg(parser: flags.Parser) -> None:
    """A seed for the privacy noise, for experiments only: whoever knows it can subtract the noise."""
    parser.add_argument(
        "--dp-seed",
        type=flags.seed_or_none,
        default=-1,
        help="seeds the DP noise (and DP-SGD's sampling), to repeat an experiment; never in a deployment: whoever "
        "knows the seed can subtract the noise; -1: fresh randomness from the operating system",
    )


def seed_noise(args: argparse.Namespace, releases: int) -> None:
    """Seed the RNG Flower's DP wrappers draw their noise from (NumPy's global one), when --dp-seed asks: from the
    seed and the noised models released so far, so that a resumed run never draws a released round's noise again."""
    if getattr(args, "dp_seed", -1) >= 0:
        np.random.seed([args.dp_seed, releases])


def add_delta_arg(parser: flags.Parser) -> None:
    """The delta at which epsilon is reported (central DP and DP-SGD alike)."""
    parser.add_argument("--dp-delta", type=flags.fraction, default=1e-5, help="the delta at which epsilon is reported")


DP_SGD_LEDGER = "~/.cache/flower-cifar/dp-sgd"
# What --dp-sgd trains with unless these flags are given. The tutorial's batches of 32 at lr 0.001 learn nothing
# once every example's gradient is clipped and noised: DP-SGD wants large batches (the noise on their mean
# shrinks with B) and a large step (BENCHMARKS.md, "DP-SGD: tuning")
DP_SGD_TRAINING = {"batch_size": 1024, "lr": 0.5, "epochs": 5}


def dp_sgd_training(args: argparse.Namespace, given: set[str]) -> list[str]:
    """Under --dp-sgd, the training flags not given take DP-SGD's values; the flags so set, as '--lr 0.5'."""
    if not getattr(args, "dp_sgd", False):
        return []
    taken = [k for k in DP_SGD_TRAINING if k not in given and hasattr(args, k)]
    for k in taken:
        setattr(args, k, DP_SGD_TRAINING[k])
    return [f"--{k.replace('_', '-')} {DP_SGD_TRAINING[k]:g}" for k in taken]


def add_dp_sgd_args(parser: flags.Parser, delta: bool = True) -> None:
    """A client's flags of sample-level DP-SGD (Opacus); `delta`: with --dp-delta (run.py has the server's)."""
    parser.add_argument(
        "--dp-sgd",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train with DP-SGD (Opacus): per-example gradients clipped to --dp-sgd-clip, Gaussian noise, "
        "Poisson-sampled batches; the client's epsilon is reported every round. Unless given, --batch-size, --lr "
        "and --epochs take DP-SGD's own values: "
        + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in DP_SGD_TRAINING.items()),
    )
    parser.add_argument("--dp-sgd-noise", type=flags.positive_float, default=1.0, help="DP-SGD: the noise multiplier")
    parser.add_argument(
        "--dp-sgd-clip", type=flags.positive_float, default=1.0, help="DP-SGD: each example's gradient L2 bound"
    )
    parser.add_argument(
        "--dp-sgd-mode",
        choices=GRAD_SAMPLE_MODES,
        default="ghost",
        help="DP-SGD: how Opacus gets each example's gradient norm (ghost: ghost clipping; the same maths, "
        "another speed: BENCHMARKS.md)",
    )
    parser.add_argument(
        "--dp-sgd-ledger",
        default=DP_SGD_LEDGER,
        help="DP-SGD: where the client keeps its spend, per run and data share, written before each update leaves: "
        "a restarted client goes on from it",
    )
    parser.add_argument(
        "--dp-sgd-fresh-ledger",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="DP-SGD: start from no spend although the run has one on record for this share (its epsilon then "
        "counts only from here: an under-count)",
    )
    if delta:
        add_delta_arg(parser)
        add_seed_arg(parser)


def central_problem(args: argparse.Namespace) -> str | None:
    """Why central DP cannot run with these settings, or None (also for --dp none)."""
    if args.dp == "none":
        return None
    if args.dp_clipping == "adaptive":
        return (
            "--dp-clipping adaptive is refused: flwr 1.42's adaptive-clipping wrappers take no accountant (their "
            "epsilon is unknown) and move the clipping norm the wrong way (down when every update is clipped)"
        )
    if args.screen != "none":
        return (
            f"--dp {args.dp} with --screen {args.screen}: the screen's verdict on one update depends on every "
            "other update, which voids the bound on one client's influence that epsilon rests on; add --screen none"
        )
    if args.strategy not in DP_STRATEGIES:
        return f"--dp {args.dp} needs a noised mean, --strategy {' or '.join(DP_STRATEGIES)}, not {args.strategy}"
    if args.dp_noise == 0 and args.dp_max_epsilon:
        return "--dp-noise 0 has no finite epsilon: a --dp-max-epsilon budget cannot hold"
    return None


class Accountant:
    """Flower's RDP accountant for the rounds of DP-FedAvg; its state travels with each checkpoint."""

    def __init__(self, args: argparse.Namespace, state: dict | None = None) -> None:
        from flwr.supercore import privacy_accounting  # Flower's, imported when a run asks for central DP
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.flower, self.rdp = privacy_accounting, RdpAccountant
        self.noise, self.delta, self.budget = args.dp_noise, args.dp_delta, args.dp_max_epsilon or None
        self.population = self.sample = 0  # the N and m accounted for
        self.this_round = 0  # the m of the round being run: the DP mean's divisor
        self._accountant = None
        self.rounds = 0
        if state:
            self.start(state["population"], state["sample"])
            self._accountant.load_state_dict(state["accountant"])
            self.rounds = state["rounds"]

    def start(self, population: int, sample: int) -> None:
        """Account m of N clients a round (the first round's N and m); a later round may take another m or N
        where the accounted epsilon still bounds it, else BudgetExhausted stops the run before it."""
        relation, sampling = self.flower.NeighboringRelation, self.flower.SamplingMethod
        if self._accountant is not None:
            if (population, sample) != (self.population, self.sample) and not self.bounded(population, sample):
                raise BudgetExhausted(
                    f"central DP was accounted for {self.sample} of {self.population} clients a round, this round "
                    f"samples {sample} of {population}: a larger share, which the accounted epsilon does not cover"
                )
            self.this_round = sample
            return
        self.population, self.sample, self.this_round = population, sample, sample
        sampled = sample < population
        config = self.flower.PrivacyConfig(
            target_delta=self.delta,
            population_size=population,
            # m of N without replacement: neighbours replace one client (sensitivity 2C); all N: add or remove one
            neighboring_relation=relation.REPLACE_ONE if sampled else relation.ADD_OR_REMOVE_ONE,
            sampling_method=sampling.WITHOUT_REPLACEMENT if sampled else sampling.NO_AMPLIFICATION,
            max_epsilon=None,  # the budget is checked here: a resumed run may set another one
        )
        self._accountant = self.rdp(config, orders=ORDERS)
        self.config = config

    def bounded(self, population: int, sample: int) -> bool:
        """Whether m of N clients a round is covered by the accounted round's epsilon: every client every round is
        the same Gaussian mechanism whatever their number (noise sigma C on the sum, sensitivity C), and a sample
        drawn at a lower rate than the accounted one is amplified more (the same noise multiplier, sigma / 2)."""
        if sample == population and self.sample == self.population:
            return True
        return (
            sample < population
            and self.sample < self.population
            and sample * self.population <= self.sample * population
        )

    def _event(self):
        # noise std sigma*C on the sum; replace-one moves the sum by up to 2C, add/remove-one by C
        multiplier = self.noise / 2 if self.sample < self.population else self.noise
        return self.flower.GaussianPrivacyEvent(multiplier, self.sample, self.population)

    def check(self, server_round: int) -> None:
        """Raise BudgetExhausted when round `server_round` would take epsilon past the budget."""
        if self.budget and self.noise and self.projected(self.rounds + 1) > self.budget:
            raise BudgetExhausted(
                f"round {server_round} would take epsilon past --dp-max-epsilon {self.budget:g} "
                f"(epsilon {self.epsilon:.3f} at delta {self.delta:g} after round {server_round - 1})"
            )

    def step(self) -> float:
        """Account one released model; the epsilon spent so far."""
        if self.noise:  # without noise there is nothing to compose: epsilon is infinite
            self._accountant.compose(self._event())
        self.rounds += 1
        return self.epsilon

    def projected(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds: one composition of the round's event, `rounds` times (no replay)."""
        accountant = self.rdp(self.config, orders=ORDERS)
        accountant.compose(self._event(), count=rounds)
        return accountant.get_epsilon(self.delta)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at --dp-delta (0 before the first round)."""
        if self._accountant is None or not self.rounds:
            return 0.0
        return self._accountant.get_epsilon(self.delta) if self.noise else math.inf

    def state(self) -> dict:
        """What a checkpoint keeps, for a resumed run's epsilon to continue."""
        return {"population": self.population, "sample": self.sample, "rounds": self.rounds,
                "accountant": self._accountant.state_dict() if self._accountant else None}  # fmt: skip

    def save(self, path: Path) -> None:
        """Write the state next to a round's checkpoint, atomically."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), default=str))
        tmp.replace(path)


def zero_change(arrays: list[np.ndarray], weights: list[np.ndarray]) -> bool:
    """True when an update leaves the model exactly as it was."""
    return all(np.array_equal(a, w) for a, w in zip(arrays, weights))


def stand_in(weights: list[np.ndarray]) -> list[np.ndarray]:
    """A missing client's update in central DP's mean of m: the global model itself, less one ulp in one weight.

    It counts as a zero update; the ulp only keeps flwr 1.42's clipping from dividing by a zero norm.
    """
    arrays = [w.copy() for w in weights]
    first = next(a for a in arrays if a.dtype.kind == "f" and a.size)
    first.flat[0] = np.nextafter(first.flat[0], np.inf)
    return arrays


def load_state(path: Path) -> dict | None:
    """A checkpoint's accountant state, None when the round kept none."""
    return json.loads(path.read_text()) if path.is_file() else None
