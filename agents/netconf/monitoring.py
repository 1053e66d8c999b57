"""ietf-netconf-monitoring (RFC 6022): /netconf-state and <get-schema>.

yangcli and other clients list a server's schemas here and download them with
get-schema, so they need no local copy of our modules.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lxml import etree

from sdqkd import yangmodels
from sdqkd.agents.netconf import errors
from sdqkd.agents.netconf import notifications

NCM_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"


def served_modules(names: Iterable[str]) -> list[yangmodels.YangModule]:
    """The named modules and everything they import, from yang/."""
    mods = yangmodels.modules()
    out: dict[str, yangmodels.YangModule] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = mods[name]
        todo.extend(yangmodels.imports(mods[name]))
    return sorted(out.values(), key=lambda m: m.name)


def netconf_state(capabilities: list[str], modules: list[yangmodels.YangModule], locks: dict[str, int],
                  sessions: list[Any], stats: dict[str, Any]) -> dict[str, Any]:
    """/netconf-state (RFC 6022) as RFC 7951 JSON; <get> encodes it with the rest through libyang."""
    ncm = "ietf-netconf-monitoring"
    stores = []
    for name in ("running", "candidate", "startup"):
        ds: dict[str, Any] = {"name": name}
        if name in locks:
            ds["locks"] = {"global-lock": {"locked-by-session": int(locks[name]),
                                           "locked-time": notifications.format_time(notifications.now())}}
        stores.append(ds)
    schemas = [{"identifier": m.name, "version": m.revision or "", "format": f"{ncm}:yang",
                "namespace": m.read_header()[0], "location": ["NETCONF"]} for m in modules]
    sess = []
    for s in sessions:
        entry: dict[str, Any] = {"session-id": int(s.session_id), "transport": f"{ncm}:netconf-ssh",
                                 "username": s.username or "", "login-time": notifications.format_time(s.login_time)}
        if s.source_host:
            entry["source-host"] = s.source_host
        entry.update({k: int(v) for k, v in s.counters.items()})
        sess.append(entry)
    st: dict[str, Any] = {"netconf-start-time": notifications.format_time(stats["start"])}
    st.update({k: int(stats.get(k, 0)) for k in ("in-bad-hellos", "in-sessions", "dropped-sessions", "in-rpcs",
                                                 "in-bad-rpcs", "out-rpc-errors", "out-notifications")})
    state: dict[str, Any] = {"capabilities": {"capability": list(capabilities)}, "datastores": {"datastore": stores},
                             "schemas": {"schema": schemas}, "statistics": st}
    if sess:
        state["sessions"] = {"session": sess}
    return {f"{ncm}:netconf-state": state}


def get_schema(op: etree._Element, modules: list[yangmodels.YangModule]) -> list[etree._Element]:
    ident = op.findtext(f"{{{NCM_NS}}}identifier")
    if not ident:
        raise errors.protocol(errors.MissingElement, "get-schema needs an identifier", info={"bad-element": "identifier"})
    version = op.findtext(f"{{{NCM_NS}}}version")
    fmt_el = op.find(f"{{{NCM_NS}}}format")
    if fmt_el is not None:
        fmt = (fmt_el.text or "").strip()
        pfx, _, name = fmt.rpartition(":")
        if name != "yang" or (pfx and fmt_el.nsmap.get(pfx) != NCM_NS):
            raise errors.InvalidValue(f"format '{fmt}' is not available (only yang)", info={"bad-element": "format"})
    hits = [m for m in modules if m.name == ident.strip() and (not version or m.revision == version.strip())]
    if not hits:
        raise errors.InvalidValue(f"no schema '{ident}'" + (f" revision {version}" if version else ""), info={"bad-element": "identifier"})
    data = etree.Element(f"{{{NCM_NS}}}data", nsmap={None: NCM_NS})
    data.text = hits[0].path.read_text(encoding="utf-8")
    return [data]
