"""One agent managed over RESTCONF (RFC 8040) instead of NETCONF: the same Southbound as
southbound/agent.py, over HTTPS with httpx.

- Encoding: application/yang-data+json (RFC 7951), read and written through libyang
  (sdqkd.yangdata), so what the controller holds is the XML it holds for a NETCONF agent:
  `data` is a <data> element, notifications are their content element, and the topology
  builder, reconciliation and the notification handlers never know which protocol a node
  speaks.
- Authentication: HTTP basic with the node's NETCONF user and password; the agent's
  certificate is checked against `restconf_ca`.
- Session life: the event stream is the session. On each (re)connect the NETCONF stream's
  location is read from ietf-restconf-monitoring (RFC 8040 9.2), the stream opened with
  Accept: text/event-stream (RFC 8040 6.3), then the agent read in full (resync: nothing
  notified in between is missed), as the NETCONF side subscribes then <get>s. The agent is
  up while that stream is open; when it ends (the agent died or restarted) on_lost runs and
  it is reconnected with the same backoff.
- Errors: an HTTP error answer is raised as the RPCError its ietf-restconf:errors stands
  for (southbound/errors.py); a request while the stream is down raises AgentUnavailable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from lxml import etree

from sdqkd import yangdata
from sdqkd.controller.southbound.errors import AgentUnavailable, from_response
from sdqkd.controller.southbound.interface import AgentAddress
from sdqkd.controller.southbound.keeper import BACKOFF, SessionKeeper
from sdqkd.controller.southbound.ops import NC_NS, Edit
from sdqkd.controller.southbound.restconf_txn import RestconfHop

log = logging.getLogger(__name__)

YANG_JSON = "application/yang-data+json"
# The events, and an error about the stream request in JSON (RFC 8040 6.3, RFC 7231 5.3.2).
EVENTS_ACCEPT = f"text/event-stream, {YANG_JSON};q=0.5"
STREAMS = "data/ietf-restconf-monitoring:restconf-state/streams"


def xml_data(doc: dict[str, Any], *, config: bool) -> etree._Element:
    """An RFC 7951 datastore document as the <data> a NETCONF <get>/<get-config> answers,
    type-checked by libyang; members of modules the controller does not load (RESTCONF's own
    monitoring, the YANG library) are left out, as they are of no use to it."""
    doc = doc.get("ietf-restconf:data", doc)
    known = {k: v for k, v in doc.items() if k.split(":", 1)[0] in yangdata.MODULES}
    data = etree.Element(f"{{{NC_NS}}}data", nsmap={None: NC_NS})
    data.extend(yangdata.encode_json_xml(known, config=config) if known else [])
    return data


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The `data` of each event of a text/event-stream (HTML Living Standard 9.2.6: `data:`
    lines joined by newlines, an event ended by a blank line, `:` comments and other fields
    ignored)."""
    buf: list[str] = []
    for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            buf.append(value[1:] if value.startswith(" ") else value)
    if buf:
        yield "\n".join(buf)


def notification_content(event: str) -> etree._Element | None:
    """An RFC 8040 6.4 event's notification, JSON or XML, as the content element of the
    NETCONF <notification> it stands for (eventTime left out, as the NETCONF pump does)."""
    event = event.strip()
    if event.startswith("<"):
        root = etree.fromstring(event.encode())
        return next((c for c in root if isinstance(c.tag, str) and etree.QName(c).localname != "eventTime"), None)
    body = json.loads(event).get("ietf-restconf:notification", {})
    content = {k: v for k, v in body.items() if k != "eventTime"}
    return yangdata.notification(content) if content else None


class RestconfConnection(SessionKeeper):
    """An agent over RESTCONF: the event stream is the session (southbound/keeper.py)."""

    closed_reason = "event stream closed"

    def __init__(self, addr: AgentAddress, on_state: Callable[[Any], None],
                 on_notification: Callable[[Any, etree._Element], None],
                 backoff: tuple[float, float] = BACKOFF,
                 on_lost: Callable[[Any], None] | None = None,
                 on_up: Callable[[Any], None] | None = None) -> None:
        if not addr.restconf_url:
            raise ValueError(f"agent {addr.name}: no RESTCONF url")
        super().__init__(addr, on_state, on_notification, backoff, on_lost, on_up)
        self._live = threading.Event()  # the stream open: requests may go
        self._stream: httpx.Response | None = None
        self._location = ""
        a = addr
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=a.restconf_ca) if a.restconf_ca else True
        self.client = self._client(verify, timeout=httpx.Timeout(30.0))
        self._events = self._client(verify, timeout=httpx.Timeout(30.0, read=None))  # a stream idles between events

    def _client(self, verify: ssl.SSLContext | bool, timeout: httpx.Timeout) -> httpx.Client:
        a = self.addr
        root = str(a.restconf_url).rstrip("/") + "/"
        return httpx.Client(base_url=root, verify=verify, auth=(a.username, a.password or ""), timeout=timeout,
                            headers={"Accept": YANG_JSON})

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            # the reader blocks in recv(): closing the response from here would not wake it
            ns = stream.extensions.get("network_stream")
            sock = ns.get_extra_info("socket") if ns is not None else None
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already gone
                pass
        self._join()
        self._events.close()
        self.client.close()

    # --- requests ---------------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None,
                headers: dict[str, str] | None = None, ok_missing: bool = False) -> httpx.Response:
        """One RESTCONF request (path below the RESTCONF root, e.g. data/...); an error answer
        raised as its RPCError (with `ok_missing`, a target that does not exist is an
        answer: DELETE as NETCONF's "remove")."""
        if not self._live.is_set():
            raise AgentUnavailable(f"agent {self.addr.name} is not connected")
        hdrs = dict(headers or {})
        content = None
        if body is not None:
            hdrs["Content-Type"] = YANG_JSON
            content = json.dumps(body).encode()
        r = self.client.request(method, path, params=params, content=content, headers=hdrs)
        if r.status_code >= 400 and not (ok_missing and r.status_code == 404):
            err = from_response(r)
            if not (ok_missing and err.tag == "data-missing"):  # RFC 8040 4.7: 409 data-missing
                raise err
        return r

    def get_json(self, path: str = "data", content: str | None = None) -> tuple[dict[str, Any], str | None]:
        """A resource's RFC 7951 JSON and its entity-tag (RFC 8040 3.4.1.1)."""
        r = self.request("GET", path, params={"content": content} if content else None)
        return (r.json() if r.content else {}), r.headers.get("etag")

    def get_config(self) -> etree._Element:
        doc, _ = self.get_json("data", content="config")
        return xml_data(doc, config=True)

    def begin(self, txn_id: str, edits: list[Edit]) -> RestconfHop:
        return RestconfHop(self, txn_id, edits)

    # --- session life -------------------------------------------------------------------------

    def _stream_location(self) -> str:
        """Where the NETCONF event stream is served (ietf-restconf-monitoring), JSON preferred."""
        r = self.client.get(STREAMS)
        if r.status_code >= 400:
            raise from_response(r)
        streams = r.json().get("ietf-restconf-monitoring:streams", {}).get("stream", [])
        stream = next((s for s in streams if s.get("name") == "NETCONF"), streams[0] if streams else None)
        if stream is None:
            raise AgentUnavailable(f"agent {self.addr.name} serves no event stream")
        access = {a.get("encoding"): a.get("location") for a in stream.get("access", [])}
        location = access.get("json") or access.get("xml")
        if not location:
            raise AgentUnavailable(f"agent {self.addr.name}: stream {stream.get('name')} has no location")
        return str(location)

    @contextlib.contextmanager
    def _session(self) -> Iterator[httpx.Response]:
        location = self._stream_location()
        with self._events.stream("GET", location, headers={"Accept": EVENTS_ACCEPT}) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise from_response(resp)
            self._stream, self._location = resp, location
            self._live.set()
            self.resync()
            yield resp

    def _describe(self, resp: httpx.Response) -> str:
        return f" over RESTCONF ({self._location})"

    def _dropped(self) -> None:
        self._stream = None
        self._live.clear()

    def _pump(self, resp: httpx.Response) -> None:
        for event in sse_events(resp.iter_lines()):
            if self._stop.is_set():
                return
            try:
                content = notification_content(event)
                if content is not None:
                    self.on_notification(self, content)
            except Exception:  # noqa: BLE001 - a failing handler (or an event libyang refuses) is contained
                log.exception("notification from %s not handled", self.addr.name)

    def resync(self) -> None:
        """Read the whole datastore (config and state) of the agent; one read at a time, so an
        older answer never replaces a newer one."""
        with self._read_lock:
            doc, _ = self.get_json("data")
            self.data = xml_data(doc, config=False)
            self.on_state(self)

    def refresh(self) -> None:
        """Re-read the agent (HTTP requests do not queue behind each other: no second session
        is needed, unlike NETCONF's)."""
        self.resync()
