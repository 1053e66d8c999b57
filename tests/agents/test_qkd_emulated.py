"""Emulated QKD pairs on loopback: identical key streams, physics-driven rate, status and failures."""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdqkd.agents.drivers.base import Change, DriverError
from sdqkd.agents.drivers.optical_switch import OpticalSwitch
from sdqkd.agents.emulation.plant import Plant
from sdqkd.qkdprofile import BUILTIN_PROFILES, QkdProfile, secret_key_rate
from sdqkd.agents.drivers.qkd_emulated import EmulatedQkdModule, KeyStream
from qkdpair import End, Ends, node_ids, phys_link, wait_for

SERVICE_KEY = b"lab-wide service key for tests!!"
IDS = node_ids("alice", "bob", "carol", "dave")
NODE_OF = {v: k for k, v in IDS.items()}
# a modest DV profile: 50 kb/s at 5 dB, so a run makes keys without burning CPU
PROFILE = QkdProfile.from_dict({
    "name": "test-dv", "model": "T-1", "technology": "etsi-qkd-node-types:DV-QKD", "band": "O-band",
    "max-absorption": "20", "reference-skr": "50", "reference-loss": "5", "qber": "3", "qber-noise": "0.3"})
LAB = {
    "name": "q",
    "node": [{"name": n, "qkd-interface": [{"id": 1, "profile": "test-dv"}]} for n in IDS],
    "fibre": [{"name": "f-ab", "length": "10", "loss": "5", "a-end": {"node": "alice"}, "b-end": {"node": "bob"}},
              {"name": "f-cd", "length": "40", "loss": "15", "a-end": {"node": "carol"}, "b-end": {"node": "dave"}}],
    "link": [{"name": "ab", "endpoints": ["alice:1", "bob:1"], "path": ["f-ab"]},
             {"name": "cd", "endpoints": ["carol:1", "dave:1"], "path": ["f-cd"]}],
}
TICK, SCALE = 0.02, 10.0


class Lab(Ends):
    """Modules of the test lab on loopback, with the resolvers the real lab provides."""

    def __init__(self, tmp: Path, topology: dict = LAB) -> None:
        super().__init__(IDS)
        self.plant = Plant(topology, tmp / "plant.db")

    def module(self, node: str, role: str, key: bytes = SERVICE_KEY, profile: QkdProfile = PROFILE,
               **kw) -> End:
        end = End(None)  # type: ignore[arg-type]
        end.module = EmulatedQkdModule(
            node, IDS[node], 1, profile, role, self.plant, peer_address=self.address, node_of=NODE_OF.get,
            key_sink=lambda l, k, b: end.keys.append((l, k, b)), service_key=key, tick=TICK,
            time_scale=SCALE, perf_every=5, seed=hash(node) & 0xFFFF, **kw)
        end.module.open(end.events.append)
        self.ends[node] = end
        return end

    def close(self) -> None:
        super().close()
        self.plant.close()


def link(qkdl: str, local: str, remote: str, role: str | None = None, enable: bool = True, **extra) -> dict:
    return phys_link(qkdl, IDS, local, remote, role, enable, **extra)


def configure(end: End, entry: dict, old: dict | None = None) -> Change:
    change = Change("qkd-link", entry["qkdl_id"], old, entry)
    assert end.module.handles(change)
    end.module.check(change)
    end.module.apply(change)
    return change


QAB = "0a0b0000-0000-4000-8000-00000000000a"
QCD = "0c0d0000-0000-4000-8000-00000000000c"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def start_pair(lab: Lab, tx: str = "alice", rx: str = "bob", qkdl: str = QAB) -> tuple[End, End]:
    a, b = lab.module(tx, "TRANSMITTER"), lab.module(rx, "RECEIVER")
    configure(b, link(qkdl, rx, tx, "RECEIVER"))
    configure(a, link(qkdl, tx, rx, "TRANSMITTER"))
    return a, b


def status(end: End, qkdl: str = QAB) -> str:
    return end.module.state()["links"][qkdl]["status"]


def test_both_ends_deliver_identical_key_streams(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = start_pair(lab)
    wait_for(lambda: len(a.keys) >= 60 and any(e.kind == "link-perf" for e in a.events))
    n = len(a.keys)
    assert len(b.keys) >= n and b.keys[:n] == a.keys[:n]
    ids = [k for _, k, _ in a.keys[:n]]
    assert len(set(ids)) == n and all(uuid.UUID(k).version == 4 for k in ids)
    assert {len(kb) for _, _, kb in a.keys} == {32} and len({kb for _, _, kb in a.keys}) == len(a.keys)
    assert {q for q, _, _ in a.keys} == {QAB}
    assert status(a) == status(b) == "ACTIVE"
    assert ("ACTIVE", "key flowing") in a.statuses() and ("ACTIVE", "key flowing") in b.statuses()
    st = a.module.state()
    assert st["interface"] == {"qkdi_id": 1, "status": "ENABLED", "model": "T-1",
                               "technology": "etsi-qkd-node-types:DV-QKD",
                               "role_support": "etsi-qkd-node-types:TRANSMITTER",
                               "wavelength_range": None, "max_absorption": 20.0}
    assert st["links"][QAB]["key_bits"] >= n * 256
    perf = [e for e in a.events if e.kind == "link-perf"]
    assert perf and perf[-1].data["qkdl_id"] == QAB and 0 < perf[-1].data["qber"] < 0.1
    logged = caplog.text
    assert logged and not any(kb.hex() in logged or kb.hex().upper() in logged for _, _, kb in b.keys)


def test_a_full_key_store_at_either_end_stops_storing_not_distilling(lab: Lab) -> None:
    """Like a device's key buffer: a block's keys are kept only when both ends have
    room, so the two streams stay identical; the link stays ACTIVE and its SKR
    measured all along."""
    room = {"alice": threading.Event(), "bob": threading.Event()}
    room["alice"].set()  # bob's store is full
    a = lab.module("alice", "TRANSMITTER", key_room=lambda link: room["alice"].is_set())
    b = lab.module("bob", "RECEIVER", key_room=lambda link: room["bob"].is_set())
    configure(b, link(QAB, "bob", "alice", "RECEIVER"))
    configure(a, link(QAB, "alice", "bob", "TRANSMITTER"))
    wait_for(lambda: status(a) == "ACTIVE" and a.module.state()["links"][QAB]["skr"] > 0)
    time.sleep(0.3)
    assert a.keys == [] and b.keys == [] and status(b) == "ACTIVE"
    room["bob"].set()
    wait_for(lambda: len(a.keys) >= 20)
    room["alice"].clear()  # now the transmitter's store is full
    time.sleep(0.2)
    n = len(a.keys)
    time.sleep(0.3)
    assert len(a.keys) == n and a.module.state()["links"][QAB]["skr"] > 0
    wait_for(lambda: len(b.keys) == n)
    assert b.keys == a.keys


def test_rate_follows_loss_and_profile(lab: Lab) -> None:
    a, b = start_pair(lab)
    c, d = start_pair(lab, "carol", "dave", QCD)
    time.sleep(1.0)
    near, far = a.module.state()["links"][QAB], c.module.state()["links"][QCD]
    assert near["status"] == far["status"] == "ACTIVE"
    # 10 dB more loss: ten times fewer bits (DV, exponent 1); measured rates track the profile
    assert far["key_bits"] < 0.3 * near["key_bits"]
    assert near["skr"] == pytest.approx(secret_key_rate(PROFILE, 5.0), rel=0.3)
    assert far["skr"] == pytest.approx(secret_key_rate(PROFILE, 15.0), rel=0.5)
    assert far["qber"] > near["qber"] > 0.0
    skrs = {a.module.state()["links"][QAB]["skr"] for _ in range(3) if time.sleep(0.1) is None}
    assert len(skrs) > 1  # a measurement, not a constant


def test_disabling_stops_keys_on_both_ends(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: len(b.keys) > 10)
    on = link(QAB, "alice", "bob", "TRANSMITTER")
    configure(a, {**on, "qkdl_enable": False}, old=on)
    assert status(a) == "OFF"
    wait_for(lambda: status(b) == "PENDING")
    time.sleep(3 * TICK)
    na, nb = len(a.keys), len(b.keys)
    time.sleep(10 * TICK)
    assert (len(a.keys), len(b.keys)) == (na, nb)
    assert b.module.state()["links"][QAB]["reason"].startswith("peer stopped")
    configure(a, on, old={**on, "qkdl_enable": False})  # enable again: keys flow again
    wait_for(lambda: len(a.keys) > na + 5 and status(b) == "ACTIVE")
    a.module.apply(Change("qkd-link", QAB, on, None))  # delete
    assert QAB not in a.module.state()["links"]


def test_fibre_cut_goes_passive_and_splice_recovers(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: status(a) == "ACTIVE" and status(b) == "ACTIVE")
    lab.plant.cut_fibre("f-ab")
    wait_for(lambda: status(a) == "PASSIVE" and status(b) == "PASSIVE")
    assert ("PASSIVE", "fibre cut") in a.statuses() and ("PASSIVE", "fibre cut") in b.statuses()
    assert a.module.state()["links"][QAB]["qber"] == 0.5  # dark counts only
    time.sleep(2 * TICK)
    n = len(a.keys)
    time.sleep(10 * TICK)
    assert len(a.keys) == n
    lab.plant.cut_fibre("f-ab", cut=False)
    wait_for(lambda: status(a) == "ACTIVE" and len(a.keys) > n)
    assert a.statuses()[-1] == ("ACTIVE", "key flowing")


def test_module_failure_and_repair(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: status(a) == "ACTIVE")
    b.module.inject_failure("module")
    assert b.module.state()["interface"]["status"] == "FAILED"
    assert ("FAILED", "injected module failure") in b.statuses("interface-status")
    wait_for(lambda: status(a) == "PASSIVE" and status(b) == "PASSIVE")
    assert a.module.state()["links"][QAB]["reason"] == "receiver interface failed"
    time.sleep(2 * TICK)
    n = len(b.keys)
    time.sleep(8 * TICK)
    assert len(b.keys) == n
    b.module.repair()
    assert b.statuses("interface-status")[-1] == ("ENABLED", "repaired")
    wait_for(lambda: status(a) == "ACTIVE" and len(b.keys) > n)
    with pytest.raises(ValueError, match="known: module, service-channel"):
        a.module.inject_failure("gremlins")


def test_service_channel_drop_reconnects(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: len(a.keys) > 5)
    b.module.inject_failure("service-channel")
    wait_for(lambda: any(s == "PENDING" and "lost" in r for s, r in a.statuses()))
    n = len(a.keys)
    wait_for(lambda: status(a) == "ACTIVE" and len(a.keys) > n + 5)
    m = len(a.keys)
    assert b.keys[:m] == a.keys[:m]  # the new session's keys still match, in order


@pytest.mark.parametrize("impostor, tx_reason", [
    ("alice", "service channel authentication failed (peer)"),  # the transmitter holds a wrong key
    ("bob", "service channel authentication failed (peer)"),    # the receiver holds a wrong key
])
def test_wrong_service_key_refuses_pairing(lab: Lab, impostor: str, tx_reason: str) -> None:
    keys = {impostor: b"not the lab key"}
    a = lab.module("alice", "TRANSMITTER", key=keys.get("alice", SERVICE_KEY))
    b = lab.module("bob", "RECEIVER", key=keys.get("bob", SERVICE_KEY))
    configure(b, link(QAB, "bob", "alice", "RECEIVER"))
    configure(a, link(QAB, "alice", "bob", "TRANSMITTER"))
    wait_for(lambda: a.module.state()["links"][QAB]["reason"] == tx_reason
             and b.module.state()["links"][QAB]["reason"] == "service channel authentication failed")
    time.sleep(5 * TICK)
    assert status(a) == status(b) == "PENDING" and a.keys == b.keys == []
    assert ("PENDING", tx_reason) in a.statuses()


def test_receiver_refuses_a_transmitter_without_the_key(lab: Lab) -> None:
    b = lab.module("bob", "RECEIVER")
    configure(b, link(QAB, "bob", "alice", "RECEIVER"))

    def send(sock: socket.socket, msg: dict) -> None:
        data = json.dumps(msg).encode()
        sock.sendall(struct.pack(">I", len(data)) + data)

    def recv(sock: socket.socket) -> dict:
        size = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0]
        return json.loads(sock.recv(size, socket.MSG_WAITALL))

    with socket.create_connection(b.module.address, timeout=2) as sock:  # an impostor skips the checks
        send(sock, {"t": "hello", "v": 1, "qkdl_id": QAB, "from": {"qkdn_id": IDS["alice"], "qkdi_id": 1},
                    "to": {"qkdn_id": IDS["bob"], "qkdi_id": 1}, "nonce": "00" * 16, "pub": "11" * 32})
        assert recv(sock)["t"] == "challenge"
        send(sock, {"t": "auth", "mac": "00" * 32})
        assert recv(sock) == {"reason": "authentication failed", "t": "refuse"}
    assert b.module.state()["links"][QAB]["reason"] == "service channel authentication failed"


def test_two_transmitters_do_not_pair(lab: Lab) -> None:
    a, b = lab.module("alice", "TRANSCEIVER"), lab.module("bob", "TRANSCEIVER")
    configure(b, link(QAB, "bob", "alice", "TRANSMITTER"))
    configure(a, link(QAB, "alice", "bob", "TRANSMITTER"))
    wait_for(lambda: a.module.state()["links"][QAB]["reason"] == "peer refused: both ends are transmitters")
    assert a.keys == b.keys == []


def test_unknown_link_at_receiver_stays_pending(lab: Lab) -> None:
    a = lab.module("alice", "TRANSMITTER")
    b = lab.module("bob", "RECEIVER")
    configure(a, link(QAB, "alice", "bob", "TRANSMITTER"))
    wait_for(lambda: a.module.state()["links"][QAB]["reason"] == "peer refused: unknown link")
    configure(b, link(QAB, "bob", "alice", "RECEIVER"))  # configured late: the backoff retry pairs
    wait_for(lambda: status(a) == "ACTIVE" and len(b.keys) > 0)


def test_check_rejections(lab: Lab) -> None:
    cer = lab.module("carol", "TRANSMITTER", profile=BUILTIN_PROFILES["idq-cerberis3-c"])
    for bad, tag in ((link(QCD, "carol", "dave", "TRANSMITTER", phys_wavelength="33"), "invalid-value"),
                     (link(QCD, "carol", "dave", "RECEIVER"), "invalid-value"),
                     (link(QCD, "carol", "dave", phys_channel_att="18.5"), "invalid-value"),
                     ({**link(QCD, "carol", "dave"), "qkdl_remote": {}}, "invalid-value")):
        with pytest.raises(DriverError) as err:
            cer.module.check(Change("qkd-link", QCD, None, bad))
        assert err.value.reason == tag, bad
    configure(cer, link(QCD, "carol", "dave", "TRANSMITTER", phys_wavelength="34"))
    other = link("0e0e0000-0000-4000-8000-00000000000e", "carol", "alice")
    with pytest.raises(DriverError) as err:
        cer.module.check(Change("qkd-link", other["qkdl_id"], None, other))
    assert err.value.reason == "resource-denied"
    cer.module.check(Change("qkd-link", other["qkdl_id"], None, {**other, "qkdl_enable": False}))
    tx_only = QkdProfile.from_dict({**PROFILE.to_dict(), "role-support": "etsi-qkd-node-types:TRANSMITTER"})
    with pytest.raises(ValueError):
        lab.module("dave", "RECEIVER", profile=tx_only)
    assert not cer.module.handles(Change("qkd-link", "v", None, {**link("v", "carol", "dave"),
                                                                  "qkdl_type": "etsi-qkd-node-types:VIRT"}))
    assert not cer.module.handles(Change("qkd-link", "x", None, link("x", "dave", "carol")))


def test_keystream_is_deterministic_and_carries_bits() -> None:
    s1, s2, s3 = KeyStream(b"s" * 32, 256), KeyStream(b"s" * 32, 256), KeyStream(b"t" * 32, 256)
    assert s1.feed(0, 200) == [] and s1.pending_bits == 200
    k1 = s1.feed(1, 600)
    assert len(k1) == 3 and s1.pending_bits == 32
    s2.feed(0, 200)
    assert s2.feed(1, 600) == k1
    s3.feed(0, 200)
    assert s3.feed(1, 600) != k1
    k2 = s1.feed(2, 256 * 50)
    ids = [k for k, _ in k1 + k2]
    assert all(str(uuid.UUID(k)) == k and uuid.UUID(k).version == 4 and uuid.UUID(k).variant == uuid.RFC_4122 for k in ids)
    assert len(set(ids)) == len(ids) == 53 and len({key for _, key in k1 + k2}) == 53
    assert {len(key) for _, key in k1 + k2} == {32} and len(KeyStream(b"s" * 32, 8 * 100).feed(0, 800)[0][1]) == 100
    with pytest.raises(ValueError):
        KeyStream(b"s", 100)


def test_close_is_prompt(lab: Lab) -> None:
    a, b = start_pair(lab)
    wait_for(lambda: status(a) == "ACTIVE")
    t0 = time.monotonic()
    a.module.close()
    b.module.close()
    assert time.monotonic() - t0 < 4.0  # no thread waits out its session timeout (5 s or more)
    assert a.module.state()["interface"]["status"] == "DISABLED"
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("qkd-alice:", "qkd-bob:"))]


def test_random_failures_follow_mtbf_and_self_repair(lab: Lab) -> None:
    flaky = QkdProfile.from_dict({**PROFILE.to_dict(), "mtbf": "2"})  # 2 emulated s = 0.2 s wall here
    a = lab.module("alice", "TRANSMITTER", profile=flaky, mttr=1.0)
    wait_for(lambda: [s for s, _ in a.statuses("interface-status")][:2] == ["FAILED", "ENABLED"])
    assert a.statuses("interface-status")[0] == ("FAILED", "random failure (mtbf)")


SWITCHED = {
    "name": "s",
    "switch": [{"name": "swA", "node": "alice", "ports": 4}, {"name": "swB", "node": "bob", "ports": 4}],
    "node": [{"name": "alice", "qkd-interface": [{"id": 1, "profile": "huawei-cv-c",
                                                  "attachment": {"switch": "swA", "port": 1}}]},
             {"name": "bob", "qkd-interface": [{"id": 1, "profile": "huawei-cv-c",
                                                "attachment": {"switch": "swB", "port": 1}}]},
             {"name": "carol", "qkd-interface": [{"id": 1, "profile": "huawei-cv-c",
                                                  "attachment": {"switch": "swB", "port": 2}}]}],
    "fibre": [{"name": "f1", "length": "8", "loss": "4", "a-end": {"node": "alice", "switch": "swA", "port": 2},
               "b-end": {"node": "bob", "switch": "swB", "port": 3},
               "classical-channel": [{"name": "eth", "channel": "37"}]}],
}


def test_switched_c_band_link_follows_switches_and_wavelength(tmp_path: Path) -> None:
    lab = Lab(tmp_path, SWITCHED)
    switches = [OpticalSwitch(n, lab.plant) for n in ("swA", "swB")]
    try:
        for sw, (pa, pb) in zip(switches, ((1, 2), (3, 1))):
            sw.open(lambda e: None)
            sw.apply(Change("cross-connect", f"{sw.name}/{pa}", None, {"port-a": pa, "port-b": pb}))
        huawei = BUILTIN_PROFILES["huawei-cv-c"]
        a = lab.module("alice", "TRANSMITTER", profile=huawei)
        b = lab.module("bob", "RECEIVER", profile=huawei)
        configure(b, link(QAB, "bob", "alice", "RECEIVER", phys_wavelength="36"))
        tx = link(QAB, "alice", "bob", "TRANSMITTER", phys_wavelength="36")
        configure(a, tx)
        wait_for(lambda: status(a) == "PASSIVE")
        assert a.module.state()["links"][QAB]["reason"] == "classical channel on or next to the quantum channel"
        configure(a, {**tx, "phys_wavelength": "40"}, old=tx)  # retune away from the classical channel
        wait_for(lambda: status(a) == "ACTIVE" and len(b.keys) > 3)
        assert b.keys[:len(a.keys)] == a.keys
        switches[1].apply(Change("cross-connect", "swB/3", {"port-a": 3, "port-b": 1}, {"port-a": 3, "port-b": 2}))
        wait_for(lambda: status(a) == "PASSIVE")
        assert a.module.state()["links"][QAB]["reason"] == "light reaches carol:1, not the peer"
        switches[1].apply(Change("cross-connect", "swB/3", {"port-a": 3, "port-b": 2}, {"port-a": 3, "port-b": 1}))
        wait_for(lambda: status(a) == "ACTIVE")
        switches[0].inject_failure()
        wait_for(lambda: status(a) == "PASSIVE" and status(b) == "PASSIVE")
        assert b.module.state()["links"][QAB]["reason"] == "no light path"
    finally:
        for sw in switches:
            sw.close()
        lab.close()


CHAIN = {  # alice -> carol -> dave -> bob through four switches: a 3-span switched CV path
    "name": "c",
    "switch": [{"name": f"sw{n}", "node": n, "ports": 4, "insertion-loss": "0.5"} for n in ("alice", "carol", "dave", "bob")],
    "node": [{"name": "alice", "qkd-interface": [{"id": 1, "profile": "cv", "attachment": {"switch": "swalice", "port": 1}}]},
             {"name": "bob", "qkd-interface": [{"id": 1, "profile": "cv", "attachment": {"switch": "swbob", "port": 1}}]},
             {"name": "carol"}, {"name": "dave"}],
    "fibre": [{"name": f"f{i}", "length": "8", "loss": "4", "a-end": {"node": a, "switch": f"sw{a}", "port": 2},
               "b-end": {"node": b, "switch": f"sw{b}", "port": 3}}
              for i, (a, b) in enumerate((("alice", "carol"), ("carol", "dave"), ("dave", "bob")))],
}


def test_multi_span_cv_path_over_its_loss_limit_goes_passive(tmp_path: Path) -> None:
    """14 dB over three switched spans: within the 23 dB budget, but over the loss limit that
    the spans' excess noise leaves (20 - 2 x 4 = 12 dB), so no key and the reason says why."""
    cv = QkdProfile.from_dict({**BUILTIN_PROFILES["huawei-cv-c"].to_dict(), "name": "cv", "reference-loss": "5",
                               "loss-limit": "20", "span-penalty": "4"})
    lab = Lab(tmp_path, CHAIN)
    try:
        for name, pairs in (("swalice", {1: 2}), ("swcarol", {3: 2}), ("swdave", {3: 2}), ("swbob", {3: 1})):
            for pa, pb in pairs.items():
                lab.plant.set_cross_connects(name, {pa: pb})
        ch = lab.plant.trace("alice", 1, wavelength=37)
        assert (ch.peer_node, len(ch.fibres), ch.loss_db) == ("bob", 3, pytest.approx(14.0))
        a = lab.module("alice", "TRANSMITTER", profile=cv)
        b = lab.module("bob", "RECEIVER", profile=cv)
        configure(b, link(QAB, "bob", "alice", "RECEIVER", phys_wavelength="37"))
        configure(a, link(QAB, "alice", "bob", "TRANSMITTER", phys_wavelength="37"))
        wait_for(lambda: status(a) == "PASSIVE")
        assert a.module.state()["links"][QAB]["reason"] == "loss 14.00 dB at or over the loss limit 12.00 dB of a 3-span path"
        assert not b.keys
    finally:
        lab.close()
