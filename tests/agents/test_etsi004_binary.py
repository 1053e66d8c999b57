"""ETSI GS QKD 004 binary protocol (agents/kms/etsi004_binary.py): the codec against the
reference clients' exact bytes, and the server over real mutual TLS against the real LKMS."""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lkmspair import lkms_pair

from agentproc import agent_config, free_port
from sdqkd import pki
from sdqkd.agents import config as agent_cfg
from sdqkd.agents.kms import etsi004_binary as b4
from sdqkd.agents.kms import keystream as ks
from sdqkd.agents.kms.interface import Qos
from sdqkd.agents.kms.lkms import Lkms
from sdqkd.agents.kms.streamserver import Limits, StreamServer
from sdqkd.configfile import ConfigError

KSID = "3f1c2a9e-7b4d-4e21-9a0b-5c6d7e8f9012"

# Recorded from the QUBIP reference client, github QUBIP/etsi-qkd-004, client/client.py at commit
# acc76c580783b07e964ec6fd9aaf59f5f542463b (the same encoder as the `ksid_sync` branch that
# qursa-uc3m/qkd-etsi-api-c-wrapper scripts/install_python_etsi004_client.sh installs): its
# QKDClient with default QoS (512, 40000, 5000, 10, 0, 5000, 3600, "application/json") sending
# open_connect("qkd://sae-a", "qkd://sae-b"), then get_key(0, 1024) and close() on stream KSID.
QUBIP_OPEN_CONNECT = bytes.fromhex(
    "01000102" "00000144"  # version 1.0.1, OPEN_CONNECT request, 324 payload bytes
    "716b643a2f2f7361652d6100" "716b643a2f2f7361652d6200"  # "qkd://sae-a\0" "qkd://sae-b\0"
    "00000200" "00009c40" "00001388" "0000000a" "00000000" "00001388" "00000e10"  # QoS uint32s
    "6170706c69636174696f6e2f6a736f6e" + "00" * 240  # "application/json" NUL-padded to 256
    + "00000000000000000000000000000000"  # null Key_stream_ID: assign one
)
QUBIP_GET_KEY = bytes.fromhex("01000104" "00000018" "3f1c2a9e7b4d4e219a0b5c6d7e8f9012" "00000000" "00000400")
QUBIP_CLOSE = bytes.fromhex("01000108" "00000010" "3f1c2a9e7b4d4e219a0b5c6d7e8f9012")


# Recorded from the ETSI forge C reference client (gs004-app-int edition 3, as forked in
# github diogoftm/minimal-etsi-qkd-004 at commit 6635c902d05cff1e47464704c8b9d4a1477992ce:
# etsi-gs-qkd-004-c/src/qkd/ssl_socket_client.c, serializers.c, sizes.c, interfaces.c built
# with OpenSSL, libexplain stubbed, SSL_write wrapped to dump what it sends), driven against
# this server: qkd_open_connect_struct("qkd://sae-a", "qkd://sae-b", QoS {32, 0, 0, 0, 0, 2000,
# 60, "application/json"}, null KSID), then GET_KEY (index 0, a 64-byte zeroed metadata buffer)
# and CLOSE on stream KSID_C. Its version is 2.1.1; one TLS connection per request.
KSID_C = "f2c9d18f-7cf7-4c23-bdba-0172eadf8c48"
ETSI_C_OPEN_CONNECT = bytes.fromhex(
    "02010102" "00000055"  # version 2.1.1, OPEN_CONNECT request, 85 payload bytes
    "716b643a2f2f7361652d6100" "716b643a2f2f7361652d6200"  # "qkd://sae-a\0" "qkd://sae-b\0"
    "00000020" "00000000" "00000000" "00000000" "00000000" "000007d0" "0000003c"  # QoS uint32s
    "6170706c69636174696f6e2f6a736f6e00"  # "application/json\0": NUL-terminated, not padded
    "00000000000000000000000000000000"  # null Key_stream_ID
)
ETSI_C_GET_KEY = bytes.fromhex("02010104" "00000058" "f2c9d18f7cf74c23bdba0172eadf8c48" "00000000" "00000040" + "00" * 64)
ETSI_C_CLOSE = bytes.fromhex("02010108" "00000010" "f2c9d18f7cf74c23bdba0172eadf8c48")


def etsi_c_open_connect(source: str, destination: str, mime: str = "application/json", ksid: str | None = None,
                        qos: tuple[int, ...] = (32, 32, 32, 0, 0, 0, 0)) -> bytes:
    """As the ETSI forge C reference serializes it (diogoftm/minimal-etsi-qkd-004,
    etsi-gs-qkd-004-c/src/qkd/serializers.c and sizes.c at 5e536c001e0aa7b4d47ecc778c13e1e6e2253fe5):
    NUL-terminated strings, mimetype included; its QKD_004_VERSION is 2.1.1 (interfaces.c)."""
    payload = (source.encode() + b"\0" + destination.encode() + b"\0" + struct.pack("!7I", *qos)
               + mime.encode() + b"\0" + (uuid.UUID(ksid).bytes if ksid else bytes(16)))
    return struct.pack("!BBBBI", 2, 1, 1, 2, len(payload)) + payload


def etsi_c_get_key(ksid: str, index: int, metadata: bytes) -> bytes:
    payload = uuid.UUID(ksid).bytes + struct.pack("!II", index, len(metadata)) + metadata
    return struct.pack("!BBBBI", 2, 1, 1, 4, len(payload)) + payload


def split(message: bytes) -> tuple[b4.Header, bytes]:
    header = b4.decode_header(message[:8])
    return header, message[8:]


def decode(message: bytes) -> b4.Request:
    return b4.decode_request(*split(message))


# --- codec ------------------------------------------------------------------------------

def test_the_reference_clients_open_connect_decodes_to_the_call() -> None:
    header, _ = split(QUBIP_OPEN_CONNECT)
    assert header == b4.Header((1, 0, 1), b4.OPEN_CONNECT_REQUEST, 324) and len(QUBIP_OPEN_CONNECT) == 332
    req = decode(QUBIP_OPEN_CONNECT)
    assert req == b4.OpenConnectRequest(
        "qkd://sae-a", "qkd://sae-b",
        {"key_chunk_size": 512, "max_bps": 40000, "min_bps": 5000, "jitter": 10, "priority": 0, "timeout": 5000,
         "ttl": 3600, "metadata_mimetype": "application/json"}, None, b4.Dialect.QUBIP)
    assert ks.parse_qos(req.qos) == Qos(512, 40000, 5000, 10, 0, 5000, 3600, "application/json")


def test_the_reference_clients_get_key_and_close_decode_to_the_calls() -> None:
    assert decode(QUBIP_GET_KEY) == b4.GetKeyRequest(KSID, 0, 1024, b4.Dialect.QUBIP)
    assert decode(QUBIP_CLOSE) == b4.CloseRequest(KSID)


def test_the_etsi_c_reference_clients_bytes_decode_to_the_calls() -> None:
    req = decode(ETSI_C_OPEN_CONNECT)
    assert req == b4.OpenConnectRequest(
        "qkd://sae-a", "qkd://sae-b",
        {"key_chunk_size": 32, "max_bps": 0, "min_bps": 0, "jitter": 0, "priority": 0, "timeout": 2000, "ttl": 60,
         "metadata_mimetype": "application/json"}, None, b4.Dialect.ETSI_C)
    assert decode(ETSI_C_GET_KEY) == b4.GetKeyRequest(KSID_C, 0, 64, b4.Dialect.ETSI_C)
    assert decode(ETSI_C_CLOSE) == b4.CloseRequest(KSID_C)
    assert ETSI_C_OPEN_CONNECT == etsi_c_open_connect("qkd://sae-a", "qkd://sae-b", qos=(32, 0, 0, 0, 0, 2000, 60))


def test_the_etsi_c_forms_decode_too() -> None:
    req = decode(etsi_c_open_connect("sae-a", "qkd://sae-b@bob", ksid=KSID))
    assert (req.source, req.destination, req.key_stream_id, req.dialect) == ("sae-a", "qkd://sae-b@bob", KSID, b4.Dialect.ETSI_C)
    assert req.qos["key_chunk_size"] == 32 and req.qos["metadata_mimetype"] == "application/json"
    # the ETSI C client sends its metadata buffer (diogoftm's fork: a 2-byte key-type record)
    assert decode(etsi_c_get_key(KSID, 7, b"\x00\x00")) == b4.GetKeyRequest(KSID, 7, 2, b4.Dialect.ETSI_C)
    assert decode(etsi_c_get_key(KSID, 7, b"")) == b4.GetKeyRequest(KSID, 7, 0, b4.Dialect.ETSI_C)


def test_responses_in_the_qubip_form_parse_as_the_reference_client_parses_them() -> None:
    qos = Qos(512, 40000, 5000, 10, 0, 5000, 3600)
    msg = b4.encode((1, 0, 1), b4.OPEN_CONNECT_RESPONSE, b4.encode_opened(ks.Opened(0, KSID, qos), b4.Dialect.QUBIP))
    # client.py parse_open_connect_response: status, 7 uint32 + 256-byte mimetype, KSID at 4 + 28 + 256
    assert msg[:8] == bytes.fromhex("01000103") + struct.pack("!I", 4 + 28 + 256 + 16)
    payload = msg[8:]
    assert struct.unpack("!I7I", payload[:32]) == (0, 512, 40000, 5000, 10, 0, 5000, 3600)
    assert payload[32:288].rstrip(b"\0") == b"application/json" and uuid.UUID(bytes=payload[288:304]) == uuid.UUID(KSID)
    refused = b4.encode_opened(ks.Opened(ks.KSID_IN_USE, KSID, qos), b4.Dialect.QUBIP)
    assert refused == struct.pack("!I", 5)  # status alone, as the reference server answers
    chunk = b4.encode_chunk(ks.Chunk(0, 3, b"k" * 32, b'{"hops": 0}', 11), 3, b4.Dialect.QUBIP)
    assert chunk == struct.pack("!III", 0, 3, 32) + b"k" * 32 + struct.pack("!I", 11) + b'{"hops": 0}'
    small = b4.encode_chunk(ks.Chunk(ks.METADATA_SIZE_INSUFFICIENT, 3, metadata_size=40), 3, b4.Dialect.QUBIP)
    assert small == struct.pack("!II", 8, 40)
    assert b4.encode_chunk(ks.Chunk(ks.INSUFFICIENT_KEY, 3), 3, b4.Dialect.QUBIP) == struct.pack("!I", 2)
    assert b4.encode_closed(ks.Closed(0)) == struct.pack("!I", 0)


def test_responses_in_the_etsi_c_form_always_have_the_full_layout() -> None:
    opened = b4.encode_opened(ks.Opened(ks.KSID_IN_USE, None, Qos()), b4.Dialect.ETSI_C)
    assert opened == struct.pack("!I7I", 5, 32, 0, 0, 0, 0, 0, 0) + b"application/json\0" + bytes(16)
    small = b4.encode_chunk(ks.Chunk(ks.METADATA_SIZE_INSUFFICIENT, None, metadata_size=5), 9, b4.Dialect.ETSI_C)
    assert small == struct.pack("!IIII", 8, 9, 0, 5) + bytes(5)  # size field and buffer agree
    ok = b4.encode_chunk(ks.Chunk(0, 9, b"k" * 4, b"{}", 2), 9, b4.Dialect.ETSI_C)
    assert ok == b4.encode_chunk(ks.Chunk(0, 9, b"k" * 4, b"{}", 2), 9, b4.Dialect.QUBIP)


def test_round_trip_of_open_connect_in_both_dialects() -> None:
    qos = Qos(64, 1000, 10, 1, 2, 3000, 60, "text/plain")
    for dialect, version in ((b4.Dialect.QUBIP, (1, 0, 1)), (b4.Dialect.ETSI_C, (2, 1, 1))):
        # a request is a response's layout less the status, plus the two URIs in front
        payload = b"qkd://sae-a\0sae-b\0" + b4.encode_qos(qos, dialect) + uuid.UUID(KSID).bytes
        req = decode(b4.encode(version, b4.OPEN_CONNECT_REQUEST, payload))
        assert req == b4.OpenConnectRequest("qkd://sae-a", "sae-b", {**ks.qos_dict(qos)}, KSID, dialect)


@pytest.mark.parametrize("header, why", [
    (bytes.fromhex("0100010200000144")[:7], "8 bytes"),
    (bytes.fromhex("0200000200000010"), "version"),
    (bytes.fromhex("01000103000000ff"), "service"),  # a response type is not a request
    (bytes.fromhex("010001ff00000000"), "service"),  # the C reference's CLOSE_SERVER is not served
    (bytes.fromhex("01000102ffffffff"), "exceeds"),
    (bytes.fromhex("0100010800000011"), "exceeds"),  # CLOSE is 16 bytes, never more
    (bytes.fromhex("0100010400010019"), "exceeds"),  # GET_KEY with a buffer over 64 KiB
])
def test_bad_headers_are_protocol_errors(header: bytes, why: str) -> None:
    with pytest.raises(b4.ProtocolError, match=why):
        b4.decode_header(header)


@pytest.mark.parametrize("message, why", [
    (QUBIP_OPEN_CONNECT[:8] + QUBIP_OPEN_CONNECT[8:-1], "header says"),
    (QUBIP_GET_KEY[:7] + b"\x19" + QUBIP_GET_KEY[8:] + b"\0", "size field"),  # trailing garbage
    (QUBIP_CLOSE[:7] + b"\x0f" + QUBIP_CLOSE[8:-1], "16 bytes"),
    (b4.encode((1, 0, 1), 2, b"no terminator at all"), "NUL"),
    (b4.encode((1, 0, 1), 2, b"a\0b\0" + bytes(27)), "too short"),
    (b4.encode((1, 0, 1), 2, b"a\0b\0" + bytes(28) + b"text/plain" + b"\0x" + bytes(16)), "neither"),
    (b4.encode((1, 0, 1), 2, b"a\0b\0" + bytes(28) + b"x" * 300 + b"\0" + bytes(16)), "neither"),
    (b4.encode((1, 0, 1), 2, b"\xff\0b\0" + bytes(28) + b"\0" + bytes(16)), "UTF-8"),
    (b4.encode((1, 0, 1), 2, b"a" * 1100 + b"\0b\0" + bytes(28) + b"\0" + bytes(16)), "within 1024"),
    (b4.encode((1, 0, 1), 4, bytes(16) + struct.pack("!II", 0, 3) + b"ab"), "size field"),
])
def test_payloads_that_break_the_framing_are_protocol_errors(message: bytes, why: str) -> None:
    header = b4.Header(tuple(message[:3]), message[3], struct.unpack("!I", message[4:8])[0])
    with pytest.raises(b4.ProtocolError, match=why):
        b4.decode_request(header, message[8:])


# --- over mutual TLS against the real LKMS -----------------------------------------------
# Two nodes as in test_etsi004.py: alice holds sae-a, bob holds sae-b, one PHYS link whose
# keys both stores hold, forwarding modules joined; each node serves the binary protocol.

A, B = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/etsi004-binary/{n}")) for n in ("alice", "bob"))
LINK, APP = "10000000-0000-4000-8000-0000000000b4", "30000000-0000-4000-8000-0000000000b4"
SAES = {"sae-a": A, "sae-b": B}
READ_TIMEOUT = 2.0


@dataclass
class Lab:
    ports: dict[str, int]  # SAE -> binary port of its node
    ca: Path
    certs: dict[str, tuple[Path, Path]]
    servers: dict[str, StreamServer]

    def connect(self, sae: str | None, node_of: str = "sae-a") -> ssl.SSLSocket:
        """A TLS connection as `sae` (None: no client certificate) to the node of `node_of`."""
        ctx = pki.client_ssl_context(*self.certs[sae], self.ca) if sae else ssl.create_default_context(cafile=str(self.ca))
        raw = socket.create_connection(("127.0.0.1", self.ports[node_of]), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def ask(self, sae: str, message: bytes, node_of: str | None = None) -> tuple[tuple[int, ...], bytes]:
        """One request on a connection of its own (as the ETSI C client does)."""
        with self.connect(sae, node_of or sae) as s:
            s.sendall(message)
            return answer(s)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = s.recv(n - len(data))
        if not part:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += part
    return data


def answer(s: socket.socket) -> tuple[tuple[int, ...], bytes]:
    """(version major, minor, patch, service), payload of one response."""
    *head, length = struct.unpack("!BBBBI", recv_exactly(s, 8))
    return tuple(head), recv_exactly(s, length)


def closed_without_answer(s: ssl.SSLSocket) -> bool:
    try:
        return s.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def _serve(lkms: Lkms, server_ctx: ssl.SSLContext) -> StreamServer:
    limits = Limits(read_timeout=READ_TIMEOUT, handshake_timeout=5, max_request=b4.MAX_MESSAGE, max_connections=16)
    return b4.server(lkms, "127.0.0.1", 0, server_ctx, limits=limits).start()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    d = tmp_path_factory.mktemp("etsi004bin")
    ca = pki.make_ca(d / "ca", "lab-ca")
    certs = {sae: pki.issue(ca, sae, d / "sae", client=True) for sae in ("sae-a", "sae-b", "sae-x")}
    (alice, alice_srv), (bob, bob_srv) = lkms_pair(d, ca, (A, B), SAES, LINK, APP, _serve, link_keys=600)
    ports = {"sae-a": alice_srv.port, "sae-b": bob_srv.port, "sae-x": alice_srv.port}
    yield Lab(ports, ca[0], certs, {"alice": alice_srv, "bob": bob_srv})
    for srv, lkms in ((alice_srv, alice), (bob_srv, bob)):
        srv.stop()
        lkms.shutdown()


def with_ksid(message: bytes, ksid: str) -> bytes:
    """An OPEN_CONNECT as the reference client sends it once its key_stream_id is set."""
    return message[:-16] + uuid.UUID(ksid).bytes


def parse_chunk(payload: bytes) -> tuple[int, int, bytes, bytes]:
    """(status, index, key, metadata) as the reference client's parse_get_key_response reads a success."""
    status, index, size = struct.unpack_from("!III", payload)
    key = payload[12:12 + size]
    (msize,) = struct.unpack_from("!I", payload, 12 + size)
    metadata = payload[16 + size:16 + size + msize]
    assert len(payload) == 16 + size + msize
    return status, index, key, metadata


def test_the_reference_clients_bytes_replayed_at_both_ends_give_the_same_key(lab: Lab) -> None:
    head, opened = lab.ask("sae-a", QUBIP_OPEN_CONNECT)  # exactly as recorded: null KSID, assign one
    assert head == (1, 0, 1, b4.OPEN_CONNECT_RESPONSE) and len(opened) == 4 + 28 + 256 + 16
    assert struct.unpack_from("!I", opened)[0] == ks.PEER_NOT_CONNECTED  # opened; sae-b has not yet
    assigned = uuid.UUID(bytes=opened[-16:])
    assert assigned.int != 0 and opened[32:288].rstrip(b"\0") == b"application/json"
    assert struct.unpack_from("!7I", opened, 4) == (512, 40000, 5000, 10, 0, 5000, 3600)

    # the recorded GET_KEY and CLOSE name KSID: both parties open it first, on one connection
    # each, as the QUBIP client keeps its connection for OPEN_CONNECT, GET_KEY and CLOSE
    keys = {}
    with lab.connect("sae-a") as a, lab.connect("sae-b", "sae-b") as b:
        for s, want in ((a, ks.PEER_NOT_CONNECTED), (b, ks.SUCCESSFUL)):
            s.sendall(with_ksid(QUBIP_OPEN_CONNECT, KSID))
            head, payload = answer(s)
            assert struct.unpack_from("!I", payload)[0] == want and payload[-16:] == uuid.UUID(KSID).bytes
        for name, s in (("a", a), ("b", b)):
            s.sendall(QUBIP_GET_KEY)
            head, payload = answer(s)
            assert head == (1, 0, 1, b4.GET_KEY_RESPONSE)
            status, index, keys[name], metadata = parse_chunk(payload)
            assert (status, index, len(keys[name])) == (0, 0, 512)
        assert keys["a"] == keys["b"]
        for s in (a, b):
            s.sendall(QUBIP_CLOSE)
            assert answer(s) == ((1, 0, 1, b4.CLOSE_RESPONSE), struct.pack("!I", 0))
        a.sendall(QUBIP_CLOSE)  # closed already: no such stream
        assert answer(a)[1] == struct.pack("!I", ks.NO_QKD_CONNECTION)
    lab.ask("sae-a", b4.encode((1, 0, 1), b4.CLOSE_REQUEST, assigned.bytes))


def test_the_etsi_c_reference_clients_bytes_replayed_one_connection_per_request(lab: Lab) -> None:
    head, opened = lab.ask("sae-a", ETSI_C_OPEN_CONNECT)  # exactly as recorded
    assert head == (2, 1, 1, b4.OPEN_CONNECT_RESPONSE) and struct.unpack_from("!I", opened)[0] == ks.PEER_NOT_CONNECTED
    assigned = opened[-16:]
    assert opened[4:-16] == struct.pack("!7I", 32, 0, 0, 0, 0, 2000, 60) + b"application/json\0"
    for sae, want in (("sae-a", ks.PEER_NOT_CONNECTED), ("sae-b", ks.SUCCESSFUL)):  # the recorded KSID, both ends
        assert struct.unpack_from("!I", lab.ask(sae, with_ksid(ETSI_C_OPEN_CONNECT, KSID_C))[1])[0] == want
    at_a, at_b = (parse_chunk(lab.ask(sae, ETSI_C_GET_KEY)[1]) for sae in ("sae-a", "sae-b"))
    assert at_a[:2] == (0, 0) and len(at_a[2]) == 32 and at_a == at_b
    for sae in ("sae-a", "sae-b"):
        assert lab.ask(sae, ETSI_C_CLOSE) == ((2, 1, 1, b4.CLOSE_RESPONSE), struct.pack("!I", 0))
    lab.ask("sae-a", b4.encode((2, 1, 1), b4.CLOSE_REQUEST, assigned))


def test_the_etsi_c_form_one_connection_per_request(lab: Lab) -> None:
    head, opened = lab.ask("sae-a", etsi_c_open_connect("qkd://sae-a", "qkd://sae-b"))
    assert head == (2, 1, 1, b4.OPEN_CONNECT_RESPONSE)
    status, *qos = struct.unpack_from("!I7I", opened)
    assert status == ks.PEER_NOT_CONNECTED and qos[0] == 32
    assert opened[32:-16] == b"application/json\0"
    ksid = str(uuid.UUID(bytes=opened[-16:]))
    _, joined = lab.ask("sae-b", etsi_c_open_connect("qkd://sae-a", "qkd://sae-b", ksid=ksid))
    assert struct.unpack_from("!I", joined)[0] == ks.SUCCESSFUL
    at_a = parse_chunk(lab.ask("sae-a", etsi_c_get_key(ksid, 0, bytes(64)))[1])
    at_b = parse_chunk(lab.ask("sae-b", etsi_c_get_key(ksid, 0, bytes(64)))[1])
    assert at_a[:2] == at_b[:2] == (0, 0) and len(at_a[2]) == 32 and at_a[2] == at_b[2]
    close = b4.encode((2, 1, 1), b4.CLOSE_REQUEST, uuid.UUID(ksid).bytes)
    assert lab.ask("sae-a", close) == ((2, 1, 1, b4.CLOSE_RESPONSE), struct.pack("!I", 0))
    assert lab.ask("sae-b", close)[1] == struct.pack("!I", 0)
    # an ETSI C client reads the full layout whatever the status
    gone = lab.ask("sae-a", etsi_c_get_key(ksid, 1, b""))[1]
    assert gone == struct.pack("!IIII", ks.NO_QKD_CONNECTION, 1, 0, 0)


def test_requests_that_cannot_be_served_get_status_4(lab: Lab) -> None:
    not_qkd = b4.encode((1, 0, 1), 2, b"client://localhost\0server://qkd_server\0" + QUBIP_OPEN_CONNECT[32:])
    assert lab.ask("sae-a", not_qkd)[1] == struct.pack("!I", ks.NO_QKD_CONNECTION)
    assert lab.ask("sae-x", QUBIP_OPEN_CONNECT)[1] == struct.pack("!I", ks.NO_QKD_CONNECTION)  # attached to no node
    null = b4.encode((1, 0, 1), b4.GET_KEY_REQUEST, bytes(16) + struct.pack("!II", 0, 64))
    assert lab.ask("sae-a", null)[1] == struct.pack("!I", ks.NO_QKD_CONNECTION)


def test_a_client_without_a_certificate_is_not_served(lab: Lab) -> None:
    with lab.connect(None) as s:
        try:
            s.sendall(QUBIP_CLOSE)
        except (ssl.SSLError, ConnectionError):
            return
        assert closed_without_answer(s)


def _raw_exchange(lab: Lab, data: bytes) -> tuple[bool, float]:
    """Sends data and then waits: (closed without an answer, seconds until closed)."""
    with lab.connect("sae-a") as s:
        s.sendall(data)
        start = time.monotonic()
        closed = closed_without_answer(s)
        return closed, time.monotonic() - start


@pytest.mark.parametrize("data, quick", [
    (QUBIP_CLOSE[:5], False),  # truncated header: closed when the request's time is up
    (bytes.fromhex("0200000800000010") + uuid.UUID(KSID).bytes, True),  # wrong version
    (bytes.fromhex("0100010aa0000010") + uuid.UUID(KSID).bytes, True),  # unknown service type
    (bytes.fromhex("01000102ffffffff"), True),  # declares 4 GiB: closed at once, nothing read or allocated
    (bytes.fromhex("0100010400000020") + QUBIP_GET_KEY[8:], False),  # declares more than it sends
    (bytes.fromhex("0100010400000014") + QUBIP_GET_KEY[8:], True),  # declares less than GET_KEY needs
])
def test_framing_errors_close_the_connection_without_an_answer(lab: Lab, data: bytes, quick: bool) -> None:
    closed, took = _raw_exchange(lab, data)
    assert closed
    assert (took < READ_TIMEOUT / 2) if quick else (READ_TIMEOUT * 0.8 <= took < READ_TIMEOUT + 3)


def test_an_answered_request_then_garbage_closes_after_the_answer(lab: Lab) -> None:
    with lab.connect("sae-a") as s:
        s.sendall(QUBIP_CLOSE + b"\x02\x00")  # answered (no such stream), then a header that never completes
        assert answer(s)[1] == struct.pack("!I", ks.NO_QKD_CONNECTION)
        assert closed_without_answer(s)


def test_abrupt_close_mid_payload_leaves_nothing_behind(lab: Lab) -> None:
    server = lab.servers["alice"]
    threads = threading.active_count()
    for _ in range(5):
        s = lab.connect("sae-a")
        s.sendall(QUBIP_OPEN_CONNECT[:100])  # header + part of the payload
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST, no close_notify
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.connections == 0
    assert threading.active_count() <= threads
    # and the server still serves
    assert lab.ask("sae-a", QUBIP_CLOSE)[1] == struct.pack("!I", ks.NO_QKD_CONNECTION)


def test_no_key_bytes_in_logs(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, opened = lab.ask("sae-a", etsi_c_open_connect("sae-a", "sae-b"))
    ksid = str(uuid.UUID(bytes=opened[-16:]))
    lab.ask("sae-b", etsi_c_open_connect("sae-a", "sae-b", ksid=ksid))
    keys = [parse_chunk(lab.ask(sae, etsi_c_get_key(ksid, i, b""))[1])[2] for sae in ("sae-a", "sae-b") for i in range(2)]
    assert keys[:2] == keys[2:] and all(keys)
    assert ksid in caplog.text
    for key in keys:
        for form in (key.hex(), key.hex().upper(), repr(key)[2:-1], base64.b64encode(key).decode()):
            assert form not in caplog.text


# --- a real agent process serving it from its config ----------------------------------

def test_an_agent_process_serves_it_from_its_kms_config(tmp_path: Path) -> None:
    qkdn_id = str(uuid.uuid4())
    cas = pki.make_lab_cas(tmp_path / "pki", "lab")
    ca = cas.root
    cert, key = pki.issue(cas.kme, qkdn_id, tmp_path / "pki", server_names=("127.0.0.1",), client=True, kme=True)
    certs = {sae: pki.issue(cas.sae, sae, tmp_path / "sae", client=True) for sae in ("sae-a", "sae-b")}
    port = free_port()
    kms = {"port": free_port(), "relay_port": free_port(), "sae_ca": str(cas.sae[0]), "kme_ca": str(cas.kme[0]),
           "cert": str(cert), "key": str(key),
           "saes": {"sae-a": qkdn_id, "sae-b": qkdn_id}, "etsi004_binary": {"port": port, "read_timeout": 5}}
    proc = agent_config(tmp_path, "rectorado", qkdn_id, extra={"kms": kms}).start()
    try:
        lab = Lab({"sae-a": port, "sae-b": port}, ca[0], certs, {})
        deadline = time.monotonic() + 10
        while True:  # NETCONF listens first; the KMS servers right after
            try:
                _, opened = lab.ask("sae-a", QUBIP_OPEN_CONNECT)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert struct.unpack_from("!I", opened)[0] == ks.PEER_NOT_CONNECTED
        ksid = str(uuid.UUID(bytes=opened[-16:]))
        assert struct.unpack_from("!I", lab.ask("sae-b", with_ksid(QUBIP_OPEN_CONNECT, ksid))[1])[0] == ks.SUCCESSFUL
        get = b4.encode((1, 0, 1), b4.GET_KEY_REQUEST, uuid.UUID(ksid).bytes + struct.pack("!II", 0, 1024))
        at_a, at_b = (parse_chunk(lab.ask(sae, get)[1]) for sae in ("sae-a", "sae-b"))
        assert at_a[:2] == (0, 0) and len(at_a[2]) == 512 and at_a == at_b
    finally:
        proc.stop()
    assert "ETSI 004 binary listening" in proc.log()


@pytest.mark.parametrize("section, problem", [
    ({"port": 70000}, "etsi004_binary.port"),
    ({"port": 1, "read_timeout": 0}, "read_timeout"),
    ({"port": 1, "max_connections": 0}, "max_connections"),
    ({"port": 1, "tls": False}, "tls"),  # no plain-TCP switch: mutual TLS only
])
def test_the_config_section_is_checked(tmp_path: Path, section: dict, problem: str) -> None:
    kms = {"port": 1, "relay_port": 2, "ca": "ca", "cert": "c", "key": "k", "etsi004_binary": section}
    cfg = json.loads(agent_config(tmp_path, extra={"kms": kms}).config_path.read_text())
    with pytest.raises(ConfigError, match=problem):
        agent_cfg.parse(cfg)
