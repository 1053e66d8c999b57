"""LKMS logic on three nodes A - B - C with real key stores and real forwarding modules
(mutual TLS on loopback). Link keys are fed to both ends of each link as a QKD pair
delivers them: the same IDs and bytes on both sides."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms import lending
from sdqkd import pki
from sdqkd.agents.kms.coalesce import Coalescer
from sdqkd.agents.kms.keystore import Deliverable, KeyStore, MissingKeys
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig, allocator
from sdqkd.agents.kms.routes import AppRoute, LinkRoute, RouteTable
from sdqkd.agents.kms.interface import KmsError, Qos

A, B, C, D = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/{n}")) for n in "abcd")
L1, L2, V = "10000000-0000-4000-8000-000000000001", "10000000-0000-4000-8000-000000000002", "20000000-0000-4000-8000-00000000000c"
L3, L4, W = "10000000-0000-4000-8000-000000000003", "10000000-0000-4000-8000-000000000004", "20000000-0000-4000-8000-00000000000d"
SAES = {"sa": A, "sb": B, "sc": C, "sa2": A, "sa3": A, "sc3": C}
APP_AB, APP_AC = "30000000-0000-4000-8000-0000000000ab", "30000000-0000-4000-8000-0000000000ac"
APP_MULTI = "30000000-0000-4000-8000-0000000000aa"


def tables() -> dict[str, RouteTable]:
    phys = lambda lid, remote: LinkRoute(lid, "PHYS", True, remote)  # noqa: E731
    multi = AppRoute(APP_MULTI, frozenset({"sa3", "sc3"}), (V, W))  # two disjoint paths: A-B-C and A-D-C
    return {
        A: RouteTable(A, {L1: phys(L1, B), L3: phys(L3, D), V: LinkRoute(V, "VIRT", True, C, None, (B,)),
                          W: LinkRoute(W, "VIRT", True, C, None, (D,))},
                      (AppRoute(APP_AB, frozenset({"sa", "sb"}), (L1,)), AppRoute(APP_AC, frozenset({"sa", "sc"}), (V,)), multi)),
        B: RouteTable(B, {L1: phys(L1, A), L2: phys(L2, C), V: LinkRoute(V, "VIRT", True, C, A, (C,))},
                      (AppRoute(APP_AB, frozenset({"sa", "sb"}), (L1,)),)),
        C: RouteTable(C, {L2: phys(L2, B), L4: phys(L4, D), V: LinkRoute(V, "VIRT", True, A, B, ()),
                          W: LinkRoute(W, "VIRT", True, A, D, ())},
                      (AppRoute(APP_AC, frozenset({"sa", "sc"}), (V,)), multi)),
        D: RouteTable(D, {L3: phys(L3, A), L4: phys(L4, C), W: LinkRoute(W, "VIRT", True, C, A, (C,))}, ()),
    }


@pytest.fixture
def net(tmp_path: Path):
    ca = pki.make_ca(tmp_path / "ca", "test-ca")
    forwarders = {}
    for kme in (A, B, C, D):
        cert = pki.issue(ca, kme, tmp_path / kme, server_names=["127.0.0.1"], client=True)
        forwarders[kme] = fm.Forwarder(kme, ("127.0.0.1", 0), pki.server_ssl_context(*cert, ca[0]), pki.client_ssl_context(*cert, ca[0]), {})
    for f in forwarders.values():
        f.peers = {k: g.address for k, g in forwarders.items() if g is not f}
    asked: list[tuple[str, str]] = []
    nodes = {}
    for kme, name in ((A, "a"), (B, "b"), (C, "c"), (D, "d")):
        store = KeyStore(tmp_path / f"{name}.sqlite")
        nodes[kme] = Lkms(LkmsConfig(kme, name, SAES, lend_min=4), store, os.urandom, forwarders[kme], on_missing_path=lambda a, b: asked.append((a, b)))
        nodes[kme].update_routes(tables()[kme])
    feed(nodes, L1, (A, B), 64)
    feed(nodes, L2, (B, C), 64)
    feed(nodes, L3, (A, D), 64)
    feed(nodes, L4, (D, C), 64)
    yield nodes, asked
    for n in nodes.values():
        n.shutdown()


def feed(nodes: dict[str, Lkms], link: str, ends: tuple[str, str], n: int) -> list[tuple[str, bytes]]:
    keys = [(str(uuid.uuid4()), os.urandom(32)) for _ in range(n)]
    for kme in ends:
        for kid, k in keys:
            nodes[kme].key_sink(link, kid, k)
        nodes[kme].store.flush()
    return keys


def test_adjacent_keys_match_and_are_delivered_once(net) -> None:
    nodes, _ = net
    keys = nodes[A].enc_keys("sa", "sb", 3, 256, [])
    got = nodes[B].dec_keys("sb", "sa", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    assert len({k.key for k in keys}) == 3
    with pytest.raises(KmsError) as err:
        nodes[B].dec_keys("sb", "sa", [keys[0].key_id])
    assert err.value.http_status == 400


def test_each_end_allocates_its_own_half(net) -> None:
    nodes, _ = net
    a_mine, b_mine = nodes[A].store.count(L1), nodes[B].store.count(L1)
    assert a_mine + b_mine == 64 and a_mine > 10 and b_mine > 10
    ka = nodes[A].enc_keys("sa", "sb", 2, 512, [])  # 2 keys x 2 link keys, from A's half
    kb = nodes[B].enc_keys("sb", "sa", 1, 256, [])  # from B's half: no clash
    assert nodes[A].store.count(L1) == a_mine - 4 and nodes[B].store.count(L1) == b_mine - 1
    assert [k.key for k in nodes[B].dec_keys("sb", "sa", [k.key_id for k in ka])] == [k.key for k in ka]
    assert nodes[A].dec_keys("sa", "sb", [kb[0].key_id])[0].key == kb[0].key


def test_two_hop_relay_gives_the_same_key_and_uses_link_key_exactly(net) -> None:
    nodes, _ = net

    def held(kme: str, link: str) -> tuple[int, int]:
        return nodes[kme].store.count(link, mine=True), nodes[kme].store.count(link, mine=False)

    before = {(kme, link): held(kme, link) for kme, link in ((A, L1), (B, L1), (B, L2), (C, L2))}
    keys = nodes[A].enc_keys("sa", "sc", 2, 512, [])
    got = nodes[C].dec_keys("sc", "sa", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    # Each 512-bit key takes 2 pad keys on every hop, and the message one MAC key, from the
    # sending end's half; the receiving end removes the same IDs from its copy.
    mine, theirs = before[(A, L1)]
    assert held(A, L1) == (mine - 5, theirs)
    mine, theirs = before[(B, L1)]
    assert held(B, L1) == (mine, theirs - 5)
    mine, theirs = before[(B, L2)]
    assert held(B, L2) == (mine - 5, theirs)
    mine, theirs = before[(C, L2)]
    assert held(C, L2) == (mine, theirs - 5)


def test_a_virtual_link_relays_from_its_far_end_along_previous_hops(net) -> None:
    """C has no next hop on V (its far end): keys go C -> B -> A, B sending back to its prev hop."""
    nodes, _ = net
    before = {(kme, link): nodes[kme].store.count(link, mine=False) for kme, link in ((B, L2), (A, L1))}
    keys = nodes[C].enc_keys("sc", "sa", 2, 256, [])
    got = nodes[A].dec_keys("sa", "sc", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    assert nodes[B].store.count(L2, mine=False) < before[(B, L2)]  # C sealed with its half of L2
    assert nodes[A].store.count(L1, mine=False) < before[(A, L1)]  # B sealed with its half of L1
    back = nodes[C].enc_keys("sc3", "sa3", 4, 256, [])  # the multipath app, both paths backwards
    assert [k.key for k in nodes[A].dec_keys("sa3", "sc3", [k.key_id for k in back])] == [k.key for k in back]


def test_a_relay_from_a_node_not_on_the_virtual_link_is_refused(net) -> None:
    nodes, _ = net
    # D is adjacent to A but not on V: A refuses to pass a key from D on along V.
    with pytest.raises(fm.RelayError) as err:
        nodes[A]._onward(V, D)
    assert "goes on from" in str(err.value)
    assert nodes[B]._onward(V, A) == C and nodes[B]._onward(V, C) == A


def test_multipath_application_spreads_keys_over_disjoint_paths(net) -> None:
    nodes, _ = net
    via_b, via_d = nodes[A].store.count(L1), nodes[A].store.count(L3)
    keys = nodes[A].enc_keys("sa3", "sc3", 8, 256, [])
    got = nodes[C].dec_keys("sc3", "sa3", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    used_b, used_d = via_b - nodes[A].store.count(L1), via_d - nodes[A].store.count(L3)
    assert used_b > 0 and used_d > 0 and used_b + used_d == 8 + 2  # each key a pad, each path's message a MAC key


def weigh(nodes: dict[str, Lkms], rates: dict[str, int]) -> None:
    """Give A's virtual links planned rates, as the controller writes virt_bandwidth."""
    t = tables()[A]
    links = {k: dataclasses.replace(lk, bandwidth=rates.get(k, 0)) for k, lk in t.links.items()}
    nodes[A].update_routes(dataclasses.replace(t, links=links))


def test_multipath_keys_follow_the_planned_rates(net) -> None:
    nodes, _ = net
    weigh(nodes, {V: 3000, W: 1000})
    via_b, via_d = nodes[A].store.count(L1), nodes[A].store.count(L3)
    keys = nodes[A].enc_keys("sa3", "sc3", 8, 256, [])
    assert [k.key for k in nodes[C].dec_keys("sc3", "sa3", [k.key_id for k in keys])] == [k.key for k in keys]
    used_b, used_d = via_b - nodes[A].store.count(L1), via_d - nodes[A].store.count(L3)
    assert (used_b, used_d) == (6 + 1, 2 + 1)  # 6 keys via B, 2 via D, a MAC key each message


def test_a_path_whose_first_hop_ran_dry_sits_its_turns_out(net) -> None:
    nodes, _ = net
    weigh(nodes, {V: 3000, W: 1000})
    for kme in (A, B):  # both halves of the link A-B are gone: nothing to borrow either
        nodes[kme].store.take(L1, nodes[kme].store.count(L1))
    via_d = nodes[A].store.count(L3)
    keys = nodes[A].enc_keys("sa3", "sc3", 4, 256, [])
    assert [k.key for k in nodes[C].dec_keys("sc3", "sa3", [k.key_id for k in keys])] == [k.key for k in keys]
    assert nodes[A].store.count(L3) < via_d  # all of them via D


def test_no_path_asks_the_controller(net) -> None:
    nodes, asked = net
    with pytest.raises(KmsError) as err:
        nodes[B].enc_keys("sb", "sc", 1, 256, [])
    assert err.value.http_status == 503
    assert asked == [("sb", "sc")]


def test_local_pair_and_multi_slave(net) -> None:
    nodes, _ = net
    keys = nodes[A].enc_keys("sa", "sa2", 2, 128, [])
    assert [k.key for k in nodes[A].dec_keys("sa2", "sa", [k.key_id for k in keys])] == [k.key for k in keys]
    both = nodes[A].enc_keys("sa", "sb", 1, 256, ["sc"])
    assert nodes[B].dec_keys("sb", "sa", [both[0].key_id])[0].key == both[0].key
    assert nodes[C].dec_keys("sc", "sa", [both[0].key_id])[0].key == both[0].key


@pytest.mark.parametrize("call, status", [
    (lambda n: n[A].enc_keys("sb", "sa", 1, 256, []), 401),  # sb is not on A
    (lambda n: n[A].enc_keys("sa", "nobody", 1, 256, []), 400),
    (lambda n: n[A].enc_keys("sa", "sb", 1, 100, []), 400),  # not a multiple of 8
    (lambda n: n[A].enc_keys("sa", "sb", 0, 256, []), 400),
    (lambda n: n[A].enc_keys("sa", "sb", 1000, 256, []), 400),
    (lambda n: n[B].dec_keys("sb", "sa", ["not-a-uuid"]), 400),
    (lambda n: n[A].enc_keys("sa", "sb", 60, 256, []), 503),  # more than the link holds
])
def test_refusals(net, call, status) -> None:
    nodes, _ = net
    with pytest.raises(KmsError) as err:
        call(nodes)
    assert err.value.http_status == status


def captured_relay(nodes: dict[str, Lkms], monkeypatch: pytest.MonkeyPatch) -> dict:
    """The relay message A sends B for one key sa -> sc, kept from B."""
    sent: list[dict] = []
    monkeypatch.setattr(nodes[A].forwarder, "request",
                        lambda peer, msg, **kw: {"ok": True} if msg["op"] == "offer" else (sent.append(msg) or {"ok": True}))
    nodes[A].enc_keys("sa", "sc", 3, 256, [])
    monkeypatch.undo()
    (msg,) = sent
    return msg


def test_one_mac_authenticates_the_whole_relay_message() -> None:
    mac = os.urandom(32)
    msg = fm.sign({"op": "relay", "v": 2, "vlink": "v", "master": "m", "slave": "s", "expires": 1.5,
                   "keys": [{"key_id": "k1", "pad": ["p1"], "ct": "AA=="}, {"key_id": "k2", "pad": ["p2"], "ct": "AQ=="}]}, mac)
    fm.verify(dict(msg), mac)
    for change in (lambda m: m["keys"][1].update(ct="Ag=="), lambda m: m["keys"][0].update(key_id="k3"),
                   lambda m: m.update(slave="other"), lambda m: m.update(expires=2.5), lambda m: m["keys"].pop(),
                   lambda m: m.update(extra=1), lambda m: m.update(tag="")):
        forged = json.loads(json.dumps(msg))
        change(forged)
        with pytest.raises(fm.RelayError):
            fm.verify(forged, mac)
    with pytest.raises(fm.RelayError):
        fm.verify(msg, os.urandom(32))


@pytest.mark.parametrize("change, text", [
    (lambda m: m["keys"][2].update(ct=m["keys"][1]["ct"]), "authentication"),  # tampered ciphertext
    (lambda m: m.update(slave="sc3"), "authentication"),  # another SAE
    (lambda m: m["keys"][1].update(key_id=m["keys"][0]["key_id"]), "distinct"),
    (lambda m: m["keys"][1].update(pad=m["keys"][0]["pad"]), "more than once"),  # one pad for two keys
    (lambda m: m["keys"][0]["pad"].append(m["mac"]), "more than once"),  # the MAC key as a pad
    (lambda m: m.update(v=1), "version"),
    (lambda m: m.pop("hop_link"), "malformed"),
    (lambda m: m.update(keys="x"), "list of keys"),
])
def test_a_bad_relay_message_is_refused(net, monkeypatch, change, text) -> None:
    nodes, _ = net
    msg = captured_relay(nodes, monkeypatch)
    before = nodes[B].store.count(L2)
    change(msg)
    with pytest.raises(fm.RelayError) as err:
        nodes[B].handle_relay(A, msg)
    assert err.value.code == 400 and text in str(err.value)
    assert nodes[B].store.count(L2) == before  # nothing sent on


def test_a_relay_message_is_accepted_once(net, monkeypatch) -> None:
    nodes, _ = net
    msg = captured_relay(nodes, monkeypatch)
    assert nodes[B].handle_relay(A, json.loads(json.dumps(msg))) == {"ok": True}
    with pytest.raises(fm.RelayError):  # replayed: its link keys are spent
        nodes[B].handle_relay(A, msg)


def test_keys_survive_a_restart_and_are_never_redelivered(tmp_path) -> None:
    store = KeyStore(tmp_path / "k.sqlite")
    node = Lkms(LkmsConfig(A, "a", SAES), store)
    keys = node.enc_keys("sa", "sa2", 2, 256, [])
    store.close()
    store = KeyStore(tmp_path / "k.sqlite")
    node = Lkms(LkmsConfig(A, "a", SAES), store)
    assert node.dec_keys("sa2", "sa", [keys[0].key_id])[0].key == keys[0].key
    store.close()
    store = KeyStore(tmp_path / "k.sqlite")
    node = Lkms(LkmsConfig(A, "a", SAES), store)
    with pytest.raises(KmsError):
        node.dec_keys("sa2", "sa", [keys[0].key_id])
    assert node.dec_keys("sa2", "sa", [keys[1].key_id])[0].key == keys[1].key
    store.close()


def test_link_keys_persist_and_spent_ids_stay_spent(tmp_path) -> None:
    store = KeyStore(tmp_path / "k.sqlite")
    store.sink(L1, "a0000000-0000-4000-8000-000000000000", b"k" * 32)
    store.close()
    store = KeyStore(tmp_path / "k.sqlite")
    assert store.count(L1) == 1
    assert store.take(L1, 1)[0][1] == b"k" * 32
    store.sink(L1, "a0000000-0000-4000-8000-000000000000", b"k" * 32)  # replayed: refused
    assert store.count(L1) == 0
    store.close()


def test_link_key_counts_follow_every_write(tmp_path) -> None:
    """The store keeps counts in memory; after any mix of writes they match a fresh look at the file."""
    store = KeyStore(tmp_path / "k.sqlite")
    store.set_allocator(L1, allocator(A, B))
    ids = [str(uuid.uuid4()) for _ in range(40)]
    for kid in ids:
        store.sink(L1, kid, os.urandom(32))
    store.sink(L1, ids[0], os.urandom(32))  # the same ID again: ignored
    store.sink(L2, ids[1], os.urandom(32))  # an ID another link holds: ignored
    counts = lambda st: (st.count(L1, mine=True), st.count(L1, mine=False))  # noqa: E731
    mine, theirs = counts(store)
    assert mine + theirs == 40 and store.count(L2) == 0
    taken = store.take(L1, 3)
    peer_ids = [k for k in ids if not allocator(A, B)(k)][:2]
    store.take_ids(L1, peer_ids)
    with pytest.raises(MissingKeys):
        store.take_ids(L1, [peer_ids[0]])  # already taken: nothing changes
    assert counts(store) == (mine - 3, theirs - 2)
    store.put_back(L1, taken[:1])
    store.sink(L1, taken[1][0], taken[1][1])  # spent: refused
    assert counts(store) == (mine - 2, theirs - 2)
    store.close()
    fresh = KeyStore(tmp_path / "k.sqlite")
    assert counts(fresh) == (mine - 2, theirs - 2)
    fresh.drop_link(L1)
    assert counts(fresh) == (0, 0)
    fresh.close()


def test_a_link_holds_at_most_link_key_limit_keys(tmp_path) -> None:
    """Both halves count; using keys makes room; each link has its own limit."""
    store = KeyStore(tmp_path / "k.sqlite", link_key_limit=10)
    ids = [str(uuid.uuid4()) for _ in range(10)]
    store.set_allocator(L1, lambda kid: kid in ids[:5])
    for kid in ids:
        store.sink(L1, kid, os.urandom(32))
    store.flush()
    assert not store.room(L1) and store.room(L2)
    store.take_ids(L1, ids[9:])  # the peer's half counts too
    assert store.room(L1)
    store.sink(L1, str(uuid.uuid4()), os.urandom(32))
    store.flush()
    assert not store.room(L1)
    store.take(L1, 1)
    assert store.room(L1)
    store.close()
    fresh = KeyStore(tmp_path / "k.sqlite", link_key_limit=9)  # counted from the file after a restart
    assert not fresh.room(L1)
    fresh.close()


def test_etsi004_stream_over_two_hops(net) -> None:
    nodes, _ = net
    qos = Qos(key_chunk_size=32, timeout=2000)
    stream = nodes[A].open_connect("sa", "sa", "sc", qos, None)
    peer = nodes[C].open_connect("sc", "sa", "sc", qos, stream.key_stream_id)
    assert peer.key_stream_id == stream.key_stream_id
    i0, k0, _ = nodes[A].get_key("sa", stream.key_stream_id, None)
    i1, k1, _ = nodes[A].get_key("sa", stream.key_stream_id, None)
    assert (i0, i1) == (0, 1) and k0 != k1
    assert nodes[C].get_key("sc", stream.key_stream_id, 1)[:2] == (1, k1)
    assert nodes[C].get_key("sc", stream.key_stream_id, 0)[:2] == (0, k0)
    with pytest.raises(KmsError) as err:
        nodes[A].get_key("sa", stream.key_stream_id, 0)  # already delivered
    assert err.value.status004 == 2
    with pytest.raises(KmsError) as err:
        nodes[A].open_connect("sa", "sa", "sc", qos, stream.key_stream_id)
    assert err.value.status004 == 5
    # the relay node B holds no record of the stream: only its two ends do
    assert nodes[B].store.list_streams() == []
    nodes[A].close("sa", stream.key_stream_id)
    nodes[C].close("sc", stream.key_stream_id)


def test_no_key_bytes_in_logs(net, caplog) -> None:
    nodes, _ = net
    caplog.set_level(logging.DEBUG)
    keys = nodes[A].enc_keys("sa", "sc", 2, 256, [])
    nodes[C].dec_keys("sc", "sa", [k.key_id for k in keys])
    text = caplog.text
    for k in keys:
        assert base64.b64encode(k.key).decode() not in text and k.key.hex() not in text


def coalesced(nodes: dict[str, Lkms], numbers: list[int]) -> tuple[list[object], list[int]]:
    """enc_keys sa -> sc through a Coalescer, all at once; what each caller got, and the LKMS calls made."""
    calls: list[int] = []

    async def enc(m: str, s: str, n: int, z: int | None) -> list:
        calls.append(n)
        return await asyncio.to_thread(nodes[A].enc_keys, m, s, n, z, [])

    async def scenario() -> list[object]:
        co = Coalescer(max_keys=8)
        return await asyncio.gather(*(co.enc_keys(enc, "sa", "sc", n, 256) for n in numbers), return_exceptions=True)

    return asyncio.run(scenario()), calls


def test_concurrent_relayed_requests_share_relays_and_each_gets_its_own_keys(net) -> None:
    nodes, _ = net
    got, calls = coalesced(nodes, [1, 2, 1, 3, 1])
    assert [len(k) for k in got] == [1, 2, 1, 3, 1]
    assert len(calls) < 5 and sum(calls) == 8  # merged, and no key made for nobody
    keys = [k for ks in got for k in ks]
    assert len({k.key_id for k in keys}) == 8
    at_c = nodes[C].dec_keys("sc", "sa", [k.key_id for k in keys])
    assert [k.key for k in at_c] == [k.key for k in keys]


def test_a_refused_shared_call_gives_each_request_its_own_answer(net) -> None:
    nodes, _ = net
    nodes[A].cfg.max_key_per_request = 2
    got, calls = coalesced(nodes, [2, 2, 3])
    assert [len(k) for k in got[:2]] == [2, 2]
    assert isinstance(got[2], KmsError) and got[2].http_status == 400  # 3 > 2: its own request's error
    assert calls[1:] and max(calls) > 2  # the shared call was tried, then each on its own


def test_a_relay_message_naming_a_link_key_twice_is_refused(net) -> None:
    nodes, _ = net
    fresh = feed(nodes, L1, (A, B), 8)
    x = next(kid for kid, _ in fresh if allocator(A, B)(kid))  # A allocates it; B takes it by ID
    msg = {"op": "reserve", "link": L1, "master": "sa", "slave": "sb", "expires": time.time() + 60,
           "keys": [{"key_id": str(uuid.uuid4()), "parts": [x], "size": 256},
                    {"key_id": str(uuid.uuid4()), "parts": [x], "size": 256}]}  # one pad for two keys
    with pytest.raises(fm.RelayError) as err:
        nodes[B].handle_relay(A, msg)
    assert err.value.code == 400
    assert nodes[B].store.take_ids(L1, [x])  # untouched by the refused message


def mine_at(nodes: dict[str, Lkms], kme: str, link: str) -> set[str]:
    return {r[0] for r in _rows(nodes[kme].store, "SELECT key_id FROM link_keys WHERE link = ? AND mine = 1", (link,))}


def test_one_way_keys_borrow_the_peers_half_and_no_link_key_is_used_twice(net) -> None:
    nodes, _ = net
    mine, theirs = nodes[A].store.count(L1), nodes[A].store.count(L1, mine=False)
    keep = nodes[B].cfg.lend_keep
    keys = []
    while True:  # one way, A -> B, one 256-bit key (one link key) at a time, until refused
        try:
            keys += nodes[A].enc_keys("sa", "sb", 1, 256, [])
        except KmsError as exc:
            assert exc.http_status == 503
            break
    assert len(keys) == mine + theirs - keep - 1  # all but what B keeps and one MAC key of B's answer
    assert [k.key for k in nodes[B].dec_keys("sb", "sa", [k.key_id for k in keys])] == [k.key for k in keys]
    assert not mine_at(nodes, A, L1) & mine_at(nodes, B, L1)
    back = nodes[B].enc_keys("sb", "sa", keep, 256, [])  # B's kept half still works, and clashes with nothing
    assert [k.key for k in nodes[A].dec_keys("sa", "sb", [k.key_id for k in back])] == [k.key for k in back]


def test_a_lost_lend_answer_strands_keys_and_never_shares_one(net) -> None:
    nodes, _ = net
    feed(nodes, L1, (A, B), 128)  # B has plenty of its own to lend
    a_mine, b_mine = mine_at(nodes, A, L1), mine_at(nodes, B, L1)
    proposal = nodes[A].store.peer_ids(L1, 9)
    answer = nodes[B].handle_relay(A, {"op": "lend", "link": L1, "keys": proposal})  # then "lost": A never sees it
    stranded = set(answer["ceded"])
    assert len(stranded) == 8 and stranded <= b_mine and answer["mac"] in proposal
    assert not stranded & mine_at(nodes, B, L1) and mine_at(nodes, A, L1) == a_mine  # nobody allocates them
    got = lending.borrow(nodes[A].store, nodes[A].forwarder, L1, B, 20)  # the same 9 first, then 12 more
    assert got == 11 and not stranded & mine_at(nodes, A, L1)  # B ceded 11 of the others and called these dead
    assert not stranded & {r[0] for r in _rows(nodes[A].store, "SELECT key_id FROM link_keys")}
    assert not mine_at(nodes, A, L1) & mine_at(nodes, B, L1)


def test_a_forged_lend_answer_is_ignored(net, monkeypatch) -> None:
    nodes, _ = net
    proposal = nodes[A].store.peer_ids(L1, 5)
    forged = {"ok": True, "op": "lent", "link": L1, "ceded": proposal[1:], "dead": [], "mac": proposal[0], "tag": fm.b64(bytes(16))}
    monkeypatch.setattr(nodes[A].forwarder, "request", lambda peer, msg: forged)
    before = mine_at(nodes, A, L1)
    assert lending.borrow(nodes[A].store, nodes[A].forwarder, L1, B, 4) == 0
    assert mine_at(nodes, A, L1) == before and not before & mine_at(nodes, B, L1)


@pytest.mark.parametrize("change, text", [
    (lambda m: m.update(keys=m["keys"][:1] * 2), "more than once"),
    (lambda m: m.update(keys="x"), "list"),
    (lambda m: m.update(link=L2), "not a PHYS link"),  # not a link with A
    (lambda m: m.pop("keys"), "malformed"),
])
def test_a_bad_lend_proposal_is_refused(net, change, text) -> None:
    nodes, _ = net
    msg = {"op": "lend", "link": L1, "keys": nodes[A].store.peer_ids(L1, 4)}
    change(msg)
    before = nodes[B].store.count(L1)
    with pytest.raises(fm.RelayError) as err:
        nodes[B].handle_relay(A, msg)
    assert err.value.code == 400 and text in str(err.value)
    assert nodes[B].store.count(L1) == before


def test_no_borrowing_for_less_than_lend_min(net) -> None:
    """Each lend answer spends a MAC key: the peer's half counts (and is asked for) only when it could lend lend_min."""
    nodes, _ = net
    nodes[A].cfg.lend_min = 1000
    mine, b_mine = nodes[A].store.count(L1), nodes[B].store.count(L1)
    assert nodes[A].status("sa", "sb").stored_key_count == mine
    with pytest.raises(KmsError) as err:
        nodes[A].enc_keys("sa", "sb", mine + 1, 256, [])
    assert err.value.http_status == 503 and nodes[B].store.count(L1) == b_mine


def test_expired_end_keys_are_swept_and_overwritten_on_disk(tmp_path: Path) -> None:
    """Nobody asks for an end key past its TTL: the store's sweep drops it (it counts as
    spent) and, with secure_delete, its bytes leave the database file and the WAL."""
    store = KeyStore(tmp_path / "k.sqlite", expire_every=0.05)
    old, young = os.urandom(32), os.urandom(32)
    try:
        store.put_deliverable([Deliverable("k-old", "sae-b", "sae-a", old, expires=time.time() + 0.2),
                               Deliverable("k-young", "sae-b", "sae-a", young, expires=time.time() + 600)])
        store.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and old in b"".join(p.read_bytes() for p in tmp_path.glob("k.sqlite*")):
            time.sleep(0.05)
        on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("k.sqlite*"))
        assert old not in on_disk and young in on_disk
        with pytest.raises(MissingKeys):
            store.fetch_deliverable("sae-b", "sae-a", ["k-old"])
        assert store.fetch_deliverable("sae-b", "sae-a", ["k-young"]) == [young]
    finally:
        store.close()


def _rows(store: KeyStore, sql: str, args: tuple = ()) -> list[tuple]:
    """What the store's file holds (its own connection: the file is the seam, not the object)."""
    store.flush()
    with sqlite3.connect(store.path) as db:
        return db.execute(sql, args).fetchall()


# --- a relay that fails uses no link key (reservations) ------------------------------------------


def held_ids(nodes: dict[str, Lkms], kme: str, link: str) -> set[str]:
    """Every link key of `link` the node holds (either half), by ID, as its file has them."""
    return {r[0] for r in _rows(nodes[kme].store, "SELECT key_id FROM link_keys WHERE link = ?", (link,))}


def stock(nodes: dict[str, Lkms]) -> dict[str, object]:
    """What a failed relay must leave as it was: A's ETSI 014 status for sa -> sc, and the link
    keys each end of both hops holds."""
    return {"status": nodes[A].status("sa", "sc").stored_key_count,
            **{f"{kme}/{link}": held_ids(nodes, kme, link) for kme, link in ((A, L1), (B, L1), (B, L2), (C, L2))}}


def relay_and_check(nodes: dict[str, Lkms]) -> None:
    """One relay A -> B -> C works, and both ends of each hop still hold the same key IDs."""
    keys = nodes[A].enc_keys("sa", "sc", 2, 256, [])
    assert [k.key for k in nodes[C].dec_keys("sc", "sa", [k.key_id for k in keys])] == [k.key for k in keys]
    assert held_ids(nodes, A, L1) == held_ids(nodes, B, L1)
    assert held_ids(nodes, B, L2) == held_ids(nodes, C, L2)


@pytest.mark.parametrize("refuser, table, status", [
    (B, lambda t: RouteTable(B, {L2: t.links[L2], V: t.links[V]}, ()), 400),  # next hop: "not a PHYS link with A"
    (C, lambda t: RouteTable(C, {V: t.links[V]}, ()), 400),  # the hop after: no PHYS link with B (found by B's offer)
    (B, lambda t: RouteTable(B, {L1: t.links[L1], L2: t.links[L2]}, ()), 503),  # no virtual link V at B
])
def test_a_refused_relay_uses_no_link_key_at_any_hop(net, refuser, table, status) -> None:
    nodes, _ = net
    nodes[refuser].update_routes(table(tables()[refuser]))
    before = stock(nodes)
    assert before["status"] > 0
    for _ in range(50):
        with pytest.raises(KmsError) as err:
            nodes[A].enc_keys("sa", "sc", 1, 256, [])
        assert err.value.http_status == status
    assert stock(nodes) == before
    nodes[refuser].update_routes(tables()[refuser])
    relay_and_check(nodes)


def test_a_refused_reservation_with_the_adjacent_node_uses_no_link_key(net) -> None:
    """sa -> sb over the PHYS link: only key IDs go on the wire, so a refusal that used nothing
    at B ("kept") gives A its keys back."""
    nodes, _ = net
    nodes[B].update_routes(RouteTable(B, {L2: tables()[B].links[L2]}, ()))
    before = nodes[A].status("sa", "sb").stored_key_count, held_ids(nodes, A, L1), held_ids(nodes, B, L1)
    for _ in range(50):
        with pytest.raises(KmsError) as err:
            nodes[A].enc_keys("sa", "sb", 2, 256, [])
        assert err.value.http_status == 400
    assert (nodes[A].status("sa", "sb").stored_key_count, held_ids(nodes, A, L1), held_ids(nodes, B, L1)) == before
    nodes[B].update_routes(tables()[B])
    keys = nodes[A].enc_keys("sa", "sb", 2, 256, [])
    assert [k.key for k in nodes[B].dec_keys("sb", "sa", [k.key_id for k in keys])] == [k.key for k in keys]
    assert held_ids(nodes, A, L1) == held_ids(nodes, B, L1)


def test_a_relay_to_an_unreachable_next_hop_uses_no_link_key_and_works_once_it_is_back(net, tmp_path) -> None:
    nodes, _ = net
    relay_and_check(nodes)  # A has a pooled connection to B: it goes stale below
    address, store = nodes[B].forwarder.address, nodes[B].store.path
    nodes[B].shutdown()
    before = nodes[A].status("sa", "sc").stored_key_count, held_ids(nodes, A, L1)
    for _ in range(50):
        with pytest.raises(KmsError) as err:
            nodes[A].enc_keys("sa", "sc", 1, 256, [])
        assert err.value.http_status == 503
    assert (nodes[A].status("sa", "sc").stored_key_count, held_ids(nodes, A, L1)) == before
    ca = tmp_path / "ca" / "test-ca.crt"
    cert = (tmp_path / B / f"{B}.crt", tmp_path / B / f"{B}.key")  # the net fixture's certificate of B
    fwd = fm.Forwarder(B, tuple(address), pki.server_ssl_context(*cert, ca), pki.client_ssl_context(*cert, ca),
                       {k: n.forwarder.address for k, n in nodes.items() if k != B})
    nodes[B] = Lkms(LkmsConfig(B, "b", SAES, lend_min=4), KeyStore(store), os.urandom, fwd)
    nodes[B].update_routes(tables()[B])
    relay_and_check(nodes)


def test_a_reservation_is_committed_once_or_released_in_the_same_order(tmp_path) -> None:
    store = KeyStore(tmp_path / "s.sqlite")
    ids = [f"00000000-0000-4000-8000-{i:012x}" for i in range(6)]
    for i, kid in enumerate(ids):
        store.sink(L1, kid, bytes([i]) * 32)
    store.flush()
    r = store.reserve(L1, 3)
    assert r is not None and [k for k, _ in r.keys] == ids[:3]
    assert store.count(L1) == 3 and store.reserve(L1, 4) is None  # reserved keys are nobody else's
    other = store.reserve(L1, 2)
    assert [k for k, _ in other.keys] == ids[3:5]
    assert store.release(r) == 3 and store.release(r) == 0
    assert store.count(L1) == 4
    assert store.commit(other) == 2 and store.commit(other) == 0 and store.release(other) == 0
    assert [k for k, _ in store.take(L1, 4)] == ids[:3] + ids[5:]  # back in their place: oldest first
    assert all(store.is_spent(k) for k in ids)
    store.close()


def test_a_reservation_left_by_a_killed_process_is_discarded_at_restart(tmp_path) -> None:
    """kill -9 between reserving and settling: the keys may have left the node, so they are
    never served again (and a module re-sending them does not bring them back)."""
    path = tmp_path / "s.sqlite"
    ids = [f"00000000-0000-4000-8000-{i:012x}" for i in range(4)]
    script = (
        "import os, signal, sys\n"
        "from sdqkd.agents.kms.keystore import KeyStore\n"
        f"s = KeyStore({str(path)!r})\n"
        f"for kid in {ids!r}: s.sink({L1!r}, kid, b'k' * 32)\n"
        "s.flush()\n"
        f"assert s.reserve({L1!r}, 2) is not None\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=30)
    assert done.returncode == -signal.SIGKILL
    store = KeyStore(path)
    assert store.count(L1) == 2 and all(store.is_spent(k) for k in ids[:2]) and not store.is_reserved(ids[0])
    store.sink(L1, ids[0], b"k" * 32)  # a re-sent block
    store.flush()
    assert store.count(L1) == 2 and [k for k, _ in store.take(L1, 2)] == ids[2:]
    store.close()



def test_a_relay_consumed_by_the_peer_whose_answer_fails_is_spent_at_both_ends(net, monkeypatch) -> None:
    """The outcome A cannot tell from a refusal: B used its copies, then failed before a
    proper answer. A spends its copies too (it sent the message), so the ends stay in sync."""
    nodes, _ = net
    real = nodes[B].handle_relay

    def consumed_then_failed(sender: str, msg: dict) -> dict:
        reply = real(sender, msg)
        if msg["op"] == "relay":
            raise RuntimeError("failure after the message was processed")
        return reply

    monkeypatch.setattr(nodes[B].forwarder, "handler", consumed_then_failed)
    before = nodes[A].store.count(L1)
    with pytest.raises(KmsError) as err:
        nodes[A].enc_keys("sa", "sc", 1, 256, [])
    assert err.value.http_status == 503
    assert nodes[A].store.count(L1) == before - 2  # one pad and the MAC key, spent
    assert held_ids(nodes, A, L1) == held_ids(nodes, B, L1)
    monkeypatch.undo()
    relay_and_check(nodes)


def test_etsi004_concurrent_get_keys_on_one_stream_take_distinct_chunks(net) -> None:
    """GET_KEYs of one stream sent at once (an application pipelining): each gets its own
    index, and the other end gets the same key for each index."""
    nodes, _ = net
    qos = Qos(key_chunk_size=32, timeout=5000)
    stream = nodes[A].open_connect("sa", "sa", "sc", qos, None)
    nodes[C].open_connect("sc", "sa", "sc", qos, stream.key_stream_id)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: nodes[A].get_key("sa", stream.key_stream_id, None), range(6)))
    assert sorted(i for i, _, _ in got) == list(range(6))
    for i, key, _ in got:
        assert nodes[C].get_key("sc", stream.key_stream_id, i)[:2] == (i, key)
    nodes[A].close("sa", stream.key_stream_id)
    nodes[C].close("sc", stream.key_stream_id)
