"""cifar.py: the model, the data paths users hit, train and test."""

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ENV, make_image_folder, run

import cifar

CPU = torch.device("cpu")


def test_net_has_the_tutorials_62006_parameters():
    assert sum(p.numel() for p in cifar.Net().parameters()) == 62_006


def test_image_folder_loads_as_uint8_tensors_with_labels_in_class_order(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)
    assert data.train_x.shape == (300, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (100, 3, 32, 32)
    assert data.classes == [f"class{k}" for k in range(10)]
    assert torch.equal(data.train_y.bincount(), torch.full((10,), 30))


def test_training_lifts_test_accuracy_well_above_chance(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)
    trainloader, testloader = cifar.make_loaders(data, batch_size=16, device=CPU, seed=0)
    net = cifar.make_net(0, CPU)
    _, before = cifar.test(net, testloader, CPU)
    loss = cifar.train(net, trainloader, epochs=8, device=CPU, lr=0.02)
    test_loss, after = cifar.test(net, testloader, CPU)
    assert np.isfinite(loss) and np.isfinite(test_loss)
    assert after >= 0.6 > before + 0.3


def test_fast_pipeline_yields_exactly_the_tutorial_pipelines_batches(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)
    idx = np.arange(0, 300, 3)
    fast, fast_test = cifar.make_loaders(data, 32, CPU, seed=5, train_idx=idx)
    slow, slow_test = cifar.tutorial_loaders(data, 32, seed=5, train_idx=idx)
    for _ in range(2):  # two epochs: shuffling differs per epoch, identically in both
        pairs = list(zip(fast, slow, strict=True))
        for (x1, y1), (x2, y2) in pairs:
            assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert torch.equal(torch.cat([x for x, _ in fast_test]), torch.cat([x for x, _ in slow_test]))


def test_same_seed_same_model_and_result_different_seed_different(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)

    def trained(seed):
        net = cifar.make_net(seed, CPU)
        cifar.train(net, cifar.make_loaders(data, 32, CPU, seed)[0], 1, CPU)
        return cifar.get_weights(net)

    a, b, c = trained(1), trained(1), trained(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_weights_round_trip_exactly_through_numpy():
    source, target = cifar.make_net(1, CPU), cifar.make_net(2, CPU)
    cifar.set_weights(target, cifar.get_weights(source))
    for (k1, v1), (k2, v2) in zip(source.state_dict().items(), target.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(ValueError):
        cifar.set_weights(target, cifar.get_weights(source)[:-1])


def test_test_reports_mean_loss_per_example_not_a_sum_of_batch_means(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)
    net = cifar.make_net(0, CPU)
    x, y = cifar.normalize(data.test_x, CPU), data.test_y
    expected = torch.nn.functional.cross_entropy(net(x), y).item()
    for batch in (7, 100, 1000):
        loss, _ = cifar.test(net, cifar.Batches(x, y, batch), CPU)
        assert loss == pytest.approx(expected, rel=1e-5)


def test_cache_is_used_then_rebuilt_when_the_folder_changes(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=3, n_test=1)
    cache = tmp_path / "cache"
    first = cifar.load_data(root, cache)
    (cached,) = cache.iterdir()
    stamp = cached.stat().st_mtime_ns
    assert torch.equal(cifar.load_data(root, cache).train_x, first.train_x)
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    os.remove(root / "train" / "class0" / "0000.png")
    assert len(cifar.load_data(root, cache).train_y) == len(first.train_y) - 1


def test_centralized_script_trains_and_reports_loss_and_accuracy(tiny, tmp_path):
    r = run("cifar.py", "--data-root", tiny, "--cache-dir", tmp_path, "--epochs", 3, "--lr", 0.02)
    assert r.returncode == 0, r.stderr
    assert "Accuracy:" in r.stdout and "Loss:" in r.stdout
    accuracy = float(r.stdout.split("Accuracy:")[1].split()[0])
    assert accuracy > 0.3


def test_real_cifar10_subset_beats_chance_clearly(real_subset, tmp_path):
    r = run("cifar.py", "--data-root", real_subset, "--cache-dir", tmp_path, "--epochs", 4, "--lr", 0.01, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("Accuracy:")[1].split()[0]) > 0.2  # chance is 0.1


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_data_without_network_says_where_it_looked_and_how_to_fix(tmp_path):
    # An unreachable proxy stands for "no network", also on machines that have one
    env = {**ENV, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    r = run("cifar.py", "--data-root", tmp_path / "nothing-here", env=env)
    line = one_line_error(r)
    assert str(tmp_path / "nothing-here") in line and "--data-root" in line
    assert not list(tmp_path.glob("nothing-here/*.tar.gz"))  # nothing half-written left behind


@pytest.mark.parametrize(
    "layout, complaint",
    [
        ("empty", "no class folders"),
        ("no-test", "test is missing"),
        ("classes-differ", "must match"),
        ("no-images", "no images"),
    ],
)
def test_malformed_image_folder_is_one_clear_line(tmp_path, layout, complaint):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    if layout == "no-test":
        make_image_folder(root, 1, 1)
        shutil.rmtree(root / "test")
    elif layout == "classes-differ":
        make_image_folder(root, 1, 1)
        shutil.rmtree(root / "test" / "class3")
    elif layout == "no-images":
        (root / "train" / "a").mkdir()
        (root / "test" / "a").mkdir(parents=True)
        (root / "train" / "a" / "notes.txt").write_text("no image")
    assert complaint in one_line_error(run("cifar.py", "--data-root", root, "--cache-dir", ""))


def test_corrupt_image_is_named_in_the_error(tmp_path):
    root = make_image_folder(tmp_path / "d", 2, 1)
    bad = root / "train" / "class4" / "0001.png"
    bad.write_bytes(b"not a png at all")
    line = one_line_error(run("cifar.py", "--data-root", root, "--cache-dir", ""))
    assert str(bad) in line


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--epochs", "-1"),
        ("--batch-size", "0"),
        ("--lr", "0"),
        ("--lr", "abc"),
        ("--seed", "-3"),
        ("--device", "tpu:7"),
    ],
)
def test_bad_flags_are_one_line_and_exit_code_2(flag, value):
    line = one_line_error(run("cifar.py", flag, value))
    assert flag in line or value in line


def test_batch_augmentation_crops_from_the_reflect_padded_image_and_flips_some():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out = cifar.augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    flipped = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        if any(torch.equal(out[i], w) for w in windows):
            continue
        assert any(torch.equal(out[i], w.flip(2)) for w in windows)
        flipped += 1
    assert 10 < flipped < 54  # about half
    again = cifar.augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_augmented_batches_keep_the_tutorials_shuffle_and_labels(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)
    plain, _ = cifar.make_loaders(data, 32, CPU, seed=3)
    augmented, _ = cifar.make_loaders(data, 32, CPU, seed=3, augment=True)
    pairs = list(zip(plain, augmented, strict=True))
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in pairs)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in pairs)


def test_without_normalize_images_stay_in_zero_one_as_totensor_gives(tiny, tmp_path):
    data = cifar.load_data(tiny, tmp_path)
    fast, _ = cifar.make_loaders(data, 50, CPU, seed=0, mean_std=False)
    slow, _ = cifar.tutorial_loaders(data, 50, seed=0, mean_std=False)
    (x1, _), (x2, _) = next(iter(fast)), next(iter(slow))
    assert torch.equal(x1, x2) and x1.min() >= 0 and x1.max() <= 1
