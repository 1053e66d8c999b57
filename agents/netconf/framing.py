"""NETCONF message framing over SSH (RFC 6242 §4): end-of-message (base:1.0, and every
hello) and chunked (base:1.1), both bounded.

Input from the network is untrusted: a message larger than the configured maximum is
refused as soon as the buffer passes it (not when it ends), and buffering is linear —
each byte is scanned once for the delimiter, whatever size the reads arrive in.
"""
from __future__ import annotations

import re

EOM = b"]]>]]>"
_CHUNK_HEADER = re.compile(rb"\n#([1-9][0-9]{0,9})\n")
_HEADER_START = re.compile(rb"\n#[1-9][0-9]{0,9}")
_END_OF_CHUNKS = b"\n##\n"
_MAX_CHUNK = 4294967295  # RFC 6242 §4.2: chunk-size is 1..4294967295


class FramingError(Exception):
    """The peer broke RFC 6242 framing: the session cannot find the next message."""


class TooBig(FramingError):
    """A message is larger than this server accepts."""


def frame(message: bytes, chunked: bool) -> bytes:
    """One message as it goes on the wire (one chunk: the size is known here)."""
    if chunked:
        return b"\n#%d\n" % len(message) + message + _END_OF_CHUNKS
    return message + EOM


class Deframer:
    """Cuts a byte stream into messages. `chunked` is switched on after the hellos when
    both ends speak base:1.1; bytes already buffered are then read with the new framing."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.chunked = False
        self._buf = bytearray()
        self._scanned = 0  # EOM framing: bytes of _buf already searched for the delimiter
        self._parts: list[bytes] = []  # chunked framing: chunks of the message being read
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Buffer bytes; the limits are checked by next_message, which the reader calls
        until it returns None after every feed."""
        self._buf += data

    def next_message(self) -> bytes | None:
        """The next complete message, or None until more bytes arrive."""
        return self._next_chunked() if self.chunked else self._next_eom()

    def _next_eom(self) -> bytes | None:
        end = self._buf.find(EOM, max(0, self._scanned - len(EOM) + 1))
        if end < 0:
            self._scanned = len(self._buf)
            if self._scanned > self.max_message + len(EOM):
                raise TooBig(f"message larger than {self.max_message} bytes")
            return None
        if end > self.max_message:
            raise TooBig(f"message larger than {self.max_message} bytes")
        message = bytes(self._buf[:end])
        del self._buf[: end + len(EOM)]
        self._scanned = 0
        return message

    def _next_chunked(self) -> bytes | None:
        while True:
            if len(self._buf) < 4:
                return None
            if self._buf.startswith(_END_OF_CHUNKS):
                del self._buf[: len(_END_OF_CHUNKS)]
                if not self._parts:
                    raise FramingError("end-of-chunks marker before any chunk")
                message = b"".join(self._parts)
                self._parts, self._size = [], 0
                return message
            header = _CHUNK_HEADER.match(self._buf)
            if header is None:
                if _HEADER_START.fullmatch(self._buf):
                    return None  # the rest of the header is on its way
                raise FramingError("invalid chunk header")
            size = int(header.group(1))
            if size > _MAX_CHUNK:
                raise FramingError("chunk-size out of range")
            if self._size + size > self.max_message:
                raise TooBig(f"message larger than {self.max_message} bytes")
            start = header.end()
            if len(self._buf) < start + size:
                return None
            self._parts.append(bytes(self._buf[start : start + size]))
            self._size += size
            del self._buf[: start + size]

