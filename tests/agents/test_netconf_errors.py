"""errors.malformed: the error for a message that is not an <rpc>, per the session's base
version (RFC 6241 appendix A: malformed-message is new in :base:1.1 and must not be sent
to :base:1.0 clients)."""
from __future__ import annotations

from sdqkd.agents.netconf import errors

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def _rendered(err: errors.RpcError) -> tuple[str | None, str | None, str | None]:
    el = err.element()
    return el.findtext(f"{{{NC}}}error-type"), el.findtext(f"{{{NC}}}error-tag"), el.findtext(f"{{{NC}}}error-message")


def test_base11_session_gets_malformed_message() -> None:
    err = errors.malformed(True, "the message is not well-formed XML")
    assert isinstance(err, errors.MalformedMessage)
    assert _rendered(err) == ("rpc", "malformed-message", "the message is not well-formed XML")


def test_base10_session_never_sees_malformed_message() -> None:
    err = errors.malformed(False, "expected <rpc>, got <hello>")
    assert _rendered(err) == ("rpc", "operation-failed", "expected <rpc>, got <hello>")
    assert errors.malformed(False, "x").tag in {  # an RFC 4741 (base:1.0) error-tag
        "in-use", "invalid-value", "too-big", "missing-attribute", "bad-attribute", "unknown-attribute",
        "missing-element", "bad-element", "unknown-element", "unknown-namespace", "access-denied", "lock-denied",
        "resource-denied", "rollback-failed", "data-exists", "data-missing", "operation-not-supported",
        "operation-failed", "partial-operation"}
