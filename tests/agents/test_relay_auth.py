"""Who may talk to a KME, on real agent processes A - B - C of a lab plan: the relay port
takes only the KME certificate (KME CA, KME extended key usage) of a configured neighbour
with its pinned key; the key-delivery port takes only SAE certificates (SAE CA). And the
relay port's bounds: 100 idle TLS connections from a stranger's KME certificate are
refused, 100 silent TCP connections are closed at the handshake timeout, a neighbour gets
at most its share, the agent's thread count stays flat, and a relay works afterwards."""
from __future__ import annotations

import json
import os
import select
import socket
import ssl
import time
import uuid
from pathlib import Path

import httpx
import pytest

from agentproc import AgentProc
from sdqkd import pki
from sdqkd.agents.kms import forwarding as fm
from sdqkd.lab import plan as lab_plan
from sdqkd.private import write_private
from test_e2e_relay import TOPOLOGY, provisioned_and_relaying, relay_once

HANDSHAKE_TIMEOUT, IDLE_TIMEOUT = 2.0, 6.0
MAX_HANDSHAKES, MAX_PER_PEER = 16, 8


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relayauth")
    plan = lab_plan.make(TOPOLOGY, tmp, free_ports=True)
    for np in plan.nodes.values():  # short relay timeouts, so that the test sees them act
        cfg = json.loads(np.config_path.read_text())
        cfg["kms"].update(relay_handshake_timeout=HANDSHAKE_TIMEOUT, relay_idle_timeout=IDLE_TIMEOUT,
                          relay_max_handshakes=MAX_HANDSHAKES, relay_max_per_peer=MAX_PER_PEER)
        write_private(np.config_path, json.dumps(cfg))
    procs = {name: AgentProc(name, np.qkdn_id, np.netconf_port, np.config_path, np.dir).start()
             for name, np in plan.nodes.items()}
    for np in plan.nodes.values():
        wait_listening(np.relay_port)
        wait_listening(np.kms_port)
    yield plan, procs
    for p in procs.values():
        p.stop()


def wait_listening(port: int, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < end, f"nothing listens on {port}"
            time.sleep(0.05)


def connect(port: int, cert: Path | str, key: Path | str, ca: Path | str) -> ssl.SSLSocket:
    """A TLS connection to a relay port presenting (cert, key), checking the server against `ca`."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return pki.client_ssl_context(cert, key, ca).wrap_socket(raw, server_hostname="127.0.0.1")


def answers(sock: ssl.SSLSocket) -> bool:
    """Whether the relay answers a message on this connection: any reply counts (an unknown
    operation is refused with a 400 reply, which only an accepted peer gets)."""
    try:
        fm._send_frame(sock, {"op": "hello"})
        reply = fm._recv_frame(sock)
    except (OSError, ConnectionError, ValueError):
        return False
    assert reply["ok"] is False and reply["code"] == 400
    return True


def relay_accepts(port: int, cert: Path | str, key: Path | str, ca: Path | str) -> bool:
    try:
        sock = connect(port, cert, key, ca)
    except (OSError, ssl.SSLError):
        return False  # refused in the handshake (TLS 1.2), or the connection dropped
    with sock:
        return answers(sock)


def threads(proc: AgentProc) -> int:
    assert proc.proc is not None
    return len(os.listdir(f"/proc/{proc.proc.pid}/task"))


def kme_cas(plan) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    assert plan.kme_ca is not None and plan.sae_ca is not None
    return plan.kme_ca, plan.sae_ca


def test_the_lab_issues_kme_and_sae_certificates_from_two_cas_with_distinct_usages(line) -> None:
    plan, _ = line
    from cryptography import x509

    kme_ca, sae_ca = kme_cas(plan)
    a = plan.nodes["A"]
    kme = x509.load_pem_x509_certificates(a.kme_cert[0].read_bytes())
    sae = x509.load_pem_x509_certificates(a.sae_certs["sae-a"][0].read_bytes())
    assert kme[0].issuer == pki.load_cert(str(kme_ca[0])).subject and kme[1].subject == kme[0].issuer  # with its chain
    assert sae[0].issuer == pki.load_cert(str(sae_ca[0])).subject
    ku = x509.ExtendedKeyUsage
    assert set(kme[0].extensions.get_extension_for_class(ku).value) == {
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, pki.KME_EKU}
    assert list(sae[0].extensions.get_extension_for_class(ku).value) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    cfg = json.loads(plan.nodes["B"].config_path.read_text())
    assert cfg["kms"]["sae_ca"] == str(sae_ca[0]) and cfg["kms"]["kme_ca"] == str(kme_ca[0]) and "ca" not in cfg["kms"]
    assert cfg["peers"][a.qkdn_id]["kme_pin"] == pki.spki_pin(a.kme_cert[0])
    for path in (kme_ca[1], sae_ca[1], plan.ca[1], a.kme_cert[1]):  # private keys 0600 in 0700 directories
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


def test_the_relay_port_accepts_only_a_neighbours_pinned_kme_certificate(line, tmp_path) -> None:
    plan, _ = line
    kme_ca, sae_ca = kme_cas(plan)
    a, b = plan.nodes["A"], plan.nodes["B"]
    root = plan.ca[0]
    assert relay_accepts(b.relay_port, *a.kme_cert, root)  # the neighbour's own KME certificate
    # an SAE certificate (SAE CA, clientAuth): the relay does not trust the SAE CA
    assert not relay_accepts(b.relay_port, *a.sae_certs["sae-a"], root)
    # a KME certificate from the KME CA, of a node that is not B's neighbour
    stranger = pki.issue(kme_ca, str(uuid.uuid4()), tmp_path / "stranger", server_names=["127.0.0.1"], client=True, kme=True)
    assert not relay_accepts(b.relay_port, *stranger, root)
    # the neighbour's name on a KME certificate from the KME CA, with another key: not its pin
    twin = pki.issue(kme_ca, a.qkdn_id, tmp_path / "twin", server_names=["127.0.0.1"], client=True, kme=True)
    assert not relay_accepts(b.relay_port, *twin, root)
    # the neighbour's name on a certificate from the SAE CA, even one claiming the KME usage
    forged = pki.issue(sae_ca, a.qkdn_id, tmp_path / "forged", client=True, kme=True)
    assert not relay_accepts(b.relay_port, *forged, root)
    # and the lab root itself signs no KME: a root-issued certificate with A's name is refused
    rooted = pki.issue(plan.ca, a.qkdn_id, tmp_path / "rooted", server_names=["127.0.0.1"], client=True, kme=True)
    assert not relay_accepts(b.relay_port, *rooted, root)
    # a node checks whom it connects to the same way: trusting only the KME CA, B is B
    assert relay_accepts(b.relay_port, *a.kme_cert, kme_ca[0])
    with pytest.raises(ssl.SSLError):
        connect(b.relay_port, *a.kme_cert, sae_ca[0])
    logs = AgentProcLog(plan, "B")
    assert "is not a neighbour of this node" in logs and "is not the one pinned for it" in logs


def AgentProcLog(plan, name: str) -> str:  # noqa: N802 - reads like a value
    return (plan.nodes[name].dir / "agent.log").read_text(errors="replace")


def test_a_kme_certificate_gets_nothing_from_the_key_delivery_port(line) -> None:
    plan, _ = line
    a = plan.nodes["A"]
    ctx = ssl.create_default_context(cafile=str(plan.ca[0]))
    ctx.load_cert_chain(*map(str, a.kme_cert))
    url = f"https://127.0.0.1:{a.kms_port}/api/v1/keys/sae-c/status"
    with httpx.Client(verify=ctx, timeout=10) as c:
        try:
            r = c.get(url)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            pass  # refused in the TLS handshake: A trusts the SAE CA only for its callers
        else:
            assert r.status_code == 401, r.text
    ctx = ssl.create_default_context(cafile=str(plan.ca[0]))
    ctx.load_cert_chain(*map(str, a.sae_certs["sae-a"]))
    with httpx.Client(verify=ctx, timeout=10) as c:
        assert c.get(url).status_code == 200


def idle_connections(port: int, n: int, make) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(make(port))
        except (OSError, ssl.SSLError):
            out.append(None)
    return out


def closed(sock: socket.socket | None, wait: float) -> bool:
    """Whether the server closed this connection (EOF, reset or a TLS alert) within `wait` s,
    or refused it with a reply (a connection over a peer's limit: its keys are kept)."""
    if sock is None:
        return True
    sock.settimeout(wait)
    try:
        first = sock.recv(4)
    except (TimeoutError, socket.timeout):
        return False
    except (OSError, ssl.SSLError):
        return True
    if not first:
        return True
    sock.settimeout(5)
    rest = fm._recv_exact(sock, int.from_bytes(first, "big")) if len(first) == 4 else b""
    reply = json.loads(rest)
    assert reply["ok"] is False and reply["kept"] is True and "relay connections from" in reply["error"], reply
    return True


def test_idle_and_hostile_relay_connections_are_bounded_and_a_relay_still_works(line, tmp_path) -> None:
    plan, procs = line
    kme_ca, _ = kme_cas(plan)
    a, b = plan.nodes["A"], plan.nodes["B"]
    provisioned_and_relaying(plan, procs)
    base = threads(procs["B"])
    peak = base

    # 100 TLS connections with a KME certificate of a stranger: every one refused
    stranger = pki.issue(kme_ca, str(uuid.uuid4()), tmp_path / "s", server_names=["127.0.0.1"], client=True, kme=True)
    conns = idle_connections(b.relay_port, 100, lambda p: connect(p, *stranger, plan.ca[0]))
    peak = max(peak, threads(procs["B"]))
    assert all(closed(c, 5) for c in conns)
    for c in conns:
        if c is not None:
            c.close()

    # 100 TCP connections that never start TLS: closed at the handshake timeout, or earlier
    # to make way for newer ones (at most MAX_HANDSHAKES wait at once)
    start = time.monotonic()
    raw = [socket.create_connection(("127.0.0.1", b.relay_port), timeout=5) for _ in range(100)]
    peak = max(peak, threads(procs["B"]))
    assert relay_accepts(b.relay_port, *a.kme_cert, plan.ca[0])  # the silent ones hold no neighbour off
    waited, pending = [], set(raw)
    while pending and time.monotonic() < start + HANDSHAKE_TIMEOUT + 3:
        for s in select.select(list(pending), [], [], 0.1)[0]:
            waited.append(time.monotonic() - start)
            pending.discard(s)
            s.close()
    assert not pending, f"{len(pending)} silent connections still open after {HANDSHAKE_TIMEOUT + 3} s"
    kept = sum(1 for t in waited if t >= HANDSHAKE_TIMEOUT - 0.5)
    assert 1 <= kept <= MAX_HANDSHAKES, waited  # only those were kept waiting

    # 100 idle TLS connections from the real neighbour A: MAX_PER_PEER kept (and served),
    # the rest refused; the kept ones are closed after the idle timeout
    conns = idle_connections(b.relay_port, 100, lambda p: connect(p, *a.kme_cert, plan.ca[0]))
    peak = max(peak, threads(procs["B"]))
    ready = set(select.select([c for c in conns if c is not None], [], [], 1.0)[0])  # closed or refused by now
    alive = [c for c in conns if c is not None and (c not in ready or not closed(c, 0.1))]
    assert 1 <= len(alive) <= MAX_PER_PEER  # A's own pooled connection may hold one of its places
    assert answers(alive[-1])
    start = time.monotonic()
    assert all(closed(c, IDLE_TIMEOUT + 3) for c in alive)
    assert time.monotonic() - start > IDLE_TIMEOUT - 2
    for c in conns:
        if c is not None:
            c.close()
    peak = max(peak, threads(procs["B"]))
    assert peak <= base + 2, (base, peak)  # no thread per connection
    print(f"B threads: {base} before, {peak} at most during the floods; silent connections closed after "
          f"{min(waited):.2f}..{max(waited):.2f} s ({kept} kept to the handshake timeout); {len(alive)} of A's kept")

    # A's pooled connection to B was closed by B's idle timeout meanwhile: keys still flow
    assert relay_once(plan, 20) < 20
    assert threads(procs["B"]) <= base + 8  # at most the relay workers on top
