"""What the QKD driver tests share: an end of a link (a module with the keys and events it
produced), the peer-address resolver the real lab provides, and a PHYS link entry."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdqkd.agents.drivers.base import Event


def wait_for(pred: Callable[[], object], timeout: float = 4.0) -> None:
    """Poll until pred() holds (the modules work in their own threads)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def node_ids(*names: str) -> dict[str, str]:
    """Stable qkdn_ids for test node names."""
    return {n: str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/{n}")) for n in names}


@dataclass
class End:
    module: Any
    keys: list[tuple[str, str, bytes]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def statuses(self, kind: str = "link-status") -> list[tuple[str, str]]:
        return [(e.data["status"], e.data["reason"]) for e in list(self.events) if e.kind == kind]


class Ends:
    """The modules of a test by node name; `address` resolves a peer module as the lab does."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ends: dict[str, End] = {}
        self._node_of = {v: k for k, v in ids.items()}

    def address(self, qkdn_id: str, qkdi_id: int) -> tuple[str, int] | None:
        end = self.ends.get(self._node_of.get(qkdn_id, ""))
        return end.module.address if end and qkdi_id == 1 else None

    def close(self) -> None:
        for end in self.ends.values():
            end.module.close()


def phys_link(qkdl: str, ids: dict[str, str], local: str, remote: str, role: str | None = None,
              enable: bool = True, **extra: Any) -> dict[str, Any]:
    """An ETSI 015 PHYS qkd_link entry between two test nodes."""
    entry = {"qkdl_id": qkdl, "qkdl_enable": enable, "qkdl_type": "etsi-qkd-node-types:PHYS",
             "qkdl_local": {"qkdn_id": ids[local], "qkdi_id": 1}, "qkdl_remote": {"qkdn_id": ids[remote], "qkdi_id": 1},
             **extra}
    if role:
        entry["phys_qkd_role"] = f"etsi-qkd-node-types:{role}"
    return entry
