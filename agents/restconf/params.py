"""RFC 8040 section 4.8 query parameters: which a method takes, their syntax, and the
depth / fields / content pruning of a retrieved RFC 7951 value."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sdqkd.agents.netconf import errors as nc
from sdqkd.agents.restconf.errors import RestconfError, fail
from sdqkd.yangdata import SchemaNode

ALLOWED = {
    "GET": {"depth", "fields", "content", "with-defaults"},
    "HEAD": {"depth", "fields", "content", "with-defaults"},
    "POST": {"insert", "point"},
    "PUT": {"insert", "point"},
    "PATCH": set(),
    "DELETE": set(),
    "OPTIONS": set(),
}
STREAM_PARAMS = {"start-time", "stop-time"}
WITH_DEFAULTS = ("explicit", "trim", "report-all")

Fields = dict[str, "Fields | None"]


@dataclass
class Query:
    depth: int | None = None
    fields: Fields | None = None
    content: str = "all"
    with_defaults: str = "explicit"


def parse(method: str, pairs: list[tuple[str, str]], allowed: set[str] | None = None) -> Query:
    """400 invalid-value for a parameter the method does not take, a repeated one, or a bad value."""
    ok = ALLOWED.get(method, set()) if allowed is None else allowed
    seen: set[str] = set()
    q = Query()
    for name, value in pairs:
        if name not in ok:
            raise _bad(f"query parameter '{name}' is not allowed with {method}")
        if name in seen:
            raise _bad(f"query parameter '{name}' appears twice")
        seen.add(name)
        if name == "depth":
            if value != "unbounded":
                if not value.isdigit() or not 1 <= int(value) <= 65535:
                    raise _bad("depth must be 'unbounded' or 1..65535")
                q.depth = int(value)
        elif name == "content":
            if value not in ("config", "nonconfig", "all"):
                raise _bad("content must be config, nonconfig or all")
            q.content = value
        elif name == "with-defaults":
            if value not in WITH_DEFAULTS:
                raise _bad(f"with-defaults '{value}' is not supported (supported: {', '.join(WITH_DEFAULTS)})")
            q.with_defaults = value
        elif name == "fields":
            q.fields = parse_fields(value)
        elif name in ("insert", "point"):
            raise fail(400, nc.InvalidValue, f"'{name}' applies to ordered-by user lists; this server has none")
    return q


def _bad(message: str) -> RestconfError:
    return fail(400, nc.InvalidValue, message)


_TOKEN = re.compile(r"\s*([();/]|[A-Za-z_][\w.-]*(?::[A-Za-z_][\w.-]*)?)")


def parse_fields(text: str) -> Fields:
    """fields-expr (RFC 8040 4.8.3): path "(" fields-expr ")" / path ";" fields-expr / path."""
    if not text.strip():
        raise _bad("fields: empty (RFC 8040 4.8.3: at least one path)")
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise _bad(f"fields: unexpected '{text[pos:]}'")
        tokens.append(m.group(1))
        pos = m.end()
    out, rest = _expr(tokens)
    if rest:
        raise _bad("fields: unbalanced parentheses")
    return out


def _expr(tokens: list[str]) -> tuple[Fields, list[str]]:
    out: Fields = {}
    while tokens:
        path = [tokens.pop(0)]
        while tokens and tokens[0] == "/":
            tokens.pop(0)
            if not tokens or tokens[0] in "();/":
                raise _bad("fields: a '/' must be followed by a name")
            path.append(tokens.pop(0))
        if path[0] in "();/":
            raise _bad("fields: a name was expected")
        sub: Fields | None = None
        if tokens and tokens[0] == "(":
            tokens.pop(0)
            sub, tokens = _expr(tokens)
            if not tokens or tokens[0] != ")":
                raise _bad("fields: missing ')'")
            tokens.pop(0)
        cur = out
        for name in path[:-1]:
            nxt = cur.get(name.split(":")[-1])
            if nxt is None:
                nxt = {}
                cur[name.split(":")[-1]] = nxt
            cur = nxt
        cur[path[-1].split(":")[-1]] = sub
        if tokens and tokens[0] == ";":
            tokens.pop(0)
            continue
        break
    return out, tokens


def _keys(node: SchemaNode | None) -> tuple[str, ...]:
    return node.keys if node is not None and node.keyword == "list" else ()


def _child(node: SchemaNode | None, member: str) -> SchemaNode | None:
    if node is None or node.keyword not in ("container", "list"):
        return None
    try:
        return node.named(member.split(":")[-1])
    except KeyError:
        return None


def check_fields(fields: Fields, node: SchemaNode | None) -> None:
    """Every name in `fields` is a data node below the target: a name the schema does not
    have is the client's mistake (400 invalid-value), not a request for nothing."""
    if node is None:  # the datastore resource: its members are checked as modules' top nodes
        return
    for name, sub in fields.items():
        child = _child(node, name)
        if child is None:
            raise _bad(f"fields: '{name}' is not a data node below '{node.name}'")
        if sub:
            check_fields(sub, child)


def prune(value: Any, node: SchemaNode | None, *, depth: int | None, fields: Fields | None) -> Any:
    """`value` (the target's RFC 7951 value, the target at depth 1) cut to `depth` and
    `fields`; list keys stay, so that each entry still says which it is."""
    if isinstance(value, list):
        return [prune(v, node, depth=depth, fields=fields) for v in value]
    if not isinstance(value, dict):
        return value
    keys = _keys(node)
    out = {}
    for member, v in value.items():
        name = member.split(":")[-1]
        if name in keys:
            out[member] = v
            continue
        if fields is not None and name not in fields:
            continue
        if depth is not None and depth <= 1:
            continue
        sub = fields.get(name) if fields is not None else None
        out[member] = prune(v, _child(node, member), depth=None if depth is None else depth - 1, fields=sub)
    return out


def by_content(value: Any, node: SchemaNode | None, want_config: bool, inherited: bool = True) -> Any:
    """Only configuration (content=config) or only state (nonconfig) nodes, with the
    containers, list entries and keys that lead to them; None when nothing is left."""
    if node is None:
        return value
    config = inherited and node.config
    if isinstance(value, list) and node.keyword == "list":
        kept = [by_content(v, node, want_config, inherited) for v in value]
        kept = [k for k in kept if k is not None]
        return kept or None
    if isinstance(value, dict) and node.keyword in ("container", "list"):
        keys = _keys(node)
        out = {}
        for member, v in value.items():
            if member.split(":")[-1] in keys:
                continue
            got = by_content(v, _child(node, member), want_config, config)
            if got is not None:
                out[member] = got
        if not out and not (node.keyword == "container" and config == want_config and not value):
            return None
        return {**{m: v for m, v in value.items() if m.split(":")[-1] in keys}, **out}
    return value if config == want_config else None
