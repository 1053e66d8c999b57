"""The RESTCONF server (RFC 8040) of an agent: HTTPS on the agents' HTTP stack
(agents/kms/web.py, h11), HTTP basic against the NETCONF users or a client certificate
whose common name is one, and the routes: /.well-known/host-meta, {+restconf},
{+restconf}/data (agents/restconf/methods.py), operations, yang-library-version and the
event streams (agents/restconf/events.py)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.kms import web
from sdqkd.agents.kms.https import HttpsServer
from sdqkd.agents.netconf import errors as nc
from sdqkd.agents.netconf import notifications
from sdqkd.agents.netconf.ssh import FailureLog, LoginLimits, User, auth_executor, check_password
from sdqkd.agents.restconf import etag, events, params, paths, tfs
from sdqkd.agents.restconf.errors import JSON, XML, RESTCONF_NS, RestconfError, fail, render
from sdqkd.agents.restconf.methods import Resources, parse_json, xml_body

log = logging.getLogger(__name__)

YANG_LIBRARY_VERSION = "2019-01-04"
DATA_METHODS = "DELETE,GET,HEAD,OPTIONS,PATCH,POST,PUT"
CAPABILITIES = [
    "urn:ietf:params:restconf:capability:defaults:1.0?basic-mode=explicit",
    "urn:ietf:params:restconf:capability:depth:1.0",
    "urn:ietf:params:restconf:capability:fields:1.0",
    "urn:ietf:params:restconf:capability:with-defaults:1.0",
    "urn:ietf:params:restconf:capability:replay:1.0",
]


def ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS >= 1.2; a client certificate is asked for (and checked against `client_ca`)
    when there is one, but HTTP basic may stand in for it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=client_ca)
    return ctx


class Auth:
    """Who is asking: a NETCONF user, by password (scrypt, as ssh.py checks it; a pair
    once verified is remembered by its digest) or by certificate common name."""

    def __init__(self, users: list[User], executor: ThreadPoolExecutor) -> None:
        self.users = {u.name: u for u in users}
        self._good: set[bytes] = set()
        # scrypt takes 16 MiB per check: the node's one password-check pool bounds how many at once
        self.executor = executor

    def user(self, request: web.Request) -> tuple[str | None, bool]:
        """(the user, or None; whether a password was tried and failed). Blocking (scrypt)."""
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        cert = sslobj.getpeercert() if sslobj is not None else None
        if cert:
            cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
            if cn in self.users:
                return cn, False
        header = request.headers.get("authorization", "")
        scheme, _, cred = header.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            name, _, password = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, True
        u = self.users.get(name)
        stored = u.password_hash if u is not None and u.password_hash else _DUMMY
        digest = hashlib.sha256(f"{name}\0{password}\0{stored}".encode()).digest()
        if digest in self._good:
            return name, False
        if check_password(password, stored) and u is not None:  # unknown users cost the same scrypt
            self._good.add(digest)
            return name, False
        return None, True


_DUMMY = "scrypt$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _media(request: web.Request) -> str:
    """The response media type from Accept (JSON unless XML is asked for); 406 for neither."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return JSON
    for part in accept.split(","):
        t = part.split(";")[0].strip().lower()
        if t in (JSON, "application/json", "*/*", "application/*"):
            return JSON
        if t in (XML, "application/xml"):
            return XML
    raise fail(406, nc.InvalidValue, f"cannot answer in {accept} (application/yang-data+json or +xml)")


class RestconfServer:
    def __init__(self, resources: Resources, hub: notifications.NotificationHub, users: list[User], host: str,
                 port: int, ssl_ctx: ssl.SSLContext, failure_delay: float = 0.5,
                 auth_pool: ThreadPoolExecutor | None = None) -> None:
        """`auth_pool`: the node's password-check pool, shared with NETCONF (the caller's); one
        of its own when not given."""
        self._own_auth = auth_pool is None
        self.resources, self.hub, self.auth = resources, hub, Auth(users, auth_pool or auth_executor())
        # a wrong password is answered late, later for each one from the address (as NETCONF's)
        self.failures = FailureLog(LoginLimits(failure_delay=failure_delay))
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.app.add_routes([
            web.get("/.well-known/host-meta", self._host_meta),
            web.any_method("/restconf/{rest*}", self._restconf),
        ])
        self.https = HttpsServer(self.app, host, port, ssl_ctx, role="RESTCONF")

    def start(self) -> "RestconfServer":
        self.https.start()
        log.info("RESTCONF on https://%s:%d/restconf", self.https.host, self.https.port)
        return self

    @property
    def port(self) -> int:
        return self.https.port

    def stop(self) -> None:
        self.https.stop()
        if self._own_auth:
            self.auth.executor.shutdown(wait=False, cancel_futures=True)

    # --- routes --------------------------------------------------------------------------

    async def _host_meta(self, request: web.Request) -> web.Response:
        body = b"<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n  <Link rel='restconf' href='/restconf'/>\n</XRD>\n"
        return web.Response(200, body, {}, "application/xrd+xml")

    async def _restconf(self, request: web.Request) -> web.Response:
        media = JSON
        try:
            streams = request.raw_path.startswith("/restconf/streams/")  # text/event-stream: their own
            media = _media(request) if request.method != "OPTIONS" and not streams else JSON
            user, failed = await asyncio.get_running_loop().run_in_executor(self.auth.executor, self.auth.user, request)
            peer = (request.transport.get_extra_info("peername") or ("?",))[0] if request.transport else "?"
            if user is None:
                if failed:
                    log.info("RESTCONF login refused from %s", peer)
                    await asyncio.sleep(self.failures.fail(peer))
                raise RestconfError([nc.AccessDenied("authentication required (HTTP basic or a client certificate)")], 401)
            self.failures.succeed(peer)
            rest = request.raw_path[len("/restconf"):]
            if rest in ("", "/"):
                return self._root(request, media)
            if rest == "/yang-library-version":
                return self._leaf(request, media, "yang-library-version", YANG_LIBRARY_VERSION)
            if rest == "/operations" or rest.startswith("/operations/"):
                return self._operations(request, media, rest)
            if rest.startswith("/streams/"):
                return await self._stream(request, rest)
            if rest == "/data" or rest.startswith("/data/"):
                return await self._data(request, media, rest[len("/data"):])
            raise fail(404, nc.InvalidValue, "no such resource")
        except RestconfError as exc:
            return self._error(exc, media)
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            log.exception("RESTCONF %s %s failed", request.method, request.path)
            return self._error(RestconfError([nc.OperationFailed("internal error")], 500), media)

    def _error(self, exc: RestconfError, media: str) -> web.Response:
        body, ctype = render(exc, media)
        headers = dict(exc.headers)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="restconf", charset="UTF-8"'
        return web.Response(exc.status, body, headers, ctype)

    def _only(self, request: web.Request, *methods: str) -> None:
        if request.method not in methods:
            raise RestconfError([nc.OperationNotSupported(f"{request.method} is not allowed here")], 405,
                                {"Allow": ",".join(sorted({*methods, "OPTIONS"}))})

    def _options(self, allow: str, patch: bool = False) -> web.Response:
        headers = {"Allow": allow}
        if patch:
            headers["Accept-Patch"] = f"{JSON}, {XML}"
        return web.Response(200, b"", headers, None)

    def _root(self, request: web.Request, media: str) -> web.Response:
        if request.method == "OPTIONS":
            return self._options("GET,HEAD,OPTIONS")
        self._only(request, "GET", "HEAD")
        params.parse(request.method, request.query.items(), set())
        if media == XML:
            body = (f'<restconf xmlns="{RESTCONF_NS}"><data/><operations/>'
                    f"<yang-library-version>{YANG_LIBRARY_VERSION}</yang-library-version></restconf>").encode()
        else:
            body = json.dumps({"ietf-restconf:restconf": {"data": {}, "operations": {},
                                                          "yang-library-version": YANG_LIBRARY_VERSION}}).encode()
        return web.Response(200, body, {}, media)

    def _leaf(self, request: web.Request, media: str, name: str, value: str) -> web.Response:
        if request.method == "OPTIONS":
            return self._options("GET,HEAD,OPTIONS")
        self._only(request, "GET", "HEAD")
        if media == XML:
            return web.Response(200, f'<{name} xmlns="{RESTCONF_NS}">{value}</{name}>'.encode(), {}, media)
        return web.Response(200, json.dumps({f"ietf-restconf:{name}": value}).encode(), {}, media)

    def _operations(self, request: web.Request, media: str, rest: str) -> web.Response:
        """{+restconf}/operations: this server has no RPC of its own to offer (RFC 8040 3.3.2)."""
        if rest != "/operations":
            raise fail(404, nc.InvalidValue, "this server has no RESTCONF operations")
        if request.method == "OPTIONS":
            return self._options("GET,HEAD,OPTIONS")
        self._only(request, "GET", "HEAD")
        if media == XML:
            return web.Response(200, f'<operations xmlns="{RESTCONF_NS}"/>'.encode(), {}, media)
        return web.Response(200, json.dumps({"ietf-restconf:operations": {}}).encode(), {}, media)

    def stream_state(self, host: str) -> dict[str, Any]:
        """ietf-restconf-monitoring:restconf-state: capabilities and the stream's locations."""
        replay = self.hub.replay_start()
        stream = {"name": events.STREAM, "description": notifications.STREAM_DESCRIPTION, "replay-support": True,
                  "replay-log-creation-time": notifications.format_time(replay),
                  "access": [{"encoding": enc, "location": f"https://{host}/restconf/streams/{events.STREAM}/{enc}"}
                             for enc in ("xml", "json")]}
        return {"ietf-restconf-monitoring:restconf-state": {"capabilities": {"capability": CAPABILITIES},
                                                            "streams": {"stream": [stream]}}}

    async def _stream(self, request: web.Request, rest: str) -> web.Response:
        parts = rest.strip("/").split("/")
        if len(parts) != 3 or parts[1] != events.STREAM or parts[2] not in ("xml", "json"):
            raise fail(404, nc.InvalidValue, "no such stream (see ietf-restconf-monitoring:restconf-state/streams)")
        if request.method == "OPTIONS":
            return self._options("GET,HEAD,OPTIONS")
        self._only(request, "GET", "HEAD")
        params.parse("GET", request.query.items(), params.STREAM_PARAMS)
        start = stop = None
        try:
            if "start-time" in request.query:
                start = notifications.parse_time(request.query["start-time"], "start-time")
            if "stop-time" in request.query:
                stop = notifications.parse_time(request.query["stop-time"], "stop-time")
        except nc.RpcError as exc:
            raise RestconfError([exc], 400) from None
        sub = events.Subscriber(asyncio.get_running_loop(), parts[2])
        headers = {"Cache-Control": "no-cache"}
        if request.method == "HEAD":
            return web.Response(200, b"", headers, "text/event-stream")
        try:
            gen = events.stream(self.hub, sub, start, stop)
            first = await gen.__anext__()  # subscribes (and checks start/stop) before the 200 goes out
        except nc.RpcError as exc:
            raise RestconfError([exc], 400) from None

        async def body() -> Any:
            try:
                yield first
                async for chunk in gen:
                    yield chunk
            finally:
                await gen.aclose()  # unsubscribes now, not when the collector gets to it
        return web.Response(200, b"", headers, "text/event-stream", stream=body())

    async def _data(self, request: web.Request, media: str, rest: str) -> web.Response:
        raw = rest.lstrip("/")
        compat = raw.endswith("/") and raw.strip("/") != ""  # TFS's URIs (agents/restconf/tfs.py)
        raw = raw.rstrip("/") if compat else raw
        steps = paths.parse(raw) if raw else []
        method = request.method
        loop = asyncio.get_running_loop()
        res = self.resources
        if method == "OPTIONS":
            return self._options(DATA_METHODS, patch=True)
        if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            raise RestconfError([nc.OperationNotSupported(f"{method} is not a RESTCONF method")], 405,
                                {"Allow": DATA_METHODS})
        q = params.parse(method, request.query.items())
        if method in ("GET", "HEAD"):
            host = request.headers.get("host", "localhost")

            def read() -> tuple[Any, str, float]:
                tag, modified = res.etag()
                try:
                    return res.read(steps, q, extra=lambda: self.stream_state(host)), tag, modified
                except RestconfError as exc:
                    if not (compat and exc.status == 404 and steps[-1].node.keyword == "container" and len(steps) > 1):
                        raise
                    res.read(steps[:-1], q)  # TFS: an empty container of a node that is there reads as {}
                    return {}, tag, modified
            value, tag, modified = await loop.run_in_executor(None, read)
            headers = {"ETag": tag, "Last-Modified": etag.http_date(modified), "Cache-Control": "no-cache"}
            inm = request.headers.get("if-none-match")
            ims = etag.parse_date(request.headers.get("if-modified-since", "")) if "if-modified-since" in request.headers else None
            if (inm is not None and etag.tag_matches(inm, tag)) or (inm is None and ims is not None and int(modified) <= ims):
                return web.Response(304, b"", headers, None)
            if compat and steps:
                return web.Response(200, json.dumps(tfs.shape(steps, value)).encode(), headers, JSON)
            return web.Response(200, self._encode(steps, value, media), headers, media)
        body: dict[str, Any] | None = None
        create_children = False
        if method != "DELETE":
            raw_body = await request.read()
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype in (JSON, "application/json"):
                body = parse_json(raw_body)
            elif ctype in (XML, "application/xml"):
                body = await loop.run_in_executor(None, xml_body, raw_body, steps, method == "POST")
            else:
                raise fail(415, nc.InvalidValue, f"unsupported media type '{ctype}' (application/yang-data+json or +xml)")
            if compat:
                body = tfs.without_nulls(body)
                create_children = method == "POST" and tfs.names_target(body, steps)
        edited = await loop.run_in_executor(
            None, lambda: res.edit(method, steps, body, request.headers, create_children))
        tag, modified = await loop.run_in_executor(None, res.etag)
        headers = {"ETag": tag, "Last-Modified": etag.http_date(modified)}
        if edited.location is not None:
            host = request.headers.get("host", "localhost")
            headers["Location"] = f"https://{host}/restconf/data/{paths.uri(edited.location)}"
        return web.Response(edited.status, b"", headers, None)

    def _encode(self, steps: list[paths.Step], value: Any, media: str) -> bytes:
        """The target as RFC 8040 answers it: {"module:name": value} (a list entry in an
        array), the datastore as ietf-restconf:data; in XML the target's element(s)."""
        if media == JSON:
            if not steps:
                return json.dumps({"ietf-restconf:data": value}).encode()
            node = steps[-1].node
            wrapped = [value] if node.keyword == "list" or (node.keyword == "leaf-list" and steps[-1].keys is not None) else value
            return json.dumps({f"{node.module}:{node.name}": wrapped}).encode()
        root = etree.Element(f"{{{RESTCONF_NS}}}data", nsmap={None: RESTCONF_NS})
        try:
            if not steps:
                root.extend(yangdata.encode_json_xml(value) if value else [])
                return etree.tostring(root)
            node = steps[-1].node
            doc = paths.skeleton(steps, value)
            els = yangdata.encode_json_xml(doc)
        except yangdata.YangError as exc:
            raise RestconfError([nc.OperationFailed(str(exc))], 500) from None
        target = paths.find_xml(els, steps)
        if target is None:
            return b""
        if node.keyword == "leaf-list" and steps[-1].keys is None:
            parent = target.getparent()
            same = [c for c in (parent if parent is not None else [target]) if c.tag == target.tag]
            return b"".join(etree.tostring(c) for c in same)
        return etree.tostring(target)
