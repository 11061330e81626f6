"""Who may join and how much one may send: SuperNode authentication, bounded messages (real processes)."""

import argparse
import itertools
import json
import math
import re
import stat
import subprocess
import sys
import time

import pytest
from conftest import ENV, ROOT, finish, free_port, run, start, wait_for_port
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
from test_app import FLWR_BIN, app_env, flwr_run, run_config, supernode
from test_federation import FAST, data_flags, rows
from test_safety import make_certs


def make_keys(out, *names):
    r = run("certs.py", "--out", out, "--supernode-keys", *names)
    assert r.returncode == 0, r.stderr
    return {n: (out / f"{n}.key", out / f"{n}.pub") for n in names}


def flwr(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FLWR_BIN / "flwr"), *map(str, args)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_certs_writes_p384_supernode_key_pairs_that_flower_loads(tmp_path):
    keys = make_keys(tmp_path / "keys", "node0", "node1")
    publics = set()
    for key, pub in keys.values():
        # The loaders `flower-supernode --auth-supernode-private-key` and `flwr supernode register` run
        private, _ = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(key), auth_supernode_public_key=None)
        )
        assert isinstance(private.curve, ec.SECP384R1)
        assert try_load_public_key(pub) == public_key_to_bytes(private.public_key())
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        publics.add(pub.read_bytes())
    assert len(publics) == 2


def test_certs_never_overwrites_a_supernode_key(tmp_path):
    key, _ = make_keys(tmp_path / "keys", "node0")["node0"]
    before = key.read_bytes()
    r = run("certs.py", "--out", tmp_path / "keys", "--supernode-keys", "node1", "node0")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert key.read_bytes() == before and not (tmp_path / "keys" / "node1.key").exists()


@pytest.mark.parametrize(
    "args, complaint",
    [(["--supernode-keys", "../escape"], "letters, digits"), (["--supernode-keys", "a", "--hosts", "x"], "--hosts")],
)
def test_bad_supernode_key_names_are_one_line_and_exit_code_2(tmp_path, args, complaint):
    r = run("certs.py", "--out", tmp_path / "keys", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and complaint in r.stderr, r.stderr


def test_the_deployment_engine_over_tls_lets_only_registered_supernodes_join_and_runs_the_app_with_them(tiny, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**app_env(home), "FLOWER_CIFAR_TIMINGS": str(tmp_path / "timings.jsonl")}  # each message's stopwatch
    ca, cert, key = make_certs(tmp_path / "certs")
    keys = make_keys(tmp_path / "keys", "node0", "node1", "stranger")
    port = free_port()
    link = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "{link}"\nroot-certificates = "{ca}"\n'
    )
    superlink = subprocess.Popen(
        [str(FLWR_BIN / "flower-superlink"), "--enable-supernode-auth", "--ssl-ca-certfile", str(ca),
         "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=(tmp_path / "superlink.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs = [superlink]
    tls = ["--root-certificates", str(ca)]
    try:
        wait_for_port("127.0.0.1", port, proc=superlink)
        for name in ("node0", "node1"):
            r = flwr(env, "supernode", "register", keys[name][1], "secure")
            assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout + r.stderr
        for i in range(2):
            node_key = ["--auth-supernode-private-key", str(keys[f"node{i}"][0])]
            procs.append(supernode(env, link, i, tmp_path / f"node{i}.log", [*tls, *node_key]))
        began = time.monotonic()
        stranger_key = ["--auth-supernode-private-key", str(keys["stranger"][0])]
        intruders = [
            supernode(env, link, 0, tmp_path / "nokey.log", tls),
            supernode(env, link, 1, tmp_path / "stranger.log", [*tls, *stranger_key]),
        ]
        procs += intruders
        intruder_codes = finish(intruders, timeout=60)
        refused_within = time.monotonic() - began
        code = flwr_run(
            env,
            "secure",
            "--run-config",
            run_config(tiny, tmp_path, **{"min-clients": 2}),
            log=tmp_path / "flwr.log",
            engine="deployment",
        )
        listed = flwr(env, "supernode", "list", "secure", "--format", "json")
    finally:
        for p in procs:
            p.terminate()
        finish(procs, timeout=30)
    superlink_log = (tmp_path / "superlink.log").read_text()
    # Refused for the right reason, at once: no registration through the Fleet API, and an unknown key; each
    # intruder exits by itself (finish() would have killed one still trying after 60 s, with -9)
    assert all(c > 0 for c in intruder_codes) and refused_within < 45, (intruder_codes, refused_within)
    assert "All SuperNodes must be registered via the CLI" in (tmp_path / "nokey.log").read_text()
    assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert code == 0, (tmp_path / "flwr.log").read_text()[-3000:] + superlink_log[-3000:]
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2] and all(r["fit_clients"] == "2" for r in table)
    assert float(table[-1]["centralized_accuracy"]) > 0.2
    # The federation never held more than the two registered SuperNodes
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count('"node-id"') == 2, listed.stdout
    # Every message ran in a process of its own, and its stopwatch marks follow each other in time
    marks = [json.loads(line) for line in (tmp_path / "timings.jsonl").read_text().splitlines()]
    assert sorted(m["kind"] for m in marks) == ["evaluate"] * 4 + ["train"] * 4, marks
    stages = ("born", "entered", "data", "built", "worked", "replied", "exited")
    assert all(all(m[a] <= m[b] for a, b in itertools.pairwise(stages)) for m in marks), marks
    assert all(m["exited"] - m["born"] < 120 for m in marks), marks


def test_an_oversized_update_is_refused_and_the_run_completes_with_the_honest_clients(tiny, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    common = ("--server-address", address, *data_flags(tiny, tmp_path / "cache"))
    srv = start("server.py", *common, "--min-clients", 2, "--run-dir", tmp_path / "run", log=tmp_path / "server.log")
    hostile = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hostile_client.py"), address, "oversized", "nanloss"],
        env=ENV, stdout=(tmp_path / "hostile.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    # The hostile client is connected before the honest ones, so the first round samples it
    deadline = time.monotonic() + 120
    while "Waiting for clients: 1 of 2 connected" not in (tmp_path / "server.log").read_text():
        assert time.monotonic() < deadline and srv.poll() is None and hostile.poll() is None
        time.sleep(0.1)
    honest = [
        start("client.py", *common, *FAST, "--threads", 1, "--num-partitions", 2, "--partition-id", i, "--seed", 0,
              log=tmp_path / f"c{i}.log")
        for i in range(2)
    ]  # fmt: skip
    codes = finish([srv, *honest, hostile])
    server_log = (tmp_path / "server.log").read_text()
    assert codes[:3] == [0, 0, 0], server_log[-3000:]
    # gRPC refuses the 80 MB message at the server's limit; the client's round is a failure
    assert codes[3] != 0
    limit = 16 * 2**20  # the tutorial's Net is 242 KiB: gRPC's limit stays at its 16 MiB floor
    refusal = rf"Received message larger than max \(\d+ vs\. {limit}\)"
    assert re.search(refusal, (tmp_path / "hostile.log").read_text())
    table = rows(tmp_path / "run")
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    assert table[0]["rejected"] == "1" and all(r["rejected"] == "0" and r["fit_clients"] == "2" for r in table[1:])
    assert all(math.isfinite(float(r["centralized_loss"])) for r in table)
    assert max(float(r["centralized_accuracy"]) for r in table) > 0.2  # chance is 0.1


def test_max_message_mb_sets_the_limit_grpc_refuses_an_update_at(tiny, tmp_path):
    """The 80 MB update: refused by gRPC under --max-message-mb 1, read (and rejected as no model) under 100."""
    for limit in (1, 100):
        address = f"127.0.0.1:{free_port()}"
        log = tmp_path / f"server-{limit}.log"
        srv = start("server.py", "--server-address", address, *data_flags(tiny, tmp_path / "cache"), "--min-clients",
                    1, "--rounds", 1, "--max-message-mb", limit, "--run-dir", tmp_path / f"run-{limit}", log=log)  # fmt: skip
        hostile_log = tmp_path / f"hostile-{limit}.log"
        hostile = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "hostile_client.py"), address, "oversized", "honest"],
            env=ENV, stdout=hostile_log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        refused = rf"Received message larger than max \(\d+ vs\. {limit * 2**20}\)"
        read = "array 0 is float32[20000000]"
        deadline = time.monotonic() + 120
        while not (re.search(refused, hostile_log.read_text()) or read in log.read_text()):
            assert time.monotonic() < deadline and srv.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        srv.terminate()
        finish([srv, hostile], timeout=60)
        if limit == 1:
            assert re.search(refused, hostile_log.read_text()) and read not in log.read_text()
        else:
            assert read in log.read_text() and "Received message larger than max" not in hostile_log.read_text()
