"""QKD-keyed TLS session setup: sessions per second, one after the other, each a new TCP
connection, a TLS 1.3 handshake and a 1 KiB echo, for
- "QKD-keyed (ETSI 014)": sdqkd.qkdtls with keys from a real Lkms behind its real ETSI 014
  HTTPS server (enc_keys at the client, dec_keys at the server: two mutual-TLS requests per
  session, on keep-alive connections);
- "external PSK, no KME": the same PSK handshake with the key already in hand (what the
  014 calls cost is the difference);
- "certificate (baseline)": stock TLS 1.3 with an ECDSA P-256 server certificate, as
  `ssl` does it out of the box.
All in this process, servers in threads; ratios are to the baseline of the same run.

    .venv/bin/python bench/qkd_tls.py [--sessions 200]
"""
from __future__ import annotations

import argparse
import os
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sdqkd import qkdtls
from sdqkd.agents.kms import etsi014
from sdqkd import pki
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from latency import p50_p99_ms  # noqa: E402  (bench/ is on sys.path when run as a script)

KME = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-bench/qkd-tls/kme"))
PAYLOAD = os.urandom(1024)


class FixedKey:
    """Both roles with one key in hand: a new key_ID per session, no KME."""

    secret = os.urandom(32)

    def new_key(self) -> tuple[str, bytes]:
        return str(uuid.uuid4()), self.secret

    def key(self, key_id: str) -> bytes:
        return self.secret


def time_sessions(n: int, session: Callable[[], None]) -> list[float]:
    session()  # warm up
    out = []
    for _ in range(n):
        t = time.perf_counter()
        session()
        out.append(time.perf_counter() - t)
    return out


def qkd_case(server_keys: qkdtls.SlaveKeys, client_keys: qkdtls.MasterKeys) -> tuple[Callable[[], None], Callable[[], None]]:
    srv = qkdtls.QkdTlsServer(server_keys)
    threading.Thread(target=srv.serve_forever, args=(qkdtls.echo,), daemon=True).start()

    def session() -> None:
        with qkdtls.connect(srv.host, srv.port, client_keys) as s:
            assert qkdtls.exchange(s, PAYLOAD) == PAYLOAD

    return session, srv.close


def cert_case(d: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    ca = pki.make_ca(d / "tlsca", "bench-tls-ca")
    cert, key = pki.issue(ca, "bench-server", d / "tls", server_names=["127.0.0.1"], client=False)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(str(cert), str(key))
    cctx = ssl.create_default_context(cafile=str(ca[0]))
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as qkdtls does
            with sctx.wrap_socket(raw, server_side=True) as s:
                qkdtls.echo(s)

    threading.Thread(target=serve, daemon=True).start()

    def session() -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with cctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert qkdtls.exchange(s, PAYLOAD) == PAYLOAD

    return session, listener.close


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=200, help="sessions per case")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="sdqkd-bench-tls-"))
    ca = pki.make_ca(d / "ca", "bench-ca")
    server_cert = pki.issue(ca, KME, d / "kme", server_names=["127.0.0.1"], client=True)
    sae = {s: pki.issue(ca, s, d / "sae", client=True) for s in ("sae-a", "sae-b")}
    lkms = Lkms(LkmsConfig(kme_id=KME, node="bench", saes={"sae-a": KME, "sae-b": KME}, max_key_count=10_000_000),
                KeyStore(d / "keys.sqlite"), entropy=os.urandom)
    app = make_app()
    etsi014.add_routes(app, lkms)
    kme = HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*server_cert, ca[0])).start()
    url = f"https://127.0.0.1:{kme.port}"
    master = qkdtls.etsi014_keys(url, str(sae["sae-a"][0]), str(sae["sae-a"][1]), str(ca[0]), ["sae-b"])
    slave = qkdtls.etsi014_keys(url, str(sae["sae-b"][0]), str(sae["sae-b"][1]), str(ca[0]), ["sae-a"])
    fixed = FixedKey()
    cases = {"certificate (baseline)": cert_case(d), "external PSK, no KME": qkd_case(fixed, fixed),
             "QKD-keyed (ETSI 014)": qkd_case(slave, master)}
    rows = []
    try:
        for label, (session, _) in cases.items():
            lat = time_sessions(args.sessions, session)
            rows.append((label, len(lat) / sum(lat), *p50_p99_ms(lat)))
    finally:
        for _, stop in cases.values():
            stop()
        master.close()
        slave.close()
        kme.stop()
        lkms.shutdown()

    table = Table(title=f"TLS 1.3 sessions (connect + handshake + 1 KiB echo), one at a time, loopback, "
                        f"{os.cpu_count()} CPUs, {args.sessions} per case")
    for col in ("case", "sessions/s", "p50 ms", "p99 ms", "vs baseline"):
        table.add_column(col, justify="left" if col == "case" else "right")
    base = rows[0][1]
    for label, rate, p50, p99 in rows:
        table.add_row(label, f"{rate:,.0f}", f"{p50:.2f}", f"{p99:.2f}", f"{rate / base:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
