"""What `sdqkd lab status` says of keys: per QKD link its rate, QBER, the keys stored at
each end and whether it runs on real devices (an ETSI 014 device driver, `device` in the
topology); per application the keys delivered at each end, the rate and what its SAEs
could be given now. From the controller's GetTopology and ListApplications: counts and
rates only, never a key."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from sdqkd.controller.northbound import sdqkd_pb2 as pb


def devices(lab: Mapping[str, Any]) -> dict[tuple[str, int], str]:
    """(node name, qkd-interface id) -> the device's ETSI 014 URL, for the real QKD modules."""
    return {(n["name"], int(i["id"])): str(i["device"]["url"])
            for n in lab.get("node", []) for i in n.get("qkd-interface", []) if i.get("device")}


def links(topo: pb.Topology, real: Mapping[tuple[str, int], str]) -> list[dict[str, Any]]:
    names = {x.qkdn_id: x.name for x in topo.nodes}
    out = []
    for lk in topo.links:
        a, b = names.get(lk.a, lk.a), names.get(lk.b, lk.b)
        urls = [u for u in (real.get((a, lk.a_if)), real.get((b, lk.b_if))) if u]
        out.append({"qkdl_id": lk.qkdl_id, "a": a, "b": b, "status": lk.status, "skr_kbps": round(lk.skr / 1000, 3),
                    "qber": lk.qber if lk.HasField("qber") else None, "key_bits": lk.key_bits,
                    "stock": {names.get(st.node, st.node): {"keys": st.stored_keys, "bits": st.stored_bits,
                                                            "local_keys": st.local_keys, "limit_keys": st.limit_keys}
                              for st in lk.stock},
                    "device": "real" if urls else "emulated", "device_urls": urls})
    return out


def applications(apps: list[pb.Application]) -> list[dict[str, Any]]:
    out = []
    for app in apps:
        ends = {}
        for d in app.delivery:
            ends[d.node.name or d.node.qkdn_id] = {
                "requests": d.key_requests, "keys": d.keys_delivered, "bits": d.bits_delivered, "rate_bps": d.rate_bps,
                "rate_window_s": d.rate_window_s,
                "available_keys": d.available_keys if d.HasField("available_keys") else None,
                "available_bits": d.available_bits if d.HasField("available_bits") else None}
        out.append({"app_id": app.app_id, "master_sae": app.master_sae, "slave_sae": app.slave_sae,
                    "src": app.src.name or app.src.qkdn_id, "dst": app.dst.name or app.dst.qkdn_id,
                    "state": app.state, "min_bps": app.qos.min_bps, "ends": ends})
    return out


def _kbit(bits: int) -> str:
    return f"{bits / 1000:.1f}"


def render_links(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="QKD links")
    for col in ("link", "status", "key rate (kb/s)", "QBER", "keys a/b", "kbit", "device"):
        table.add_column(col)
    for lk in sorted(rows, key=lambda x: (x["a"], x["b"])):
        st = lk.get("stock", {})
        stored = " / ".join(str(st[n]["keys"]) if n in st else "-" for n in (lk["a"], lk["b"])) if st else ""
        table.add_row(f"{lk['a']} - {lk['b']}", lk["status"], f"{lk['skr_kbps']:.3f}",
                      f"{lk['qber']:.3f}" if lk["qber"] is not None else "", stored,
                      _kbit(lk.get("key_bits", 0)) if st else "",
                      "real: " + ", ".join(lk["device_urls"]) if lk.get("device") == "real" else "emulated")
    console.print(table)


def render_applications(rows: list[dict[str, Any]], console: Console) -> None:
    if not rows:
        return
    window = next((e["rate_window_s"] for app in rows for e in app["ends"].values()), 0)
    table = Table(title=f"applications: keys delivered at the master / slave end, rate over the last {window} s, "
                        "keys available now")
    for col in ("master -> slave SAE", "state", "requests", "keys", "kbit", "b/s", "available"):
        table.add_column(col)
    for app in sorted(rows, key=lambda x: (x["master_sae"], x["slave_sae"])):
        ends = [app["ends"].get(app["src"]), app["ends"].get(app["dst"])]

        def both(field: str, fmt: Any = str) -> str:
            return " / ".join("-" if e is None or e[field] is None else fmt(e[field]) for e in ends)

        table.add_row(f"{app['master_sae']} -> {app['slave_sae']}", app["state"], both("requests"), both("keys"),
                      both("bits", _kbit), both("rate_bps", lambda v: f"{v:.1f}"), both("available_keys"))
    console.print(table)
