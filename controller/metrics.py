"""The controller's Prometheus metrics (prometheus-client) and their HTTP endpoint.

A registry of its own per Controller (tests run several in one process). Read at scrape
time: each agent's NETCONF session (up or not), applications by state, channels. Counted
where they happen: provisioning transactions (duration by outcome, and per phase),
reconciliation runs and the entries they pushed or removed, northbound gRPC calls by
method and status code (a server interceptor).

Labels are bounded by the configuration and the API: agent (a configured agent's name),
state, outcome, phase, method (a served gRPC method), code. No key material ever reaches
the controller, so none can reach a metric.

Served by prometheus-client's own HTTP server (one thread, and one per scrape while it
runs): the controller is one process per network, thread-based like its gRPC server.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from sdqkd.listen import binding

if TYPE_CHECKING:
    from sdqkd.controller.controller import Controller
    from sdqkd.controller.provisioning.txn import TxnReport

log = logging.getLogger(__name__)
# No <name>_created series beside every counter and histogram (a process-wide switch of the
# library): they doubled what a scrape carries, and Prometheus does not use them.
disable_created_metrics()

# s: a 2-hop transaction on loopback takes ~30 ms, a 6-hop one across domains ~0.1-0.3 s; one
# that waits on a dead hop runs into ncclient's timeout.
TXN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _StateCollector(Collector):
    def __init__(self, ctl: Controller) -> None:
        self._ctl = ctl

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("sdqkd_agent_up", "1 while the controller's session to the agent is up (NETCONF, or a RESTCONF event stream)",
                               labels=["agent", "qkdn_id"])
        for qid, conn in sorted(self._ctl.conns.items()):
            up.add_metric([conn.addr.name, qid], 1.0 if conn.is_up() else 0.0)
        yield up
        apps = GaugeMetricFamily("sdqkd_applications", "Applications the controller keeps a key-relay path for, by state",
                                 labels=["state"])
        counts = {"ACTIVE": 0, "DEGRADED": 0}
        for app in self._ctl.store.apps():
            counts[app.state] = counts.get(app.state, 0) + 1
        for state, n in sorted(counts.items()):
            apps.add_metric([state], float(n))
        yield apps
        yield GaugeMetricFamily("sdqkd_optical_channels", "Direct quantum channels provisioned",
                                value=float(len(self._ctl.store.channels())))


class ControllerMetrics:
    """One controller's registry, what feeds it, and its endpoint."""

    def __init__(self, ctl: Controller) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_StateCollector(ctl))
        r = self.registry
        self.txn_seconds = Histogram("sdqkd_provisioning_duration_seconds",
                                     "Time of a provisioning transaction over its hops, NETCONF or RESTCONF (lock to confirm)",
                                     ["outcome"], buckets=TXN_BUCKETS, registry=r)
        self.phase_seconds = Histogram("sdqkd_provisioning_phase_duration_seconds",
                                       "Time of one phase (lock, edit, commit, confirm) of a successful transaction",
                                       ["phase"], buckets=TXN_BUCKETS, registry=r)
        self.reconcile_runs = Counter("sdqkd_reconcile_runs", "Reconciliations of an agent against the store",
                                      ["agent", "outcome"], registry=r)
        self.reconcile_edits = Counter("sdqkd_reconcile_edits", "Entries a reconciliation pushed or removed",
                                       ["agent", "kind"], registry=r)
        self.rpcs = Counter("sdqkd_northbound_rpcs", "Northbound gRPC calls answered", ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("sdqkd_northbound_rpc_duration_seconds", "Time to answer a unary northbound call",
                                     ["method"], buckets=RPC_BUCKETS, registry=r)
        self.interceptor = _Interceptor(self)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    def transaction(self, seconds: float, report: TxnReport | None, outcome: str) -> None:
        """One transaction ended (outcome: ok | failed | unavailable)."""
        self.txn_seconds.labels(outcome).observe(seconds)
        if report is not None:
            before = 0.0
            for phase, until in report.phases.items():  # phase -> seconds from the start to its end
                self.phase_seconds.labels(phase).observe(max(0.0, until - before))
                before = until

    def reconciled(self, agent: str, outcome: str, pushed: int = 0, removed: int = 0) -> None:
        self.reconcile_runs.labels(agent, outcome).inc()
        if pushed:
            self.reconcile_edits.labels(agent, "pushed").inc(pushed)
        if removed:
            self.reconcile_edits.labels(agent, "removed").inc(removed)

    def serve(self, address: str, port: int) -> int:
        """GET http://address:port/metrics from a thread; the bound port."""
        with binding("controller metrics HTTP", address, port):
            self._httpd, self._thread = start_http_server(port, address, registry=self.registry)
        bound = int(self._httpd.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", address, bound)
        return bound

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            if self._thread is not None:
                self._thread.join(5)


class _Interceptor(grpc.ServerInterceptor):
    """Counts every northbound call by method and final status code."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._m = metrics

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED, not counted per name
            return None
        method = details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(method, handler.unary_stream))
        if handler.stream_stream is not None:  # server reflection
            return handler._replace(stream_stream=self._stream(method, handler.stream_stream))
        return handler

    def _count(self, method: str, context: grpc.ServicerContext, failed: bool) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else ("UNKNOWN" if failed else "OK")
        self._m.rpcs.labels(method, name).inc()

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            t0, failed = time.perf_counter(), True
            try:
                reply = behaviour(request, context)
                failed = False
                return reply
            finally:
                self._m.rpc_seconds.labels(method).observe(time.perf_counter() - t0)
                self._count(method, context, failed)
        return run

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            failed = True
            try:
                yield from behaviour(request, context)
                failed = False
            except GeneratorExit:  # the client went away (a StreamEvents subscriber leaving)
                self._m.rpcs.labels(method, grpc.StatusCode.CANCELLED.name).inc()
                failed = None
                raise
            finally:
                if failed is not None:
                    self._count(method, context, failed)
        return run
