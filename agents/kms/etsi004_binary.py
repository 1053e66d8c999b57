"""ETSI GS QKD 004 as the binary protocol over mutual TLS that the reference code speaks.

A message is an 8-byte header, then `length` bytes of payload (every integer big-endian):

    version  3 x uint8   1.0.1 (QUBIP etsi-qkd-004, Python) or 2.1.1 (the ETSI forge C
                         reference gs004-app-int edition 3, as its fork
                         diogoftm/minimal-etsi-qkd-004 has it); an answer carries the request's
    service  uint8       0x02/0x03 OPEN_CONNECT request/response, 0x04/0x05 GET_KEY,
                         0x08/0x09 CLOSE
    length   uint32      payload bytes

    OPEN_CONNECT request   source NUL-terminated, destination NUL-terminated (UTF-8 URIs),
                           QoS: 7 x uint32 (Key_chunk_size, Max_bps, Min_bps, Jitter,
                           Priority, Timeout, TTL) + Metadata_mimetype, Key_stream_ID 16 bytes
                           (RFC 4122 byte order; all zero asks the KME to assign one)
    OPEN_CONNECT response  status uint32, QoS, Key_stream_ID
    GET_KEY request        Key_stream_ID, index uint32, metadata (see dialects)
    GET_KEY response       status, index, key size uint32 + key, metadata size uint32 + metadata
    CLOSE request/response Key_stream_ID / status uint32

The two peers differ in three places, so the codec reads which one a request comes from
(its `Dialect`) and answers in the same one:
- QUBIP: Metadata_mimetype is a fixed 256-byte field, NUL-padded; GET_KEY sends only the
  caller's metadata buffer size (uint32); a response other than success carries the status
  alone (status 8: status + the metadata size needed; OPEN_CONNECT 0/1/7: the full layout).
- ETSI C: Metadata_mimetype is NUL-terminated (at most 256 bytes with the NUL); GET_KEY
  sends the metadata buffer as size uint32 + that many bytes; every response has the full
  layout (status 8: metadata size = the size needed, followed by as many zero bytes).
The two request forms cannot be confused: a mimetype area is either exactly string + NUL
or exactly 256 bytes; a GET_KEY payload is either 24 bytes or 24 + the size it declares
(when that size is 0 both are the same 24 bytes, and so are both answers).

Both run over TLS with client certificates (QUBIP's server requires one when configured
with certificates; the C server with SSL_VERIFY_FAIL_IF_NO_PEER_CERT); the caller is the SAE
its certificate names, and there is no plain-TCP form here. The QUBIP client keeps one
connection for all its calls, the C client makes one per call: both are served.
QUBIP's client takes only OPEN_CONNECT status 0 and 7 as success, so as a stream's source
it reads our status 1 (opened, peer not yet) as a failure, though the stream is open.

The codec only decodes and encodes; agents/kms/keystream.py decides every ETSI 004 outcome.
A request that breaks the framing (version, service, a declared length beyond what that
service can need, an unterminated string, trailing bytes) is not answered: the connection
is closed, because after a framing error nothing that follows can be trusted to start at a
header. A request that frames well but cannot be served (a URI that is not a qkd URI, QoS
the standard forbids, the null Key_stream_ID, a caller that is not a party of the stream)
is answered with status 4, "no QKD connection available", the nearest outcome the
protocol has; GET_KEY while the KME cannot serve is 2, "insufficient key".
"""
from __future__ import annotations

import enum
import logging
import ssl
import struct
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from . import keystream as ks
from .interface import KeyService, KmsError, Qos
from .streamserver import Connection, Limits, StreamServer

log = logging.getLogger(__name__)

VERSIONS = ((1, 0, 1), (2, 1, 1))
OPEN_CONNECT_REQUEST, OPEN_CONNECT_RESPONSE = 0x02, 0x03
GET_KEY_REQUEST, GET_KEY_RESPONSE = 0x04, 0x05
CLOSE_REQUEST, CLOSE_RESPONSE = 0x08, 0x09

HEADER = struct.Struct("!BBBBI")  # version major, minor, patch; service; payload length
HEADER_SIZE = HEADER.size  # 8
KSID_SIZE = 16
MIMETYPE_SIZE = 256  # QUBIP's fixed field; the ETSI C reference's maximum, NUL included
_QOS_INTS = struct.Struct("!7I")
_U32 = struct.Struct("!I")
MAX_URI = 1024  # bytes of one endpoint URI, NUL excluded
MAX_METADATA = 65536  # the metadata buffer an ETSI C client may send with GET_KEY
# The largest payload each request can have: a declared length beyond it is refused before
# a byte of the payload is read.
MAX_PAYLOAD = {
    OPEN_CONNECT_REQUEST: 2 * (MAX_URI + 1) + _QOS_INTS.size + MIMETYPE_SIZE + KSID_SIZE,
    GET_KEY_REQUEST: KSID_SIZE + 4 + 4 + MAX_METADATA,
    CLOSE_REQUEST: KSID_SIZE,
}
MAX_MESSAGE = HEADER_SIZE + max(MAX_PAYLOAD.values())
_RESPONSE_OF = {OPEN_CONNECT_REQUEST: OPEN_CONNECT_RESPONSE, GET_KEY_REQUEST: GET_KEY_RESPONSE,
                CLOSE_REQUEST: CLOSE_RESPONSE}


class ProtocolError(ValueError):
    """A message that breaks the framing: the connection is closed without an answer."""


class Dialect(enum.Enum):
    QUBIP = "qubip"  # QUBIP/etsi-qkd-004 client/client.py (and the qkd-etsi-api-c-wrapper that embeds it)
    ETSI_C = "etsi-c"  # ETSI forge gs004-app-int (diogoftm/minimal-etsi-qkd-004 serializers.c)


@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    service: int
    length: int


@dataclass(frozen=True)
class OpenConnectRequest:
    source: str
    destination: str
    qos: dict[str, Any]  # QoS field name -> value, as keystream.parse_qos reads it
    key_stream_id: str | None  # None: the null KSID (assign one)
    dialect: Dialect


@dataclass(frozen=True)
class GetKeyRequest:
    key_stream_id: str | None
    index: int
    metadata_size: int  # the caller's metadata buffer
    dialect: Dialect


@dataclass(frozen=True)
class CloseRequest:
    key_stream_id: str | None


Request = Union[OpenConnectRequest, GetKeyRequest, CloseRequest]


def decode_header(data: bytes) -> Header:
    """The header of a request, checked before its payload is read: known version, a
    request service, and a length no larger than that service can need."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    major, minor, patch, service, length = HEADER.unpack(data)
    version = (major, minor, patch)
    if version not in VERSIONS:
        raise ProtocolError(f"unsupported version {major}.{minor}.{patch}")
    if service not in MAX_PAYLOAD:
        raise ProtocolError(f"unknown request service type 0x{service:02x}")
    if length > MAX_PAYLOAD[service]:
        raise ProtocolError(f"payload length {length} exceeds {MAX_PAYLOAD[service]} for service 0x{service:02x}")
    return Header(version, service, length)


def decode_request(header: Header, payload: bytes) -> Request:
    """The request a payload carries; ProtocolError unless every byte is accounted for."""
    if len(payload) != header.length:
        raise ProtocolError(f"payload is {len(payload)} bytes, header says {header.length}")
    if header.service == OPEN_CONNECT_REQUEST:
        return _open_connect(payload)
    if header.service == GET_KEY_REQUEST:
        return _get_key(payload)
    if len(payload) != KSID_SIZE:
        raise ProtocolError(f"CLOSE payload must be {KSID_SIZE} bytes")
    return CloseRequest(ks.parse_ksid(payload))


def _cstring(payload: bytes, start: int, limit: int, name: str) -> tuple[str, int]:
    end = payload.find(b"\x00", start, start + limit + 1)
    if end < 0:
        raise ProtocolError(f"{name}: no NUL terminator within {limit} bytes")
    try:
        return payload[start:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} is not UTF-8") from None


def _open_connect(payload: bytes) -> OpenConnectRequest:
    source, pos = _cstring(payload, 0, MAX_URI, "source")
    destination, pos = _cstring(payload, pos, MAX_URI, "destination")
    if len(payload) - pos < _QOS_INTS.size + 1 + KSID_SIZE:
        raise ProtocolError("OPEN_CONNECT payload too short for QoS and Key_stream_ID")
    ints = _QOS_INTS.unpack_from(payload, pos)
    pos += _QOS_INTS.size
    area = payload[pos:len(payload) - KSID_SIZE]  # the mimetype field, in one dialect or the other
    nul = area.find(b"\x00")
    if nul < 0:
        raise ProtocolError("Metadata_mimetype has no NUL terminator")
    if len(area) == nul + 1 and len(area) <= MIMETYPE_SIZE:
        dialect = Dialect.ETSI_C
    elif len(area) == MIMETYPE_SIZE and not area[nul:].strip(b"\x00"):
        dialect = Dialect.QUBIP
    else:
        raise ProtocolError(f"Metadata_mimetype field of {len(area)} bytes is neither NUL-terminated "
                            f"nor {MIMETYPE_SIZE} bytes NUL-padded")
    try:
        mimetype = area[:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("Metadata_mimetype is not UTF-8") from None
    qos: dict[str, Any] = dict(zip(ks.QOS_INTS, ints))
    if mimetype:  # empty: the KME's default
        qos["metadata_mimetype"] = mimetype
    ksid = ks.parse_ksid(payload[-KSID_SIZE:])
    return OpenConnectRequest(source, destination, qos, ksid, dialect)


def _get_key(payload: bytes) -> GetKeyRequest:
    if len(payload) < KSID_SIZE + 8:
        raise ProtocolError("GET_KEY payload too short")
    ksid = ks.parse_ksid(payload[:KSID_SIZE])
    index, size = struct.unpack_from("!II", payload, KSID_SIZE)
    rest = len(payload) - KSID_SIZE - 8
    if rest == 0:
        dialect = Dialect.QUBIP if size else Dialect.ETSI_C  # size 0: both forms are these 24 bytes
    elif rest == size:
        dialect = Dialect.ETSI_C  # the caller's metadata buffer follows; its content is not used
    else:
        raise ProtocolError(f"GET_KEY metadata: {rest} bytes follow, size field says {size}")
    return GetKeyRequest(ksid, index, size, dialect)


def encode(version: tuple[int, int, int], service: int, payload: bytes) -> bytes:
    """A whole message: header + payload."""
    return HEADER.pack(*version, service, len(payload)) + payload


def _ksid_bytes(ksid: str | None) -> bytes:
    return uuid.UUID(ksid).bytes if ksid else bytes(KSID_SIZE)


def encode_qos(qos: Qos, dialect: Dialect) -> bytes:
    mime = qos.metadata_mimetype.encode("utf-8")
    if dialect is Dialect.QUBIP:
        if len(mime) > MIMETYPE_SIZE:
            raise ValueError("metadata_mimetype longer than the 256-byte field")
        field = mime.ljust(MIMETYPE_SIZE, b"\x00")
    else:
        if len(mime) + 1 > MIMETYPE_SIZE or b"\x00" in mime:
            raise ValueError("metadata_mimetype does not fit 256 bytes with its NUL")
        field = mime + b"\x00"
    return _QOS_INTS.pack(*(getattr(qos, name) for name in ks.QOS_INTS)) + field


def encode_opened(opened: ks.Opened, dialect: Dialect) -> bytes:
    """OPEN_CONNECT response payload."""
    status = _U32.pack(opened.status)
    if dialect is Dialect.QUBIP and opened.status not in (ks.SUCCESSFUL, ks.PEER_NOT_CONNECTED, ks.QOS_NOT_MET):
        return status
    return status + encode_qos(opened.qos, dialect) + _ksid_bytes(opened.key_stream_id)


def encode_chunk(chunk: ks.Chunk, index: int, dialect: Dialect) -> bytes:
    """GET_KEY response payload; `index` is the requested one, for answers without a chunk."""
    status = _U32.pack(chunk.status)
    got = chunk.index if chunk.index is not None else index
    if chunk.status == ks.SUCCESSFUL:
        return (status + _U32.pack(got) + _U32.pack(len(chunk.key)) + chunk.key
                + _U32.pack(len(chunk.metadata)) + chunk.metadata)
    if dialect is Dialect.QUBIP:
        return status + _U32.pack(chunk.metadata_size) if chunk.status == ks.METADATA_SIZE_INSUFFICIENT else status
    need = chunk.metadata_size if chunk.status == ks.METADATA_SIZE_INSUFFICIENT else 0
    return status + _U32.pack(got) + _U32.pack(0) + _U32.pack(need) + bytes(need)


def encode_closed(closed: ks.Closed) -> bytes:
    """CLOSE response payload."""
    return _U32.pack(closed.status)


class Handler:
    """Answers decoded requests on KeyStreams for an authenticated caller. Blocking (the
    calls may wait on a QoS timeout or the relay): run it off the event loop."""

    def __init__(self, streams: ks.KeyStreams) -> None:
        self.streams = streams

    def answer(self, caller: str, header: Header, payload: bytes) -> bytes:
        """The whole response message to one request; ProtocolError: close the connection."""
        return self.respond(caller, header, decode_request(header, payload))

    def respond(self, caller: str, header: Header, request: Request) -> bytes:
        """The whole response message to a decoded request, in the request's version and dialect."""
        if isinstance(request, OpenConnectRequest):
            body = encode_opened(self._open(caller, request), request.dialect)
        elif isinstance(request, GetKeyRequest):
            body = encode_chunk(self._get_key(caller, request), request.index, request.dialect)
        else:
            body = encode_closed(self._close(caller, request))
        return encode(header.version, _RESPONSE_OF[header.service], body)

    def _open(self, caller: str, req: OpenConnectRequest) -> ks.Opened:
        try:
            source = self.streams.endpoint(req.source, "source")
            destination = self.streams.endpoint(req.destination, "destination")
            qos = ks.parse_qos(req.qos)
        except ks.BadRequest as exc:
            log.info("ETSI 004 binary open_connect from %s refused: %s", caller, exc.message)
            return ks.Opened(ks.NO_QKD_CONNECTION, None, Qos(), exc.message)
        try:
            got = self.streams.open_connect(caller, source, destination, qos, req.key_stream_id)
        except (ks.BadRequest, KmsError) as exc:
            log.info("ETSI 004 binary open_connect from %s refused: %s", caller, _why(exc))
            return ks.Opened(ks.NO_QKD_CONNECTION, None, qos, _why(exc))
        if got.status in (ks.SUCCESSFUL, ks.PEER_NOT_CONNECTED):
            log.info("open_connect %s: %s -> %s, stream %s (binary)", caller, source, destination, got.key_stream_id)
        return got

    def _get_key(self, caller: str, req: GetKeyRequest) -> ks.Chunk:
        if req.key_stream_id is None:
            return ks.Chunk(ks.NO_QKD_CONNECTION, req.index, message="the null Key_stream_ID names no stream")
        try:
            return self.streams.get_key(caller, req.key_stream_id, req.index, req.metadata_size)
        except (ks.BadRequest, KmsError) as exc:
            log.info("ETSI 004 binary get_key from %s refused: %s", caller, _why(exc))
            busy = isinstance(exc, KmsError) and exc.http_status == 503
            return ks.Chunk(ks.INSUFFICIENT_KEY if busy else ks.NO_QKD_CONNECTION, req.index, message=_why(exc))

    def _close(self, caller: str, req: CloseRequest) -> ks.Closed:
        if req.key_stream_id is None:
            return ks.Closed(ks.NO_QKD_CONNECTION, "the null Key_stream_ID names no stream")
        try:
            got = self.streams.close(caller, req.key_stream_id)
        except (ks.BadRequest, KmsError) as exc:
            log.info("ETSI 004 binary close from %s refused: %s", caller, _why(exc))
            return ks.Closed(ks.NO_QKD_CONNECTION, _why(exc))
        if got.status == ks.SUCCESSFUL:
            log.info("close %s: stream %s (binary)", caller, req.key_stream_id)
        return got


def _why(exc: Exception) -> str:
    return getattr(exc, "message", None) or type(exc).__name__


def serve(handler: Handler) -> Callable[[Connection], Awaitable[None]]:
    """The connection loop for streamserver: header, payload, answer, as many times as the
    client asks on one connection (the QUBIP client keeps it; the ETSI C client makes one
    per request). Mutual TLS only: a caller without a certificate is never served."""

    async def run(conn: Connection) -> None:
        if conn.caller is None:
            log.warning("ETSI 004 binary: refusing %s, which has no client certificate", conn.peer)
            return
        while True:
            first = await conn.read(HEADER_SIZE)
            if not first:
                return  # closed between requests: the normal end
            try:
                head = first if len(first) == HEADER_SIZE else first + await conn.readexactly(HEADER_SIZE - len(first))
                header = decode_header(head)  # before the payload: a huge length is never read
                request = decode_request(header, await conn.readexactly(header.length))
            except ProtocolError as exc:
                log.info("ETSI 004 binary: closing the connection from %s (%s): %s", conn.peer, conn.caller, exc)
                return
            await conn.send(await conn.call(handler.respond, conn.caller, header, request))
            conn.next_request()

    return run


def server(service: KeyService, host: str, port: int, ssl_ctx: ssl.SSLContext,
           nodes: Mapping[str, Any] | None = None, limits: Limits | None = None) -> StreamServer:
    """The ETSI 004 binary server of a node (not started). `ssl_ctx` must require client
    certificates: the protocol has no other way to say who the caller is."""
    limits = limits or Limits(max_request=MAX_MESSAGE)
    if limits.max_request < MAX_MESSAGE:
        raise ValueError(f"ETSI 004 binary needs max_request of at least {MAX_MESSAGE} bytes")
    return StreamServer(serve(Handler(ks.KeyStreams(service, nodes))), host, port, ssl_ctx, limits=limits,
                        role="ETSI 004 binary")
