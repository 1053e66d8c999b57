"""One SD-QKD node agent: drivers, datastores, NETCONF server, notifications.

Wiring only; every piece lives in its own module. Data flows one way: config ->
datastore -> drivers; drivers report state (read on <get>) and events (sent as
ETSI 015 notifications).
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any


from sdqkd.agents import config as agent_config
from sdqkd.agents import operational
from sdqkd.agents import device_notifications
from sdqkd.agents.netconf import ssh
from sdqkd.agents.datastore.model import agent_models
from sdqkd.agents.datastore.store import Datastores
from sdqkd.agents.datastore.validate import NodeFacts
from sdqkd.agents.drivers import wiring
from sdqkd.agents.drivers.base import Driver, Event
from sdqkd.agents.kms import node as kms_node
from sdqkd.agents.kms import routes as kms_routes
from sdqkd.agents.qaas import api as qaas
from sdqkd.agents.netconf.notifications import NotificationHub
from sdqkd.agents.netconf.rpcs import Rpcs
from sdqkd.agents.netconf.server import NetconfServer
from sdqkd.agents.netconf.session import SessionLimits
from sdqkd.agents.restconf import server as restconf
from sdqkd.agents.restconf.methods import Resources
from sdqkd.private import private_dir

if TYPE_CHECKING:
    from sdqkd.agents.metrics import AgentMetrics

log = logging.getLogger(__name__)


class Agent:
    """Everything one node runs. `start()` then `stop()`; tests use it in-process too."""

    def __init__(self, cfg: agent_config.AgentConfig) -> None:
        self.cfg = cfg
        self.models = agent_models()
        self.hub = NotificationHub()
        self._asked: dict[tuple[str, str], float] = {}
        private_dir(cfg.state_dir)  # key store, running config, host key: only ours to read
        self.qrng = wiring.build_qrng(cfg)
        entropy = self.qrng.read if self.qrng is not None else os.urandom
        self.kms = kms_node.build(cfg, entropy=entropy, on_missing_path=self._ask_for_path,
                                  more_routes=lambda app, lkms: qaas.add_routes(
                                      app, qaas.Context(cfg, lkms, self.qrng, self.hub.publish)))
        self.devices = wiring.build(cfg, key_sink=self.kms.lkms.key_sink, key_room=self.kms.lkms.key_room)
        self.drivers: list[Driver] = self.devices.drivers + ([self.qrng] if self.qrng is not None else [])
        wiring.attach_qrng_faults(self.qrng, self.devices.plant, cfg.node.name)
        self.kms.lkms.streams.link_rate = lambda qkdl_id: operational.link_rate(self.drivers, qkdl_id)
        self.datastores = Datastores(
            self.models,
            NodeFacts(cfg.node.qkdn_id),
            drivers=self.drivers,
            startup_path=cfg.startup_path,
            running_path=cfg.running_file,
            initial=operational.initial_config(cfg, self.drivers),
            on_commit=self._on_commit,
        )
        self.server: NetconfServer | None = None
        self.metrics: AgentMetrics | None = None  # when the config serves them
        self.metrics_port: int | None = None  # bound once start() returned
        if cfg.metrics is not None and cfg.metrics.port:
            self._add_metrics()
        self.restconf: restconf.RestconfServer | None = None
        self._auth_pool: ThreadPoolExecutor | None = None
        self._stopped = threading.Event()
        # Drivers emit from their own threads, possibly while a commit holds the
        # datastore lock: events are queued and sent by one thread of ours.
        self._events: queue.Queue[Event | None] = queue.Queue(maxsize=10000)
        self._translate = device_notifications.Translator()
        self._notifier = threading.Thread(target=self._notify_loop, name="notifier", daemon=True)

    def start(self) -> None:
        self._notifier.start()
        self._refresh_routes()
        for drv in self.drivers:
            drv.open(self._on_event)
        # Replay running into the devices now that they are open (the persisted running, or
        # startup: see Datastores); the LKMS routes were refreshed from it above.
        log.info("running restored from %s", self.datastores.restored_from)
        self.datastores.reapply()
        self.kms.start()
        users = [
            ssh.User(u.name, u.password_hash, [ssh.parse_public_key(k) for k in u.authorized_keys]) for u in self.cfg.netconf.users
        ]
        host_key = ssh.load_or_create_host_key(Path(self.cfg.netconf.host_key))
        self._auth_pool = ssh.auth_executor()  # NETCONF's and RESTCONF's password checks, two at a time in all
        if self.cfg.restconf is not None:  # RFC 8040: a second front end on the same datastores; up
            # before NETCONF, whose port says the agent is ready
            rc = self.cfg.restconf
            self.restconf = restconf.RestconfServer(
                Resources(self.models, self.datastores, self._fill_state), self.hub, users, rc.host, rc.port,
                restconf.ssl_context(rc.cert, rc.key, rc.client_ca), self.cfg.netconf.auth_failure_delay,
                auth_pool=self._auth_pool).start()
        rpcs = Rpcs(self.models, self.datastores, self.hub, self._fill_state, self._sessions,
                    lambda: dict(self.server.stats) if self.server else {})
        nc = self.cfg.netconf
        self.server = NetconfServer(
            rpcs, users, host_key, nc.address, nc.port,
            limits=SessionLimits(max_message_size=nc.max_message_size, hello_timeout=nc.hello_timeout),
            login=ssh.LoginLimits(login_timeout=nc.login_timeout, max_auth_tries=nc.max_auth_tries,
                                  max_startups=nc.max_startups, failure_delay=nc.auth_failure_delay),
            auth_pool=self._auth_pool)
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.server.loop, self.cfg.metrics.address, self.cfg.metrics.port)
        # Everything built so far lives as long as the process: keep it out of the
        # collector's way (full collections rescanned it on every pass).
        gc.collect()
        gc.freeze()
        log.info("agent %s (%s) serving NETCONF on %s:%s", self.cfg.node.name, self.cfg.node.qkdn_id, self.cfg.netconf.address, self.server.port)

    def _add_metrics(self) -> None:
        """Metrics from the drivers, key store, key delivery, relay and NETCONF server. Imported
        only when served: prometheus_client costs an agent ~1.5 MB of memory."""
        from sdqkd.agents import metrics as agent_metrics

        self.metrics = m = agent_metrics.AgentMetrics(drivers=lambda: self.drivers, store=self.kms.lkms.store,
                                                      routes=lambda: self.kms.lkms.routes, netconf=lambda: self.server)
        if self.kms.server is not None:
            self.kms.server.app.middlewares.insert(0, m.middleware)
        for stream in self.kms.streams:
            stream.observe = m.observe_stream
        if self.kms.lkms.forwarder is not None:
            self.kms.lkms.forwarder.observe = m.observe_relay

    def _sessions(self) -> list[Any]:
        return self.server.sessions() if self.server else []

    def _fill_state(self, data: dict[str, Any]) -> None:
        lkms = self.kms.lkms
        operational.fill(data, self.drivers, lkms.store.usage, stock=lkms.link_stock, delivery=lkms.app_delivery)

    def _on_commit(self, changes: list[Any]) -> None:
        if self.restconf is not None:
            self.restconf.resources.versions.changed()  # RESTCONF's Last-Modified
        if any(c.kind in ("qkd-link", "qkd-app") for c in changes):  # what routes are made of
            self._refresh_routes()
        for content in device_notifications.application_changes(changes):
            self.hub.publish(content)

    def _refresh_routes(self) -> None:
        """The LKMS and forwarding module follow running (apps, links, next hops)."""
        running = self.datastores.running_config().json
        routes = kms_routes.from_running(running.get("etsi-qkd-sdn-node", {}), self.cfg.node.qkdn_id)
        self.kms.lkms.update_routes(routes)

    def _ask_for_path(self, master: str, slave: str, qos: Any = None) -> None:
        """No application covers this SAE pair: tell the controller (ETSI 015
        sdqkdn_application_new), once per pair every few seconds however often SAEs retry.
        qos: the ETSI 004 QoS of the stream that asked (agents/kms/interface.Qos), sent as
        the notification's app_qos / app_priority so the controller reserves its min_bps."""
        now = time.monotonic()
        if now - self._asked.get((master, slave), -1e9) < 5.0:
            return
        self._asked[(master, slave)] = now
        asked = None
        if qos is not None:
            asked = {"min_bandwidth": qos.min_bps, "max_bandwidth": qos.max_bps, "jitter": qos.jitter,
                     "ttl": qos.ttl, "priority": qos.priority}
        self.hub.publish(device_notifications.application_new(master, slave, self.cfg.node.qkdn_id, asked))

    def _on_event(self, event: Event) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            log.warning("event queue full: dropping %s", event.kind)

    def _notify_loop(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            try:
                for content in self._translate(event):
                    self.hub.publish(content)
            except Exception:  # noqa: BLE001 - a bad event must not stop notifications
                log.exception("cannot send event %s", event.kind)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.metrics is not None:
            self.metrics.stop()
        if self.server is not None:
            self.server.stop()
        if self.restconf is not None:
            self.restconf.stop()
        if self._auth_pool is not None:
            self._auth_pool.shutdown(wait=False, cancel_futures=True)
        for drv in self.drivers:
            try:
                drv.close()
            except Exception:  # noqa: BLE001
                log.exception("closing driver failed")
        self.devices.close()
        self.kms.stop()
        self._events.put(None)

    def wait(self) -> None:
        self._stopped.wait()
