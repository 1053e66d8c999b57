"""A lab of real agent processes (free loopback ports, a temp dir) and an in-process
Controller, for the benches that need the whole network: every link of the topology
made a direct quantum channel and ACTIVE with key before the bench starts."""
from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agentproc import AgentProc  # noqa: E402
from sdqkd.controller import config as controller_config  # noqa: E402
from sdqkd.controller.controller import Controller  # noqa: E402
from sdqkd.controller.pathcomp.optical import OpticalRequest  # noqa: E402
from sdqkd.controller.topology.model import Topology  # noqa: E402
from sdqkd.lab import plan as lab_plan  # noqa: E402


@dataclass
class RunningLab:
    plan: lab_plan.LabPlan
    ctl: Controller
    ids: dict[str, str]  # node name -> qkdn_id

    @property
    def names(self) -> dict[str, str]:
        return {v: k for k, v in self.ids.items()}

    def view(self) -> Topology:
        """The controller's view after re-reading every agent now (not at its next tick)."""
        for c in self.ctl.conns.values():
            c.refresh()
        return self.ctl.topology()


@contextmanager
def running_lab(topology: dict[str, Any], prefix: str, *, auto_applications: bool = True,
                active_within: float = 60.0) -> Iterator[RunningLab]:
    procs: list[AgentProc] = []
    ctl: Controller | None = None
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            plan = lab_plan.make(topology, Path(tmp), free_ports=True)
            for n, np in plan.nodes.items():
                procs.append(AgentProc(n, np.qkdn_id, np.netconf_port, np.config_path, np.dir).start())
            ids = {n: np.qkdn_id for n, np in plan.nodes.items()}
            ctl = Controller(controller_config.load(lab_plan.write_controller_config(plan)))
            ctl.cfg.auto_applications = auto_applications
            ctl.start()
            if not ctl.wait_discovered(30):
                raise RuntimeError("agents not discovered in 30 s")
            links = lab_plan.lab_object(topology).get("link", [])
            for link in links:
                (an, ai), (bn, bi) = (ep.split(":") for ep in link["endpoints"])
                ctl.create_channel(OpticalRequest(tx=(ids[an], int(ai)), rx=(ids[bn], int(bi))))
            lab = RunningLab(plan, ctl, ids)
            end = time.monotonic() + active_within
            while True:
                lks = lab.view().links
                if len(lks) >= len(links) and all(lk.status == "ACTIVE" and lk.skr > 0 for lk in lks.values()):
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"{len(links)} links not ACTIVE in {active_within:.0f} s")
                time.sleep(0.25)
            yield lab
        finally:
            if ctl is not None:
                ctl.stop()
            for p in procs:
                p.stop()
