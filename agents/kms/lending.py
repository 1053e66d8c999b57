"""Lending link keys between the two ends of a QKD link.

Each end allocates only its half of a link's keys (lkms.allocator), so the two never
pad with the same key. When keys flow mostly one way, the sending end runs out of its
half while the other half idles. Here the short end (the borrower) asks its peer (the
lender) to cede some of the lender's half, over the relay channel:

1. The borrower proposes up to n IDs of the lender's half that it holds itself
   (`{"op": "lend", "link": ..., "keys": [...]}`): keys the lender has not used yet
   and that the borrower can use at once.
2. The lender, in one store transaction, takes one of them as a one-time MAC key
   (removed, spent) and flips up to n more from "mine" to "theirs" (KeyStore.cede),
   keeping at least `keep` keys of its own; after the commit it answers with their IDs,
   tagged (Poly1305) with that MAC key.
3. The borrower takes the MAC key by its ID, checks the tag and that every ceded ID
   is one it proposed, and only then flips them to "mine" (KeyStore.adopt).

Why no key is ever allocated by both ends. Think of the right to allocate a link key
as a token: each key starts with it at exactly one end (the allocator's parity). A
cede removes the token at the lender in a committed transaction; the token then exists
only in the one authenticated answer of that transaction, and the borrower takes it
only from that answer. So at every moment at most one end holds a key as "mine",
whatever crashes in between:
- the lender crashes before its commit: nothing changed; the borrower gets an error
  and adopts nothing;
- the lender crashes after the commit (or the answer is lost), or the borrower crashes
  before its adopt commits: the keys are "theirs" at both ends. Nobody allocates them:
  they are lost for use (at most one batch per such failure), never used twice. A
  later proposal naming them finds them "theirs" at the lender, which cedes only keys
  it still holds as "mine" and reports them dead (as it does keys it spent), so the
  borrower forgets them instead of proposing them again;
- an answer cannot be replayed or forged: its MAC key is one link key used for that
  answer only and spent by the borrower when checked (information-theoretic, like the
  relay messages: TLS is not what keeps a key from being used twice). A proposal is
  authenticated by the channel's mutual TLS only: a forged one could at worst make
  the lender give up keys (availability), never make two ends share one.
A key the lender used meanwhile (spent: gone from its store) is simply not ceded.
"""
from __future__ import annotations

import logging
from typing import Any

from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms.keystore import KeyStore, MissingKeys

log = logging.getLogger(__name__)

MAX_LEND = 4096  # IDs in one proposal


def borrow(store: KeyStore, forwarder: fm.Forwarder, link: str, peer: str, n: int) -> int:
    """Ask the peer to cede up to n of its half of `link`; how many this end may now allocate.
    Callers serialize borrows per link (two at once would propose the same keys)."""
    ids = store.peer_ids(link, min(n, MAX_LEND) + 1)  # +1: the answer's MAC key
    if len(ids) < 2:
        return 0
    try:
        reply = forwarder.request(peer, {"op": "lend", "link": link, "keys": ids})
    except fm.RelayError as exc:
        log.info("borrowing link keys of %s from %s failed: %s", link, peer, exc)
        return 0
    proposed = set(ids)
    ceded, mac_id, dead = reply.get("ceded") or [], reply.get("mac"), reply.get("dead") or []
    if not isinstance(ceded, list) or not isinstance(dead, list) or not proposed.issuperset(ceded) \
            or not proposed.issuperset(dead) or len(set(ceded)) != len(ceded) or set(ceded) & set(dead):
        log.warning("a lend answer from %s names keys not proposed; ignored", peer)
        return 0
    if dead:
        store.drop_ids(link, dead)
    if not ceded:
        return 0
    if mac_id not in proposed or mac_id in ceded:
        log.warning("a lend answer from %s has no usable MAC key; ignored", peer)
        return 0
    try:
        (mac_key,) = store.take_ids(link, [str(mac_id)])
    except MissingKeys:
        return 0
    try:
        fm.verify(reply, mac_key)
    except fm.RelayError:
        log.warning("a lend answer from %s failed authentication; ignored", peer)
        return 0
    return store.adopt(link, ceded)


def lend(store: KeyStore, link: str, msg: dict[str, Any], keep: int) -> dict[str, Any]:
    """The lender's side: cede proposed keys beyond the `keep` this end holds on to."""
    ids = msg["keys"]
    if not isinstance(ids, list) or len(ids) > MAX_LEND + 1 or not all(isinstance(k, str) for k in ids):
        raise fm.RelayError(f"a lend proposal is a list of at most {MAX_LEND + 1} key IDs", 400)
    if len(set(ids)) != len(ids):
        raise fm.RelayError("a lend proposal names a key more than once", 400)
    if not ids:
        return {"ok": True, "ceded": [], "dead": []}
    ceded, mac, dead = store.cede(link, ids, min(len(ids) - 1, store.count(link) - keep - 1))
    if mac is None:
        return {"ok": True, "ceded": [], "dead": dead}
    return fm.sign({"ok": True, "op": "lent", "link": link, "ceded": ceded, "dead": dead, "mac": mac[0]}, mac[1])
