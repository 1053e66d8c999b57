"""One RESTCONF agent's part in a transaction.

RESTCONF (RFC 8040) has no lock, no candidate and no confirmed commit: every write is
applied to running at once. A transaction that spans NETCONF and RESTCONF hops is made
atomic enough this way:

- lock: GET the configuration (content=config) with its entity-tag, and keep it: the saved
  copy rollback puts back, and the precondition of every write (If-Match, RFC 8040
  3.4.1.1/3.5.4): a change anyone else makes from now on fails this hop's first write with
  412 rather than being mixed with, or overwritten by, this one (optimistic concurrency in
  place of a lock).
- edit: the requests are built, each body type-checked by libyang (nothing to stage).
- commit: the writes, in an order in which each one leaves a valid configuration (the agent
  validates after each: link before the application over it, deletions last and in the
  reverse order), each If-Match the entity-tag the previous answered. This runs in the
  phase where NETCONF hops make their confirmed commit, after every NETCONF hop has
  validated its candidate, so a NETCONF hop's usual refusal (validation) comes before any
  RESTCONF write; and when this hop refuses, the NETCONF hops' commits are cancelled.
  Unlike a confirmed commit, the writes are live from here on: until the end (or the
  rollback) the agent may already act on them, as a NETCONF agent acts on its
  confirmed commit.
- confirm: nothing left to do; the writes stay undoable, so when a NETCONF hop fails its
  confirm this hop is put back too (only the NETCONF hops whose confirm went through are
  then left for the controller to reconcile).
- rollback (a hop anywhere failed before the end): each entry written is put back as saved:
  PUT of the saved entry, or DELETE of one that did not exist. Only what was written is put
  back (a write refused, 412 included, changed nothing), so a concurrent change by someone
  else survives (the restore itself is unconditional: a change to the same entry in the
  milliseconds between write and restore would be overwritten). If a restore fails the hop counts as committed (Hop.committed) and the
  controller reconciles it, as it does a NETCONF hop that died in the confirm phase; if the
  controller itself dies between commit and the end, reconciliation on its restart removes
  what it owned and no longer desires (every entry is owned before it is pushed).
"""
from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from ncclient.operations.rpc import RPCError

from sdqkd import yangdata
from sdqkd.controller.southbound.ops import DEPENDENCY_RANK, Edit

log = logging.getLogger(__name__)



def write_order(edits: list[Edit]) -> list[Edit]:
    """Merges and replacements in dependency order, then removals in the reverse one."""
    keep = sorted((e for e in edits if not e.delete), key=lambda e: DEPENDENCY_RANK[e.key[0]])
    drop = sorted((e for e in edits if e.delete), key=lambda e: -DEPENDENCY_RANK[e.key[0]])
    return keep + drop


def resource(target: list[tuple[str, tuple[Any, ...]]]) -> str:
    """The data resource of an entry (RFC 8040 3.5.3): data/module:top/child/list=k1,k2 with
    each key value percent-encoded."""
    steps = []
    for name, keys in target:
        steps.append(name + ("=" + ",".join(quote(str(k), safe="") for k in keys) if keys else ""))
    return "data/" + "/".join(steps)


def _schema_keys(target: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, ...]]:
    """The key leaf names of each step of a target."""
    module, top_name = target[0][0].split(":", 1)
    node = yangdata.top(yangdata.namespace_of(module) or "", top_name)
    if node is None:
        raise KeyError(target[0][0])
    out = [node.keys]
    for name, _ in target[1:]:
        node = node.named(name)
        out.append(node.keys)
    return out


def find_entry(doc: dict[str, Any], target: list[tuple[str, tuple[Any, ...]]]) -> dict[str, Any] | None:
    """The entry `target` names in an RFC 7951 document (a datastore's configuration), or None."""
    doc = doc.get("ietf-restconf:data", doc)
    node: Any = doc
    for (name, keys), key_names in zip(target, _schema_keys(target)):
        if not isinstance(node, dict):
            return None
        node = node.get(name)  # RFC 7951 4: only the top-level name (and a module change) is qualified
        if node is None:
            return None
        if key_names:
            node = next((e for e in node if all(str(e.get(k)) == str(v) for k, v in zip(key_names, keys))), None)
            if node is None:
                return None
    return node if isinstance(node, dict) else None


def _body(target: list[tuple[str, tuple[Any, ...]]], entry: dict[str, Any]) -> dict[str, Any]:
    """A PUT body for one list entry: the list's name, module-qualified, and the entry."""
    module = target[0][0].split(":", 1)[0]
    return {f"{module}:{target[-1][0]}": [entry]}


class RestconfHop:
    """`conn`: a southbound.restconf.RestconfConnection (its request() and get_json())."""

    def __init__(self, conn: Any, txn_id: str, edits: list[Edit]) -> None:
        self.conn = conn
        self.name: str = conn.addr.name
        self.qkdn_id: str = conn.qkdn_id
        self.txn = txn_id
        self.edits = write_order(edits)
        self.saved: dict[str, Any] = {}
        self.etag: str | None = None
        self.requests: list[tuple[str, str, Any, Edit]] = []
        self.written: list[Edit] = []  # applied, or sent without an answer (may be applied); emptied once put back

    @property
    def committed(self) -> bool:
        return bool(self.written)

    def lock(self) -> None:
        self.saved, self.etag = self.conn.get_json("data", content="config")

    def edit(self) -> None:
        self.requests = []
        for e in self.edits:
            doc = yangdata.encode_json(e.content(), config=True, forms="json").json  # type-checked, canonical
            target = e.target()
            if e.operation == "remove":
                self.requests.append(("DELETE", resource(target), None, e))
            elif e.operation == "replace":
                entry = find_entry(doc, target)
                self.requests.append(("PUT", resource(target), _body(target, entry or {}), e))
            else:  # merge: a plain PATCH of the datastore creates what is missing (RFC 8040 4.6.1)
                self.requests.append(("PATCH", "data", doc, e))

    def commit(self, timeout: int) -> None:
        for method, path, body, e in self.requests:
            headers = {"If-Match": self.etag} if self.etag else {}
            self.written.append(e)
            try:
                r = self.conn.request(method, path, body=body, headers=headers, ok_missing=method == "DELETE")
            except RPCError:
                self.written.pop()  # refused: a RESTCONF edit is all or nothing, this one changed nothing
                raise
            self.etag = r.headers.get("etag")

    def confirm(self) -> None:
        pass

    def rollback(self) -> None:
        if not self.written:
            return
        ok = True
        for e in reversed(self.written):
            target = e.target()
            before = find_entry(self.saved, target)
            try:
                if before is None:
                    self.conn.request("DELETE", resource(target), ok_missing=True)
                else:
                    self.conn.request("PUT", resource(target), body=_body(target, before))
            except Exception as exc:  # noqa: BLE001 - reconciliation puts it right (committed)
                ok = False
                log.warning("restoring %s %s on %s failed: %s", *e.key, self.name, exc)
        if ok:
            self.written = []

    def release(self) -> None:
        pass
