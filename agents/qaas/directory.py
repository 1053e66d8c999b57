"""Who is who in the network, as the QaaS APIs name peers: a node name, a qkdn_id or an
SAE ID all resolve to one SAE and its node.

Built from what the agent config already carries for every node: its own name and
qkdn_id, the other nodes' names by qkdn_id (`peers`, which the lab writes for every
node of the network) and the SAE directory of the LKMS (`kms.saes`).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from sdqkd.agents.config import AgentConfig
from sdqkd.agents.kms.https import ApiError


@dataclass(frozen=True)
class Party:
    """One end of a key: an SAE and the node it is attached to."""

    sae: str
    qkdn_id: str
    node: str | None  # None for a node outside the directory

    def as_json(self) -> dict[str, str | None]:
        return {"SAE_ID": self.sae, "node": self.node, "qkdn_id": self.qkdn_id}


class Directory:
    def __init__(self, cfg: AgentConfig) -> None:
        self.own = cfg.node.qkdn_id.lower()
        self.names: dict[str, str] = {self.own: cfg.node.name}
        self.names.update({qid.lower(): p.node for qid, p in cfg.peers.items()})
        self.saes: dict[str, str] = {s: q.lower() for s, q in (cfg.kms.saes if cfg.kms else {}).items()}

    def node_name(self, qkdn_id: str | None) -> str | None:
        return self.names.get(qkdn_id.lower()) if qkdn_id else None

    def party(self, sae: str) -> Party:
        """The SAE and its node; 404 when the network has no such SAE."""
        qid = self.saes.get(sae)
        if qid is None:
            raise ApiError(404, f"no SAE {sae!r} in this network")
        return Party(sae, qid, self.node_name(qid))

    def resolve(self, text: str, what: str) -> Party:
        """An SAE ID, else a node name (any case), else a qkdn_id; a node must have exactly
        one SAE (else the caller names the SAE). `what` names the parameter in errors."""
        if text in self.saes:
            return self.party(text)
        qid = next((q for q, n in self.names.items() if n.lower() == text.lower()), None)
        if qid is None:
            try:
                canon = str(uuid.UUID(text))
            except ValueError:
                canon = None
            qid = canon if canon in self.names else None
        if qid is None:
            raise ApiError(404, f"{what}: no node, qkdn_id or SAE called {text[:128]!r} in this network")
        saes = sorted(s for s, q in self.saes.items() if q == qid)
        if not saes:
            raise ApiError(404, f"{what}: node {self.names[qid]} has no SAE (a relay-only node serves no keys)")
        if len(saes) > 1:
            raise ApiError(400, f"{what}: node {self.names[qid]} has several SAEs ({', '.join(saes)}); name one")
        return Party(saes[0], qid, self.names[qid])
