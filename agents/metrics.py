"""The agent's Prometheus metrics (prometheus-client) and their HTTP endpoint, GET /metrics.

Each agent has a registry of its own (never the library's global one: tests run several
agents in one process). What the devices and the key store know is read when Prometheus
scrapes (collectors: key rate, QBER, link status and stored keys per link, NETCONF
sessions and RFC 6022 counters); what happens between scrapes is counted where it happens
(ETSI 014/004 and QaaS requests by route and status code, the ETSI 004 JSON and binary
forms' requests by call and code, relay requests by peer).

Labels are bounded by the configuration: qkdl_id, qkdi_id, peer (an adjacent KME's
qkdn_id), route (a route pattern, never the URL: no SAE ID or key ID reaches a label),
method, code, op. No key byte or key ID is ever a label or a value.

Served over plain HTTP on the NETCONF server's event loop (agents/kms/web.py on h11), so
the endpoint adds no thread; the scrape itself runs on that loop's worker pool, since it
reads the drivers and the key store.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from sdqkd.agents.drivers.base import Driver
from sdqkd.agents.kms import web
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.routes import RouteTable
from sdqkd.listen import binding

log = logging.getLogger(__name__)
# No <name>_created series beside every counter and histogram (a process-wide switch of the
# library): they doubled what a scrape carries, and Prometheus does not use them.
disable_created_metrics()

# s: an ETSI 014 key request answered from the store takes ~1 ms, a relayed one tens of ms,
# one that waits for a path (QaaS path_wait) up to 10 s.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# RFC 6022 statistics exposed as counters: name -> help
_NETCONF_COUNTERS = {
    "in-sessions": "NETCONF sessions started",
    "dropped-sessions": "NETCONF sessions ended otherwise than by close-session or kill-session",
    "in-bad-hellos": "NETCONF sessions refused for a bad hello",
    "in-rpcs": "well-formed NETCONF RPCs received",
    "in-bad-rpcs": "malformed NETCONF RPCs received",
    "out-rpc-errors": "NETCONF rpc-reply messages sent with an rpc-error",
    "out-notifications": "NETCONF notifications sent",
}


class _NodeCollector(Collector):
    """Links, key store and NETCONF sessions as they are at scrape time."""

    def __init__(self, drivers: Callable[[], list[Driver]], store: KeyStore, routes: Callable[[], RouteTable | None],
                 netconf: Callable[[], Any]) -> None:
        self._drivers, self._store, self._routes, self._netconf = drivers, store, routes, netconf

    def collect(self) -> Iterator[Metric]:
        # A part that cannot be read now (a key store on a full disk, a driver mid-restart) is
        # left out of this scrape, never the whole scrape: the rest is what an operator needs then.
        for part in (self._links, self._store_up, self._stored, self._sessions):
            try:
                got = list(part())
            except Exception as exc:  # noqa: BLE001 - see above
                log.debug("metrics: %s skipped (%s)", part.__name__, type(exc).__name__)
                continue
            yield from got

    def _links(self) -> Iterator[Metric]:
        labels = ["qkdl_id", "qkdi_id"]
        skr = GaugeMetricFamily("sdqkd_link_secret_key_rate_bits_per_second",
                                "Secret key rate the QKD module measures on the link now", labels=labels)
        qber = GaugeMetricFamily("sdqkd_link_qber_ratio", "Quantum bit error rate of the link's last block (0..1)",
                                 labels=labels)
        up = GaugeMetricFamily("sdqkd_link_up", "1 when the QKD link is ACTIVE (ETSI 015 qkdl_status)", labels=labels)
        bits = CounterMetricFamily("sdqkd_link_key_bits", "Secret key bits the module distilled on the link",
                                   labels=labels)
        for drv in self._drivers():
            try:
                st = drv.state()
            except Exception as exc:  # noqa: BLE001 - the other modules are still reported
                log.debug("metrics: %s state unreadable (%s)", type(drv).__name__, type(exc).__name__)
                continue
            if "interface" not in st:
                continue
            qkdi = str(st["interface"].get("qkdi_id", ""))
            for lid, ls in st.get("links", {}).items():
                lv = [str(lid).lower(), qkdi]
                skr.add_metric(lv, float(ls.get("skr") or 0.0))
                if ls.get("qber") is not None:
                    qber.add_metric(lv, float(ls["qber"]))
                up.add_metric(lv, 1.0 if ls.get("status") == "ACTIVE" else 0.0)
                bits.add_metric(lv, float(ls.get("key_bits") or 0))
        yield from (skr, qber, up, bits)

    def _store_up(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("sdqkd_key_store_available", "0 while the key store fails to commit (disk full, I/O error)",
                                value=1.0 if self._store.available else 0.0)

    def _stored(self) -> Iterator[Metric]:
        table = self._routes()
        links = sorted(table.links) if table is not None else []
        keys = GaugeMetricFamily("sdqkd_stored_keys", "Link keys in the key store, by who allocates them",
                                 labels=["qkdl_id", "owner"])
        for lid in links:
            mine, theirs, _ = self._store.stock(lid)  # the figures <get> reports (sdqkd-key-stock), in one read
            keys.add_metric([lid, "local"], float(mine))
            keys.add_metric([lid, "peer"], float(theirs))
        yield keys

    def _sessions(self) -> Iterator[Metric]:
        server = self._netconf()
        if server is None:
            return
        yield GaugeMetricFamily("sdqkd_netconf_sessions", "Open NETCONF sessions", value=float(len(server.sessions())))
        counts = server.counters()
        for key, doc in _NETCONF_COUNTERS.items():
            yield CounterMetricFamily(f"sdqkd_netconf_{key.replace('-', '_')}", doc, value=float(counts.get(key, 0)))


class AgentMetrics:
    """One agent's registry: the collectors above, and the event metrics the key-delivery
    front end (`middleware`) and the relay (`observe_relay`) feed."""

    def __init__(self, *, drivers: Callable[[], list[Driver]], store: KeyStore,
                 routes: Callable[[], RouteTable | None], netconf: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, open fds, CPU seconds
        GCCollector(registry=self.registry)
        self.registry.register(_NodeCollector(drivers, store, routes, netconf))
        self.requests = Counter("sdqkd_kms_requests", "Key-delivery HTTPS requests (ETSI 014, ETSI 004, QaaS) answered",
                                ["route", "method", "code"], registry=self.registry)
        self.request_seconds = Histogram("sdqkd_kms_request_duration_seconds", "Time to answer a key-delivery request",
                                         ["route"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.stream_requests = Counter("sdqkd_kms_stream_requests",
                                       "Key-delivery requests of the ETSI 004 JSON and binary forms, by LKMS call and "
                                       "the HTTP status ETSI 014 would answer", ["protocol", "call", "code"],
                                       registry=self.registry)
        self.relay_seconds = Histogram("sdqkd_relay_request_duration_seconds",
                                       "Time from sending a message to an adjacent KME to its reply",
                                       ["peer", "op"], buckets=RELAY_BUCKETS, registry=self.registry)
        self.relay_failures = Counter("sdqkd_relay_request_failures", "Relay messages to an adjacent KME that failed",
                                      ["peer", "op"], registry=self.registry)
        self._server: web.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- what happens --------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: web.Handler) -> web.Response:
        """Counts every answer of the key-delivery front end by route pattern and status
        (outermost: it sees the error middleware's answers too)."""
        t0 = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            route = request.route or "unmatched"  # a 404 or 405: no pattern, the path is not a label
            self.requests.labels(route, request.method if request.method in _METHODS else "other", str(code)).inc()
            self.request_seconds.labels(route).observe(time.perf_counter() - t0)

    def observe_stream(self, protocol: str, call: str, code: int) -> None:
        self.stream_requests.labels(protocol, call, str(code)).inc()

    def observe_relay(self, peer: str, op: str, seconds: float, ok: bool) -> None:
        self.relay_seconds.labels(peer, op).observe(seconds)
        if not ok:
            self.relay_failures.labels(peer, op).inc()

    # --- the endpoint ----------------------------------------------------------------------

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper accepts (Prometheus text, or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def serve(self, loop: asyncio.AbstractEventLoop, address: str, port: int, timeout: float = 10.0) -> int:
        """Listen on address:port with `loop` (running in another thread); the bound port."""
        app = web.Application()

        async def scrape(request: web.Request) -> web.Response:
            try:
                body, ctype = await asyncio.get_running_loop().run_in_executor(
                    None, self.exposition, request.headers.get("accept"))
            except Exception:  # noqa: BLE001 - said to the scraper (the target shows down), logged here
                log.exception("metrics scrape failed")
                return web.Response(500, b"metrics scrape failed\n", {}, "text/plain; charset=utf-8")
            return web.Response(200, body, {}, ctype)

        app.add_routes([web.get("/metrics", scrape)])
        server = web.Server(app, web.Limits(max_connections=16))
        with binding("metrics HTTP", address, port):
            bound = asyncio.run_coroutine_threadsafe(server.start(address, port, None), loop).result(timeout)
        self._server, self._loop = server, loop
        log.info("Prometheus metrics on http://%s:%d/metrics", address, bound)
        return bound

    def stop(self) -> None:
        server, loop, self._server = self._server, self._loop, None
        if server is None or loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(5)
        except Exception:  # noqa: BLE001 - stopping goes on
            log.exception("stopping the metrics endpoint failed")


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
