"""RFC 8040 section 3.5.3 api-paths: `/module:node/child=key1,key2/...` with each key value
percent-encoded, resolved against the schema (libyang's, through sdqkd.yangdata), and the
RFC 7951 JSON and XML shapes a path stands for."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import errors as nc
from sdqkd.agents.restconf.errors import RestconfError, fail
from sdqkd.yangdata import SchemaNode

_IDENT = re.compile(r"^(?:([A-Za-z_][\w.-]*):)?([A-Za-z_][\w.-]*)$")


@dataclass(frozen=True)
class Step:
    """One api-path segment: its schema node, and its key values for a list entry (the
    value for a leaf-list entry), as the URI gave them (decoded)."""

    node: SchemaNode
    keys: tuple[str, ...] | None

    def member(self, parent: SchemaNode | None) -> str:
        """Its RFC 7951 member name below `parent` (qualified at the top, or where the module changes)."""
        return qualified(self.node, parent)

    def segment(self, parent: SchemaNode | None) -> str:
        name = self.member(parent)
        if self.keys is None:
            return name
        return name + "=" + ",".join(quote(k, safe="") for k in self.keys)


def qualified(node: SchemaNode, parent: SchemaNode | None) -> str:
    return node.name if parent is not None and parent.module == node.module else f"{node.module}:{node.name}"


def module_of_namespace(namespace: str) -> str | None:
    return yangdata.namespaces().get(namespace)


def parse(raw: str) -> list[Step]:
    """The steps of an api-path (the part after {+restconf}/data/, still percent-encoded);
    400 invalid-value for one the schema does not have (RFC 8040 3.5.3)."""
    steps: list[Step] = []
    parent: SchemaNode | None = None
    for segment in raw.split("/"):
        name_part, eq, key_part = segment.partition("=")
        m = _IDENT.match(unquote(name_part))
        if not m:
            raise _bad(f"'{unquote(segment)}' is not an api-identifier")
        module, name = m.group(1), m.group(2)
        if parent is None:
            if module is None:
                raise _bad(f"the first step '{name}' needs its module name (module:node)")
            node = yangdata.module_top(module, name)
        else:
            if parent.keyword not in ("container", "list"):
                raise _bad(f"'{parent.name}' has no child nodes")
            ns = yangdata.namespace_of(module) if module else parent.namespace
            node = parent.child(ns, name) if ns else None
        if node is None:
            raise _bad(f"no data node '{unquote(segment)}' here", unknown=True)
        keys: tuple[str, ...] | None = None
        if node.keyword == "list":
            if not eq:
                raise _bad(f"list '{name}' needs its key values ({','.join(node.keys)})")
            keys = tuple(unquote(k) for k in key_part.split(","))
            if len(keys) != len(node.keys):
                raise _bad(f"list '{name}' has {len(node.keys)} key(s) ({','.join(node.keys)}), {len(keys)} given")
        elif node.keyword == "leaf-list":
            if eq:
                keys = (unquote(key_part),)
        elif eq:
            raise _bad(f"'{name}' is a {node.keyword}: it takes no key")
        steps.append(Step(node, keys))
        parent = node
    return steps


def _bad(message: str, *, unknown: bool = False) -> RestconfError:
    return fail(400, nc.InvalidValue if not unknown else nc.UnknownElement, message)


def key_json(list_node: SchemaNode, name: str, value: str) -> Any:
    """A key value from the URI as RFC 7951 JSON would carry it (numbers as numbers)."""
    leaf = list_node.named(name)
    base = leaf.base or ""
    try:
        if base.startswith(("int", "uint")) and base not in ("int64", "uint64"):
            return int(value)
    except ValueError:
        raise _bad(f"'{value}' is not a valid {name}") from None
    if base == "boolean":
        return {"true": True, "false": False}.get(value, value)
    return value


def same_value(json_value: Any, text: str) -> bool:
    """A JSON value against a URI key value (RFC 8040 3.5.3: the value's canonical string;
    an identity may be given with or without its module)."""
    if isinstance(json_value, bool):
        return ("true" if json_value else "false") == text
    if isinstance(json_value, (list, dict)):
        return False
    value = str(json_value)
    return value == text or (":" in value and ":" not in text and value.split(":", 1)[1] == text)


def matches(entry: dict[str, Any], step: Step) -> bool:
    return all(same_value(entry.get(k), v) for k, v in zip(step.node.keys, step.keys or ()))


def select(doc: dict[str, Any], steps: list[Step]) -> Any:
    """The value at `steps` in an RFC 7951 document (for a list entry: the entry object;
    for a leaf-list without value: the array); None when it is not there."""
    cur: Any = doc
    parent: SchemaNode | None = None
    for step in steps:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(step.member(parent))
        if cur is None:
            return None
        if step.node.keyword == "list":
            cur = next((e for e in cur if isinstance(e, dict) and matches(e, step)), None)
        elif step.node.keyword == "leaf-list" and step.keys is not None:
            cur = next((v for v in cur if same_value(v, step.keys[0])), None)
        if cur is None:
            return None
        parent = step.node
    return cur


def skeleton(steps: list[Step], leaf: Any) -> dict[str, Any]:
    """An RFC 7951 document holding only the path `steps` (with their list keys) and, at
    its end, `leaf` (the members of the last step's object, or the value of a leaf)."""
    doc: dict[str, Any] = {}
    cur = doc
    parent: SchemaNode | None = None
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        name = step.member(parent)
        if step.node.keyword == "list":
            entry = {k: key_json(step.node, k, v) for k, v in zip(step.node.keys, step.keys or ())}
            if last and isinstance(leaf, dict):
                entry.update(leaf)
            cur[name] = [entry]
            cur = entry
        elif step.node.keyword == "container":
            obj: dict[str, Any] = dict(leaf) if last and isinstance(leaf, dict) else {}
            cur[name] = obj
            cur = obj
        elif step.node.keyword == "leaf-list":
            cur[name] = [step.keys[0]] if step.keys is not None else (leaf if isinstance(leaf, list) else [])
        else:
            cur[name] = leaf
        parent = step.node
    return doc


def xml_skeleton(steps: list[Step]) -> tuple[etree._Element, etree._Element]:
    """The path `steps` as XML elements (list entries with their key leaves): (top, last)."""
    top = last = None
    for step in steps:
        qn = f"{{{step.node.namespace}}}{step.node.name}"
        el = etree.Element(qn) if last is None else etree.SubElement(last, qn)
        if step.node.keyword == "list":
            for k, v in zip(step.node.keys, step.keys or ()):
                etree.SubElement(el, f"{{{step.node.namespace}}}{k}").text = v
        top = el if top is None else top
        last = el
    assert top is not None and last is not None
    return top, last


def find_xml(elements: list[etree._Element], steps: list[Step]) -> etree._Element | None:
    """The element `steps` lead to in a document built from skeleton() (one entry per level)."""
    level = elements
    found: etree._Element | None = None
    for step in steps:
        found = None
        for el in level:
            if not isinstance(el.tag, str):
                continue
            q = etree.QName(el)
            if q.namespace == step.node.namespace and q.localname == step.node.name:
                if step.node.keyword == "leaf-list" and step.keys is not None and (el.text or "") != step.keys[0]:
                    continue
                found = el
                break
        if found is None:
            return None
        level = list(found)
    return found


def uri(steps: list[Step]) -> str:
    """The api-path of `steps` (for Location headers)."""
    out, parent = [], None
    for s in steps:
        out.append(s.segment(parent))
        parent = s.node
    return "/".join(out)
