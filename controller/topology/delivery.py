"""An application's key delivery at one node, from the node's last <get> (its agent's
sdqkd-key-stock key-delivery): counts and rates only, never a key."""
from __future__ import annotations

from typing import Any

from lxml import etree

from sdqkd.controller.southbound.agent import NSMAP, qkd_node, text


def app_delivery(data: etree._Element | None, app_id: str) -> dict[str, Any] | None:
    """requests, keys, bits, rate, window, available_keys/_bits (None when not reported),
    since (date-and-time text) of `app_id` in an agent's <data>; None if it has none."""
    node = qkd_node(data)
    if node is None:
        return None
    want = app_id.lower()
    for app in node.findall("q:qkd_applications/q:qkd_app", NSMAP):
        if (text(app, "q:app_id") or "").lower() != want:
            continue
        kd = app.find("ks:key-delivery", NSMAP)
        if kd is None:
            return None

        def leaf(name: str) -> str | None:
            return kd.findtext(f"ks:{name}", namespaces=NSMAP)

        def num(name: str) -> int | None:
            v = leaf(name)
            return None if v is None else int(v)

        return {"requests": num("key-requests") or 0, "keys": num("keys-delivered") or 0, "bits": num("bits-delivered") or 0,
                "rate": float(leaf("rate") or 0.0), "window": num("rate-window") or 0,
                "available_keys": num("available-keys"), "available_bits": num("available-bits"),
                "since": leaf("discontinuity-time")}
    return None
