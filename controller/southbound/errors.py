"""Agents' refusals as one exception whatever the transport: ncclient's RPCError.

RESTCONF reports the NETCONF error fields (RFC 8040 section 7.1: error-type, error-tag,
error-app-tag, error-path, error-message, error-info) in `ietf-restconf:errors`; each is
turned into the <rpc-error> it stands for, so provisioning and reconciliation read tag,
path and message the same way from either southbound.
"""
from __future__ import annotations

import json
from typing import Any

from lxml import etree
from ncclient.operations.rpc import RPCError

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
RESTCONF_NS = "urn:ietf:params:xml:ns:yang:ietf-restconf"

class AgentUnavailable(Exception):
    """The agent is not connected right now."""


# RFC 8040 section 7, read backwards: the error-tag an HTTP status stands for when the
# server sent no `errors` body (a proxy's answer, a bare 412 from an If-Match).
STATUS_TAG = {400: "invalid-value", 401: "access-denied", 403: "access-denied", 404: "invalid-value",
              405: "operation-not-supported", 409: "in-use", 412: "operation-failed", 413: "too-big",
              500: "operation-failed", 501: "operation-not-supported"}

_FIELDS = ("error-type", "error-tag", "error-app-tag", "error-severity", "error-path", "error-message")


def rpc_error(tag: str, message: str, *, error_type: str = "application") -> RPCError:
    """An RPCError as an agent's <rpc-error> with these fields would have produced it."""
    return _one({"error-type": error_type, "error-tag": tag, "error-message": message})


def _one(raw: dict[str, Any]) -> RPCError:
    el = etree.Element(f"{{{NC_NS}}}rpc-error", nsmap={None: NC_NS})
    for name in _FIELDS:
        value = raw.get(name)
        if name == "error-severity" and value is None:
            value = "error"
        if value is not None:
            etree.SubElement(el, f"{{{NC_NS}}}{name}").text = str(value)
    if raw.get("error-info") is not None:
        etree.SubElement(el, f"{{{NC_NS}}}error-info").text = json.dumps(raw["error-info"])
    return RPCError(el)


def from_response(r: Any) -> RPCError:
    """from_restconf of an httpx response."""
    return from_restconf(r.status_code, r.content, r.headers.get("content-type", ""))


def from_restconf(status: int, body: bytes, content_type: str = "application/yang-data+json") -> RPCError:
    """The RPCError an HTTP error answer stands for: its `ietf-restconf:errors` (JSON or XML),
    one RPCError per error (several: ncclient's multi-error form, as a pipelined reply gives),
    or, without a body, the error-tag RFC 8040 gives the status."""
    errors: list[dict[str, Any]] = []
    if body:
        try:
            if "xml" in content_type:
                root = etree.fromstring(body)
                errors = [{etree.QName(f).localname: (f.text or "").strip() for f in e if isinstance(f.tag, str)}
                          for e in root.iter(f"{{{RESTCONF_NS}}}error")]
            else:
                errors = list(json.loads(body).get("ietf-restconf:errors", {}).get("error", []))
        except (ValueError, etree.XMLSyntaxError, AttributeError):
            errors = []
    if not errors:
        text = body.decode(errors="replace").strip()[:200] if body else ""
        return rpc_error(STATUS_TAG.get(status, "operation-failed"), f"HTTP {status}" + (f": {text}" if text else ""),
                         error_type="protocol")
    if len(errors) == 1:
        return _one(errors[0])
    errs = [_one(e) for e in errors]
    holder = etree.Element(f"{{{NC_NS}}}rpc-reply", nsmap={None: NC_NS})
    for e in errs:
        holder.append(e.xml)
    return RPCError(holder, errs=errs)
