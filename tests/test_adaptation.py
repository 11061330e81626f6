"""A user's first changes: their model, their class count, their image size, a model over 16 MiB (real processes)."""

import csv
import json
import os
import signal

import pytest
import torch
from conftest import ROOT, make_image_folder, run
from test_app import app_env, flwr_run, run_config
from test_cifar import one_line_error
from test_federation import federate, processes_with, rows

import cifar
from federation.model import Layout
from pipeline import models

BATCHNORM = "tests/models.py:BatchNormNet"  # the tutorial's Net plus one BatchNorm2d
BIG = "tests/models.py:BigNet"  # 8 M parameters, 31.5 MiB: over gRPC's 16 MiB default


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    """A 12-class image folder at 32x32."""
    return make_image_folder(tmp_path_factory.mktemp("twelve"), n_train=25, n_test=5, classes=12)


@pytest.fixture(scope="module")
def five_large(tmp_path_factory):
    """A 5-class image folder at 64x64."""
    return make_image_folder(tmp_path_factory.mktemp("five64"), n_train=40, n_test=10, classes=5, size=64)


def test_the_tutorials_net_takes_its_head_from_the_number_of_classes():
    assert cifar.Net().fc3.out_features == 10 and cifar.Net(12).fc3.out_features == 12
    net = models.build(cifar.Net, 5, 32)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_only_trained_weights_count_in_a_distance_batchnorms_counters_do_not():
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from models import BatchNormNet

    layout = Layout.of(BatchNormNet(), BATCHNORM)
    marked = dict(zip(layout.keys, layout.weights))
    assert marked["bn1.weight"] and marked["conv1.weight"]
    assert not marked["bn1.num_batches_tracked"] and not marked["bn1.running_mean"]
    assert layout.num_parameters == 62_018


def test_the_grpc_limit_follows_the_model_size_and_stays_bounded():
    assert Layout.of(cifar.Net(), "cifar:Net").message_bytes() == 16 * 2**20
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from models import BigNet

    big = Layout.of(BigNet(), BIG)
    size = sum(v.numel() * v.element_size() for v in BigNet().state_dict().values())  # its bytes, counted by torch
    assert big.message_bytes() == 2 * size > 16 * 2**20
    assert big.message_bytes(limit_mb=100) == 100 * 2**20


# Each case is two of a user's first changes at once: a model and a data set of their own
CHANGES = {"batchnorm-five-large": ("five_large", BATCHNORM), "big-twelve": ("twelve", BIG)}


@pytest.mark.parametrize("change", CHANGES)
def test_cifar_py_trains_each_change_and_says_what_it_did(request, tmp_path, change):
    data, model = CHANGES[change]
    root = request.getfixturevalue(data)
    # 3 epochs: a BatchNorm model drops each epoch's short last batch (200 = 6 x 32 + 8), 18 steps in all
    r = run("cifar.py", "--data-root", root, "--cache-dir", tmp_path, "--epochs", 3, "--lr", 0.02, "--model", model,
            timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    classes = {"twelve": 12, "five_large": 5}[data]
    assert f"({classes} classes, 32x32)" in r.stdout
    assert ("Resized 64x64 images to 32x32 (--image-size 32)" in r.stdout) == (data == "five_large")
    assert float(r.stdout.split("Accuracy:")[1].split()[0]) > 1.5 / classes  # above chance


def test_a_model_with_a_fixed_head_is_refused_for_twelve_classes_in_one_line(forked, twelve, tmp_path):
    line = one_line_error(forked.run("cifar.py", "--data-root", twelve, "--cache-dir", tmp_path,
                              "--model", "tests/models.py:TenOutputs"))  # fmt: skip
    assert "has (10,) outputs per image, the data has 12 classes" in line


def test_images_the_model_cannot_take_are_refused_in_one_line(forked, five_large, tmp_path):
    line = one_line_error(
        forked.run("cifar.py", "--data-root", five_large, "--cache-dir", tmp_path, "--image-size", 64)
    )
    assert "does not take 3x64x64 images" in line and "--image-size" in line


def test_a_stated_class_count_that_differs_from_the_data_is_refused(forked, twelve, tmp_path):
    line = one_line_error(forked.run("cifar.py", "--data-root", twelve, "--cache-dir", tmp_path, "--num-classes", 10))
    assert "--num-classes 10, but the data has 12 classes" in line


@pytest.mark.parametrize("change", ["batchnorm-five-large", "big-twelve"])
def test_the_three_terminal_flow_trains_each_change(request, tmp_path, change):
    data, model = CHANGES[change]
    root = request.getfixturevalue(data)
    flags = ("--model", model)
    steady = ("--lr", 0.003) if model == BIG else ()  # its wide layer overshoots, averaged, at FAST's 0.01
    codes, logs = federate(tmp_path, root, [flags, flags], ("--rounds", 2, *flags), client_args=steady)
    assert codes == [0, 0, 0], logs[0][-3000:] + logs[1][-2000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2] and all(r["fit_clients"] == "2" for r in table)
    assert all(r["rejected"] == "0" for r in table)  # BatchNorm's step counter no longer trips the screen
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        saved["model"] == model and saved["layout"]["arrays"]["fc3.weight"][0] == {"twelve": 12, "five_large": 5}[data]
    )
    with (tmp_path / "run" / "metrics.csv").open() as f:
        untrained = float(next(csv.DictReader(f))["centralized_loss"])  # round 0: the initial model
    assert float(table[-1]["centralized_loss"]) < 0.6 * untrained  # it learns (ln 5 = 1.61 and ln 12 = 2.48 at first)


@pytest.fixture(scope="module")
def ninety(tmp_path_factory):
    """90 training images: two IID shares of 45 = 43 + 2, an epoch ending on a batch of 2 at batch size 43."""
    return make_image_folder(tmp_path_factory.mktemp("ninety"), n_train=9, n_test=5)


# The App's cases: a torchvision factory with BatchNorm on shares ending on a batch of 2, and BigNet on 12 classes
APP_CHANGES = {
    "resnet18-ninety": ("ninety", "torchvision.models:resnet18", {"batch-size": 43, "holdout": 0, "local-epochs": 1}),
    "big-twelve": ("twelve", BIG, {}),
}


@pytest.mark.parametrize("change", APP_CHANGES)
def test_the_simulation_engine_trains_each_change(request, tmp_path, change):
    data, model, settings = APP_CHANGES[change]
    root = request.getfixturevalue(data)
    extra = {"model": f"'{model.replace('/', '.').replace('.py:', ':')}'", **settings}
    env = app_env(tmp_path / "flwr-home")
    try:
        code = flwr_run(env, "--run-config", run_config(root, tmp_path, **{"min-clients": 2}, **extra),
                        "--federation-config", "num-supernodes=2", log=tmp_path / "flwr.log")  # fmt: skip
    finally:
        for pid in processes_with("flower-superlink", str(tmp_path / "flwr-home")):
            os.kill(pid, signal.SIGTERM)
    log = (tmp_path / "flwr.log").read_text()
    assert code == 0, log[-4000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2] and all(r["fit_clients"] == "2" for r in table), log[-3000:]
    assert all(r["rejected"] == "0" for r in table)  # no client's model blew up
    assert all(float(r["centralized_loss"]) < 10 for r in table)  # the untrained model's is 2.3; a batch of 2: 1e13
    saved = json.loads((tmp_path / "run" / "config.json").read_text())  # the swapped-in model is the one trained
    assert saved["model"] == extra["model"].strip("'") and len(saved["layout"]["arrays"]) == len(Layout.of(
        models.build(models.load_class(model), int(data == "twelve") * 2 + 10, 32), model).keys)  # fmt: skip
    with (tmp_path / "run" / "metrics.csv").open() as f:
        initial = float(next(csv.DictReader(f))["centralized_loss"])
    assert float(table[-1]["centralized_loss"]) < initial  # it learns
    if settings:
        assert "each epoch's last batch of 2 is dropped" in log


def test_resuming_with_a_changed_net_is_refused_in_one_line(forked, tiny, tmp_path):
    codes, logs = federate(tmp_path, tiny, [(), ()], server_args=("--rounds", 1))
    assert codes == [0, 0, 0], logs[0][-3000:]
    config = tmp_path / "run" / "config.json"
    saved = json.loads(config.read_text())
    saved["model"] = BATCHNORM  # the user changed the model the run was started with
    config.write_text(json.dumps(saved))
    line = one_line_error(forked.run("server.py", "--resume", tmp_path / "run", "--rounds", 2))
    assert "round-001.pt is not a checkpoint of the current model" in line and "bn1.weight" in line
