"""ETSI GS QKD 004 V2.1.1 key streams, independent of any wire form.

The three front ends (REST in etsi004.py, the MadQCI JSON command form, the ETSI binary
protocol) decode their requests into the calls below and encode what they return; none
of them decides an ETSI 004 outcome itself. Every outcome the standard models is a
`status` (clause 6.2, table "status values"), never an exception: a front end only has
to write it. What is not an ETSI 004 outcome raises: `BadRequest` (a malformed request,
each wire form answers it its own way) and KmsError without status004 (the caller may not
do that: 401, or the KME cannot serve now: 503).

Endpoints are URIs (clause 6.1.2). Accepted: a bare SAE ID, `qkd://SAE_ID@node` and
`qkd://SAE_ID` (node: the qkdn_id or name of the SAE's node; a node that is not the
SAE's is refused), with optional query/fragment ignored. The SAE ID is what the LKMS
works with.
"""
from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from .interface import KeyService, KmsError, Qos

# Clause 6.2 status values.
SUCCESSFUL = 0
PEER_NOT_CONNECTED = 1  # OPEN_CONNECT succeeded, the peer application has not opened yet
INSUFFICIENT_KEY = 2  # GET_KEY: not enough key now
PEER_NOT_CONNECTED_GET_KEY = 3  # GET_KEY before the peer application opened the stream
NO_QKD_CONNECTION = 4  # no QKD connection between the two (or no such open stream)
KSID_IN_USE = 5  # OPEN_CONNECT with a key_stream_id already in use
TIMEOUT_ERROR = 6  # the QoS timeout passed before the call could complete
QOS_NOT_MET = 7  # OPEN_CONNECT: QoS cannot be met; the answer carries a counter-proposal
METADATA_SIZE_INSUFFICIENT = 8  # GET_KEY: the caller's metadata buffer is too small; answer says the size

UINT32_MAX = 2**32 - 1
QOS_INTS = ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout", "ttl")
NULL_KSID = "00000000-0000-0000-0000-000000000000"


class BadRequest(ValueError):
    """A request that cannot be read as an ETSI 004 call (wire form answers it: REST 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Opened:
    """OPEN_CONNECT's answer: the stream and the QoS granted (status 0 or 1), or the
    counter-proposal (status 7), or no stream (other statuses)."""

    status: int
    key_stream_id: str | None
    qos: Qos
    message: str = ""


@dataclass(frozen=True)
class Chunk:
    """GET_KEY's answer. `key` is empty unless status is 0; `metadata_size` is the size the
    metadata needs (the caller's buffer was too small when status is 8)."""

    status: int
    index: int | None
    key: bytes = b""
    metadata: bytes = b""
    metadata_size: int = 0
    message: str = ""

    @property
    def key_b64(self) -> str:
        return base64.b64encode(self.key).decode("ascii")


@dataclass(frozen=True)
class Closed:
    status: int
    message: str = ""


def sae_of_uri(value: Any, name: str, nodes: Mapping[str, Collection[str]] | None = None) -> str:
    """The SAE ID an endpoint URI names. `nodes`: SAE ID -> the names its node goes by
    (qkdn_id, node name), to refuse `qkd://SAE@other-node`."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{name} is required (the URI of the application)")
    text = value.strip()
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("qkd", "etsi-qkd", "hybrid"):
        raise BadRequest(f"{name}: URI scheme {parts.scheme!r} is not qkd")
    user, at, host = parts.netloc.rpartition("@")
    sae = unquote(user if at else host)
    node = host if at else ""
    if not sae:
        raise BadRequest(f"{name}: the URI names no application")
    if node and nodes is not None and sae in nodes and node.lower() not in nodes[sae]:
        raise BadRequest(f"{name}: application {sae} is not at node {node}")
    return sae


def parse_ksid(value: Any, name: str = "key_stream_id") -> str | None:
    """A key_stream_id in canonical form; None for absent, null, empty or all-zero
    (clause 6.3: a null KSID asks the KME to assign one)."""
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 16:
            raise BadRequest(f"{name} must be 16 bytes")
        text = str(uuid.UUID(bytes=bytes(value)))
    elif isinstance(value, str):
        try:
            text = str(uuid.UUID(value))
        except ValueError:
            raise BadRequest(f"{name} is not a UUID: {value[:64]!r}") from None
    else:
        raise BadRequest(f"{name} must be a UUID string")
    return None if text == NULL_KSID else text


def parse_qos(value: Any) -> Qos:
    """QoS (clause 6.1.1) from a mapping; names matched without regard to case (the
    standard writes Key_chunk_size, TTL...); absent or null fields keep the default."""
    if value is None:
        return Qos()
    if not isinstance(value, Mapping):
        raise BadRequest("qos must be an object")
    given = {str(k).lower(): v for k, v in value.items() if v is not None}
    fields: dict[str, Any] = {}
    for name in QOS_INTS:
        if name in given:
            v = given[name]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= UINT32_MAX:
                raise BadRequest(f"qos.{name} must be an integer from 0 to {UINT32_MAX}")
            fields[name] = v
    if fields.get("key_chunk_size") == 0:
        raise BadRequest("qos.key_chunk_size must be at least 1 (bytes)")
    if fields.get("max_bps") and fields.get("min_bps", 0) > fields["max_bps"]:
        raise BadRequest("qos.min_bps must not exceed qos.max_bps")
    if "metadata_mimetype" in given:
        mime = given["metadata_mimetype"]
        if not isinstance(mime, str) or "/" not in mime or len(mime) > 256:
            raise BadRequest("qos.metadata_mimetype must be a MIME type such as application/json")
        fields["metadata_mimetype"] = mime
    return Qos(**fields)


def qos_dict(qos: Qos) -> dict[str, Any]:
    return dataclasses.asdict(qos)


def parse_index(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 10:
            raise BadRequest(f"index must be an integer from 0 to {UINT32_MAX}")
        value = int(text)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= UINT32_MAX:
        raise BadRequest(f"index must be an integer from 0 to {UINT32_MAX}")
    return value


class KeyStreams:
    """OPEN_CONNECT, GET_KEY and CLOSE on the LKMS, with every 004 outcome as a status.

    `caller` is the SAE the transport authenticated (TLS client certificate); None only
    on a transport the operator declared trusted (plain TCP on loopback), where the
    caller is the party of the request attached to this node. Calls may wait (QoS
    timeout, the relay): run them off an event loop.
    """

    def __init__(self, service: KeyService, nodes: Mapping[str, Collection[str]] | None = None) -> None:
        self.service = service
        self.nodes = nodes

    def endpoint(self, value: Any, name: str) -> str:
        return sae_of_uri(value, name, self.nodes)

    def open_connect(self, caller: str | None, source: str, destination: str, qos: Qos,
                     key_stream_id: str | None) -> Opened:
        try:
            stream = self.service.open_connect(caller, source, destination, qos, key_stream_id)
        except KmsError as exc:
            if exc.status004 is None:
                raise
            counter = next((d["qos"] for d in exc.details if isinstance(d.get("qos"), dict)), None)
            ksid = None if exc.status004 == QOS_NOT_MET else key_stream_id
            return Opened(exc.status004, ksid, Qos(**counter) if counter else qos, exc.message)
        return Opened(SUCCESSFUL if stream.peer_connected else PEER_NOT_CONNECTED, stream.key_stream_id, stream.qos)

    def get_key(self, caller: str | None, key_stream_id: str, index: int | None,
                metadata_size: int | None = None) -> Chunk:
        try:
            got, key, metadata = self.service.get_key(caller, key_stream_id, index, metadata_size)
        except KmsError as exc:
            if exc.status004 is None:
                raise
            need = next((int(d["metadata_size"]) for d in exc.details if "metadata_size" in d), 0)
            return Chunk(exc.status004, index, metadata_size=need, message=exc.message)
        return Chunk(SUCCESSFUL, got, key, metadata, len(metadata))

    def close(self, caller: str | None, key_stream_id: str) -> Closed:
        try:
            self.service.close(caller, key_stream_id)
        except KmsError as exc:
            if exc.status004 is None:
                raise
            return Closed(exc.status004, exc.message)
        return Closed(SUCCESSFUL)
