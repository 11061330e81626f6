"""Sample-level DP-SGD on a client, with Opacus: per-example clipping and noise, Poisson batches, its own epsilon.

Each step draws every training example with probability B/n (Poisson sampling, as Opacus's accountant
assumes), clips each example's gradient to --dp-sgd-clip, sums, adds Gaussian noise of std
--dp-sgd-noise x the clip, divides by B and takes the SGD step. Opacus's RDP accountant composes the
steps of every round; its history travels with the client (the process, or the ClientApp's context).
--dp-sgd-mode picks how Opacus gets each example's gradient norm; ghost clipping (the default) is the fastest
here. Steps run eagerly: capturing Opacus's per-example hooks as a CUDA graph is not attempted.
"""

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline import batches
from pipeline.models import ModelError

# Opacus's ways to the per-example gradient norms: hooks (per-example gradients from module hooks), functorch
# (torch.func's vmap), ew (torch's expanded weights), ghost (ghost clipping: the norms without materialising
# the per-example gradients of linear layers, at the price of a second backward pass)
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


class SpendMissing(Exception):
    """The run has this client's DP-SGD spend on record, and its ledger has none: its epsilon would restart."""


class DpSgd:
    """A model trained by DP-SGD round after round, and the epsilon its client has spent."""

    def __init__(self, net: nn.Module, model: str, args: argparse.Namespace, seed: int, history=None) -> None:
        from opacus.accountants import RDPAccountant
        from opacus.grad_sample.utils import wrap_model
        from opacus.validators import ModuleValidator

        # Opacus's hooks on a first layer whose input needs no gradient make torch warn on every model: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        problems = ModuleValidator.validate(net, strict=False)
        if problems:
            raise ModelError(f"DP-SGD (Opacus) cannot train {model}: {str(problems[0]).splitlines()[0]}")
        self.args = args
        self.mode = args.dp_sgd_mode
        net.to(memory_format=torch.contiguous_format)  # Opacus's per-example gradients are NCHW
        ghost = {"max_grad_norm": args.dp_sgd_clip} if self.mode == "ghost" else {}
        self.module = wrap_model(net, grad_sample_mode=self.mode, **ghost)  # hooks on `net`: it trains in place
        self.accountant = RDPAccountant()
        if history:
            self.accountant.history = [tuple(h) for h in history]
        self.seed = seed
        self.noise, self.sampling = torch.Generator(), torch.Generator()
        self._seed()
        self.ledger: Path | None = None

    def _seed(self) -> None:
        # The noise and the batches' sampling must be secret: fresh randomness, unless --dp-seed repeats them; a
        # seeded client seeds from the steps it has taken too, so that no round (nor a restarted client with its
        # spend) draws a past step's noise again
        steps = sum(int(h[2]) for h in self.accountant.history)
        for i, generator in enumerate((self.noise, self.sampling)):
            if self.args.dp_seed >= 0:
                key = f"{self.args.dp_seed}/{self.seed}/{i}/{steps}".encode()
                generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
            else:
                generator.seed()

    def attach(self, run: str, share: str, on_record: float) -> None:
        """Keep this client's spend in --dp-sgd-ledger for the server's run `run` and this data share, going on
        from what is there; SpendMissing when the run has `on_record` epsilon for the share and the ledger none."""
        name = hashlib.sha256(f"{run}/{share}".encode()).hexdigest()[:24]
        self.ledger = Path(self.args.dp_sgd_ledger).expanduser() / f"{name}.json"
        kept = json.loads(self.ledger.read_text()) if self.ledger.is_file() else None
        if kept is None:
            if on_record > 0 and not self.accountant.history and not self.args.dp_sgd_fresh_ledger:
                raise SpendMissing(
                    f"this run has DP-SGD epsilon {on_record:.3f} on record for this client's data, and "
                    f"{self.ledger} holds no spend: start the client on the machine that has it (or the same "
                    "--dp-sgd-ledger), or pass --dp-sgd-fresh-ledger to count from zero (an under-count)"
                )
            return
        steps = lambda history: sum(int(h[2]) for h in history)
        if steps(kept) > steps(self.accountant.history):
            self.accountant.history = [tuple(h) for h in kept]
            self._seed()

    def record(self) -> None:
        """Write the spend to the ledger, atomically (before the update it paid for leaves)."""
        if self.ledger is not None:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ledger.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.history()))
            tmp.replace(self.ledger)

    def train(self, loader: batches.Batches, epochs: int, device: torch.device) -> float:
        """DP-SGD for `epochs` epochs of Poisson batches; the mean training loss over the steps."""
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        a = self.args
        params = [p for p in self.module.parameters() if p.requires_grad]
        sgd = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
        rate = min(1.0, loader.batch_size / len(loader.y))
        # The mean over the expected batch, rate x n: a share smaller than --batch-size is one whole batch a step
        expected = max(1, round(rate * len(loader.y)))
        kind = DPOptimizerFastGradientClipping if self.mode == "ghost" else DPOptimizer
        optimizer = kind(sgd, noise_multiplier=a.dp_sgd_noise, max_grad_norm=a.dp_sgd_clip,
                         expected_batch_size=expected, generator=self.noise)  # fmt: skip
        criterion = nn.CrossEntropyLoss()
        if self.mode == "ghost":  # its loss runs both backward passes
            criterion = DPLossFastGradientClipping(self.module, optimizer, criterion)
        self.module.train()
        total, steps = torch.zeros((), device=device), 0
        for _ in range(epochs):
            for images, labels in loader.poisson_batches(self.sampling):
                self.accountant.step(noise_multiplier=a.dp_sgd_noise, sample_rate=rate)
                if len(labels) == 0:  # (1 - B/n)^n: all but impossible at the batch sizes used
                    continue
                optimizer.zero_grad()
                inputs = loader.prepare(images.to(device)).contiguous()
                loss = criterion(self.module(inputs), labels.to(device))
                loss.backward()
                optimizer.step()
                total += loss.detach()
                steps += 1
        return total.item() / steps if steps else float("nan")

    def epsilon(self, delta: float) -> float:
        """The client's epsilon so far, at `delta`."""
        return self.accountant.get_epsilon(delta) if self.accountant.history else 0.0

    def history(self) -> list:
        """The accountant's history, (noise, sample rate, steps) triples, for the next round's client."""
        return [list(h) for h in self.accountant.history]
