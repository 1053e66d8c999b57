"""A compiled view of yang/ (through pyang's API) that the wire codecs walk.

pyangbind classes hold and validate values, but they do not say what the wire
needs: the built-in base type behind a typedef (uint64 is a JSON string), which
module an identity or augmented node belongs to, config true/false, list keys in
order. pyang knows all of that; we read it once per module set and keep a small
immutable tree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from pyang import context, repository, types

from sdqkd import yangmodels

DATA_KEYWORDS = ("container", "list", "leaf", "leaf-list")


class SchemaError(Exception):
    """yang/ does not compile."""


@dataclass(frozen=True)
class ValueType:
    """The built-in type of a leaf, after typedefs and leafrefs are resolved."""

    base: str  # YANG built-in name: uint32, decimal64, identityref, union, ...
    members: tuple["ValueType", ...] = ()  # for unions, in declaration order
    fraction_digits: int | None = None
    name: str = ""  # as the leaf names it (a typedef, or the built-in)
    restrictions: tuple[str, ...] = ()  # "range 1..max", "length 1..32", "pattern '...'": the innermost of each

    def describe(self) -> str:
        """The type for an error message: 'loss-db (decimal64, range 0..100)'."""
        inner = ([self.base] if self.name and self.name != self.base else []) + list(self.restrictions)
        return f"{self.name or self.base}" + (f" ({', '.join(inner)})" if inner else "")

    @property
    def json_string_int(self) -> bool:
        """RFC 7951 6.1: 64-bit integers are JSON strings."""
        return self.base in ("int64", "uint64")

    def bases(self) -> set[str]:
        if self.base == "union":
            return set().union(*(m.bases() for m in self.members))
        return {self.base}


@dataclass(eq=False)
class SchemaNode:
    """One data node (container, list, leaf, leaf-list) or a notification."""

    keyword: str
    name: str
    module: str  # module that defines the node (augmenting module for augments)
    namespace: str
    config: bool
    parent: "SchemaNode | None" = field(default=None, repr=False)
    keys: tuple[str, ...] = ()
    type: ValueType | None = None
    mandatory: bool = False
    presence: bool = False
    default: str | None = None
    ordered_by_user: bool = False
    children: dict[tuple[str, str], "SchemaNode"] = field(default_factory=dict, repr=False)

    def child(self, namespace: str, name: str) -> "SchemaNode | None":
        return self.children.get((namespace, name))

    def child_by_name(self, name: str, module: str | None = None) -> "SchemaNode | None":
        """Look a child up by local name, qualified by module when given (JSON)."""
        for node in self.children.values():
            if node.name == name and (module is None or node.module == module):
                return node
        return None

    def data_path(self, prefixes: dict[str, str] | None = None) -> str:
        """Schema path with module prefixes, for error-path (RFC 6241 uses prefixed XPath)."""
        parts = []
        node: SchemaNode | None = self
        while node is not None and node.keyword != "module":
            pfx = (prefixes or {}).get(node.module, node.module)
            parts.append(f"{pfx}:{node.name}")
            node = node.parent
        return "/" + "/".join(reversed(parts))


@dataclass
class Schema:
    """Top-level nodes and notifications of a module set, and facts about its modules."""

    roots: dict[tuple[str, str], SchemaNode]
    notifications: dict[tuple[str, str], SchemaNode]
    namespaces: dict[str, str]  # module name -> namespace
    prefixes: dict[str, str]  # module name -> prefix
    identities: dict[tuple[str, str], set[str]]  # (module, identity) -> {(module:base)...}

    def module_of_namespace(self, namespace: str) -> str | None:
        for mod, ns in self.namespaces.items():
            if ns == namespace:
                return mod
        return None

    def root(self, namespace: str, name: str) -> SchemaNode | None:
        return self.roots.get((namespace, name))

    def root_by_name(self, name: str, module: str | None) -> SchemaNode | None:
        for node in self.roots.values():
            if node.name == name and (module is None or node.module == module):
                return node
        return None


def _base_spec(spec: types.TypeSpec) -> types.TypeSpec:
    while getattr(spec, "base", None) is not None and not isinstance(spec, types.UnionTypeSpec):
        spec = spec.base
    return spec


def _value_type(type_stmt) -> ValueType:
    spec = type_stmt.i_type_spec
    if spec is None:  # pragma: no cover - pyang validated the module
        raise SchemaError(f"unresolved type at {type_stmt.pos}")
    base = _base_spec(spec)
    if isinstance(base, types.UnionTypeSpec):
        return ValueType("union", tuple(_value_type(t) for t in base.types))
    if isinstance(base, types.LeafrefTypeSpec) or spec.name == "leafref":
        target = getattr(base, "i_target_node", None) or getattr(spec, "i_target_node", None)
        if target is not None:
            return _value_type(target.search_one("type"))
        return ValueType("string")
    fd = getattr(base, "fraction_digits", None)
    return ValueType(base.name, fraction_digits=fd, name=type_stmt.arg.split(":")[-1], restrictions=_restrictions(type_stmt))


def _restrictions(type_stmt) -> tuple[str, ...]:
    """range/length/pattern along the typedef chain, the leaf's own first (it narrows)."""
    found: dict[str, str] = {}
    stmt = type_stmt
    while stmt is not None:
        for kw in ("range", "length", "pattern"):
            sub = stmt.search_one(kw)
            if sub is not None and kw not in found:
                arg = sub.arg if len(sub.arg) <= 60 else sub.arg[:57] + "..."
                found[kw] = f"{kw} '{arg}'" if kw == "pattern" else f"{kw} {arg}"
        td = getattr(stmt, "i_typedef", None)
        stmt = td.search_one("type") if td is not None else None
    return tuple(found.values())


def _module_name(stmt) -> str:
    mod = stmt.i_module
    belongs = mod.search_one("belongs-to")
    return belongs.arg if belongs is not None else mod.arg


def _build(stmt, parent: SchemaNode, schema_ns: dict[str, str]) -> list[SchemaNode]:
    """SchemaNodes for a pyang statement; choice and case are transparent."""
    if stmt.keyword in ("choice", "case"):
        out: list[SchemaNode] = []
        for ch in stmt.i_children:
            out.extend(_build(ch, parent, schema_ns))
        return out
    if stmt.keyword not in DATA_KEYWORDS:
        return []
    module = _module_name(stmt)
    node = SchemaNode(
        keyword=stmt.keyword,
        name=stmt.arg,
        module=module,
        namespace=schema_ns[module],
        config=bool(getattr(stmt, "i_config", True)),
        parent=parent,
    )
    if stmt.keyword == "list":
        key = stmt.search_one("key")
        node.keys = tuple(key.arg.split()) if key is not None else ()
    if stmt.keyword in ("leaf", "leaf-list"):
        node.type = _value_type(stmt.search_one("type"))
        dflt = stmt.search_one("default")
        if dflt is None and stmt.keyword == "leaf":
            td = getattr(stmt.search_one("type"), "i_typedef", None)
            while td is not None and dflt is None:
                dflt = td.search_one("default")
                td = getattr(td.search_one("type"), "i_typedef", None)
        node.default = dflt.arg if dflt is not None else None
    mand = stmt.search_one("mandatory")
    node.mandatory = mand is not None and mand.arg == "true"
    node.presence = stmt.search_one("presence") is not None
    ob = stmt.search_one("ordered-by")
    node.ordered_by_user = ob is not None and ob.arg == "user"
    for ch in getattr(stmt, "i_children", []):
        for sub in _build(ch, node, schema_ns):
            node.children[(sub.namespace, sub.name)] = sub
    return [node]


@functools.lru_cache(maxsize=None)
def load(*module_names: str) -> Schema:
    """Compile the named modules of yang/ (their imports come along)."""
    repo = repository.FileRepository(str(yangmodels.YANG_DIR), use_env=False)
    ctx = context.Context(repo)
    mods = []
    for name in module_names:
        path = yangmodels.module_path(name)
        mod = ctx.add_module(str(path), path.read_text(encoding="utf-8"))
        if mod is None:
            raise SchemaError(f"cannot load {path}")
        mods.append(mod)
    ctx.validate()
    errs = [e for e in ctx.errors if _is_error(e[1])]
    if errs:
        raise SchemaError("; ".join(f"{pos}: {tag} {args}" for pos, tag, args in errs))
    namespaces, prefixes, identities = {}, {}, {}
    for (mname, _rev), mod in ctx.modules.items():
        ns = mod.search_one("namespace")
        if ns is None:
            continue
        namespaces[mname] = ns.arg
        prefixes[mname] = mod.search_one("prefix").arg
        for ident in mod.search("identity"):
            bases = set()
            for b in ident.search("base"):
                target = getattr(b, "i_identity", None)
                if target is not None:
                    bases.add(f"{_module_name(target)}:{target.arg}")
            identities[(mname, ident.arg)] = bases
    top = SchemaNode("module", "", "", "", True)
    roots: dict[tuple[str, str], SchemaNode] = {}
    notifs: dict[tuple[str, str], SchemaNode] = {}
    for mod in mods:
        for ch in mod.i_children:
            if ch.keyword == "notification":
                module = _module_name(ch)
                n = SchemaNode("notification", ch.arg, module, namespaces[module], False, parent=top)
                for sub in ch.i_children:
                    for s in _build(sub, n, namespaces):
                        n.children[(s.namespace, s.name)] = s
                notifs[(n.namespace, n.name)] = n
                continue
            for node in _build(ch, top, namespaces):
                roots[(node.namespace, node.name)] = node
    return Schema(roots, notifs, namespaces, prefixes, identities)


def _is_error(tag: str) -> bool:
    from pyang import error

    return error.is_error(error.err_level(tag))
