"""Test credentials for a Flower deployment: a private CA, a SuperLink TLS certificate, and one
SuperNode authentication key pair per site.

Flower 1.42 expects:

- SuperLink (``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``): a server certificate whose subject alternative names cover every
  address clients dial, including the SuperLink's own ``--host`` (its ServerApp process dials it).
- SuperNode (``--auth-supernode-private-key KEY``): an EC key on a NIST curve, private key in
  OpenSSH format; ``flwr supernode register KEY.pub`` reads the ``ecdsa-sha2-nistp384 AAAA...``
  public key. ``ssh-keygen -t ecdsa -b 384 -N "" -f KEY`` makes the same pair.

These are for loopback testing and for trying a deployment out; a hospital deployment should use
certificates from its own PKI. Command line::

    python -m fedgin.federated.certs OUT_DIR [--host HOST ...] [--node NAME ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls_files(out: str | Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, *,
                    days: int = 30) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` into ``out``.

    The server certificate is signed by the new CA and valid for ``hosts`` (DNS names or IP
    addresses). Returns the paths by name (``ca``, ``ca_key``, ``cert``, ``key``).
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or address")
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc)
    valid = dict(not_valid_before=now - dt.timedelta(minutes=5), not_valid_after=now + dt.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedgin test CA")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(out / "ca.crt", ca_cert.public_bytes(pem), 0o644),
        "ca_key": _write(out / "ca.key", _private_pem(ca_key), 0o600),
        "cert": _write(out / "server.pem", server_cert.public_bytes(pem), 0o644),
        "key": _write(out / "server.key", _private_pem(server_key), 0o600),
    }


def write_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode key pair ``out/name`` (OpenSSH private key) and ``out/name.pub``
    (``ecdsa-sha2-nistp384 ...``); returns (private, public)."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(out / name, private, 0o600), _write(out / f"{name}.pub", public + b"\n", 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedgin.federated.certs", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write into")
    parser.add_argument("--host", action="append", help=f"SuperLink host name or IP (default: {' '.join(DEFAULT_HOSTS)})")
    parser.add_argument("--node", action="append", default=[], help="a SuperNode key pair to make (repeat)")
    args = parser.parse_args(argv)
    files = write_tls_files(args.out, tuple(args.host or DEFAULT_HOSTS))
    for name in args.node:
        write_node_key(args.out, name)
    print(f"wrote {', '.join(p.name for p in files.values())}"
          + (f" and key pairs {', '.join(args.node)}" if args.node else "") + f" to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
