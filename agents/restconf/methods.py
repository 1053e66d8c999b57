"""The data resource methods (RFC 8040 sections 4.3-4.7) on the agent's datastores: reads
are the NETCONF <get>/<get-config> documents as RFC 7951 JSON, and every edit is an
<edit-config> on running through Datastores.edit, so it meets the same libyang validation,
locks, semantic and device checks, commit hooks and notifications as a NETCONF one."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.datastore.model import ModelSet
from sdqkd.agents.datastore.store import Datastores
from sdqkd.agents.kms import https
from sdqkd.agents.netconf import errors as nc
from sdqkd.agents.restconf import etag, params, paths
from sdqkd.agents.restconf.errors import RestconfError, fail, from_rpc
from sdqkd.agents.restconf.paths import Step

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
OPERATION = f"{{{NC_NS}}}operation"
SESSION = 0  # the session id RESTCONF edits carry: no NETCONF session has it (they start at 1)


@dataclass
class Edited:
    status: int
    location: list[Step] | None = None


def _flat(per_module: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: v for m in per_module.values() for k, v in m.items()}


class Resources:
    """What the HTTP handlers call; every method is blocking (run it off the event loop)."""

    def __init__(self, models: ModelSet, datastores: Datastores, fill_state: Callable[[dict[str, Any]], None]) -> None:
        self.models, self.datastores, self.fill_state = models, datastores, fill_state
        self.versions = etag.Versions()
        self._yang_library: dict[str, Any] | None = None

    def yang_library(self) -> dict[str, Any]:
        """ietf-yang-library of the process's libyang context (fixed for its life)."""
        if self._yang_library is None:
            self._yang_library = yangdata.yang_library(1)
        return self._yang_library

    # --- reading -----------------------------------------------------------------------

    def document(self, content: str, with_defaults: str, extra: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The whole datastore as RFC 7951 JSON: running (content=config) or running with
        the devices' state (as <get> has it)."""
        if content == "config":
            elements, config = self.datastores.get("running"), True
        else:
            live = copy.deepcopy(self.datastores.running_config().json)
            self.fill_state(live)
            elements, config = self.models.operational(live), False
        try:
            elements = self.models.with_defaults(elements, with_defaults, config=config)
            doc = yangdata.parsed_json(elements, config=config)
        except yangdata.YangError as exc:
            raise from_rpc(nc.from_yang(exc)) from None
        except (nc.RpcError, nc.RpcErrors) as exc:
            raise from_rpc(exc) from None
        if content != "config":
            doc.update(self.yang_library())
            doc.update(extra())
        return doc

    def read(self, steps: list[Step], q: params.Query, extra: Callable[[], dict[str, Any]] = dict) -> Any:
        """The target's value (no steps: the datastore's), pruned per the query; 404 if absent.
        `extra`: state of other modules (ietf-restconf-monitoring) for content=all/nonconfig."""
        doc = self.document(q.content, q.with_defaults, extra)
        if not steps:  # the datastore (depth 1): each top-level node on its own, at depth 2
            if q.depth == 1:
                return {}
            out = {}
            for m, v in doc.items():
                name = m.rpartition(":")[2]
                if q.fields is not None and name not in q.fields:
                    continue
                sub = dataclasses.replace(q, fields=q.fields.get(name) if q.fields is not None else None)
                shaped = self._shape(v, _top(m), sub, depth_offset=1)
                if shaped is not None:
                    out[m] = shaped
            return out
        value = paths.select(doc, steps)
        if value is None:
            raise fail(404, nc.InvalidValue, "no such data resource", error_type="application", path=None)
        value = self._shape(value, steps[-1].node, q)
        if value is None:
            raise fail(404, nc.InvalidValue, f"the resource has no {q.content} data", error_type="application")
        return value

    @staticmethod
    def _shape(value: Any, node: Any, q: params.Query, depth_offset: int = 0) -> Any:
        """content, then fields and depth, on one node's value (None: nothing of it is left)."""
        if q.content != "all":
            value = params.by_content(value, node, q.content == "config")
            if value is None:
                return None
        if q.fields is not None:
            params.check_fields(q.fields, node)
        if q.depth is not None or q.fields is not None:
            depth = None if q.depth is None else q.depth - depth_offset
            value = params.prune(value, node, depth=depth, fields=q.fields)
        return value

    def etag(self) -> tuple[str, float]:
        return self.versions.current(self.datastores.running_config())

    # --- editing -----------------------------------------------------------------------

    def edit(self, method: str, steps: list[Step], body: dict[str, Any] | None, headers: dict[str, str],
             create_children: bool = False) -> Edited:
        """PUT, PATCH, POST or DELETE of the target `steps` with an RFC 7951 body (one member)."""
        with self.datastores.lock:  # the preconditions hold until the edit is done
            self._no_netconf_change_pending()
            self.preconditions(headers)
            running = _flat(self.datastores.running_config().json)
            existing = paths.select(running, steps) if steps else running
            if method == "PUT" and not steps:
                return self._replace_all(body or {})
            if method == "PATCH" and existing is None:
                raise fail(404, nc.InvalidValue, "PATCH cannot create its target (RFC 8040 4.6.1): it does not exist",
                           error_type="application")
            if method == "DELETE":
                if existing is None:
                    raise fail(409, nc.DataMissing, "no such data resource", error_type="application")
                kind = steps[-1].node.keyword
                doc, target = paths.skeleton(steps, existing if kind in ("leaf", "leaf-list") else {}), steps
            elif method == "POST":
                doc, target = self._post(steps, body or {}, create_children)
            else:
                doc, target = self._put_patch(steps, body or {})
            self._apply(doc, target, method, create_children)
            status = 204
            if method == "POST" or (method == "PUT" and existing is None):
                status = 201
            return Edited(status, target if method == "POST" and not create_children else None)

    def preconditions(self, headers: dict[str, str]) -> None:
        """If-Match, If-None-Match, If-Unmodified-Since on an edit (RFC 7232; RFC 8040 3.4.1): 412."""
        tag, modified = self.etag()
        if "if-match" in headers and not etag.tag_matches(headers["if-match"], tag):
            raise fail(412, nc.OperationFailed, "If-Match: the datastore's entity-tag differs", error_type="protocol")
        if "if-none-match" in headers and etag.tag_matches(headers["if-none-match"], tag):
            raise fail(412, nc.OperationFailed, "If-None-Match: the datastore's entity-tag matches", error_type="protocol")
        since = etag.parse_date(headers.get("if-unmodified-since", "")) if "if-unmodified-since" in headers else None
        if since is not None and int(modified) > since:
            raise fail(412, nc.OperationFailed, "If-Unmodified-Since: the datastore changed since", error_type="protocol")

    def _put_patch(self, steps: list[Step], body: dict[str, Any]) -> tuple[dict[str, Any], list[Step]]:
        if not steps:  # PATCH of the datastore: a merge of its top-level nodes
            return body, []
        node = steps[-1].node
        value = _only_member(body, node)
        if node.keyword == "list":
            if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
                raise fail(400, nc.InvalidValue, f"the body must hold exactly one '{node.name}' entry")
            if not paths.matches(value[0], steps[-1]) or any(k not in value[0] for k in node.keys):
                raise fail(400, nc.InvalidValue, "the key values of the body differ from the request URI's")
            return paths.skeleton(steps, value[0]), steps
        if node.keyword == "leaf-list" and steps[-1].keys is not None:
            if value != [paths.key_json(node, node.name, steps[-1].keys[0])] and value != [steps[-1].keys[0]]:
                raise fail(400, nc.InvalidValue, "a leaf-list entry's value cannot be changed")
            return paths.skeleton(steps, None), steps
        return paths.skeleton(steps, value), steps

    def _post(self, steps: list[Step], body: dict[str, Any], create_children: bool) -> tuple[dict[str, Any], list[Step]]:
        if create_children:  # TFS: the body names the target itself (agents/restconf/tfs.py)
            return paths.skeleton(steps, _only_member(body, steps[-1].node)), steps
        if len(body) != 1:
            raise fail(400, nc.InvalidValue, "a POST body holds exactly one child resource")
        member, value = next(iter(body.items()))
        mod, _, name = member.rpartition(":")
        parent = steps[-1].node if steps else None
        if parent is None:
            if not mod:
                raise fail(400, nc.InvalidValue, f"'{member}' needs its module name")
            child = yangdata.top(yangdata.namespace_of(mod) or "", name)
        else:
            ns = yangdata.namespace_of(mod) if mod else parent.namespace
            child = parent.child(ns or "", name) if parent.keyword in ("container", "list") else None
        if child is None:
            raise fail(400, nc.UnknownElement, f"'{member}' is not a child of the target", error_type="application",
                       info={"bad-element": name})
        keys: tuple[str, ...] | None = None
        if child.keyword == "list":
            if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
                raise fail(400, nc.InvalidValue, f"the body must hold exactly one '{name}' entry")
            missing = [k for k in child.keys if k not in value[0]]
            if missing:
                raise fail(400, nc.MissingElement, f"'{name}' needs its key {missing[0]}", error_type="application",
                           info={"bad-element": missing[0]})
            keys = tuple(_text(value[0][k]) for k in child.keys)
        elif child.keyword == "leaf-list":
            if not isinstance(value, list) or len(value) != 1:
                raise fail(400, nc.InvalidValue, f"the body must hold exactly one '{name}' value")
            keys = (_text(value[0]),)
        new = [*steps, Step(child, keys)]
        entry = value[0] if child.keyword == "list" else value
        doc = paths.skeleton(new, entry if child.keyword != "leaf-list" else None)
        return doc, new

    def _apply(self, doc: dict[str, Any], target: list[Step], method: str, create_children: bool) -> None:
        try:
            elements = yangdata.encode_json_xml(doc, config=True)
        except yangdata.YangError as exc:
            raise from_rpc(nc.from_yang(exc)) from None
        op = {"PUT": "replace", "PATCH": "merge", "POST": "create", "DELETE": "delete"}[method]
        if target:
            el = paths.find_xml(elements, target)
            if el is None:
                raise fail(400, nc.InvalidValue, "the body does not hold the target resource")
            node = target[-1].node
            if create_children:
                marked = [e for e in el if isinstance(e.tag, str)]
            elif node.keyword == "leaf-list" and target[-1].keys is None:  # the whole leaf-list: every entry
                parent = el.getparent()
                marked = [e for e in (parent if parent is not None else [el]) if e.tag == el.tag]
            else:
                marked = [el]
            for e in marked:
                e.set(OPERATION, op)
        elif op != "merge":
            for e in elements:
                e.set(OPERATION, op)
        holder = etree.Element(f"{{{NC_NS}}}config", nsmap={"nc": NC_NS})
        holder.extend(elements)
        self._edit(lambda: self.datastores.edit("running", holder, SESSION, "merge"))

    def _no_netconf_change_pending(self) -> None:
        """A RESTCONF edit goes to running at once (RFC 8040 1.4). A NETCONF client with the
        candidate locked is preparing a change whose commit copies the candidate over
        running, and a confirmed commit not yet confirmed is rolled back to the running
        configuration from before it: either would silently undo this edit. Refused as the
        running lock is: 409 lock-denied naming the session."""
        ds = self.datastores
        holder = ds.locks.get("candidate")
        if holder:
            raise RestconfError([nc.LockDenied(f"candidate is locked by session {holder}: its commit would overwrite "
                                               "this edit", info={"session-id": str(holder)})], 409)
        pending = ds.confirmed
        if pending is not None:
            raise RestconfError([nc.LockDenied("a confirmed commit is pending: its rollback would undo this edit",
                                               info={"session-id": str(pending.session_id)})], 409)

    def _replace_all(self, body: dict[str, Any]) -> Edited:
        try:
            elements = yangdata.encode_json_xml(body, config=True) if body else []
        except yangdata.YangError as exc:
            raise from_rpc(nc.from_yang(exc)) from None
        self._edit(lambda: self.datastores.copy(elements, "running", SESSION))
        return Edited(204)

    def _edit(self, run: Callable[[], None]) -> None:
        try:
            run()
        except nc.InUse as exc:  # a NETCONF session holds the lock (RFC 8040 1.4, 7)
            err = nc.LockDenied(exc.message, info=exc.info)
            raise RestconfError([err], 409) from None
        except (nc.RpcError, nc.RpcErrors) as exc:
            raise from_rpc(exc) from None


def _top(member: str) -> Any:
    mod, _, name = member.partition(":")
    return yangdata.module_top(mod, name)


def _text(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _only_member(body: dict[str, Any], node: Any) -> Any:
    """The value of the body's one member, which must name `node` (RFC 8040 4.5, 4.6)."""
    if not isinstance(body, dict) or len(body) != 1:
        raise fail(400, nc.InvalidValue, f"the body must hold exactly one member, '{node.module}:{node.name}'")
    member, value = next(iter(body.items()))
    mod, _, name = member.rpartition(":")
    if name != node.name or (mod and mod != node.module):
        raise fail(400, nc.InvalidValue, f"the body's '{member}' is not the target resource '{node.module}:{node.name}'")
    return value


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, through the agent's one JSON parser and its limits on
    nesting and numbers (https.parse_json): a hostile body is malformed, never a 500."""
    try:
        body = https.parse_json(raw)
    except https.ApiError as exc:
        raise fail(400, nc.MalformedMessage, f"the body is not acceptable JSON: {exc.message}", error_type="rpc") from None
    if not isinstance(body, dict):
        raise fail(400, nc.MalformedMessage, "the body is not a JSON object", error_type="rpc")
    return body


def xml_body(raw: bytes, steps: list[Step], post: bool) -> dict[str, Any]:
    """An XML body (the target's element; for POST the new child's) as the RFC 7951 body
    the JSON path takes: placed in its ancestors and read back through libyang."""
    try:
        root = etree.fromstring(raw, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise fail(400, nc.MalformedMessage, f"the body is not XML: {exc}", error_type="rpc") from None
    parents = steps if post else steps[:-1]
    if parents:
        top, at = paths.xml_skeleton(parents)
        at.append(root)
        elements = [top]
    else:
        elements = [root]
    try:
        doc = yangdata.parsed_json(elements, config=True)
    except yangdata.YangError as exc:
        raise from_rpc(nc.from_yang(exc)) from None
    q = etree.QName(root)
    mod = paths.module_of_namespace(q.namespace or "") or ""
    value = paths.select(doc, parents) if parents else doc
    if not isinstance(value, dict):
        raise fail(400, nc.InvalidValue, "the body does not fit the target")
    member = next((m for m in value if m.rpartition(":")[2] == q.localname), None)
    if member is None:
        raise fail(400, nc.InvalidValue, f"unknown element <{q.localname}>")
    return {f"{mod}:{q.localname}": value[member]}
