"""YANG data at run time: one libyang context per process, loaded from yang/.

libyang (the engine under sysrepo/Netopeer2 and FRR) parses, validates and encodes every
document the agents and the controller handle: types, ranges, fraction digits, patterns,
`when`, `must`, `mandatory`, `unique`, leaf-list uniqueness and leafrefs, in XML and
RFC 7951 JSON both ways. Trees never outlive a call here: each function parses, does its
work and frees what it made, and gives back text, lxml elements or JSON, so no caller
has to manage libyang's memory.

Failures are YangError with one Problem per libyang error: its message, the data path
(libyang's JSON-style path) and what kind of violation it is, which agents/netconf/errors.py
turns into rpc-errors (RFC 6241 appendix A, RFC 7950 section 15)."""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libyang
from _libyang import ffi, lib
from libyang.util import c2str
from lxml import etree

YANG_DIR = Path(__file__).resolve().parent.parent / "yang"

# Every module a process may meet at run time, with the features we implement.
MODULES: dict[str, tuple[str, ...]] = {
    "ietf-netconf": ("writable-running", "candidate", "confirmed-commit", "rollback-on-error", "validate", "startup"),
    "etsi-qkd-node-types": (),
    "etsi-qkd-sdn-node": (),
    "sdqkd-optical-switch": (),
    "sdqkd-qrng": (),
    "sdqkd-key-stock": (),
    "sdqkd-lab": (),
    "ietf-netconf-monitoring": (),
    "notifications": (),  # RFC 5277 create-subscription
    "nc-notifications": (),  # RFC 5277 /netconf/streams, replayComplete, notificationComplete
    "ietf-netconf-with-defaults": (),
    "tapi-common": (),
    "tapi-topology": (),
    "tapi-connectivity": (),
    "tapi-photonic-media": (),
    "ietf-restconf": (),  # RFC 8040: the agents' RESTCONF front end (agents/restconf/)
    "ietf-restconf-monitoring": (),
}

_LOCATION = re.compile(r'(?:Data|Schema) location "([^"]+)"')


@dataclass(frozen=True)
class Problem:
    """One violation. kind: 'type' (a value its type refuses), 'unknown' (no such node),
    'unknown-namespace', 'when', 'must', 'mandatory', 'unique', 'duplicate', 'too-many',
    'too-few', 'leafref', 'state' (state data in a config), 'syntax', 'other'."""

    kind: str
    message: str
    path: str | None = None  # /module:node/child[key='v']/leaf
    app_tag: str | None = None

    @property
    def node(self) -> str | None:
        """The name of the offending node (bad-element): the one the message names for an
        unknown node (the path is its parent's), else the last of the path."""
        named = re.search(r'Node "([^"]+)" not found', self.message)
        if named:
            return named.group(1).split(":")[-1]
        if not self.path:
            return None
        last = re.sub(r"\[[^\]]*\]", "", self.path).rstrip("/").rsplit("/", 1)[-1]
        return last.split(":")[-1] or None


class YangError(Exception):
    """libyang (or a check libyang leaves to us) refused a document."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems))


_KINDS = (
    ("When condition", "when"),
    ("Must condition", "must"),
    ("Mandatory node", "mandatory"),
    ("Mandatory choice", "mandatory"),
    ("Unique data leaf", "unique"),
    ("Duplicate instance", "duplicate"),
    ("Too many", "too-many"),
    ("Too few", "too-few"),
    ("leafref", "leafref"),
    ("not found as a child", "unknown"),
    ("No module with namespace", "unknown-namespace"),
    ("No module named", "unknown-namespace"),
    ("not found in any module", "unknown"),
    ("Invalid state data node", "state"),
    ("Unexpected data state node", "state"),
)


def _kind(vecode: int, msg: str) -> str:
    for needle, kind in _KINDS:
        if needle in msg:
            return kind
    if vecode in (lib.LYVE_SYNTAX, lib.LYVE_SYNTAX_XML, lib.LYVE_SYNTAX_JSON):
        return "syntax"
    if vecode == lib.LYVE_DATA:
        return "type"
    if vecode == lib.LYVE_REFERENCE:
        return "unknown"
    return "other"


def _problems(ctx: libyang.Context) -> list[Problem]:
    out = []
    err = lib.ly_err_first(ctx.cdata)
    while err:
        msg = c2str(err.msg) or "invalid data"
        where = c2str(err.path) if err.path else None
        m = _LOCATION.search(where or "")
        path = m.group(1) if m else None
        kind = _kind(err.vecode, msg)
        if kind == "type" and path:
            why = restriction(path)
            msg = f"{msg.rstrip('.')} ({why})." if why else msg
        out.append(Problem(kind, msg, path, c2str(err.apptag) if err.apptag else None))
        err = err.next
    lib.ly_err_clean(ctx.cdata, ffi.NULL)
    return out or [Problem("other", "libyang refused the data")]


@functools.cache
def context() -> libyang.Context:
    """The process's context: every module of MODULES implemented, with its features."""
    lib.ly_set_log_clb(ffi.NULL, True)  # keep data paths in the stored errors (the binding turns them off)
    ctx = libyang.Context(str(YANG_DIR))
    for name, features in MODULES.items():
        mod = ctx.load_module(name)
        if features:  # one call with all of them: each call replaces the set (if-features between them)
            names = [ffi.new("char[]", f.encode()) for f in features]
            if lib.lys_set_implemented(mod.cdata, ffi.new("char *[]", [*names, ffi.NULL])) != lib.LY_SUCCESS:
                raise YangError(_problems(ctx))
    return ctx


@contextlib.contextmanager
def _input(data: bytes) -> Iterator[Any]:
    """libyang's input over `data`, for one parse."""
    keep = ffi.new("char[]", data)  # alive as long as the input
    inp = ffi.new("struct ly_in **")
    if lib.ly_in_new_memory(keep, inp) != lib.LY_SUCCESS:
        raise YangError([Problem("other", "cannot read the input")])
    try:
        yield inp[0]
    finally:
        lib.ly_in_free(inp[0], 0)


def _parse(text: str | bytes, fmt: str, *, config: bool, validate: bool) -> Any:
    """lyd_parse_data with errors kept apart; the caller frees the returned tree (may be NULL)."""
    ctx = context()
    parse = lib.LYD_PARSE_STRICT | (lib.LYD_PARSE_NO_STATE if config else 0) | (0 if validate else lib.LYD_PARSE_ONLY)
    valid = (lib.LYD_VALIDATE_NO_STATE if config else 0) | lib.LYD_VALIDATE_PRESENT
    tree = ffi.new("struct lyd_node **")
    fmt_id = lib.LYD_XML if fmt == "xml" else lib.LYD_JSON
    with _input(text.encode() if isinstance(text, str) else text) as inp:
        ret = lib.lyd_parse_data(ctx.cdata, ffi.NULL, inp, fmt_id, parse, valid, tree)
    if ret != lib.LY_SUCCESS:
        problems = _problems(ctx)
        if tree[0]:
            lib.lyd_free_all(tree[0])
        raise YangError(problems)
    lib.ly_err_clean(ctx.cdata, ffi.NULL)
    return tree[0]


def _print(tree: Any, fmt: str, defaults: int = lib.LYD_PRINT_WD_EXPLICIT) -> str:
    """The whole forest as XML or JSON, by default with the values that are set (no
    defaults added); `defaults`: another of libyang's LYD_PRINT_WD_* modes."""
    buf = ffi.new("char **")
    flags = lib.LYD_PRINT_WITHSIBLINGS | lib.LYD_PRINT_SHRINK | defaults
    fmt_id = lib.LYD_XML if fmt == "xml" else lib.LYD_JSON
    if lib.lyd_print_mem(buf, tree, fmt_id, flags) != lib.LY_SUCCESS:
        raise YangError(_problems(context()))
    try:
        return c2str(buf[0]) if buf[0] else ""
    finally:
        lib.free(buf[0])


_DATE_AND_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-](\d{2}):(\d{2}))$", re.I)


def _date_and_time_ok(value: str) -> bool:
    """RFC 3339 section 5.6 with its ranges (libyang 2.1 checks only the pattern; 2026-13-45 passes it)."""
    m = _DATE_AND_TIME.match(value)
    if not m:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    offset_ok = m.group(9) is None or (int(m.group(9)) <= 23 and int(m.group(10)) <= 59)
    return hour <= 23 and minute <= 59 and second <= 60 and offset_ok  # second 60: a leap second


def _bad_date(value: str, path: str) -> Problem:
    return Problem("type", f'Invalid date-and-time value "{value}" (RFC 3339: a month, day, hour, minute or '
                   "second out of range).", path)


def _dates_in_xml(elements: Iterable[etree._Element]) -> list[Problem]:
    """libyang 2.1 checks date-and-time against its pattern only, then normalises the
    value (2026-13-45 becomes a date in 2027): the input text is checked here, before."""
    wanted, on_the_way = _date_leaves(), _date_ancestors()
    out: list[Problem] = []

    def walk(el: etree._Element, path: str, module: str | None) -> None:
        q = etree.QName(el)
        mod = namespaces().get(q.namespace or "", module)
        step = f"{mod}:{q.localname}" if mod != module else q.localname
        here = f"{path}/{step}"
        if here in wanted and not _date_and_time_ok((el.text or "").strip()):
            out.append(_bad_date((el.text or "").strip(), here))
        if here not in on_the_way:  # no date-and-time leaf below: nothing to look at
            return
        for ch in el:
            if isinstance(ch.tag, str):
                walk(ch, here, mod)

    for el in elements:
        if isinstance(el.tag, str):
            walk(el, "", None)
    return out


def _dates_in_json(data: Any) -> list[Problem]:
    wanted = _date_leaves()
    out: list[Problem] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, list):
            for item in obj:
                walk(item, path)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                here = f"{path}/{k}"
                if here in wanted:
                    for value in v if isinstance(v, list) else [v]:
                        if not isinstance(value, str) or not _date_and_time_ok(value):
                            out.append(_bad_date(str(value), here))
                else:
                    walk(v, here)

    walk(data, "")
    return out


@functools.cache
def _date_ancestors() -> frozenset[str]:
    """Every schema path above a date-and-time leaf (where the input walk must go down)."""
    out = set()
    for path in _date_leaves():
        steps = path.split("/")
        out.update("/".join(steps[:i]) for i in range(2, len(steps)))
    return frozenset(out)


@functools.cache
def _date_leaves() -> frozenset[str]:
    """Schema paths (/module:a/b, module again where it changes) of every date-and-time leaf."""
    out = set()
    todo = list(tops().values())
    while todo:
        n = todo.pop()
        if n.type_name == "ietf-yang-types:date-and-time":
            out.add(n.path)
        todo.extend(n.children() if n.keyword in ("container", "list") else [])
    return frozenset(out)


@dataclass(frozen=True)
class Document:
    """A validated document: canonical XML (schema order, canonical values) and RFC 7951 JSON."""

    xml: str
    json: dict[str, Any]

    def elements(self) -> list[etree._Element]:
        """The top-level elements of the XML (one per top-level node)."""
        if not self.xml:
            return []
        holder = etree.fromstring(f"<holder>{self.xml}</holder>".encode())
        return [el for el in holder if isinstance(el.tag, str)]

    def by_module(self) -> dict[str, dict[str, Any]]:
        """module -> {'module:top': ...}, the JSON split by each top-level node's module."""
        out: dict[str, dict[str, Any]] = {}
        for key, value in self.json.items():
            out.setdefault(key.split(":", 1)[0], {})[key] = value
        return out


def _document(tree: Any, forms: str = "xml json") -> Document:
    """The tree printed in `forms` (a form not asked for is left empty: printing a whole
    datastore costs as much as parsing it, and most callers read one form)."""
    if not tree:
        return Document("", {})
    return Document(_print(tree, "xml") if "xml" in forms else "",
                    json.loads(_print(tree, "json") or "{}") if "json" in forms else {})


def validate(text: str | bytes, fmt: str = "xml", *, config: bool = True,
             parsed: list[etree._Element] | dict[str, Any] | None = None) -> Document:
    """Parse and fully validate a data document (config only when `config`); YangError if
    invalid. `parsed`: the text as the caller already holds it (lxml elements, JSON object),
    which spares a second parse for the checks made before libyang's."""
    if fmt == "xml":
        if parsed is None:
            raw = text.encode() if isinstance(text, str) else text
            parsed = list(etree.fromstring(b"<holder>" + raw + b"</holder>"))
        problems = _dates_in_xml(parsed)  # type: ignore[arg-type]
    else:
        problems = _dates_in_json(json.loads(text) if parsed is None else parsed)
    tree = _parse(text, fmt, config=config, validate=True)  # libyang keeps each thread's errors apart
    try:
        if problems:
            raise YangError(problems)
        return _document(tree)
    finally:
        if tree:
            lib.lyd_free_all(tree)


def validate_elements(elements: Iterable[etree._Element], *, config: bool = True) -> Document:
    """validate() of a forest of lxml top-level elements (a datastore's content)."""
    elements = list(elements)
    return validate(b"".join(etree.tostring(el) for el in elements), "xml", config=config, parsed=elements)


def validate_json(data: dict[str, Any] | str, *, config: bool = True) -> Document:
    """validate() of an RFC 7951 JSON document."""
    if isinstance(data, str):
        return validate(data, "json", config=config)
    return validate(json.dumps(data), "json", config=config, parsed=data)


def encode_json(data: dict[str, Any] | str, *, config: bool = False, forms: str = "xml json") -> Document:
    """An RFC 7951 JSON document (config and state) re-encoded by libyang: every value is
    type-checked and made canonical, but the document as a whole is not validated (a
    <get> answers with what the devices report, even while a link lacks a mandatory figure)."""
    tree = _parse(data if isinstance(data, str) else json.dumps(data), "json", config=config, validate=False)
    try:
        return _document(tree, forms)
    finally:
        if tree:
            lib.lyd_free_all(tree)


def encode_json_xml(data: dict[str, Any] | str, *, config: bool = False) -> list[etree._Element]:
    """encode_json's XML elements alone (the JSON it would print is not made)."""
    return encode_json(data, config=config, forms="xml").elements()


def parsed(elements: Iterable[etree._Element], *, config: bool, forms: str = "xml json") -> Document:
    """Top-level XML elements re-encoded by libyang (values type-checked, canonical; the
    whole not validated): the RFC 7951 JSON of a datastore's content or of a <get> reply."""
    elements = [el for el in elements if isinstance(el.tag, str)]
    if not elements:
        return Document("", {})
    tree = _parse(b"".join(etree.tostring(el) for el in elements), "xml", config=config, validate=False)
    try:
        return _document(tree, forms)
    finally:
        if tree:
            lib.lyd_free_all(tree)


def parsed_json(elements: Iterable[etree._Element], *, config: bool) -> dict[str, Any]:
    """parsed's RFC 7951 JSON alone (the XML it would print is not made)."""
    return parsed(elements, config=config, forms="json").json


def notification_json(content: etree._Element) -> dict[str, Any]:
    """A notification's content element (RFC 5277) as RFC 7951 JSON {"module:name": {...}}."""
    with _operation(etree.tostring(content), "xml", lib.LYD_TYPE_NOTIF_YANG, validate=False) as tree:
        return json.loads(_print(tree, "json") or "{}")


def yang_library(content_id: int) -> dict[str, Any]:
    """The context's ietf-yang-library data (RFC 8525, and RFC 7895's modules-state), libyang's own."""
    ctx = context()
    tree = ffi.new("struct lyd_node **")
    if lib.ly_ctx_get_yanglib_data(ctx.cdata, tree, b"%u", ffi.cast("uint32_t", content_id)) != lib.LY_SUCCESS:
        raise YangError(_problems(ctx))
    try:
        return json.loads(_print(tree[0], "json") or "{}")
    finally:
        if tree[0]:
            lib.lyd_free_all(tree[0])


# RFC 6243 retrieval modes this engine renders, as libyang's printer modes.
WITH_DEFAULTS = {"explicit": lib.LYD_PRINT_WD_EXPLICIT, "trim": lib.LYD_PRINT_WD_TRIM, "report-all": lib.LYD_PRINT_WD_ALL}


def with_defaults(elements: Iterable[etree._Element], mode: str, *, config: bool, modules: Iterable[str] = ()) -> list[etree._Element]:
    """A document held as its explicit values (a datastore's content, a <get> reply) in an
    RFC 6243 retrieval mode, by libyang: report-all adds every default in use (libyang's
    implicit nodes, `when` honoured; state defaults too unless `config`) to the document's
    modules and `modules` (libyang would add every module's of the context); trim leaves
    out every node whose value is its schema default, even one a client set; explicit (the
    basic mode) is the document as held."""
    elements = [el for el in elements if isinstance(el.tag, str)]
    if mode == "explicit" or not elements:
        return elements
    tree = ffi.new("struct lyd_node **", _parse(b"".join(etree.tostring(el) for el in elements), "xml",
                                               config=config, validate=False))
    try:
        implicit = lib.LYD_IMPLICIT_NO_STATE if config else 0
        if mode == "report-all" and lib.lyd_new_implicit_all(tree, context().cdata, implicit, ffi.NULL) != lib.LY_SUCCESS:
            raise YangError(_problems(context()))
        out = Document(_print(tree[0], "xml", WITH_DEFAULTS[mode]), {}).elements()
    finally:
        if tree[0]:
            lib.lyd_free_all(tree[0])
    served = {etree.QName(el).namespace for el in elements} | {namespace_of(m) for m in modules}
    return [el for el in out if etree.QName(el).namespace in served]


@contextlib.contextmanager
def _operation(data: bytes, fmt: str, dtype: int, validate: bool) -> Iterator[Any]:
    """An RPC or notification parsed (and, with `validate`, validated) by libyang; the tree
    lives for the block. YangError with libyang's problems when it is not valid."""
    ctx = context()
    tree, node = ffi.new("struct lyd_node **"), ffi.new("struct lyd_node **")
    with _input(data) as inp:
        ret = lib.lyd_parse_op(ctx.cdata, ffi.NULL, inp, lib.LYD_XML if fmt == "xml" else lib.LYD_JSON, dtype, tree, node)
    try:
        if ret != lib.LY_SUCCESS or (validate and lib.lyd_validate_op(node[0], ffi.NULL, dtype, ffi.NULL) != lib.LY_SUCCESS):
            raise YangError(_problems(ctx))
        yield tree[0]
    finally:
        if tree[0]:
            lib.lyd_free_all(tree[0])


def check_rpc(op: etree._Element) -> None:
    """An operation's input parameters against their module's YANG (ietf-netconf's for the
    base operations: confirm-timeout is a uint32 1..max, session-id a uint32 ...); YangError."""
    with _operation(etree.tostring(op), "xml", lib.LYD_TYPE_RPC_YANG, validate=False):
        pass


def notification(content: dict[str, Any]) -> etree._Element:
    """A notification's content, {"module:name": {...}} in RFC 7951 JSON, validated against
    its module and written as the XML element a <notification> carries (RFC 5277)."""
    with _operation(json.dumps(content).encode(), "json", lib.LYD_TYPE_NOTIF_YANG, validate=True) as tree:
        return Document(_print(tree, "xml"), {}).elements()[0]


# --- schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaNode:
    """What the NETCONF edit engine needs to know of a schema node (from libyang's compiled schema)."""

    keyword: str  # container | list | leaf | leaf-list | anydata | anyxml
    name: str
    module: str
    namespace: str
    prefix: str
    config: bool
    keys: tuple[str, ...]
    identityref: bool
    type_name: str | None  # a leaf's type as module:typedef (ietf-yang-types:date-and-time), or its built-in name
    base: str | None  # a leaf's built-in base type (uint64, decimal64, string, ...)
    path: str  # schema path, /module:a/b (the module again where it changes)

    def child(self, namespace: str, name: str) -> SchemaNode | None:
        return _children(self.path).get((namespace, name))

    def children(self) -> list[SchemaNode]:
        return list(_children(self.path).values())

    def named(self, name: str) -> SchemaNode:
        """The child called `name`, in whichever module (an augmentation's)."""
        for (_, n), node in _children(self.path).items():
            if n == name:
                return node
        raise KeyError(f"{self.path} has no child {name!r}")


_JSON_STRINGS = {"int64", "uint64", "decimal64"}  # RFC 7951 6.1: as strings


def _json_value(node: SchemaNode, value: Any) -> Any:
    if node.base in _JSON_STRINGS or node.base in ("string", "enumeration", "identityref", "union", "leafref"):
        return str(value)
    if node.base == "boolean":
        return bool(value)
    if node.base and node.base.startswith(("int", "uint")):
        return int(value)
    return value


class Builder:
    """An RFC 7951 JSON object under construction, named from the schema: children of
    other modules (augmentations) get their module prefix, values their JSON form. For
    documents built in code (the TAPI context); validate_json() checks the result."""

    def __init__(self, node: SchemaNode, obj: dict[str, Any] | None = None) -> None:
        self.node, self.obj = node, {} if obj is None else obj

    @classmethod
    def top(cls, module: str, name: str) -> tuple[dict[str, Any], Builder]:
        """A document holding one top-level container, and the builder of that container."""
        node = top(namespace_of(module) or "", name)
        if node is None:
            raise KeyError(f"{module} has no top-level {name!r}")
        inner: dict[str, Any] = {}
        return {f"{module}:{name}": inner}, cls(node, inner)

    def _key(self, child: SchemaNode) -> str:
        return child.name if child.module == self.node.module else f"{child.module}:{child.name}"

    def child(self, path: str) -> Builder:
        """A container below this node (made on first use); `path` may have several steps."""
        b = self
        for name in path.split("/"):
            ch = b.node.named(name)
            b = Builder(ch, b.obj.setdefault(b._key(ch), {}))
        return b

    def entry(self, name: str, keys: dict[str, Any], leaves: dict[str, Any] | None = None) -> Builder:
        """A new entry of list `name`, with its keys and some leaves."""
        ch = self.node.named(name)
        e = Builder(ch)
        self.obj.setdefault(self._key(ch), []).append(e.obj)
        return e.set({**keys, **(leaves or {})})

    def set(self, leaves: dict[str, Any]) -> Builder:
        """Leaves (a list value for a leaf-list); None values are left out."""
        for name, value in leaves.items():
            if value is None:
                continue
            ch = self.node.named(name)
            self.obj[self._key(ch)] = ([_json_value(ch, v) for v in value] if ch.keyword == "leaf-list"
                                       else _json_value(ch, value))
        return self


def _snode(s: libyang.SNode) -> SchemaNode:
    mod = s.module()
    ident, tname, base = False, None, None
    if isinstance(s, (libyang.SLeaf, libyang.SLeafList)):
        ident, tname = "identityref" in set(s.type().basenames()), _type_id(mod.name(), s.type().name())
        base = s.type().basename()
    keys = tuple(k.name() for k in s.keys()) if isinstance(s, libyang.SList) else ()
    return SchemaNode(s.keyword(), s.name(), mod.name(), c2str(mod.cdata.ns), mod.prefix(), not s.config_false(), keys,
                      ident, tname, base, _data_schema_path(s))


@functools.cache
def _import_prefixes(module: str) -> dict[str, str]:
    """prefix -> module name of what `module` imports (libyang's compiled types keep only the prefix)."""
    text = next(YANG_DIR.glob(f"{module}@*.yang")).read_text()
    return {m.group(2): m.group(1) for m in re.finditer(r"import\s+([\w.-]+)\s*\{[^}]*?prefix\s+\"?([\w.-]+)", text)}


def _type_id(module: str, name: str) -> str:
    pfx, _, local = name.rpartition(":")
    if not pfx:
        return local
    return f"{_import_prefixes(module).get(pfx, module)}:{local}"


def _block(text: str, start: int) -> str:
    """The statement block that opens at the first '{' from `start`, braces balanced."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    return text[i:]


def _restrictions(block: str) -> list[str]:
    out = []
    for word in ("range", "length"):
        m = re.search(rf'\b{word}\s+"([^"]+)"', block)
        if m:
            out.append(f"{word} {m.group(1)}")
    m = re.search(r"\bfraction-digits\s+(\d+)", block)
    if m:
        out.append(f"fraction-digits {m.group(1)}")
    for m in re.finditer(r"\bpattern\s+((?:(?:'[^']*'|\"[^\"]*\")\s*\+?\s*)+)", block):
        parts = re.findall(r"'([^']*)'|\"([^\"]*)\"", m.group(1))  # YANG joins quoted strings with +
        out.append("pattern '" + "".join(a or b for a, b in parts) + "'")
    return out


def restriction(path: str) -> str | None:
    """What the type of the leaf at a data path allows, for error messages: "loss:
    loss-db (decimal64, range 0..100)". libyang says a value is out of range but not which
    range; the restriction is read from the module that defines the typedef (or from the
    leaf's own statement, when its name is unique in its module)."""
    return _restriction(re.sub(r"\[(?:[^\]']|'[^']*')*\]", "", path))


@functools.cache
def _restriction(schema_path: str) -> str | None:
    """restriction() by schema path: remembered per leaf of the schema, not per data path
    (a data path carries key values, as many as clients care to send)."""
    try:
        s = next(context().find_path(schema_path))
    except (libyang.LibyangError, StopIteration):
        return None
    if not isinstance(s, (libyang.SLeaf, libyang.SLeafList)):
        return None
    module, tname = s.module().name(), s.type().name()
    base = s.type().basename()
    tid = _type_id(module, tname)
    found: list[str] = []
    if ":" in tid or tid != base:  # a typedef
        tmod, _, local = tid.rpartition(":")
        try:
            text = next(YANG_DIR.glob(f"{tmod or module}@*.yang")).read_text()
        except StopIteration:
            text = ""
        m = re.search(rf"\btypedef\s+{re.escape(local)}\s*\{{", text)
        found = _restrictions(_block(text, m.start())) if m else []
        what = f"{local} ({', '.join([base, *found])})"
    else:
        text = next(YANG_DIR.glob(f"{module}@*.yang")).read_text()
        leaves = list(re.finditer(rf"\bleaf(?:-list)?\s+{re.escape(s.name())}\s*\{{", text))
        if len(leaves) == 1:
            body = _block(text, leaves[0].start())
            tm = re.search(r"\btype\s+[\w:.-]+\s*\{", body)
            found = _restrictions(_block(body, tm.start())) if tm else []
        what = f"{base} ({', '.join(found)})" if found else base
    return f"{s.name()}: {what}"


def _data_schema_path(s: libyang.SNode) -> str:
    """/module:a/b/c without choices and cases, the module named again where it changes."""
    steps = []
    while s is not None:
        if s.keyword() not in ("choice", "case"):
            steps.append(s)
        s = s.parent()
    out, module = "", None
    for n in reversed(steps):
        mod = n.module().name()
        out += f"/{mod}:{n.name()}" if mod != module else f"/{n.name()}"
        module = mod
    return out


@functools.cache
def _children(path: str) -> dict[tuple[str, str], SchemaNode]:
    ctx = context()
    parent = next(ctx.find_path(path))  # a data path without keys is a valid schema path here
    return {(n.namespace, n.name): n for n in (_snode(c) for c in parent.children())}


@functools.cache
def tops() -> dict[tuple[str, str], SchemaNode]:
    """(namespace, name) -> every top-level data node of the context's modules."""
    ctx = context()
    out = {}
    for name in MODULES:
        for s in ctx.get_module(name).children():
            if s.keyword() in ("container", "list", "leaf", "leaf-list", "anydata", "anyxml"):
                n = _snode(s)
                out[(n.namespace, n.name)] = n
    return out


@functools.cache
def module_top(module: str, name: str) -> SchemaNode | None:
    """The top-level data node `name` of any module of the context (libyang's own
    ietf-yang-library too, which tops() leaves out)."""
    try:
        mod = context().get_module(module)
    except libyang.LibyangError:
        return None
    for s in mod.children():
        if s.name() == name and s.keyword() in ("container", "list", "leaf", "leaf-list", "anydata", "anyxml"):
            return _snode(s)
    return None


def top(namespace: str, name: str) -> SchemaNode | None:
    """The top-level data node `name` of the module with `namespace`."""
    return tops().get((namespace, name))


@functools.cache
def namespaces() -> dict[str, str]:
    """namespace -> module name, of every module of the context."""
    return {c2str(m.cdata.ns): m.name() for m in context()}


def namespace_of(module: str) -> str | None:
    """The namespace of a module of the context (None for one it does not have)."""
    return _module_namespaces().get(module)


@functools.cache
def _module_namespaces() -> dict[str, str]:
    return {m: ns for ns, m in namespaces().items()}


@functools.cache
def prefixes() -> dict[str, str]:
    """YANG prefix -> namespace, of every module of the context (for error-path XPaths)."""
    return {m.prefix(): c2str(m.cdata.ns) for m in context()}


def prefixed_path(path: str) -> str:
    """libyang's /module:a/b[k='v']/c as an XPath with every step prefixed by its module's
    YANG prefix (/etsi-qkdn:a/etsi-qkdn:b[etsi-qkdn:k='v']/...), as error-path wants it."""
    ctx = context()
    out, module = [], None
    for step in re.findall(r"/((?:[^/\[\]']|\[(?:[^\]']|'[^']*')*\])+)", path):
        m = re.match(r"(?:([\w.-]+):)?([\w.-]+)(.*)$", step)
        if not m:
            return path
        module = m.group(1) or module
        try:
            pfx = ctx.get_module(module).prefix() if module else None
        except libyang.LibyangError:
            return path
        preds = re.sub(r"\[(?:([\w.-]+):)?([\w-][\w.-]*)=", lambda p: f"[{pfx}:{p.group(2)}=", m.group(3)) if pfx else m.group(3)
        out.append(f"{pfx}:{m.group(2)}{preds}" if pfx else m.group(2) + preds)
    return "/" + "/".join(out)
