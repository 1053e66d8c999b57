"""What a commit changes, per device: the Changes drivers check and apply."""
from __future__ import annotations

from typing import Any

from sdqkd.agents.drivers.base import Change

Config = dict[str, dict[str, Any]]  # module -> RFC 7951 JSON, as ModelSet.check gives it


def _entries(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, key) -> RFC 7951 object of every device-relevant list entry."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    node = cfg.get("etsi-qkd-sdn-node", {}).get("etsi-qkd-sdn-node:qkd_node", {})
    for link in node.get("qkd_links", {}).get("qkd_link", []):
        out[("qkd-link", str(link["qkdl_id"]).lower())] = link
    for app in node.get("qkd_applications", {}).get("qkd_app", []):
        out[("qkd-app", str(app["app_id"]).lower())] = app
    osw = cfg.get("sdqkd-optical-switch", {})
    for sw in osw.get("sdqkd-optical-switch:optical-switches", {}).get("switch", []):
        for xc in sw.get("cross-connect", []):
            out[("cross-connect", f"{sw['name']}/{xc['port-a']}")] = xc
    return out


def changes(old: Config, new: Config) -> list[Change]:
    """Deletions first (they free resources), then modifications, then creations."""
    before, after = _entries(old), _entries(new)
    deleted = [Change(k, key, before[(k, key)], None) for (k, key) in before if (k, key) not in after]
    modified = [
        Change(k, key, before[(k, key)], after[(k, key)])
        for (k, key) in after
        if (k, key) in before and before[(k, key)] != after[(k, key)]
    ]
    created = [Change(k, key, None, after[(k, key)]) for (k, key) in after if (k, key) not in before]
    return deleted + modified + created
