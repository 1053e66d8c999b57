"""LKMS with a max-flow plan whose paths share their first hop (the controller's default
multipath plan): the shared hop's key is counted and spent once, not once per path.
Same real key stores and forwarding modules as tests/test_lkms.py."""
from __future__ import annotations

import dataclasses

from test_lkms import A, B, C, L1, L2, V, feed, net, tables  # noqa: F401 - net is a fixture

from sdqkd.agents.kms.routes import AppRoute

V2 = "20000000-0000-4000-8000-0000000000c2"
APP = "30000000-0000-4000-8000-0000000000c2"


def share_first_hop(nodes) -> None:  # noqa: ANN001
    """A second virtual link A-B-C next to V, and an application backed by both."""
    t = tables()
    app = AppRoute(APP, frozenset({"sa2", "sc3"}), (V, V2))
    for kme in (A, B, C):
        links = dict(t[kme].links)
        links[V2] = dataclasses.replace(links[V], qkdl_id=V2)
        apps = t[kme].apps + ((app,) if kme != B else ())
        nodes[kme].update_routes(dataclasses.replace(t[kme], links=links, apps=apps))


def test_paths_sharing_a_first_hop_count_its_key_once(net) -> None:  # noqa: F811
    nodes, _ = net
    share_first_hop(nodes)
    feed(nodes, L2, (B, C), 256)  # the second hop is not what is measured here: plenty
    mine = nodes[A].store.count(L1)
    stored = nodes[A].status("sa2", "sc3").stored_key_count
    assert stored == mine // 2  # a pad and a MAC link key per relayed key, L1 counted once
    keys = nodes[A].enc_keys("sa2", "sc3", stored, 256, [])  # all of it, in one call
    got = nodes[C].dec_keys("sc3", "sa2", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    assert nodes[A].store.count(L1) == mine - 2 * stored


def test_paths_sharing_a_first_hop_take_turns(net) -> None:  # noqa: F811
    nodes, _ = net
    share_first_hop(nodes)
    seen = set()
    for _ in range(40):
        (lk,) = nodes[A]._paths(nodes[A].routes.app_for("sa2", "sc3"))
        seen.add(lk.qkdl_id)
    assert seen == {V, V2}
