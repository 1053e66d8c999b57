"""What TeraFlowSDN's QKD driver (src/device/service/drivers/qkd/, Tools2.py) needs beyond
RFC 8040, served only on URIs RFC 8040 gives no meaning to: api-paths with a trailing
slash (`.../qkd_node/qkd_links/`: an empty last segment is no api-identifier, so no
conforming client sends one). There:

- GET answers in the shapes the driver parses: member names without module prefixes,
  identities without their module (`PHYS`, which it compares with); `qkd_node/` answers
  with the node's members at the top (the driver reads `qkdn_id` there), `qkd_links/`
  with `{"qkd_links": [link, ...]}` (it iterates over that member), any other target
  as `{"name": value}`;
- POST accepts the body naming the target itself (`{"qkd_links": {"qkd_link": [...]}}`)
  and creates each entry it holds (409 data-exists for one already there); JSON nulls
  (`"virt_prev_hop": null` of a link's first hop) are taken as absent, as RFC 7951 has
  no null for a leaf; `application/json` is accepted as the media type.

Every other URI is RFC 8040 to the letter (the driver's Connect() reads the RFC shape
there, and finds no unprefixed `qkd_node`: its initial config is empty, nothing else)."""
from __future__ import annotations

import re
from typing import Any

from sdqkd import yangdata
from sdqkd.agents.restconf.paths import Step

ETSI = "etsi-qkd-sdn-node"
_IDENTITY = re.compile(r"^([A-Za-z_][\w.-]*):([A-Za-z_][\w.-]*)$")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k.rpartition(":")[2]: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        m = _IDENTITY.match(value)
        if m and yangdata.namespace_of(m.group(1)):
            return m.group(2)
    return value


def shape(steps: list[Step], value: Any) -> Any:
    node = steps[-1].node
    plain = _plain(value)
    if node.module == ETSI and node.name == "qkd_node":
        return plain
    if node.module == ETSI and node.name == "qkd_links":
        return {"qkd_links": (plain or {}).get("qkd_link", [])}
    return {node.name: plain}


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value if v is not None]
    return value


def names_target(body: dict[str, Any], steps: list[Step]) -> bool:
    """Does the body's one member name the target itself (the driver's POST)?"""
    return bool(steps) and len(body) == 1 and next(iter(body)).rpartition(":")[2] == steps[-1].node.name
