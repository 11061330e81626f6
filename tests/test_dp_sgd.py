"""DP-SGD that learns: its own training defaults in every face, Opacus's modes against a plain loop, DpNet."""

import copy

import numpy as np
import pytest
import torch
from conftest import ROOT, finish, free_port, start
from test_federation import data_flags, rows
from test_new_user import app_run_config
from torch import nn

import cifar
import client_app
import flags
from federation import config, privacy
from federation.dpsgd import GRAD_SAMPLE_MODES, DpSgd
from pipeline import batches, sources

# DP-SGD's defaults as the README states them
README_DEFAULTS = {"batch_size": 1024, "lr": 0.5, "epochs": 5}
TUTORIAL = {"batch_size": 32, "lr": 0.001, "epochs": 1}


def client_args(*argv: str):
    """client.py's flags, resolved as client.py resolves them."""
    parser = config.client_parser("")
    args = parser.parse_args(list(argv))
    privacy.dp_sgd_training(args, flags.given(parser, list(argv)))
    return args


def settings(args) -> dict:
    return {k: getattr(args, k) for k in README_DEFAULTS}


def test_dp_sgd_brings_its_own_batch_lr_and_epochs_unless_they_are_given():
    assert settings(client_args()) == TUTORIAL  # without --dp-sgd, the tutorial's
    assert settings(client_args("--dp-sgd")) == README_DEFAULTS
    assert settings(client_args("--dp-sgd", "--lr", "0.001")) == {**README_DEFAULTS, "lr": 0.001}  # given: kept
    assert settings(client_args("--dp-sgd", "--batch-size", "64", "--epochs", "2")) == {**README_DEFAULTS,
                                                                                       "batch_size": 64, "epochs": 2}  # fmt: skip
    # The App: a run-config key left at the tutorial's value takes DP-SGD's, another value is kept
    parser = config.client_parser("")
    app = config.client_args_from_config(parser, app_run_config(**{"dp-sgd": True}), client_app.RENAMES)
    assert settings(app) == README_DEFAULTS
    app = config.client_args_from_config(parser, app_run_config(**{"dp-sgd": True, "lr": 0.05}), client_app.RENAMES)
    assert settings(app) == {**README_DEFAULTS, "lr": 0.05}
    help_text = config.client_parser("").format_help()
    assert "batch-size 1024, lr 0.5, epochs 5" in " ".join(help_text.split())


def test_run_py_hands_dp_sgds_defaults_to_its_clients_and_keeps_a_given_lr(tmp_path):
    import run as launcher

    for argv, lr in ((["--dp-sgd"], "0.5"), (["--dp-sgd", "--lr", "0.02"], "0.02")):
        parser, args, given = launcher.parse_args([*argv, "--run-dir", str(tmp_path / "run")])
        launcher.resolve(parser, args, given)
        cmd = launcher.client_command(args, "127.0.0.1:1", 0)
        flag = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1) if cmd[i].startswith("--")}
        assert (flag["--lr"], flag["--batch-size"], flag["--epochs"]) == (lr, "1024", "5"), cmd


def one_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, clip: float, lr: float) -> list:
    """The model after one DP-SGD step in Opacus's `mode`: no noise, and a share smaller than the batch of 512, so
    that every example is drawn and the mean is over the share."""
    args = client_args("--dp-sgd", "--dp-sgd-mode", mode, "--dp-sgd-clip", str(clip), "--lr", str(lr),
                       "--dp-seed", "0", "--momentum", "0")  # fmt: skip
    args.dp_sgd_noise = 0.0  # the flag refuses 0: here it leaves the clipped mean bare
    data = sources.Data(x, y, x[:2], y[:2], ["c"] * 10)
    loader, _ = batches.make_loaders(data, 512, torch.device("cpu"), 0, mean_std=False)
    DpSgd(net, "cifar:Net", args, seed=0).train(loader, 1, torch.device("cpu"))
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("model", [cifar.Net, cifar.DpNet])
def test_every_opacus_mode_takes_the_step_of_a_plain_per_example_clipping_loop(model):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(12) % 10
    start_net = model()
    clip, lr = 0.05, 0.5
    # The reference: each example's gradient alone, scaled to at most `clip`, their mean, one SGD step
    ref = copy.deepcopy(start_net)
    params = list(ref.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(ref(x[i : i + 1].float() / 255), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm.item())
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / norm.item())
    expected = [p.detach() - lr * t / len(y) for p, t in zip(params, total)]
    assert min(norms) > clip  # every example is clipped: the bound is what shapes the step
    for mode in GRAD_SAMPLE_MODES:
        got = one_step(copy.deepcopy(start_net), x, y, mode, clip, lr)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-6, err_msg=mode)


def test_dpnet_is_accepted_by_opacus_and_builds_for_twelve_classes():
    net = cifar.DpNet(num_classes=12)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 12)
    assert sum(p.numel() for p in cifar.DpNet().parameters()) < 1.1 * sum(p.numel() for p in cifar.Net().parameters())
    DpSgd(net, "cifar:DpNet", client_args("--dp-sgd"), seed=0)  # no ModelError: GroupNorm, no BatchNorm


def test_the_readmes_dp_sgd_three_terminals_learn_with_dp_sgds_defaults(tiny, tmp_path):
    # As the README types them (its data flags aside): no training flag, DP-SGD's own values
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    procs = [start("server.py", *common, "--model", "cifar:DpNet", "--run-dir", tmp_path / "run",
                   log=tmp_path / "server.log")]  # fmt: skip
    for i in range(2):
        procs.append(start("client.py", *common, "--dp-sgd", "--model", "cifar:DpNet", "--num-partitions", 2,
                           "--partition-id", i, "--dp-sgd-ledger", tmp_path / "ledger", log=tmp_path / f"c{i}.log"))  # fmt: skip
    assert finish(procs) == [0, 0, 0], (tmp_path / "server.log").read_text()[-3000:]
    log = (tmp_path / "c0.log").read_text()
    assert "DP-SGD trains with its own --batch-size 1024 --lr 0.5 --epochs 5" in log
    table = rows(tmp_path / "run")
    assert len(table) == 3 and 0 < float(table[-1]["client_epsilon"])
    assert float(table[-1]["centralized_accuracy"]) > 0.5  # ten colours: chance is 0.1
    assert "fit: 5 epoch(s)" in log


def test_readme_states_dp_sgds_defaults():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`--batch-size 1024 --lr 0.5 --epochs 5`" in readme
