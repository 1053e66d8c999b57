"""Subtree filtering (RFC 6241 section 6).

Works on XML alone: namespace selection, containment nodes, selection nodes and
content match nodes, with the RFC's sibling-set rules. List entries selected by a
content match keep their key leaves even when the filter does not ask for them, so
the reply stays addressable (as Netopeer2 and ConfD do).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable

from lxml import etree

KeyNames = Callable[[etree._Element], tuple[str, ...]]


def _matches(filter_el: etree._Element, data_el: etree._Element) -> bool:
    fq, dq = etree.QName(filter_el), etree.QName(data_el)
    if fq.localname != dq.localname:
        return False
    return not fq.namespace or fq.namespace == dq.namespace  # no namespace: all match


_QNAME = re.compile(r"^([A-Za-z_][\w.-]*):([A-Za-z_][\w.-]*)$")


def _qname(el: etree._Element, text: str) -> tuple[str, str] | None:
    """(namespace, name) of a prefixed value, its prefix resolved in `el`'s scope, as XML
    writes an identityref (RFC 7950 9.10.3); None when it is not one."""
    m = _QNAME.match(text)
    if m is None:
        return None
    ns = el.nsmap.get(m.group(1))
    return None if ns is None else (ns, m.group(2))


def _same_value(filter_el: etree._Element, data_el: etree._Element) -> bool:
    """A content match node's value equals the data's. Two prefixed values whose prefixes
    are both declared are identities (identityref): equal when they name the same one,
    each prefix resolved through its own element's namespace declarations (x:PHYS
    matches etsi-qkdn-types:PHYS when both prefixes name etsi-qkd-node-types, and not
    when they name different modules). Anything else compares as text."""
    f, d = (filter_el.text or "").strip(), (data_el.text or "").strip()
    fq, dq = _qname(filter_el, f), _qname(data_el, d)
    if fq is not None and dq is not None:
        return fq == dq
    return f == d


def _is_content_match(el: etree._Element) -> bool:
    return len(el) == 0 and bool((el.text or "").strip())


def _children(el: etree._Element) -> list[etree._Element]:
    return [c for c in el if isinstance(c.tag, str)]


def apply(data: Iterable[etree._Element], filter_el: etree._Element | None, key_names: KeyNames | None = None) -> list[etree._Element]:
    """Top-level elements of `data` that `filter_el` (the <filter> element) selects."""
    data = list(data)
    if filter_el is None:
        return [copy.deepcopy(d) for d in data]
    out: list[etree._Element] = []
    for f in _children(filter_el):
        for d in data:
            if not _matches(f, d):
                continue
            if _is_content_match(f):
                if _same_value(f, d):
                    out.append(copy.deepcopy(d))
            elif len(f) == 0:
                out.append(copy.deepcopy(d))
            else:
                kids = _filter_children(d, f, key_names)
                if kids:
                    shell = _shell(d)
                    shell.extend(kids)
                    out.append(shell)
    return _dedupe(out)


def _shell(el: etree._Element) -> etree._Element:
    new = etree.Element(el.tag, attrib=dict(el.attrib), nsmap=el.nsmap)
    new.text = None
    return new


def _filter_children(data: etree._Element, filt: etree._Element, key_names: KeyNames | None) -> list[etree._Element] | None:
    """Selected children of `data` under filter node `filt`; None when a content
    match fails (the whole `data` entry is then left out)."""
    fkids = _children(filt)
    dkids = _children(data)
    content = [f for f in fkids if _is_content_match(f)]
    others = [f for f in fkids if not _is_content_match(f)]
    matched_content: list[etree._Element] = []
    for f in content:
        hits = [d for d in dkids if _matches(f, d) and _same_value(f, d)]
        if not hits:
            return None
        matched_content.extend(hits)
    if not others:
        return [copy.deepcopy(d) for d in dkids]  # only content matches: the whole entry
    out = [copy.deepcopy(d) for d in matched_content]
    for f in others:
        for d in dkids:
            if not _matches(f, d):
                continue
            if len(f) == 0:  # selection node
                out.append(copy.deepcopy(d))
                continue
            sub = _filter_children(d, f, key_names)
            if sub:
                shell = _shell(d)
                keys = key_names(d) if key_names else ()
                have = {etree.QName(s).localname for s in sub}
                for k in keys:
                    if k not in have:
                        kel = d.find(f"{{{etree.QName(d).namespace}}}{k}")
                        if kel is not None:
                            shell.append(copy.deepcopy(kel))
                shell.extend(sub)
                out.append(shell)
    if not out:
        return []
    return _dedupe(out)


def _dedupe(els: list[etree._Element]) -> list[etree._Element]:
    """One output element per data element when several filter nodes select it."""
    seen: set[bytes] = set()
    out = []
    for el in els:
        key = etree.tostring(el, method="c14n")
        if key not in seen:
            seen.add(key)
            out.append(el)
    return out
