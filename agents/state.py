"""The node's configuration seed and its operational state, both from the drivers.

ETSI 015 makes qkd_interfaces configuration, but they describe hardware: at start
the agent seeds them from its QKD modules (a startup file, when there is one,
wins). Operational leaves (statuses, SKR, QBER, cross-connect view) are read from
the drivers on every <get>.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from lxml import etree

from sdqkd import __version__
from sdqkd.agents.config import AgentConfig
from sdqkd.agents.drivers.base import Driver
from sdqkd.yangcodec import add_entry, child, set_leaf

log = logging.getLogger(__name__)

ETSI_NS = "urn:etsi:qkd:yang:etsi-qkd-node"
TYPES_NS = "urn:etsi:qkd:yang:etsi-qkd-node-types"
OSW_NS = "urn:sdqkd:yang:sdqkd-optical-switch"


def _ident(name: str) -> str:
    """'DV-QKD' or 'etsi-qkd-node-types:DV-QKD' -> 'etsi-qkdn-types:DV-QKD' with the prefix declared."""
    return "etsi-qkdn-types:" + str(name).rsplit(":", 1)[-1]


def _sub(parent: etree._Element, ns: str, name: str, text: Any = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{ns}}}{name}")
    if text is not None:
        el.text = str(text)
    return el


def qkd_modules(drivers: list[Driver]) -> list[tuple[Driver, dict[str, Any]]]:
    out = []
    for d in drivers:
        st = d.state()
        if "interface" in st:
            out.append((d, st))
    return out


def initial_config(cfg: AgentConfig, drivers: list[Driver]) -> list[etree._Element]:
    """qkd_node with identity, capabilities and one qkd_interface per QKD module; one
    switch entry per optical switch."""
    node = etree.Element(f"{{{ETSI_NS}}}qkd_node", nsmap={None: ETSI_NS, "etsi-qkdn-types": TYPES_NS})
    _sub(node, ETSI_NS, "qkdn_id", cfg.node.qkdn_id)
    _sub(node, ETSI_NS, "qkdn_version", f"sdqkd {__version__}")
    if cfg.node.location:
        _sub(node, ETSI_NS, "qkdn_location_id", cfg.node.location)
    caps = _sub(node, ETSI_NS, "qkdn_capabilities")
    _sub(caps, ETSI_NS, "link_stats_support", "true")
    _sub(caps, ETSI_NS, "application_stats_support", "true")
    _sub(caps, ETSI_NS, "key_relay_mode_enable", "true")
    mods = {m.qkdi_id: m for m in cfg.qkd_modules}
    ifaces = _sub(node, ETSI_NS, "qkd_interfaces")
    for _drv, st in qkd_modules(drivers):
        info = st["interface"]
        iface = _sub(ifaces, ETSI_NS, "qkd_interface")
        _sub(iface, ETSI_NS, "qkdi_id", info["qkdi_id"])
        if info.get("model"):
            _sub(iface, ETSI_NS, "qkdi_model", info["model"])
        if info.get("technology"):
            _sub(iface, ETSI_NS, "qkdi_type", _ident(info["technology"]))
        mod = mods.get(int(info["qkdi_id"]))
        if mod is not None and mod.device:
            att = _sub(iface, ETSI_NS, "qkdi_att_point")
            _sub(att, ETSI_NS, "device", mod.device)
            if mod.port is not None:
                _sub(att, ETSI_NS, "port", mod.port)
        icaps = _sub(iface, ETSI_NS, "qkdi_capabilities")
        if info.get("role_support"):
            _sub(icaps, ETSI_NS, "role_support", _ident(info["role_support"]))
        if info.get("wavelength_range"):
            _sub(icaps, ETSI_NS, "wavelength_range", info["wavelength_range"])
        if info.get("max_absorption") is not None:
            _sub(icaps, ETSI_NS, "max_absorption", info["max_absorption"])
    out = [node]
    switches = [d.state() for d in drivers if "cross-connects" in d.state()]
    if switches:
        osw = etree.Element(f"{{{OSW_NS}}}optical-switches", nsmap={None: OSW_NS})
        for st in switches:
            sw = _sub(osw, OSW_NS, "switch")
            _sub(sw, OSW_NS, "name", st["name"])
        out.append(osw)
    return out


def _clear(lst: Any) -> None:
    """Empty a state list of the live running bindings: each <get> fills them anew, so
    what the last one wrote (an old statistics window, a port gone) must not stay."""
    for key in list(lst.keys()):
        del lst[key]


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fill(roots: dict[str, Any], drivers: list[Driver], usage: Callable[[str], list[tuple[int, int, int]]] | None = None) -> None:
    """Write live state into the decoded running (Datastores.running_roots): state lists
    are emptied first, so a <get> shows what the devices report now and nothing older."""
    node = roots["etsi-qkd-sdn-node"].qkd_node
    set_leaf(node, "qkdn_status", "etsi-qkdn-types:OPERATING")
    for app in node.qkd_applications.qkd_app.values():
        set_leaf(app, "app_status", "etsi-qkdn-types:ON")
        stats = app.app_statistics.statistics
        _clear(stats)
        for start, end, bits in (usage(str(app.app_id).lower()) if usage else []):
            entry = add_entry(stats, {"end_time": _time(end)})
            set_leaf(entry, "start_time", _time(start))
            set_leaf(entry, "consumed_bits", min(bits, 2**32 - 1))
    links = node.qkd_links.qkd_link
    for lk in links.values():
        _clear(lk.qkdl_performance.phys_perf)
    ifaces = node.qkd_interfaces.qkd_interface
    for _drv, st in qkd_modules(drivers):
        info = st["interface"]
        key = str(info["qkdi_id"])
        if key in ifaces:
            set_leaf(ifaces[key], "qkdi_status", _ident(info["status"]))
        for lid, ls in st.get("links", {}).items():
            entry = next((links[k] for k in links.keys() if str(k).lower() == str(lid).lower()), None)
            if entry is None:
                continue
            perf = entry.qkdl_performance
            set_leaf(perf, "skr", int(ls.get("skr", 0)))
            if ls.get("qber") is not None:
                q = add_entry(perf.phys_perf, {"perf_type": "QBER"})
                set_leaf(q, "value", Decimal(str(round(float(ls["qber"]), 3))))
            # qkdl_status is configuration in ETSI 015; the device's view wins on <get>.
            entry.qkdl_status = _ident(ls["status"])
    sw_root = roots["sdqkd-optical-switch"].optical_switches.switch
    for d in drivers:
        st = d.state()
        if "cross-connects" not in st or st["name"] not in sw_root:
            continue
        sw = sw_root[st["name"]]
        set_leaf(sw, "port-count", int(st["port-count"]))
        set_leaf(sw, "insertion-loss", Decimal(str(st["insertion-loss"])))
        set_leaf(sw, "oper-status", st["oper-status"])
        ports = child(sw, "port")
        _clear(ports)
        for pid, p in st.get("ports", {}).items():
            port = add_entry(ports, {"id": int(pid)})
            if p.get("peer-port") is not None:
                set_leaf(port, "peer-port", int(p["peer-port"]))
            if p.get("connected-to"):
                set_leaf(port, "connected-to", p["connected-to"])
