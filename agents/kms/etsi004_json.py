"""ETSI GS QKD 004 V2.1.1 in the JSON command form MadQCI nodes serve over TCP, the form UPM's
hybridization module (github QUBIP/hybridization-module) sends to its QKD node:

    {"command": "OPEN_CONNECT", "data": {"source": URI, "destination": URI, "qos": {...},
                                         "key_stream_id"?: KSID}}
        -> {"status", "key_stream_id", "qos"}
    {"command": "GET_KEY", "data": {"key_stream_id": KSID, "index"?: N,
                                    "metadata"?: {"size": N, "buffer": ...} | "metadata_size"?: N}}
        -> {"status", "index", "key_buffer" (base64), "metadata": {"size", "buffer"}}
    {"command": "CLOSE", "data": {"key_stream_id": KSID}} -> {"status"}

Framing: a request is one JSON object with nothing around it, no length and no newline
(the module does `sendall(json.dumps(req))` then one `recv(65057)`), so the server finds
its end by matching braces outside strings. The answer is one JSON object, no newline, in
one write. The module opens a connection per request; other clients of the form (the
module's own test drivers) send several in a row, so the connection stays open for more.

`status` is the ETSI 004 status keystream.py decided (0-8). What ETSI 004 has no status
for gets the HTTP code the REST form (etsi004.py) answers, with a `message`: 400 a
malformed request, 401 a caller that is not a party, 503 the KME cannot serve now. The
module treats every non-zero status as failure (hybridization_module/model/exceptions.py
check_status; unknown codes raise QkdError), and the numbers keep one meaning across the
wire forms; the peers that answer status 1 for every error make "peer not connected"
ambiguous. A request that cannot be framed (not JSON, too long, not an object) is
answered and the connection closed, since where the next request would start is unknown.
Field and command names are matched without regard to case, unknown fields ignored.
"""
from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from . import keystream as ks
from .https import _reason  # the REST forms' words for why a body is not JSON
from .interface import KmsError
from .streamserver import Connection, Handler, PeerClosed, RequestTooLarge

log = logging.getLogger(__name__)

BAD_REQUEST, INTERNAL = 400, 503
COMMANDS = ("OPEN_CONNECT", "GET_KEY", "CLOSE")
_WHITESPACE = b" \t\r\n"


class _Unframed(Exception):
    """Bytes that are not (the start of) a JSON object: answered, then the connection closes."""


class _Framer:
    """Finds where one JSON request ends in a byte stream: the brace (or bracket) that
    closes the first one, outside strings. Invalid JSON inside is json.loads' to report."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._pos = self._depth = 0
        self._in_string = self._escaped = False

    def feed(self, data: bytes) -> None:
        self.buf += data

    def pending(self) -> bool:
        """Whether anything but whitespace is waiting (an unfinished request)."""
        return bool(self.buf.strip(_WHITESPACE))

    def take(self) -> bytes | None:
        """The next complete request, or None until more bytes come; _Unframed if the bytes
        cannot start a JSON object (or array, answered as not an object)."""
        buf = self.buf
        while self._pos < len(buf):
            c = buf[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == 0x5C:  # backslash
                    self._escaped = True
                elif c == 0x22:
                    self._in_string = False
            elif self._depth == 0 and c not in b"{[" and c not in _WHITESPACE:
                raise _Unframed("the request is not a JSON object")
            elif c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    return self._cut()
        return None

    def _cut(self) -> bytes:
        raw = bytes(self.buf[:self._pos])
        del self.buf[:self._pos]
        self._pos = self._depth = 0
        return raw


def handler(streams: ks.KeyStreams) -> Handler:
    """The connection handler serving `streams` in the JSON command form (for StreamServer)."""
    api = _Api(streams)
    return api.serve


def _fail(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "message": message}


def _answer(body: dict[str, Any], message: str) -> dict[str, Any]:
    """The outcome's fields, and a human `message` when the status is not 0."""
    return {**body, "message": message} if message else body


def _lower(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ks.BadRequest(f"{name} must be a JSON object")
    return {str(k).lower(): v for k, v in value.items()}


def _ksid(data: dict[str, Any]) -> str:
    """The KSID of a stream GET_KEY or CLOSE names: required, and not the null one."""
    if data.get("key_stream_id") is None:
        raise ks.BadRequest("key_stream_id is required")
    ksid = ks.parse_ksid(data["key_stream_id"])
    if ksid is None:
        raise ks.BadRequest("key_stream_id must name an open stream, not the null one")
    return ksid


def _metadata_size(data: dict[str, Any]) -> int | None:
    """The caller's metadata buffer size: `metadata_size`, or the `size` of the `metadata`
    object the module sends ({"size": 46, "buffer": "..."}); None when not given."""
    if data.get("metadata_size") is not None:
        return ks.parse_index(data["metadata_size"])
    meta = data.get("metadata")
    if meta is None:
        return None
    size = _lower(meta, "metadata").get("size")
    try:
        return ks.parse_index(size)
    except ks.BadRequest:
        raise ks.BadRequest(f"metadata.size must be an integer from 0 to {ks.UINT32_MAX}") from None


class _Api:
    def __init__(self, streams: ks.KeyStreams) -> None:
        self.streams = streams

    async def serve(self, conn: Connection) -> None:
        """Answer requests until the client closes, or sends what cannot be framed."""
        framer = _Framer()
        while True:
            try:
                raw = framer.take()
                while raw is None:
                    data = await conn.read(65536)
                    if not data:
                        if framer.pending():
                            await self._send(conn, _fail(BAD_REQUEST, "the connection closed before the request was complete"))
                        return
                    framer.feed(data)
                    raw = framer.take()
            except (_Unframed, RequestTooLarge) as exc:  # where the next request starts is unknown
                await self._send(conn, _fail(BAD_REQUEST, str(exc)))
                await conn.linger()
                return
            except PeerClosed:
                return
            await self._send(conn, await self._one(conn, raw))
            conn.next_request()

    async def _send(self, conn: Connection, body: dict[str, Any]) -> None:
        await conn.send(json.dumps(body).encode("utf-8"))

    async def _one(self, conn: Connection, raw: bytes) -> dict[str, Any]:
        """One request's answer; never raises (the connection goes on)."""
        command = "?"
        try:
            try:
                request = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                raise ks.BadRequest(f"the request is not valid JSON: {_reason(exc)}") from None
            top = _lower(request, "the request")
            command = top.get("command")
            if not isinstance(command, str) or command.upper() not in COMMANDS:
                shown = command[:32] if isinstance(command, str) else command
                raise ks.BadRequest(f"command must be one of {', '.join(COMMANDS)}, not {shown!r}"[:200])
            command = command.upper()
            data = top.get("data")
            data = _lower(data, "data") if data is not None else {k: v for k, v in top.items() if k != "command"}
            if command == "OPEN_CONNECT":
                return await self._open_connect(conn, data)
            if command == "GET_KEY":
                return await self._get_key(conn, data)
            return await self._close(conn, data)
        except ks.BadRequest as exc:
            return _fail(BAD_REQUEST, exc.message)
        except KmsError as exc:  # not a party (401), cannot serve now (503)
            return _fail(exc.http_status, exc.message)
        except Exception as exc:  # a bug: its traceback, never its message (it might quote keys)
            tb = "".join(traceback.format_tb(exc.__traceback__))
            log.error("unexpected %s in %s from %s\n%s", type(exc).__name__, command, conn.peer, tb)
            return _fail(INTERNAL, "internal error")

    async def _open_connect(self, conn: Connection, data: dict[str, Any]) -> dict[str, Any]:
        source = self.streams.endpoint(data.get("source"), "source")
        destination = self.streams.endpoint(data.get("destination"), "destination")
        qos = ks.parse_qos(data.get("qos"))
        ksid = ks.parse_ksid(data.get("key_stream_id"))
        got = await conn.call(self.streams.open_connect, conn.caller, source, destination, qos, ksid)
        if got.status in (ks.SUCCESSFUL, ks.PEER_NOT_CONNECTED):
            log.info("open_connect %s: %s -> %s, stream %s", conn.caller or conn.peer, source, destination,
                     got.key_stream_id)
        return _answer({"status": got.status, "key_stream_id": got.key_stream_id, "qos": ks.qos_dict(got.qos)},
                       got.message)

    async def _get_key(self, conn: Connection, data: dict[str, Any]) -> dict[str, Any]:
        ksid = _ksid(data)
        index = ks.parse_index(data.get("index"))
        size = _metadata_size(data)
        got = await conn.call(self.streams.get_key, conn.caller, ksid, index, size)
        metadata = {"size": got.metadata_size, "buffer": got.metadata.decode("utf-8", "replace")}
        return _answer({"status": got.status, "index": got.index, "key_buffer": got.key_b64, "metadata": metadata},
                       got.message)

    async def _close(self, conn: Connection, data: dict[str, Any]) -> dict[str, Any]:
        ksid = _ksid(data)
        got = await conn.call(self.streams.close, conn.caller, ksid)
        if got.status == ks.SUCCESSFUL:
            log.info("close %s: stream %s", conn.caller or conn.peer, ksid)
        return _answer({"status": got.status}, got.message)
