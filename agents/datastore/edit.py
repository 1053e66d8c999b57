"""<edit-config> operations (RFC 6241 section 7.2) applied to a datastore's XML.

The datastore keeps canonical XML; an edit is applied to a copy, node by node,
using the schema (libyang's, through sdqkd.yangdata) only to tell leaves, containers,
list entries (by key) and leaf-list entries (by value) apart. The whole result is then
validated by libyang (ModelSet.check) before it replaces anything. apply_edit is atomic
(the first error fails the edit); apply_each applies each operation on its own, for
error-option continue-on-error.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import errors
from sdqkd.agents.datastore.model import ModelSet
from sdqkd.yangdata import SchemaNode

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
OPERATION = f"{{{NC_NS}}}operation"
OPERATIONS = ("merge", "replace", "create", "delete", "remove")
DEFAULT_OPERATIONS = ("merge", "replace", "none")


def apply_edit(
    target: Iterable[etree._Element], config: etree._Element, models: ModelSet, default_operation: str = "merge"
) -> list[etree._Element]:
    """New top-level elements of a datastore after applying <config>'s children; the first
    operation that fails fails the whole edit (stop-on-error, rollback-on-error)."""
    return _run(target, config, models, default_operation, None).elements


@dataclass
class Outcome:
    """An edit applied operation by operation (continue-on-error)."""

    elements: list[etree._Element]  # the datastore's new top-level elements
    failed: list[tuple[etree._Element, errors.RpcError]]  # operations left out: their element in <config>, and why
    written: list[tuple[etree._Element, str]]  # operations applied: their element, the data path they wrote


def apply_each(
    target: Iterable[etree._Element], config: etree._Element, models: ModelSet, default_operation: str = "merge",
    skip: Collection[etree._Element] = (),
) -> Outcome:
    """continue-on-error (RFC 6241 7.2): every operation of <config> applied on its own; one
    that fails changes nothing and is reported in Outcome.failed, the others go on. An
    operation is one element the edit acts on: a leaf or leaf-list value set, a subtree
    created, replaced, deleted or removed, or a container or list entry a merge creates
    (its children are operations of their own). `skip`: operations to leave out, with
    everything inside them (the caller's, for those whose result failed validation)."""
    return _run(target, config, models, default_operation, set(skip))


def _run(target: Iterable[etree._Element], config: etree._Element, models: ModelSet, default_operation: str,
         skip: set[etree._Element] | None) -> Outcome:
    if default_operation not in DEFAULT_OPERATIONS:
        raise errors.protocol(errors.InvalidValue, f"unknown default-operation '{default_operation}'", info={"bad-element": "default-operation"})
    holder = etree.Element("holder")
    for el in target:
        holder.append(copy.deepcopy(el))
    editor = _Editor(skip)
    for edit in config:
        if isinstance(edit.tag, str):
            editor.each(edit, functools.partial(editor.top, holder, edit, models, default_operation))
    return Outcome(list(holder), editor.failed, editor.written)


class _Editor:
    """Applies edits to a holder of a datastore's elements. `skip` is None for an atomic
    edit (the first error propagates), else the operations to leave out, and each failing
    operation is recorded instead of raised."""

    def __init__(self, skip: set[etree._Element] | None) -> None:
        self.skip = skip
        self.failed: list[tuple[etree._Element, errors.RpcError]] = []
        self.written: list[tuple[etree._Element, str]] = []

    def each(self, edit: etree._Element, apply: Callable[[], None]) -> None:
        """One operation. Every check an operation makes comes before its change, so one
        that fails has changed nothing and can be left out."""
        if self.skip is None:
            apply()
            return
        if edit in self.skip:
            return
        try:
            apply()
        except errors.RpcError as exc:
            self.failed.append((edit, exc))

    def top(self, holder: etree._Element, edit: etree._Element, models: ModelSet, default_operation: str) -> None:
        q = etree.QName(edit)
        node = models.model_for(q.namespace or "", q.localname)
        if node is None:
            raise _unknown(q, "", (q.namespace or "") in models.namespaces())
        self.edit(holder, edit, node, default_operation, "")

    def _path(self, parent_path: str, node: SchemaNode, el: etree._Element | None = None) -> str:
        pfx = node.prefix
        path = f"{parent_path}/{pfx}:{node.name}"
        if el is not None and node.keyword == "list":
            for k in node.keys:
                kel = _find_child(el, node.namespace, k)
                if kel is not None:
                    path += f"[{pfx}:{k}='{(kel.text or '').strip()}']"
        elif el is not None and node.keyword == "leaf-list":
            path += f"[.='{(el.text or '').strip()}']"
        return path

    def edit(self, parent: etree._Element, edit: etree._Element, node: SchemaNode, inherited: str, parent_path: str) -> None:
        op = edit.get(OPERATION, inherited)
        if op not in OPERATIONS and op != "none":
            raise errors.BadAttribute(f"unknown operation '{op}'", path=self._path(parent_path, node), info={"bad-attribute": "operation", "bad-element": node.name})
        if not node.config:
            raise errors.InvalidValue(f"<{node.name}> is state data and cannot be edited", path=self._path(parent_path, node))
        if node.keyword == "list":
            self._check_keys(edit, node, parent_path)
        existing = self._find(parent, edit, node)
        path = self._path(parent_path, node, edit)

        if op in ("delete", "remove"):
            if existing is None:
                if op == "delete":
                    raise errors.DataMissing(f"<{node.name}> does not exist", path=path)
                return
            parent.remove(existing)
            self.written.append((edit, path))
            return
        if op == "create" and existing is not None:
            raise errors.DataExists(f"<{node.name}> already exists", path=path)
        if op in ("create", "replace"):
            self._put(parent, existing, self._clean_copy(edit, node, path), edit, path)
            return
        # merge, or none (only walks down to find deeper operations)
        if node.keyword in ("leaf", "leaf-list"):
            if op == "none":
                if existing is None:
                    raise errors.DataMissing(f"<{node.name}> does not exist", path=path)
                return
            self._put(parent, existing, self._clean_copy(edit, node, path), edit, path)
            return
        if existing is None and op == "none" and not _has_deeper_create(edit):
            raise errors.DataMissing(f"<{node.name}> does not exist", path=path)
        self._no_duplicates(edit, node, path)
        if existing is None:
            existing = etree.SubElement(parent, edit.tag, nsmap=edit.nsmap)
            if node.keyword == "list":
                for k in node.keys:
                    kel = _find_child(edit, node.namespace, k)
                    assert kel is not None
                    existing.append(_strip(_detach(kel)))
            self.written.append((edit, path))
        for sub in edit:
            if isinstance(sub.tag, str):
                self.each(sub, functools.partial(self._child, existing, sub, node, op, path))

    def _child(self, existing: etree._Element, sub: etree._Element, node: SchemaNode, op: str, path: str) -> None:
        q = etree.QName(sub)
        ch = node.child(q.namespace or "", q.localname)
        if ch is None:
            raise _unknown(q, path, not q.namespace or q.namespace in yangdata.namespaces())
        if node.keyword == "list" and ch.name in node.keys and ch.namespace == node.namespace:
            if sub.get(OPERATION) in ("delete", "remove", "replace", "create"):
                raise errors.BadElement("a list key cannot be edited on its own", path=f"{path}/{ch.name}", info={"bad-element": ch.name})
            return
        self.edit(existing, sub, ch, op, path)

    def _put(self, parent: etree._Element, existing: etree._Element | None, new: etree._Element,
             edit: etree._Element, path: str) -> None:
        if existing is not None:
            parent.replace(existing, new)
        else:
            parent.append(new)
        self.written.append((edit, path))

    def _no_duplicates(self, edit: etree._Element, node: SchemaNode, path: str) -> None:
        """The same list entry or leaf-list value twice in one edit is not an instance of the
        model (RFC 7950 7.7.7, 7.8.2), whatever merging would make of it: refused, as libyang
        refuses it in a whole configuration."""
        seen: set[tuple[str, tuple[str | None, ...]]] = set()
        for sub in edit:
            if not isinstance(sub.tag, str):
                continue
            q = etree.QName(sub)
            ch = node.child(q.namespace or "", q.localname)
            if ch is None or ch.keyword not in ("list", "leaf-list"):
                continue
            ident = self._identity(sub, ch)
            if (sub.tag, ident) in seen:
                raise errors.InvalidValue(f'Duplicate instance of "{ch.name}".', path=self._path(path, ch, sub),
                                          info={"bad-element": ch.name})
            seen.add((sub.tag, ident))

    def _check_keys(self, edit: etree._Element, node: SchemaNode, parent_path: str) -> None:
        for k in node.keys:
            if _find_child(edit, node.namespace, k) is None:
                pfx = node.prefix
                raise errors.MissingElement(
                    f"list entry <{node.name}> has no key <{k}>",
                    path=f"{parent_path}/{pfx}:{node.name}/{pfx}:{k}",
                    info={"bad-element": k},
                )

    def _find(self, parent: etree._Element, edit: etree._Element, node: SchemaNode) -> etree._Element | None:
        want = self._identity(edit, node)
        return next((c for c in parent if c.tag == edit.tag and self._identity(c, node) == want), None)

    def _identity(self, el: etree._Element, node: SchemaNode) -> tuple[str | None, ...]:
        """What tells instances of `node` apart: a list entry's key values, a leaf-list's
        value; nothing for a container or leaf (there is one)."""
        if node.keyword == "list":
            return tuple(self._value(_find_child(el, node.namespace, k), node.child(node.namespace, k)) for k in node.keys)
        if node.keyword == "leaf-list":
            return (self._value(el, node),)
        return ()

    def _value(self, el: etree._Element | None, node: SchemaNode | None) -> str | None:
        """Canonical text of a leaf for matching: identityrefs by namespace, not prefix."""
        if el is None:
            return None
        text = (el.text or "").strip()
        if node is not None and node.identityref:
            pfx, _, name = text.rpartition(":")
            ns = el.nsmap.get(pfx or None)
            return f"{{{ns}}}{name}" if ns else name
        return text

    def _clean_copy(self, edit: etree._Element, node: SchemaNode, path: str) -> etree._Element:
        """A subtree to store: operation attributes removed, but a nested delete or
        remove inside create/replace makes no sense and is refused."""
        new = _detach(edit)
        for el in new.iter():
            if not isinstance(el.tag, str):
                continue
            op = el.attrib.pop(OPERATION, None)
            if el is not new and op in ("delete", "remove"):
                raise errors.BadElement(f"'{op}' inside a '{edit.get(OPERATION, 'merge')}'", path=path, info={"bad-attribute": "operation"})
        return new


def _detach(el: etree._Element) -> etree._Element:
    """A deep copy that keeps every namespace in scope: identityref values
    ('pfx:NAME') use prefixes declared on ancestors, which a plain copy drops."""
    new = etree.Element(el.tag, attrib=dict(el.attrib), nsmap=el.nsmap)
    new.text, new.tail = el.text, None
    for ch in el:
        new.append(copy.deepcopy(ch))
    return new


def _has_deeper_create(el: etree._Element) -> bool:
    return any(isinstance(d.tag, str) and d.get(OPERATION) in ("merge", "replace", "create") for d in el.iter())


def _find_child(el: etree._Element, ns: str, name: str) -> etree._Element | None:
    return el.find(f"{{{ns}}}{name}")


def _strip(el: etree._Element) -> etree._Element:
    el.attrib.pop(OPERATION, None)
    return el


def _unknown(q: etree.QName, path: str, known_namespace: bool) -> errors.RpcError:
    """unknown-element, or unknown-namespace when the namespace itself is foreign."""
    if not known_namespace:
        return errors.UnknownNamespace(
            f"namespace '{q.namespace}' is not supported", path=f"{path}/{q.localname}",
            info={"bad-element": q.localname, "bad-namespace": q.namespace or ""},
        )
    return errors.UnknownElement(f"unknown element <{q.localname}>", path=f"{path}/{q.localname}", info={"bad-element": q.localname})
