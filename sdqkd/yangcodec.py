"""Standard wire encodings of pyangbind objects: XML (RFC 7950) and JSON (RFC 7951).

pyangbind's own serialisers write identityrefs with the import prefix and no
namespace declaration (invalid XML instance data, invalid RFC 7951 JSON) and drop
the config/state split NETCONF needs. This codec walks a pyangbind object beside the
compiled schema (sdqkd.yangschema) and gets those right: identityrefs qualified by
module name in JSON and by a declared prefix in XML, 64-bit integers and decimal64
as JSON strings, list keys first in XML, `config_only` for get-config.

Decoding is strict: an unknown element, a bad value or a missing key raises
CodecError with its kind and a schema path, which the NETCONF layer maps to an
rpc-error.
"""
from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from lxml import etree

from sdqkd.yangschema import Schema, SchemaNode, ValueType

_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_DEC_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$")


class CodecError(Exception):
    """Instance data that does not fit the schema.

    kind is one of: unknown-element, unknown-namespace, invalid-value,
    missing-element (a list entry without its key), state-data (config false
    node where only config is allowed), malformed (not parseable at all).
    """

    def __init__(self, kind: str, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.kind = kind
        self.path = path
        self.message = message


# --- access to pyangbind objects -------------------------------------------------

_ATTR_CACHE: dict[type, dict[str, str]] = {}


def _attr_map(obj: Any) -> dict[str, str]:
    """YANG name -> python attribute name for a pyangbind container class.

    pyangbind wraps every object in a class of its own (YANGDynClass): caching by
    that class would keep every object alive, so the generated class is the key."""
    cls = type(obj)
    if cls.__name__ == "YANGBaseClass" and len(cls.__mro__) > 1:
        cls = cls.__mro__[1]
    amap = _ATTR_CACHE.get(cls)
    if amap is None:
        amap = {}
        for attr in obj._pyangbind_elements:
            amap[getattr(obj, attr)._yang_name] = attr
        _ATTR_CACHE[cls] = amap
    return amap


def child(obj: Any, name: str) -> Any:
    """The pyangbind member for YANG child `name`."""
    return getattr(obj, _attr_map(obj)[name])


def set_leaf(obj: Any, name: str, value: Any) -> None:
    """Set a leaf through pyangbind's validating setter (config false ones have no property setter)."""
    getattr(obj, "_set_" + _attr_map(obj)[name])(value)


def leaf_is_set(value: Any) -> bool:
    return bool(getattr(value, "_changed", lambda: True)())


def leaf_value(value: Any) -> Any:
    """Effective value of a leaf: what was set, else its YANG default, else None."""
    if leaf_is_set(value):
        return value
    return getattr(value, "_default", None) if getattr(value, "_default", None) is not False else None


def list_entries(lst: Any) -> Iterable[Any]:
    return list(lst.values())


def add_entry(lst: Any, keys: dict[str, str]) -> Any:
    """Get or add the list entry with these key values (YANG names -> values)."""
    pykeys = lst._keyval.split(" ")
    if len(pykeys) == 1:
        value = next(iter(keys.values()))
        str_key = str(value)
        if str_key in lst:
            return lst[str_key]
        return lst.add(value)
    ordered = [str(keys[k]) for k in keys]
    str_key = " ".join(ordered)
    if str_key in lst:
        return lst[str_key]
    return lst.add(**dict(zip(pykeys, ordered)))


# --- value text --------------------------------------------------------------------


def _identity_module(value: Any) -> tuple[str, str] | None:
    """(module, identity name) of an identityref value, from pyangbind's identity table."""
    table = getattr(value, "_enumeration_dict", None) or {}
    info = table.get(str(value))
    if not info or "@module" not in info:
        return None
    return info["@module"], str(value).rsplit(":", 1)[-1]


def _decimal_text(value: Decimal) -> str:
    """Canonical decimal64 (RFC 7950 9.3.2): no trailing zeros, at least one fraction digit."""
    text = format(Decimal(value).normalize(), "f")
    if "." not in text:
        text += ".0"
    return text


def _scalar(value: Any, vtype: ValueType) -> tuple[str, Any]:
    """Classify a stored value: (kind, python value) with kind in
    identityref | bool | empty | int | int64 | decimal | binary | bits | string."""
    if _identity_module(value) is not None:
        return "identityref", value
    bases = vtype.bases()
    if "YANGBool" in {c.__name__ for c in type(value).__mro__}:
        return ("empty", value) if bases == {"empty"} else ("bool", bool(value))
    if isinstance(value, Decimal):
        return "decimal", value
    if isinstance(value, int):
        if vtype.base == "union":
            big = bool({"int64", "uint64"} & bases) and not ({"int8", "int16", "int32", "uint8", "uint16", "uint32"} & bases)
        else:
            big = vtype.json_string_int
        return ("int64" if big else "int"), int(value)
    if "binary" in bases and isinstance(value, (bytes, bytearray)):
        return "binary", value
    return "string", str(value)


def _text(value: Any, vtype: ValueType, schema: Schema, json_leaf_module: str | None = None) -> tuple[Any, tuple[str, str] | None]:
    """Wire text of a value; with json_leaf_module the JSON value. Also the
    (prefix, namespace) an XML identityref needs declared."""
    kind, v = _scalar(value, vtype)
    if kind == "identityref":
        module, ident = _identity_module(value)  # type: ignore[misc]
        if json_leaf_module is not None:
            return (ident if module == json_leaf_module else f"{module}:{ident}"), None
        prefix = schema.prefixes.get(module, module)
        return f"{prefix}:{ident}", (prefix, schema.namespaces[module])
    if kind == "bool":
        return (v if json_leaf_module is not None else ("true" if v else "false")), None
    if kind == "empty":
        return ([None] if json_leaf_module is not None else ""), None
    if kind == "decimal":
        return _decimal_text(v), None
    if kind == "int":
        return (v if json_leaf_module is not None else str(v)), None
    if kind == "int64":
        return str(v), None
    if kind == "binary":
        return base64.b64encode(bytes(v)).decode("ascii"), None
    return v, None


def _parse_scalar(text: str, vtype: ValueType, path: str) -> Any:
    """Lexical check of wire text for types pyangbind coerces too loosely."""
    base = vtype.base
    if base == "boolean":
        if text not in ("true", "false"):
            raise CodecError("invalid-value", path, f"'{text}' is not a boolean (true or false)")
        return text == "true"
    if base in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        if not _INT_RE.match(text.strip()):
            raise CodecError("invalid-value", path, f"'{text}' is not an integer")
        return int(text)
    if base == "decimal64":
        if not _DEC_RE.match(text.strip()):
            raise CodecError("invalid-value", path, f"'{text}' is not a decimal number")
        try:
            return Decimal(text.strip())
        except InvalidOperation as exc:  # pragma: no cover - regex guards
            raise CodecError("invalid-value", path, f"'{text}' is not a decimal number") from exc
    if base == "empty":
        if text.strip():
            raise CodecError("invalid-value", path, "an empty leaf takes no value")
        return True
    if base == "binary":
        try:
            return base64.b64decode(text.strip(), validate=True)
        except ValueError as exc:
            raise CodecError("invalid-value", path, "not base64") from exc
    return text


def _pyangbind_message(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, dict):
        return str(arg.get("error-string", arg))
    return str(arg)


def _invalid(node: SchemaNode, value: Any, exc: Exception) -> str:
    """Why pyangbind refused `value` for leaf `node`, in YANG terms: pyangbind says
    "link_key_limit must be of a type compatible with uint32" (a list key: its whole
    generated class); the leaf's name and the restriction the value broke say more."""
    if node.type is None:
        return _pyangbind_message(exc)
    return f"'{value}' is not a valid {node.name}: {node.type.describe()}"


def _assign(obj: Any, node: SchemaNode, value: Any, path: str) -> None:
    try:
        if node.keyword == "leaf-list":
            member = child(obj, node.name)
            if value not in list(member):
                member.append(value)
        else:
            set_leaf(obj, node.name, value)
    except (ValueError, TypeError, KeyError) as exc:
        raise CodecError("invalid-value", path, _invalid(node, value, exc)) from None


# --- walking ------------------------------------------------------------------------


def _has_content(obj: Any, node: SchemaNode, config_only: bool) -> bool:
    if node.keyword == "leaf":
        return leaf_is_set(obj)
    if node.keyword == "leaf-list":
        return len(obj) > 0
    if node.keyword == "list":
        return len(obj) > 0
    if node.presence and getattr(obj, "_present", lambda: False)():
        return True
    return any(
        _has_content(child(obj, ch.name), ch, config_only)
        for ch in node.children.values()
        if not (config_only and not ch.config)
    )


def ordered_children(node: SchemaNode) -> list[SchemaNode]:
    """Schema order, with list keys first (RFC 7950 7.8.5)."""
    kids = list(node.children.values())
    if node.keyword == "list" and node.keys:
        keys = [n for k in node.keys for n in kids if n.name == k]
        return keys + [n for n in kids if n.name not in node.keys]
    return kids


# --- XML ----------------------------------------------------------------------------


def encode_xml(root: Any, schema: Schema, *, config_only: bool = False) -> list[etree._Element]:
    """Top-level data nodes of a pyangbind module object, as XML elements."""
    out = []
    for snode in schema.roots.values():
        attr = _attr_map(root).get(snode.name)
        if attr is None:
            continue
        obj = getattr(root, attr)
        if config_only and not snode.config:
            continue
        if not _has_content(obj, snode, config_only):
            continue
        out.extend(_xml_node(obj, snode, schema, config_only, None))
    return out


def element(node: SchemaNode, parent_ns: str | None, decl: tuple[str, str] | None = None) -> etree._Element:
    """An element for `node`, declaring its namespace where it changes and any
    prefix an identityref value uses."""
    nsmap: dict[str | None, str] = {}
    if node.namespace != parent_ns:
        nsmap[None] = node.namespace
    if decl is not None:
        nsmap[decl[0]] = decl[1]
    return etree.Element(f"{{{node.namespace}}}{node.name}", nsmap=nsmap or None)


def _xml_node(obj: Any, node: SchemaNode, schema: Schema, config_only: bool, parent_ns: str | None) -> list[etree._Element]:
    if node.keyword in ("leaf", "leaf-list"):
        values = ([obj] if leaf_is_set(obj) else []) if node.keyword == "leaf" else list(obj)
        els = []
        for value in values:
            text, decl = _text(value, node.type, schema)  # type: ignore[arg-type]
            el = element(node, parent_ns, decl)
            el.text = text
            els.append(el)
        return els
    if node.keyword == "list":
        els = []
        for entry in list_entries(obj):
            el = element(node, parent_ns)
            _xml_children(el, entry, node, schema, config_only)
            els.append(el)
        return els
    el = element(node, parent_ns)
    _xml_children(el, obj, node, schema, config_only)
    return [el]


def _xml_children(el: etree._Element, obj: Any, node: SchemaNode, schema: Schema, config_only: bool) -> None:
    for ch in ordered_children(node):
        if config_only and not ch.config:
            continue
        member = child(obj, ch.name)
        if ch.keyword == "container" and not _has_content(member, ch, config_only):
            continue
        for sub in _xml_node(member, ch, schema, config_only, node.namespace):
            el.append(sub)


def json_to_xml(data: dict[str, Any], schema: Schema) -> list[etree._Element]:
    """XML of an RFC 7951 JSON object, walked beside the schema (names, namespaces,
    schema order with list keys first, identityref prefixes) without building
    pyangbind objects: for edits whose values the server type-checks anyway.
    Unknown members raise CodecError; values are written as given."""
    out = []
    for qname, value in data.items():
        module, _, name = qname.rpartition(":")
        snode = schema.root_by_name(name, module or None)
        if snode is None:
            raise CodecError("unknown-element", f"/{qname}", f"unknown member '{qname}'")
        out.extend(_json_xml(value, snode, schema, None, snode.data_path(schema.prefixes)))
    return out


def _json_xml(value: Any, node: SchemaNode, schema: Schema, parent_ns: str | None, path: str) -> list[etree._Element]:
    if node.keyword in ("leaf", "leaf-list"):
        values = value if node.keyword == "leaf-list" else [value]
        els = []
        for v in values:
            text, decl = _json_leaf_text(v, node, schema)
            el = element(node, parent_ns, decl)
            el.text = text
            els.append(el)
        return els
    if node.keyword == "list":
        return [_json_xml_object(item, node, schema, parent_ns, path) for item in value]
    return [_json_xml_object(value, node, schema, parent_ns, path)]


def _json_xml_object(obj: dict[str, Any], node: SchemaNode, schema: Schema, parent_ns: str | None, path: str) -> etree._Element:
    el = element(node, parent_ns)
    members = {}
    for qname, v in obj.items():
        module, _, name = qname.rpartition(":")
        ch = node.child_by_name(name, module or node.module)
        if ch is None:
            raise CodecError("unknown-element", f"{path}/{qname}", f"unknown member '{qname}'")
        members[id(ch)] = v
    for ch in ordered_children(node):
        if id(ch) in members:
            pfx = schema.prefixes.get(ch.module, ch.module)
            for sub in _json_xml(members[id(ch)], ch, schema, node.namespace, f"{path}/{pfx}:{ch.name}"):
                el.append(sub)
    return el


def _json_leaf_text(value: Any, node: SchemaNode, schema: Schema) -> tuple[str, tuple[str, str] | None]:
    assert node.type is not None
    if "identityref" in node.type.bases() and isinstance(value, str):
        module, _, ident = value.rpartition(":")
        module = module or node.module
        prefix = schema.prefixes.get(module, module)
        return f"{prefix}:{ident}", (prefix, schema.namespaces[module])
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if value == [None]:
        return "", None
    if isinstance(value, Decimal):
        return _decimal_text(value), None
    return str(value), None


def decode_xml(elements: Iterable[etree._Element], root: Any, schema: Schema, *, config_only: bool = False) -> Any:
    """Merge XML top-level data nodes into a pyangbind module object; returns it."""
    for el in elements:
        if not isinstance(el.tag, str):
            continue
        ns, name = _split_tag(el)
        snode = schema.root(ns, name)
        if snode is None:
            raise _unknown(schema, ns, f"/{name}", name)
        if config_only and not snode.config:
            raise CodecError("state-data", snode.data_path(schema.prefixes), "state data is not configuration")
        obj = child(root, snode.name)
        _xml_fill(el, obj, snode, schema, config_only, snode.data_path(schema.prefixes))
    return root


def _split_tag(el: etree._Element) -> tuple[str, str]:
    q = etree.QName(el)
    return q.namespace or "", q.localname


def _unknown(schema: Schema, ns: str, path: str, name: str) -> CodecError:
    if ns and schema.module_of_namespace(ns) is None:
        return CodecError("unknown-namespace", path, f"namespace '{ns}' of <{name}> is not supported")
    return CodecError("unknown-element", path, f"unknown element <{name}>")


def _identity_from_xml(text: str, el: etree._Element, schema: Schema) -> str:
    """'pfx:NAME' (pfx declared in the document) -> 'module:NAME'."""
    text = text.strip()
    if ":" in text:
        pfx, ident = text.split(":", 1)
        ns = el.nsmap.get(pfx)
        module = schema.module_of_namespace(ns) if ns else None
        return f"{module}:{ident}" if module else text
    ns = el.nsmap.get(None)
    module = schema.module_of_namespace(ns) if ns else None
    if module and (module, text) in schema.identities:
        return f"{module}:{text}"
    return text  # unqualified: pyangbind resolves it when unambiguous


def _leaf_from_xml(el: etree._Element, node: SchemaNode, schema: Schema, path: str) -> Any:
    if len(el):
        raise CodecError("invalid-value", path, f"<{node.name}> is a leaf and takes no child elements")
    text = el.text or ""
    assert node.type is not None
    if "identityref" in node.type.bases():
        return _identity_from_xml(text, el, schema)
    if node.type.base == "union":
        return text
    return _parse_scalar(text, node.type, path)


def _xml_fill(el: etree._Element, obj: Any, node: SchemaNode, schema: Schema, config_only: bool, path: str, skip: tuple[str, ...] = ()) -> None:
    """Merge the children of `el` into container or list entry `obj`."""
    if node.presence and hasattr(obj, "_set_present"):
        obj._set_present()
    for sub in el:
        if not isinstance(sub.tag, str):
            continue
        ns, name = _split_tag(sub)
        if ns == node.namespace and name in skip:
            continue
        ch = node.child(ns, name)
        sub_path = f"{path}/{schema.prefixes.get(schema.module_of_namespace(ns) or '', 'unknown')}:{name}"
        if ch is None:
            raise _unknown(schema, ns, sub_path, name)
        if config_only and not ch.config:
            raise CodecError("state-data", sub_path, f"<{name}> is state data, not configuration")
        if ch.keyword in ("leaf", "leaf-list"):
            _assign(obj, ch, _leaf_from_xml(sub, ch, schema, sub_path), sub_path)
        elif ch.keyword == "container":
            _xml_fill(sub, child(obj, ch.name), ch, schema, config_only, sub_path)
        else:
            _xml_list_entry(sub, child(obj, ch.name), ch, schema, config_only, sub_path)


def _xml_list_entry(el: etree._Element, lst: Any, node: SchemaNode, schema: Schema, config_only: bool, path: str) -> Any:
    keys: dict[str, Any] = {}
    for kname in node.keys:
        knode = node.child_by_name(kname)
        assert knode is not None
        found = [s for s in el if isinstance(s.tag, str) and _split_tag(s) == (knode.namespace, kname)]
        kpath = f"{path}/{schema.prefixes.get(node.module)}:{kname}"
        if not found:
            raise CodecError("missing-element", kpath, f"list entry <{node.name}> has no key <{kname}>")
        keys[kname] = _leaf_from_xml(found[0], knode, schema, kpath)
    entry = _new_entry(lst, node, keys, path)
    _xml_fill(el, entry, node, schema, config_only, path + _predicate(node, keys, schema), skip=node.keys)
    return entry


def decode_entry(el: etree._Element, lst: Any, node: SchemaNode, schema: Schema, path: str) -> Any:
    """Decode one config list entry element into pyangbind list `lst` (path: the list's
    schema path, for errors); returns the entry."""
    return _xml_list_entry(el, lst, node, schema, True, path)


def _new_entry(lst: Any, node: SchemaNode, keys: dict[str, Any], path: str) -> Any:
    try:
        return add_entry(lst, keys) if node.keys else lst.add()
    except (ValueError, TypeError, KeyError) as exc:
        m = re.match(r"key value (\S+) must be valid", str(exc.args[0]) if exc.args else "")
        knode = node.child_by_name(m.group(1)) if m else None
        why = f"{m.group(0)}: {_invalid(knode, keys[knode.name], exc)}" if m and knode and knode.name in keys \
            else _pyangbind_message(exc)
        raise CodecError("invalid-value", path, why) from None


def _predicate(node: SchemaNode, keys: dict[str, Any], schema: Schema) -> str:
    pfx = schema.prefixes.get(node.module, node.module)
    return "".join(f"[{pfx}:{k}='{v}']" for k, v in keys.items())


# --- JSON (RFC 7951) --------------------------------------------------------------


def encode_json(root: Any, schema: Schema, *, config_only: bool = False) -> dict[str, Any]:
    """RFC 7951 JSON object of a pyangbind module object's top-level nodes."""
    out: dict[str, Any] = {}
    for snode in schema.roots.values():
        attr = _attr_map(root).get(snode.name)
        if attr is None or (config_only and not snode.config):
            continue
        obj = getattr(root, attr)
        if not _has_content(obj, snode, config_only):
            continue
        out[f"{snode.module}:{snode.name}"] = _json_value(obj, snode, schema, config_only)
    return out


def _json_value(obj: Any, node: SchemaNode, schema: Schema, config_only: bool) -> Any:
    if node.keyword == "leaf":
        return _text(obj, node.type, schema, json_leaf_module=node.module)[0]  # type: ignore[arg-type]
    if node.keyword == "leaf-list":
        return [_text(v, node.type, schema, json_leaf_module=node.module)[0] for v in obj]  # type: ignore[arg-type]
    if node.keyword == "list":
        return [_json_object(e, node, schema, config_only) for e in list_entries(obj)]
    return _json_object(obj, node, schema, config_only)


def _json_object(obj: Any, node: SchemaNode, schema: Schema, config_only: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ch in ordered_children(node):
        if config_only and not ch.config:
            continue
        member = child(obj, ch.name)
        if not _has_content(member, ch, config_only):
            continue
        name = ch.name if ch.module == node.module else f"{ch.module}:{ch.name}"
        out[name] = _json_value(member, ch, schema, config_only)
    return out


def decode_json(data: dict[str, Any], root: Any, schema: Schema, *, config_only: bool = False) -> Any:
    """Merge an RFC 7951 JSON object into a pyangbind module object; returns it."""
    if not isinstance(data, dict):
        raise CodecError("malformed", "/", "a JSON object is expected")
    for qname, value in data.items():
        module, _, name = qname.rpartition(":")
        if not module:
            raise CodecError("malformed", f"/{qname}", "top-level members must be qualified 'module:name' (RFC 7951 4)")
        snode = schema.root_by_name(name, module)
        if snode is None:
            if module not in schema.namespaces:
                raise CodecError("unknown-namespace", f"/{qname}", f"module '{module}' is not supported")
            raise CodecError("unknown-element", f"/{qname}", f"unknown member '{qname}'")
        if config_only and not snode.config:
            raise CodecError("state-data", snode.data_path(schema.prefixes), "state data is not configuration")
        _json_fill(value, child(root, snode.name), snode, schema, config_only, snode.data_path(schema.prefixes))
    return root


def _json_scalar(value: Any, node: SchemaNode, schema: Schema, path: str) -> Any:
    assert node.type is not None
    bases = node.type.bases()
    if "identityref" in bases and isinstance(value, str):
        if ":" not in value and (node.module, value) in schema.identities:
            return f"{node.module}:{value}"
        return value
    if node.type.base == "empty":
        if value != [None]:
            raise CodecError("invalid-value", path, "an empty leaf is written [null]")
        return True
    if node.type.base == "boolean":
        if not isinstance(value, bool):
            raise CodecError("invalid-value", path, f"{value!r} is not a JSON boolean")
        return value
    if node.type.base in ("int8", "int16", "int32", "uint8", "uint16", "uint32"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecError("invalid-value", path, f"{value!r} is not a JSON number")
        return value
    if node.type.base in ("int64", "uint64", "decimal64"):
        if not isinstance(value, str):
            raise CodecError("invalid-value", path, f"{value!r}: RFC 7951 writes {node.type.base} as a string")
        return _parse_scalar(value, node.type, path)
    if node.type.base == "union":
        return value
    if not isinstance(value, str):
        raise CodecError("invalid-value", path, f"{value!r} is not a string")
    return _parse_scalar(value, node.type, path)


def _json_fill(value: Any, obj: Any, node: SchemaNode, schema: Schema, config_only: bool, path: str) -> None:
    if not isinstance(value, dict):
        raise CodecError("invalid-value", path, f"<{node.name}> must be a JSON object")
    if node.presence and hasattr(obj, "_set_present"):
        obj._set_present()
    for qname, v in value.items():
        module, _, name = qname.rpartition(":")
        ch = node.child_by_name(name, module or node.module)
        sub_path = f"{path}/{schema.prefixes.get(module or node.module, module)}:{name}"
        if ch is None:
            raise CodecError("unknown-element", sub_path, f"unknown member '{qname}'")
        if config_only and not ch.config:
            raise CodecError("state-data", sub_path, f"'{name}' is state data, not configuration")
        if ch.keyword == "leaf":
            _assign(obj, ch, _json_scalar(v, ch, schema, sub_path), sub_path)
        elif ch.keyword == "leaf-list":
            if not isinstance(v, list):
                raise CodecError("invalid-value", sub_path, "a leaf-list is a JSON array")
            for item in v:
                _assign(obj, ch, _json_scalar(item, ch, schema, sub_path), sub_path)
        elif ch.keyword == "container":
            _json_fill(v, child(obj, ch.name), ch, schema, config_only, sub_path)
        else:
            if not isinstance(v, list):
                raise CodecError("invalid-value", sub_path, "a list is a JSON array")
            for item in v:
                _json_list_entry(item, child(obj, ch.name), ch, schema, config_only, sub_path)


def _json_list_entry(item: Any, lst: Any, node: SchemaNode, schema: Schema, config_only: bool, path: str) -> None:
    if not isinstance(item, dict):
        raise CodecError("invalid-value", path, "a list entry is a JSON object")
    keys: dict[str, Any] = {}
    for kname in node.keys:
        knode = node.child_by_name(kname)
        assert knode is not None
        raw = item.get(kname, item.get(f"{node.module}:{kname}"))
        if raw is None:
            raise CodecError("missing-element", f"{path}/{schema.prefixes.get(node.module)}:{kname}", f"list entry '{node.name}' has no key '{kname}'")
        keys[kname] = _json_scalar(raw, knode, schema, path)
    entry = _new_entry(lst, node, keys, path)
    rest = {k: v for k, v in item.items() if k.rpartition(":")[2] not in node.keys}
    _json_fill(rest, entry, node, schema, config_only, path + _predicate(node, keys, schema))


def to_xml_string(elements: list[etree._Element]) -> str:
    return "".join(etree.tostring(e, pretty_print=True, encoding="unicode") for e in elements)


__all__ = [
    "CodecError",
    "add_entry",
    "child",
    "decode_json",
    "decode_entry",
    "decode_xml",
    "encode_json",
    "encode_xml",
    "json_to_xml",
    "leaf_value",
    "to_xml_string",
]
