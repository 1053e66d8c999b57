"""The lab PKI: one root CA per lab with two intermediate CAs under it, the KME CA (one
certificate per KME: the relay between KMEs, and the KME's HTTPS server) and the SAE CA
(one client certificate per SAE), so that the ETSI GS QKD 014/004 front ends run with
mutual TLS as the standard asks and no application certificate can pass for a KME, nor
a KME's for an application.

Why one root with two intermediates rather than two unrelated CAs: every client keeps one
trust anchor (the lab CA in lab.json) to check any lab server (a KME's HTTPS port, the
controller's gRPC), while each *accepting* side trusts one intermediate only
(`server_ssl_context(..., ca=<intermediate>)` with X509_V_FLAG_PARTIAL_CHAIN): the relay
port the KME CA, the key-delivery port the SAE CA. A certificate the other intermediate
(or the root itself) issued fails the TLS handshake there. On top of the issuer, the
extended key usages differ: KME certificates carry serverAuth, clientAuth and the KME
marker `KME_EKU`; SAE certificates clientAuth only (`role_of` reads them). The relay
also pins each neighbour's public key (`spki_pin`), distributed through the agent config.

The SAE ID of a caller is the subject common name (CN) of its client certificate
(`sae_id_of`): that is what the lab writes into lab.json for each SAE, and what the
client libraries in the wild put in their lab certificates. Keys are ECDSA P-256,
certificates X.509 v3 valid for one year; a certificate file issued by an intermediate
holds the chain (leaf, then intermediate), so that TLS peers trusting the root only can
build the path. Private keys are written 0600, never logged.
"""
from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from sdqkd.private import private_dir, write_private

VALIDITY = dt.timedelta(days=365)
# Names every KME server certificate carries: the servers listen on loopback only.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SKEW = dt.timedelta(minutes=5)  # accept peers whose clock is slightly behind
# The KME marker in extendedKeyUsage: an OID under the UUID arc 2.25 (ITU-T X.667: no
# registration needed), from uuid5(NAMESPACE_URL, "urn:sdqkd:eku:kme").
KME_EKU = ObjectIdentifier("2.25.276404480240101449085256392913424305416")
PIN_PREFIX = "sha256/"


def make_ca(dir: Path | str, name: str, *, intermediates: bool = False) -> tuple[Path, Path]:
    """A self-signed CA; returns (cert, key) paths. It may sign end-entity certificates
    only, unless `intermediates` (the lab root: it signs the KME and SAE CAs, and the
    controller's and orchestrator's certificates)."""
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=1 if intermediates else 0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(Path(dir), name, cert, key)


def make_intermediate(root: tuple[Path | str, Path | str], dir: Path | str, name: str, *, kme: bool) -> tuple[Path, Path]:
    """An intermediate CA under `root` that signs end-entity certificates only: the KME CA
    (`kme`: its extendedKeyUsage allows serverAuth, clientAuth and KME_EKU) or the SAE CA
    (clientAuth only, so OpenSSL refuses any server certificate under it)."""
    root_cert, root_key = _load_ca(root)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, KME_EKU] if kme else [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(min(now + VALIDITY, root_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    return _write(Path(dir), name, cert, key)


@dataclass(frozen=True)
class LabCas:
    """A lab's three CAs, each (cert, key): the root, and the KME and SAE CAs under it."""

    root: tuple[Path, Path]
    kme: tuple[Path, Path]
    sae: tuple[Path, Path]


def make_lab_cas(dir: Path | str, name: str) -> LabCas:
    """The root `name` CA, and the `name` KME CA and `name` SAE CA under it, in `dir`."""
    root = make_ca(dir, f"{name} CA", intermediates=True)
    return LabCas(root, make_intermediate(root, dir, f"{name} KME CA", kme=True),
                  make_intermediate(root, dir, f"{name} SAE CA", kme=False))


def _load_ca(ca: tuple[Path | str, Path | str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
    key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca[1]}: not an EC private key")
    return cert, key


def issue(ca: tuple[Path | str, Path | str], common_name: str, dir: Path | str, *,
          server_names: Sequence[str] = (), client: bool, kme: bool = False) -> tuple[Path, Path]:
    """An end-entity certificate signed by `ca` (its (cert, key) paths); returns (cert, key).

    A server certificate (server_names given, or client=False) gets serverAuth and a
    subjectAltName with server_names plus localhost, 127.0.0.1 and ::1; client=True adds
    clientAuth; `kme` makes it a KME certificate (serverAuth, clientAuth and KME_EKU:
    relay both ways, and the HTTPS server). The SAE ID of a client certificate is its
    common name. Issued by an intermediate, the file holds the intermediate after the leaf.
    """
    ca_cert, ca_key = _load_ca(ca)
    server = bool(server_names) or not client or kme
    client = client or kme
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    usages += [KME_EKU] if kme else []
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
    self_signed = ca_cert.issuer == ca_cert.subject
    return _write(Path(dir), common_name, cert, key, chain=() if self_signed else (ca_cert,))


def _trust(ctx: ssl.SSLContext, ca: Path | str | Sequence[Path | str]) -> None:
    """Trust exactly the CA certificates in `ca` (one file or several), each as an anchor
    of its own: an intermediate trusted alone accepts what it issued and nothing its
    siblings or its root issued (X509_V_FLAG_PARTIAL_CHAIN)."""
    for f in [ca] if isinstance(ca, (str, Path)) else list(ca):
        ctx.load_verify_locations(cafile=str(f))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def server_ssl_context(cert: Path | str, key: Path | str, ca: Path | str | Sequence[Path | str]) -> ssl.SSLContext:
    """TLS >= 1.2 server context that refuses any client without a certificate from `ca`
    (a CA file, or several: each one trusted as an anchor of its own)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    _trust(ctx, ca)
    return ctx


def client_ssl_context(cert: Path | str, key: Path | str, ca: Path | str | Sequence[Path | str]) -> ssl.SSLContext:
    """TLS >= 1.2 client context presenting `cert` and checking the server name against `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    _trust(ctx, ca)
    return ctx


def spki_pin(cert: Path | str | bytes | x509.Certificate) -> str:
    """The pin of a certificate's public key: "sha256/" + base64 of the SHA-256 of its DER
    SubjectPublicKeyInfo (RFC 7469's form). Takes a PEM file (its first certificate), DER
    bytes, or a parsed certificate. A renewed certificate with the same key keeps its pin."""
    if isinstance(cert, (str, Path)):
        cert = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    elif isinstance(cert, bytes):
        cert = x509.load_der_x509_certificate(cert)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PIN_PREFIX + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def is_pin(text: str) -> bool:
    if not text.startswith(PIN_PREFIX):
        return False
    try:
        return len(base64.b64decode(text[len(PIN_PREFIX):], validate=True)) == 32
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def role_of(der: bytes) -> tuple[str | None, str]:
    """("kme" | "sae" | None, CN) of a verified peer certificate (DER), by its extended key
    usages: a KME certificate carries KME_EKU; an SAE certificate clientAuth and not
    KME_EKU nor serverAuth; None for anything else (no EKU, a server-only certificate).
    The CN is "" when there is not exactly one. Cached: the key-delivery front end asks
    once per request, and a connection's certificate does not change."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cn = sae_id_of(cert)
    except ValueError:
        return None, ""
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None, cn
    if KME_EKU in eku:
        return "kme", cn
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        return "sae", cn
    return None, cn


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


@functools.lru_cache(maxsize=4096)
def issued_by(der: bytes, ca: str) -> bool:
    """Whether the certificate (DER) was signed directly by the CA whose certificate is the
    first in the PEM file `ca`. Cached like role_of."""
    try:
        x509.load_der_x509_certificate(der).verify_directly_issued_by(load_cert(ca))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@functools.lru_cache(maxsize=64)
def load_cert(path: str) -> x509.Certificate:
    """The first certificate of a PEM file (cached: the CA files of a running node)."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def check_ca(path: str) -> str | None:
    """Why the file at `path` is not a CA certificate, or None if it is one."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        return f"not a readable PEM certificate ({type(exc).__name__})"
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "not a CA certificate"
    except x509.ExtensionNotFound:
        return "not a CA certificate (no basicConstraints)"
    return None


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


def _write(dir: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           chain: Sequence[x509.Certificate] = ()) -> tuple[Path, Path]:
    private_dir(dir)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    cert_path, key_path = dir / f"{stem}.crt", dir / f"{stem}.key"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # also when the file already existed
        f.write(pem)
    pems = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    write_private(cert_path, pems)  # public, but the lab's files are all 0600
    return cert_path, key_path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
