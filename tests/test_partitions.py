"""Each client its own share: flwr-datasets partitions, seeded."""

import numpy as np
import pytest
import torch

from pipeline import partitions

LABELS = torch.arange(2000) % 10  # sorted-by-class order is what image folders give too


def shares(n, partitioner, seed=0, alpha=0.5, labels=LABELS):
    return [partitions.partition_indices(labels, n, i, partitioner, alpha, seed) for i in range(n)]


@pytest.mark.smoke
def test_iid_partitions_are_disjoint_cover_the_data_and_are_balanced():
    parts = shares(4, "iid")
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged)) == len(LABELS)
    assert sorted(len(p) for p in parts) == [500] * 4
    for p in parts:  # IID: every class present in about its share
        counts = np.bincount(LABELS.numpy()[p], minlength=10)
        assert counts.min() > 25


def test_dirichlet_partitions_are_disjoint_cover_the_data_and_show_label_skew():
    parts = shares(4, "dirichlet", alpha=0.1)
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged)) == len(LABELS)
    # With alpha=0.1 each client is dominated by a few classes: far from 10% each
    top_share = [np.bincount(LABELS.numpy()[p], minlength=10).max() / len(p) for p in parts if len(p)]
    assert max(top_share) > 0.4


def test_partitions_are_reproducible_from_the_seed_and_change_with_it():
    for kind in ("iid", "dirichlet"):
        a, b, c = shares(3, kind, seed=1), shares(3, kind, seed=1), shares(3, kind, seed=2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_holdout_is_disjoint_from_training_and_about_ten_percent():
    share = partitions.partition_indices(LABELS, 2, 0, "iid")
    train, held = partitions.split_holdout(share, 0.1, seed=0)
    assert not set(train) & set(held)
    assert sorted(np.concatenate([train, held])) == sorted(share)
    assert len(held) == 100


def test_a_partition_id_out_of_range_is_refused():
    with pytest.raises(ValueError):
        partitions.partition_indices(LABELS, 2, 2)


@pytest.mark.parametrize("partition, partitions", [(4999, 5000), (299, 300)])
def test_a_partition_too_small_to_train_on_is_one_line_and_exit_code_2(forked, tiny, tmp_path, partition, partitions):
    from test_cifar import one_line_error

    line = one_line_error(
        forked.run("client.py", "--data-root", tiny, "--cache-dir", tmp_path, "--partition-id", partition,
            "--num-partitions", partitions, "--connect-timeout", 1)
    )  # fmt: skip
    assert "use fewer partitions" in line


def test_a_cached_share_is_the_partitioners_and_a_new_process_reads_it_without_importing_flwr_datasets(tmp_path):
    import subprocess
    import sys

    from conftest import ENV, ROOT

    cached = partitions.partition_indices(LABELS, 3, 1, "dirichlet", 0.5, 0, cache_dir=tmp_path)
    assert np.array_equal(cached, shares(3, "dirichlet")[1]) and len(list((tmp_path / "partitions").iterdir())) == 1
    code = (
        "import sys, numpy as np, torch; from pipeline import partitions; "
        f"s = partitions.partition_indices(torch.arange(2000) % 10, 3, 1, 'dirichlet', 0.5, 0, cache_dir={str(tmp_path)!r}); "
        f"np.save({str(tmp_path / 'again.npy')!r}, s); print('flwr_datasets' in sys.modules, 'datasets' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "False"] and np.array_equal(np.load(tmp_path / "again.npy"), cached)
    # Other settings, another share: not the cached one
    other = partitions.partition_indices(LABELS, 3, 1, "dirichlet", 0.1, 0, cache_dir=tmp_path)
    assert not np.array_equal(other, cached) and len(list((tmp_path / "partitions").iterdir())) == 2
