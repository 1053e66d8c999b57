"""The sdqkd.v1.Controller gRPC service: translate, call the Controller, map errors.

Each RPC resolves names (a node by name or qkdn_id; ComputePath also takes an SAE),
calls one Controller operation and converts its result to messages. Nothing here
decides anything about the network.

Error mapping (ControllerError kind -> status code):
  invalid -> INVALID_ARGUMENT, not-found -> NOT_FOUND, conflict -> ALREADY_EXISTS,
  no-path -> FAILED_PRECONDITION: the request is well formed and names known things, but
  the network as it is now cannot carry it (a retry may succeed once links come up);
  NOT_FOUND is kept for names that do not exist;
  exhausted -> RESOURCE_EXHAUSTED: a path exists but not the rate asked, with what other
  applications hold; the best offer goes with it, an AdmissionRefusal in the trailing
  metadata key REFUSAL_KEY (a client renegotiates from it, no parsing of the message);
  failed (provisioning) -> by the NETCONF error-tag of the hop that refused, as STYLE.md
  says: invalid-value -> INVALID_ARGUMENT, data-missing -> NOT_FOUND, lock-denied and
  in-use -> ABORTED, resource-denied -> RESOURCE_EXHAUSTED, anything else -> INTERNAL;
  unavailable (an agent unreachable or dead mid-transaction, named in the message; nothing
  left half-configured) -> UNAVAILABLE, which clients retry.
An unexpected exception is logged with its traceback and answered INTERNAL with a fixed
message, never str(exc).
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from sdqkd.controller import store as svc
from sdqkd.controller.controller import Controller, ControllerError, Event
from sdqkd.controller.northbound import sdqkd_pb2 as pb
from sdqkd.controller.northbound import sdqkd_pb2_grpc as pb_grpc
from sdqkd.controller.pathcomp.optical import OpticalRequest
from sdqkd.controller.pathcomp.relay import RelayPlan
from sdqkd.controller.topology.model import FibreEnd, Topology
from sdqkd.tapi.context import to_tapi_text

log = logging.getLogger(__name__)

S = grpc.StatusCode
KIND_STATUS = {"invalid": S.INVALID_ARGUMENT, "not-found": S.NOT_FOUND, "no-path": S.FAILED_PRECONDITION,
               "conflict": S.ALREADY_EXISTS, "exhausted": S.RESOURCE_EXHAUSTED, "unavailable": S.UNAVAILABLE}
REFUSAL_KEY = "sdqkd-admission-refusal-bin"  # trailing metadata: a serialized pb.AdmissionRefusal
SEVERITY = {"WARNING": pb.Alarm.WARNING, "MINOR": pb.Alarm.MINOR, "MAJOR": pb.Alarm.MAJOR, "CRITICAL": pb.Alarm.CRITICAL}
DISJOINT_MODE = {pb.Disjointness.LINK: "link", pb.Disjointness.NODE: "node"}
TAG_STATUS = {"invalid-value": S.INVALID_ARGUMENT, "data-missing": S.NOT_FOUND, "lock-denied": S.ABORTED,
              "in-use": S.ABORTED, "resource-denied": S.RESOURCE_EXHAUSTED}

F = TypeVar("F", bound=Callable[..., Any])


class RequestError(Exception):
    """A request the servicer itself refuses before calling the Controller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(exc: ControllerError) -> grpc.StatusCode:
    """The status code for a Controller refusal (see the module docstring)."""
    if exc.kind == "failed":
        tag = exc.tag
        return TAG_STATUS.get(tag or "", S.INTERNAL)
    return KIND_STATUS.get(exc.kind, S.INTERNAL)


def refusal_message(offer: dict[str, Any]) -> pb.AdmissionRefusal:
    """The best offer of an `exhausted` refusal as its message (paths without node names)."""
    return pb.AdmissionRefusal(
        requested_bps=offer.get("requested_bps", 0.0), best_bps=offer.get("best_bps", 0.0),
        maxflow_bps=offer.get("maxflow_bps", 0.0), unreserved_maxflow_bps=offer.get("unreserved_maxflow_bps", 0.0),
        best_paths=[pb.RelayPath(nodes=[pb.NodeRef(qkdn_id=n) for n in p["nodes"]], links=list(p["links"]), bps=p["bps"])
                    for p in offer.get("best_paths", [])])


def _abort(context: grpc.ServicerContext, exc: Exception, rpc: str) -> None:
    if isinstance(exc, ControllerError):
        if exc.offer is not None:
            context.set_trailing_metadata(((REFUSAL_KEY, refusal_message(exc.offer).SerializeToString()),))
        context.abort(status_for(exc), exc.message)
    if isinstance(exc, RequestError):
        context.abort(exc.code, exc.message)
    log.exception("%s failed", rpc)
    context.abort(S.INTERNAL, f"{rpc}: internal error (see the controller log)")


def _rpc(fn: F) -> F:
    """Map exceptions to status codes, for unary and server-streaming methods alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                _abort(context, exc, fn.__name__)
        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            _abort(context, exc, fn.__name__)
    return unary  # type: ignore[return-value]


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


# --- model -> messages ------------------------------------------------------------------


def _fibre_end(e: FibreEnd) -> pb.FibreEnd:
    return pb.FibreEnd(node=e.node, switch=e.switch or "", port=e.port,
                       mux_ports=[pb.MuxPort(port=p, channels=sorted(c)) for p, c in e.mux_ports])


def topology_message(topo: Topology) -> pb.Topology:
    """The controller's snapshot, field for field."""
    out = pb.Topology()
    for n in sorted(topo.nodes.values(), key=lambda n: n.qkdn_id):
        out.nodes.add(qkdn_id=n.qkdn_id, name=n.name, domain=n.domain or "", kms=n.kms, up=n.up, qrng_state=n.qrng_state or "")
    for i in sorted(topo.interfaces.values(), key=lambda i: i.key):
        out.interfaces.add(node=i.node, qkdi_id=i.qkdi_id, technology=i.technology, band=i.band, roles=sorted(i.roles),
                           channels=sorted(i.channels), max_absorption=i.max_absorption, switch=i.switch or "",
                           port=i.port, fixed_channel=i.fixed_channel, up=i.up)
    for lk in sorted(topo.links.values(), key=lambda lk: lk.qkdl_id):
        out.links.add(qkdl_id=lk.qkdl_id, a=lk.a, a_if=lk.a_if, b=lk.b, b_if=lk.b_if, status=lk.status, skr=lk.skr,
                      qber=lk.qber, key_bits=lk.key_bits, channel=lk.channel, fibres=list(lk.fibres),
                      stock=[pb.LinkKeyStock(node=st.node, stored_keys=st.keys, stored_bits=st.bits, local_keys=st.local_keys,
                                             key_size=st.key_size, limit_keys=st.limit_keys) for st in lk.stock])
    for f in sorted(topo.fibres.values(), key=lambda f: f.name):
        out.fibres.add(
            name=f.name, loss_db=f.loss_db, length_km=f.length_km,
            a=_fibre_end(f.a), b=_fibre_end(f.b),
            classical=[pb.ClassicalChannel(channel=c.channel, band=c.band) for c in f.classical],
            mux_channels=sorted(f.mux_channels), quantum_in_use=sorted(f.quantum_in_use))
    for s in sorted(topo.switches.values(), key=lambda s: s.name):
        out.switches.add(name=s.name, node=s.node, ports=s.ports, insertion_loss=s.insertion_loss,
                         cross_connects=[pb.CrossConnect(port_a=a, port_b=b) for a, b in s.cross_connects])
    return out


class ControllerServicer(pb_grpc.ControllerServicer):
    """One instance per server; thread-safe because the Controller is."""

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller

    # --- names ------------------------------------------------------------------------------

    def _node(self, ref: str, what: str = "node") -> str:
        """qkdn_id of the node called `ref` (a name or a qkdn_id)."""
        if not ref:
            raise RequestError(S.INVALID_ARGUMENT, f"{what} is required")
        topo = self.ctl.topology()
        if ref.lower() in topo.nodes:
            return ref.lower()
        try:
            return topo.node_by_name(ref).qkdn_id
        except KeyError:
            raise RequestError(S.NOT_FOUND, f"unknown {what} '{ref}'") from None

    def _endpoint(self, ref: str, what: str) -> str:
        """A node by name or qkdn_id, else the node of SAE `ref`."""
        try:
            return self._node(ref, what)
        except RequestError as exc:
            if exc.code != S.NOT_FOUND:
                raise
            if ref not in self.ctl.cfg.saes:
                raise RequestError(S.NOT_FOUND, f"unknown {what} '{ref}' (neither a node nor an SAE)") from None
            return self.ctl.node_of_sae(ref)

    def _ref(self, qkdn_id: str, topo: Topology) -> pb.NodeRef:
        node = topo.nodes.get(qkdn_id)
        return pb.NodeRef(qkdn_id=qkdn_id, name=node.name if node else "")

    def _if(self, key: tuple[str, int], topo: Topology) -> pb.InterfaceRef:
        return pb.InterfaceRef(node=key[0], qkdi_id=int(key[1]), node_name=self._ref(key[0], topo).name)

    def _path(self, nodes: list[str], links: list[str], bps: float, vlink: str | None, topo: Topology,
              reserved: float = 0.0) -> pb.RelayPath:
        return pb.RelayPath(nodes=[self._ref(n, topo) for n in nodes], links=links, vlink=vlink or "", bps=bps,
                            reserved_bps=reserved)

    def _app(self, app: svc.Application) -> pb.Application:
        topo = self.ctl.topology()
        return pb.Application(
            app_id=app.app_id, master_sae=app.master_sae, slave_sae=app.slave_sae, state=app.state,
            src=self._ref(app.src, topo), dst=self._ref(app.dst, topo),
            paths=[self._path(p["nodes"], p["links"], p["bps"], p.get("vlink"), topo, p.get("reserved") or 0.0)
                   for p in app.paths],
            qos=pb.Qos(min_bps=app.min_bps, max_bps=app.max_bps, ttl=app.ttl, priority=app.priority),
            created=_ts(app.created),
            delivery=[self._delivery(qid, d, topo) for qid, d in self.ctl.app_delivery(app)])

    def _delivery(self, qid: str, d: dict[str, Any], topo: Topology) -> pb.AppKeyDelivery:
        out = pb.AppKeyDelivery(node=self._ref(qid, topo), key_requests=d["requests"], keys_delivered=d["keys"],
                                bits_delivered=d["bits"], rate_bps=d["rate"], rate_window_s=d["window"],
                                available_keys=d["available_keys"], available_bits=d["available_bits"])
        if d.get("since"):
            out.since.FromJsonString(d["since"])
        return out

    def _channel(self, ch: svc.Channel) -> pb.Channel:
        topo = self.ctl.topology()
        return pb.Channel(chan_id=ch.chan_id, tx=self._if(ch.tx, topo), rx=self._if(ch.rx, topo), channel=ch.channel,
                          loss_db=ch.loss_db, fibres=list(ch.fibres), created=_ts(ch.created),
                          hops=[pb.Hop(switch=sw, port_in=pin, port_out=pout) for sw, pin, pout in ch.hops])

    # --- applications -------------------------------------------------------------------------

    def _avoid(self, links: Iterable[str]) -> frozenset[str]:
        """avoid_links, every one a link the controller knows: a typo would otherwise avoid nothing."""
        avoid = frozenset(x.lower() for x in links)
        unknown = sorted(avoid - self.ctl.known_links()) if avoid else []
        if unknown:
            raise RequestError(S.INVALID_ARGUMENT, f"avoid_links names unknown links: {', '.join(unknown)}")
        return avoid

    @staticmethod
    def _rate(value: float, what: str) -> float:
        if not math.isfinite(value) or value < 0:
            raise RequestError(S.INVALID_ARGUMENT, f"{what} must be a finite number >= 0, not {value}")
        return value

    @_rpc
    def CreateApplication(self, request: pb.CreateApplicationRequest, context: grpc.ServicerContext) -> pb.Application:
        q = request.qos
        min_bps, max_bps = self._rate(q.min_bps, "qos.min_bps"), self._rate(q.max_bps, "qos.max_bps")
        if max_bps and min_bps > max_bps:
            raise RequestError(S.INVALID_ARGUMENT, f"qos.min_bps ({min_bps:g}) exceeds qos.max_bps ({max_bps:g})")
        app_id = None
        if request.HasField("app_id"):
            try:
                app_id = str(uuid.UUID(request.app_id))
            except ValueError:
                raise RequestError(S.INVALID_ARGUMENT, f"app_id must be a UUID, not {request.app_id!r}") from None
        disjoint = []
        for d in request.disjoint_from:
            if not d.app_id:
                raise RequestError(S.INVALID_ARGUMENT, "disjoint_from needs an app_id")
            disjoint.append((d.app_id, DISJOINT_MODE[d.mode]))
        app = self.ctl.create_application(
            request.master_sae, request.slave_sae, min_bps=min_bps, max_bps=max_bps, ttl=q.ttl, priority=q.priority,
            app_id=app_id, avoid_links=self._avoid(request.avoid_links), disjoint_from=tuple(disjoint))
        return self._app(app)

    @_rpc
    def DeleteApplication(self, request: pb.DeleteApplicationRequest,
                          context: grpc.ServicerContext) -> pb.DeleteApplicationResponse:
        self.ctl.delete_application(request.app_id)
        return pb.DeleteApplicationResponse()

    @_rpc
    def ListApplications(self, request: pb.ListApplicationsRequest,
                         context: grpc.ServicerContext) -> pb.ListApplicationsResponse:
        return pb.ListApplicationsResponse(applications=[self._app(a) for a in self.ctl.store.apps()])

    @_rpc
    def ComputePath(self, request: pb.ComputePathRequest, context: grpc.ServicerContext) -> pb.PathPlan:
        min_bps = self._rate(request.min_bps, "min_bps")
        src, dst = self._endpoint(request.src, "source"), self._endpoint(request.dst, "destination")
        plan: RelayPlan = self.ctl.compute_relay(src, dst, min_bps, self._avoid(request.avoid_links))
        topo = self.ctl.topology()
        paths = [self._path(list(p.nodes), list(p.links), p.bps, None, topo) for p in plan.paths]
        return pb.PathPlan(src=self._ref(src, topo), dst=self._ref(dst, topo), paths=paths,
                           total_bps=plan.total_bps, maxflow_bps=plan.maxflow_bps)

    # --- direct quantum channels ------------------------------------------------------------------

    def _optical_request(self, request: pb.CreateChannelRequest | pb.ComputeChannelRequest) -> OpticalRequest:
        """The request's interfaces or nodes and wavelength; same-node pairs and channels off the
        grid are INVALID_ARGUMENT."""
        by_if, by_node = (request.HasField("tx"), request.HasField("rx")), (bool(request.src), bool(request.dst))
        wavelength = request.wavelength if request.HasField("wavelength") else None
        if wavelength is not None and not 1 <= wavelength <= 96:
            raise RequestError(S.INVALID_ARGUMENT, f"wavelength must be a DWDM channel 1..96, not {wavelength}")
        if by_if == (True, True) and by_node == (False, False):
            tx = (self._node(request.tx.node, "tx node"), request.tx.qkdi_id)
            rx = (self._node(request.rx.node, "rx node"), request.rx.qkdi_id)
            if tx[0] == rx[0]:
                raise RequestError(S.INVALID_ARGUMENT, "tx and rx are on the same node: a quantum channel joins two nodes")
            return OpticalRequest(tx=tx, rx=rx, channel=wavelength)
        if by_node == (True, True) and by_if == (False, False):
            src, dst = self._node(request.src, "source"), self._node(request.dst, "destination")
            if src == dst:
                raise RequestError(S.INVALID_ARGUMENT, "source and destination are the same node")
            return OpticalRequest(src=src, dst=dst, channel=wavelength)
        raise RequestError(S.INVALID_ARGUMENT, "give either tx and rx, or src and dst")

    @_rpc
    def CreateChannel(self, request: pb.CreateChannelRequest, context: grpc.ServicerContext) -> pb.Channel:
        req = self._optical_request(request)
        ch = self.ctl.create_channel(req, request.chan_id if request.HasField("chan_id") else None)
        return self._channel(ch)

    @_rpc
    def ComputeChannel(self, request: pb.ComputeChannelRequest, context: grpc.ServicerContext) -> pb.ChannelPlan:
        req = self._optical_request(request)
        options = self.ctl.compute_channel(req, request.max_alternatives or None)
        topo = self.ctl.topology()
        return pb.ChannelPlan(options=[
            pb.ChannelOption(tx=self._if(p.tx, topo), rx=self._if(p.rx, topo), channel=p.channel, loss_db=p.loss_db,
                             fibres=list(p.fibres), expected_skr=rate, busy=busy,
                             hops=[pb.Hop(switch=sw, port_in=pin, port_out=pout) for sw, pin, pout in p.hops])
            for p, rate, busy in options])

    @_rpc
    def DeleteChannel(self, request: pb.DeleteChannelRequest, context: grpc.ServicerContext) -> pb.DeleteChannelResponse:
        self.ctl.delete_channel(request.chan_id)
        return pb.DeleteChannelResponse()

    @_rpc
    def ListChannels(self, request: pb.ListChannelsRequest, context: grpc.ServicerContext) -> pb.ListChannelsResponse:
        return pb.ListChannelsResponse(channels=[self._channel(c) for c in self.ctl.store.channels()])

    # --- view and events ----------------------------------------------------------------------------

    @_rpc
    def GetTopology(self, request: pb.GetTopologyRequest, context: grpc.ServicerContext) -> pb.GetTopologyResponse:
        topo = self.ctl.topology()
        if request.format == pb.GetTopologyRequest.TAPI:
            return pb.GetTopologyResponse(tapi_context_json=to_tapi_text(topo, self.ctl.store.channels()))
        return pb.GetTopologyResponse(topology=topology_message(topo))

    @_rpc
    def StreamEvents(self, request: pb.StreamEventsRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        stop = threading.Event()
        context.add_callback(stop.set)  # the client went away or the server stops
        kinds = set(request.kinds)
        ev: Event
        for ev in self.ctl.events(stop):
            if not kinds or ev.kind in kinds:
                yield pb.Event(kind=ev.kind, data_json=json.dumps(ev.data, sort_keys=True, default=str), time=_ts(ev.at))

    @_rpc
    def ListReservations(self, request: pb.ListReservationsRequest,
                         context: grpc.ServicerContext) -> pb.ListReservationsResponse:
        topo = self.ctl.topology()
        out = pb.ListReservationsResponse()
        for r in self.ctl.reservations(frozenset(x.lower() for x in request.links)):
            out.links.add(qkdl_id=r["qkdl_id"], a=self._ref(r["a"], topo), b=self._ref(r["b"], topo), status=r["status"],
                          capacity_bps=r["capacity_bps"], reserved_bps=r["reserved_bps"], available_bps=r["available_bps"],
                          reservations=[pb.LinkReservation(app_id=a, bps=b) for a, b in r["reservations"]])
        return out

    @_rpc
    def ListAlarms(self, request: pb.ListAlarmsRequest, context: grpc.ServicerContext) -> pb.ListAlarmsResponse:
        return pb.ListAlarmsResponse(alarms=[
            pb.Alarm(kind=a.kind, resource=a.resource, severity=SEVERITY[a.severity], since=_ts(a.since), text=a.text)
            for a in self.ctl.alarm_list()])
