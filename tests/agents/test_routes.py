"""The LKMS's route table reads a PHYS link as the QKD modules do: switched off by
qkdl_enable false or by qkdl_status OFF (how ONOS's QKD app deactivates a link)."""
from __future__ import annotations

from sdqkd.agents.drivers.qkd_link import switched_on
from sdqkd.agents.kms import routes

OWN = "5c0a7c8e-0000-4000-8000-000000000001"
PEER = "5c0a7c8e-0000-4000-8000-000000000002"


def _link(lid: str, **leaves) -> dict:
    return {"qkdl_id": lid, "qkdl_type": "etsi-qkd-node-types:PHYS", "qkdl_remote": {"qkdn_id": PEER}, **leaves}


def test_phys_links_offered_are_the_switched_on_ones() -> None:
    links = {
        "5c0a7c8e-0000-4000-8000-00000000000a": {},
        "5c0a7c8e-0000-4000-8000-00000000000b": {"qkdl_status": "etsi-qkd-node-types:ACTIVE"},
        "5c0a7c8e-0000-4000-8000-00000000000c": {"qkdl_status": "etsi-qkd-node-types:OFF"},
        "5c0a7c8e-0000-4000-8000-00000000000d": {"qkdl_enable": False},
        "5c0a7c8e-0000-4000-8000-00000000000e": {"qkdl_enable": False, "qkdl_status": "etsi-qkd-node-types:ACTIVE"},
    }
    entries = [_link(lid, **leaves) for lid, leaves in links.items()]
    table = routes.from_running({"etsi-qkd-sdn-node:qkd_node": {"qkd_links": {"qkd_link": entries}}}, OWN)
    offered = {lk.qkdl_id for lk in table.phys_to(PEER)}
    assert offered == {lid for lid, e in zip(links, entries) if switched_on(e)}
    assert offered == {"5c0a7c8e-0000-4000-8000-00000000000a", "5c0a7c8e-0000-4000-8000-00000000000b"}
