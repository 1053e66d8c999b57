"""The lab PKI: one CA per lab, a server certificate per KME and a client certificate per
SAE, so that the ETSI GS QKD 014/004 front ends run with mutual TLS as the standard asks.

The SAE ID of a caller is the subject common name (CN) of its client certificate
(`sae_id_of`): that is what the lab writes into lab.json for each SAE, and what the
client libraries in the wild put in their lab certificates. Keys are ECDSA P-256,
certificates X.509 v3 valid for one year; private keys are written 0600, never logged.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdqkd.private import private_dir, write_private

VALIDITY = dt.timedelta(days=365)
# Names every KME server certificate carries: the servers listen on loopback only.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SKEW = dt.timedelta(minutes=5)  # accept peers whose clock is slightly behind


def make_ca(dir: Path | str, name: str) -> tuple[Path, Path]:
    """A self-signed CA (may sign end-entity certificates only); returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(Path(dir), name, cert, key)


def issue(ca: tuple[Path | str, Path | str], common_name: str, dir: Path | str, *,
          server_names: Sequence[str] = (), client: bool) -> tuple[Path, Path]:
    """An end-entity certificate signed by `ca` (its (cert, key) paths); returns (cert, key).

    A server certificate (server_names given, or client=False) gets serverAuth and a
    subjectAltName with server_names plus localhost, 127.0.0.1 and ::1; client=True adds
    clientAuth. The SAE ID of a client certificate is its common name.
    """
    ca_cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca[1]}: not an EC private key")
    server = bool(server_names) or not client
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(server_names)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write(Path(dir), common_name, cert, key)


def server_ssl_context(cert: Path | str, key: Path | str, ca: Path | str) -> ssl.SSLContext:
    """TLS >= 1.2 server context that refuses any client without a certificate from `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


def client_ssl_context(cert: Path | str, key: Path | str, ca: Path | str) -> ssl.SSLContext:
    """TLS >= 1.2 client context presenting `cert` and checking the server name against `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


def sae_id_of(peercert: dict[str, Any] | bytes | x509.Certificate) -> str:
    """The SAE ID of a verified client certificate: its one subject common name.

    Takes what ssl gives (`getpeercert()` dict, or DER bytes from `getpeercert(True)`)
    or a parsed certificate. Raises ValueError if there is not exactly one CN.
    """
    if isinstance(peercert, dict):
        cns = [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
    else:
        cert = peercert if isinstance(peercert, x509.Certificate) else x509.load_der_x509_certificate(peercert)
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1 or not isinstance(cns[0], str) or not cns[0]:
        raise ValueError(f"the client certificate must have exactly one subject CN (found {len(cns)})")
    return cns[0]


def _name(cn: str) -> x509.Name:
    if not cn or len(cn) > 64:  # RFC 5280 ub-common-name
        raise ValueError(f"common name must be 1..64 characters: {cn!r}")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )


def _alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, *LOOPBACK_NAMES]):  # keeps order, drops repeats
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _write(dir: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    private_dir(dir)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    cert_path, key_path = dir / f"{stem}.crt", dir / f"{stem}.key"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # also when the file already existed
        f.write(pem)
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))  # public, but the lab's files are all 0600
    return cert_path, key_path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
