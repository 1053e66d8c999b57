"""A small optical topology (alice and bob, two switches, a switched and a fixed fibre) and its
switched channel, shared by the TAPI tests and the northbound tests."""
from __future__ import annotations

from sdqkd.controller import store as svc
from sdqkd.controller.pathcomp.optical import OpticalRequest, optical_path
from sdqkd.controller.topology.model import (
    RECEIVER,
    TRANSMITTER,
    Fibre,
    FibreEnd,
    Node,
    QkdInterface,
    QkdLink,
    Switch,
    Topology,
)

TAPI = ("tapi-common@2020-04-23", "tapi-topology@2020-04-23",
        "tapi-connectivity@2020-06-16", "tapi-photonic-media@2020-06-16")
A = "a11ce000-0000-4000-8000-000000000001"
B = "b0b00000-0000-4000-8000-000000000002"


def small_topology() -> Topology:
    """alice and bob, a 4-port switch each, one switched fibre and one fixed fibre; a tunable
    C-band Tx at alice and an Rx at bob behind the switches, an O-band pair on the fixed fibre."""
    return Topology.build(
        nodes=[Node(A, "alice", "d1"), Node(B, "bob", "d1")],
        interfaces=[
            QkdInterface(A, 1, "CV-QKD", "C-band", {TRANSMITTER}, range(20, 40), 0.0, "sw-a", 1),
            QkdInterface(B, 1, "CV-QKD", "C-band", {RECEIVER}, [*range(20, 30), *range(33, 40)], 23.0, "sw-b", 1),
            QkdInterface(A, 2, "DV-QKD", "O-band", {TRANSMITTER, RECEIVER}, (), 18.0),
            QkdInterface(B, 2, "DV-QKD", "O-band", {TRANSMITTER, RECEIVER}, (), 18.0),
        ],
        links=[QkdLink("0d000000-0000-4000-8000-0000000000ab", A, 2, B, 2, skr=2000.0, qber=0.02)],
        fibres=[Fibre("f-ab", FibreEnd(A, "sw-a", 2), FibreEnd(B, "sw-b", 2), 6.5, 25.0),
                Fibre("f-fixed", FibreEnd(A), FibreEnd(B), 4.0, 10.0)],
        switches=[Switch("sw-a", A, 4, 1.0), Switch("sw-b", B, 4, 1.0)],
    )


def small_channel(topo: Topology) -> svc.Channel:
    """The switched channel alice:1 -> bob:1, as the controller stores it."""
    p = optical_path(topo, OpticalRequest(tx=(A, 1), rx=(B, 1)))
    return svc.Channel("c4a00000-0000-4000-8000-000000000001", p.tx, p.rx, p.channel, list(p.fibres),
                       [list(h) for h in p.hops], p.loss_db, {"sw-a": A, "sw-b": B})
