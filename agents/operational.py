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

from sdqkd import __version__, yangdata
from sdqkd.agents.config import AgentConfig
from sdqkd.agents.drivers.base import Driver
from sdqkd.qkdprofile import identity, parse_wavelength_range

log = logging.getLogger(__name__)



def _states(drivers: list[Driver]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Each driver's state read once: the QKD modules', the optical switches' and the QRNGs'."""
    states = [d.state() for d in drivers]
    return ([st for st in states if "interface" in st], [st for st in states if "cross-connects" in st],
            [st["qrng"] for st in states if "qrng" in st])


def link_rate(drivers: list[Driver], qkdl_id: str) -> float:
    """The secret key rate (bit/s) the QKD modules measure on a link now (summed over the
    modules serving it); what an ETSI 004 stream's min_bps is admitted against."""
    want = qkdl_id.lower()
    return float(sum(float(ls.get("skr") or 0) for st in _states(drivers)[0]
                     for lid, ls in st.get("links", {}).items() if str(lid).lower() == want))


def initial_config(cfg: AgentConfig, drivers: list[Driver]) -> list[etree._Element]:
    """qkd_node with identity, capabilities and one qkd_interface per QKD module; one
    switch entry per optical switch (RFC 7951 JSON, written as XML by libyang)."""
    node: dict[str, Any] = {"qkdn_id": cfg.node.qkdn_id, "qkdn_version": f"sdqkd {__version__}"}
    if cfg.node.location:
        node["qkdn_location_id"] = cfg.node.location
    node["qkdn_capabilities"] = {"link_stats_support": True, "application_stats_support": True,
                                 "key_relay_mode_enable": True}
    mods = {m.qkdi_id: m for m in cfg.qkd_modules}
    modules, switches, _ = _states(drivers)
    ifaces = []
    for st in modules:
        info = st["interface"]
        iface: dict[str, Any] = {"qkdi_id": int(info["qkdi_id"])}
        if info.get("model"):
            iface["qkdi_model"] = str(info["model"])
        if info.get("technology"):
            iface["qkdi_type"] = identity(info["technology"])
        mod = mods.get(int(info["qkdi_id"]))
        if mod is not None and mod.device:
            iface["qkdi_att_point"] = {"device": mod.device, **({"port": int(mod.port)} if mod.port is not None else {})}
        caps: dict[str, Any] = {}
        if info.get("role_support"):
            caps["role_support"] = identity(info["role_support"])
        if info.get("wavelength_range"):
            caps["wavelength_range"] = wavelength_range(str(info["wavelength_range"]))
        if info.get("max_absorption") is not None:
            caps["max_absorption"] = str(info["max_absorption"])
        if caps:
            iface["qkdi_capabilities"] = caps
        ifaces.append(iface)
    if ifaces:
        node["qkd_interfaces"] = {"qkd_interface": ifaces}
    data: dict[str, Any] = {"etsi-qkd-sdn-node:qkd_node": node}
    if switches:
        data["sdqkd-optical-switch:optical-switches"] = {"switch": [{"name": st["name"]} for st in switches]}
    return yangdata.encode_json_xml(data, config=True)


def wavelength_range(channels: str) -> str:
    """A module's channels as ETSI 015 wavelength_range, written as ONOS's QKD driver reads
    it: its QuantumLambdaQuery splits the value on "-" and takes the two numbers as the
    first and last channel, so a fixed-channel module is "34-34" (not "34") and contiguous
    channels are one range. Channels with gaps stay a list, which that parser cannot read."""
    found = sorted(parse_wavelength_range(channels))
    if found and found[-1] - found[0] + 1 == len(found):
        return f"{found[0]}-{found[-1]}"
    return channels


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def qber_perf(qber: float) -> list[dict[str, Any]]:
    """ETSI 015 phys_perf with the QBER (decimal64, 3 fraction digits), in <get> and in notifications."""
    return [{"perf_type": identity("QBER"), "value": str(Decimal(str(round(float(qber), 3))))}]


StockOf = Callable[[str], "dict[str, Any] | None"]


def fill(data: dict[str, dict[str, Any]], drivers: list[Driver], usage: Callable[[str], list[tuple[int, int, int]]] | None = None,
         stock: StockOf | None = None, delivery: StockOf | None = None) -> None:
    """Write live state into a copy of running's per-module RFC 7951 JSON (the datastore's
    validated running): a <get> shows what the devices report now. Whatever state a copy
    holds is replaced, never accumulated. stock(qkdl_id) / delivery(app_id): the LKMS's
    counts for sdqkd-key-stock (None: nothing to say)."""
    node = data.setdefault("etsi-qkd-sdn-node", {}).setdefault("etsi-qkd-sdn-node:qkd_node", {})
    node["qkdn_status"] = identity("OPERATING")
    for app in node.get("qkd_applications", {}).get("qkd_app", []):
        app["app_status"] = identity("ON")
        app.pop("sdqkd-key-stock:key-delivery", None)
        got = delivery(str(app["app_id"])) if delivery else None
        if got is not None:
            app["sdqkd-key-stock:key-delivery"] = key_delivery(got)
        stats = [{"end_time": _time(end), "start_time": _time(start), "consumed_bits": min(bits, 2**32 - 1)}
                 for start, end, bits in (usage(str(app["app_id"]).lower()) if usage else [])]
        app.setdefault("app_statistics", {})["statistics"] = stats
        if not stats:
            del app["app_statistics"]["statistics"]
    links = {str(lk["qkdl_id"]).lower(): lk for lk in node.get("qkd_links", {}).get("qkd_link", [])}
    for lid, lk in links.items():
        lk.get("qkdl_performance", {}).pop("phys_perf", None)
        lk.pop("sdqkd-key-stock:key-stock", None)
        got = stock(lid) if stock else None
        if got is not None:
            lk["sdqkd-key-stock:key-stock"] = key_stock(got)
    ifaces = {int(i["qkdi_id"]): i for i in node.get("qkd_interfaces", {}).get("qkd_interface", [])}
    modules, switch_states, qrngs = _states(drivers)
    for iface in ifaces.values():  # an interface no module serves is down; a module's own says otherwise
        iface["qkdi_status"] = identity("DISABLED")
    for st in modules:
        info = st["interface"]
        iface = ifaces.get(int(info["qkdi_id"]))
        if iface is not None:
            iface["qkdi_status"] = identity(info["status"])
        for lid, ls in st.get("links", {}).items():
            entry = links.get(str(lid).lower())
            if entry is None:
                continue
            perf = entry.setdefault("qkdl_performance", {})
            perf["skr"] = int(ls.get("skr", 0))
            if ls.get("qber") is not None:
                perf["phys_perf"] = qber_perf(ls["qber"])
            # qkdl_status is configuration in ETSI 015; the device's view wins on <get>.
            entry["qkdl_status"] = identity(ls["status"])
    data.pop("sdqkd-qrng", None)
    if qrngs:
        data["sdqkd-qrng"] = {"sdqkd-qrng:qrng": qrng_state(qrngs[0])}
    switches = {sw["name"]: sw for sw in data.get("sdqkd-optical-switch", {})
                .get("sdqkd-optical-switch:optical-switches", {}).get("switch", [])}
    for st in switch_states:
        sw = switches.get(st["name"])
        if sw is None:
            continue
        sw["port-count"] = int(st["port-count"])
        sw["insertion-loss"] = str(Decimal(str(st["insertion-loss"])))
        sw["oper-status"] = st["oper-status"]
        ports = []
        for pid, p in st.get("ports", {}).items():
            port: dict[str, Any] = {"id": int(pid)}
            if p.get("peer-port") is not None:
                port["peer-port"] = int(p["peer-port"])
            if p.get("connected-to"):
                port["connected-to"] = p["connected-to"]
            ports.append(port)
        sw["port"] = ports
        if not ports:
            del sw["port"]


def key_stock(st: dict[str, Any]) -> dict[str, Any]:
    """sdqkd-key-stock key-stock of a link (uint64 leaves are JSON strings, RFC 7951)."""
    out = {"stored-keys": str(st["keys"]), "stored-bits": str(st["bits"]), "local-keys": str(st["local"]),
           "limit-keys": str(st["limit"])}
    if st.get("key_size"):
        out["key-size"] = int(st["key_size"])
    return out


def key_delivery(st: dict[str, Any]) -> dict[str, Any]:
    """sdqkd-key-stock key-delivery of an application."""
    out = {"key-requests": str(st["requests"]), "keys-delivered": str(st["keys"]), "bits-delivered": str(st["bits"]),
           "rate": f"{float(st['rate']):.1f}", "rate-window": int(st["window"]), "discontinuity-time": _time(st["since"])}
    if st.get("available_keys") is not None:
        out["available-keys"] = str(st["available_keys"])
        out["available-bits"] = str(st["available_bits"])
    return out


def qrng_state(st: dict[str, Any]) -> dict[str, Any]:
    """sdqkd-qrng `qrng` from the QRNG driver's state()."""
    out: dict[str, Any] = {"source": st["source"], "state": st["state"], "state-since": _time(st["since"]),
                           "degraded-hold": int(st["degraded_hold"]), "bits-generated": str(st["bits_delivered"]),
                           "failures": int(st["failures"]), "discontinuity-time": _time(st["opened"])}
    if st.get("reason"):
        out["message"] = st["reason"]
    if st.get("rate"):
        out["rate"] = str(int(st["rate"]))
    health = st.get("health")
    if health is not None:
        out["raw-samples-tested"] = str(health["samples"])
        tests = []
        for name, (cutoff, window) in health["cutoffs"].items():
            t: dict[str, Any] = {"name": name, "cutoff": cutoff, "failures": int(st["tests"].get(name, {}).get("failures", 0))}
            if window is not None:
                t["window"] = window
            seen = st["tests"].get(name)
            if seen and seen.get("last") is not None:
                t["last-failure"] = _time(seen["last"])
                if seen.get("observed") is not None:
                    t["last-observed"] = int(seen["observed"])
            tests.append(t)
        out["health-tests"] = {"min-entropy": f"{health['min_entropy']:.6f}", "false-positive-log2": int(health["alpha_log2"]),
                               "test": tests, **({"start-up-passed": _time(health["passed_at"])} if health.get("passed_at") else {})}
    last = st.get("last_failure")
    if last:
        out["last-failure"] = {"time": _time(last["time"]), "message": last["message"],
                               **{k: last[k] for k in ("test", "phase") if last.get(k)}}
    return out
