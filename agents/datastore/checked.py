"""Type-checked configuration, decoded one list entry at a time and cached by content.

pyangbind builds a class per object (10-20 ms a list entry), so decoding a node's
whole datastore on every edit-config costs hundreds of milliseconds. The type check
of a list entry depends on its own content only, so a config is split into its
first-level list entries (qkd_link, qkd_app, qkd_interface, switch...) and the rest
(the skeleton); only the parts never seen before are decoded (together, in one
fresh root, in document order, so the first error is the one a whole decode gives),
and each part's canonical XML and RFC 7951 JSON are kept under the C14N of both its
raw and its canonical form. The checked config is then assembled in schema order.
"""
from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from sdqkd import yangcodec
from sdqkd.yangschema import Schema, SchemaNode

CACHE_SIZE = 4096
BINDINGS_KEPT = 16  # pyangbind entries are heavy (a class per object): keep few, briefly


@dataclass(frozen=True)
class Part:
    """A checked piece of config: canonical XML elements and RFC 7951 JSON."""

    xml: tuple[etree._Element, ...]
    json: Any


@dataclass(frozen=True)
class _ListPath:
    """A list reached from a top-level node through containers only."""

    nodes: tuple[SchemaNode, ...]  # top-level node ... list node

    @property
    def list(self) -> SchemaNode:
        return self.nodes[-1]


def _json_name(node: SchemaNode, parent: SchemaNode | None) -> str:
    if parent is None or parent.module != node.module:
        return f"{node.module}:{node.name}"
    return node.name


def _list_paths(schema: Schema) -> list[_ListPath]:
    out: list[_ListPath] = []

    def walk(node: SchemaNode, chain: tuple[SchemaNode, ...]) -> None:
        for ch in node.children.values():
            if not ch.config:
                continue
            if ch.keyword == "list":
                out.append(_ListPath(chain + (ch,)))
            elif ch.keyword == "container":
                walk(ch, chain + (ch,))

    for root in schema.roots.values():
        if root.config and root.keyword == "container":
            walk(root, (root,))
    return out


def _order(node: SchemaNode) -> dict[tuple[str, str], int]:
    return {(n.namespace, n.name): i for i, n in enumerate(yangcodec.ordered_children(node))}


def digest(elements: list[etree._Element]) -> bytes:
    """What a config's elements say, as a key: SHA-256 over their canonical XML."""
    return hashlib.sha256(b"".join(etree.tostring(el, method="c14n") for el in elements)).digest()


class ModuleChecker:
    """Checks the top-level config nodes of one module, reusing checked parts."""

    def __init__(self, schema: Schema, factory: Callable[[], Any]) -> None:
        self.schema = schema
        self.factory = factory
        self.paths = _list_paths(schema)
        self._by_list = {id(p.list): p for p in self.paths}
        self._orders: dict[int, dict[tuple[str, str], int]] = {}
        self._cache: OrderedDict[tuple[int, bytes], Part] = OrderedDict()
        # pyangbind entries decoded by a check, by their canonical C14N: a commit of
        # that config moves them into the live running bindings instead of decoding
        # them again (each is used once)
        self._bindings: OrderedDict[tuple[int, bytes], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # --- cache ---------------------------------------------------------------

    def _get(self, key: tuple[int, bytes]) -> Part | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def take_binding(self, key: tuple[int, bytes]) -> tuple[Any, Any] | None:
        """(pyangbind list key, entry) decoded for the entry with this canonical C14N."""
        with self._lock:
            return self._bindings.pop(key, None)

    def _put(self, key: tuple[int, bytes], part: Part) -> None:
        with self._lock:
            self._cache[key] = part
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)

    # --- checking ------------------------------------------------------------

    def check(self, elements: list[etree._Element]) -> tuple[list[etree._Element], dict[str, Any]]:
        """Canonical XML and RFC 7951 JSON of `elements` (top-level nodes of this module)."""
        fresh: dict[int, tuple[Any, Any]] = {}  # id(new Part) -> its pyangbind entry
        work = [copy.deepcopy(el) for el in elements]
        entries = self._entries(work)  # (list path, element), document order
        if self._duplicates(entries):
            return self._whole(work)  # pyangbind merges same-key entries: let it
        parts: list[Part | None] = []
        for lp, el in entries:
            part = self._get((id(lp.list), digest([el])))
            parts.append(part)
            if part is not None:
                _detach(el)
        new = [(lp, el) for (lp, el), part in zip(entries, parts) if part is None]
        skeleton: Part | None = None
        if not new:
            skeleton = self._get((0, digest(work)))
        if skeleton is None:
            skeleton, decoded = self._decode(work, new, fresh)
            for (lp, el), part in zip(new, decoded):
                self._put((id(lp.list), digest([el])), part)
                _detach(el)
            self._put((0, digest(work)), skeleton)
            it = iter(decoded)
            parts = [p if p is not None else next(it) for p in parts]
        checked: list[tuple[_ListPath, Part]] = [(lp, p) for (lp, _), p in zip(entries, parts)]  # type: ignore[misc]
        out_xml, out_json = self._assemble(skeleton, checked)
        # canonical forms are fixed points: remember them too (the next check of
        # this config, by validate or commit, finds every part)
        by_list: dict[int, list[Part]] = {}
        for lp, part in checked:
            by_list.setdefault(id(lp.list), []).append(part)
        bare = [copy.deepcopy(el) for el in out_xml]
        for lp, el in self._entries(bare):
            part = by_list[id(lp.list)].pop(0)
            key = (id(lp.list), digest([el]))
            self._put(key, part)
            _detach(el)
            if id(part) in fresh:
                with self._lock:
                    self._bindings[key] = fresh.pop(id(part))
                    while len(self._bindings) > BINDINGS_KEPT:
                        self._bindings.popitem(last=False)
        self._put((0, digest(bare)), skeleton)
        return out_xml, out_json

    def _entries(self, work: list[etree._Element]) -> list[tuple[_ListPath, etree._Element]]:
        out: list[tuple[_ListPath, etree._Element]] = []

        def walk(el: etree._Element, node: SchemaNode) -> None:
            for sub in el:
                if not isinstance(sub.tag, str):
                    continue
                q = etree.QName(sub)
                ch = node.child(q.namespace or "", q.localname)
                if ch is None or not ch.config:
                    continue  # the decode reports it
                if ch.keyword == "list" and id(ch) in self._by_list:
                    out.append((self._by_list[id(ch)], sub))
                elif ch.keyword == "container":
                    walk(sub, ch)

        for el in work:
            if not isinstance(el.tag, str):
                continue
            q = etree.QName(el)
            root = self.schema.root(q.namespace or "", q.localname)
            if root is not None and root.config and root.keyword == "container":
                walk(el, root)
        return out

    def _duplicates(self, entries: list[tuple[_ListPath, etree._Element]]) -> bool:
        seen: set[tuple[int, tuple[str, ...]]] = set()
        for lp, el in entries:
            node = lp.list
            values = []
            for k in node.keys:
                kel = el.find(f"{{{node.namespace}}}{k}")
                if kel is None:
                    break
                text = (kel.text or "").strip()
                knode = node.child_by_name(k)
                if knode is not None and knode.type is not None and knode.type.base.startswith(("int", "uint")):
                    try:
                        text = str(int(text))
                    except ValueError:
                        pass
                values.append(text)
            else:
                key = (id(node), tuple(values))
                if key in seen:
                    return True
                seen.add(key)
        return False

    def _decode(self, work: list[etree._Element], new: list[tuple[_ListPath, etree._Element]],
                fresh: dict[int, tuple[Any, Any]]) -> tuple[Part, list[Part]]:
        """Decode skeleton + new entries in one root; split the result back into parts."""
        root = self.factory()
        yangcodec.decode_xml(work, root, self.schema, config_only=True)
        xml = yangcodec.encode_xml(root, self.schema, config_only=True)
        js = yangcodec.encode_json(root, self.schema, config_only=True)
        got = {id(lp.list): list(self._take(lp, xml, js)) for lp in self.paths}
        bound = {id(lp.list): list(_list_of(root, lp).items()) for lp in self.paths}
        parts = []
        for lp, _ in new:
            part = got[id(lp.list)].pop(0)
            fresh[id(part)] = bound[id(lp.list)].pop(0)
            parts.append(part)
        return Part(tuple(xml), js), parts

    def _take(self, lp: _ListPath, xml: list[etree._Element], js: dict[str, Any]) -> list[Part]:
        """Remove the entries of list `lp` from a decoded tree; they become parts."""
        parent_el = next((el for el in xml if etree.QName(el).localname == lp.nodes[0].name
                          and etree.QName(el).namespace == lp.nodes[0].namespace), None)
        parent_js = js.get(_json_name(lp.nodes[0], None))
        for prev, node in zip(lp.nodes[:-1], lp.nodes[1:-1]):
            if parent_el is None or parent_js is None:
                return []
            parent_el = parent_el.find(f"{{{node.namespace}}}{node.name}")
            parent_js = parent_js.get(_json_name(node, prev))
        if parent_el is None or parent_js is None:
            return []
        items = parent_js.pop(_json_name(lp.list, lp.nodes[-2]), [])
        els = parent_el.findall(f"{{{lp.list.namespace}}}{lp.list.name}")
        assert len(els) == len(items), (lp.list.name, len(els), len(items))
        parts = []
        for el, item in zip(els, items):
            _detach(el)
            parts.append(Part((el,), item))
        _prune_json(js, lp)
        return parts

    def _whole(self, work: list[etree._Element]) -> tuple[list[etree._Element], dict[str, Any]]:
        root = self.factory()
        yangcodec.decode_xml(work, root, self.schema, config_only=True)
        return yangcodec.encode_xml(root, self.schema, config_only=True), yangcodec.encode_json(root, self.schema, config_only=True)

    # --- assembly ----------------------------------------------------------------

    def _assemble(self, skeleton: Part, entries: list[tuple[_ListPath, Part]]) -> tuple[list[etree._Element], dict[str, Any]]:
        tops = {(etree.QName(el).namespace, etree.QName(el).localname): copy.deepcopy(el) for el in skeleton.xml}
        js = copy.deepcopy(skeleton.json)
        for lp, part in entries:
            top = lp.nodes[0]
            el = tops.get((top.namespace, top.name))
            if el is None:
                el = tops[(top.namespace, top.name)] = yangcodec.element(top, None)
            obj = js.setdefault(_json_name(top, None), {})
            for prev, node in zip(lp.nodes[:-1], lp.nodes[1:]):
                if node is lp.list:
                    break
                sub = el.find(f"{{{node.namespace}}}{node.name}")
                if sub is None:
                    sub = yangcodec.element(node, prev.namespace)
                    self._insert(el, sub, prev)
                el = sub
                obj = obj.setdefault(_json_name(node, prev), {})
            self._insert(el, copy.deepcopy(part.xml[0]), lp.nodes[-2])
            obj.setdefault(_json_name(lp.list, lp.nodes[-2]), []).append(copy.deepcopy(part.json))
        out = [tops[(r.namespace, r.name)] for r in self.schema.roots.values() if (r.namespace, r.name) in tops]
        return out, js

    def _insert(self, parent: etree._Element, el: etree._Element, node: SchemaNode) -> None:
        """Append `el` after its siblings of the same or earlier schema position."""
        order = self._orders.get(id(node))
        if order is None:
            order = self._orders[id(node)] = _order(node)
        q = etree.QName(el)
        rank = order.get((q.namespace or "", q.localname), len(order))
        for i, sib in enumerate(parent):
            if not isinstance(sib.tag, str):
                continue
            sq = etree.QName(sib)
            if order.get((sq.namespace or "", sq.localname), len(order)) > rank:
                parent.insert(i, el)
                return
        parent.append(el)


def _prune_json(js: dict[str, Any], lp: _ListPath) -> None:
    """Drop the containers on the way to list `lp` that are left empty (not the top)."""
    chain = [js.get(_json_name(lp.nodes[0], None))]
    for prev, node in zip(lp.nodes[:-2], lp.nodes[1:-1]):
        if not isinstance(chain[-1], dict):
            return
        chain.append(chain[-1].get(_json_name(node, prev)))
    for i in range(len(chain) - 1, 0, -1):
        if chain[i] == {}:
            chain[i - 1].pop(_json_name(lp.nodes[i], lp.nodes[i - 1]), None)


def _detach(el: etree._Element) -> None:
    """Remove a list entry, and the containers it leaves empty (below the top-level
    node): an empty non-presence container is no data (RFC 7950 7.5.1), and the
    skeleton of a config must not depend on whether a list has entries."""
    parent = el.getparent()
    parent.remove(el)
    while parent is not None and parent.getparent() is not None and len(parent) == 0 and not (parent.text or "").strip():
        up = parent.getparent()
        up.remove(parent)
        parent = up


def _list_of(root: Any, lp: _ListPath) -> Any:
    """The pyangbind list object of `lp` in a module root."""
    obj = root
    for node in lp.nodes:
        obj = yangcodec.child(obj, node.name)
    return obj


# --- decoded running, kept up to date entry by entry ----------------------------


def _key_text(node: SchemaNode, name: str, text: str) -> str:
    knode = node.child_by_name(name)
    if knode is not None and knode.type is not None and knode.type.base.startswith(("int", "uint")):
        try:
            return str(int(text))
        except ValueError:
            return text
    return text


def _xml_key(node: SchemaNode, el: etree._Element) -> tuple[str, ...]:
    return tuple(_key_text(node, k, (el.findtext(f"{{{node.namespace}}}{k}") or "").strip()) for k in node.keys)


def update_bindings(checker: ModuleChecker, root: Any, old: list[etree._Element], new: list[etree._Element]) -> bool:
    """Bring pyangbind `root` (decoded from `old`) to `new` in place: deleted and
    changed list entries are removed, new and changed ones decoded. False (root left
    unusable) when it cannot: the skeleton changed, or entry order would differ."""
    old_work = [copy.deepcopy(el) for el in old]
    new_work = [copy.deepcopy(el) for el in new]
    old_entries, new_entries = checker._entries(old_work), checker._entries(new_work)
    before: dict[int, dict[tuple[str, ...], bytes]] = {}
    after: dict[int, dict[tuple[str, ...], tuple[bytes, etree._Element]]] = {}
    for lp, el in old_entries:
        before.setdefault(id(lp.list), {})[_xml_key(lp.list, el)] = digest([el])
        _detach(el)
    for lp, el in new_entries:
        after.setdefault(id(lp.list), {})[_xml_key(lp.list, el)] = (digest([el]), el)
    if sum(len(v) for v in before.values()) != len(old_entries) or sum(len(v) for v in after.values()) != len(new_entries):
        return False  # duplicate keys: not canonical
    for _, el in new_entries:
        _detach(el)
    if digest(old_work) != digest(new_work):
        return False
    for lp in checker.paths:
        b, a = before.get(id(lp.list), {}), after.get(id(lp.list), {})
        changed = {k for k in a if k in b and a[k][0] != b[k]}
        kept = [k for k in b if k in a and k not in changed]
        if kept + [k for k in a if k not in kept] != list(a):
            return False
        if not (set(b) - set(kept)) and not (set(a) - set(kept)):
            continue
        lst = _list_of(root, lp)
        by_key = {tuple(_key_text(lp.list, k, str(yangcodec.child(entry, k))) for k in lp.list.keys): pykey
                  for pykey, entry in lst.items()}
        for k in set(b) - set(kept):
            lst.delete(by_key[k])
        path = lp.list.data_path(checker.schema.prefixes)
        for k in a:
            if k in kept:
                continue
            bound = checker.take_binding((id(lp.list), a[k][0]))
            if bound is not None and bound[0] not in lst:
                bound[1]._parent = lst._parent  # as YANGList.add sets it: the delta root can go
                lst._members[bound[0]] = bound[1]  # pyangbind's own list storage: no copy
            else:
                yangcodec.decode_entry(a[k][1], lst, lp.list, checker.schema, path)
    return True
