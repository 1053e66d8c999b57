"""Where applications (SAEs) take their QKD keys: a key source gives the master a new
key (`new_key()` -> (key_ID, key)) and the slave the key the master names
(`key(key_id)`), over ETSI GS QKD 014 at the SAE's own KME (`Etsi014Keys`) or over the
node's one-call key API (`NodeApiKeys`, agents/qaas/keys.py). Both use the one ETSI 014
client of the project (sdqkd/etsi014_client.DeviceClient: mutual TLS, the SAE
certificate, failures as DeviceError kinds). QKD-keyed TLS (sdqkd/qkdtls.py) and
`sdqkd key get` (lab/keys.py) take their keys here."""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sdqkd.etsi014_client import DeviceApi, DeviceClient, DeviceError

KEY_BITS = 256


class KeySourceError(Exception):
    """A key source cannot be made or used; the message says why (never a key)."""


class KeyUnavailable(KeySourceError):
    """The key source has no key for this request."""


class MasterKeys(Protocol):
    """Where the client (master SAE) takes a new key for each session."""

    def new_key(self) -> tuple[str, bytes]:
        """(key_ID, key) of a key not used before; raises KeyUnavailable."""


class SlaveKeys(Protocol):
    """Where the server (slave SAE) takes the key a client names."""

    def key(self, key_id: str) -> bytes:
        """The key with this ID, delivered at most once; raises KeyUnavailable."""


class Etsi014Keys:
    """Both roles over ETSI GS QKD 014 at this SAE's own KME.

    peer_saes: as master, the first is the slave the keys are for; as slave, the masters
    whose keys are accepted, tried in order (dec_keys names the master)."""

    def __init__(self, client: DeviceClient, peer_saes: Sequence[str], *, size: int = KEY_BITS, wait: float = 60.0) -> None:
        if not peer_saes:
            raise ValueError("at least one peer SAE ID is needed")
        self.client = client
        self.peer_saes = list(peer_saes)
        self.size = size
        self.wait = wait
        self.attempts = 0  # enc_keys calls the last new_key() made

    def new_key(self) -> tuple[str, bytes]:
        """enc_keys for the peer; 503 (no key path yet: the controller is asked) is retried for `wait` s."""
        start, self.attempts = time.monotonic(), 0
        while True:
            self.attempts += 1
            try:
                return self.client.enc_keys(self.peer_saes[0], 1, self.size)[0]
            except DeviceError as exc:
                if exc.kind != "busy" or time.monotonic() - start > self.wait:
                    raise KeyUnavailable(f"enc_keys for {self.peer_saes[0]}: {_why(exc)}") from None
            time.sleep(min(2.0, 0.25 * self.attempts))

    def key(self, key_id: str) -> bytes:
        """dec_keys by key_ID, trying each accepted master; only a UUID is sent to the KME."""
        key_id = _key_id(key_id)
        return _from_first(self.peer_saes, lambda master: self.client.dec_keys(master, [key_id])[0][1],
                           f"dec_keys {key_id}")

    def close(self) -> None:
        self.client.close()


class NodeApiKeys:
    """Both roles over the node's one-call key API (agents/qaas/keys.py) instead of ETSI 014:
    as master GET /api/v1/keys?to=<peer>, which waits on the node for a key path; as slave
    GET /api/v1/keys?from=<peer>&key_ID=<id>, trying each accepted peer in order. Peers
    are node names, qkdn_ids or SAE IDs. The keys are 256-bit, the API's size."""

    PATH = "/api/v1/keys"

    def __init__(self, client: DeviceClient, peers: Sequence[str]) -> None:
        if not peers:
            raise ValueError("at least one peer is needed")
        self.client = client
        self.peers = list(peers)

    def new_key(self) -> tuple[str, bytes]:
        try:
            return _one_key(self.client.get_json(self.PATH, {"to": self.peers[0]}))
        except DeviceError as exc:
            raise KeyUnavailable(f"one-call key for {self.peers[0]}: {_why(exc)}") from None

    def key(self, key_id: str) -> bytes:
        key_id = _key_id(key_id)
        return _from_first(self.peers, lambda peer: _one_key(self.client.get_json(self.PATH, {"from": peer, "key_ID": key_id}))[1],
                           f"one-call key {key_id}")

    def close(self) -> None:
        self.client.close()


def _from_first(peers: Sequence[str], fetch: Callable[[str], bytes], what: str) -> bytes:
    """The key from the first peer whose KME has it: a refusal (not this peer's key) moves
    on to the next peer, any other failure ends the search."""
    problems = []
    for peer in peers:
        try:
            return fetch(peer)
        except DeviceError as exc:
            if exc.kind != "refused":
                raise KeyUnavailable(f"{what}: {_why(exc)}") from None
            problems.append(f"from {peer}: {exc.message}")
    raise KeyUnavailable(f"{what}: " + "; ".join(problems))


def _one_key(body: dict[str, Any]) -> tuple[str, bytes]:
    """(key_ID, key) of a one-call key response; never quotes the key in an error."""
    try:
        return str(uuid.UUID(str(body["key_ID"]))), base64.b64decode(body["key"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise KeyUnavailable("the node answered a malformed key") from None


def _key_id(key_id: str) -> str:
    """The PSK identity if it is an ETSI 014 key_ID (a UUID, sent as it came: a KME may
    tell case apart); else KeyUnavailable, so nothing else ever reaches the KME."""
    try:
        if len(key_id) != 36:
            raise ValueError
        uuid.UUID(key_id)
    except ValueError:
        raise KeyUnavailable("the PSK identity is not an ETSI 014 key_ID (a UUID)") from None
    return key_id


def etsi014_keys(url: str, cert: str, key: str, ca: str, peer_saes: Sequence[str], *, size: int = KEY_BITS,
                 wait: float = 60.0, timeout: float = 10.0) -> Etsi014Keys:
    """A key source from a KME URL (https://host:port, with or without /api/v1/keys) and SAE credentials."""
    if not peer_saes:
        raise KeySourceError("no peer SAE ID given")
    base = url.rstrip("/").removesuffix("/api/v1/keys")
    try:
        client = DeviceClient(DeviceApi(base, "", peer_saes[0], ca, cert, key, timeout))
    except DeviceError as exc:
        raise KeySourceError(f"SAE credentials: {exc.message}") from None
    return Etsi014Keys(client, peer_saes, size=size, wait=wait)


def _why(exc: DeviceError) -> str:
    """A failed call to the KME in an application's words (DeviceError.reason() speaks
    of a QKD device, which the KME is to the agent's drivers, not here)."""
    label = {"unreachable": "KME unreachable", "tls": "TLS with the KME failed",
             "protocol": "the KME answered nonsense"}.get(exc.kind)
    return f"{label}: {exc.message}" if label else exc.message  # busy, refused: "HTTP <status> <message>"
