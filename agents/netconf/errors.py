"""Typed NETCONF errors and their rpc-error rendering (RFC 6241 section 4.3, appendix A).

This is the only module that knows error-type/error-tag pairs. Everything else
raises one of these; the session turns them into <rpc-error> elements. Several
errors can travel in one reply (validation collects them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from sdqkd import yangdata

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


@dataclass
class RpcError(Exception):
    """One rpc-error. Subclasses fix type and tag; info holds error-info children."""

    message: str
    path: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    error_type: str = "application"
    tag: str = "operation-failed"
    severity: str = "error"
    app_tag: str | None = None

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def element(self, prefixes: dict[str, str] | None = None) -> etree._Element:
        """<rpc-error> in the NETCONF base namespace (default namespace, no prefix).

        prefixes (prefix -> namespace) declares the prefixes error-path uses, as
        an XPath in instance data must have them in scope (RFC 6241 4.3)."""
        err = etree.Element(f"{{{NC_NS}}}rpc-error", nsmap={None: NC_NS})
        _sub(err, "error-type", self.error_type)
        _sub(err, "error-tag", self.tag)
        _sub(err, "error-severity", self.severity)
        if self.app_tag:
            _sub(err, "error-app-tag", self.app_tag)
        if self.path:
            used = {p: ns for p, ns in (prefixes or {}).items() if f"{p}:" in self.path}
            path_el = etree.SubElement(err, f"{{{NC_NS}}}error-path", nsmap=used or None)
            path_el.text = self.path
        msg = _sub(err, "error-message", self.message)
        msg.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
        if self.info:
            info = _sub(err, "error-info")
            for k, v in self.info.items():
                _sub(info, k, v)
        return err


def _sub(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{NC_NS}}}{name}")
    if text is not None:
        el.text = text
    return el


@dataclass
class InvalidValue(RpcError):
    """A value the model or the device does not accept."""

    error_type: str = "application"
    tag: str = "invalid-value"


@dataclass
class DataMissing(RpcError):
    """delete of something that is not there."""

    error_type: str = "application"
    tag: str = "data-missing"


@dataclass
class DataExists(RpcError):
    """create of something that is already there."""

    error_type: str = "application"
    tag: str = "data-exists"


@dataclass
class MissingElement(RpcError):
    """An expected element (a list key, a parameter) is absent."""

    error_type: str = "application"
    tag: str = "missing-element"


@dataclass
class UnknownElement(RpcError):
    """An element the model does not have."""

    error_type: str = "application"
    tag: str = "unknown-element"


@dataclass
class UnknownNamespace(RpcError):
    """An element in a namespace this server does not implement."""

    error_type: str = "application"
    tag: str = "unknown-namespace"


@dataclass
class BadElement(RpcError):
    """An element whose value is wrong for the operation."""

    error_type: str = "protocol"
    tag: str = "bad-element"


@dataclass
class InUse(RpcError):
    """The resource is in use (uncommitted candidate changes, a confirmed commit)."""

    error_type: str = "application"
    tag: str = "in-use"


@dataclass
class LockDenied(RpcError):
    """Someone else holds the lock; info carries their session-id."""

    error_type: str = "protocol"
    tag: str = "lock-denied"


@dataclass
class ResourceDenied(RpcError):
    """A device has no capacity for the change."""

    error_type: str = "application"
    tag: str = "resource-denied"


@dataclass
class OperationNotSupported(RpcError):
    """An operation this server does not implement."""

    error_type: str = "protocol"
    tag: str = "operation-not-supported"


@dataclass
class MalformedMessage(RpcError):
    """Not well-formed XML, or not an <rpc>."""

    error_type: str = "rpc"
    tag: str = "malformed-message"


@dataclass
class TooBig(RpcError):
    """A request larger than the server's maximum message size."""

    error_type: str = "rpc"
    tag: str = "too-big"


@dataclass
class OperationFailed(RpcError):
    """Anything else; the message never carries internals."""

    error_type: str = "application"
    tag: str = "operation-failed"


@dataclass
class AccessDenied(RpcError):
    """Not allowed for this user."""

    error_type: str = "protocol"
    tag: str = "access-denied"


@dataclass
class MissingAttribute(RpcError):
    """An expected attribute (message-id) is absent."""

    error_type: str = "rpc"
    tag: str = "missing-attribute"


@dataclass
class BadAttribute(RpcError):
    """An attribute with a wrong value (an unknown operation)."""

    error_type: str = "protocol"
    tag: str = "bad-attribute"


def malformed(base11: bool, message: str) -> RpcError:
    """The error for a message that cannot be taken as an <rpc> (not well-formed XML, not
    an <rpc>, not one operation). malformed-message is "new in :base:1.1 and MUST NOT be
    sent to old clients" (RFC 6241 appendix A), which leaves a :base:1.0 session the tag
    RFC 4741 has for failures no other tag covers: operation-failed, at the rpc layer
    (where malformed-message would be)."""
    if base11:
        return MalformedMessage(message)
    return OperationFailed(message, error_type="rpc")


class RpcErrors(Exception):
    """Several rpc-errors for one request (validation collects them all)."""

    def __init__(self, errors: list[RpcError]) -> None:
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors


def protocol(cls: type[RpcError], message: str, **kw) -> RpcError:
    """The same error, reported against the protocol layer (the <rpc> itself)."""
    err = cls(message, **kw)
    err.error_type = "protocol"
    return err


def _yang_error(p: yangdata.Problem) -> RpcError:
    """One libyang violation as RFC 6241 appendix A and RFC 7950 sections 8.3 and 15 want it."""
    path = yangdata.prefixed_path(p.path) if p.path else None
    element = {"bad-element": p.node} if p.node else {}
    if p.kind == "when":  # RFC 7950 8.3.2: a node whose "when" is false
        return UnknownElement(p.message, path=path, info=element)
    if p.kind == "unknown":
        return UnknownElement(p.message, path=path, info=element)
    if p.kind == "unknown-namespace":
        return UnknownNamespace(p.message, path=path, info=element)
    if p.kind == "must":
        return OperationFailed(p.message, path=path, app_tag=p.app_tag or "must-violation")
    if p.kind == "unique":
        return OperationFailed(p.message, path=path, app_tag="data-not-unique")
    if p.kind == "too-many":
        return OperationFailed(p.message, path=path, app_tag="too-many-elements")
    if p.kind == "too-few":
        return OperationFailed(p.message, path=path, app_tag="too-few-elements")
    if p.kind == "leafref":
        return DataMissing(p.message, path=path, app_tag="instance-required")
    if p.kind == "mandatory":
        return DataMissing(p.message, path=path, app_tag="missing-choice" if "choice" in p.message else None, info=element)
    if p.kind == "state":
        return InvalidValue(f"{p.message} (state data cannot be configured)", path=path, info=element)
    return InvalidValue(p.message, path=path, info=element, app_tag=p.app_tag)


def from_yang(exc: yangdata.YangError, error_type: str = "application") -> RpcError | RpcErrors:
    """Every violation libyang found, each its own rpc-error (one reply carries them all);
    error_type "protocol" for an operation's own parameters (RFC 6241 appendix A)."""
    found = [_yang_error(p) for p in exc.problems]
    for f in found:
        f.error_type = error_type
    return found[0] if len(found) == 1 else RpcErrors(found)


def from_driver(reason: str, message: str, path: str | None = None) -> RpcError:
    """Map a DriverError reason to its rpc-error."""
    cls = {"invalid-value": InvalidValue, "resource-denied": ResourceDenied}.get(reason, OperationFailed)
    return cls(message, path=path)
