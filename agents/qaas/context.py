"""What every quantum-as-a-service module is given (its own module, so the services and the
module that mounts them do not import each other)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from sdqkd.agents.config import AgentConfig
from sdqkd.agents.kms.lkms import Lkms


@dataclass
class Context:
    """What a service may use: the node's config, its LKMS, its QRNG driver (None when
    the node has none) and `publish`, which sends a NETCONF notification."""

    cfg: AgentConfig
    lkms: Lkms
    qrng: Any | None = None
    publish: Callable[[etree._Element], None] | None = None
