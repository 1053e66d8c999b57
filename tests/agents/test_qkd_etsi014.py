"""Real-device QKD modules (kind qkd-etsi014) against real ETSI 014 servers.

The "devices" are two of our own LKMS nodes, each behind its ETSI 014 HTTPS front end
with mutual TLS, joined by their own PHYS link whose link keys a feeder thread gives
both ends at a fixed rate (the devices' quantum link). Agent alice is the master SAE
at device A, agent bob the slave SAE at device B; their Etsi014QkdModule drivers pair
over the service channel on loopback."""
from __future__ import annotations

import base64
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdqkd.agents.drivers import registry
from sdqkd.agents.drivers.base import Change, DriverError
from sdqkd.agents.drivers.qkd_etsi014 import DeviceApi, Etsi014QkdModule, RateMeter
from sdqkd.agents.kms import etsi014, forwarding
from sdqkd import pki
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig, allocator
from sdqkd.agents.kms.routes import AppRoute, LinkRoute, RouteTable
import qkdpair
from qkdpair import node_ids, phys_link, wait_for

SERVICE_KEY = b"lab-wide service key for tests!!"
KME_A, KME_B = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/vendor-kme/{n}")) for n in "ab")
SAES = {"sae-alice": KME_A, "sae-bob": KME_B}
IDS = node_ids("alice", "bob")
QL = "0a0b0000-0000-4000-8000-00000000000a"
POLL = 0.05
FEED_RATE = 300.0  # link keys per second on the devices' quantum link


class Device:
    """One vendor KME: an LKMS with its ETSI 014 HTTPS server, which tests stop and restart."""

    def __init__(self, lkms: Lkms, ssl_ctx) -> None:
        self.lkms, self.ssl_ctx, self.port = lkms, ssl_ctx, 0
        self.server: HttpsServer | None = None
        self.busy = False

    def start(self, max_pending: int = 256) -> None:
        app = make_app(max_pending=max_pending)  # 0: every call is answered 503 (overloaded)
        etsi014.add_routes(app, self.lkms)
        self.server = HttpsServer(app, "127.0.0.1", self.port, self.ssl_ctx).start()
        self.port, self.busy = self.server.port, max_pending == 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


class Feed:
    """The devices' quantum link: the same link keys reach both KMEs at `rate` keys/s."""

    def __init__(self, a: Lkms, b: Lkms, link: str, rate: float) -> None:
        self.a, self.b, self.link, self.rate = a, b, link, rate
        self.ids: list[str] = []
        self.mine_a = allocator(KME_A, KME_B)
        self.on = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        owed, last = 0.0, time.monotonic()
        while not self._stop.wait(0.01):
            now = time.monotonic()
            owed += (now - last) * self.rate if self.on.is_set() else 0.0
            last = now
            for _ in range(int(owed)):
                kid, key = str(uuid.uuid4()), os.urandom(32)
                self.a.key_sink(self.link, kid, key)
                self.b.key_sink(self.link, kid, key)
                self.ids.append(kid)
            owed -= int(owed)

    def a_share(self) -> int:
        return sum(1 for k in list(self.ids) if self.mine_a(k))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class End(qkdpair.End):
    def link(self) -> dict:
        return self.module.state()["links"][QL]

    def iface(self) -> str:
        return self.module.state()["interface"]["status"]


class Devices:
    """Two vendor KMEs with their relay between them (shared by the tests of this file)."""

    def __init__(self, tmp: Path) -> None:
        self.ca = pki.make_ca(tmp / "vendor", "vendor-ca")
        self.sae_certs = {s: pki.issue(self.ca, s, tmp / "sae", client=True) for s in SAES}
        fwd, self.kme = {}, {}
        for kme in (KME_A, KME_B):
            cert = pki.issue(self.ca, kme, tmp / kme, server_names=["127.0.0.1"], client=True)
            fwd[kme] = forwarding.Forwarder(kme, ("127.0.0.1", 0), pki.server_ssl_context(*cert, self.ca[0]),
                                            pki.client_ssl_context(*cert, self.ca[0]), {})
            # a device hands out only the link keys it allocates: no borrowing of the peer's half (lend_min)
            cfg = LkmsConfig(kme, kme[:8], dict(SAES), lend_min=sys.maxsize)
            lkms = Lkms(cfg, KeyStore(tmp / f"{kme}.sqlite"), os.urandom, fwd[kme])
            self.kme[kme] = Device(lkms, pki.server_ssl_context(*cert, self.ca[0]))
            self.kme[kme].start()
        for f in fwd.values():
            f.peers = {k: g.address for k, g in fwd.items() if g is not f}

    def new_link(self) -> str:
        """A fresh quantum link between the devices (keys of earlier tests stay on old ones)."""
        dev_link, app = str(uuid.uuid4()), str(uuid.uuid4())
        for kme, other in ((KME_A, KME_B), (KME_B, KME_A)):
            self.kme[kme].lkms.update_routes(RouteTable(kme, {dev_link: LinkRoute(dev_link, "PHYS", True, other)},
                                                        (AppRoute(app, frozenset(SAES), (dev_link,)),)))
        return dev_link

    def heal(self) -> None:
        for dev in self.kme.values():
            if dev.server is None or dev.busy:
                dev.stop()
                dev.start()

    def close(self) -> None:
        for dev in self.kme.values():
            dev.stop()
            dev.lkms.shutdown()


class Lab(qkdpair.Ends):
    def __init__(self, devs: Devices) -> None:
        super().__init__(IDS)
        self.ca, self.sae_certs, self.devices = devs.ca, devs.sae_certs, devs.kme
        self.feed = Feed(devs.kme[KME_A].lkms, devs.kme[KME_B].lkms, devs.new_link(), FEED_RATE)

    def api(self, node: str, **kw) -> DeviceApi:
        sae, peer, kme = ("sae-alice", "sae-bob", KME_A) if node == "alice" else ("sae-bob", "sae-alice", KME_B)
        cert, key = self.sae_certs[sae]
        fields = {"url": self.devices[kme].url, "sae_id": sae, "peer_sae_id": peer, "ca": str(self.ca[0]),
                  "cert": str(cert), "key": str(key), "timeout": 2.0, **kw}
        return DeviceApi(**fields)

    def module(self, node: str, role: str, key: bytes = SERVICE_KEY, api: DeviceApi | None = None) -> End:
        end = End(None)  # type: ignore[arg-type]
        end.module = Etsi014QkdModule(
            node, IDS[node], 1, role, device=api or self.api(node), service_key=key, peer_address=self.address,
            key_sink=lambda l, k, b: end.keys.append((l, k, b)), poll=POLL, max_backoff=0.2, skr_window=1.0,
            idle_after=0.3, perf_every=5, model="LKMS-as-device", technology="etsi-qkd-node-types:DV-QKD",
            wavelength_range="1-4", max_absorption=20.0)
        end.module.open(end.events.append)
        self.ends[node] = end
        return end

    def close(self) -> None:
        super().close()
        self.feed.close()


def link(local: str, remote: str, role: str | None = None, enable: bool = True, **extra) -> dict:
    return phys_link(QL, IDS, local, remote, role, enable, **extra)


def configure(end: End, entry: dict) -> None:
    change = Change("qkd-link", entry["qkdl_id"], None, entry)
    assert end.module.handles(change)
    end.module.check(change)
    end.module.apply(change)


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:
    devs = Devices(tmp_path_factory.mktemp("devices"))
    yield devs
    devs.close()


@pytest.fixture
def lab(devices: Devices) -> Iterator[Lab]:
    devices.heal()
    lab = Lab(devices)
    yield lab
    lab.close()


def start_pair(lab: Lab, feed: bool = True) -> tuple[End, End]:
    if feed:
        lab.feed.on.set()
    a, b = lab.module("alice", "TRANSMITTER"), lab.module("bob", "RECEIVER")
    configure(b, link("bob", "alice", "RECEIVER"))
    configure(a, link("alice", "bob", "TRANSMITTER"))
    return a, b


def same_stream(a: End, b: End) -> int:
    n = min(len(a.keys), len(b.keys))
    assert a.keys[:n] == b.keys[:n]
    return n


def test_both_sinks_get_identical_key_streams(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = start_pair(lab)
    wait_for(lambda: len(a.keys) >= 100 and any(e.kind == "link-perf" for e in a.events))
    n = same_stream(a, b)
    assert n >= 100 and len(b.keys) >= len(a.keys)  # the slave sinks first, the master after the ack
    assert len({k for _, k, _ in a.keys}) == len(a.keys) and {len(kb) for _, _, kb in a.keys} == {32}
    assert {q for q, _, _ in b.keys} == {QL}
    assert a.link()["status"] == b.link()["status"] == "ACTIVE"
    assert ("ACTIVE", "key flowing") in a.statuses() and ("ACTIVE", "key flowing") in b.statuses()
    st = a.module.state()
    assert st["interface"] == {"qkdi_id": 1, "status": "ENABLED", "model": "LKMS-as-device",
                               "technology": "etsi-qkd-node-types:DV-QKD",
                               "role_support": "etsi-qkd-node-types:TRANSMITTER",
                               "wavelength_range": "1-4", "max_absorption": 20.0}
    assert st["links"][QL]["qber"] is None and st["links"][QL]["key_bits"] >= n * 256
    perf = [e.data for e in a.events if e.kind == "link-perf"]
    assert perf[-1]["qkdl_id"] == QL and perf[-1]["skr"] > 0 and perf[-1]["qber"] is None
    # the keys are the devices' own: bob's device would not hand them out twice
    dev_b = lab.devices[KME_B].lkms
    with pytest.raises(Exception):
        dev_b.dec_keys("sae-bob", "sae-alice", [b.keys[0][1]])
    logged = caplog.text
    assert b.keys[0][1] in logged  # the records of the devices and drivers were captured
    for _, _, kb in a.keys:
        for form in (base64.b64encode(kb).decode(), kb.hex(), kb.hex().upper()):
            assert form not in logged


def test_rate_is_what_the_device_has(lab: Lab) -> None:
    a, b = start_pair(lab)
    time.sleep(1.3)
    share = lab.feed.a_share()
    assert len(a.keys) <= share  # device A may hand out only the link keys it allocates
    skr, expect = a.link()["skr"], FEED_RATE / 2 * 256  # alice's device allocates half the link keys
    assert skr == pytest.approx(expect, rel=0.35)
    assert b.link()["skr"] == pytest.approx(skr, rel=0.35)
    lab.feed.on.clear()  # the devices' quantum link stops: they drain, then hold nothing
    wait_for(lambda: a.link()["status"] == "PASSIVE" and b.link()["status"] == "PASSIVE")
    reason = "device holds no key for SAE sae-bob"
    assert a.link()["reason"] == reason and ("PASSIVE", reason) in b.statuses()
    assert len(a.keys) == lab.feed.a_share() == len(b.keys)  # every key the device held, no more
    same_stream(a, b)
    n = len(b.keys)
    lab.feed.on.set()
    wait_for(lambda: a.link()["status"] == "ACTIVE" and len(b.keys) > n + 10)


@pytest.mark.parametrize("down", ["alice", "bob"])
def test_device_outage_goes_passive_and_recovers(lab: Lab, down: str) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: len(b.keys) > 20)
    failed = a if down == "alice" else b
    device = lab.devices[KME_A if down == "alice" else KME_B]
    device.stop()
    wait_for(lambda: failed.iface() == "FAILED" and a.link()["status"] == b.link()["status"] == "PASSIVE")
    (status, reason), = failed.statuses("interface-status")
    assert status == "FAILED" and reason.startswith("device unreachable")
    if down == "alice":
        assert a.link()["reason"].startswith("device unreachable")
    else:
        assert a.link()["reason"].startswith("receiver device unreachable")
    assert any(s == "PASSIVE" for s, _ in b.statuses())
    time.sleep(4 * POLL)
    na, nb = len(a.keys), len(b.keys)
    time.sleep(6 * POLL)
    assert (len(a.keys), len(b.keys)) == (na, nb)
    device.start()  # same port: the driver's retries find it again
    wait_for(lambda: failed.iface() == "ENABLED" and a.link()["status"] == "ACTIVE" and len(b.keys) > nb + 20)
    assert failed.statuses("interface-status")[-1] == ("ENABLED", "device reachable")
    same_stream(a, b)


def test_device_busy_is_passive_not_failed(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: len(b.keys) > 10)
    dev = lab.devices[KME_A]
    dev.stop()
    dev.start(max_pending=0)  # overloaded: 503 to every call
    wait_for(lambda: a.link()["reason"].startswith("device busy (503)"))
    assert a.iface() == "ENABLED" and not a.statuses("interface-status")
    wait_for(lambda: b.link()["reason"].startswith("device busy (503)"))
    dev.stop()
    dev.start()
    n = len(b.keys)
    wait_for(lambda: a.link()["status"] == "ACTIVE" and len(b.keys) > n + 10)
    same_stream(a, b)


def test_tls_failure_fails_the_interface(lab: Lab, tmp_path: Path) -> None:
    other = pki.make_ca(tmp_path / "other", "other-ca")  # alice trusts the wrong vendor CA
    lab.feed.on.set()
    a = lab.module("alice", "TRANSMITTER", api=lab.api("alice", ca=str(other[0])))
    b = lab.module("bob", "RECEIVER")
    configure(b, link("bob", "alice", "RECEIVER"))
    configure(a, link("alice", "bob", "TRANSMITTER"))
    wait_for(lambda: a.iface() == "FAILED")
    assert a.statuses("interface-status")[0][1].startswith("device TLS failure")
    wait_for(lambda: a.link()["status"] == "PASSIVE" and b.link()["status"] == "PASSIVE")
    assert a.keys == b.keys == []


@pytest.mark.parametrize("impostor", ["alice", "bob"])
def test_wrong_service_key_refuses_pairing(lab: Lab, impostor: str) -> None:
    lab.feed.on.set()
    a = lab.module("alice", "TRANSMITTER", key=b"not the lab key" if impostor == "alice" else SERVICE_KEY)
    b = lab.module("bob", "RECEIVER", key=b"not the lab key" if impostor == "bob" else SERVICE_KEY)
    configure(b, link("bob", "alice", "RECEIVER"))
    configure(a, link("alice", "bob", "TRANSMITTER"))
    wait_for(lambda: a.link()["reason"] == "service channel authentication failed (peer)"
             and b.link()["reason"] == "service channel authentication failed")
    time.sleep(5 * POLL)
    assert a.link()["status"] == b.link()["status"] == "PENDING" and a.keys == b.keys == []


def test_sae_mismatch_refuses_pairing(lab: Lab) -> None:
    a = lab.module("alice", "TRANSMITTER")
    b = lab.module("bob", "RECEIVER", api=lab.api("bob", peer_sae_id="sae-mallory"))
    configure(b, link("bob", "alice", "RECEIVER"))
    configure(a, link("alice", "bob", "TRANSMITTER"))
    wait_for(lambda: a.link()["reason"].startswith("peer refused: SAE IDs do not match"))
    assert a.keys == b.keys == []


def test_check_rejections(lab: Lab) -> None:
    a = lab.module("alice", "TRANSMITTER")
    for bad in (link("alice", "bob", "TRANSMITTER", phys_wavelength="33"),
                link("alice", "bob", "RECEIVER"),
                link("alice", "bob", phys_channel_att="20.5"),
                {**link("alice", "bob"), "qkdl_remote": {}},
                link("alice", "bob", phys_wavelength="x")):
        with pytest.raises(DriverError) as err:
            a.module.check(Change("qkd-link", QL, None, bad))
        assert err.value.reason == "invalid-value", bad
    configure(a, link("alice", "bob", "TRANSMITTER", phys_wavelength="3"))
    other = {**link("alice", "bob"), "qkdl_id": "0e0e0000-0000-4000-8000-00000000000e"}
    with pytest.raises(DriverError) as err:
        a.module.check(Change("qkd-link", other["qkdl_id"], None, other))
    assert err.value.reason == "resource-denied"
    a.module.check(Change("qkd-link", other["qkdl_id"], None, {**other, "qkdl_enable": False}))
    assert not a.module.handles(Change("qkd-link", "v", None, {**link("alice", "bob"),
                                                                "qkdl_type": "etsi-qkd-node-types:VIRT"}))
    assert not a.module.handles(Change("qkd-link", "x", None, link("bob", "alice")))
    with pytest.raises(ValueError):
        Etsi014QkdModule("x", IDS["alice"], 2, "SNIFFER", device=lab.api("alice"), key_sink=print,
                         service_key=SERVICE_KEY, peer_address=lab.address)
    with pytest.raises(ValueError):
        Etsi014QkdModule("x", IDS["alice"], 2, "RECEIVER", device=lab.api("alice", peer_sae_id=""),
                         key_sink=print, service_key=SERVICE_KEY, peer_address=lab.address)
    assert registry.driver_class("qkd-etsi014") is Etsi014QkdModule


def test_disable_stops_both_ends_and_close_is_prompt(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: len(b.keys) > 10)
    on = link("alice", "bob", "TRANSMITTER")
    a.module.apply(Change("qkd-link", QL, on, {**on, "qkdl_enable": False}))
    assert a.link()["status"] == "OFF"
    wait_for(lambda: b.link()["status"] == "PENDING")
    time.sleep(2 * POLL)
    n = len(b.keys)
    time.sleep(6 * POLL)
    assert len(b.keys) == n and len(a.keys) <= n
    t0 = time.monotonic()
    a.module.close()
    b.module.close()
    assert time.monotonic() - t0 < 4.0  # no thread waits out its session timeout (5 s or more)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("qkd-alice:", "qkd-bob:"))]


def test_rate_meter_measures_a_window() -> None:
    m = RateMeter(window=2.0, floor=0.5)
    t0 = m.since
    for i in range(10):
        m.add(1000, t0 + 0.2 * i)
    assert m.rate(t0 + 2.0) == pytest.approx(5000, rel=0.1)
    assert m.rate(t0 + 10.0) == 0
