"""controller/qos.py: how min_bps is split over paths and held on links, and the residual
network admission computes on (pure functions: real topology snapshots, no agents)."""
from __future__ import annotations

import pytest

from sdqkd.controller import qos
from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.pathcomp.relay import RelayRequest, relay_paths
from sdqkd.controller.topology.model import Node, QkdLink, Topology


def topo() -> Topology:
    """a-b-c over 1264 bit/s b-c, plus a parallel pair of links a=b (300 + 700)."""
    nodes = [Node(n, n) for n in "abc"]
    links = [QkdLink("ab1", "a", 1, "b", 1, skr=300.0), QkdLink("ab2", "a", 2, "b", 2, skr=700.0),
             QkdLink("bc", "b", 3, "c", 3, skr=1264.0)]
    return Topology.build(nodes=nodes, links=links)


def test_shares_add_up_to_min_bps() -> None:
    assert qos.shares([600.0, 200.0], 400.0) == [300.0, 100.0]
    assert qos.shares([0.0, 0.0], 10.0) == [5.0, 5.0]
    assert qos.shares([600.0], 0.0) == [0.0]


def test_holds_spread_a_hop_over_its_parallel_links() -> None:
    t = topo()
    hs = qos.holds(t, "app", [{"nodes": ["a", "b", "c"], "links": ["ab1", "ab2", "bc"], "reserved": 500.0}])
    assert {h.qkdl_id: h.bps for h in hs} == pytest.approx({"ab1": 150.0, "ab2": 350.0, "bc": 500.0})
    assert qos.holds(t, "app", [{"nodes": ["a", "b"], "links": ["ab1"], "reserved": 0.0}]) == []


def test_the_residual_network_refuses_what_no_longer_fits() -> None:
    t = topo()
    req = RelayRequest("a", "c", min_bps=900.0)
    assert relay_paths(t, req).total_bps >= 900.0
    hs = qos.holds(t, "first", [{"nodes": ["a", "b", "c"], "links": ["ab1", "ab2", "bc"], "reserved": 900.0}])
    left = qos.residual(t, hs)
    assert left.links["bc"].skr == pytest.approx(364.0) and t.links["bc"].skr == 1264.0
    with pytest.raises(NoPath) as err:
        relay_paths(left, req)
    assert err.value.achievable_bps == pytest.approx(100.0)  # a=b keeps 1000 - 900
    # a fully held link leaves the relay graph
    full = qos.residual(t, qos.holds(t, "x", [{"nodes": ["b", "c"], "links": ["bc"], "reserved": 1264.0}]))
    assert full.links["bc"].skr == 0.0 and not full.relay_graph().has_edge("b", "c")
