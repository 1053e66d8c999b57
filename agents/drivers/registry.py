"""Driver kinds: kind name -> class, filled by explicit register() calls (as containerlab's
node registry), so the lab and the agent build devices from the kind in the lab file."""
from __future__ import annotations

from typing import Any

from sdqkd.agents.drivers.base import Driver
from sdqkd.agents.drivers.optical_switch import OpticalSwitch
from sdqkd.agents.drivers.qkd_emulated import EmulatedQkdModule
from sdqkd.agents.drivers.qkd_etsi014 import Etsi014QkdModule
from sdqkd.agents.drivers.qrng import Qrng

_KINDS: dict[str, type[Driver]] = {}


class UnknownKind(LookupError):
    """No driver of that kind; the message lists the known ones."""


def register(cls: type[Driver]) -> type[Driver]:
    """Add a driver class under its `kind`; registering another class under a taken kind fails."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if _KINDS.get(kind, cls) is not cls:
        raise ValueError(f"driver kind '{kind}' is already taken by {_KINDS[kind].__name__}")
    _KINDS[kind] = cls
    return cls


def kinds() -> list[str]:
    return sorted(_KINDS)


def driver_class(kind: str) -> type[Driver]:
    try:
        return _KINDS[kind]
    except KeyError:
        raise UnknownKind(f"unknown driver kind '{kind}'; known kinds: {', '.join(kinds())}") from None


def create(kind: str, **kwargs: Any) -> Driver:
    """A new driver of `kind`, built with the class's own keyword arguments."""
    return driver_class(kind)(**kwargs)


register(EmulatedQkdModule)
register(OpticalSwitch)
register(Etsi014QkdModule)
register(Qrng)
