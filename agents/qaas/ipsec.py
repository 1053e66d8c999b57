"""QKD-keyed IPsec: an IKEv2/ESP tunnel between this node's lab host and another node's,
both ends strongSwan, keyed from the LKMS.

`POST /api/v1/ipsec {"to": node, "reauth_interval": s}` on node A: A takes two keys for
(A's host SAE -> B's host SAE), the first the IKE pre-shared key, the second the RFC 8784
post-quantum preshared key (PPK, required). It asks B's agent (mutual TLS, A's KME
certificate) to set up its end, B takes the same keys by ID (ETSI 014 dec_keys), both
charons load them and A initiates. Every `reauth_interval` seconds A takes a fresh PPK,
both ends load it and A re-authenticates: a new IKE SA and CHILD_SA (new SPIs) replace
the old ones. `DELETE` ends both sides. No key byte leaves the LKMS except into charon.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.agents.kms import web

from sdqkd.agents.config import IpsecConf, IpsecPeerConf
from sdqkd.agents.kms import https
from sdqkd import pki
from sdqkd.agents.kms.interface import Key, KmsError

from . import openapi
from .context import Context
from .strongswan import Charon, Endpoint, SaState, StrongswanError

log = logging.getLogger(__name__)

PATH = "/api/v1/ipsec"
KEY_BITS = 256
KEY_WAIT = 15.0  # s an initiator retries while the controller configures a new key path
MIN_INTERVAL, MAX_INTERVAL, DEFAULT_INTERVAL = 2, 86400, 300


@dataclass
class Tunnel:
    id: str
    peer: str  # node name of the other end
    role: str  # "initiator" | "responder"
    reauth_interval: int | None
    ppk_key_id: str
    created: float = field(default_factory=time.time)
    reauths: int = 0
    last_error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def as_json(self, charon: Charon | None) -> dict[str, Any]:
        try:
            sa: SaState | None = charon.state(self.id) if charon is not None else None
        except StrongswanError as exc:
            sa, err = None, str(exc)
        else:
            err = self.last_error
        return {"id": self.id, "peer": self.peer, "role": self.role, "state": "ESTABLISHED" if sa else "DOWN",
                "ppk_key_id": self.ppk_key_id, "reauth_interval": self.reauth_interval, "reauths": self.reauths,
                "created": int(self.created), "established": int(time.time()) - sa.established if sa else None,
                "sa": sa.as_json() if sa else None, "last_error": err}


class Tunnels:
    """The tunnel ends of this node's host, by tunnel ID."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg: IpsecConf | None = ctx.cfg.ipsec
        self.dir = Path(ctx.cfg.state_dir) / "ipsec"
        self.by_id: dict[str, Tunnel] = {}
        self.pairs: dict[str, str] = {}  # peer node -> the tunnel joining our hosts
        self.lock = threading.Lock()
        self.charon: Charon | None = None  # the host's daemon, while it ends a tunnel
        self.daemon_lock = threading.Lock()
        k = ctx.cfg.kms
        # agent-to-agent calls to the peers' responder ends: one client (one TLS session per
        # peer, kept), and only on a node that ends tunnels
        self.peers_http: Any = None
        if k is not None and self.cfg is not None:
            import httpx  # loaded by nodes that end tunnels only

            self.peers_http = httpx.Client(verify=pki.client_ssl_context(k.cert, k.key, k.kme_ca or ""), timeout=20.0)

    # --- checks ---------------------------------------------------------------------------

    def _host(self) -> IpsecConf:
        if self.cfg is None:
            raise https.ApiError(404, f"node {self.ctx.cfg.node.name} has no lab host: it ends no IPsec tunnel")
        return self.cfg

    def _peer(self, node: str) -> IpsecPeerConf:
        cfg = self._host()
        if node == self.ctx.cfg.node.name:
            raise https.ApiError(400, "a tunnel needs two different nodes")
        if node in cfg.peers:
            return cfg.peers[node]
        if node in {p.node for p in self.ctx.cfg.peers.values()}:
            raise https.ApiError(400, f"node {node} has no lab host")
        raise https.ApiError(404, f"unknown node '{node}'")

    def _node_of_kme(self, kme_id: str) -> str | None:
        p = self.ctx.cfg.peers.get(kme_id.lower())
        return p.node if p is not None else None

    def _claim(self, node: str, tid: str) -> None:
        """One tunnel per pair of hosts (a second would have the same IKE identities and traffic
        selectors), claimed before any key is taken so that two requests cannot both pass."""
        with self.lock:
            other = self.pairs.setdefault(node, tid)
        if other != tid:
            raise https.ApiError(409, f"tunnel {other} already joins this host and {node}'s")

    def _unclaim(self, node: str, tid: str) -> None:
        with self.lock:
            if self.pairs.get(node) == tid:
                del self.pairs[node]

    def state(self, t: Tunnel) -> dict[str, Any]:
        return t.as_json(self.charon)

    def get(self, tid: str) -> Tunnel:
        with self.lock:
            t = self.by_id.get(tid)
        if t is None:
            raise https.ApiError(404, f"no IPsec tunnel '{tid}'")
        return t

    # --- initiator --------------------------------------------------------------------------

    def create(self, to: str, interval: int) -> Tunnel:
        host, peer = self._host(), self._peer(to)
        tid = str(uuid.uuid4())
        self._claim(to, tid)
        try:
            psk, ppk = self._take_keys(host.sae_id, peer.sae_id, 2)
            t = Tunnel(tid, to, "initiator", interval, ppk.key_id)
            charon = self._start_end(t, Endpoint(peer.address, peer.inner), psk, ppk)
            try:
                self._ask(peer, "PUT", f"{PATH}/{tid}/peer", {"from": self.ctx.cfg.node.name,
                                                                 "key_ids": [psk.key_id, ppk.key_id]})
                charon.initiate(tid)
            except BaseException as exc:
                self._end_peer(t)
                self._end_here(t)
                if isinstance(exc, StrongswanError):
                    raise https.ApiError(503, f"the tunnel to {to} did not come up: {exc}") from None
                raise
        except BaseException:
            self._unclaim(to, tid)
            raise
        with self.lock:
            self.by_id[tid] = t
        t.thread = threading.Thread(target=self._reauth_loop, args=(t, host, peer), name=f"ipsec-{tid[:8]}",
                                    daemon=True)
        t.thread.start()
        return t

    def _take_keys(self, master: str, slave: str, number: int) -> list[Key]:
        deadline = time.monotonic() + KEY_WAIT
        while True:
            try:
                return self.ctx.lkms.enc_keys(master, slave, number, KEY_BITS, [])
            except KmsError as exc:  # 503: the controller is still setting up the path
                if exc.http_status != 503 or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def _start_end(self, t: Tunnel, remote: Endpoint, psk: Key, ppk: Key) -> Charon:
        """Load the tunnel into the host's daemon, starting it for the first tunnel."""
        host = self._host()
        with self.daemon_lock:
            try:
                if self.charon is None:
                    charon = Charon(host.netns, self.dir / "charon")
                    charon.start()
                    self.charon = charon
                self.charon.load(t.id, Endpoint(host.address, host.inner), remote, psk.key, _ppk_id(t.id), ppk.key)
                return self.charon
            except StrongswanError as exc:
                if self.charon is not None:
                    try:
                        self.charon.unload(t.id)  # what was loaded of it
                    except StrongswanError:
                        pass
                self._stop_if_idle()
                raise https.ApiError(503, f"IPsec end on {self.ctx.cfg.node.name}: {exc}") from None

    def _end_here(self, t: Tunnel) -> None:
        """Close and forget the tunnel's SAs; the daemon ends with the host's last tunnel."""
        with self.daemon_lock:
            if self.charon is not None:
                try:
                    self.charon.unload(t.id)
                except StrongswanError as exc:
                    log.warning("IPsec tunnel %s: %s", t.id, exc)
                self._stop_if_idle()

    def _stop_if_idle(self) -> None:
        if self.charon is not None and not self.charon.conns:
            self.charon.remove()
            self.charon = None

    def _daemon(self) -> Charon:
        charon = self.charon
        if charon is None:
            raise StrongswanError("the host's IPsec daemon is not running")
        return charon

    def _reauth_loop(self, t: Tunnel, host: IpsecConf, peer: IpsecPeerConf) -> None:
        assert t.reauth_interval is not None
        while not t.stop.wait(t.reauth_interval):
            try:
                (ppk,) = self._take_keys(host.sae_id, peer.sae_id, 1)
                self._ask(peer, "POST", f"{PATH}/{t.id}/peer/ppk", {"key_id": ppk.key_id})
                self._daemon().set_ppk(t.id, _ppk_id(t.id), ppk.key)
                self._daemon().reauthenticate(t.id)
                t.ppk_key_id, t.last_error = ppk.key_id, None
                t.reauths += 1
            except (KmsError, https.ApiError, StrongswanError) as exc:
                t.last_error = f"re-authentication failed: {getattr(exc, 'message', None) or exc}"
                log.warning("IPsec tunnel %s: %s", t.id, t.last_error)

    def delete(self, tid: str) -> None:
        t = self.get(tid)
        if t.role != "initiator":
            raise https.ApiError(409, f"tunnel {tid} was set up by {t.peer}: delete it there")
        self._drop(t)

    def _drop(self, t: Tunnel) -> None:
        with self.lock:
            self.by_id.pop(t.id, None)
        t.stop.set()
        if t.thread is not None and t.thread is not threading.current_thread():
            t.thread.join(15)
        if t.role == "initiator":
            self._end_peer(t)
        self._end_here(t)
        self._unclaim(t.peer, t.id)

    def _end_peer(self, t: Tunnel) -> None:
        cfg = self.cfg.peers.get(t.peer) if self.cfg else None
        if cfg is None:
            return
        try:
            self._ask(cfg, "DELETE", f"{PATH}/{t.id}/peer", None)
        except https.ApiError as exc:
            if exc.status != 404:
                log.warning("IPsec tunnel %s: peer %s did not remove its end: %s", t.id, t.peer, exc.message)

    def close(self) -> None:
        """Every tunnel end of this node goes (the agent is stopping)."""
        with self.lock:
            tunnels = list(self.by_id.values())
        for t in tunnels:
            self._drop(t)
        if self.peers_http is not None:
            self.peers_http.close()

    def _ask(self, peer: IpsecPeerConf, method: str, path: str, body: dict[str, Any] | None) -> None:
        url = f"https://{peer.api[0]}:{peer.api[1]}{path}"
        if self.peers_http is None:  # _peer() found no host of ours: never reached
            raise https.ApiError(404, f"node {self.ctx.cfg.node.name} has no lab host: it ends no IPsec tunnel")
        import httpx

        try:
            r = self.peers_http.request(method, url, json=body)
        except httpx.HTTPError as exc:
            raise https.ApiError(502, f"peer agent unreachable: {type(exc).__name__}") from None
        if r.status_code >= 300:
            try:
                msg = r.json().get("message", r.reason_phrase)
            except ValueError:
                msg = r.reason_phrase
            raise https.ApiError(404 if r.status_code == 404 and method == "DELETE" else 502,
                                 f"peer agent: {msg}")

    # --- responder ------------------------------------------------------------------------------

    def accept(self, caller_kme: str, tid: str, body: dict[str, Any]) -> Tunnel:
        host = self._host()
        node = self._caller(caller_kme, body.get("from"))
        peer = self._peer(node)
        ids = body.get("key_ids")
        if not (isinstance(ids, list) and len(ids) == 2 and all(isinstance(i, str) for i in ids)):
            raise https.ApiError(400, "key_ids: the IDs of the PSK and the PPK")
        with self.lock:
            if tid in self.by_id:
                raise https.ApiError(409, f"tunnel {tid} exists")
        self._claim(node, tid)
        try:
            psk, ppk = self.ctx.lkms.dec_keys(host.sae_id, peer.sae_id, ids)
            t = Tunnel(tid, node, "responder", None, ppk.key_id)
            self._start_end(t, Endpoint(peer.address, peer.inner), psk, ppk)
        except BaseException:
            self._unclaim(node, tid)
            raise
        with self.lock:
            self.by_id[tid] = t
        return t

    def new_ppk(self, caller_kme: str, tid: str, body: dict[str, Any]) -> None:
        t = self._own_responder(caller_kme, tid)
        key_id = body.get("key_id")
        if not isinstance(key_id, str):
            raise https.ApiError(400, "key_id: the ID of the new PPK")
        host = self._host()
        (ppk,) = self.ctx.lkms.dec_keys(host.sae_id, self._peer(t.peer).sae_id, [key_id])
        try:
            self._daemon().set_ppk(tid, _ppk_id(tid), ppk.key)
        except StrongswanError as exc:
            raise https.ApiError(503, str(exc)) from None
        t.ppk_key_id = ppk.key_id
        t.reauths += 1

    def release(self, caller_kme: str, tid: str) -> None:
        self._drop(self._own_responder(caller_kme, tid))

    def _own_responder(self, caller_kme: str, tid: str) -> Tunnel:
        t = self.get(tid)
        if t.role != "responder" or self._node_of_kme(caller_kme) != t.peer:
            raise https.ApiError(403, f"tunnel {tid} is not one {caller_kme} set up here")
        return t

    def _caller(self, caller_kme: str, claimed: Any) -> str:
        node = self._node_of_kme(caller_kme)
        if node is None:
            raise https.ApiError(403, "only a node's KME may set up a tunnel end")
        if claimed != node:
            raise https.ApiError(400, f"from: the caller is node {node}")
        return node


def _ppk_id(tid: str) -> str:
    return f"sdqkd-{tid}"


def _tid(request: web.Request) -> str:
    tid = request.match_info["id"]
    try:
        return str(uuid.UUID(tid))
    except ValueError:
        raise https.ApiError(404, f"no IPsec tunnel '{tid}'") from None


def _interval(body: dict[str, Any]) -> int:
    n = body.get("reauth_interval", DEFAULT_INTERVAL)
    if isinstance(n, bool) or not isinstance(n, int) or not MIN_INTERVAL <= n <= MAX_INTERVAL:
        raise https.ApiError(400, f"reauth_interval: whole seconds from {MIN_INTERVAL} to {MAX_INTERVAL}")
    return n


def add_routes(app: web.Application, ctx: Context) -> None:
    tunnels = Tunnels(ctx)

    async def create(request: web.Request) -> web.Response:
        body = await https.json_object(request)
        to = body.get("to")
        if not isinstance(to, str) or not to:
            raise https.ApiError(400, "to: the node at the other end")
        t = await https.call(request, tunnels.create, to, _interval(body))
        return web.json_response(await https.call(request, tunnels.state, t), status=201)

    async def listing(request: web.Request) -> web.Response:
        with tunnels.lock:
            ts = list(tunnels.by_id.values())
        return web.json_response({"tunnels": [await https.call(request, tunnels.state, t) for t in ts]})

    async def one(request: web.Request) -> web.Response:
        t = tunnels.get(_tid(request))
        return web.json_response(await https.call(request, tunnels.state, t))

    async def delete(request: web.Request) -> web.Response:
        await https.call(request, tunnels.delete, _tid(request))
        return web.Response(status=204)

    async def accept(request: web.Request) -> web.Response:
        body = await https.json_object(request)
        t = await https.call(request, tunnels.accept, https.kme_of(request), _tid(request), body)
        return web.json_response(await https.call(request, tunnels.state, t), status=201)

    async def new_ppk(request: web.Request) -> web.Response:
        body = await https.json_object(request)
        await https.call(request, tunnels.new_ppk, https.kme_of(request), _tid(request), body)
        return web.Response(status=204)

    async def release(request: web.Request) -> web.Response:
        await https.call(request, tunnels.release, https.kme_of(request), _tid(request))
        return web.Response(status=204)

    async def _close(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, tunnels.close)

    app.add_routes([
        web.post(PATH, create),
        web.get(PATH, listing, allow_head=False),
        web.get(PATH + "/{id}", one, allow_head=False),
        web.delete(PATH + "/{id}", delete),
        web.put(PATH + "/{id}/peer", accept),
        web.post(PATH + "/{id}/peer/ppk", new_ppk),
        web.delete(PATH + "/{id}/peer", release),
    ])
    app.on_cleanup.insert(0, _close)  # before the key-delivery pool shuts down


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_ERR = openapi.error("error")
_TUNNEL_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/IpsecTunnel"}}}
_PEER_NOTE = "Agent to agent: the caller's certificate must be the initiating node's KME certificate."

OPENAPI: dict[str, Any] = {
    "paths": {
        PATH: {
            "post": {
                "summary": "Set up a QKD-keyed IKEv2/ESP tunnel from this node's lab host to another node's",
                "description": "PSK authentication with an RFC 8784 PPK (required), both from QKD keys; the PPK is "
                               "replaced by a fresh key and the IKE SA re-authenticated every reauth_interval s.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["to"],
                    "properties": {"to": {"type": "string", "description": "node name"},
                                   "reauth_interval": {"type": "integer", "minimum": MIN_INTERVAL,
                                                       "maximum": MAX_INTERVAL, "default": DEFAULT_INTERVAL}}}}}},
                "responses": {"201": {"description": "tunnel up", "content": _TUNNEL_REF},
                              "400": _ERR, "404": _ERR, "502": _ERR, "503": _ERR},
            },
            "get": {"summary": "This node's tunnel ends",
                    "responses": {"200": {"description": "tunnels", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"tunnels": {
                            "type": "array", "items": {"$ref": "#/components/schemas/IpsecTunnel"}}}}}}}}},
        },
        PATH + "/{id}": {
            "parameters": [_ID],
            "get": {"summary": "One tunnel end", "responses": {"200": {"description": "tunnel", "content": _TUNNEL_REF},
                                                              "404": _ERR}},
            "delete": {"summary": "Tear the tunnel down at both ends (at its initiator)",
                       "responses": {"204": {"description": "gone"}, "404": _ERR, "409": _ERR}},
        },
        PATH + "/{id}/peer": {
            "parameters": [_ID],
            "put": {"summary": "Set up the responder end", "description": _PEER_NOTE,
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["from", "key_ids"],
                        "properties": {"from": {"type": "string"},
                                       "key_ids": {"type": "array", "items": {"type": "string", "format": "uuid"},
                                                   "minItems": 2, "maxItems": 2,
                                                   "description": "ETSI 014 key IDs of the PSK and the PPK"}}}}}},
                    "responses": {"201": {"description": "end ready", "content": _TUNNEL_REF},
                                  "400": _ERR, "401": _ERR, "403": _ERR, "409": _ERR, "503": _ERR}},
            "delete": {"summary": "Remove the responder end", "description": _PEER_NOTE,
                       "responses": {"204": {"description": "gone"}, "401": _ERR, "403": _ERR, "404": _ERR}},
        },
        PATH + "/{id}/peer/ppk": {
            "parameters": [_ID],
            "post": {"summary": "Load the next PPK at the responder end", "description": _PEER_NOTE,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["key_id"],
                         "properties": {"key_id": {"type": "string", "format": "uuid"}}}}}},
                     "responses": {"204": {"description": "loaded"}, "400": _ERR, "401": _ERR, "403": _ERR,
                                   "404": _ERR}},
        },
    },
    "components": {"schemas": {"IpsecTunnel": {
        "type": "object",
        "description": "State of one tunnel end; never any key, only key IDs.",
        "properties": {
            "id": {"type": "string", "format": "uuid"}, "peer": {"type": "string"},
            "role": {"enum": ["initiator", "responder"]}, "state": {"enum": ["ESTABLISHED", "DOWN"]},
            "ppk_key_id": {"type": "string", "format": "uuid"},
            "reauth_interval": {"type": ["integer", "null"]}, "reauths": {"type": "integer"},
            "created": {"type": "integer", "description": "Unix time"},
            "established": {"type": ["integer", "null"], "description": "Unix time the current IKE SA was built"},
            "sa": {"type": ["object", "null"], "description": "IKE SA (state, SPIs, ppk used, seconds since "
                   "established) and CHILD_SA (state, SPIs)"},
            "last_error": {"type": ["string", "null"]},
        },
    }}},
}
