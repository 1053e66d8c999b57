"""RFC 8040 section 7: an rpc-error (agents/netconf/errors.py) as an HTTP status and an
ietf-restconf:errors body, in JSON (RFC 7951) or XML."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from lxml import etree

from sdqkd import yangdata
from sdqkd.agents.netconf import errors as nc

RESTCONF_NS = "urn:ietf:params:xml:ns:yang:ietf-restconf"
JSON = "application/yang-data+json"
XML = "application/yang-data+xml"

# RFC 8040 section 7, table: error-tag -> status-code (where it gives a choice, the first
# unless the caller says which).
STATUS = {
    "in-use": 409, "invalid-value": 400, "too-big": 413, "missing-attribute": 400, "bad-attribute": 400,
    "unknown-attribute": 400, "bad-element": 400, "unknown-element": 400, "unknown-namespace": 400,
    "access-denied": 403, "lock-denied": 409, "resource-denied": 409, "rollback-failed": 500,
    "data-exists": 409, "data-missing": 409, "operation-not-supported": 501, "operation-failed": 500,
    "partial-operation": 500, "malformed-message": 400, "missing-element": 400,
}


@dataclass
class RestconfError(Exception):
    """Errors and the status to answer them with."""

    errors: list[nc.RpcError]
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Allow with a 405

    def __post_init__(self) -> None:
        Exception.__init__(self, "; ".join(e.message for e in self.errors))


def fail(status: int, cls: type[nc.RpcError], message: str, *, error_type: str = "protocol",
         path: str | None = None, info: dict[str, str] | None = None) -> RestconfError:
    err = cls(message, path=path, info=info or {})
    err.error_type = error_type
    return RestconfError([err], status)


def from_rpc(exc: nc.RpcError | nc.RpcErrors) -> RestconfError:
    """The datastore's (or libyang's) errors; the status is the first error's."""
    found = exc.errors if isinstance(exc, nc.RpcErrors) else [exc]
    return RestconfError(found, STATUS.get(found[0].tag, 500))


def _entry(e: nc.RpcError) -> dict[str, object]:
    out: dict[str, object] = {"error-type": e.error_type, "error-tag": e.tag}
    if e.app_tag:
        out["error-app-tag"] = e.app_tag
    if e.path:
        out["error-path"] = json_path(e.path)
    out["error-message"] = e.message
    if e.info:
        out["error-info"] = dict(e.info)
    return out


def json_path(path: str) -> str:
    """An error-path as RFC 8040 JSON has it: an RFC 7951 instance-identifier (module names
    as prefixes, on the first step and where the module changes)."""
    names = {p: yangdata.namespaces().get(ns) for p, ns in yangdata.prefixes().items()}
    out, module = [], None
    for step in path.strip("/").split("/"):
        if ":" in step.split("[", 1)[0]:
            pfx, rest = step.split(":", 1)
            mod = names.get(pfx, pfx)
            rest = rest.replace(f"[{pfx}:", "[")
            out.append(f"{mod}:{rest}" if mod != module else rest)
            module = mod
        else:
            out.append(step)
    return "/" + "/".join(out)


def render(err: RestconfError, media: str) -> tuple[bytes, str]:
    """The body and its media type (RFC 8040 section 7.1)."""
    if media == XML:
        root = etree.Element(f"{{{RESTCONF_NS}}}errors", nsmap={None: RESTCONF_NS})
        for e in err.errors:
            el = etree.SubElement(root, f"{{{RESTCONF_NS}}}error")
            for k, v in _entry(e).items():
                if k == "error-path":
                    v = e.path  # XML keeps the YANG prefixes, declared on the element
                    used = {p: ns for p, ns in yangdata.prefixes().items() if f"{p}:" in str(v)}
                    sub = etree.SubElement(el, f"{{{RESTCONF_NS}}}{k}", nsmap=used or None)
                else:
                    sub = etree.SubElement(el, f"{{{RESTCONF_NS}}}{k}")
                if isinstance(v, dict):
                    for ik, iv in v.items():
                        etree.SubElement(sub, f"{{{RESTCONF_NS}}}{ik}").text = str(iv)
                else:
                    sub.text = str(v)
        return etree.tostring(root, xml_declaration=True, encoding="utf-8"), XML
    body = {"ietf-restconf:errors": {"error": [_entry(e) for e in err.errors]}}
    return json.dumps(body).encode(), JSON
