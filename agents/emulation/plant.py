"""The emulated optical plant of a lab: where light from a QKD module ends up.

Every agent process of a lab builds a `Plant` from the same sdqkd-lab topology and
the same SQLite state file. The fixed part (fibres, losses, classical channels,
switch ports, patching) comes from the topology; the moving part lives in the
file: the cross-connects the switch drivers publish and the fibres a test or the
lab has cut. So a switch set by one agent changes the channel the QKD modules of
another agent see, as on a real network.

Tracing: an interface with an `attachment` sends light into that switch port; it
follows the switch's cross-connect, then the fibre patched to the other port, and
so on through further switches, until a port with a QKD interface attached (the
peer) or a dead end (unconnected port, fibre ending at a site without a switch).
An interface without attachment is joined to its peer by a fixed `link` entry.
"""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.private import private_sqlite

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cross_connect ("
    " switch TEXT NOT NULL, port_a INTEGER NOT NULL, port_b INTEGER NOT NULL,"
    " PRIMARY KEY (switch, port_a))",
    "CREATE TABLE IF NOT EXISTS cut_fibre (name TEXT PRIMARY KEY)",
)
_MAX_HOPS = 64


@dataclass(frozen=True)
class Channel:
    """The quantum channel from one interface to whatever it reaches.

    classical: band -> largest number of classical channels on one fibre of the path.
    same_channel / adjacent_channel: a classical channel on the quantum DWDM channel /
    on channel +-1 on some fibre (only known when the quantum channel has a number).
    blocked: fibres whose fixed muxes do not pass the quantum channel.
    """

    peer_node: str
    peer_qkdi_id: int
    fibres: tuple[str, ...]
    loss_db: float
    classical: Mapping[str, int] = field(default_factory=dict)
    wavelength: int | None = None
    same_channel: bool = False
    adjacent_channel: bool = False
    blocked: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()
    cut: bool = False

    def classical_in_band(self, band: str) -> int:
        return self.classical.get(band, 0)

    @property
    def crosstalk(self) -> bool:
        return self.same_channel or self.adjacent_channel


@dataclass(frozen=True)
class _End:
    node: str
    switch: str | None
    port: int | None
    mux: tuple[tuple[int, frozenset[int]], ...] = ()  # fixed mux ports: (switch port, channels passed)

    def ports(self) -> list[tuple[int, frozenset[int] | None]]:
        """Switch ports the end lands on, with the channels each passes (None: any)."""
        if not self.switch:
            return []
        return [(p, c) for p, c in self.mux] if self.mux else [(int(self.port or 0), None)]

    def passes(self, port: int, wavelength: int | None) -> bool:
        chans = dict(self.ports()).get(port)
        return chans is None or wavelength is None or wavelength in chans


@dataclass(frozen=True)
class _Fibre:
    name: str
    a: _End
    b: _End
    loss: float
    mux: frozenset[int]
    classical: tuple[tuple[str, int | None], ...]  # (band, DWDM channel)


@dataclass(frozen=True)
class _Iface:
    node: str
    qkdi_id: int
    channel: int | None
    attachment: tuple[str, int] | None


@dataclass(frozen=True)
class _Link:
    name: str
    ends: tuple[tuple[str, int], tuple[str, int]]
    path: tuple[str, ...]
    channel: int | None
    loss: float | None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


class Plant:
    """Fibres + switches of one lab, shared across processes through `state_path`."""

    def __init__(self, topology: Mapping[str, Any], state_path: Path | str) -> None:
        lab = topology.get("sdqkd-lab:lab", topology)
        self.name: str = lab.get("name", "")
        self._switches: dict[str, tuple[int, float]] = {}  # name -> (ports, insertion loss)
        self._fibres: dict[str, _Fibre] = {}
        self._ifaces: dict[tuple[str, int], _Iface] = {}
        self._links: dict[tuple[str, int], list[_Link]] = {}
        self._ports: dict[tuple[str, int], tuple[str, Any]] = {}  # (switch, port) -> what is patched
        self._load(lab)
        self._lock = threading.Lock()
        private_sqlite(state_path)  # the file, its WAL and shm: 0600 in a 0700 directory
        self._db = sqlite3.connect(str(state_path), timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 10000")
        self._db.execute("PRAGMA journal_mode = WAL")
        for stmt in _SCHEMA:
            self._db.execute(stmt)
        self._version: int | None = None
        self._xc: dict[str, dict[int, int]] = {}
        self._cut: frozenset[str] = frozenset()

    # --- topology ---------------------------------------------------------------

    def _load(self, lab: Mapping[str, Any]) -> None:
        for sw in lab.get("switch", []):
            self._switches[sw["name"]] = (int(sw["ports"]), float(sw.get("insertion-loss", 1.0)))
        for node in lab.get("node", []):
            for qi in node.get("qkd-interface", []):
                att = qi.get("attachment") or {}
                where = (att["switch"], int(att["port"])) if att.get("switch") else None
                iface = _Iface(node["name"], int(qi["id"]), _opt_int(qi.get("channel")), where)
                self._ifaces[(iface.node, iface.qkdi_id)] = iface
                if where:
                    self._patch(where, ("iface", iface))
        for fb in lab.get("fibre", []):
            ends = [_End(e["node"], e.get("switch"), _opt_int(e.get("port")),
                         tuple((int(m["port"]), frozenset(int(c) for c in m.get("channel", [])))
                               for m in e.get("mux-port", [])))
                    for e in (fb.get("a-end", {}), fb.get("b-end", {}))]
            fibre = _Fibre(fb["name"], ends[0], ends[1], float(fb["loss"]),
                           frozenset(int(c) for c in fb.get("mux-channel", [])),
                           tuple((c.get("band", "C-band"), _opt_int(c.get("channel")))
                                 for c in fb.get("classical-channel", [])))
            self._fibres[fibre.name] = fibre
            for end in ends:
                for port, _ in end.ports():
                    self._patch((end.switch, port), ("fibre", fibre))  # type: ignore[arg-type]
        for lk in lab.get("link", []):
            ends = []
            for ep in lk.get("endpoints", []):
                node, _, qkdi = ep.rpartition(":")
                ends.append((node, int(qkdi)))
            if len(ends) != 2:
                raise ValueError(f"link '{lk['name']}' needs two endpoints")
            link = _Link(lk["name"], (ends[0], ends[1]), tuple(lk.get("path", [])),
                         _opt_int(lk.get("channel")),
                         None if lk.get("loss") is None else float(lk["loss"]))
            for end in ends:
                self._links.setdefault(end, []).append(link)

    def _patch(self, where: tuple[str, int], what: tuple[str, Any]) -> None:
        if where[0] not in self._switches:
            raise ValueError(f"unknown switch '{where[0]}'")
        if not 1 <= where[1] <= self._switches[where[0]][0]:
            raise ValueError(f"switch '{where[0]}' has no port {where[1]}")
        if where in self._ports:
            raise ValueError(f"switch '{where[0]}' port {where[1]} is patched twice")
        self._ports[where] = what

    def switch_ports(self, switch: str) -> tuple[int, float]:
        """(port count, insertion loss) of a switch of the topology."""
        return self._switches[switch]

    def patched_to(self, switch: str, port: int) -> str | None:
        """What the port is patched to, as 'fibre NAME' or 'node:qkdi' (for state reports)."""
        what = self._ports.get((switch, port))
        if what is None:
            return None
        kind, obj = what
        return f"fibre {obj.name}" if kind == "fibre" else f"{obj.node}:{obj.qkdi_id}"

    # --- shared state -----------------------------------------------------------

    def _snapshot(self) -> tuple[dict[str, dict[int, int]], frozenset[str]]:
        """Current cross-connects (both directions) and cut fibres, reloaded only when
        another connection committed (PRAGMA data_version) or we wrote ourselves."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                xc: dict[str, dict[int, int]] = {}
                for sw, a, b in self._db.execute("SELECT switch, port_a, port_b FROM cross_connect"):
                    table = xc.setdefault(sw, {})
                    table[a], table[b] = b, a
                self._xc = xc
                self._cut = frozenset(r[0] for r in self._db.execute("SELECT name FROM cut_fibre"))
                self._version = version
            return self._xc, self._cut

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._version = None  # our own commits do not move data_version

    def set_cross_connects(self, switch: str, pairs: Mapping[int, int]) -> None:
        """Publish a switch's whole cross-connect table ({port_a: port_b}, both directions)."""
        if switch not in self._switches:
            raise KeyError(f"unknown switch '{switch}'")
        stmts: list[tuple[str, tuple[Any, ...]]] = [("DELETE FROM cross_connect WHERE switch = ?", (switch,))]
        stmts += [("INSERT INTO cross_connect VALUES (?, ?, ?)", (switch, int(a), int(b)))
                  for a, b in pairs.items()]
        self._write(stmts)

    def cross_connects(self, switch: str) -> dict[int, int]:
        """What the plant currently sees of a switch, both directions."""
        return dict(self._snapshot()[0].get(switch, {}))

    def cut_fibre(self, name: str, cut: bool = True) -> None:
        """Failure injection: a cut fibre carries no light; cut=False splices it."""
        if name not in self._fibres:
            raise KeyError(f"unknown fibre '{name}'")
        if cut:
            self._write([("INSERT OR IGNORE INTO cut_fibre VALUES (?)", (name,))])
        else:
            self._write([("DELETE FROM cut_fibre WHERE name = ?", (name,))])

    def is_cut(self, name: str) -> bool:
        return name in self._snapshot()[1]

    def fibres(self) -> list[str]:
        """The topology's fibre names, in its order: what `cut_fibre` accepts (the lab lists
        them when it is given another name)."""
        return list(self._fibres)

    def cut_fibres(self) -> list[str]:
        """The fibres cut now, in topology order (what `sdqkd lab status` shows)."""
        cut = self._snapshot()[1]
        return [f for f in self._fibres if f in cut]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- tracing ----------------------------------------------------------------

    def trace(self, node: str, qkdi_id: int, wavelength: int | None = None) -> Channel | None:
        """Follow light from a QKD interface; None when it reaches no QKD interface.

        wavelength: DWDM channel of the quantum signal (e.g. phys_wavelength);
        defaults to the interface's fixed channel, then the link's."""
        iface = self._ifaces.get((node, qkdi_id))
        if iface is None:
            raise KeyError(f"no QKD interface {node}:{qkdi_id} in the topology")
        if wavelength is None:
            wavelength = iface.channel
        xc, cut = self._snapshot()
        if iface.attachment is None:
            return self._trace_fixed(iface, wavelength, cut)
        return self._trace_switched(iface, wavelength, xc, cut)

    def _trace_switched(self, iface: _Iface, wavelength: int | None,
                        xc: dict[str, dict[int, int]], cut: frozenset[str]) -> Channel | None:
        switch, port = iface.attachment  # type: ignore[misc]
        loss, fibres, switches = 0.0, [], []
        for _ in range(_MAX_HOPS):
            out = xc.get(switch, {}).get(port)
            if out is None:
                return None
            loss += self._switches[switch][1]
            switches.append(switch)
            what = self._ports.get((switch, out))
            if what is None:
                return None
            kind, obj = what
            if kind == "iface":
                return self._channel(obj.node, obj.qkdi_id, fibres, loss, switches, wavelength, cut)
            fibre: _Fibre = obj
            fibres.append(fibre.name)
            loss += fibre.loss
            near = fibre.a if fibre.a.switch == switch and any(p == out for p, _ in fibre.a.ports()) else fibre.b
            far = fibre.b if near is fibre.a else fibre.a
            if not far.switch or not near.passes(out, wavelength):
                return None  # the near mux port does not pass this channel
            # the far demux sends the channel to the one port whose passband holds it
            landing = [p for p, _ in far.ports() if far.passes(p, wavelength)]
            if len(landing) != 1:
                return None
            switch, port = far.switch, landing[0]
        return None  # a loop of cross-connects

    def _trace_fixed(self, iface: _Iface, wavelength: int | None, cut: frozenset[str]) -> Channel | None:
        me = (iface.node, iface.qkdi_id)
        for link in self._links.get(me, []):
            peer = link.ends[1] if link.ends[0] == me else link.ends[0]
            if wavelength is None:
                wavelength = link.channel
            if link.loss is not None:
                loss, switches = link.loss, []
            else:
                loss, switches = self._path_loss(link.path)
            return self._channel(peer[0], peer[1], list(link.path), loss, switches, wavelength, cut)
        return None

    def _path_loss(self, path: tuple[str, ...]) -> tuple[float, list[str]]:
        """Fibre losses plus one insertion loss where consecutive fibres meet at a switch."""
        loss = sum(self._fibres[f].loss for f in path)
        switches = []
        for f1, f2 in zip(path, path[1:]):
            ends1 = {e.switch for e in (self._fibres[f1].a, self._fibres[f1].b) if e.switch}
            ends2 = {e.switch for e in (self._fibres[f2].a, self._fibres[f2].b) if e.switch}
            for sw in sorted(ends1 & ends2)[:1]:
                loss += self._switches[sw][1]
                switches.append(sw)
        return loss, switches

    def _channel(self, peer_node: str, peer_qkdi: int, fibres: list[str], loss: float,
                 switches: list[str], wavelength: int | None, cut: frozenset[str]) -> Channel:
        classical: dict[str, int] = {}
        same = adjacent = False
        blocked = []
        for name in fibres:
            fibre = self._fibres[name]
            per_band: dict[str, int] = {}
            for band, ch in fibre.classical:
                per_band[band] = per_band.get(band, 0) + 1
                if wavelength is not None and ch is not None and band == "C-band":
                    same |= ch == wavelength
                    adjacent |= abs(ch - wavelength) == 1
            for band, n in per_band.items():
                classical[band] = max(classical.get(band, 0), n)
            if wavelength is not None and fibre.mux and wavelength not in fibre.mux:
                blocked.append(name)
        return Channel(peer_node, peer_qkdi, tuple(fibres), round(loss, 3), classical, wavelength,
                       same, adjacent, tuple(blocked), tuple(switches), any(f in cut for f in fibres))
