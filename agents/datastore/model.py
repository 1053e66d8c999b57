"""The YANG modules an agent serves, through the one runtime engine (sdqkd.yangdata, libyang):
what a configuration must satisfy before it may replace a datastore, and the operational
document a <get> answers with."""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import errors


@dataclass(frozen=True)
class Config:
    """A validated configuration: canonical XML (schema order, canonical values) and, per
    module, its RFC 7951 JSON (what semantic checks, the commit diff and the LKMS read)."""

    elements: tuple[etree._Element, ...]
    json: dict[str, dict[str, Any]]


class ModelSet:
    """The data modules of one server (their top-level nodes), validated by libyang."""

    def __init__(self, modules: Iterable[str]) -> None:
        self.modules = tuple(modules)
        self._namespaces = {ns for m in self.modules if (ns := yangdata.namespace_of(m))}
        self.prefixes: dict[str, str] = dict(yangdata.prefixes())  # prefix -> namespace, for error-path
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}
        todo = [n for n in yangdata.tops().values() if n.module in self.modules]
        while todo:
            node = todo.pop()
            if node.keyword == "list":
                self._keys[(node.namespace, node.name)] = node.keys
            if node.keyword in ("container", "list"):
                todo.extend(node.children())

    def list_keys(self, el: etree._Element) -> tuple[str, ...]:
        """Key leaf names of a list entry element (empty for anything else)."""
        q = etree.QName(el)
        return self._keys.get((q.namespace or "", q.localname), ())

    def model_for(self, namespace: str, name: str) -> yangdata.SchemaNode | None:
        """The top-level schema node `name` of a served module."""
        node = yangdata.top(namespace, name)
        return node if node is not None and node.module in self.modules else None

    def namespaces(self) -> set[str]:
        return set(self._namespaces)

    def check(self, elements: Iterable[etree._Element]) -> Config:
        """Validate a whole configuration (every YANG constraint, on the merged result);
        RpcErrors naming every violation, with libyang's error-path, when it is not valid."""
        elements = [el for el in elements if isinstance(el.tag, str)]
        for el in elements:
            q = etree.QName(el)
            if self.model_for(q.namespace or "", q.localname) is None:
                known = (q.namespace or "") in self._namespaces
                cls = errors.UnknownElement if known else errors.UnknownNamespace
                info = {"bad-element": q.localname} | ({} if known else {"bad-namespace": q.namespace or ""})
                raise cls(f"unknown top-level element <{q.localname}>", path=f"/{q.localname}", info=info)
        try:
            doc = yangdata.validate_elements(elements)
        except yangdata.YangError as exc:
            raise errors.from_yang(exc) from None
        return Config(tuple(doc.elements()), doc.by_module())

    def operational(self, data: dict[str, dict[str, Any]]) -> list[etree._Element]:
        """Configuration with state (per-module RFC 7951 JSON) as XML elements, every value
        type-checked by libyang on the way."""
        merged = {k: v for per_module in data.values() for k, v in per_module.items()}
        try:
            return yangdata.encode_json_xml(merged)
        except yangdata.YangError as exc:
            raise errors.from_yang(exc) from None

    def with_defaults(self, elements: list[etree._Element], mode: str, *, config: bool) -> list[etree._Element]:
        """`elements` (a datastore's content, or the operational document) in an RFC 6243
        retrieval mode; report-all adds the defaults of this set's modules and of the
        document's own."""
        try:
            return yangdata.with_defaults(elements, mode, config=config, modules=self.modules)
        except yangdata.YangError as exc:
            raise errors.from_yang(exc) from None


@functools.lru_cache(maxsize=None)
def agent_models() -> ModelSet:
    """The modules whose data every sdqkd agent serves."""
    return ModelSet(["etsi-qkd-sdn-node", "sdqkd-optical-switch", "sdqkd-qrng", "sdqkd-key-stock"])
