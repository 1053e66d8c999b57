"""`sdqkd topo plot`: a PNG of a running lab, drawn from what its controller reports
(GetTopology and ListChannels); the drawing itself is sdqkd.lab.topofigure."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.lab import launcher, topofigure


def fetch(lab: dict[str, Any], timeout: float = 10) -> tuple[pb.Topology, list[pb.Channel]]:
    """The controller's topology and the optical channels it has set up (their hops say which
    cross-connect carries which wavelength)."""
    stub = launcher.controller_stub(lab["controller"])
    topo = stub.GetTopology(pb.GetTopologyRequest(), timeout=timeout).topology
    channels = list(stub.ListChannels(pb.ListChannelsRequest(), timeout=timeout).channels)
    return topo, channels


def write(topo: pb.Topology, channels: list[pb.Channel], out: Path, title: str = "") -> Path:
    """The figure of topo and channels as a PNG at out."""
    fig = topofigure.figure(topo, channels, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot(lab: dict[str, Any], out: Path) -> Path:
    """Fetch from the lab's controller and write the PNG."""
    topo, channels = fetch(lab)
    return write(topo, channels, out, f"lab {lab['name']}")
