"""Generate TLS files (a local CA and a server certificate) and SuperNode key pairs.

    python3 certs.py --out certs --hosts localhost 127.0.0.1 my-server.example.org 10.0.0.5

writes certs/ca.crt (give it to clients: --root-certificates), certs/server.crt and
certs/server.key (for the server: --certificates certs/ca.crt certs/server.crt certs/server.key).

    python3 certs.py --out keys --supernode-keys node0 node1

writes keys/node0.key and keys/node0.pub (and node1's): ECDSA P-384 key pairs in OpenSSH format, as
`ssh-keygen -t ecdsa -b 384` makes them. The SuperLink's operator registers each .pub
(`flwr supernode register keys/node0.pub CONNECTION`); the .key stays on its SuperNode
(`flower-supernode --auth-supernode-private-key keys/node0.key`).
"""

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import flags

DEFAULT_HOSTS = ["localhost", "127.0.0.1", "::1"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def generate(hosts: list[str], days: int) -> dict[str, bytes]:
    """PEM bytes of a new CA certificate, and a server certificate and key it signs for `hosts`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Flower CIFAR-10 local CA"))
        .issuer_name(_name("Flower CIFAR-10 local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "server.crt": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }


def supernode_key_pair(name: str) -> dict[str, bytes]:
    """OpenSSH bytes of a new ECDSA P-384 key pair, the curve and format Flower's SuperNode auth loads."""
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {
        f"{name}.key": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        f"{name}.pub": public + f" {name}\n".encode(),
    }


def _write_new(path: Path, data: bytes) -> None:
    # Private keys are created owner-only, never readable by others even for a moment
    mode = 0o600 if path.suffix == ".key" else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main() -> None:
    parser = flags.Parser(description="Generate a local CA and a server certificate for TLS, or SuperNode key pairs.")
    parser.add_argument(
        "--out", type=Path, default=Path("certs"), help="directory for ca.crt, server.crt, server.key (or the keys)"
    )
    parser.add_argument(
        "--hosts",
        nargs="+",
        default=None,
        help=f"host names and IP addresses clients use to reach the server (default: {' '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument("--days", type=flags.positive_int, default=365, help="validity in days")
    parser.add_argument(
        "--supernode-keys",
        nargs="+",
        metavar="NAME",
        default=None,
        help="instead of TLS files, write NAME.key and NAME.pub (ECDSA P-384, OpenSSH format) for each SuperNode",
    )
    args = parser.parse_args()
    if args.supernode_keys is not None:
        if args.hosts is not None:
            parser.error("--hosts is for the TLS files; --supernode-keys writes key pairs only")
        bad = [n for n in args.supernode_keys if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)]
        if bad:
            parser.error(f"--supernode-keys {bad[0]!r}: use letters, digits, '.', '_' and '-' only")
        if len(set(args.supernode_keys)) != len(args.supernode_keys):
            parser.error("--supernode-keys names a key twice")
        files = {name: data for n in args.supernode_keys for name, data in supernode_key_pair(n).items()}
        taken = [name for name in files if (args.out / name).exists()]
        if taken:
            parser.error(f"{args.out / taken[0]} already exists: choose another name or --out")
    else:
        if args.out.exists() and any(args.out.iterdir()):
            parser.error(f"{args.out} is not empty: choose another --out or remove it")
        args.hosts = args.hosts or DEFAULT_HOSTS
        files = generate(args.hosts, args.days)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_new(args.out / name, data)
    if args.supernode_keys is not None:
        for n in args.supernode_keys:
            print(f"Wrote {args.out}/{n}.key (stays on the SuperNode) and {args.out}/{n}.pub (register it)")
        n = args.supernode_keys[0]
        print(f"SuperLink operator: flwr supernode register {args.out}/{n}.pub CONNECTION")
        print(f"SuperNode: flower-supernode --auth-supernode-private-key {args.out}/{n}.key ...")
        return
    print(f"Wrote {args.out}/ca.crt, server.crt and server.key for {', '.join(args.hosts)}")
    print(f"Server: python3 server.py --certificates {args.out}/ca.crt {args.out}/server.crt {args.out}/server.key")
    print(f"Client: python3 client.py --root-certificates {args.out}/ca.crt")


if __name__ == "__main__":
    main()
