"""The NETCONF operations an agent serves; each handler parses its parameters and
delegates to the datastores, the state view or the notification hub."""
from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import errors
from sdqkd.agents.netconf import monitoring
from sdqkd.agents.netconf import notifications
from sdqkd.agents.datastore import subtree
from sdqkd.agents.datastore.model import ModelSet
from sdqkd.agents.datastore.store import Datastores

log = logging.getLogger(__name__)

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
BASE_CAPS = [
    "urn:ietf:params:netconf:base:1.0",
    "urn:ietf:params:netconf:base:1.1",
    "urn:ietf:params:netconf:capability:writable-running:1.0",
    "urn:ietf:params:netconf:capability:candidate:1.0",
    "urn:ietf:params:netconf:capability:confirmed-commit:1.0",
    "urn:ietf:params:netconf:capability:confirmed-commit:1.1",
    "urn:ietf:params:netconf:capability:rollback-on-error:1.0",
    "urn:ietf:params:netconf:capability:validate:1.0",
    "urn:ietf:params:netconf:capability:validate:1.1",
    "urn:ietf:params:netconf:capability:startup:1.0",
    "urn:ietf:params:netconf:capability:notification:1.0",
    "urn:ietf:params:netconf:capability:interleave:1.0",
    # RFC 6243: datastores hold what clients set; report-all-tagged is not offered (its
    # 'default' attribute would also have to be understood in edit-config).
    "urn:ietf:params:netconf:capability:with-defaults:1.0?basic-mode=explicit&also-supported=report-all,trim",
]
# Modules whose data the agent serves; their imports are advertised too.
SERVED = ("etsi-qkd-sdn-node", "sdqkd-optical-switch", "sdqkd-qrng", "sdqkd-key-stock", "ietf-netconf-monitoring",
          "notifications", "nc-notifications", "ietf-netconf-with-defaults")
WD_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
WITH_DEFAULTS = ("explicit", "report-all", "trim")  # the capability's basic-mode and also-supported

StateFill = Callable[[dict[str, Any]], None]


def _q(name: str) -> str:
    return f"{{{NC}}}{name}"


def _datastore_name(param: etree._Element | None, what: str, allowed: tuple[str, ...]) -> str:
    """<source><running/></source> -> 'running'."""
    if param is None:
        raise errors.protocol(errors.MissingElement, f"<{what}> is missing", info={"bad-element": what})
    kids = [c for c in param if isinstance(c.tag, str)]
    if len(kids) != 1:
        raise errors.protocol(errors.MissingElement, f"<{what}> names one datastore", info={"bad-element": what})
    q = etree.QName(kids[0])
    if q.namespace != NC or q.localname not in allowed:
        raise errors.protocol(errors.BadElement, f"<{what}> cannot be <{q.localname}>", info={"bad-element": q.localname})
    return q.localname


def _filter(op: etree._Element) -> etree._Element | None:
    filt = op.find(_q("filter"))
    if filt is None:
        return None
    ftype = filt.get("type", "subtree")
    if ftype != "subtree":
        raise errors.protocol(errors.BadAttribute, f"filter type '{ftype}' is not supported (subtree only)", info={"bad-attribute": "type", "bad-element": "filter"})
    return filt


def _data(elements: list[etree._Element]) -> list[etree._Element]:
    data = etree.Element(_q("data"), nsmap={None: NC})
    data.extend(elements)
    return [data]


def _with_defaults(op: etree._Element) -> str:
    """The <with-defaults> retrieval mode (RFC 6243 4.5.1), the basic mode when absent.
    A value the type refuses was refused by libyang already (invalid-value)."""
    el = op.find(f"{{{WD_NS}}}with-defaults")
    mode = "explicit" if el is None else (el.text or "").strip()
    if mode not in WITH_DEFAULTS:
        raise errors.protocol(errors.InvalidValue, f"with-defaults mode '{mode}' is not supported (explicit, report-all, trim)",
                              info={"bad-element": "with-defaults"})
    return mode


def _text(op: etree._Element, name: str) -> str | None:
    el = op.find(_q(name))
    return None if el is None else (el.text or "").strip()


class Rpcs:
    """What the server calls: capabilities, the handler table and session cleanup."""

    def __init__(self, models: ModelSet, datastores: Datastores, hub: notifications.NotificationHub, fill_state: StateFill, sessions: Callable[[], list[Any]],
                 server_stats: Callable[[], dict[str, int]] = dict) -> None:
        self.models = models
        self.datastores = datastores
        self.hub = hub
        self.fill_state = fill_state
        self.sessions = sessions
        self.server_stats = server_stats  # RFC 6022 counters the transport keeps (sessions started, dropped, bad hellos)
        self.modules = monitoring.served_modules(SERVED)
        self.started = notifications.now()
        self._caps: list[str] | None = None
        self._handlers: dict[tuple[str, str], Callable[[Any, etree._Element], Any]] = {
            (NC, "get"): self.get,
            (NC, "get-config"): self.get_config,
            (NC, "edit-config"): self.edit_config,
            (NC, "copy-config"): self.copy_config,
            (NC, "delete-config"): self.delete_config,
            (NC, "lock"): self.lock,
            (NC, "unlock"): self.unlock,
            (NC, "validate"): self.validate,
            (NC, "commit"): self.commit,
            (NC, "cancel-commit"): self.cancel_commit,
            (NC, "discard-changes"): self.discard_changes,
            (NC, "close-session"): lambda s, op: None,
            (NC, "kill-session"): self.kill_session,
            (monitoring.NCM_NS, "get-schema"): lambda s, op: monitoring.get_schema(op, self.modules),
            (notifications.NOTIF_NS, "create-subscription"): self.create_subscription,
        }

    # --- server interface ---------------------------------------------------------

    def capabilities(self) -> list[str]:
        """Read from the module files once: every <get> lists them (netconf-state)."""
        if self._caps is None:
            caps = list(BASE_CAPS)
            for m in self.modules:
                ns, _ = m.read_header()
                features = yangdata.MODULES.get(m.name, ())  # RFC 6020 5.6.4: the features implemented
                caps.append(f"{ns}?module={m.name}" + (f"&revision={m.revision}" if m.revision else "")
                            + (f"&features={','.join(features)}" if features else ""))
            self._caps = caps
        return list(self._caps)

    def handler(self, namespace: str, name: str) -> Callable[[Any, etree._Element], Any] | None:
        """The operation's handler, behind a check of its input against the operation's YANG
        (ietf-netconf's types for the base operations) when libyang has its module."""
        h = self._handlers.get((namespace, name))
        if h is None or namespace not in yangdata.namespaces():
            return h
        return functools.partial(self._checked, h)

    @staticmethod
    def _checked(h: Callable[[Any, etree._Element], Any], session: Any, op: etree._Element) -> Any:
        op = notifications.subscription_input(op)
        try:
            yangdata.check_rpc(op)
        except yangdata.YangError as exc:
            raise errors.from_yang(exc, error_type="protocol") from None
        return h(session, op)

    def session_ended(self, session_id: int) -> None:
        self.hub.unsubscribe(session_id)
        self.datastores.session_ended(session_id)

    # --- reading --------------------------------------------------------------------

    def operational(self) -> list[etree._Element]:
        """Running config with live state from the drivers, and /netconf-state."""
        live = copy.deepcopy(self.datastores.running_config().json)  # state goes into a copy
        self.fill_state(live)
        sessions = self.sessions()
        stats: dict[str, Any] = {"start": self.started, **self.server_stats()}
        for s in sessions:
            for k, v in s.counters.items():
                stats[k] = stats.get(k, 0) + v
        live["ietf-netconf-monitoring"] = monitoring.netconf_state(
            self.capabilities(), self.modules, dict(self.datastores.locks), sessions, stats)
        live["nc-notifications"] = self.hub.streams()
        return self.models.operational(live)

    def get(self, session: Any, op: etree._Element) -> list[etree._Element]:
        filt, mode = _filter(op), _with_defaults(op)
        data = self.models.with_defaults(self.operational(), mode, config=False)
        return _data(subtree.apply(data, filt, self.models.list_keys))

    def get_config(self, session: Any, op: etree._Element) -> list[etree._Element]:
        source = _datastore_name(op.find(_q("source")), "source", ("running", "candidate", "startup"))
        filt, mode = _filter(op), _with_defaults(op)
        data = self.models.with_defaults(self.datastores.get(source), mode, config=True)
        return _data(subtree.apply(data, filt, self.models.list_keys))

    # --- writing --------------------------------------------------------------------

    def edit_config(self, session: Any, op: etree._Element) -> None:
        target = _datastore_name(op.find(_q("target")), "target", ("running", "candidate"))
        default_op = _text(op, "default-operation") or "merge"
        test_option = _text(op, "test-option") or "test-then-set"
        if test_option not in ("test-then-set", "set", "test-only"):
            raise errors.protocol(errors.InvalidValue, f"unknown test-option '{test_option}'", info={"bad-element": "test-option"})
        error_option = _text(op, "error-option") or "stop-on-error"
        if error_option not in ("stop-on-error", "continue-on-error", "rollback-on-error"):
            raise errors.protocol(errors.InvalidValue, f"unknown error-option '{error_option}'", info={"bad-element": "error-option"})
        config = op.find(_q("config"))
        if config is None:
            if op.find(_q("url")) is not None:
                raise errors.OperationNotSupported("<url> is not supported (no :url capability)")
            raise errors.protocol(errors.MissingElement, "edit-config needs <config>", info={"bad-element": "config"})
        self.datastores.edit(target, config, session.session_id, default_op, test_option, error_option)

    def _source(self, op: etree._Element) -> list[etree._Element]:
        src = op.find(_q("source"))
        inline = src.find(_q("config")) if src is not None else None
        if inline is not None:
            return [c for c in inline if isinstance(c.tag, str)]
        if src is not None and src.find(_q("url")) is not None:
            raise errors.OperationNotSupported("<url> is not supported (no :url capability)")
        return self.datastores.get(_datastore_name(src, "source", ("running", "candidate", "startup")))

    def copy_config(self, session: Any, op: etree._Element) -> None:
        """<with-defaults> is accepted (libyang checks its value) and has no effect: RFC 6243
        gives it a meaning for a <url> target, and there is no :url here."""
        target = _datastore_name(op.find(_q("target")), "target", ("running", "candidate", "startup"))
        self.datastores.copy(self._source(op), target, session.session_id)

    def delete_config(self, session: Any, op: etree._Element) -> None:
        _datastore_name(op.find(_q("target")), "target", ("startup",))
        self.datastores.delete_startup(session.session_id)

    def lock(self, session: Any, op: etree._Element) -> None:
        self.datastores.lock_target(_datastore_name(op.find(_q("target")), "target", ("running", "candidate", "startup")), session.session_id)

    def unlock(self, session: Any, op: etree._Element) -> None:
        self.datastores.unlock_target(_datastore_name(op.find(_q("target")), "target", ("running", "candidate", "startup")), session.session_id)

    def validate(self, session: Any, op: etree._Element) -> None:
        self.datastores.check(self._source(op))

    def commit(self, session: Any, op: etree._Element) -> None:
        confirmed = op.find(_q("confirmed")) is not None
        timeout_text = _text(op, "confirm-timeout")
        timeout = int(timeout_text) if timeout_text is not None else 600  # a uint32 1..max: checked by libyang
        self.datastores.commit(session.session_id, confirmed=confirmed, timeout=timeout, persist=_text(op, "persist"), persist_id=_text(op, "persist-id"))

    def cancel_commit(self, session: Any, op: etree._Element) -> None:
        self.datastores.cancel_commit(session.session_id, _text(op, "persist-id"))

    def discard_changes(self, session: Any, op: etree._Element) -> None:
        self.datastores.discard_changes(session.session_id)

    def kill_session(self, session: Any, op: etree._Element) -> None:
        text = _text(op, "session-id")
        if not text or not text.isdigit():
            raise errors.protocol(errors.MissingElement, "kill-session needs a session-id", info={"bad-element": "session-id"})
        sid = int(text)
        if sid == session.session_id:
            raise errors.InvalidValue("a session cannot kill itself (use close-session)", info={"bad-element": "session-id"})
        victim = next((s for s in self.sessions() if s.session_id == sid), None)
        if victim is None:
            raise errors.InvalidValue(f"no session {sid}", info={"bad-element": "session-id"})
        victim.close()

    def create_subscription(self, session: Any, op: etree._Element) -> None:
        ns = notifications.NOTIF_NS
        stream = op.findtext(f"{{{ns}}}stream") or notifications.STREAM
        filt = op.find(f"{{{ns}}}filter")
        if filt is not None and filt.get("type", "subtree") != "subtree":
            raise errors.protocol(errors.BadAttribute, "only subtree filters are supported", info={"bad-attribute": "type", "bad-element": "filter"})
        start = op.findtext(f"{{{ns}}}startTime")
        stop = op.findtext(f"{{{ns}}}stopTime")
        replay = self.hub.subscribe(
            session,
            stream.strip(),
            filt,
            notifications.parse_time(start, "startTime") if start else None,
            notifications.parse_time(stop, "stopTime") if stop else None,
        )
        if replay is not None:
            session.after_reply.append(replay)
