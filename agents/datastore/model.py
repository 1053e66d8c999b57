"""Which YANG modules an agent serves, and the bindings that hold and validate their data."""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from sdqkd import yangcodec
from sdqkd.agents.datastore.checked import ModuleChecker, digest, update_bindings
from sdqkd.yangschema import Schema, SchemaNode, load


@dataclass(frozen=True)
class Config:
    """A type-checked configuration: canonical XML (schema order) and, per module,
    its RFC 7951 JSON (what semantic checks and the commit diff read)."""

    elements: tuple[etree._Element, ...]
    json: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Model:
    """A module with top-level data, its compiled schema and its pyangbind root class."""

    module: str
    schema: Schema
    factory: Callable[[], Any]


class ModelSet:
    """The data models of one server: routes top-level elements to their bindings."""

    def __init__(self, models: Iterable[Model]) -> None:
        self.models = {m.module: m for m in models}
        self._roots: dict[tuple[str, str], Model] = {}
        self._memo_lock = threading.Lock()
        self._checkers = {m.module: ModuleChecker(m.schema, m.factory) for m in self.models.values()}
        self._checked: OrderedDict[bytes, Config] = OrderedDict()
        self.prefixes: dict[str, str] = {}  # prefix -> namespace, for error-path
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}
        for m in self.models.values():
            for key in m.schema.roots:
                self._roots[key] = m
            for mod, ns in m.schema.namespaces.items():
                self.prefixes[m.schema.prefixes[mod]] = ns
            todo = list(m.schema.roots.values())
            while todo:
                node = todo.pop()
                if node.keyword == "list":
                    self._keys[(node.namespace, node.name)] = node.keys
                todo.extend(node.children.values())

    def list_keys(self, el: etree._Element) -> tuple[str, ...]:
        """Key leaf names of a list entry element (empty for anything else)."""
        q = etree.QName(el)
        return self._keys.get((q.namespace or "", q.localname), ())

    def model_for(self, namespace: str, name: str) -> Model | None:
        return self._roots.get((namespace, name))

    def root_node(self, namespace: str, name: str) -> SchemaNode | None:
        m = self.model_for(namespace, name)
        return m.schema.root(namespace, name) if m else None

    def namespaces(self) -> set[str]:
        return {ns for m in self.models.values() for ns in m.schema.namespaces.values()}

    def _decode(self, elements: list[etree._Element], config_only: bool) -> dict[str, Any]:
        roots = {name: m.factory() for name, m in self.models.items()}
        for el in elements:
            if not isinstance(el.tag, str):
                continue
            m = self._top_model(el)
            yangcodec.decode_xml([el], roots[m.module], m.schema, config_only=config_only)
        return roots

    def _top_model(self, el: etree._Element) -> Model:
        """The model a top-level config element belongs to; a CodecError naming what is wrong
        (unknown-namespace, or unknown-element in a namespace we serve) when none does."""
        q = etree.QName(el)
        m = self.model_for(q.namespace or "", q.localname)
        if m is None:
            known = any(q.namespace == ns for ns in self.namespaces())
            kind = "unknown-element" if known else "unknown-namespace"
            raise yangcodec.CodecError(kind, f"/{q.localname}", f"unknown top-level element <{q.localname}>")
        return m

    def decode(self, elements: Iterable[etree._Element]) -> dict[str, Any]:
        """Fresh bindings of a config (not memoised: the caller may update them in place)."""
        return self._decode([el for el in elements if isinstance(el.tag, str)], True)

    def update(self, roots: dict[str, Any], old: list[etree._Element], new: list[etree._Element]) -> bool:
        """Bring bindings decoded from canonical config `old` to canonical config `new` in
        place, decoding only the list entries that changed; False when they cannot
        (then they are unusable: decode afresh)."""
        try:
            for name, m in self.models.items():
                ns = set(m.schema.namespaces.values())
                pick = lambda els: [el for el in els if isinstance(el.tag, str) and etree.QName(el).namespace in ns]  # noqa: E731
                if not update_bindings(self._checkers[name], roots[name], pick(old), pick(new)):
                    return False
        except Exception:  # noqa: BLE001 - anything odd: the caller decodes afresh
            return False
        return True

    def dump(self, roots: dict[str, Any], *, config_only: bool) -> list[etree._Element]:
        out: list[etree._Element] = []
        for name, m in self.models.items():
            out.extend(yangcodec.encode_xml(roots[name], m.schema, config_only=config_only))
        return out

    def check(self, elements: Iterable[etree._Element]) -> Config:
        """Type-check a config without building it whole in pyangbind (see checked.py);
        memoised by content, under its canonical form too (validate and commit
        check the candidate an edit just produced)."""
        elements = [el for el in elements if isinstance(el.tag, str)]
        key = digest(elements)
        with self._memo_lock:
            hit = self._checked.get(key)
            if hit is not None:
                self._checked.move_to_end(key)
                return hit
        per_model: dict[str, list[etree._Element]] = {name: [] for name in self.models}
        for el in elements:
            per_model[self._top_model(el).module].append(el)
        xml: list[etree._Element] = []
        js: dict[str, dict[str, Any]] = {}
        for name, checker in self._checkers.items():
            x, j = checker.check(per_model[name])
            xml.extend(x)
            js[name] = j
        cfg = Config(tuple(xml), js)
        with self._memo_lock:
            for k in (key, digest(xml)):
                self._checked[k] = cfg
            while len(self._checked) > 16:
                self._checked.popitem(last=False)
        return cfg


@functools.lru_cache(maxsize=None)
def agent_models() -> ModelSet:
    """The modules every sdqkd agent serves."""
    from sdqkd.bindings.etsi_qkd_sdn_node import etsi_qkd_sdn_node
    from sdqkd.bindings.sdqkd_optical_switch import sdqkd_optical_switch

    return ModelSet(
        [
            Model("etsi-qkd-sdn-node", load("etsi-qkd-sdn-node"), etsi_qkd_sdn_node),
            Model("sdqkd-optical-switch", load("sdqkd-optical-switch"), sdqkd_optical_switch),
        ]
    )
