"""What the key-delivery front ends (ETSI GS QKD 014 REST, ETSI GS QKD 004 REST) ask of
the LKMS. The front ends only translate HTTP <-> these calls; everything about keys
lives behind this interface (agents/kms/lkms.py implements it)."""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


class KmsError(Exception):
    """A request the LKMS refuses. http_status is what ETSI 014 answers:
    400 (bad request: unknown key ID, size out of range...), 401 (this SAE may
    not do that), 503 (no key available now, no path yet: try again)."""

    def __init__(self, http_status: int, message: str, details: list[dict[str, Any]] | None = None,
                 status004: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.details = details or []
        # ETSI GS QKD 004 status code (section 6.2 table): 1 peer not connected, 2 insufficient
        # key, 3 peer application not yet connected, 4 no QKD connection, 5 KSID in use,
        # 6 timeout, 7 QoS not met, 8 metadata size insufficient.
        self.status004 = status004


@dataclass(frozen=True)
class Key:
    key_id: str  # UUID string
    key: bytes


@dataclass(frozen=True)
class Status:
    """ETSI GS QKD 014 Status (section 6.1), field for field."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int


@dataclass(frozen=True)
class Qos:
    """ETSI GS QKD 004 QoS (section 6.1.1)."""

    key_chunk_size: int = 32  # bytes
    max_bps: int = 0
    min_bps: int = 0
    jitter: int = 0
    priority: int = 0
    timeout: int = 0  # ms; 0 = no waiting
    ttl: int = 0  # s
    metadata_mimetype: str = "application/json"


@dataclass(frozen=True)
class Stream:
    """An open ETSI 004 key stream."""

    key_stream_id: str
    source: str
    destination: str
    qos: Qos
    peer_connected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class KeyService(Protocol):
    # ETSI GS QKD 014
    def status(self, master_sae: str, slave_sae: str) -> Status: ...

    def enc_keys(self, master_sae: str, slave_sae: str, number: int, size: int | None,
                 additional_slaves: list[str]) -> list[Key]: ...

    def dec_keys(self, slave_sae: str, master_sae: str, key_ids: list[str]) -> list[Key]: ...

    def batch(self) -> AbstractContextManager[None]:
        """Calls made inside are committed together (group commit) when it ends."""
        ...

    def serves_locally(self, slaves: list[str]) -> bool:
        """Whether enc_keys for these slaves needs nothing but this node (no network wait)."""
        ...

    # ETSI GS QKD 004 (agents/kms/keystream.py turns these into 004 statuses). caller_sae is
    # the SAE authenticated by its client certificate; None on a transport the operator
    # declared trusted (plain TCP on loopback): then the party attached to this node.
    def open_connect(self, caller_sae: str | None, source: str, destination: str, qos: Qos,
                     key_stream_id: str | None) -> Stream: ...

    def get_key(self, caller_sae: str | None, key_stream_id: str, index: int | None,
                metadata_size: int | None = None) -> tuple[int, bytes, bytes]:
        """(index, key, metadata); KmsError status004=8 with details [{"metadata_size": n}]
        when metadata_size (the caller's buffer) is smaller than the metadata."""
        ...

    def close(self, caller_sae: str | None, key_stream_id: str) -> None: ...
