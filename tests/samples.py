"""A populated ETSI GS QKD 015 node that touches every kind of leaf the module has."""
from __future__ import annotations

import uuid
from decimal import Decimal

from sdqkd.bindings.etsi_qkd_sdn_node import etsi_qkd_sdn_node


def set_leaf(obj, name: str, value) -> None:  # type: ignore[no-untyped-def]
    """pyangbind's validating setter (config false leaves have no property setter)."""
    getattr(obj, "_set_" + name.replace("-", "_"))(value)

NODE_ID = "9f2c1a54-0b6e-4d7a-8c3e-2f1b5a6d7e80"
PEER_ID = "3b1e7c22-5d4f-4a9b-9e0c-6a7b8c9d0e1f"
APP_ID = "c0ffee00-1234-4abc-8def-0123456789ab"
PHYS_LINK = "11111111-2222-4333-8444-555555555555"
VIRT_LINK = "66666666-7777-4888-9999-aaaaaaaaaaaa"


def populated_node(with_virt: bool = True) -> etsi_qkd_sdn_node:
    """A node with config and state; `with_virt=False` leaves out the leaves that
    depend on qkdl_type (VIRT/PHYS `when`), which the official module mis-states."""
    root = etsi_qkd_sdn_node()
    n = root.qkd_node
    n.qkdn_id = NODE_ID
    set_leaf(n, "qkdn_status", "etsi-qkdn-types:OPERATING")
    n.qkdn_version = "sdqkd 0.1.0"
    n.qkdn_location_id = "Quijote"
    n.qkdn_capabilities.link_stats_support = True
    n.qkdn_capabilities.application_stats_support = False
    n.qkdn_capabilities.key_relay_mode_enable = True

    app = n.qkd_applications.qkd_app.add(APP_ID)
    set_leaf(app, "app_status", "ON")
    app.app_type = "CLIENT"
    app.server_app_id = "sae://quintin/encryptor-1"
    app.client_app_id.append("sae://distrito/encryptor-1")
    app.client_app_id.append("sae://distrito/encryptor-2")
    app.app_priority = 3
    set_leaf(app, "creation_time", "2026-11-24T10:00:00Z")
    app.expiration_time = "2026-12-24T10:00:00+01:00"
    stat = app.app_statistics.statistics.add("2026-11-24T10:05:00Z")
    set_leaf(stat, "start_time", "2026-11-24T10:00:00Z")
    set_leaf(stat, "consumed_bits", 512000)
    app.app_qos.max_bandwidth = 2048
    app.app_qos.min_bandwidth = 256
    app.app_qos.jitter = 10
    app.app_qos.ttl = 3600
    app.app_qos.clients_shared_path_enable = False
    app.app_qos.clients_shared_keys_required = True
    app.backing_qkdl_id.append(PHYS_LINK)
    app.local_qkdn_id = NODE_ID
    app.remote_qkdn_id = PEER_ID

    iface = n.qkd_interfaces.qkd_interface.add(1)
    iface.qkdi_model = "Cerberis3"
    iface.qkdi_type = "etsi-qkd-node-types:DV-QKD-COW"
    iface.qkdi_att_point.device = "osw-1"
    iface.qkdi_att_point.port = 3
    iface.qkdi_capabilities.role_support = "TRANSMITTER"
    iface.qkdi_capabilities.wavelength_range = "32,34"
    iface.qkdi_capabilities.max_absorption = Decimal("12.5")
    set_leaf(iface, "qkdi_status", "ENABLED")

    phys = n.qkd_links.qkd_link.add(PHYS_LINK)
    set_leaf(phys, "qkdl_status", "ACTIVE")
    phys.qkdl_enable = True
    phys.qkdl_local.qkdn_id = NODE_ID
    phys.qkdl_local.qkdi_id = 1
    phys.qkdl_remote.qkdn_id = PEER_ID
    phys.qkdl_remote.qkdi_id = 7
    phys.qkdl_type = "etsi-qkdn-types:PHYS"
    phys.qkdl_applications.append(APP_ID)
    if with_virt:
        phys.phys_channel_att = Decimal("7.47")
        phys.phys_wavelength = "34"
        phys.phys_qkd_role = "TRANSMITTER"
        perf = phys.qkdl_performance
        set_leaf(perf, "expected_consumption", 1000)
        set_leaf(perf, "skr", 1950)
        set_leaf(perf, "eskr", 1800)
        q = perf.phys_perf.add("QBER")
        set_leaf(q, "value", Decimal("0.031"))
        virt = n.qkd_links.qkd_link.add(VIRT_LINK)
        virt.qkdl_type = "VIRT"
        virt.qkdl_enable = True
        virt.qkdl_local.qkdn_id = NODE_ID
        virt.qkdl_remote.qkdn_id = str(uuid.UUID(int=7))
        virt.virt_prev_hop = PEER_ID
        virt.virt_next_hop.append(str(uuid.UUID(int=8)))
        virt.virt_bandwidth = 512
    return root
