"""What one agent needs so that it says what the controller's store says (pure: no I/O).

Three sets meet here, all keyed by (kind, id) (ops.Edit.key):
- desired: the edits the store's applications and channels put on this agent;
- found: the entries the agent's running configuration holds (ops.present);
- owned: what the controller recorded as its own before pushing it (store.own).
An entry desired and missing, or found saying something else (an application's backing
links), is pushed; an entry owned, found and not desired is an orphan (a transaction that
failed half-way, a controller that died before recording its service, a path moved away
from a node that was down) and is removed; an entry the controller never owned is another
manager's and is left alone, whatever it says. An owned entry neither found nor desired is
forgotten: nothing is left to remove.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdqkd.controller.southbound.ops import DEPENDENCY_RANK, Edit, Key, removal

# Pushed in this order when one edit-config of them all is refused: what others refer to first
# (a PHYS link or cross-connect before the VIRT links and applications over it).


@dataclass
class Diff:
    push: list[Edit] = field(default_factory=list)  # desired, missing or differing
    remove: list[Key] = field(default_factory=list)  # orphans
    forget: list[Key] = field(default_factory=list)  # owned, gone, not desired

    @property
    def edits(self) -> list[Edit]:
        """Removals first, then what is pushed, in dependency order."""
        return [removal(k) for k in self.remove] + sorted(self.push, key=lambda e: DEPENDENCY_RANK[e.key[0]])

    def __bool__(self) -> bool:
        return bool(self.push or self.remove)


def diff(desired: list[Edit], found: dict[Key, dict[str, Any]], owned: set[Key]) -> Diff:
    """The changes that bring one agent from `found` to `desired`, touching owned entries only
    (besides the desired ones)."""
    want = {e.key: e for e in desired}
    out = Diff()
    for key, e in want.items():
        have = found.get(key)
        if have is None or not e.matches(have):
            out.push.append(e)
    for key in sorted(owned - want.keys()):
        (out.remove if key in found else out.forget).append(key)
    return out
