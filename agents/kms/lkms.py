"""The LKMS of one node: serves keys to its SAEs (ETSI 014 / 004 front ends call it),
keeps link keys from the QKD modules in the key store, and moves keys to other nodes.

Where a key for (master, slave) comes from:
- both SAEs on this node: an end key drawn from the entropy source;
- slave on an adjacent node, over a PHYS link: link keys both ends already hold;
  this end allocates them (each end allocates its half of the link's key IDs, so
  the two never pick the same key; an end short of its half borrows unused keys of
  the peer's, see lending.py) and tells the peer which IDs make which key;
- otherwise (or for several slaves): a fresh end key from the entropy source,
  relayed hop by hop by the forwarding module along the virtual link the
  controller configured, one-time-padded with each hop's link key. A virtual link
  works from either end: from the end with the next hop keys go along next hops,
  from the far end along previous hops; each relay node sends a key on to the
  neighbour on the virtual link it did not come from.
If no application covers the pair yet, the controller is asked (sdqkdn_application_new)
and the caller gets 503 until the path is configured.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms import lending
from sdqkd.agents.kms.delivery import Deliveries
from sdqkd.agents.kms.keystore import Deliverable, KeyStore, MissingKeys, Reservation
from sdqkd.agents.kms.routes import AppRoute, LinkRoute, RouteTable
from sdqkd.agents.kms.interface import Key, KmsError, Qos, Status, Stream
from sdqkd.agents.kms.streams import Streams

log = logging.getLogger(__name__)


@dataclass
class LkmsConfig:
    kme_id: str  # this node's qkdn_id
    node: str
    saes: dict[str, str]  # every SAE of the network -> the qkdn_id of its node
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_key_count: int = 100000
    max_sae_id_count: int = 8
    default_ttl: int = 3600
    peer_wait: float = 2.0  # how long a peer waits for link keys it has not stored yet
    lend_keep: int = 16  # link keys of its own half an end keeps when the peer borrows (agents/kms/lending.py)
    lend_batch: int = 256  # link keys an end short of its half asks its peer for at once
    lend_min: int = 32  # ... and only when the peer could lend that many (each answer spends a MAC key)
    local_saes: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.kme_id = self.kme_id.lower()
        self.saes = {k: v.lower() for k, v in self.saes.items()}
        if not self.local_saes:
            self.local_saes = {s for s, kme in self.saes.items() if kme == self.kme_id}


def allocator(own: str, remote: str) -> Callable[[str], bool]:
    """The end with the lower qkdn_id allocates link keys whose ID ends in an even hex digit."""
    lower = own.lower() < remote.lower()
    return lambda key_id: (int(key_id[-1], 16) % 2 == 0) == lower


class Lkms:
    """Implements sdqkd.agents.kms.interface.KeyService."""

    def __init__(self, cfg: LkmsConfig, store: KeyStore, entropy: Callable[[int], bytes] = os.urandom,
                 forwarder: fm.Forwarder | None = None, on_missing_path: Callable[..., None] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.entropy = entropy
        self.forwarder = forwarder
        self.on_missing_path = on_missing_path
        self.routes = RouteTable(cfg.kme_id)
        self._lock = threading.Lock()
        self._credit: dict[str, dict[str, float]] = {}  # per application, per path: weighted round robin
        self._borrowing: dict[str, threading.Lock] = {}  # per link: one borrow at a time
        self._allocated: dict[str, str] = {}  # PHYS link -> the remote its allocator was set for
        self.streams = Streams(self)
        self.deliveries = Deliveries()  # per application: keys handed to its SAEs here
        if forwarder is not None:
            forwarder.start(self.handle_relay)

    # --- configuration -------------------------------------------------------------------

    def update_routes(self, table: RouteTable) -> None:
        """Called after every commit; PHYS links get their allocation rule. Only a new or
        re-pointed link touches the key store (its lock is the one link-key flushes and
        checkpoints hold: taking it on every commit delayed provisioning)."""
        for lk in table.links.values():
            if lk.kind == "PHYS" and lk.remote and self._allocated.get(lk.qkdl_id) != lk.remote:
                self.store.set_allocator(lk.qkdl_id, allocator(self.cfg.kme_id, lk.remote))
                self._allocated[lk.qkdl_id] = lk.remote
        with self._lock:
            self.routes = table
            self._credit.clear()

    def key_sink(self, link: str, key_id: str, key: bytes) -> None:
        """Where the QKD modules deliver link keys."""
        self.store.sink(link.lower(), key_id, key)

    def key_room(self, link: str) -> bool:
        """Whether the QKD modules of `link` may deliver more keys (the store is bounded)."""
        return self.store.room(link.lower())

    # --- checks ------------------------------------------------------------------------------

    def _local(self, sae: str) -> None:
        if sae not in self.cfg.local_saes:
            raise KmsError(401, f"SAE '{sae}' is not attached to this KME")

    def _known(self, sae: str) -> str:
        kme = self.cfg.saes.get(sae)
        if kme is None:
            raise KmsError(400, f"unknown SAE '{sae}'")
        return kme

    def _size(self, size: int | None) -> int:
        size = self.cfg.key_size if size is None else size
        if size < self.cfg.min_key_size or size > self.cfg.max_key_size or size % 8:
            raise KmsError(400, f"size must be a multiple of 8 from {self.cfg.min_key_size} to {self.cfg.max_key_size} bits")
        return size

    # --- ETSI 014 --------------------------------------------------------------------------------

    def status(self, master_sae: str, slave_sae: str) -> Status:
        self._local(master_sae)
        kme = self._known(slave_sae)
        return Status(
            source_KME_ID=self.cfg.kme_id,
            target_KME_ID=kme,
            master_SAE_ID=master_sae,
            slave_SAE_ID=slave_sae,
            key_size=self.cfg.key_size,
            stored_key_count=self._stored(master_sae, slave_sae, kme),
            max_key_count=self.cfg.max_key_count,
            max_key_per_request=self.cfg.max_key_per_request,
            max_key_size=self.cfg.max_key_size,
            min_key_size=self.cfg.min_key_size,
            max_SAE_ID_count=self.cfg.max_sae_id_count,
        )

    def _stored(self, master: str, slave: str, kme: str) -> int:
        """Keys of the default size that could be served now."""
        if kme == self.cfg.kme_id:
            return self.cfg.max_key_count
        app = self.routes.app_for(master, slave)
        if app is None:
            return 0
        paths = self._paths(app)
        if paths and all(p.kind == "PHYS" for p in paths):  # reserved from one link, no pad
            total = max(self._stock(p.qkdl_id) for p in paths) // fm.parts_for(self.cfg.key_size)
        else:
            messages: dict[str, int] = {}  # per first hop (shared by paths: counted once), a MAC key per path's message
            for f in map(self._first_hop, paths):
                if f is not None:
                    messages[f.qkdl_id] = messages.get(f.qkdl_id, 0) + 1
            total = sum(max(0, self._stock(f) - m) // fm.parts_for(self.cfg.key_size) for f, m in messages.items())
        return min(total, self.cfg.max_key_count)

    def enc_keys(self, master_sae: str, slave_sae: str, number: int, size: int | None, additional_slaves: list[str]) -> list[Key]:
        self._local(master_sae)
        size = self._size(size)
        if number < 1 or number > self.cfg.max_key_per_request:
            raise KmsError(400, f"number must be from 1 to {self.cfg.max_key_per_request}")
        targets = [slave_sae, *additional_slaves]
        if len(set(targets)) != len(targets) or master_sae in targets and len(targets) > 1:
            raise KmsError(400, "slave SAE IDs repeat")
        if len(targets) > self.cfg.max_sae_id_count:
            raise KmsError(400, f"at most {self.cfg.max_sae_id_count} slave SAEs")
        plans = [(t, self._known(t)) for t in targets]
        ttl = self.cfg.default_ttl
        apps: list[tuple[str, AppRoute | None]] = []
        for t, kme in plans:
            app = None if kme == self.cfg.kme_id else self._app(master_sae, t)
            apps.append((t, app))
            if app is not None and app.ttl:
                ttl = min(ttl, app.ttl)
        expires = time.time() + ttl
        ids = [str(uuid.uuid4()) for _ in range(number)]
        if len(apps) == 1 and apps[0][1] is not None:
            paths = self._paths(apps[0][1])
            if paths and all(p.kind == "PHYS" for p in paths):
                keys = self._reserve(paths, ids, size, master_sae, slave_sae, expires)
                self.store.record_usage(apps[0][1].app_id, number * size)
                self.deliveries.record(apps[0][1].app_id, number, number * size)
                return keys
        end_keys = [self.entropy(size // 8) for _ in ids]
        for t, app in apps:
            if app is None:
                self.store.put_deliverable(Deliverable(i, t, master_sae, k, expires) for i, k in zip(ids, end_keys))
            else:
                self._relay_over(app, ids, end_keys, master_sae, t, expires)
                self.store.record_usage(app.app_id, number * size)
                self.deliveries.record(app.app_id, number, number * size)
        return [Key(i, k) for i, k in zip(ids, end_keys)]

    def batch(self) -> AbstractContextManager[None]:
        """Calls inside share one store transaction (group commit); only store-only calls belong there."""
        return self.store.group()

    def serves_locally(self, slaves: list[str]) -> bool:
        """All slaves on this node: enc_keys draws end keys into the store and never waits on a peer."""
        return all(self.cfg.saes.get(s) == self.cfg.kme_id for s in slaves)

    def dec_keys(self, slave_sae: str, master_sae: str, key_ids: list[str]) -> list[Key]:
        self._local(slave_sae)
        if not key_ids:
            raise KmsError(400, "no key_ID given")
        bad = [k for k in key_ids if not _is_uuid(k)]
        if bad:
            raise KmsError(400, "key_ID must be a UUID", [{"bad_key_IDs": bad}])
        try:
            keys = self.store.fetch_deliverable(slave_sae, master_sae, [k.lower() for k in key_ids])
        except MissingKeys as exc:
            raise KmsError(400, "one or more keys specified are not found on KME", [{"key_IDs_not_found": exc.key_ids}]) from None
        app = self.routes.app_for(slave_sae, master_sae)
        if app is not None:
            self.deliveries.record(app.app_id, len(keys), 8 * sum(len(k) for k in keys))
        return [Key(i, k) for i, k in zip(key_ids, keys)]

    # --- how keys move ------------------------------------------------------------------------

    def _app(self, a: str, b: str, qos: Qos | None = None) -> AppRoute:
        """The application serving (a, b); if none, ask the controller for one (with the
        QoS an ETSI 004 stream asked for, so the path is admitted with its min_bps)."""
        app = self.routes.app_for(a, b)
        if app is None:
            if self.on_missing_path is not None:
                try:
                    if qos is None:
                        self.on_missing_path(a, b)
                    else:
                        self.on_missing_path(a, b, qos)
                except Exception:  # noqa: BLE001 - asking the controller is best effort
                    log.exception("cannot ask the controller for a path")
            raise KmsError(503, f"no key path between '{a}' and '{b}' yet; the controller has been asked, retry later")
        return app

    def _paths(self, app: AppRoute) -> list[LinkRoute]:
        """The application's usable backing links (paths), in configuration order."""
        return [self.routes.links[b] for b in app.backing if b in self.routes.links and self.routes.links[b].enabled]

    @staticmethod
    def _weights(paths: list[LinkRoute]) -> dict[str, float]:
        """Each path's share: its planned rate (virt_bandwidth). A path without one (a PHYS
        link backing the application directly, or a plan without rates) weighs as the mean
        of the planned ones, so with no rates at all the paths share equally."""
        planned = [p.bandwidth for p in paths if p.bandwidth > 0]
        default = sum(planned) / len(planned) if planned else 1.0
        return {p.qkdl_id: float(p.bandwidth) if p.bandwidth > 0 else default for p in paths}

    def _spread(self, app: AppRoute, paths: list[LinkRoute], sizes: list[int]) -> dict[str, list[int]]:
        """Which path carries each key: smooth weighted round robin over the paths, by their
        planned rates, with the credit kept per application across calls (so one key per
        call spreads as well as many). Deterministic, and smooth: over any run of calls each
        path's count stays within a few keys of its share, interleaved rather than in runs. A path whose first hop cannot pay for one more
        key (paths may share a first hop: its stock is counted once) sits the turn out; if
        none can, nothing is sent (503)."""
        weights = self._weights(paths)
        firsts = {p.qkdl_id: self._first_hop(p) for p in paths}
        stock = {f.qkdl_id: self._stock(f.qkdl_id) for f in firsts.values() if f is not None}
        out: dict[str, list[int]] = {p.qkdl_id: [] for p in paths}
        with self._lock:
            credit = self._credit.setdefault(app.app_id, {})
            for n, size in enumerate(sizes):
                cost = {p.qkdl_id: fm.parts_for(size) + (0 if out[p.qkdl_id] else 1) for p in paths}  # +1: its message's MAC key
                ok = [q for q, f in firsts.items() if f is not None and stock[f.qkdl_id] >= cost[q]]
                if not ok:
                    raise KmsError(503, "not enough key on the links to the next hops; retry later")
                for q in ok:
                    credit[q] = credit.get(q, 0.0) + weights[q]
                pick = max(ok, key=lambda q: credit[q])
                credit[pick] -= sum(weights[q] for q in ok)
                stock[firsts[pick].qkdl_id] -= cost[pick]
                out[pick].append(n)
        return out

    # --- operational state (sdqkd-key-stock): counts only, never a key ------------------------

    def link_stock(self, link: str) -> dict[str, int] | None:
        """Link keys stored for a PHYS link (None for a link that is not one of ours)."""
        route = self.routes.links.get(link.lower())
        if route is None or route.kind != "PHYS":
            return None
        try:
            mine, theirs, size = self.store.stock(link.lower())
        except sqlite3.Error:  # the store is down (logged by it): no figure rather than a failed <get>
            return None
        return {"keys": mine + theirs, "local": mine, "bits": (mine + theirs) * size, "key_size": size,
                "limit": self.store.link_key_limit}

    def app_delivery(self, app_id: str) -> dict[str, Any] | None:
        """Keys delivered to an application's SAEs here, and how many its SAE on this node
        could be given now (ETSI 014 stored_key_count, from the other SAE's side)."""
        app = next((a for a in self.routes.apps if a.app_id.lower() == app_id.lower()), None)
        if app is None:
            return None
        out = self.deliveries.get(app.app_id)
        local = sorted(s for s in app.saes if s in self.cfg.local_saes)
        others = sorted(app.saes - set(local)) or local[1:]
        if local and others and others[0] in self.cfg.saes:
            try:
                n = self._stored(local[0], others[0], self.cfg.saes[others[0]])
            except sqlite3.Error:  # the store is down (logged by it): the figure is left out
                return out
            out.update(available_keys=n, available_bits=n * self.cfg.key_size)
        return out

    def _stock(self, link: str) -> int:
        """Link keys this end can spend on a PHYS link now: its half, and what it could
        borrow of the peer's (lending.py)."""
        own = self.store.count(link)
        lendable = self._lendable(link)
        return own + (lendable if lendable >= self.cfg.lend_min else 0)

    def _lendable(self, link: str) -> int:
        """Keys of the peer's half it would cede now: all but `lend_keep`, and one MACs the answer."""
        if self.forwarder is None:
            return 0
        return max(0, self.store.count(link, mine=False) - self.cfg.lend_keep - 1)

    def _reserve_link(self, link: LinkRoute, n: int) -> Reservation | None:
        """n link keys of this end's half set aside for one message, borrowing from the peer's
        half when short; None if there are not enough. The caller commits or releases them."""
        rsv = self.store.reserve(link.qkdl_id, n)
        if rsv is not None or self.forwarder is None or link.remote is None:
            return rsv
        with self._lock:
            lock = self._borrowing.setdefault(link.qkdl_id, threading.Lock())
        with lock:
            short = n - self.store.count(link.qkdl_id)
            if short > 0 and self._lendable(link.qkdl_id) >= max(short, self.cfg.lend_min):
                lending.borrow(self.store, self.forwarder, link.qkdl_id, link.remote, max(short, self.cfg.lend_batch))
        return self.store.reserve(link.qkdl_id, n)

    def _first_hop(self, lk: LinkRoute) -> LinkRoute | None:
        if lk.kind == "PHYS":
            return lk
        return self._phys_toward(lk.first_neighbour)

    def _phys_toward(self, neighbour: str | None) -> LinkRoute | None:
        """The best stocked PHYS link to an adjacent node."""
        links = self.routes.phys_to(neighbour) if neighbour else []
        return max(links, key=lambda p: self._stock(p.qkdl_id), default=None)

    def _reserve(self, paths: list[LinkRoute], ids: list[str], size: int, master: str, slave: str, expires: float) -> list[Key]:
        parts = fm.parts_for(size)
        link = max(paths, key=lambda p: self._stock(p.qkdl_id))
        rsv = self._reserve_link(link, parts * len(ids))
        if rsv is None:
            raise KmsError(503, "not enough key on the link to the slave's node; retry later")
        taken = rsv.keys
        entries, keys = [], []
        for n, key_id in enumerate(ids):
            chunk = taken[n * parts:(n + 1) * parts]
            keys.append(Key(key_id, b"".join(k for _, k in chunk)[: size // 8]))
            entries.append({"key_id": key_id, "parts": [i for i, _ in chunk], "size": size})
        msg = {"op": "reserve", "link": link.qkdl_id, "master": master, "slave": slave, "expires": expires, "keys": entries}
        # Only key IDs go on the wire: a peer that refused without using them (kept) leaves
        # both copies as they were, and ours go back.
        self._send(link.remote, msg, rsv, release_if_kept=True)
        return keys

    def _relay_over(self, app: AppRoute, ids: list[str], end_keys: list[bytes], master: str, slave: str, expires: float) -> None:
        """Send the keys over the application's paths; the keys of a path whose hop refuses
        (its stock was less than counted, e.g. the peer's half it meant to borrow is gone) go
        over the other paths."""
        paths = self._paths(app)
        if not paths:
            raise KmsError(503, "the application has no usable link")
        todo = list(range(len(ids)))
        while todo:
            batches = self._spread(app, paths, [8 * len(end_keys[i]) for i in todo])
            failed: list[int] = []
            for lk in list(paths):
                sel = [todo[n] for n in batches[lk.qkdl_id]]
                if not sel:
                    continue
                try:
                    self._hop(lk.qkdl_id, lk.first_neighbour, [(ids[i], end_keys[i]) for i in sel], master, slave, expires)
                except KmsError as exc:
                    paths.remove(lk)
                    failed += sel
                    if exc.http_status != 503 or not paths:
                        raise
            todo = sorted(failed)

    def _hop(self, vlink: str, toward: str | None, keys: list[tuple[str, bytes]], master: str, slave: str, expires: float,
             stream: dict[str, Any] | None = None, *, offer: bool = True) -> None:
        """Pad `keys` with a link to the adjacent node `toward` and send them on in one
        message, authenticated by one one-time MAC key (see forwarding).

        Once the message has left this node its pads and MAC key are spent, whatever the
        answer: the ciphertexts and the tag are on the wire, and reusing a Poly1305 key
        for a second message would let whoever saw both forge a third. So a hop that may
        refuse must refuse before: the message is first offered along the whole rest of
        the path (`offer`, no key material, see _on_offer), and link keys are reserved
        only once every hop has accepted it. They are committed when the message was
        sent, released when it could not be (no connection); the receiving end consumes
        its copies exactly when the message is authentic (_on_relay), so both ends agree."""
        first = self._phys_toward(toward)
        if first is None or first.remote is None:
            raise KmsError(503, f"no working link to the next hop of {vlink}")
        counts = [fm.parts_for(8 * len(k)) for _, k in keys]
        if offer:
            self._offer(first, vlink, master, slave, sum(counts) + 1, stream)
        rsv = self._reserve_link(first, sum(counts) + 1)
        if rsv is None:
            raise KmsError(503, "not enough key on the link to the next hop; retry later")
        taken = rsv.keys
        try:
            entries, pos = [], 1
            for (key_id, key), n in zip(keys, counts):
                pads = taken[pos:pos + n]
                pos += n
                entries.append({"key_id": key_id, "pad": [i for i, _ in pads], "ct": fm.b64(fm.pad(key, b"".join(k for _, k in pads)))})
            msg = {"op": "relay", "v": fm.RELAY_VERSION, "vlink": vlink, "hop_link": first.qkdl_id, "master": master, "slave": slave,
                   "expires": expires, "stream": stream, "mac": taken[0][0], "keys": entries}
            signed = fm.sign(msg, taken[0][1])
        except BaseException:
            self.store.release(rsv)  # nothing left the node
            raise
        self._send(first.remote, signed, rsv)

    def _send(self, peer: str | None, msg: dict[str, Any], rsv: Reservation, *, release_if_kept: bool = False) -> None:
        """Send a message that uses the link keys of `rsv`, and settle them: released when
        nothing was sent (or, with `release_if_kept`, when the peer says it used none of
        them), else committed, also when the outcome is unknown (a connection lost after
        sending: the peer may have consumed its copies)."""
        if self.forwarder is None or peer is None:
            self.store.release(rsv)
            raise KmsError(503, "this node has no forwarding module")
        try:
            self.forwarder.request(peer, msg)
        except fm.RelayError as exc:
            if not exc.sent or (release_if_kept and exc.kept):
                self.store.release(rsv)
            else:
                self.store.commit(rsv)
            raise KmsError(503 if exc.code >= 500 else 400, f"key relay failed: {exc}") from None
        except BaseException:
            self.store.commit(rsv)
            raise
        self.store.commit(rsv)

    def _offer(self, first: LinkRoute, vlink: str, master: str, slave: str, need: int,
               stream: dict[str, Any] | None = None) -> None:
        """Ask the path from `first` on whether it would carry a message of `need` link keys per
        hop for (master, slave) on `vlink`; KmsError if a hop would refuse. Uses no key."""
        if self.forwarder is None or first.remote is None:
            raise KmsError(503, "this node has no forwarding module")
        msg = {"op": "offer", "vlink": vlink, "hop_link": first.qkdl_id, "master": master, "slave": slave, "need": need,
               **({"stream": stream} if stream else {})}
        try:
            self.forwarder.request(first.remote, msg, idempotent=True)
        except fm.RelayError as exc:
            raise KmsError(503 if exc.code >= 500 else 400, f"key relay refused: {exc}") from None

    # --- the other end of a hop ----------------------------------------------------------------

    def handle_relay(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        handlers = {"offer": self._on_offer, "reserve": self._on_reserve, "relay": self._on_relay, "lend": self._on_lend,
                    "stream": self.streams.on_relay}
        handler = handlers.get(str(msg.get("op")))
        if handler is None:
            raise fm.RelayError(f"unknown relay operation {msg.get('op')!r}", 400)
        try:
            return handler(sender, msg)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field missing or of the wrong type
            raise fm.RelayError(f"malformed {msg.get('op')} message: {type(exc).__name__}", 400) from None

    def _link_with(self, link_id: str, sender: str) -> LinkRoute:
        lk = self.routes.links.get(str(link_id).lower())
        if lk is None or lk.kind != "PHYS" or lk.remote != sender:
            raise fm.RelayError(f"link {link_id} is not a PHYS link with {sender}", 400)
        return lk

    def _peek_peer_ids(self, link: str, ids: list[str]) -> list[bytes]:
        """The sender allocated these; they may still be on their way from our module. Read,
        not consumed (the caller takes them once it has checked the message)."""
        deadline = time.monotonic() + self.cfg.peer_wait
        while True:
            try:
                return self.store.peek_ids(link, ids)
            except MissingKeys as exc:
                if time.monotonic() > deadline or any(self.store.is_spent(k) for k in exc.key_ids):
                    raise fm.RelayError(f"link keys not held here: {len(exc.key_ids)} missing", 503, kept=True) from None
                time.sleep(0.02)

    def _peek_entries(self, link: str, groups: list[list[str]]) -> tuple[list[str], list[list[bytes]]]:
        """The link keys every entry of a message names (all IDs, and per entry); a key named twice is refused."""
        flat = [key_id for group in groups for key_id in group]
        if len(set(flat)) != len(flat):
            raise fm.RelayError("a link key is named more than once in the message", 400, kept=True)
        got = self._peek_peer_ids(link, flat)
        out, pos = [], 0
        for group in groups:
            out.append(got[pos:pos + len(group)])
            pos += len(group)
        return flat, out

    def _consume(self, link: str, ids: list[str]) -> None:
        """Take the link keys a checked message names; all or none (another message naming one
        of them, a replay, got there first: refused, this one uses nothing)."""
        try:
            self.store.take_ids(link, ids)
        except MissingKeys:
            raise fm.RelayError("link keys of the message were used meanwhile", 400, kept=True) from None

    def _on_offer(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Would this node, and the rest of the path after it, carry the relay message the
        sender means to send? The checks _on_relay makes before it uses a link key, and on
        a relay node its own stock toward the next hop, then the next hop's answer (so a
        refusal anywhere costs no link key anywhere). Nothing is set aside: a message that
        arrives later is checked again."""
        self._link_with(msg["hop_link"], sender)
        vlink, master, slave, need = str(msg["vlink"]), str(msg["master"]), str(msg["slave"]), int(msg["need"])
        if self.cfg.saes.get(slave) == self.cfg.kme_id:
            if not self.streams.accepts(msg.get("stream"), master, slave):
                raise fm.RelayError("no such ETSI 004 stream from that source joined here", 400)
            return {"ok": True}
        onward = self._onward(vlink, sender)
        first = self._phys_toward(onward)
        if first is None or first.remote is None:
            raise fm.RelayError(f"no working link to the next hop of {vlink}", 503)
        if self._stock(first.qkdl_id) < need:
            raise fm.RelayError("not enough key on the link to the next hop; retry later", 503)
        try:
            self._offer(first, vlink, master, slave, need, msg.get("stream"))
        except KmsError as exc:
            raise fm.RelayError(exc.message, exc.http_status) from None
        return {"ok": True}

    def _on_reserve(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        """The keys the sender made of link keys it names (IDs only on the wire): stored for
        the slave and the link keys consumed in one transaction, or, refused, nothing used
        (kept: the sender then returns its copies too)."""
        try:
            lk = self._link_with(msg["link"], sender)
        except fm.RelayError as exc:
            raise fm.RelayError(str(exc), exc.code, kept=True) from None
        slave, master = str(msg["slave"]), str(msg["master"])
        if self.cfg.saes.get(slave) != self.cfg.kme_id:
            raise fm.RelayError(f"SAE {slave} is not attached here", 400, kept=True)
        entries = msg["keys"]
        ids, taken = self._peek_entries(lk.qkdl_id, [[str(p) for p in entry["parts"]] for entry in entries])
        out = [Deliverable(str(entry["key_id"]), slave, master, b"".join(parts)[: int(entry["size"]) // 8], float(msg["expires"]))
               for entry, parts in zip(entries, taken)]
        try:
            with self.store.group():  # stored for the slave and consumed together, or neither
                self._consume(lk.qkdl_id, ids)
                self.store.put_deliverable(out)
        except (ValueError, sqlite3.Error) as exc:
            raise fm.RelayError(f"reserve refused: {type(exc).__name__}", 400, kept=True) from None
        return {"ok": True}

    def _on_relay(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("v") != fm.RELAY_VERSION:
            raise fm.RelayError(f"relay message version {msg.get('v')!r} is not {fm.RELAY_VERSION}", 400)
        lk = self._link_with(msg["hop_link"], sender)
        vlink, master, slave, expires = str(msg["vlink"]), str(msg["master"]), str(msg["slave"]), float(msg["expires"])
        entries, stream = msg["keys"], msg.get("stream")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and isinstance(e.get("pad"), list)
                                                                   for e in entries):
            raise fm.RelayError("relay message without a list of keys", 400)
        ids = [str(i) for i in (e["key_id"] for e in entries)]
        if len(set(ids)) != len(ids) or not all(_is_uuid(i) for i in ids):
            raise fm.RelayError("relayed key IDs must be distinct UUIDs", 400)
        here = self.cfg.saes.get(slave) == self.cfg.kme_id
        onward = None if here else self._onward(vlink, sender)  # before any link key is spent
        named, taken = self._peek_entries(lk.qkdl_id, [[str(msg["mac"])]] + [[str(p) for p in e["pad"]] for e in entries])
        try:
            fm.verify(msg, taken[0][0])
        except fm.RelayError as exc:  # not from the other end of the link: whoever sent it cannot burn our keys
            raise fm.RelayError(str(exc), exc.code, kept=True) from None
        # Authentic: the sender spent its copies when it sent it, so this end spends its own
        # now, whatever becomes of the keys further on (see _hop).
        self._consume(lk.qkdl_id, named)
        keys = [(i, fm.pad(fm.unb64(str(e["ct"])), b"".join(pads))) for i, e, pads in zip(ids, entries, taken[1:])]
        if here and not self.streams.accepts(stream, master, slave):  # offered before: a stream closed meanwhile
            raise fm.RelayError("no such ETSI 004 stream from that source joined here", 400)
        if here:
            self.store.put_deliverable(
                Deliverable(i, slave, master, k, expires, stream and str(stream["ksid"]), stream and int(stream["idx"])) for i, k in keys
            )
            return {"ok": True}
        try:
            self._hop(vlink, onward, keys, master, slave, expires, stream, offer=False)  # offered with the sender's offer
        except KmsError as exc:
            raise fm.RelayError(exc.message, exc.http_status) from None
        return {"ok": True}

    def _on_lend(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        lk = self._link_with(msg["link"], sender)
        return lending.lend(self.store, lk.qkdl_id, msg, self.cfg.lend_keep)

    def _onward(self, vlink: str, sender: str) -> str:
        """The neighbour on the virtual link a key from `sender` goes on to: the next hop if it
        came from the previous one, the previous hop if it came back from the next one."""
        route = self.routes.links.get(vlink.lower())
        if route is None or route.kind != "VIRT":
            raise fm.RelayError(f"no virtual link {vlink} at this node", 503)
        if sender == route.prev_hop and route.next_hops:
            return route.next_hops[0]
        if sender in route.next_hops and route.prev_hop:
            return route.prev_hop
        raise fm.RelayError(f"virtual link {vlink} goes on from {sender} to no node here", 503)

    # --- ETSI 004 (agents/kms/streams.py) ----------------------------------------------------------

    def open_connect(self, caller_sae: str | None, source: str, destination: str, qos: Qos,
                     key_stream_id: str | None) -> Stream:
        return self.streams.open_connect(caller_sae, source, destination, qos, key_stream_id and key_stream_id.lower())

    def get_key(self, caller_sae: str | None, key_stream_id: str, index: int | None,
                metadata_size: int | None = None) -> tuple[int, bytes, bytes]:
        return self.streams.get_key(caller_sae, key_stream_id.lower(), index, metadata_size)

    def close(self, caller_sae: str | None, key_stream_id: str) -> None:
        self.streams.close(caller_sae, key_stream_id.lower())

    def shutdown(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        self.store.close()


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True
