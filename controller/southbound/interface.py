"""What the controller needs of one agent, whichever protocol manages it.

A lab may mix NETCONF (southbound/agent.py, over SSH) and RESTCONF (southbound/restconf.py,
RFC 8040 over HTTPS) per node; the controller, provisioning and reconciliation speak only
to these two protocols:

- `Southbound`: one managed agent: a session kept up with backoff, the node's last full
  read (`data`, the XML <data> whatever the wire encoding: both transports hand the same
  element to the topology builder), its running configuration on demand, its
  notifications (NETCONF <create-subscription>, or the RESTCONF SSE stream) handed over as
  the XML content element, and `begin()`, its part in one transaction.
- `Hop`: that part, driven phase by phase by provisioning/txn.py on every agent at once:
  lock, edit, commit, confirm; `rollback()` when any hop failed before the end,
  `release()` always. Each method raises the agent's refusal as ncclient's RPCError
  (southbound/errors.py turns RESTCONF's `ietf-restconf:errors` into one) and any other
  failure (session gone, timeout) as itself: txn.py tells the two apart the same way for
  both protocols.

How each protocol fills the phases is its module's business (the NETCONF candidate with a
confirmed commit; RESTCONF, which has neither lock nor candidate, an entity-tag
precondition and a saved copy to put back: see southbound/restconf_txn.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lxml import etree

from sdqkd.controller.southbound.ops import Edit


@dataclass(frozen=True)
class AgentAddress:
    """Where an agent is and how to log in (the same user for NETCONF's SSH and RESTCONF's
    HTTP basic authentication); `restconf_url`/`restconf_ca` for a node managed over RESTCONF."""

    name: str
    qkdn_id: str
    host: str
    port: int
    username: str
    password: str | None = None
    key_filename: str | None = None
    hostkey_b64: str | None = None  # the agent's SSH host key (lab.json); verified when given
    domain: str | None = None
    restconf_url: str | None = None  # https://host:port/restconf (the RFC 8040 root)
    restconf_ca: str | None = None  # the CA that signed the agent's HTTPS certificate


class Hop(Protocol):
    """One agent's part in one transaction."""

    name: str
    qkdn_id: str

    def lock(self) -> None:
        """Make sure nobody else's change gets mixed with this one (NETCONF: <lock>; RESTCONF:
        the configuration and its entity-tag, which every write then requires unchanged)."""

    def edit(self) -> None:
        """Stage the edits and have them validated where the protocol can stage."""

    def commit(self, timeout: int) -> None:
        """Make the edits live, still undoable by rollback() (until `timeout` s for NETCONF's
        confirmed commit, after which the agent undoes it by itself)."""

    def confirm(self) -> None:
        """Make the change final and release what lock() took."""

    def rollback(self) -> None:
        """Undo whatever this hop did so far (never raises; logs what it could not undo)."""

    def release(self) -> None:
        """Release any lock still held (never raises)."""

    @property
    def committed(self) -> bool:
        """The change stands on the agent (confirmed, or a rollback that could not undo it):
        the controller reconciles such a hop against its store."""


class Southbound(Protocol):
    """One agent as the controller manages it (see the module docstring)."""

    addr: AgentAddress
    data: etree._Element | None
    last_error: str | None

    @property
    def qkdn_id(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_up(self) -> bool: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def refresh(self) -> None:
        """Re-read the agent in full (then on_state)."""

    def get_config(self) -> etree._Element:
        """The running configuration, as the <data> of a <get-config>."""

    def begin(self, txn_id: str, edits: list[Edit]) -> Hop:
        """This agent's part in transaction `txn_id`, which applies `edits` (in order)."""
