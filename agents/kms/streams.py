"""ETSI GS QKD 004 key streams in the LKMS: who may open, join, read and close a stream,
and where its keys come from.

A stream belongs to its source: the KME of the source application (the "source KME")
holds the authoritative record, assigns its key_stream_id (random, never derived from
public values) and is the only origin of its keys. The destination's KME learns of the
stream only from the source KME, over the forwarding module's mutually authenticated
relay, hop by hop along the application's path (`join`, `query`, `close` messages), and
accepts a stream's keys only when they come in over the relay for the stream's source and
destination. So a third application that opens the same key_stream_id with itself as
source gets a stream of its own at its own KME, which the destination never joins: its
GET_KEY answers 3 (peer not connected) and no key of it reaches the destination.

Pairing (both styles of the standard's clause 6.3 and of MadQCI): the source opens
first with a null KSID and hands the assigned one to the destination out of band, or
both open with the same source/destination and a null KSID at their own node, in any
order; the second is paired with the oldest stream of that pair the other has opened
alone. A destination's OPEN_CONNECT is a `join` at the source KME.

Statuses (clause 6.2): OPEN_CONNECT 0 (both open), 1 (peer not yet), 4 (no QKD
connection: unknown application, no path yet; the controller is asked for one), 5 (the
KSID is another stream's), 7 (QoS cannot be met: the answer is a QoS that can, re-sent
it succeeds); GET_KEY 0, 2 (no key now; a chunk already delivered), 3 (the peer has not
opened, or has closed), 4 (no such open stream for the caller), 6 (QoS timeout passed),
8 (metadata buffer too small: the answer says the size); CLOSE 0 or 4.

min_bps is admitted against the application's path capacity as the controller planned
it (virt_bandwidth of each VIRT path: what it reserved for the application, or the
path's planned rate) and, on a PHYS link backing the application directly, the rate its
QKD modules measure (`link_rate`), less what the streams already open on it hold.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms.interface import KmsError, Qos, Stream
from sdqkd.agents.kms.keystore import Deliverable
from sdqkd.agents.kms.routes import AppRoute

if TYPE_CHECKING:
    from sdqkd.agents.kms.lkms import Lkms

log = logging.getLogger(__name__)

INSUFFICIENT_KEY, PEER_NOT_CONNECTED, NO_QKD_CONNECTION, KSID_IN_USE, TIMEOUT_ERROR, QOS_NOT_MET, METADATA_SIZE = 2, 3, 4, 5, 6, 7, 8
METADATA_MIMETYPE = "application/json"
_POLL = 0.02


def _refuse(status: int, message: str, http: int = 400, **detail: Any) -> KmsError:
    return KmsError(http, message, [detail] if detail else None, status004=status)


class Streams:
    """The ETSI 004 part of an Lkms (it calls in here and routes `stream` relay messages here)."""

    def __init__(self, lkms: Lkms) -> None:
        self.k = lkms
        self.link_rate: Callable[[str], float] | None = None  # PHYS link -> measured secret key rate, bit/s
        # One GET_KEY at a time per stream: two at once would take the same next index
        # (two keys for one chunk at the source, one chunk for two callers at the other end).
        self._busy: dict[str, threading.Lock] = {}
        self._busy_guard = threading.Lock()

    # --- helpers -------------------------------------------------------------------------------

    @property
    def _me(self) -> str:
        return self.k.cfg.kme_id

    def _kme(self, sae: str) -> str:
        kme = self.k.cfg.saes.get(sae)
        if kme is None:
            raise _refuse(NO_QKD_CONNECTION, f"no QKD connection to application '{sae}': not known in this network")
        return kme

    def _records(self) -> list[dict[str, Any]]:
        return self.k.store.list_streams()

    def _save(self, rec: dict[str, Any]) -> None:
        self.k.store.save_stream(_key(rec["ksid"], rec["source"]), rec)

    def _load(self, ksid: str, source: str) -> dict[str, Any] | None:
        return self.k.store.load_stream(_key(ksid, source))

    def _drop(self, rec: dict[str, Any]) -> None:
        self.k.store.delete_stream(_key(rec["ksid"], rec["source"]))
        with self._busy_guard:
            self._busy.pop(_key(rec["ksid"], rec["source"]), None)

    def _serial(self, rec: dict[str, Any]) -> threading.Lock:
        with self._busy_guard:
            return self._busy.setdefault(_key(rec["ksid"], rec["source"]), threading.Lock())

    def _find(self, caller: str | None, ksid: str) -> tuple[dict[str, Any], str]:
        """The stream `ksid` the caller is an open end of here, and which end; else status 4.
        Records are per (KSID, source): a KSID someone else chose for a stream of their own
        is another stream."""
        found = [(rec, end) for rec in self.k.store.list_streams(prefix=f"{ksid}|") if rec["ksid"] == ksid
                 for end, sae in (("src", rec["source"]), ("dst", rec["destination"]))
                 if rec.get(f"{end}_open") and rec.get(f"{end}_kme") == self._me and (caller is None or caller == sae)]
        if len(found) != 1:
            raise _refuse(NO_QKD_CONNECTION, "no open key stream with that key_stream_id for this application")
        return found[0]

    def _caller(self, caller: str | None, source: str, destination: str, ksid: str | None) -> str:
        """The party the request is from. None (a trusted local transport): the party
        attached here; if both are, the one that has not opened yet."""
        local = [s for s in (source, destination) if s in self.k.cfg.local_saes]
        if caller is not None:
            if caller not in self.k.cfg.local_saes:
                raise KmsError(401, f"SAE '{caller}' is not attached to this KME")
            if caller not in (source, destination):
                raise KmsError(401, "the caller must be the source or the destination of the stream")
            return caller
        if not local:
            raise KmsError(401, "neither the source nor the destination is attached to this KME")
        if len(local) == 1:
            return local[0]
        rec = self._pending(source, destination, want="dst") if ksid is None else self._load(ksid, source)
        return destination if rec is not None and rec.get("src_open") and not rec.get("dst_open") else source

    def _pending(self, source: str, destination: str, want: str) -> dict[str, Any] | None:
        """The oldest stream of this pair whose `want` end ("src"/"dst") has not opened yet."""
        found = [r for r in self._records()
                 if r["source"] == source and r["destination"] == destination and r.get("src_kme") == self._me
                 and not r.get(f"{want}_open") and not r.get(f"{want}_closed")]
        return min(found, key=lambda r: r.get("created", 0), default=None)

    # --- QoS admission --------------------------------------------------------------------------

    def _capacity(self, app: AppRoute) -> float | None:
        """bit/s the application's paths can give a stream now, less what the streams open
        on them hold; None when not known (no meter on a PHYS path)."""
        total = 0.0
        for path in self.k._paths(app):
            if path.kind == "VIRT":
                total += path.bandwidth
            elif self.link_rate is None:  # a KME without its QKD modules' meters: not known
                return None
            else:
                total += max(0.0, float(self.link_rate(path.qkdl_id)))
        held = sum(int(r["qos"].get("min_bps") or 0) for r in self._records()
                   if r.get("app") == app.app_id and r.get("src_kme") == self._me and not r.get("src_closed"))
        return max(0.0, total - held)

    def _admit(self, source: str, destination: str, qos: Qos) -> tuple[Qos, str | None]:
        """The QoS granted, or raise status 7 with one that would be."""
        counter: dict[str, Any] = {}
        lo, hi = -(-self.k.cfg.min_key_size // 8), self.k.cfg.max_key_size // 8
        if not lo <= qos.key_chunk_size <= hi:
            counter["key_chunk_size"] = min(max(qos.key_chunk_size, lo), hi)
        if qos.metadata_mimetype.lower() != METADATA_MIMETYPE:
            counter["metadata_mimetype"] = METADATA_MIMETYPE
        app_id = None
        if self._kme(destination) != self._me:
            try:
                app = self.k._app(source, destination, qos)  # none: the controller is asked for one
            except KmsError:
                raise _refuse(NO_QKD_CONNECTION, f"no QKD connection between '{source}' and '{destination}' yet; "
                              "the controller has been asked for one, retry", 503) from None
            app_id = app.app_id
            can = self._capacity(app) if qos.min_bps else None
            if can is not None:
                if qos.min_bps > can:
                    counter["min_bps"] = int(can)
                    if qos.max_bps and qos.max_bps < int(can):
                        counter["max_bps"] = qos.max_bps
        if counter:
            offer = replace(qos, **counter)
            raise _refuse(QOS_NOT_MET, "the requested QoS cannot be met; the answer's qos can",
                          qos=asdict(offer))
        return qos, app_id

    # --- OPEN_CONNECT --------------------------------------------------------------------------

    def open_connect(self, caller: str | None, source: str, destination: str, qos: Qos, ksid: str | None) -> Stream:
        who = self._caller(caller, source, destination, ksid)
        if source == destination:
            raise KmsError(400, "the source and the destination are the same application")
        src_kme, dst_kme = self._kme(source), self._kme(destination)
        if who == source and src_kme == self._me:
            rec = self._open_at_source("src", source, destination, qos, ksid)
        elif src_kme == self._me:  # the destination, with the source on this node too
            rec = self._open_at_source("dst", source, destination, qos, ksid)
        else:  # the destination; the stream is the source KME's
            rec = self._join_remote(source, destination, qos, ksid, src_kme, dst_kme)
        peer = rec.get("dst_open" if who == source else "src_open")
        return Stream(rec["ksid"], source, destination, Qos(**rec["qos"]), peer_connected=bool(peer))

    def _open_at_source(self, end: str, source: str, destination: str, qos: Qos, ksid: str | None,
                        dst_kme: str | None = None) -> dict[str, Any]:
        """Open (or join) `end` of a stream this KME is the source KME of."""
        other = "dst" if end == "src" else "src"
        if ksid is None:
            rec = self._pending(source, destination, want=end)
        else:
            rec = self._load(ksid, source)
            if rec is not None and (rec["destination"] != destination or rec.get(f"{end}_open") or rec.get(f"{end}_closed")):
                raise _refuse(KSID_IN_USE, "key_stream_id is already in use")
        if rec is not None and dst_kme is not None and rec["dst_kme"] != dst_kme:
            raise _refuse(NO_QKD_CONNECTION, "the stream's destination is at another KME")
        if rec is None:
            granted, app_id = self._admit(source, destination, qos)
            rec = {"ksid": ksid or str(uuid.uuid4()), "source": source, "destination": destination, "qos": asdict(granted),
                   "app": app_id, "src_kme": self._me, "dst_kme": dst_kme or self._kme(destination),
                   "src_open": False, "dst_open": False, "src_next": 0, "dst_next": 0, "created": time.time()}
        rec[f"{end}_open"] = True
        self._save(rec)
        log.info("ETSI 004 stream %s: %s end opened (%s -> %s), %s end %s", rec["ksid"], end, source, destination,
                 other, "open" if rec.get(f"{other}_open") else "not yet")
        return rec

    def _join_remote(self, source: str, destination: str, qos: Qos, ksid: str | None, src_kme: str,
                     dst_kme: str) -> dict[str, Any]:
        if ksid is not None:
            mine = self._load(ksid, source)
            if mine is not None and (mine.get("dst_open") or mine["destination"] != destination):
                raise _refuse(KSID_IN_USE, "key_stream_id is already in use")
        reply = self._control(source, destination, {"act": "join", "ksid": ksid, "qos": asdict(qos)})
        if not reply.get("ok"):
            raise _refuse(int(reply.get("status", NO_QKD_CONNECTION)), str(reply.get("error", "refused by the source KME")),
                          **({"qos": reply["qos"]} if isinstance(reply.get("qos"), dict) else {}))
        rec = {"ksid": str(uuid.UUID(str(reply["ksid"]))), "source": source, "destination": destination,
               "qos": Qos(**reply["qos"]).__dict__, "src_kme": src_kme, "dst_kme": dst_kme,
               "src_open": bool(reply.get("src_open")), "dst_open": True, "dst_next": 0, "created": time.time()}
        self._save(rec)
        log.info("ETSI 004 stream %s: joined at source KME %s (%s -> %s)", rec["ksid"], src_kme, source, destination)
        return rec

    # --- GET_KEY -------------------------------------------------------------------------------

    def get_key(self, caller: str | None, ksid: str, index: int | None, metadata_size: int | None) -> tuple[int, bytes, bytes]:
        rec, _ = self._find(caller, ksid)
        with self._serial(rec):
            return self._get_key(caller, ksid, index, metadata_size)

    def _get_key(self, caller: str | None, ksid: str, index: int | None, metadata_size: int | None) -> tuple[int, bytes, bytes]:
        rec, end = self._find(caller, ksid)  # again, under the stream's lock: the next index is current
        qos = Qos(**rec["qos"])
        idx = rec[f"{end}_next"] if index is None else index
        if idx < rec[f"{end}_next"] and end == "src":
            raise _refuse(INSUFFICIENT_KEY, f"key chunk {idx} of this stream was already delivered")
        metadata = self._metadata(rec, idx, qos)
        if metadata_size == 0:  # a caller with no metadata buffer wants none (the QUBIP client)
            metadata = b""
        elif metadata_size is not None and metadata_size < len(metadata):
            raise _refuse(METADATA_SIZE, f"the metadata needs {len(metadata)} bytes", metadata_size=len(metadata))
        deadline = time.monotonic() + qos.timeout / 1000.0
        key = self._chunk_at_source(rec, idx, qos, deadline) if end == "src" else self._chunk_at_destination(rec, idx, qos, deadline)
        app = self.k.routes.app_for(rec["source"], rec["destination"])
        if app is not None:
            self.k.deliveries.record(app.app_id, 1, 8 * len(key))
        now = self._load(ksid, rec["source"])  # a join or close may have landed meanwhile
        if now is not None:  # (a stream closed meanwhile stays closed)
            now[f"{end}_next"] = max(now.get(f"{end}_next", 0), idx + 1)
            self._save(now)
        return idx, key, metadata

    def _metadata(self, rec: dict[str, Any], idx: int, qos: Qos) -> bytes:
        """What the KME says of a chunk (metadata_mimetype application/json): its index and
        size in bits; short, so the reference clients' 64-byte buffers take it."""
        return json.dumps({"index": idx, "size": 8 * qos.key_chunk_size}, separators=(",", ":")).encode()

    def _chunk_at_source(self, rec: dict[str, Any], idx: int, qos: Qos, deadline: float) -> bytes:
        if not rec.get("dst_open"):
            raise _refuse(PEER_NOT_CONNECTED, "the destination application has not opened the stream", 503)
        src, dst = rec["source"], rec["destination"]
        key = self.k.entropy(qos.key_chunk_size)
        expires = time.time() + (qos.ttl or self.k.cfg.default_ttl)
        key_id = str(uuid.uuid4())
        if rec["dst_kme"] == self._me:
            self.k.store.put_deliverable([Deliverable(key_id, dst, src, key, expires, rec["ksid"], idx)])
            return key
        while True:
            try:
                self._relay_chunk(rec, idx, key_id, key, expires, qos)
                return key
            except KmsError as exc:
                if exc.status004 == NO_QKD_CONNECTION:
                    raise _refuse(NO_QKD_CONNECTION, exc.message, 503) from None
                if time.monotonic() >= deadline:
                    if qos.timeout:
                        raise _refuse(TIMEOUT_ERROR, f"no key for chunk {idx} within the QoS timeout: {exc.message}", 503) from None
                    raise _refuse(INSUFFICIENT_KEY, exc.message, 503) from None
            time.sleep(5 * _POLL)

    def _relay_chunk(self, rec: dict[str, Any], idx: int, key_id: str, key: bytes, expires: float, qos: Qos) -> None:
        src, dst = rec["source"], rec["destination"]
        try:
            app = self.k._app(src, dst, qos)
        except KmsError as exc:
            raise _refuse(NO_QKD_CONNECTION, exc.message, 503) from None
        paths = self.k._paths(app)
        if not paths:
            raise _refuse(NO_QKD_CONNECTION, "the application has no usable link", 503)
        size = 8 * len(key)
        spread = self.k._spread(app, paths, [size])
        path = next(p for p in paths if spread[p.qkdl_id])
        self.k._hop(path.qkdl_id, path.first_neighbour, [(key_id, key)], src, dst, expires, {"ksid": rec["ksid"], "idx": idx})
        self.k.store.record_usage(app.app_id, size)

    def _chunk_at_destination(self, rec: dict[str, Any], idx: int, qos: Qos, deadline: float) -> bytes:
        asked = False
        while True:
            got = self.k.store.fetch_stream_key(rec["destination"], rec["ksid"], idx, master=rec["source"])
            if got is not None:
                return got[1]
            if not rec.get("src_open") and not asked:  # the source may have opened since the join: ask it
                asked = True
                rec = self._refresh_source_end(rec)
            if not rec.get("src_open"):
                raise _refuse(PEER_NOT_CONNECTED, "the source application has not opened the stream, or has closed it", 503)
            if time.monotonic() >= deadline:
                if qos.timeout:
                    raise _refuse(TIMEOUT_ERROR, f"key chunk {idx} did not arrive within the QoS timeout", 503)
                raise _refuse(INSUFFICIENT_KEY, f"key chunk {idx} of this stream is not available yet", 503)
            time.sleep(_POLL)

    def _refresh_source_end(self, rec: dict[str, Any]) -> dict[str, Any]:
        if rec["src_kme"] == self._me:
            return self._load(rec["ksid"], rec["source"]) or rec
        try:
            reply = self._control(rec["source"], rec["destination"], {"act": "query", "ksid": rec["ksid"]})
        except KmsError:
            return rec
        if reply.get("ok"):
            rec["src_open"] = bool(reply.get("src_open"))
            self._save(rec)
        return rec

    # --- CLOSE ----------------------------------------------------------------------------------

    def close(self, caller: str | None, ksid: str) -> None:
        rec, end = self._find(caller, ksid)
        joined = rec.get("dst_open") or end == "dst"
        self._end_closed(rec, end)
        other_kme = rec["dst_kme"] if end == "src" else rec["src_kme"]
        if other_kme != self._me and joined:
            try:  # best effort: the peer's KME answers 3 to its application from now on
                self._control(rec["source"], rec["destination"], {"act": "close", "ksid": ksid, "end": end})
            except KmsError as exc:
                log.warning("ETSI 004 stream %s: cannot tell the peer KME of the close: %s", ksid, exc.message)
        log.info("ETSI 004 stream %s: %s end closed", ksid, end)

    def _end_closed(self, rec: dict[str, Any], end: str) -> None:
        """Record that `end` closed; the record goes once no end of it here is open or
        still awaited (a stream one end opened waits for the other's OPEN_CONNECT)."""
        rec[f"{end}_open"], rec[f"{end}_closed"] = False, True
        local = [e for e in ("src", "dst") if rec.get(f"{e}_kme") == self._me]
        awaited = [e for e in local if not rec.get(f"{e}_open") and not rec.get(f"{e}_closed")
                   and rec.get("dst_open" if e == "src" else "src_open")]
        if any(rec.get(f"{e}_open") for e in local) or awaited:
            self._save(rec)
        else:
            self._drop(rec)

    # --- the relay: between the source KME and the destination KME -------------------------------

    def _control(self, source: str, destination: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send a stream control message to the KME at the other end of (source,
        destination)'s path, hop by hop over the authenticated relay; its answer."""
        try:
            app = self.k._app(source, destination)
        except KmsError as exc:
            raise _refuse(NO_QKD_CONNECTION, exc.message, 503) from None
        last: KmsError | None = None
        for path in self.k._paths(app):
            first = self.k._phys_toward(path.first_neighbour)
            if first is None or first.remote is None or self.k.forwarder is None:
                continue
            msg = {"op": "stream", **body, "vlink": path.qkdl_id, "hop_link": first.qkdl_id,
                   "source": source, "destination": destination, "from": self._me}
            try:
                return self.k.forwarder.request(first.remote, msg)
            except fm.RelayError as exc:
                last = _refuse(NO_QKD_CONNECTION, f"the peer KME cannot be reached: {exc}", 503)
        raise last or _refuse(NO_QKD_CONNECTION, "no working path to the peer KME", 503)

    def on_relay(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A `stream` message from the neighbour `sender`: handled if it is for this KME
        (the end the message goes to), else passed on along the path."""
        self.k._link_with(msg["hop_link"], sender)
        source, destination, act = str(msg["source"]), str(msg["destination"]), str(msg["act"])
        target = source if act in ("join", "query") or msg.get("end") == "dst" else destination
        if self.k.cfg.saes.get(target) != self._me:
            onward = self.k._onward(str(msg["vlink"]), sender)
            first = self.k._phys_toward(onward)
            if first is None or first.remote is None or self.k.forwarder is None:
                raise fm.RelayError(f"no working link to the next hop of {msg['vlink']}", 503)
            return self.k.forwarder.request(first.remote, {**msg, "hop_link": first.qkdl_id})
        ksid = None if msg.get("ksid") is None else str(uuid.UUID(str(msg["ksid"])))
        if self.k.cfg.saes.get(source) != self._me and act in ("join", "query"):
            raise fm.RelayError("the source application is not attached here", 400)
        if act == "join":
            try:
                rec = self._open_at_source("dst", source, destination, Qos(**msg["qos"]), ksid, dst_kme=str(msg["from"]))
            except KmsError as exc:
                out: dict[str, Any] = {"ok": False, "status": exc.status004 or NO_QKD_CONNECTION, "error": exc.message}
                counter = next((d["qos"] for d in exc.details if isinstance(d.get("qos"), dict)), None)
                return {**out, "qos": counter} if counter else out
            return {"ok": True, "ksid": rec["ksid"], "qos": rec["qos"], "src_open": bool(rec.get("src_open"))}
        rec = self._load(ksid, source) if ksid else None
        if rec is None or rec["destination"] != destination:
            return {"ok": True, "src_open": False} if act == "query" else {"ok": True}
        if act == "query":
            return {"ok": True, "src_open": bool(rec.get("src_open"))}
        if act == "close":
            self._end_closed(rec, "dst" if msg.get("end") == "dst" else "src")
            return {"ok": True}
        raise fm.RelayError(f"unknown stream action {act!r}", 400)

    def accepts(self, stream: dict[str, Any] | None, master: str, slave: str) -> bool:
        """Whether relayed keys tagged with `stream` may be stored for its destination: only
        for a stream the destination has joined here, from that stream's source."""
        if stream is None:
            return True
        rec = self._load(str(stream.get("ksid")), master)
        return rec is not None and rec["destination"] == slave and bool(rec.get("dst_open"))


def _key(ksid: str, source: str) -> str:
    return f"{ksid}|{source}"
