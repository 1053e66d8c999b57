"""What a commit changes, per device: the Changes drivers check and apply."""
from __future__ import annotations

from typing import Any

from sdqkd.agents.datastore.model import ModelSet
from sdqkd.agents.drivers.base import Change
from sdqkd.yangcodec import encode_json


def _entries(roots: dict[str, Any], models: ModelSet) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, key) -> RFC 7951 object of every device-relevant list entry."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    etsi = encode_json(roots["etsi-qkd-sdn-node"], models.models["etsi-qkd-sdn-node"].schema, config_only=True)
    node = etsi.get("etsi-qkd-sdn-node:qkd_node", {})
    for link in node.get("qkd_links", {}).get("qkd_link", []):
        out[("qkd-link", str(link["qkdl_id"]).lower())] = link
    for app in node.get("qkd_applications", {}).get("qkd_app", []):
        out[("qkd-app", str(app["app_id"]).lower())] = app
    osw = encode_json(roots["sdqkd-optical-switch"], models.models["sdqkd-optical-switch"].schema, config_only=True)
    for sw in osw.get("sdqkd-optical-switch:optical-switches", {}).get("switch", []):
        for xc in sw.get("cross-connect", []):
            out[("cross-connect", f"{sw['name']}/{xc['port-a']}")] = xc
    return out


def changes(old: dict[str, Any], new: dict[str, Any], models: ModelSet) -> list[Change]:
    """Deletions first (they free resources), then modifications, then creations."""
    before, after = _entries(old, models), _entries(new, models)
    deleted = [Change(k, key, before[(k, key)], None) for (k, key) in before if (k, key) not in after]
    modified = [
        Change(k, key, before[(k, key)], after[(k, key)])
        for (k, key) in after
        if (k, key) in before and before[(k, key)] != after[(k, key)]
    ]
    created = [Change(k, key, None, after[(k, key)]) for (k, key) in after if (k, key) not in before]
    return deleted + modified + created
