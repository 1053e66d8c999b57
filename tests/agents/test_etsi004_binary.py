"""ETSI GS QKD 004 binary protocol (agents/kms/etsi004_binary.py): the codec against the
reference clients' exact bytes, and the server over real mutual TLS against the real LKMS."""
from __future__ import annotations

import struct
import uuid

import pytest

from sdqkd.agents.kms import etsi004_binary as b4
from sdqkd.agents.kms import keystream as ks
from sdqkd.agents.kms.interface import Qos

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


def etsi_c_open_connect(source: str, destination: str, mime: str = "application/json", ksid: str | None = None) -> bytes:
    """As the ETSI forge C reference serializes it (diogoftm/minimal-etsi-qkd-004,
    etsi-gs-qkd-004-c/src/qkd/serializers.c and sizes.c at 5e536c001e0aa7b4d47ecc778c13e1e6e2253fe5):
    NUL-terminated strings, mimetype included; its QKD_004_VERSION is 2.1.1 (interfaces.c)."""
    payload = (source.encode() + b"\0" + destination.encode() + b"\0" + struct.pack("!7I", 32, 32, 32, 0, 0, 0, 0)
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
