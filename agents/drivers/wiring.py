"""Builds an agent's devices from its config: the shared optical plant, one emulated
QKD module per qkd_modules entry (with the profile its config carries, which `sdqkd lab up`
resolved and calibrated), one switch driver per switch. Nothing here reads a topology file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdqkd.agents.config import AgentConfig
from sdqkd.agents.drivers import registry
from sdqkd.agents.drivers.base import Driver
from sdqkd.agents.emulation.plant import Plant
from sdqkd.qkdprofile import QkdProfile
from sdqkd.agents.drivers.qkd_link import KeyRoom, KeySink


@dataclass
class Devices:
    drivers: list[Driver]
    plant: Plant | None = None
    qrng: Any = None
    modules: dict[int, Driver] = field(default_factory=dict)
    switches: dict[str, Driver] = field(default_factory=dict)

    def close(self) -> None:
        if self.plant is not None:
            self.plant.close()


def build(cfg: AgentConfig, key_sink: KeySink, key_room: KeyRoom | None = None) -> Devices:
    plant = Plant(cfg.plant.inventory, Path(cfg.plant.state)) if cfg.plant else None
    service_key = bytes.fromhex(cfg.service_key or "")
    if cfg.qkd_modules and len(service_key) < 16:
        raise ValueError("service_key must be at least 16 bytes (hex)")

    def peer_address(qkdn_id: str, qkdi_id: int) -> tuple[str, int] | None:
        peer = cfg.peers.get(str(qkdn_id).lower())
        addr = peer.service.get(str(qkdi_id)) if peer else None
        return (str(addr[0]), int(addr[1])) if addr else None

    def node_of(qkdn_id: str) -> str | None:
        if str(qkdn_id).lower() == cfg.node.qkdn_id.lower():
            return cfg.node.name
        peer = cfg.peers.get(str(qkdn_id).lower())
        return peer.node if peer else None

    devices = Devices([], plant)
    for m in cfg.qkd_modules:
        common = dict(node=cfg.node.name, qkdn_id=cfg.node.qkdn_id, qkdi_id=m.qkdi_id, role=m.role,
                      key_sink=key_sink, key_room=key_room,
                      service_key=service_key, peer_address=peer_address, listen=(cfg.netconf.address, m.service_port))
        if m.driver == "qkd-etsi014":
            from sdqkd.etsi014_client import DeviceApi  # httpx: loaded by nodes with such a device only

            assert m.etsi014 is not None
            d = m.etsi014
            entry = m.profile
            drv = registry.create(
                m.driver, **common, poll=d.poll,
                device=DeviceApi(d.url, d.sae_id, d.peer_sae_id, d.ca, d.cert, d.key, d.timeout),
                model=entry.get("model", ""), technology=str(entry.get("technology", "DV-QKD")).rsplit(":", 1)[-1],
                wavelength_range=entry.get("wavelength-range"),
                max_absorption=float(entry["max-absorption"]) if entry.get("max-absorption") is not None else None,
            )
        else:
            if plant is None:
                raise ValueError("emulated QKD modules need the optical plant")
            drv = registry.create(
                m.driver, **common, profile=QkdProfile.from_dict(m.profile), plant=plant,
                node_of=node_of, channel=m.channel,
            )
        devices.modules[m.qkdi_id] = drv
        devices.drivers.append(drv)
    for sw in cfg.switches:
        if plant is None:
            raise ValueError("optical switches need the optical plant")
        drv = registry.create("optical-switch", name=sw.name, plant=plant, ports=sw.ports, insertion_loss=sw.insertion_loss)
        devices.switches[sw.name] = drv
        devices.drivers.append(drv)
    return devices


def build_qrng(cfg: AgentConfig) -> Driver | None:
    """The node's QRNG (its end keys come from it), or None: the OS source then. An
    emulated device runs the SP 800-90B health tests on its raw samples."""
    if cfg.qrng is None:
        return None
    qrng = registry.create("qrng", node=cfg.node.name, source=cfg.qrng.source, rate=cfg.qrng.rate)
    h = qrng.min_entropy()
    if h is not None:
        from sdqkd.agents.emulation import health  # numpy: loaded by nodes with a QRNG only

        health.HealthTap(qrng, h)
    return qrng
