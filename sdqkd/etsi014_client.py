"""The ETSI GS QKD 014 client a QKD driver uses to take keys from its own device.

The agent is an SAE of its device: it calls the device's KME over mutual TLS (client
certificate from the vendor's CA) and sees every failure as a DeviceError whose kind
tells the driver what it means for the link (device down, busy, refusing, confused).
"""
from __future__ import annotations

import base64
import binascii
import ssl
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sdqkd import pki

API = "/api/v1/keys"
_DOWN = ("unreachable", "tls")


@dataclass(frozen=True)
class DeviceApi:
    """Where and as whom the agent reaches its device's ETSI GS QKD 014 API."""

    url: str             # https://host:port of the device's KME
    sae_id: str          # this agent's SAE ID at the device (its client certificate's CN)
    peer_sae_id: str     # the peer agent's SAE ID at the peer device
    ca: str              # the device vendor's CA (PEM)
    cert: str            # this SAE's client certificate (PEM)
    key: str             # and its private key (PEM)
    timeout: float = 5.0


class DeviceError(Exception):
    """A failed device call. kind: 'unreachable', 'tls' (the device is down for us:
    interface FAILED), 'busy' (HTTP 503), 'refused' (other HTTP errors), 'protocol'."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def down(self) -> bool:
        """True when the device cannot be used at all (the interface goes FAILED)."""
        return self.kind in _DOWN

    def reason(self) -> str:
        """The failure as a link status reason an operator can act on."""
        label = {"unreachable": "device unreachable", "tls": "device TLS failure", "busy": "device busy (503)",
                 "refused": "device refused", "protocol": "device answered nonsense"}[self.kind]
        return f"{label}: {self.message}"


class DeviceClient:
    """The three ETSI 014 calls the driver makes, with every failure as a DeviceError."""

    def __init__(self, api: DeviceApi) -> None:
        try:
            ctx = pki.client_ssl_context(api.cert, api.key, api.ca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise DeviceError("tls", f"credentials unusable: {exc}") from None
        self._http = httpx.Client(base_url=api.url, verify=ctx, timeout=api.timeout)

    def status(self, slave_sae: str) -> dict[str, Any]:
        """The device's key store for `slave_sae` (stored_key_count, key sizes...)."""
        return self._call("GET", f"{API}/{_q(slave_sae)}/status")

    def enc_keys(self, slave_sae: str, number: int, size: int) -> list[tuple[str, bytes]]:
        """As master: take `number` new `size`-bit keys shared with `slave_sae`."""
        body = self._call("POST", f"{API}/{_q(slave_sae)}/enc_keys", {"number": number, "size": size})
        return _keys(body)

    def dec_keys(self, master_sae: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        """As slave: take the keys the master took, by their IDs."""
        body = self._call("POST", f"{API}/{_q(master_sae)}/dec_keys", {"key_IDs": [{"key_ID": k} for k in key_ids]})
        return _keys(body)

    def get_json(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """GET another JSON API of the same KME (the node's one-call key API, agents/qaas)
        with the same credentials and the same DeviceError kinds."""
        return self._call("GET", path, params=params)

    def close(self) -> None:
        """Close the connection pool; a call in progress fails at once."""
        self._http.close()

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
              params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One request; every failure mapped to a DeviceError kind the driver acts on."""
        try:
            r = self._http.request(method, path, json=body, params=params)
        except httpx.TimeoutException as exc:
            raise DeviceError("unreachable", f"timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, ssl.SSLError, OSError) as exc:
            kind = "tls" if _tls_failure(exc) else "unreachable"
            raise DeviceError(kind, _short(str(exc) or type(exc).__name__)) from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code != 200:
            msg = data.get("message") if isinstance(data, dict) else None
            text = f"HTTP {r.status_code}" + (f" {_short(str(msg))}" if msg else "")
            raise DeviceError("busy" if r.status_code == 503 else "refused", text)
        if not isinstance(data, dict):
            raise DeviceError("protocol", "the response is not a JSON object")
        return data


def _q(sae: str) -> str:
    """An SAE ID as one path segment (IDs may hold '/')."""
    return urllib.parse.quote(sae, safe="")


def _short(text: str) -> str:
    """Bound what a device's error text adds to a status reason."""
    return text if len(text) <= 200 else text[:197] + "..."


def _tls_failure(exc: BaseException) -> bool:
    """True when a transport error is TLS (bad certificate...), which httpx wraps in other errors."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen) or "certificate" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _keys(body: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """A key container's (key_ID, key) pairs; never quotes a key in an error."""
    items = body.get("keys")
    if not isinstance(items, list):
        raise DeviceError("protocol", "no keys array in the key container")
    out = []
    for item in items:
        try:
            out.append((str(uuid.UUID(str(item["key_ID"]))), base64.b64decode(item["key"], validate=True)))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise DeviceError("protocol", "malformed key in the key container") from None
    return out
