"""Driver kinds: kind name -> class, filled by explicit register() calls (as containerlab's
node registry), so the lab and the agent build devices from the kind in the lab file. The
built-in kinds are imported when first asked for: an agent loads the code (and the
libraries: httpx for a real device's ETSI 014 API) of the devices it has, no more."""
from __future__ import annotations

import importlib
from typing import Any

from sdqkd.agents.drivers.base import Driver

_KINDS: dict[str, type[Driver]] = {}
_BUILTIN = {  # kind -> module:class
    "qkd-emulated": "sdqkd.agents.drivers.qkd_emulated:EmulatedQkdModule",
    "optical-switch": "sdqkd.agents.drivers.optical_switch:OpticalSwitch",
    "qkd-etsi014": "sdqkd.agents.drivers.qkd_etsi014:Etsi014QkdModule",
    "qrng": "sdqkd.agents.drivers.qrng:Qrng",
}


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
    return sorted(set(_KINDS) | set(_BUILTIN))


def driver_class(kind: str) -> type[Driver]:
    if kind not in _KINDS and kind in _BUILTIN:
        module, _, name = _BUILTIN[kind].partition(":")
        cls = register(getattr(importlib.import_module(module), name))
        if cls.kind != kind:
            raise ValueError(f"{_BUILTIN[kind]} is of kind '{cls.kind}', not '{kind}'")
    try:
        return _KINDS[kind]
    except KeyError:
        raise UnknownKind(f"unknown driver kind '{kind}'; known kinds: {', '.join(kinds())}") from None


def create(kind: str, **kwargs: Any) -> Driver:
    """A new driver of `kind`, built with the class's own keyword arguments."""
    return driver_class(kind)(**kwargs)

