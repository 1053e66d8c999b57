"""ietf-netconf-monitoring (RFC 6022): /netconf-state and <get-schema>.

yangcli and other clients list a server's schemas here and download them with
get-schema, so they need no local copy of our modules.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lxml import etree

from sdqkd import yangmodels
from sdqkd.agents import errors, notify

NCM_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"


def _sub(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{NCM_NS}}}{name}")
    if text is not None:
        el.text = text
    return el


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


def netconf_state(capabilities: list[str], modules: list[yangmodels.YangModule], locks: dict[str, int], sessions: list[Any], stats: dict[str, Any]) -> etree._Element:
    state = etree.Element(f"{{{NCM_NS}}}netconf-state", nsmap={None: NCM_NS})
    caps = _sub(state, "capabilities")
    for cap in capabilities:
        _sub(caps, "capability", cap)
    stores = _sub(state, "datastores")
    for name in ("running", "candidate", "startup"):
        ds = _sub(stores, "datastore")
        _sub(ds, "name", name)
        if name in locks:
            lock = _sub(_sub(ds, "locks"), "global-lock")
            _sub(lock, "locked-by-session", str(locks[name]))
            _sub(lock, "locked-time", notify.format_time(notify.now()))
    schemas = _sub(state, "schemas")
    for m in modules:
        ns, _ = m.read_header()
        sc = etree.SubElement(schemas, f"{{{NCM_NS}}}schema")
        _sub(sc, "identifier", m.name)
        _sub(sc, "version", m.revision or "")
        fmt = etree.SubElement(sc, f"{{{NCM_NS}}}format", nsmap={"ncm": NCM_NS})
        fmt.text = "ncm:yang"
        _sub(sc, "namespace", ns)
        _sub(sc, "location", "NETCONF")
    sess = _sub(state, "sessions")
    for s in sessions:
        el = _sub(sess, "session")
        _sub(el, "session-id", str(s.session_id))
        tr = etree.SubElement(el, f"{{{NCM_NS}}}transport", nsmap={"ncm": NCM_NS})
        tr.text = "ncm:netconf-ssh"
        _sub(el, "username", s.username or "")
        if s.source_host:
            _sub(el, "source-host", s.source_host)
        _sub(el, "login-time", notify.format_time(s.login_time))
        for k, v in s.counters.items():
            _sub(el, k, str(v))
    st = _sub(state, "statistics")
    _sub(st, "netconf-start-time", notify.format_time(stats["start"]))
    for k in ("in-bad-hellos", "in-sessions", "dropped-sessions", "in-rpcs", "in-bad-rpcs", "out-rpc-errors", "out-notifications"):
        _sub(st, k, str(stats.get(k, 0)))
    return state


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
