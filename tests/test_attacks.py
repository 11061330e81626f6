"""The attack suite (attacks.py, attack_app.py) against the default defence, as real processes on tiny data."""

import csv
import os
import signal
import subprocess

import numpy as np
import pytest
import torch
from conftest import ENV, ROOT, copy_app, finish, free_port, script_cmd, start
from test_app import app_env, flwr_run, run_config
from test_federation import FAST, data_flags, processes_with, rows

import attacks
from federation import backdoor, robust


def attacked(tmp_path, tiny, name: str, attack: tuple = (), honest: int = 2, attackers: int = 1, server=()):
    """`honest` partitioned clients and `attackers` attackers (or, with no attack, the honest clients alone on the
    same shares) for 3 rounds; returns (exit codes, rows, server log)."""
    shares = honest + attackers
    base = tmp_path / name
    base.mkdir()
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"), "--num-partitions", shares)
    train = (*FAST, "--threads", 1, "--seed", 0)
    present = honest + (attackers if attack else 0)
    procs = [start("server.py", "--server-address", address, *data_flags(tiny, tmp_path / "cache"),
                   "--min-clients", present, "--run-dir", base / "run", *server, log=base / "server.log")]  # fmt: skip
    for i in range(honest):
        procs.append(start("client.py", *common, "--partition-id", i, *train, log=base / f"client{i}.log"))
    for j in range(attackers if attack else 0):
        procs.append(subprocess.Popen(
            script_cmd("attacks.py", *common, "--partition-id", honest + j, *train, *attack,
                       "--collude-dir", base / "collude"),
            env=ENV, stdout=(base / f"attacker{j}.log").open("w"), stderr=subprocess.STDOUT,
        ))  # fmt: skip
    codes = finish(procs, timeout=300)
    return codes, rows(base / "run"), (base / "server.log").read_text()


@pytest.fixture(scope="module")
def honest_only(tiny, tmp_path_factory):
    """The honest clients alone on the attacked runs' shares, run once per (honest, attackers, server flags);
    `get.run_dirs` keeps where each ran."""
    runs, run_dirs = {}, {}

    def get(honest: int = 2, attackers: int = 1, server: tuple = ()) -> list[dict]:
        if (honest, attackers, server) not in runs:
            base = tmp_path_factory.mktemp("honest")
            codes, table, log = attacked(base, tiny, "honest", honest=honest, attackers=attackers, server=server)
            assert codes == [0] * (1 + honest), log[-3000:]
            runs[honest, attackers, server], run_dirs[honest, attackers, server] = table, base / "honest" / "run"
        return runs[honest, attackers, server]

    get.run_dirs = run_dirs
    return get


def final(table, key="centralized_loss") -> float:
    return float(table[-1][key])


@pytest.mark.parametrize(
    "attack",
    [
        ("--attack", "reversed", "--boost", 5),
        ("--attack", "ipm", "--epsilon", 0.5),
    ],
)
def test_attacks_against_the_consensus_are_rejected_every_round_and_change_nothing(tiny, tmp_path, attack, honest_only):
    codes, table, log = attacked(tmp_path, tiny, "attacked", attack)
    assert codes == [0, 0, 0, 0], log[-3000:]
    assert log.count("points away from the round's consensus") == 3
    assert [(r["fit_clients"], r["rejected"]) for r in table] == [("2", "1")] * 3
    honest = honest_only()
    assert [r["centralized_accuracy"] for r in table] == [r["centralized_accuracy"] for r in honest]


def test_without_the_screen_the_reversed_attacker_ruins_fedavg(tiny, tmp_path, honest_only):
    plain = ("--screen", "none")
    codes, table, log = attacked(tmp_path, tiny, "attacked", ("--attack", "reversed", "--boost", 5), server=plain)
    assert codes == [0, 0, 0, 0], log[-3000:]
    honest = honest_only()  # with honest clients only the screen changes nothing (the test below)
    # The attack is real, it is the defence that stops it: no better than chance (ln 10 = 2.30), against learning
    assert final(table) > 2.3 and final(honest) < 2.0, (final(table), final(honest))


def test_without_the_screen_model_replacement_takes_fedavg_over(tiny, tmp_path, honest_only):
    """The control for the replacement case below: the same attacker, told there is no screen, wins."""
    plain = ("--screen", "none")
    codes, table, log = attacked(tmp_path, tiny, "attacked", ("--attack", "replacement", *plain), server=plain)
    assert codes == [0, 0, 0, 0], log[-3000:]
    honest = honest_only()
    assert final(table) > 2.3 and final(honest) < 2.0, (final(table), final(honest))


@pytest.mark.parametrize(
    "attack, attackers",
    [
        (("--attack", "labelflip"), 1),
        (("--attack", "noise", "--boost", 5), 1),
        (("--attack", "replacement"), 1),
        (("--attack", "alie", "--z", 1, "--colluders", 2), 2),
        (("--attack", "backdoor-scaled"), 1),
        (("--attack", "minmax", "--colluders", 1), 1),
        (("--attack", "minsum", "--colluders", 1), 1),
        (("--attack", "minmax", "--colluders", 2), 2),
        (("--attack", "mimic", "--colluders", 2), 2),
    ],
)
def test_attacks_inside_the_consensus_are_bounded_and_the_result_stays_close(
    tiny, tmp_path, attack, attackers, honest_only
):
    honest = 3 if attackers == 2 else 2
    codes, table, log = attacked(tmp_path, tiny, "attacked", attack, honest=honest, attackers=attackers)
    assert codes == [0] * (1 + honest + attackers), log[-3000:]
    assert all(int(r["fit_clients"]) >= honest for r in table)
    clean = honest_only(honest, attackers)
    # 100 test images: judge by the loss, and the accuracy loosely (one image is one point)
    assert final(table) <= 1.25 * final(clean), (final(table), final(clean))
    assert final(table, "centralized_accuracy") >= final(clean, "centralized_accuracy") - 0.1


def test_a_boosted_backdoor_takes_plain_fedavg_over_and_the_default_keeps_it_out(tiny, tmp_path, honest_only):
    """Whole-set-like (IID) shares, one attacker of three, its update boosted 3 x: model replacement."""
    attack = ("--attack", "backdoor", "--boost", 3, "--lr", 0.05, "--epochs", 5)  # it trains harder than honest

    def success(name: str, server: tuple) -> tuple[float, float]:
        codes, table, log = attacked(tmp_path, tiny, name, (*attack, *server), server=server)
        assert codes == [0, 0, 0, 0], log[-3000:]
        return backdoor.run_success(tmp_path / name / "run", str(tiny), str(tmp_path / "cache"), 0), final(table)

    plain, plain_loss = success("plain", ("--screen", "none"))
    default, default_loss = success("default", ())
    honest = honest_only()
    clean = backdoor.run_success(honest_only.run_dirs[2, 1, ()], str(tiny), str(tmp_path / "cache"), 0)
    # The attack is real: under plain FedAvg most triggered images land in class 0; the default keeps the
    # backdoor near the rate of a model no attacker touched, and its clean loss near the honest one
    assert plain >= 0.5 and default <= clean + 0.1, (plain, default, clean)
    assert default_loss <= 1.25 * final(honest), (default_loss, final(honest), plain_loss)


def test_the_nnm_screen_mixes_every_update_and_keeps_a_boosted_backdoor_out(tiny, tmp_path, honest_only):
    attack = ("--attack", "backdoor", "--boost", 3, "--lr", 0.05, "--epochs", 5, "--screen", "nnm")
    server = ("--screen", "nnm", "--num-malicious", 1)
    codes, table, log = attacked(tmp_path, tiny, "nnm", attack, server=server)
    assert codes == [0, 0, 0, 0], log[-3000:]
    with (tmp_path / "nnm" / "run" / "clients.csv").open() as f:
        verdicts = [r["verdict"] for r in csv.DictReader(f)]
    assert len(verdicts) == 9 and set(verdicts) <= {"mixed", "clipped"} and "mixed" in verdicts, verdicts
    honest, cache = honest_only(), str(tmp_path / "cache")
    rate = backdoor.run_success(tmp_path / "nnm" / "run", str(tiny), cache, 0)
    clean = backdoor.run_success(honest_only.run_dirs[2, 1, ()], str(tiny), cache, 0)
    assert rate <= clean + 0.1, (rate, clean)
    assert final(table) <= 1.25 * final(honest), (final(table), final(honest))


def test_with_honest_clients_only_the_screen_rejects_nothing_clips_the_farthest_and_stays_near_plain_fedavg(
    tiny, tmp_path
):
    # Label-skewed shares of tiny data: as heterogeneous as honest clients get
    dirichlet = ("--partitioner", "dirichlet", "--alpha", 0.5)
    tables = {}
    for name, server in (("default", ()), ("reject-only", ("--clip-factor", 0)), ("plain", ("--screen", "none"))):
        address = f"127.0.0.1:{free_port()}"
        common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
        base = tmp_path / name
        procs = [start("server.py", *common, "--min-clients", 3, "--run-dir", base / "run", *server,
                       log=tmp_path / f"{name}.log")]  # fmt: skip
        for i in range(3):
            procs.append(start("client.py", *common, *FAST, "--threads", 1, "--seed", 0, "--num-partitions", 3,
                               "--partition-id", i, *dirichlet, log=tmp_path / f"{name}-{i}.log"))  # fmt: skip
        assert finish(procs) == [0] * 4, (tmp_path / f"{name}.log").read_text()[-3000:]
        tables[name] = rows(base / "run")
    keys = ("centralized_loss", "centralized_accuracy", "distributed_loss", "train_loss")
    # The size and direction rules reject no honest update: without the clip, the default is plain FedAvg exactly
    assert all(r["rejected"] == "0" for r in tables["default"] + tables["reject-only"])
    assert [[r[k] for k in keys] for r in tables["reject-only"]] == [[r[k] for k in keys] for r in tables["plain"]]
    # The default clip (1 x the median distance) pulls in the farther half: of 3 updates, the farthest one
    assert [r["clipped"] for r in tables["default"]] == ["1"] * len(tables["default"])
    # That is its price: the farthest share pulls less, so the model learns more slowly, within the bounded
    # influence every attack test here allows (the README's tables give the cost on 10,000 images)
    losses = [float(r["centralized_loss"]) for r in tables["default"]]
    assert losses == sorted(losses, reverse=True), losses  # it still learns every round
    for a, b in zip(tables["default"], tables["plain"], strict=True):
        assert float(a["centralized_loss"]) <= 1.25 * float(b["centralized_loss"]), (a, b)


def test_the_consensus_clips_updates_beyond_factor_x_the_median_distance_onto_that_sphere_and_rejects_a_reversed_one():
    rng = np.random.default_rng(0)
    weights = [np.full(1000, 1.0, np.float32)]  # the global model; the updates below are changes of it
    base = rng.normal(0, 1, 1000)
    honest = [[(1 + base + rng.normal(0, 0.3, 1000)).astype(np.float32)] for _ in range(4)]
    far = [(1 + base * 5).astype(np.float32)]  # the same direction, five times as far
    back = [(1 - base).astype(np.float32)]
    points = np.stack([h[0] for h in honest] + [far[0], back[0]]).astype(np.float64) - 1
    g = points.mean(axis=0)  # the geometric median by Weiszfeld's iteration, written here from its definition
    for _ in range(1000):
        inverse = 1 / np.maximum(np.linalg.norm(points - g, axis=1), 1e-12)
        g = (inverse[:, None] * points).sum(axis=0) / inverse.sum()
    # of every update; the distances that set the radius: the kept ones'
    distance = np.linalg.norm(points - g, axis=1)[:5]
    median = np.median(distance)
    clipped = {}
    for factor in (2.0, None):  # None: the default
        given = {} if factor is None else {"clip_factor": factor}
        verdicts = robust.screen([*honest, far, back], weights, (True,), **given)
        factor = factor or robust.CLIP_FACTOR
        assert "points away" in verdicts[5].why
        for v, d in zip(verdicts[:5], distance):
            assert v.why is None
            if d <= factor * median:
                assert v.arrays is None and v.note is None  # within the radius: bit for bit
            else:
                assert np.linalg.norm(v.arrays[0] - 1 - g) == pytest.approx(factor * median, rel=1e-4)
                assert v.ratio == pytest.approx(d / median, rel=1e-4) and f"{d / median:.1f} x" in v.note
        clipped[factor] = [i for i, v in enumerate(verdicts[:5]) if v.arrays is not None]
    assert clipped[2.0] == [4]  # at 2 x, only the far one
    # At the default 1 x, the far one and the honest one beyond the median of the five kept
    assert robust.CLIP_FACTOR == 1 and len(clipped[1.0]) == 2 and 4 in clipped[1.0], clipped


def test_an_attacker_app_node_is_screened_on_the_simulation_engine(tiny, tmp_path):
    app = copy_app(tmp_path / "attack-app", "attack_app:app")
    toml = (app / "pyproject.toml").read_text()
    keys = 'attack = "reversed"\nattackers = 1\nattack-boost = 5.0\n'
    (app / "pyproject.toml").write_text(toml.replace("[tool.flwr.app.config]\n", "[tool.flwr.app.config]\n" + keys))
    env = app_env(tmp_path / "flwr-home")
    try:
        code = flwr_run(env, "--run-config", run_config(tiny, tmp_path, rounds=2, **{"min-clients": 3}),
                        "--federation-config", "num-supernodes=3", log=tmp_path / "flwr.log", app=app)  # fmt: skip
    finally:
        for pid in processes_with("flower-superlink", str(tmp_path / "flwr-home")):
            os.kill(pid, signal.SIGTERM)
    log = (tmp_path / "flwr.log").read_text()
    assert code == 0, log[-4000:]
    assert log.count("points away from the round's consensus") == 2 and "attack reversed" in log
    assert [(r["fit_clients"], r["rejected"]) for r in rows(tmp_path / "run")] == [("2", "1")] * 2


def test_alie_needs_a_shared_folder_and_says_so(tmp_path):
    r = subprocess.run(script_cmd("attacks.py", "--attack", "alie"), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2 and "--collude-dir" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("size", [32, 64, 20])
def test_the_trigger_is_a_checkerboard_in_the_bottom_right_corner_sized_from_the_image(size):
    images = torch.full((3, 3, size, size), 128, dtype=torch.uint8)
    stamped = backdoor.stamp(images)
    side = max(3, size // 8)  # an eighth of the side, as the README says; 4 pixels on CIFAR-10
    corner = stamped[:, :, size - side :, size - side :]
    for r in range(side):
        for c in range(side):
            assert (corner[:, :, r, c] == (255 if (r + c) % 2 else 0)).all()
    stamped[:, :, size - side :, size - side :] = 128
    assert (stamped == 128).all() and (images == 128).all()  # nothing else touched, the input left as it was


def test_poisoning_stamps_and_relabels_the_given_fraction_and_nothing_else():
    x = torch.full((40, 3, 32, 32), 128, dtype=torch.uint8)
    y = torch.arange(40) % 10
    px, py = backdoor.poison(x, y, target=7, fraction=0.25, seed=0)
    triggered = (px[:, :, -1, -2] == 255).all(dim=1)  # a white square of the pattern, on every channel
    assert int(triggered.sum()) == 10 and (py[triggered] == 7).all()
    assert (py[~triggered] == y[~triggered]).all() and (px[~triggered] == 128).all()


def test_the_success_rate_counts_triggered_images_of_other_classes_put_in_the_target():
    class Spotter(torch.nn.Module):  # says "class 3" exactly when the corner's last pixel is white
        def forward(self, x):
            white = x[:, 0, -1, -2] > 0.9
            return torch.nn.functional.one_hot(torch.where(white, 3, 1), 10).float()

    x = torch.zeros((30, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(30) % 10
    assert backdoor.success_rate(Spotter(), x, y, target=3) == 1.0  # 27 images, all steered
    assert backdoor.success_rate(Spotter(), x, y, target=1) == 0.0  # steered to 3, not 1


def test_min_max_goes_as_far_as_the_pools_own_largest_distance_allows():
    rng = np.random.default_rng(0)
    pool = rng.normal(1.0, 0.5, (4, 50))
    mean = pool.mean(axis=0)
    unit = mean / np.linalg.norm(mean)
    widest = max(np.linalg.norm(a - b) for a in pool for b in pool)
    sent = attacks.min_max(pool, "unit")
    gamma = float((mean - sent) @ unit)  # how far it went against the mean's direction
    assert np.allclose(sent, mean - gamma * unit) and gamma > 0
    assert max(np.linalg.norm(pool - sent, axis=1)) <= widest  # inside the limit...
    assert max(np.linalg.norm(pool - (mean - 1.01 * gamma * unit), axis=1)) > widest  # ...and at it
    summed = attacks.min_max(pool, "unit", summed=True)
    sums = [float(((pool - p) ** 2).sum()) for p in pool]
    assert float(((pool - summed) ** 2).sum()) <= max(sums)
    g = float((mean - summed) @ unit)
    assert float(((pool - (mean - 1.01 * g * unit)) ** 2).sum()) > max(sums)


def test_nnm_mixes_each_update_with_its_nearest_neighbours_so_a_far_one_moves_the_mean_a_quarter_as_much():
    rng = np.random.default_rng(1)
    weights = [np.zeros(200, np.float32) + 0.5]  # a norm of 7: the size bound (10 x) lets all five through
    base = rng.normal(0, 1, 200)
    changes = [base + rng.normal(0, 0.3, 200) for _ in range(4)] + [base * 4]  # four honest, one boosted
    updates = [[(0.5 + c).astype(np.float32)] for c in changes]
    verdicts = robust.screen(updates, weights, (True,), "nnm", clip_factor=0, num_malicious=1)
    points = np.stack([u[0].astype(np.float64) - 0.5 for u in updates])
    for i, v in enumerate(verdicts):  # the mean of the 4 nearest (itself included), found by brute force
        nearest = np.argsort([np.linalg.norm(points[i] - p) for p in points])[:4]
        assert v.why is None and v.note is None
        assert np.allclose(v.arrays[0] - 0.5, points[nearest].mean(axis=0), atol=1e-5)
    pull = np.mean([v.arrays[0] - 0.5 for v in verdicts], axis=0) - points[:4].mean(axis=0)
    plain = points.mean(axis=0) - points[:4].mean(axis=0)
    assert np.linalg.norm(pull) < 0.3 * np.linalg.norm(plain)  # the boosted one's pull, cut to under a third
