"""A user's real model and data: torchvision's models by name, BatchNorm and the last batch, empty classes,
a port in use, clients that never come, a model that blows up (real processes where it is about them)."""

import csv
import socket
import time

import numpy as np
import pytest
import torch
from conftest import finish, free_port, make_image_folder, run, start
from test_cifar import one_line_error
from test_federation import data_flags, federate, rows

from pipeline import batches, models, sources

RESNET = "torchvision.models:resnet18"


@pytest.fixture(scope="module")
def ninety(tmp_path_factory):
    """90 training images (9 per class), 50 test images: 90 = 4 x 22 + 2, an epoch ending on a batch of 2."""
    return make_image_folder(tmp_path_factory.mktemp("ninety"), n_train=9, n_test=5)


@pytest.mark.parametrize(
    "spec, classes",
    [(RESNET, 12), ("torchvision.models:mobilenet_v3_small", 5), ("tests/models.py:timm_style_net", 7)],
)
def test_model_names_a_factory_function_as_torchvision_and_timm_name_their_models(spec, classes):
    net = models.build(models.load_class(spec), classes, 32)
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, classes)  # built with num_classes
    assert models.has_batchnorm(net)


def test_a_factory_that_returns_no_model_or_a_missing_name_is_refused_in_one_line(forked, tiny, tmp_path):
    for spec, complaint in [
        ("tests/models.py:not_a_model", "returned a str, not an nn.Module"),
        ("torchvision.models:resnet_nineteen", "torchvision.models has no nn.Module class or model function"),
    ]:
        line = one_line_error(forked.run("cifar.py", "--data-root", tiny, "--cache-dir", tmp_path, "--model", spec))
        assert complaint in line, line


def test_batchnorm_models_drop_an_undersized_last_batch_and_other_models_keep_it():
    x, y = torch.zeros(90, 3, 4, 4, dtype=torch.uint8), torch.arange(90) % 10
    kept = [len(b) for b, _ in batches.Batches(x, y, 22, shuffle=True).raw_batches()]
    dropped = [len(b) for b, _ in batches.Batches(x, y, 22, shuffle=True, drop_last=True).raw_batches()]
    assert kept == [22, 22, 22, 22, 2] and dropped == [22, 22, 22, 22]
    assert len(batches.Batches(x, y, 22, drop_last=True)) == 4
    assert [len(b) for b, _ in batches.Batches(x[:20], y[:20], 22, drop_last=True)] == [20]  # never every batch
    assert batches.drops_last(90, 22, batchnorm=True) and not batches.drops_last(90, 22, batchnorm=False)
    assert not batches.drops_last(88, 22, batchnorm=True)


def test_cifar_py_trains_resnet18_named_as_torchvision_names_it_on_a_set_ending_on_a_batch_of_two(ninety, tmp_path):
    r = run("cifar.py", "--data-root", ninety, "--cache-dir", tmp_path, "--model", RESNET, "--batch-size", 22,
            "--epochs", 1, "--lr", 0.01, "--threads", 2, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "90 training images = 4 x 22 + 2; each epoch's last batch of 2 is dropped" in r.stdout
    # The untrained model's loss is 2.33; the batch of 2 took it to 1.9e13
    assert float(r.stdout.split("Loss:")[1].split()[0]) < 10, r.stdout


def test_resnet18_federated_in_three_terminals_keeps_a_finite_loss_on_shares_ending_on_a_batch_of_two(ninety, tmp_path):
    flags = ("--model", RESNET)
    codes, logs = federate(tmp_path, ninety, [flags, flags], ("--rounds", 1, *flags),
                           client_args=("--batch-size", 22, "--epochs", 1, "--threads", 1))  # fmt: skip
    assert codes == [0, 0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert all("each epoch's last batch of 2 is dropped" in log for log in logs[1:])
    (row,) = rows(tmp_path / "run")
    assert row["fit_clients"] == "2" and row["rejected"] == "0", logs[0][-3000:]  # no client's model blew up
    with (tmp_path / "run" / "metrics.csv").open() as f:
        start_loss = float(next(csv.DictReader(f))["centralized_loss"])
    assert float(row["centralized_loss"]) < 10 and float(row["centralized_loss"]) != start_loss


def test_empty_class_folders_are_refused_in_one_line_naming_them(forked, tmp_path):
    root = make_image_folder(tmp_path / "shapes", n_train=3, n_test=2, classes=3)
    (root / "train" / "triangle").mkdir()
    (root / "test" / "triangle").mkdir()
    line = one_line_error(forked.run("cifar.py", "--data-root", root, "--cache-dir", tmp_path / "cache"))
    assert "class folder(s) train/triangle, test/triangle hold no images" in line
    # The server without central evaluation counts classes from the folders alone: the same refusal
    line = one_line_error(forked.run("server.py", "--data-root", root, "--no-central-eval", "--run-dir",
                                     tmp_path / "run", "--server-address", f"127.0.0.1:{free_port()}"))  # fmt: skip
    assert "class folder(s) train/triangle hold no images" in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(sources.DataError, match="train/triangle"):
        sources.load_arrays(root, None)


def test_server_py_on_a_port_in_use_says_so_in_one_line_and_leaves_no_run_directory(forked, tiny, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = forked.run("server.py", "--server-address", f"127.0.0.1:{port}", "--run-dir", tmp_path / "run",
                       *data_flags(tiny, tmp_path / "cache"))  # fmt: skip
    line = one_line_error(r)
    assert f"cannot listen on --server-address 127.0.0.1:{port} (Address already in use)" in line
    assert not (tmp_path / "run").exists()


def test_a_server_whose_clients_never_come_gives_up_after_client_wait_in_one_line(tiny, tmp_path):
    began = time.monotonic()
    r = run("server.py", "--server-address", f"127.0.0.1:{free_port()}", "--run-dir", tmp_path / "run",
            "--client-wait", 2, *data_flags(tiny, tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "only 0 of the 2 clients needed connected within --client-wait 2 s" in r.stderr.strip().splitlines()[-1]
    assert time.monotonic() - began < 60


def test_a_server_whose_client_left_with_a_refusal_stops_instead_of_waiting_for_ever(tiny, tmp_path):
    """One client runs another --model: it refuses the server's and exits 2; the server ends, exit 2, in one line."""
    address = f"127.0.0.1:{free_port()}"
    server = start("server.py", "--server-address", address, "--run-dir", tmp_path / "run", "--rounds", 2,
                   "--client-wait", 4, *data_flags(tiny, tmp_path / "cache"), log=tmp_path / "server.log")  # fmt: skip
    clients = [
        start("client.py", "--server-address", address, *data_flags(tiny, tmp_path / "cache"), "--epochs", 1,
              *extra, log=tmp_path / f"client{i}.log")
        for i, extra in enumerate([(), ("--model", "tests/models.py:BatchNormNet")])
    ]  # fmt: skip
    codes = finish([server, *clients], timeout=120)
    server_log = (tmp_path / "server.log").read_text()
    assert codes[0] == 2 and codes[2] == 2, server_log[-3000:]
    assert "the server's model does not fit this client's" in (tmp_path / "client1.log").read_text()
    assert "error: only 1 of the 2 clients needed connected within --client-wait 4 s; 1 client(s) left" in server_log
    assert "Traceback" not in server_log
    assert [r["round"] for r in rows(tmp_path / "run")] == ["1"]  # the round before it left stays on record


def test_a_server_whose_every_client_left_stops_soon(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    server = start("server.py", "--server-address", address, "--run-dir", tmp_path / "run", "--rounds", 2,
                   "--min-clients", 1, *data_flags(tiny, tmp_path / "cache"), log=tmp_path / "server.log")  # fmt: skip
    client = start("client.py", "--server-address", address, *data_flags(tiny, tmp_path / "cache"),
                   "--model", "tests/models.py:BatchNormNet", log=tmp_path / "client.log")  # fmt: skip
    codes = finish([server, client], timeout=120)
    server_log = (tmp_path / "server.log").read_text()
    assert codes == [2, 2], server_log[-3000:]
    assert "error: every client that joined has left (1; their terminals say why)" in server_log


def test_a_client_whose_model_blew_up_says_so_and_the_server_rejects_and_records_it(tiny, tmp_path):
    model = ("--model", "tests/models.py:RunawayBuffer")  # a training batch under 4 images corrupts its buffer
    codes, logs = federate(tmp_path, tiny, [(*model, "--batch-size", 2), model], ("--rounds", 1, *model))
    assert codes == [0, 0, 0], logs[0][-3000:]
    assert "WARNING: the model diverged in training" in logs[1] and "diverged" not in logs[2]
    assert "its model diverged in training (loss on its own evaluation data" in logs[0]
    with (tmp_path / "run" / "clients.csv").open() as f:
        verdicts = sorted(r["verdict"] for r in csv.DictReader(f))
    assert verdicts == ["accepted", "diverged"]
    (row,) = rows(tmp_path / "run")
    assert row["rejected"] == "1" and float(row["centralized_loss"]) < 10  # the corrupted buffer kept out
    assert np.isfinite(float(row["centralized_loss"]))
