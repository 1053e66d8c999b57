"""Driver events -> ETSI GS QKD 015 notifications (and sdqkd-optical-switch's, sdqkd-qrng's),
each stated as RFC 7951 JSON and written by libyang (sdqkd.yangdata.notification), which
checks it against its module before it is sent."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.drivers.base import Event
from sdqkd.qkdprofile import identity
from sdqkd.agents.operational import qber_perf

ETSI = "etsi-qkd-sdn-node"


def _etsi(name: str, body: dict[str, Any]) -> etree._Element:
    return yangdata.notification({f"{ETSI}:{name}": body})


def _report(kind: str, section: str, key: str, key_value: Any, status_leaf: str, status: str, message: str,
            severity: str) -> etree._Element:
    """alarm or event notification with one link/interface/application section."""
    return _etsi(kind, {section: {key: key_value, status_leaf: identity(status), "message": message,
                                  "severity": identity(severity)}})


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
            out.append(_etsi("sdqkdn_link_down", {"qkd_link": {"qkdl_id": str(d["qkdl_id"]), "reason": reason}}))
        severity = "MAJOR" if was == "ACTIVE" and status != "ACTIVE" else "MINOR"
        out.append(_report("event", "link", "qkdl_id", str(d["qkdl_id"]), "qkdl_status", status, reason, severity))
        return out


def to_notification(event: Event) -> etree._Element | None:
    """The notification content element for a stateless driver event (None: not reported)."""
    d = event.data
    if event.kind == "link-perf":
        perf: dict[str, Any] = {"skr": int(d.get("skr", 0))}
        if d.get("qber") is not None:
            perf["phys_perf"] = qber_perf(d["qber"])
        return _etsi("sdqkdn_link_perf_update", {"qkd_link": {"qkdl_id": str(d["qkdl_id"]), "performance": perf}})
    if event.kind == "interface-status":
        status = str(d["status"]).rsplit(":", 1)[-1]
        reason = str(d.get("reason") or status.lower())
        if status == "FAILED":
            return _etsi("sdqkdn_interface_down", {"qkd_interface": {"qkdi_id": int(d["qkdi_id"]), "reason": reason}})
        return _report("event", "interface", "qkdi_id", int(d["qkdi_id"]), "qkdi_status", status, reason, "MINOR")
    if event.kind == "switch-status":
        return yangdata.notification({"sdqkd-optical-switch:switch-status-change": {
            "name": str(d["name"]), "oper-status": str(d["oper-status"])}})
    if event.kind == "qrng-status":
        return _qrng_status(d)
    return None


def _qrng_status(d: dict[str, Any]) -> etree._Element | None:
    """sdqkd-qrng source-failed (with the SP 800-90B test that tripped, if one did) or
    source-recovered."""
    name = {"FAILED": "source-failed", "ENABLED": "source-recovered"}.get(str(d["status"]))
    if name is None:
        return None
    body: dict[str, Any] = {"node": str(d["node"]), "source": str(d["source"]),
                            "message": str(d.get("reason") or str(d["status"]).lower())}
    if name == "source-failed" and d.get("test"):
        test: dict[str, Any] = {}
        for leaf in ("test", "phase"):
            if d.get(leaf) is not None:
                test[leaf] = str(d[leaf])
        for leaf in ("cutoff", "observed", "window"):
            if d.get(leaf) is not None:
                test[leaf] = int(d[leaf])
        test["min-entropy"] = str(Decimal(str(d["min_entropy"])).quantize(Decimal("0.000001")))
        body["health-test"] = test
    return yangdata.notification({f"sdqkd-qrng:{name}": body})


def application_changes(changes: list[Any]) -> list[etree._Element]:
    """Notifications for qkd_app entries a commit created, changed or removed."""
    out = []
    for ch in changes:
        if ch.kind != "qkd-app":
            continue
        if ch.new is None:
            out.append(_etsi("sdqkdn_application_disconnected", {"qkd_application": {"app_id": ch.key}}))
        elif ch.old is None:
            out.append(_report("event", "application", "app_id", ch.key, "app_status", "ON", "application configured", "MINOR"))
        elif ch.old.get("app_qos") != ch.new.get("app_qos") or ch.old.get("app_priority") != ch.new.get("app_priority"):
            app: dict[str, Any] = {"app_id": ch.key}
            if ch.new.get("app_qos"):
                app["app_qos"] = dict(ch.new["app_qos"])  # RFC 7951 JSON of running already
            if ch.new.get("app_priority") is not None:
                app["app_priority"] = ch.new["app_priority"]
            out.append(_etsi("sdqkdn_application_qos_update", {"qkd_application": app}))
    return out


def application_new(master: str, slave: str, local_qkdn_id: str,
                    qos: dict[str, int] | None = None) -> etree._Element:
    """sdqkdn_application_new: an SAE asked for keys with a peer no application covers.
    qos: what it asked for, by ETSI 015 name (min_bandwidth, max_bandwidth, jitter, ttl in
    app_qos; priority as app_priority); zero means not asked and is left out."""
    app: dict[str, Any] = {"app_type": identity("CLIENT"), "server_app_id": master, "client_app_id": [slave]}
    qos = qos or {}
    if qos.get("priority"):
        app["app_priority"] = int(qos["priority"])
    app["local_qkdn_id"] = local_qkdn_id
    asked = {k: int(qos[k]) for k in ("max_bandwidth", "min_bandwidth", "jitter", "ttl") if qos.get(k)}
    if asked:
        app["app_qos"] = asked
    return _etsi("sdqkdn_application_new", {"qkd_application": app})
