"""Generate a local certificate authority and a server certificate for TLS.

    python3 certs.py --out certs --hosts localhost 127.0.0.1 my-server.example.org 10.0.0.5

writes certs/ca.crt (give it to clients: --root-certificates), certs/server.crt and
certs/server.key (for the server: --certificates certs/ca.crt certs/server.crt certs/server.key).
"""

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import flags


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


def main() -> None:
    parser = flags.Parser(description="Generate a local CA and a server certificate for Flower's TLS.")
    parser.add_argument("--out", type=Path, default=Path("certs"), help="directory for ca.crt, server.crt, server.key")
    parser.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1", "::1"],
        help="host names and IP addresses clients use to reach the server",
    )
    parser.add_argument("--days", type=flags.positive_int, default=365, help="validity in days")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: choose another --out or remove it")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in generate(args.hosts, args.days).items():
        path = args.out / name
        path.write_bytes(data)
        if name.endswith(".key"):
            os.chmod(path, 0o600)  # the server's private key is for its owner only
    print(f"Wrote {args.out}/ca.crt, server.crt and server.key for {', '.join(args.hosts)}")
    print(f"Server: python3 server.py --certificates {args.out}/ca.crt {args.out}/server.crt {args.out}/server.key")
    print(f"Client: python3 client.py --root-certificates {args.out}/ca.crt")


if __name__ == "__main__":
    main()
