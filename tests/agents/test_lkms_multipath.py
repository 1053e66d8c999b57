"""LKMS with a max-flow plan whose paths share their first hop (the controller's default
multipath plan): the shared hop's key is counted and spent once, not once per path, and
keys go over the paths in proportion to their planned rates.
Same real key stores and forwarding modules as tests/test_lkms.py."""
from __future__ import annotations

import dataclasses

from test_lkms import A, B, C, L1, L2, V, feed, net, tables  # noqa: F401 - net is a fixture

from sdqkd.agents.kms.routes import AppRoute

V2 = "20000000-0000-4000-8000-0000000000c2"
APP = "30000000-0000-4000-8000-0000000000c2"


def share_first_hop(nodes, rates: dict[str, int] | None = None) -> None:  # noqa: ANN001
    """A second virtual link A-B-C next to V, and an application backed by both (at planned rates)."""
    t = tables()
    app = AppRoute(APP, frozenset({"sa2", "sc3"}), (V, V2))
    rates = rates or {}
    for kme in (A, B, C):
        links = dict(t[kme].links)
        links[V2] = dataclasses.replace(links[V], qkdl_id=V2, bandwidth=rates.get(V2, 0))
        links[V] = dataclasses.replace(links[V], bandwidth=rates.get(V, 0))
        apps = t[kme].apps + ((app,) if kme != B else ())
        nodes[kme].update_routes(dataclasses.replace(t[kme], links=links, apps=apps))


def test_paths_sharing_a_first_hop_count_its_key_once(net) -> None:  # noqa: F811
    nodes, _ = net
    share_first_hop(nodes)
    feed(nodes, L2, (B, C), 256)  # the second hop is not what is measured here: plenty
    mine, theirs = nodes[A].store.count(L1), nodes[A].store.count(L1, mine=False)
    keep = nodes[B].cfg.lend_keep
    stored = nodes[A].status("sa2", "sc3").stored_key_count
    # a pad per relayed key and a MAC key per path's message, L1 counted once; A's half and
    # what B would lend of its own (all but `keep`, and one key MACs its answer)
    assert stored == mine + (theirs - keep - 1) - 2
    keys = nodes[A].enc_keys("sa2", "sc3", stored, 256, [])  # all of it, in one call
    got = nodes[C].dec_keys("sc3", "sa2", [k.key_id for k in keys])
    assert [k.key for k in got] == [k.key for k in keys]
    # A's half is used up and B never lends below `keep`; when the keys' split over the two
    # paths leaves one message (one MAC key) fewer than the status promised for, B keeps that
    # key (seen about once in 30 runs, by the random key IDs' halves)
    assert nodes[A].store.count(L1) == 0 and keep <= nodes[B].store.count(L1) <= keep + 1


def test_paths_sharing_a_first_hop_take_turns_by_planned_rate(net) -> None:  # noqa: F811
    nodes, _ = net
    share_first_hop(nodes, {V: 3000, V2: 1000})
    feed(nodes, L1, (A, B), 512)
    app = nodes[A].routes.app_for("sa2", "sc3")
    paths = nodes[A]._paths(app)
    picks = [next(q for q, sel in nodes[A]._spread(app, paths, [256]).items() if sel) for _ in range(40)]
    assert picks.count(V) == 30 and picks.count(V2) == 10  # one key per call: 3:1 exactly
    assert all(picks[i:i + 4].count(V) == 3 for i in range(0, 40, 4))  # smoothly, not in runs
    in_one = nodes[A]._spread(app, paths, [256] * 8)
    assert (len(in_one[V]), len(in_one[V2])) == (6, 2)
