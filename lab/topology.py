"""Lab topology files: parse and validate, with no side effects.

A lab file is an instance of the `sdqkd-lab` YANG module, RFC 7951 JSON or XML.
`load()` validates it with libyang (sdqkd.yangdata), so YANG types, patterns, ranges,
mandatory leaves, `when`, min/max-elements and unknown members are refused as the agents
refuse them, and returns the RFC 7951 dict libyang re-encodes.
`check()` then runs an ordered list of small named semantic checks (pyang's validation
phases, Faucet's check_config) that *collect* every problem with a path to the node at
fault, so a file is fixed in one go. `sdqkd lab check FILE` prints them.

Paths are RFC 7951 instance identifiers: `/sdqkd-lab:lab/link[name='x']/path`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.qkdprofile import QkdProfile, identity_name
from sdqkd.lab.plan import ETSI004_JSON_OFFSET, node_id

MODULE = "sdqkd-lab"
ROOT = f"/{MODULE}:lab"
_EPS = 1e-6


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a lab file: where, what, and which check found it."""

    path: str
    message: str
    check: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class TopologyError(Exception):
    """A lab file that cannot be used; `problems` lists every reason found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- parse ----------------------------------------------------------------------------------


def _no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"member '{key}' appears twice in one object (RFC 7951 forbids it)")
        out[key] = value
    return out


def _xml_elements(text: bytes) -> list[etree._Element]:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True)
    root = etree.fromstring(text, parser)
    ns = yangdata.namespace_of(MODULE)
    if etree.QName(root).namespace == ns:
        return [root]
    return [el for el in root if isinstance(el.tag, str)]  # wrapped in <data> or <config>


def decode(data: Mapping[str, Any] | list[etree._Element]) -> dict[str, Any]:
    """Validate RFC 7951 JSON (a dict) or XML elements with libyang; RFC 7951 back.

    libyang 2.1 stops at the first YANG violation, so this reports one at a time."""
    try:
        if isinstance(data, Mapping):
            doc = yangdata.validate_json(dict(data))
        else:
            doc = yangdata.validate_elements(data)
    except yangdata.YangError as exc:
        raise TopologyError([Problem(p.path or ROOT, p.message, "yang") for p in exc.problems]) from None
    return doc.json


def load(path: str | Path) -> dict[str, Any]:
    """Read a lab file (JSON, or XML when it starts with '<'); YANG types enforced.

    Raises TopologyError for a file that cannot be read or decoded. Semantic checks are
    separate: call check() on the result (or load_valid())."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TopologyError([Problem("", f"cannot read: {exc.strerror or exc}", "parse")]) from None
    try:
        if raw.lstrip().startswith(b"<"):
            return decode(_xml_elements(raw))
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_members)
    except (ValueError, etree.XMLSyntaxError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise TopologyError([Problem("", f"not a JSON or XML instance: {exc}", "parse")]) from None
    if not isinstance(data, dict):
        raise TopologyError([Problem("", "a JSON object is expected", "parse")])
    return resolve_device_files(decode(data), path.parent)


DEVICE_FILES = ("ca-certificate", "certificate", "private-key")  # a real device's mutual TLS


def resolve_device_files(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative certificate and key paths of real devices, made absolute from the topology
    file's folder: the lab keeps a copy of the topology elsewhere, and agents start elsewhere."""
    for node in _entries(_lab(data), "node"):
        for qi in _entries(node, "qkd-interface"):
            dev = qi.get("device")
            if isinstance(dev, dict):
                for leaf in DEVICE_FILES:
                    if isinstance(dev.get(leaf), str) and dev[leaf] and not Path(dev[leaf]).is_absolute():
                        dev[leaf] = str((base / dev[leaf]).resolve())
    return data


def load_valid(path: str | Path) -> dict[str, Any]:
    """load() + check(): the topology, or TopologyError with every problem (lab up)."""
    data = load(path)
    problems = check(data)
    if problems:
        raise TopologyError(problems)
    return data


# --- index ------------------------------------------------------------------------------------


def _lab(data: Mapping[str, Any]) -> Mapping[str, Any]:
    lab = data.get(f"{MODULE}:lab", data)
    return lab if isinstance(lab, Mapping) else {}


def _entries(obj: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = obj.get(name)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _sub(obj: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A container member, or {} when absent or not an object."""
    value = obj.get(name)
    return value if isinstance(value, Mapping) else {}


def _seq(obj: Mapping[str, Any], name: str) -> list[Any]:
    """A leaf-list member, or [] when absent or not an array."""
    value = obj.get(name)
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    try:
        return float(Decimal(str(value)))
    except (InvalidOperation, ValueError, TypeError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (ValueError, TypeError):
        return None


def _q(value: Any) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


class _Index:
    """Name -> entry maps of one lab (the first entry wins on duplicates; yang-constraints
    reports those)."""

    def __init__(self, lab: Mapping[str, Any]) -> None:
        self.lab = lab
        self.domains = self._by_name(lab, "domain")
        self.profiles = self._by_name(lab, "profile")
        self.nodes = self._by_name(lab, "node")
        self.switches = self._by_name(lab, "switch")
        self.fibres = self._by_name(lab, "fibre")
        self.links = self._by_name(lab, "link")
        self.ifaces: dict[tuple[str, int], dict[str, Any]] = {}
        for node in self.nodes.values():
            for qi in _entries(node, "qkd-interface"):
                qid = _int(qi.get("id"))
                if qid is not None:
                    self.ifaces.setdefault((node["name"], qid), qi)
        self.physics: dict[str, QkdProfile] = {}
        for name, entry in self.profiles.items():
            try:
                self.physics[name] = QkdProfile.from_dict(entry)
            except (ValueError, TypeError):
                pass  # reported by the profiles check

    @staticmethod
    def _by_name(lab: Mapping[str, Any], name: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for e in _entries(lab, name):
            if isinstance(e.get("name"), str):
                out.setdefault(e["name"], e)
        return out

    def endpoint(self, text: Any) -> tuple[str, int] | None:
        node, sep, qkdi = str(text).rpartition(":")
        qid = _int(qkdi)
        return (node, qid) if sep and qid is not None else None

    def profile_of(self, end: tuple[str, int]) -> QkdProfile | None:
        qi = self.ifaces.get(end)
        return self.physics.get(str(qi.get("profile"))) if qi else None

    def link_channel(self, link: Mapping[str, Any]) -> int | None:
        """DWDM channel of a fixed link: its own, else a fixed channel of an endpoint."""
        ch = _int(link.get("channel"))
        if ch is not None:
            return ch
        for ep in _seq(link, "endpoints"):
            end = self.endpoint(ep)
            qi = self.ifaces.get(end) if end else None
            if qi is not None and _int(qi.get("channel")) is not None:
                return _int(qi.get("channel"))
        return None

    def computed_loss(self, link: Mapping[str, Any]) -> float | None:
        """Fibre losses of the path plus a switch where consecutive fibres meet at one (as the plant)."""
        path = [self.fibres.get(str(f)) for f in _seq(link, "path")]
        if not path or any(f is None for f in path):
            return None
        loss = sum(_num(f.get("loss")) or 0.0 for f in path)  # type: ignore[union-attr]
        for f1, f2 in zip(path, path[1:]):
            common = _switches_of(f1) & _switches_of(f2)  # type: ignore[arg-type]
            if common:
                loss += _num(self.switches.get(sorted(common)[0], {}).get("insertion-loss", "1.0")) or 0.0
        return loss

    def link_loss(self, link: Mapping[str, Any]) -> float | None:
        stated = _num(link.get("loss")) if link.get("loss") is not None else None
        return stated if stated is not None else self.computed_loss(link)


def _switches_of(fibre: Mapping[str, Any]) -> set[str]:
    return {str(e.get("switch")) for e in (_sub(fibre, "a-end"), _sub(fibre, "b-end")) if e.get("switch")}


def _at(kind: str, name: Any, *rest: str) -> str:
    """Instance identifier of a top-level list entry (and below): /sdqkd-lab:lab/link[name='x']/path."""
    return "/".join([f"{ROOT}/{kind}[name={_q(name)}]", *rest])


def _iface_at(node: str, qid: Any, *rest: str) -> str:
    return "/".join([_at("node", node), f"qkd-interface[id={_q(qid)}]", *rest])


Found = Iterator[tuple[str, str]]  # (path, message) yielded by a check


# --- checks -----------------------------------------------------------------------------------
# Each check gets the lab object and its index and yields (path, message). They run in
# order and never stop at the first problem; references that do not resolve are reported
# once (by `references`/`endpoints`) and skipped by the later checks.


def check_nodes(lab: Mapping[str, Any], ix: _Index) -> Found:
    """A lab runs one agent per node: it needs at least one; names are directory names,
    so they must differ in more than case."""
    if not ix.nodes:
        yield f"{ROOT}/node", "a lab needs at least one node"
    seen: dict[str, str] = {}
    for name in ix.nodes:
        if name.lower() in seen:
            yield _at("node", name, "name"), f"differs from node {_q(seen[name.lower()])} only in case"
        seen.setdefault(name.lower(), name)


def check_references(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Every leafref-like name resolves: profiles, domains, switches, nodes, fibres."""
    def ref(value: Any, table: dict[str, Any], what: str, path: str) -> Found:
        if value is not None and str(value) not in table:
            yield path, f"{what} {_q(value)} is not defined"

    for node in ix.nodes.values():
        yield from ref(node.get("domain"), ix.domains, "domain", _at("node", node["name"], "domain"))
        host = _sub(node, "host")
        saes = {str(s.get("id")): s for s in _entries(node, "sae")}
        yield from ref(host.get("sae"), saes, "SAE of this node", _at("node", node["name"], "host", "sae"))
        for qi in _entries(node, "qkd-interface"):
            ipath = _iface_at(node["name"], qi.get("id"))
            yield from ref(qi.get("profile"), ix.profiles, "profile", f"{ipath}/profile")
            att = _sub(qi, "attachment")
            yield from ref(att.get("switch"), ix.switches, "switch", f"{ipath}/attachment/switch")
    for sw in ix.switches.values():
        yield from ref(sw.get("node"), ix.nodes, "node", _at("switch", sw["name"], "node"))
    for fibre in ix.fibres.values():
        yield from ref(fibre.get("domain"), ix.domains, "domain", _at("fibre", fibre["name"], "domain"))
        for end in ("a-end", "b-end"):
            e = _sub(fibre, end)
            yield from ref(e.get("node"), ix.nodes, "node", _at("fibre", fibre["name"], end, "node"))
            yield from ref(e.get("switch"), ix.switches, "switch", _at("fibre", fibre["name"], end, "switch"))
    for link in ix.links.values():
        yield from ref(link.get("domain"), ix.domains, "domain", _at("link", link["name"], "domain"))
        for f in _seq(link, "path"):
            yield from ref(f, ix.fibres, "fibre", _at("link", link["name"], "path"))


def check_profiles(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Profiles become emulator physics (QkdProfile); what it refuses, the lab refuses."""
    for name, entry in ix.profiles.items():
        try:
            QkdProfile.from_dict(entry)
        except ValueError as exc:
            yield _at("profile", name), str(exc).split(": ", 1)[-1]
        except TypeError:  # a leaf present as null: from_dict does not count it as missing
            yield _at("profile", name), "a mandatory leaf has no value"


def check_endpoints(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Endpoints 'node:qkdi' name existing interfaces on two different nodes, and each
    interface is in at most one fixed link (one module, one quantum channel); a module
    patched into a switch gets its links from the controller, not from a fixed link."""
    used: dict[tuple[str, int], str] = {}
    for link in ix.links.values():
        path = _at("link", link["name"], "endpoints")
        ends = []
        for ep in _seq(link, "endpoints"):
            end = ix.endpoint(ep)
            if end is None or end[0] not in ix.nodes:
                yield path, f"endpoint {_q(ep)}: no node {_q(end[0] if end else ep)}"
                continue
            if end not in ix.ifaces:
                yield path, f"endpoint {_q(ep)}: node {_q(end[0])} has no qkd-interface {end[1]}"
                continue
            ends.append(end)
            if end in used:
                yield path, f"endpoint {_q(ep)} is already in link {_q(used[end])}"
            else:
                used[end] = link["name"]
            if _sub(ix.ifaces[end], "attachment").get("switch"):
                yield path, (f"endpoint {_q(ep)} is patched into switch "
                             f"{_q(ix.ifaces[end]['attachment']['switch'])}: switched links are made by the controller")
        if len(ends) == 2 and ends[0][0] == ends[1][0]:
            yield path, f"both endpoints are on node {_q(ends[0][0])}"


def check_link_paths(lab: Mapping[str, Any], ix: _Index) -> Found:
    """A fixed link names the fibres it crosses, in order from the first endpoint to the second."""
    for link in ix.links.values():
        ends = [ix.endpoint(ep) for ep in _seq(link, "endpoints")]
        if len(ends) != 2 or any(e not in ix.ifaces for e in ends):
            continue  # reported by endpoints
        path = [str(f) for f in _seq(link, "path")]
        at = _at("link", link["name"], "path")
        if not path:
            yield at, "a fixed link needs the fibres it crosses (path)"
            continue
        if any(f not in ix.fibres for f in path):
            continue
        start, goal = ends[0][0], ends[1][0]  # type: ignore[index]
        here = start
        for name in path:
            fibre = ix.fibres[name]
            a, b = _sub(fibre, "a-end").get("node"), _sub(fibre, "b-end").get("node")
            if here not in (a, b):
                yield at, (f"fibre {_q(name)} ({a}-{b}) does not leave {here}: "
                           f"the path must run from {start} to {goal}")
                break
            here = b if here == a else a
        else:
            if here != goal:
                yield at, f"the path ends at {here}, not at the second endpoint's node {goal}"


def check_switch_ports(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Interfaces and fibre ends patched into a switch: at that switch's site, on a port the
    switch has, one thing per port."""
    users: dict[tuple[str, int], str] = {}

    def port(switch: str, p: Any, node: Any, who: str, path: str) -> Found:
        sw = ix.switches.get(switch)
        if sw is None:
            return
        if node is not None and sw.get("node") not in (None, node):
            yield path, f"switch {_q(switch)} is at {sw.get('node')}, not at {node}"
        n, num = _int(sw.get("ports")), _int(p)
        if num is None:
            yield path, f"{who} is patched into switch {_q(switch)} without a port"
            return
        if n is not None and not 1 <= num <= n:
            yield path, f"switch {_q(switch)} has no port {num} (ports 1..{n})"
        elif (switch, num) in users:
            yield path, f"switch {_q(switch)} port {num} is already used by {users[(switch, num)]}"
        else:
            users[(switch, num)] = who

    for (node, qid), qi in ix.ifaces.items():
        att = _sub(qi, "attachment")
        if att.get("switch"):
            yield from port(str(att["switch"]), att.get("port"), node, f"qkd-interface {node}:{qid}",
                            _iface_at(node, qid, "attachment"))
    for fibre in ix.fibres.values():
        mux = {_int(m) for m in _seq(fibre, "mux-channel")} - {None}
        for end in ("a-end", "b-end"):
            e = _sub(fibre, end)
            if not e.get("switch"):
                continue
            at = _at("fibre", fibre["name"], end)
            muxed = _entries(e, "mux-port")
            if muxed and e.get("port") is not None:
                yield f"{at}/port", "an end with mux ports lands on them: leave 'port' out"
            for m in muxed:
                who = f"fibre {_q(fibre['name'])} {end} mux port"
                yield from port(str(e["switch"]), m.get("port"), e.get("node"), who, f"{at}/mux-port[port={_q(m.get('port'))}]")
                extra = sorted({_int(c) for c in _seq(m, "channel")} - {None} - mux) if mux else []
                if extra:
                    yield (f"{at}/mux-port[port={_q(m.get('port'))}]/channel",
                           f"channels {extra} are not among the fibre's mux-channel {sorted(mux)}")  # type: ignore[type-var]
            if not muxed:
                yield from port(str(e["switch"]), e.get("port"), e.get("node"), f"fibre {_q(fibre['name'])} {end}", at)


def check_roles(lab: Mapping[str, Any], ix: _Index) -> Found:
    """An interface's role is one its profile supports; a fixed link goes transmitter -> receiver
    between modules of the same technology and band."""
    for (node, qid), qi in ix.ifaces.items():
        prof, role = ix.profile_of((node, qid)), qi.get("role")
        if prof is not None and role and not prof.supports_role(str(role)):
            yield (_iface_at(node, qid, "role"),
                   f"profile {_q(prof.name)} supports {prof.role_support}, not {identity_name(role)}")
    for link in ix.links.values():
        ends = [ix.endpoint(ep) for ep in _seq(link, "endpoints")]
        if len(ends) != 2 or any(e not in ix.ifaces for e in ends):
            continue
        at = _at("link", link["name"], "endpoints")
        for ep, end, which, want in zip(_seq(link, "endpoints"), ends, ("first", "second"), ("TRANSMITTER", "RECEIVER")):
            role = identity_name(ix.ifaces[end].get("role") or "TRANSCEIVER")  # type: ignore[index]
            if role not in (want, "TRANSCEIVER"):
                yield at, f"{_q(ep)} is the {which} endpoint ({want.lower()}) but its role is {role}"
        p1, p2 = ix.profile_of(ends[0]), ix.profile_of(ends[1])  # type: ignore[arg-type]
        if p1 is not None and p2 is not None:
            if p1.technology != p2.technology:
                t1, t2 = identity_name(p1.technology), identity_name(p2.technology)
                yield at, f"endpoints differ in technology: {t1} vs {t2}"
            if p1.band != p2.band:
                yield at, f"endpoints differ in band: {p1.band} vs {p2.band}"


def check_loss(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Link loss and expected-skr sane: the loss fits every endpoint profile's max-absorption
    (the receiver's budget; the emulator calibrates both ends at it), a stated loss is not
    below its own fibres, and a measured rate comes with the loss it was measured at."""
    for link in ix.links.values():
        name = link["name"]
        loss = ix.link_loss(link)
        fibres = ix.computed_loss(link)
        if link.get("loss") is not None and fibres is not None and loss is not None and loss + _EPS < fibres:
            yield _at("link", name, "loss"), f"loss {loss:g} dB is less than its path's {fibres:g} dB"
        if loss is not None:
            for ep, role in zip(_seq(link, "endpoints"), ("transmitter", "receiver")):
                end = ix.endpoint(ep)
                prof = ix.profile_of(end) if end else None
                if prof is not None and loss > prof.max_absorption + _EPS:
                    yield (_at("link", name, "loss" if link.get("loss") is not None else "path"),
                           f"loss {loss:g} dB is over the max-absorption {prof.max_absorption:g} dB of the "
                           f"{role} {ep} (profile {_q(prof.name)})")
        skr = link.get("expected-skr")
        if skr is not None:
            if (_num(skr) or 0.0) <= 0:
                yield _at("link", name, "expected-skr"), "a measured key rate must be > 0 (leave it out when unknown)"
            if link.get("loss") is None:
                yield _at("link", name, "expected-skr"), "expected-skr needs the loss it was measured at (leaf 'loss')"


def check_channels(lab: Mapping[str, Any], ix: _Index) -> Found:
    """DWDM channels where they belong: a C-band fixed link has one, within both modules'
    wavelength-range and equal to any fixed module channel; O-band modules have none."""
    for (node, qid), qi in ix.ifaces.items():
        prof, ch = ix.profile_of((node, qid)), _int(qi.get("channel"))
        if prof is None or ch is None:
            continue
        if prof.band != "C-band":
            yield _iface_at(node, qid, "channel"), f"profile {_q(prof.name)} is {prof.band}: no DWDM channel"
        elif not prof.supports_channel(ch):
            yield (_iface_at(node, qid, "channel"),
                   f"channel {ch} is outside {_q(prof.name)}'s wavelength-range {prof.wavelength_range}")
    for link in ix.links.values():
        ends = [e for e in (ix.endpoint(ep) for ep in _seq(link, "endpoints")) if e in ix.ifaces]
        profs = [p for p in (ix.profile_of(e) for e in ends) if p is not None]
        if not profs or any(p.band != "C-band" for p in profs):
            continue
        at = _at("link", link["name"], "channel")
        own = _int(link.get("channel"))
        ch = ix.link_channel(link)
        if ch is None:
            yield at, "a C-band quantum channel needs its DWDM channel (leaf 'channel')"
            continue
        for end in ends:
            fixed = _int(ix.ifaces[end].get("channel"))
            if own is not None and fixed is not None and fixed != own:
                yield at, f"channel {own} differs from the fixed channel {fixed} of {end[0]}:{end[1]}"
        for prof in profs:
            if not prof.supports_channel(ch):
                yield at, f"channel {ch} is outside {_q(prof.name)}'s wavelength-range {prof.wavelength_range}"


def check_coexistence(lab: Mapping[str, Any], ix: _Index) -> Found:
    """No C-band quantum channel on, or next to, a classical channel of a fibre it crosses,
    nor on a channel the fibre's fixed muxes block, nor on a channel another fixed link
    already uses there; fibres with muxes keep classical light off and beside the mux
    channels, which carry the switched quantum signals. O-band quantum channels are safe."""
    taken: dict[tuple[str, int], str] = {}
    for link in ix.links.values():
        ends = [e for e in (ix.endpoint(ep) for ep in _seq(link, "endpoints")) if e in ix.ifaces]
        profs = [ix.profile_of(e) for e in ends]
        ch = ix.link_channel(link)
        if ch is None or not profs or any(p is None or p.band != "C-band" for p in profs):
            continue
        at = _at("link", link["name"])
        for fname in _seq(link, "path"):
            fibre = ix.fibres.get(str(fname))
            if fibre is None:
                continue
            for cc in _entries(fibre, "classical-channel"):
                cch = _int(cc.get("channel"))
                if cc.get("band", "C-band") != "C-band" or cch is None:
                    continue
                if abs(cch - ch) <= 1:
                    where = "on" if cch == ch else "next to"
                    yield at, (f"quantum channel {ch} is {where} classical channel {_q(cc.get('name'))} "
                               f"({cch}) of fibre {_q(fname)}")
            mux = sorted({_int(m) for m in _seq(fibre, "mux-channel")} - {None})  # type: ignore[type-var]
            if mux and ch not in mux:
                passed = ", ".join(map(str, mux))
                yield at, f"quantum channel {ch} is blocked by the muxes of fibre {_q(fname)} (they pass {passed})"
            if (str(fname), ch) in taken:
                other = taken[(str(fname), ch)]
                yield at, f"quantum channel {ch} on fibre {_q(fname)} is already used by link {_q(other)}"
            taken.setdefault((str(fname), ch), link["name"])
    for fibre in ix.fibres.values():
        mux = {_int(m) for m in _seq(fibre, "mux-channel")} - {None}
        for cc in _entries(fibre, "classical-channel"):
            cch = _int(cc.get("channel"))
            if cc.get("band", "C-band") != "C-band" or cch is None:
                continue
            near = sorted(m for m in mux if abs(m - cch) <= 1)  # type: ignore[operator]
            if near:
                yield (_at("fibre", fibre["name"], f"classical-channel[name={_q(cc.get('name'))}]"),
                       f"classical channel {cch} is on or next to mux channel {near[0]}, kept for quantum signals")


def check_identities(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Who is who across the lab: an SAE belongs to one node (ETSI 014 routes by SAE ID) and
    qkdn_ids differ (given, or derived from lab and node name as the lab plan does)."""
    saes: dict[str, str] = {}
    ids: dict[str, str] = {}
    lab_name = lab.get("name") or "lab"
    for node in ix.nodes.values():
        for sae in _entries(node, "sae"):
            sid = str(sae.get("id"))
            if sid in saes and saes[sid] != node["name"]:
                yield (_at("node", node["name"], f"sae[id={_q(sid)}]"),
                       f"SAE {_q(sid)} is also attached to node {_q(saes[sid])}")
            saes.setdefault(sid, node["name"])
        qid = node_id(lab_name, node)
        if qid in ids:
            yield _at("node", node["name"], "qkdn-id"), f"qkdn-id {qid} is also node {_q(ids[qid])}'s"
        ids.setdefault(qid, node["name"])


def check_qrng(lab: Mapping[str, Any], ix: _Index) -> Found:
    """An emulated QRNG is modelled at a rate: it needs one."""
    for node in ix.nodes.values():
        qrng = node.get("qrng")
        emulated = isinstance(qrng, Mapping) and qrng.get("source", "emulated") == "emulated"
        if emulated and not (_int(qrng.get("rate")) or 0) > 0:  # type: ignore[union-attr]
            yield _at("node", node["name"], "qrng", "rate"), "an emulated QRNG needs its rate (bit/s)"


def _device_file(leaf: str, value: Any) -> str | None:
    """Why a device's certificate, CA or key file cannot serve the agent, or None. The key
    must be its owner's alone, as every key file the lab writes."""
    path = Path(str(value))
    try:
        mode = path.stat().st_mode
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"{leaf} {_q(value)} cannot be read: {exc.strerror or exc}"
    if not path.is_file():
        return f"{leaf} {_q(value)} is not a file"
    if leaf == "private-key" and mode & 0o077:
        return f"private-key {_q(value)} is open to others (mode {mode & 0o777:o}): chmod 600 it"
    return None


def check_devices(lab: Mapping[str, Any], ix: _Index) -> Found:
    """A real device (an interface's `device`) is reached over its ETSI 014 API with mutual
    TLS: an https URL, two different SAE IDs, a CA, a client certificate and a private key
    (readable, the key private). Its link is fixed (the device pairs with one peer device),
    so it is in one link and in no switch."""
    linked = {ix.endpoint(ep) for link in ix.links.values() for ep in _seq(link, "endpoints")}
    for (node, qid), qi in ix.ifaces.items():
        dev = _sub(qi, "device")
        if not qi.get("device"):
            continue
        at = _iface_at(node, qid, "device")
        if not str(dev.get("url", "")).lower().startswith("https://"):
            yield f"{at}/url", f"url {_q(dev.get('url'))}: a device's ETSI 014 API is https://host:port"
        if dev.get("sae-id") == dev.get("peer-sae-id"):
            yield f"{at}/peer-sae-id", f"peer-sae-id is this end's own sae-id {_q(dev.get('sae-id'))}"
        for leaf in DEVICE_FILES:
            if not dev.get(leaf):
                yield f"{at}/{leaf}", f"a device needs its {leaf} (PEM file) for the agent's mutual TLS with it"
                continue
            why = _device_file(leaf, dev[leaf])
            if why:
                yield f"{at}/{leaf}", why
        if _sub(qi, "attachment").get("switch"):
            yield (_iface_at(node, qid, "attachment"),
                   "a real device pairs with one peer device: its link is fixed, not switched")
        elif (node, qid) not in linked:
            yield at, "a real device needs the link to its peer device (a link with both as endpoints)"


def check_device_links(lab: Mapping[str, Any], ix: _Index) -> Found:
    """Both ends of a link are emulated, or both are real devices of one pair: each end's
    sae-id is the other's peer-sae-id (the devices' key stream joins those two SAEs)."""
    for link in ix.links.values():
        eps = [str(ep) for ep in _seq(link, "endpoints")]
        ends = [ix.endpoint(ep) for ep in eps]
        if len(ends) != 2 or any(e not in ix.ifaces for e in ends):
            continue
        devs = [_sub(ix.ifaces[e], "device") if ix.ifaces[e].get("device") else None for e in ends]  # type: ignore[index]
        at = _at("link", link["name"], "endpoints")
        if (devs[0] is None) != (devs[1] is None):
            real, emu = (eps[0], eps[1]) if devs[0] is not None else (eps[1], eps[0])
            yield at, (f"{_q(real)} is a real device but {_q(emu)} is emulated: "
                       "both ends of a link are real devices of one pair, or both emulated")
        elif devs[0] is not None and devs[1] is not None:
            a, b = devs
            if a.get("sae-id") == a.get("peer-sae-id") or b.get("sae-id") == b.get("peer-sae-id"):
                continue  # reported by devices
            if a.get("sae-id") != b.get("peer-sae-id") or a.get("peer-sae-id") != b.get("sae-id"):
                yield at, (f"the devices are not one pair: {_q(eps[0])} is SAE {_q(a.get('sae-id'))} towards "
                           f"{_q(a.get('peer-sae-id'))}, {_q(eps[1])} is SAE {_q(b.get('sae-id'))} towards "
                           f"{_q(b.get('peer-sae-id'))}")


def check_ports(lab: Mapping[str, Any], ix: _Index) -> Found:
    """The lab's fixed port ranges (one NETCONF, KMS, ETSI 004 JSON and relay port per node, one service
    port per QKD interface from relay base + 100, one ETSI 004 binary port per node from
    relay base + 200, the controller's gRPC port) fit and do not overlap."""
    d = _sub(lab, "defaults")
    n, m = len(ix.nodes), len(ix.ifaces)
    relay = _int(d.get("relay-port-base", 8500)) or 8500
    kms = _int(d.get("kms-port-base", 8400)) or 8400
    ranges = {
        "netconf-port-base": (_int(d.get("netconf-port-base", 8300)) or 8300, n),
        "kms-port-base": (kms, n),
        f"ETSI 004 JSON ports (kms-port-base + {ETSI004_JSON_OFFSET})": (kms + ETSI004_JSON_OFFSET, n),
        "relay-port-base": (relay, n),
        "service ports (relay-port-base + 100)": (relay + 100, m),
        "ETSI 004 binary ports (relay-port-base + 200)": (relay + 200, n),
        "controller-grpc-port": (_int(d.get("controller-grpc-port", 50051)) or 50051, 1),
    }
    items = [(k, lo, lo + cnt - 1) for k, (lo, cnt) in ranges.items() if cnt > 0]
    for k, lo, hi in items:
        if hi > 65535:
            yield f"{ROOT}/defaults", f"{k}: ports {lo}..{hi} go past 65535"
    for i, (k1, lo1, hi1) in enumerate(items):
        for k2, lo2, hi2 in items[i + 1:]:
            if lo1 <= hi2 and lo2 <= hi1:
                yield f"{ROOT}/defaults", f"{k1} ({lo1}..{hi1}) overlaps {k2} ({lo2}..{hi2})"


def check_key_links(lab: Mapping[str, Any], ix: _Index) -> Found:
    """A key link joins two SAEs of the lab on different nodes that serve applications, and
    names a pair no other key link names (either way round: one application per pair)."""
    sae_node = {str(s.get("id")): n for n in ix.nodes.values() for s in _entries(n, "sae")}
    pairs: dict[frozenset[str], str] = {}
    for kl in _entries(lab, "key-link"):
        at = _at("key-link", kl.get("name"))
        ends = []
        for leaf in ("master-sae", "slave-sae"):
            sae = kl.get(leaf)
            node = sae_node.get(str(sae))
            if sae is not None and node is None:
                yield f"{at}/{leaf}", f"SAE {_q(sae)} is not attached to any node"
            elif node is not None and node.get("kms") is False:
                yield f"{at}/{leaf}", f"SAE {_q(sae)} is on relay-only node {_q(node['name'])}"
            ends.append(node)
        if all(ends) and ends[0] is ends[1]:
            yield at, f"both SAEs are on node {_q(ends[0]['name'])}: its LKMS serves them without a key link"
            continue
        pair = frozenset(str(kl.get(x)) for x in ("master-sae", "slave-sae"))
        if all(ends) and pair in pairs:
            yield at, f"key link {_q(pairs[pair])} already joins these SAEs"
        pairs.setdefault(pair, str(kl.get("name")))


CHECKS: tuple[tuple[str, Callable[[Mapping[str, Any], _Index], Found]], ...] = (
    ("nodes", check_nodes),
    ("references", check_references),
    ("profiles", check_profiles),
    ("endpoints", check_endpoints),
    ("link-paths", check_link_paths),
    ("switch-ports", check_switch_ports),
    ("roles", check_roles),
    ("loss", check_loss),
    ("channels", check_channels),
    ("coexistence", check_coexistence),
    ("identities", check_identities),
    ("qrng", check_qrng),
    ("devices", check_devices),
    ("device-links", check_device_links),
    ("ports", check_ports),
    ("key-links", check_key_links),
)


def check(data: Mapping[str, Any]) -> list[Problem]:
    """Every semantic problem of a decoded topology ({'sdqkd-lab:lab': {...}} or the lab
    object), in check order; empty when the lab can be brought up."""
    lab = _lab(data)
    ix = _Index(lab)
    return [Problem(path, msg, name) for name, fn in CHECKS for path, msg in fn(lab, ix)]


def summary(data: Mapping[str, Any]) -> str:
    """'9 nodes, 8 links, 15 fibres, 7 switches, 26 qkd-interfaces, 2 domains' for `lab check`
    (and the key links when there are some)."""
    lab = _lab(data)
    ix = _Index(lab)
    parts = [(len(ix.nodes), "node", "nodes"), (len(ix.links), "link", "links"),
             (len(ix.fibres), "fibre", "fibres"), (len(ix.switches), "switch", "switches"),
             (len(ix.ifaces), "qkd-interface", "qkd-interfaces"), (len(ix.domains), "domain", "domains")]
    key_links = len(_entries(lab, "key-link"))
    if key_links:
        parts.append((key_links, "key link", "key links"))
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in parts)
