"""The controller's optical view as a TAPI context: valid against our TAPI subset and the
official ONF modules (yanglint), deterministic, and saying what the topology says."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from testlib import run
from sdqkd.controller import store as svc
from sdqkd.controller.pathcomp.optical import OpticalRequest, direct_links, optical_path
import madqci
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
from sdqkd.tapi.context import UUID_NS, channel_mhz, to_tapi
from sdqkd.yangmodels import YANG_DIR
from topo_samples import A, B, TAPI, small_channel, small_topology

def validate(data: dict, directory: Path, tmp_path: Path, yanglint: str) -> None:
    doc = tmp_path / "context.json"
    doc.write_text(json.dumps(data))
    res = run([yanglint, "-t", "data", "-p", str(directory), *(str(directory / f"{m}.yang") for m in TAPI), str(doc)])
    assert (res.returncode, res.stderr) == (0, ""), res.stderr


def ctx(data: dict) -> dict:
    return data["tapi-common:context"]


def topology_of(data: dict) -> dict:
    return ctx(data)["tapi-topology:topology-context"]["topology"][0]


def names(obj: dict) -> dict[str, str]:
    return {n["value-name"]: n.get("value") for n in obj.get("name", [])}


@pytest.fixture(scope="module")
def small() -> tuple[Topology, svc.Channel, dict]:
    topo = small_topology()
    ch = small_channel(topo)
    return topo, ch, to_tapi(topo, [ch])


@pytest.fixture(scope="module")
def madqci_context() -> dict:
    topo = madqci.topology()
    return to_tapi(topo, direct_links(topo))


@pytest.mark.parametrize("where", ["ours", "official"])
def test_small_context_validates(small, where, refdir, yanglint, tmp_path) -> None:
    validate(small[2], YANG_DIR if where == "ours" else refdir / "tapi", tmp_path, yanglint)


@pytest.mark.parametrize("where", ["ours", "official"])
def test_madqci_context_validates(madqci_context, where, refdir, yanglint, tmp_path) -> None:
    validate(madqci_context, YANG_DIR if where == "ours" else refdir / "tapi", tmp_path, yanglint)


def test_madqci_has_every_node_switch_and_fibre(madqci_context) -> None:
    topo = madqci.topology()
    t = topology_of(madqci_context)
    node_names = {names(n)["node-name"] for n in t["node"]}
    assert node_names == {n.name for n in topo.nodes.values()} | set(topo.switches)
    links = {names(lk)["link-name"] for lk in t["link"]}
    assert set(topo.fibres) <= {name.split(":")[0] for name in links}
    # a CV fibre behind fixed muxes: one link per passband, all in the fibre's risk group
    assert {"cv-quijote-quevedo:34", "cv-quijote-quevedo:37", "cv-quijote-quevedo:38"} <= links
    assert len(ctx(madqci_context)["service-interface-point"]) == len(topo.interfaces)
    services = ctx(madqci_context)["tapi-connectivity:connectivity-context"]["connectivity-service"]
    assert len(services) == len(direct_links(topo))


def test_sips_say_direction_layer_and_supportable_bands(small) -> None:
    sips = {names(s)["sip-name"]: s for s in ctx(small[2])["service-interface-point"]}
    assert set(sips) == {"alice:qkdi-1", "alice:qkdi-2", "bob:qkdi-1", "bob:qkdi-2"}
    tx, rx, trx = sips["alice:qkdi-1"], sips["bob:qkdi-1"], sips["alice:qkdi-2"]
    assert (tx["direction"], rx["direction"], trx["direction"]) == ("OUTPUT", "INPUT", "BIDIRECTIONAL")
    for s in sips.values():
        assert s["layer-protocol-name"] == "PHOTONIC_MEDIA"
        assert s["supported-layer-protocol-qualifier"] == ["tapi-photonic-media:PHOTONIC_LAYER_QUALIFIER_OTSi"]
    assert names(tx)["qkdn_id"] == A and names(tx)["qkdi_id"] == "1"

    def bands(sip: dict) -> list[tuple[int, int]]:
        cap = sip["tapi-photonic-media:otsi-service-interface-point-spec"]["otsi-capability"]
        return [(int(b["lower-central-frequency"]), int(b["upper-central-frequency"]))
                for b in cap["supportable-central-frequency-spectrum-band"]]

    assert bands(tx) == [(192_000_000, 193_900_000)]  # channels 20-39: 192.0-193.9 THz
    assert bands(rx) == [(192_000_000, 192_900_000), (193_300_000, 193_900_000)]
    assert "tapi-photonic-media:otsi-service-interface-point-spec" not in trx  # O-band: not on the grid


def test_grid_convention() -> None:
    assert channel_mhz(31) == 193_100_000
    assert channel_mhz(0) == 190_000_000


def test_nodes_neps_and_links(small) -> None:
    topo, _, data = small
    t = topology_of(data)
    nodes = {names(n)["node-name"]: n for n in t["node"]}
    assert set(nodes) == {"alice", "bob", "sw-a", "sw-b"}
    sip_uuids = {s["uuid"] for s in ctx(data)["service-interface-point"]}
    alice_neps = nodes["alice"]["owned-node-edge-point"]
    mapped = {m["service-interface-point-uuid"] for n in alice_neps for m in n.get("mapped-service-interface-point", [])}
    assert len(mapped) == 2 and mapped <= sip_uuids
    assert {names(n)["nep-name"] for n in nodes["sw-a"]["owned-node-edge-point"]} == {"sw-a:1", "sw-a:2"}
    assert names(nodes["sw-a"])["port-count"] == "4"
    links = {names(lk)["link-name"]: lk for lk in t["link"]}
    assert set(links) == {"f-ab", "f-fixed", "patch alice:qkdi-1", "patch bob:qkdi-1"}
    fab = links["f-ab"]
    costs = {c["cost-name"]: c["cost-value"] for c in fab["cost-characteristic"]}
    assert costs == {"loss-db": "6.5", "length-km": "25"}
    assert fab["risk-characteristic"][0]["risk-identifier-list"] == ["f-ab"]
    assert len(fab["node-edge-point"]) == 2


def test_channel_is_a_service_with_a_routed_connection(small) -> None:
    topo, ch, data = small
    cc = ctx(data)["tapi-connectivity:connectivity-context"]
    (service,) = cc["connectivity-service"]
    assert names(service)["service-name"] == ch.chan_id
    eps = {e["local-id"]: e for e in service["end-point"]}
    sips = {names(s)["sip-name"]: s["uuid"] for s in ctx(data)["service-interface-point"]}
    assert eps["tx"]["service-interface-point"]["service-interface-point-uuid"] == sips["alice:qkdi-1"]
    assert eps["rx"]["service-interface-point"]["service-interface-point-uuid"] == sips["bob:qkdi-1"]
    freq = eps["tx"]["tapi-photonic-media:otsi-connectivity-service-end-point-spec"]["otsi-config"]["central-frequency"]
    assert int(freq["central-frequency"]) == channel_mhz(ch.channel)
    (conn,) = cc["connection"]
    assert service["connection"] == [{"connection-uuid": conn["uuid"]}]
    route = conn["route"][0]["connection-end-point"]
    assert len(route) == 2 + 2 * len(ch.hops)  # Tx, in and out of every switch, Rx
    assert [r["connection-end-point-uuid"] for r in conn["connection-end-point"]] == \
        [route[0]["connection-end-point-uuid"], route[-1]["connection-end-point-uuid"]]


def test_deterministic_uuids(small) -> None:
    topo, ch, data = small
    again = to_tapi(small_topology(), [small_channel(small_topology())])
    assert json.dumps(again, sort_keys=True) == json.dumps(data, sort_keys=True)
    sip = next(s for s in ctx(data)["service-interface-point"] if names(s)["sip-name"] == "alice:qkdi-1")
    assert sip["uuid"] == str(uuid.uuid5(UUID_NS, f"sip/{A}/1"))


def test_channel_with_unknown_interface_is_left_out(small) -> None:
    topo, ch, _ = small
    ghost = svc.Channel("9e000000-0000-4000-8000-000000000009", (A, 1), (B, 7), 31, ["f-ab"], [["sw-a", 1, 2]], 5.0)
    data = to_tapi(topo, [ghost, ch])
    services = ctx(data)["tapi-connectivity:connectivity-context"]["connectivity-service"]
    assert [names(s)["service-name"] for s in services] == [ch.chan_id]


def test_no_channels_no_connectivity_context() -> None:
    data = to_tapi(small_topology())
    assert "tapi-connectivity:connectivity-context" not in ctx(data)


def test_fibre_to_an_unknown_node_is_left_out() -> None:
    topo = small_topology()
    stray = Fibre("f-stray", FibreEnd(A), FibreEnd("0f000000-0000-4000-8000-00000000000f"), 3.0, 5.0)
    data = to_tapi(topo.replace(fibres={**topo.fibres, "f-stray": stray}))
    assert "f-stray" not in {names(lk)["link-name"] for lk in topology_of(data)["link"]}
