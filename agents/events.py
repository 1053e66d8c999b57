"""Driver events -> ETSI GS QKD 015 notifications (and sdqkd-optical-switch's, sdqkd-qrng's)."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

from lxml import etree

from sdqkd.agents.drivers.base import Event

ETSI_NS = "urn:etsi:qkd:yang:etsi-qkd-node"
TYPES_NS = "urn:etsi:qkd:yang:etsi-qkd-node-types"
OSW_NS = "urn:sdqkd:yang:sdqkd-optical-switch"
QRNG_NS = "urn:sdqkd:yang:sdqkd-qrng"


def _root(name: str, ns: str = ETSI_NS) -> etree._Element:
    return etree.Element(f"{{{ns}}}{name}", nsmap={None: ns, "etsi-qkdn-types": TYPES_NS} if ns == ETSI_NS else {None: ns})


def _sub(parent: etree._Element, name: str, text: Any = None, ns: str = ETSI_NS) -> etree._Element:
    el = etree.SubElement(parent, f"{{{ns}}}{name}")
    if text is not None:
        el.text = str(text)
    return el


def _ident(value: str) -> str:
    return "etsi-qkdn-types:" + str(value).rsplit(":", 1)[-1]


def _report(kind: str, section: str, key: str, key_value: Any, status_leaf: str, status: str, message: str, severity: str) -> etree._Element:
    """alarm or event notification with one link/interface section."""
    root = _root(kind)
    sec = _sub(root, section)
    _sub(sec, key, key_value)
    _sub(sec, status_leaf, _ident(status))
    _sub(sec, "message", message)
    _sub(sec, "severity", _ident(severity))
    return root


class Translator:
    """Remembers each link's last status, so that leaving ACTIVE is reported as
    sdqkdn_link_down (what controllers react to) besides the plain event."""

    def __init__(self) -> None:
        self._links: dict[str, str] = {}

    def __call__(self, event: Event) -> list[etree._Element]:
        if event.kind != "link-status":
            one = to_notification(event)
            return [one] if one is not None else []
        d = event.data
        status = str(d["status"]).rsplit(":", 1)[-1]
        reason = str(d.get("reason") or status.lower())
        was = self._links.get(str(d["qkdl_id"]))
        self._links[str(d["qkdl_id"])] = status
        out = []
        if was == "ACTIVE" and status != "ACTIVE":
            root = _root("sdqkdn_link_down")
            link = _sub(root, "qkd_link")
            _sub(link, "qkdl_id", d["qkdl_id"])
            _sub(link, "reason", reason)
            out.append(root)
        severity = "MAJOR" if was == "ACTIVE" and status != "ACTIVE" else "MINOR"
        out.append(_report("event", "link", "qkdl_id", d["qkdl_id"], "qkdl_status", status, reason, severity))
        return out


def to_notification(event: Event) -> etree._Element | None:
    """The notification content element for a stateless driver event (None: not reported)."""
    d = event.data
    if event.kind == "link-perf":
        root = _root("sdqkdn_link_perf_update")
        link = _sub(root, "qkd_link")
        _sub(link, "qkdl_id", d["qkdl_id"])
        perf = _sub(link, "performance")
        _sub(perf, "skr", int(d.get("skr", 0)))
        if d.get("qber") is not None:
            pp = _sub(perf, "phys_perf")
            _sub(pp, "perf_type", _ident("QBER"))
            _sub(pp, "value", Decimal(str(round(float(d["qber"]), 3))))
        return root
    if event.kind == "interface-status":
        status = str(d["status"]).rsplit(":", 1)[-1]
        reason = str(d.get("reason") or status.lower())
        if status == "FAILED":
            root = _root("sdqkdn_interface_down")
            iface = _sub(root, "qkd_interface")
            _sub(iface, "qkdi_id", d["qkdi_id"])
            _sub(iface, "reason", reason)
            return root
        return _report("event", "interface", "qkdi_id", d["qkdi_id"], "qkdi_status", status, reason, "MINOR")
    if event.kind == "switch-status":
        root = _root("switch-status-change", OSW_NS)
        _sub(root, "name", d["name"], OSW_NS)
        _sub(root, "oper-status", d["oper-status"], OSW_NS)
        return root
    if event.kind == "qrng-status":
        return _qrng_status(d)
    return None


def _qrng_status(d: dict[str, Any]) -> etree._Element | None:
    """sdqkd-qrng source-failed (with the SP 800-90B test that tripped, if one did) or
    source-recovered."""
    name = {"FAILED": "source-failed", "ENABLED": "source-recovered"}.get(str(d["status"]))
    if name is None:
        return None
    root = _root(name, QRNG_NS)
    _sub(root, "node", d["node"], QRNG_NS)
    _sub(root, "source", d["source"], QRNG_NS)
    _sub(root, "message", d.get("reason") or str(d["status"]).lower(), QRNG_NS)
    if name == "source-failed" and d.get("test"):
        test = _sub(root, "health-test", None, QRNG_NS)
        for leaf in ("test", "phase", "cutoff", "observed", "window"):
            if d.get(leaf) is not None:
                _sub(test, leaf, d[leaf], QRNG_NS)
        _sub(test, "min-entropy", Decimal(str(d["min_entropy"])).quantize(Decimal("0.000001")), QRNG_NS)
    return root


def application_changes(changes: list[Any]) -> list[etree._Element]:
    """Notifications for qkd_app entries a commit created, changed or removed."""
    out = []
    for ch in changes:
        if ch.kind != "qkd-app":
            continue
        if ch.new is None:
            root = _root("sdqkdn_application_disconnected")
            app = _sub(root, "qkd_application")
            _sub(app, "app_id", ch.key)
        elif ch.old is None:
            root = _report("event", "application", "app_id", ch.key, "app_status", "ON", "application configured", "MINOR")
        elif ch.old.get("app_qos") != ch.new.get("app_qos") or ch.old.get("app_priority") != ch.new.get("app_priority"):
            root = _root("sdqkdn_application_qos_update")
            app = _sub(root, "qkd_application")
            _sub(app, "app_id", ch.key)
            qos = _sub(app, "app_qos")
            for leaf in ("max_bandwidth", "min_bandwidth", "jitter", "ttl", "clients_shared_path_enable", "clients_shared_keys_required"):
                value = ch.new.get("app_qos", {}).get(leaf)
                if value is not None:
                    _sub(qos, leaf, str(value).lower() if isinstance(value, bool) else value)
            if ch.new.get("app_priority") is not None:
                _sub(app, "app_priority", ch.new["app_priority"])
        else:
            continue
        out.append(root)
    return out


def application_new(master: str, slave: str, local_qkdn_id: str) -> etree._Element:
    """sdqkdn_application_new: an SAE asked for keys with a peer no application covers."""
    root = _root("sdqkdn_application_new")
    app = _sub(root, "qkd_application")
    _sub(app, "app_type", _ident("CLIENT"))
    _sub(app, "server_app_id", master)
    _sub(app, "client_app_id", slave)
    _sub(app, "local_qkdn_id", local_qkdn_id)
    return root
