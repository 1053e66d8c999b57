"""Immutable topology snapshot: what path computation reads.

Every object is a frozen dataclass, so a snapshot can be shared between threads and
cached structures derived from it (graphs) never go stale: a change makes a new
snapshot (`Topology.replace`). Ids follow ETSI GS QKD 015 (qkdn_id, qkdi_id, qkdl_id);
fibre ends and interfaces name their node by qkdn_id.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import networkx as nx

TRANSMITTER = "TRANSMITTER"
RECEIVER = "RECEIVER"
ROLES = frozenset({TRANSMITTER, RECEIVER})
BANDS = frozenset({"O-band", "C-band"})
ACTIVE = "ACTIVE"

T = TypeVar("T")


@dataclass(frozen=True)
class Node:
    """An SD-QKD node. kms=False: a relay-only node, which forwards keys but serves no application."""

    qkdn_id: str
    name: str
    domain: str | None = None
    kms: bool = True
    up: bool = True
    qrng_state: str | None = None  # sdqkd-qrng state; None: no QRNG


@dataclass(frozen=True)
class QkdInterface:
    """One QKD module. switch/port: where its fibre is patched (ETSI 015 qkdi_att_point);
    None means it sits on a fixed fibre to its peer (plugged, when the inventory says which). channels: DWDM channels it can be tuned
    to (empty: fixed or O-band); max_absorption: the receiver's loss budget in dB."""

    node: str
    qkdi_id: int
    technology: str
    band: str
    roles: frozenset[str]
    channels: frozenset[int]
    max_absorption: float
    switch: str | None = None
    port: int | None = None
    fixed_channel: int | None = None
    up: bool = True
    plugged: tuple[str, ...] = ()  # unswitched: the fibres it is plugged into (the plant's record)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plugged", tuple(self.plugged))
        object.__setattr__(self, "roles", frozenset(self.roles))
        object.__setattr__(self, "channels", frozenset(int(c) for c in self.channels))
        if not self.roles <= ROLES:
            raise ValueError(f"interface {self.key}: unknown roles {sorted(self.roles - ROLES)}")
        if self.band not in BANDS:
            raise ValueError(f"interface {self.key}: band must be one of {sorted(BANDS)}")
        if (self.switch is None) != (self.port is None):
            raise ValueError(f"interface {self.key}: switch and port go together")

    @property
    def key(self) -> tuple[str, int]:
        return (self.node, self.qkdi_id)

    def wavelengths(self) -> frozenset[int]:
        """The channels it can use now: its fixed channel if set, else its tunable range."""
        return frozenset({self.fixed_channel}) if self.fixed_channel is not None else self.channels


@dataclass(frozen=True)
class KeyStock:
    """Link keys one end of a PHYS link holds (its agent's sdqkd-key-stock), as last read:
    counts and sizes, never a key."""

    node: str  # qkdn_id
    keys: int
    bits: int
    local_keys: int = 0
    key_size: int = 0
    limit_keys: int = 0


@dataclass(frozen=True)
class QkdLink:
    """An existing PHYS QKD link: the key source for relaying. skr in bit/s, as measured."""

    qkdl_id: str
    a: str
    a_if: int
    b: str
    b_if: int
    status: str = ACTIVE
    skr: float = 0.0
    qber: float | None = None
    key_bits: int = 0  # what both ends hold: the smaller of their stocks' bits
    channel: int | None = None
    fibres: tuple[str, ...] = ()
    stock: tuple[KeyStock, ...] = ()

    @property
    def active(self) -> bool:
        return self.status == ACTIVE


@dataclass(frozen=True)
class ClassicalChannel:
    """A classical DWDM channel on a fibre; channel None when its number is not known."""

    channel: int | None
    band: str = "C-band"


@dataclass(frozen=True)
class FibreEnd:
    """Where a fibre ends: at a node (qkdn_id), patched to a switch port or not.

    mux_ports: the fixed mux/demux at this end, as (switch port, DWDM channels it passes):
    the fibre lands on all those ports, so it carries one quantum channel per port at once.
    Without it the end is one port (`port`), which carries one quantum channel."""

    node: str
    switch: str | None = None
    port: int | None = None
    mux_ports: tuple[tuple[int, frozenset[int]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mux_ports", tuple((int(p), frozenset(int(c) for c in chans))
                                                    for p, chans in self.mux_ports))

    @staticmethod
    def pair_channels(a: frozenset[int] | None, b: frozenset[int] | None) -> frozenset[int] | None:
        """What a port of this end and one of the far end pass between them: None (any) when
        neither is behind a mux, else what both muxes pass (empty: nothing)."""
        sets = [c for c in (a, b) if c is not None]
        return frozenset.intersection(*sets) if sets else None

    def ports(self) -> tuple[tuple[int, frozenset[int] | None], ...]:
        """The switch ports this end lands on, each with the channels it passes (None: any)."""
        if self.switch is None:
            return ()
        if self.mux_ports:
            return tuple((p, chans) for p, chans in self.mux_ports)
        return ((self.port, None),) if self.port is not None else ()


@dataclass(frozen=True)
class Fibre:
    """A fibre span. mux_channels: channels its fixed muxes pass (empty: any);
    quantum_in_use: DWDM channels already carrying a quantum signal."""

    name: str
    a: FibreEnd
    b: FibreEnd
    loss_db: float
    length_km: float = 0.0
    classical: tuple[ClassicalChannel, ...] = ()
    mux_channels: frozenset[int] = frozenset()
    quantum_in_use: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classical", tuple(self.classical))
        object.__setattr__(self, "mux_channels", frozenset(self.mux_channels))
        object.__setattr__(self, "quantum_in_use", frozenset(self.quantum_in_use))


@dataclass(frozen=True)
class Switch:
    """An N-port optical switch at a node; cross_connects are the port pairs already set."""

    name: str
    node: str
    ports: int
    insertion_loss: float = 1.0
    cross_connects: tuple[tuple[int, int], ...] = ()

    @property
    def used_ports(self) -> frozenset[int]:
        return frozenset(p for pair in self.cross_connects for p in pair)


def _frozen_map(items: Mapping[Any, Any] | None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, eq=False)
class Topology:
    """One snapshot. Compared and hashed by identity: two snapshots are never merged, and
    derived structures (graphs) are cached per snapshot."""

    nodes: Mapping[str, Node] = field(default_factory=dict)
    interfaces: Mapping[tuple[str, int], QkdInterface] = field(default_factory=dict)
    links: Mapping[str, QkdLink] = field(default_factory=dict)
    fibres: Mapping[str, Fibre] = field(default_factory=dict)
    switches: Mapping[str, Switch] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("nodes", "interfaces", "links", "fibres", "switches"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))
        self._check()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and deepcopy the collections, not the caches (the proxies cannot be pickled)."""
        return (Topology, (dict(self.nodes), dict(self.interfaces), dict(self.links), dict(self.fibres),
                           dict(self.switches)))

    @classmethod
    def build(cls, nodes: Iterable[Node] = (), interfaces: Iterable[QkdInterface] = (),
              links: Iterable[QkdLink] = (), fibres: Iterable[Fibre] = (),
              switches: Iterable[Switch] = ()) -> Topology:
        """A snapshot from plain lists, keyed by each object's id."""
        return cls({n.qkdn_id: n for n in nodes}, {i.key: i for i in interfaces},
                   {lk.qkdl_id: lk for lk in links}, {f.name: f for f in fibres},
                   {s.name: s for s in switches})

    def usable_switches(self) -> dict[str, Switch]:
        """The switches a channel may cross: those of nodes that are up (or of no node), by name."""
        return {name: sw for name, sw in sorted(self.switches.items())
                if sw.node not in self.nodes or self.nodes[sw.node].up}

    def replace(self, **changes: Any) -> Topology:
        """A new snapshot with some collections replaced (caches start empty)."""
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        """Reject a snapshot whose references dangle: path computation trusts them."""
        for key, iface in self.interfaces.items():
            if key != iface.key:
                raise ValueError(f"interface {iface.key} stored under {key}")
            if iface.node not in self.nodes:
                raise ValueError(f"interface {iface.key}: unknown node")
        for lid, lk in self.links.items():
            if lid != lk.qkdl_id:
                raise ValueError(f"link {lk.qkdl_id} stored under {lid}")
            for node in (lk.a, lk.b):
                if node not in self.nodes:
                    raise ValueError(f"link {lid}: unknown node {node}")
        patched: dict[tuple[str, int], str] = {}

        def patch(switch: str | None, port: int | None, what: str) -> None:
            if switch is None:
                return
            sw = self.switches.get(switch)
            if sw is None:
                raise ValueError(f"{what}: unknown switch {switch}")
            if port is None or not 1 <= port <= sw.ports:
                raise ValueError(f"{what}: switch {switch} has no port {port}")
            if (switch, port) in patched:
                raise ValueError(f"{what}: switch {switch} port {port} already holds {patched[(switch, port)]}")
            patched[(switch, port)] = what

        for iface in self.interfaces.values():
            patch(iface.switch, iface.port, f"interface {iface.node}:{iface.qkdi_id}")
        for fibre in self.fibres.values():
            for end in (fibre.a, fibre.b):
                for port, _ in end.ports() or ((end.port, None),):
                    patch(end.switch, port, f"fibre {fibre.name}")
        for sw in self.switches.values():
            ports = [p for pair in sw.cross_connects for p in pair]
            if len(ports) != len(set(ports)) or any(not 1 <= p <= sw.ports for p in ports):
                raise ValueError(f"switch {sw.name}: invalid cross-connects {sw.cross_connects}")

    # --- small helpers ------------------------------------------------------------

    def node_by_name(self, name: str) -> Node:
        """The node called `name` (names are for people; ids are what links reference)."""
        for node in self.nodes.values():
            if node.name == name:
                return node
        raise KeyError(name)

    def interfaces_of(self, node: str) -> list[QkdInterface]:
        """A node's interfaces, by qkdi_id."""
        return sorted((i for i in self.interfaces.values() if i.node == node), key=lambda i: i.qkdi_id)

    def memo(self, key: str, build: Callable[[Topology], T]) -> T:
        """Build a derived structure once per snapshot (callers must not mutate it)."""
        try:
            return self._memo[key]
        except KeyError:
            pass
        with self._memo_lock:
            if key not in self._memo:
                self._memo[key] = build(self)
            return self._memo[key]

    def relay_graph(self) -> nx.Graph:
        """Trusted-node graph for key relay, built once per snapshot (frozen).

        Nodes: the up nodes (attribute kms). One edge per node pair with ACTIVE links of
        positive SKR between up nodes; parallel links are merged, because the forwarding
        module draws a hop's link keys from any PHYS link to the next hop. Edge attributes:
        capacity (sum of SKR, bit/s), weight (1/capacity: seconds of link key per relayed
        bit), links (sorted qkdl_ids)."""
        return self.memo("relay_graph", _build_relay_graph)


def _build_relay_graph(topo: Topology) -> nx.Graph:
    g = nx.Graph()
    up = sorted(n for n, node in topo.nodes.items() if node.up)
    g.add_nodes_from((n, {"kms": topo.nodes[n].kms}) for n in up)
    pairs: dict[tuple[str, str], list[QkdLink]] = {}
    for lk in topo.links.values():
        if lk.active and lk.skr > 0 and lk.a != lk.b and lk.a in g and lk.b in g:
            pairs.setdefault((min(lk.a, lk.b), max(lk.a, lk.b)), []).append(lk)
    for (u, v), lks in sorted(pairs.items()):
        cap = sum(lk.skr for lk in lks)
        g.add_edge(u, v, capacity=cap, weight=1.0 / cap, links=tuple(sorted(lk.qkdl_id for lk in lks)))
    return nx.freeze(g)
