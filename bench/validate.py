"""Validating an edit on a MadQCI node (issue 14, item 4): the agent's running holds N PHYS/VIRT
links and N applications (what the controller writes: controller/southbound/ops.py), and
each edit restates one of those applications with a new TTL (so running keeps its size).
Measured in one run:

- libyang (today): sdqkd.yangdata.validate_elements of the whole configuration, and the
  agent's whole edit path (Datastores.edit on running: apply, validate, semantic checks,
  commit; no devices);
- the code before libyang (pyangbind + the hand-written codec, git revision BASELINE_REV),
  taken from git into a temporary folder and run in a subprocess on the same configuration:
  its ModelSet.check, first on a new config (no cache) and on the same one again.

    .venv/bin/python bench/validate.py [--n 50] [--rounds 200] [--baseline-rev REV]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from lxml import etree
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from latency import p50_p99_ms  # noqa: E402

from sdqkd import yangdata  # noqa: E402
from sdqkd.agents.datastore.model import agent_models  # noqa: E402
from sdqkd.agents.datastore.store import Datastores  # noqa: E402
from sdqkd.agents.datastore.validate import NodeFacts  # noqa: E402
from sdqkd.controller.southbound.ops import AppEdit, LinkEdit, config_element  # noqa: E402

BASELINE_REV = "34a5764"  # the last commit before libyang
NODE = str(uuid.uuid5(uuid.NAMESPACE_URL, "bench/validate/node"))
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
console = Console()


def _u(*parts: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "bench/validate/" + "/".join(map(str, parts))))


def edits(n: int, start: int = 0) -> list:
    """n relayed applications through this node: a VIRT link and an application each."""
    out = []
    for i in range(start, start + n):
        link = _u("link", i)
        out.append(LinkEdit(link, "VIRT", NODE, _u("peer", i % 7), prev_hop=_u("prev", i % 5),
                            next_hops=(_u("next", i % 3),), bandwidth=1000 + i))
        out.append(AppEdit(_u("app", i), f"sae-{i}-a", (f"sae-{i}-b",), (link,), local=NODE, remote=_u("peer", i % 7), ttl=60))
    return out


def config(n: int) -> list[etree._Element]:
    """The configuration as a node's running holds it after n of those edits (validated, canonical)."""
    holder = etree.Element("holder")
    for e in edits(n):
        for top in e.elements():
            for el in top.iter():
                el.attrib.pop(f"{{{NC}}}operation", None)
            holder.append(top)
    links = [lk for lk in holder.iter(f"{{{ETSI}}}qkd_link")]
    apps = [a for a in holder.iter(f"{{{ETSI}}}qkd_app")]
    node = etree.fromstring(f'<qkd_node xmlns="{ETSI}"><qkdn_id>{NODE}</qkdn_id><qkd_applications/><qkd_links/></qkd_node>')
    node[1].extend(apps)
    node[2].extend(links)
    return list(yangdata.validate_elements([node]).elements())


def libyang_figures(n: int, rounds: int) -> dict[str, list[float]]:
    cfg = config(n)
    whole: list[float] = []
    for _ in range(rounds):
        t = time.perf_counter()
        yangdata.validate_elements(cfg)
        whole.append(time.perf_counter() - t)
    ds = Datastores(agent_models(), NodeFacts(NODE), initial=cfg)
    edit: list[float] = []
    for el in edit_elements(n, rounds):
        t = time.perf_counter()
        ds.edit("running", el, session_id=1)
        edit.append(time.perf_counter() - t)
    return {"validate whole config (libyang)": whole, "edit-config: one app restated, on running (libyang)": edit}


def edit_elements(n: int, rounds: int) -> list[etree._Element]:
    """Round i restates application i % n (a replace), with TTL 61 + i."""
    out = []
    for i in range(rounds):
        k = i % n
        app = AppEdit(_u("app", k), f"sae-{k}-a", (f"sae-{k}-b",), (_u("link", k),), local=NODE, remote=_u("peer", k % 7),
                      ttl=61 + i)
        out.append(config_element([app]))
    return out


OLD_SCRIPT = r"""
import json, sys, time
from lxml import etree
from sdqkd.agents.datastore.model import agent_models
els = [etree.fromstring(x) for x in json.load(open(sys.argv[1]))]
from sdqkd.agents.datastore.store import Datastores
from sdqkd.agents.datastore.validate import NodeFacts
m = agent_models()
whole = []
for i in range(int(sys.argv[2])):  # every entry differs from any seen before: no cache hit
    fresh = [etree.fromstring(etree.tostring(e).replace(b"sae-", f"sae{i}-".encode())) for e in els]
    t = time.perf_counter(); m.check(fresh); whole.append(time.perf_counter() - t)
ds = Datastores(m, NodeFacts(sys.argv[4]), initial=els)
edit = []
for x in json.load(open(sys.argv[3])):
    el = etree.fromstring(x)
    t = time.perf_counter(); ds.edit("running", el, session_id=1); edit.append(time.perf_counter() - t)
print(json.dumps({"whole": whole, "edit": edit}))
"""


def baseline_figures(n: int, rounds: int, rev: str) -> dict[str, list[float]] | str:
    """The pre-libyang ModelSet.check from git, installed layout in a temp folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
        if arch.returncode:
            return f"git archive {rev} failed: {arch.stderr.decode()[:200]}"
        subprocess.run(["tar", "-x", "-C", str(tree)], input=arch.stdout, check=True)
        pkg = Path(tmp) / "layout" / "sdqkd"
        shutil.copytree(tree / "sdqkd", pkg)
        for sub in ("agents", "controller", "lab", "tapi", "bindings", "yang"):
            shutil.copytree(tree / sub, pkg / sub)
        shutil.copytree(tree / "yang", pkg.parent / "yang")  # its module registry looks beside the package
        (Path(tmp) / "config.json").write_text(json.dumps([etree.tostring(e).decode() for e in config(n)]))
        (Path(tmp) / "edits.json").write_text(json.dumps([etree.tostring(e).decode() for e in edit_elements(n, rounds)]))
        res = subprocess.run([sys.executable, "-c", OLD_SCRIPT, str(Path(tmp) / "config.json"), str(rounds),
                              str(Path(tmp) / "edits.json"), NODE],
                             capture_output=True, text=True, env={"PYTHONPATH": str(Path(tmp) / "layout"), "PATH": "/usr/bin:/bin"},
                             cwd=tmp, timeout=1200)
        if res.returncode:
            return f"baseline failed: {res.stderr[-400:]}"
        data = json.loads(res.stdout.strip().splitlines()[-1])
        return {f"validate whole config (pyangbind, rev {rev}, no cache hit)": data["whole"],
                f"edit-config: one app restated, on running (pyangbind, rev {rev}, its entry cache)": data["edit"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="links and applications already in running")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--baseline-rounds", type=int, default=20)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    args = ap.parse_args()
    figures = libyang_figures(args.n, args.rounds)
    base = baseline_figures(args.n, args.baseline_rounds, args.baseline_rev)
    table = Table(title=f"edit validation on a node with {args.n} VIRT links + {args.n} applications")
    for col in ("what", "n", "p50 ms", "p99 ms", "speed vs pyangbind (p50)"):
        table.add_column(col)
    refs: dict[str, float] = {}
    if isinstance(base, dict):
        for name, xs in base.items():
            refs["validate" if name.startswith("validate") else "edit"] = p50_p99_ms(xs)[0]
        figures.update(base)
    for name, xs in figures.items():
        p50, p99 = p50_p99_ms(xs)
        ref = refs.get("validate" if name.startswith("validate") else "edit")
        ratio = f"{ref / p50:.2f}x" if ref and "libyang" in name else ("1.00x [baseline]" if ref else "")
        table.add_row(name, str(len(xs)), f"{p50:.2f}", f"{p99:.2f}", ratio)
    console.print(table)
    if isinstance(base, str):
        console.print(f"[yellow]no same-run baseline: {base}[/]")


if __name__ == "__main__":
    main()
