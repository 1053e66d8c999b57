"""NETCONF round trips against a real sdqkd agent: stock ncclient (its session loop
polls the send queue every 100 ms) against the controller's waking session, in the
same run. Prints p50/p99 and round trips per second for get-config, edit-config of a
top-level leaf, and edit-config of list entries (a VIRT qkd_link created, then
removed: what provisioning does).

    .venv/bin/python bench/netconf_rtt.py [--n 200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ncclient import manager  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agentproc import PASSWORD, agent_config  # noqa: E402
from sdqkd.controller.southbound.ops import LinkEdit, config_element  # noqa: E402
from sdqkd.controller.southbound.session import connect  # noqa: E402
from latency import p50_p99_ms  # noqa: E402  (bench/ is on sys.path when run as a script)

ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def measure(fn, n: int) -> tuple[float, float, float]:
    times = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return (*p50_p99_ms(times), n / total)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="round trips per case (stock ncclient needs ~0.1 s each)")
    args = ap.parse_args()
    agent = agent_config(Path(tempfile.mkdtemp(prefix="sdqkd-bench-"))).start()
    kw = dict(host="127.0.0.1", port=agent.port, username="admin", password=PASSWORD, hostkey_verify=False,
              look_for_keys=False, allow_agent=False)
    rows = []
    try:
        for label, open_session in (("ncclient 0.7.1 (TICK poll)", manager.connect), ("sdqkd waking session", connect)):
            m = open_session(**kw)
            n = min(args.n, 50) if open_session is manager.connect else args.n

            def edit(i: int) -> None:
                m.edit_config(target="running", config=f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}">'
                                                       f"<qkdn_location_id>bench-{i}</qkdn_location_id></qkd_node></config>")

            links = [str(uuid.uuid4()) for _ in range(n)]
            peer = str(uuid.uuid4())

            def entry(i: int) -> None:  # create on even i, remove the same link on odd i
                lid = links[i // 2]
                e = LinkEdit(lid, "VIRT", agent.qkdn_id, peer, next_hops=(peer,), bandwidth=1000, delete=bool(i % 2))
                m.edit_config(target="running", config=config_element([e]))

            rows.append((label, "get-config", *measure(lambda i: m.get_config("running"), n)))
            rows.append((label, "edit-config (leaf)", *measure(edit, n)))
            rows.append((label, "edit-config (qkd_link entry)", *measure(entry, n)))
            m.close_session()
    finally:
        agent.stop()
    table = Table(title="NETCONF round trips to one sdqkd agent (loopback, same run)")
    for col in ("client", "operation", "p50 ms", "p99 ms", "round trips/s", "vs ncclient"):
        table.add_column(col)
    base = {op: rate for client, op, _, _, rate in rows if client.startswith("ncclient")}
    for client, op, p50, p99, rate in rows:
        table.add_row(client, op, f"{p50:.2f}", f"{p99:.2f}", f"{rate:.0f}", f"{rate / base[op]:.0f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
