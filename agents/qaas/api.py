"""Mounts the quantum-as-a-service APIs on the node's HTTPS application."""
from __future__ import annotations

from types import ModuleType
from typing import Any

from sdqkd.agents.kms import web

from ..kms import etsi004, etsi014
from . import entropy, ipsec, keys, links, openapi
from .context import Context

__all__ = ["Context", "add_routes", "services"]


def services() -> list[ModuleType]:
    """The service modules, in the order their paths appear in the OpenAPI document."""
    return [entropy, keys, links, ipsec]


def add_routes(app: web.Application, ctx: Context) -> None:
    """Every service's routes, and GET /openapi.json describing them and ETSI 014 and 004."""
    mods = services()
    for mod in mods:
        mod.add_routes(app, ctx)
    # a service whose limits depend on the node's config describes them with openapi_for(ctx)
    # ETSI 014 and 004 are mounted by agents/kms/node.py on the same app; described here so
    # one document covers every path a client of this server can call
    parts = [etsi014.OPENAPI, etsi004.OPENAPI]
    doc = openapi.document(parts + [mod.openapi_for(ctx) if hasattr(mod, "openapi_for") else mod.OPENAPI for mod in mods])
    app.add_routes([web.get(openapi.PATH, openapi.handler(doc), allow_head=False)])
