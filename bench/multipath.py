"""Planned multipath relay rate as a fraction of the max-flow bound (issue 7: target >= 95%).

    .venv/bin/python bench/multipath.py [--nodes 40] [--topologies 4] [--pairs 60] [--seed 1]
                                        [--measured SECONDS]

For every (src, dst) pair the request asks for the whole max-flow bound (min_bps = the
bound, from networkx on the snapshot's relay graph), and the figure is what the plan reaches
(its total, or NoPath's achievable_bps) over the bound. Rows:
  node-disjoint:   the old multipath heuristic (greedy, k-shortest pool, branch and bound;
                   at most 4 paths, its default then): the baseline, in the same run;
  flow, 4/8 paths: the max-flow decomposition, widest path first, at most 4 or 8 paths (8:
                   the request's default, what the controller plans);
  flow, no limit:  the same with max_paths = the number of hops in the graph.
Topologies: MadQCI (the lab file, every node pair), and random geometric graphs (bench/
pathcomp.py's, largest component, log-normal SKRs) with `--pairs` random pairs each.
Pairs whose bound one path already meets count as 100% for every row (one path is taken).

--measured: also a real network, the "diamond" S, A, B, T (links S-A 16, S-B 16, A-B 8,
A-T 8, B-T 24 kbit/s: max flow 32, node-disjoint paths 24) as agent processes on free
loopback ports with emulated QKD modules and an in-process Controller. The controller plans
an application S -> T asking for 99% of the max-flow bound of the links' measured rates
(the agents' ETSI 015 SKR), pushes it, and one SAE then asks for keys (ETSI 014 enc_keys
over mutual TLS, --keys-per-call x 256 bits a call once the status's stored_key_count
says the KME holds that many) as fast as they come for SECONDS; the peer SAE
fetches every key (dec_keys) and they are compared. Figure: delivered end-to-end key bits
per second over that bound (as measured when the plan is made), after a warm-up that spends the link key stored before; the
baseline, in the same run, is the controller's single-path plan for the same pair. What is
left between the two: a 256-bit key spends one pad link key per hop, and each relay
message one MAC link key (so the fewer keys per call, the more MAC overhead); an end short
of its half of a link's keys borrows the peer's unused half, which keeps `lend_keep` keys,
at least `lend_min` at a time (each answer spends a MAC key too).
(Until the LKMS lent keys and authenticated whole messages, each end used only its half and
each key spent a pad and a MAC key per hop: a ceiling of 25% of the bound.)
"""
from __future__ import annotations

import argparse
import logging
import random
import ssl
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path

import networkx as nx
from pathcomp import random_topology

from sdqkd.controller.pathcomp import NoPath
from sdqkd.controller.pathcomp.relay import RelayRequest, relay_paths
from sdqkd.controller.topology.model import Topology

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import madqci  # noqa: E402  (tests/madqci.py: MadQCI as a topology snapshot, from the lab file)

MODES = {
    "node-disjoint (old)": {"disjoint": "node", "max_paths": 4},
    "flow, 4 paths": {"max_paths": 4},
    "flow, 8 paths": {},
    "flow, no limit": {"max_paths": None},
}


def achieved(topo: Topology, s: str, t: str, bound: float, opts: dict) -> tuple[float, int]:
    """(planned rate, number of paths) for a request asking for the whole bound."""
    opts = dict(opts)
    if "max_paths" in opts and opts["max_paths"] is None:
        opts["max_paths"] = max(1, topo.relay_graph().number_of_edges())
    try:
        plan = relay_paths(topo, RelayRequest(s, t, min_bps=bound, **opts))
    except NoPath as exc:
        return float(exc.achievable_bps or 0.0), 0
    return plan.total_bps, len(plan.paths)


def measure(topo: Topology, pairs: list[tuple[str, str]]) -> dict[str, dict[str, list[float]]]:
    g = topo.relay_graph()
    out: dict[str, dict[str, list[float]]] = {m: {"frac": [], "paths": [], "ms": []} for m in MODES}
    for s, t in pairs:
        if not nx.has_path(g, s, t):
            continue
        bound = float(nx.maximum_flow_value(g, s, t, capacity="capacity"))
        for mode, opts in MODES.items():
            start = time.perf_counter()
            rate, paths = achieved(topo, s, t, bound, opts)
            out[mode]["ms"].append((time.perf_counter() - start) * 1000)
            out[mode]["frac"].append(rate / bound)
            if paths:
                out[mode]["paths"].append(paths)
    return out


def row(name: str, mode: str, r: dict[str, list[float]], base: dict[str, list[float]]) -> str:
    f = r["frac"]
    paths = statistics.mean(r["paths"]) if r["paths"] else float("nan")
    gain = statistics.mean(f) / statistics.mean(base["frac"])
    return (f"{name:<22} {mode:<20} {len(f):>5} {min(f) * 100:>6.1f}% {statistics.median(f) * 100:>6.1f}% "
            f"{statistics.mean(f) * 100:>6.1f}% {sum(x >= 0.95 for x in f) / len(f) * 100:>6.1f}% "
            f"{gain:>5.3f}x {paths:>5.1f} {statistics.median(r['ms']):>7.2f}ms")


# --- measured on real agents ------------------------------------------------------------

DIAMOND = (("S", "A", 16.0), ("S", "B", 16.0), ("A", "B", 8.0), ("A", "T", 8.0), ("B", "T", 24.0))  # kbit/s


def diamond_lab() -> dict:
    """The sdqkd-lab file of the diamond: one DV module per link end, each link pinned to its
    rate (expected-skr at its fibre's loss)."""
    ifaces: dict[str, list[dict]] = {n: [] for n in "SABT"}
    links, fibres = [], []
    for a, b, kbps in DIAMOND:
        ends = []
        for n in (a, b):
            ifaces[n].append({"id": len(ifaces[n]) + 1, "profile": "dv"})
            ends.append(f"{n}:{len(ifaces[n])}")
        fibres.append({"name": f"f{a}{b}", "a-end": {"node": a}, "b-end": {"node": b}, "length": "5.0", "loss": "3.0"})
        links.append({"name": f"{a}{b}".lower(), "endpoints": ends, "path": [f"f{a}{b}"], "loss": "3.0",
                      "expected-skr": str(kbps)})
    profile = {"name": "dv", "technology": "etsi-qkd-node-types:DV-QKD", "band": "O-band", "max-absorption": "20.0",
               "reference-skr": "20.0", "reference-loss": "3.0", "qber": "2.5"}
    nodes = [{"name": n, "qkd-interface": ifaces[n], "sae": [{"id": f"sae-{n.lower()}"}]} for n in "SABT"]
    return {"sdqkd-lab:lab": {"name": "diamond", "profile": [profile], "node": nodes, "fibre": fibres, "link": links}}


def measured(seconds: float, number: int = 64) -> list[str]:
    """Rows for the diamond on real agents (see the module's docstring)."""
    import httpx

    from labrun import running_lab

    logging.basicConfig(level=logging.WARNING)
    with running_lab(diamond_lab(), "sdqkd-bench-multipath-", auto_applications=False) as lab:
        plan, ctl, ids, view = lab.plan, lab.ctl, lab.ids, lab.view
        time.sleep(6)  # the SKR meters fill their window
        before = view()
        bound = float(nx.maximum_flow_value(before.relay_graph(), ids["S"], ids["T"], capacity="capacity"))
        name = {v: k for k, v in ids.items()}
        s_np, t_np = plan.nodes["S"], plan.nodes["T"]

        def client(sae: str, np) -> httpx.Client:  # noqa: ANN001
            ctx = ssl.create_default_context(cafile=str(plan.ca[0]))
            ctx.load_cert_chain(*(str(x) for x in np.sae_certs[sae]))
            return httpx.Client(verify=ctx, timeout=30)

        size = 256
        enc = f"https://127.0.0.1:{s_np.kms_port}/api/v1/keys/sae-t/enc_keys"
        dec = f"https://127.0.0.1:{t_np.kms_port}/api/v1/keys/sae-s/dec_keys"
        status = f"https://127.0.0.1:{s_np.kms_port}/api/v1/keys/sae-t/status"
        reasons: dict[str, int] = {}

        def run(cs: httpx.Client, ct: httpx.Client, duration: float) -> tuple[int, int, int]:
            got, refused, wrong = 0, 0, 0
            stop = time.monotonic() + duration
            while time.monotonic() < stop:
                # as a careful SAE does: no more than the KME says it holds (ETSI 014 status),
                # and, wanting throughput, a full call's worth (each relay message spends a MAC key)
                stored = cs.get(status).json().get("stored_key_count", 0)
                if stored < number:
                    time.sleep(0.05)
                    continue
                r = cs.post(enc, json={"number": number, "size": size})
                if r.status_code != 200:
                    refused += 1
                    why = str(r.json().get("message", r.text))[:90]
                    reasons[why] = reasons.get(why, 0) + 1
                    time.sleep(0.1)
                    continue
                keys = r.json()["keys"]
                back = ct.post(dec, json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
                if back.status_code != 200 or back.json()["keys"] != keys:
                    wrong += len(keys)
                    continue
                got += len(keys)
            return got, refused, wrong

        results = []
        for label, share in (("one path (min_bps 0) [baseline]", 0.0), ("multipath (99% of the bound)", 0.99)):
            # the bound as the controller sees it now (the meters move: 99% of an older one may not fit)
            now = float(nx.maximum_flow_value(view().relay_graph(), ids["S"], ids["T"], capacity="capacity"))
            app = ctl.create_application("sae-s", "sae-t", min_bps=share * now)
            planned = " + ".join(f"{''.join(name[n] for n in p['nodes'])} {p['bps'] / 1000:.1f}k" for p in app.paths)
            with client("sae-s", s_np) as cs, client("sae-t", t_np) as ct:
                run(cs, ct, min(10.0, seconds / 2))  # warm-up: spend the stock stored before
                start = time.monotonic()
                got, refused, wrong = run(cs, ct, seconds)
                rate = got * size / (time.monotonic() - start)
            ctl.delete_application(app.app_id)
            results.append((label, planned, rate, refused, wrong, now))
        after = view()
        bound_after = float(nx.maximum_flow_value(after.relay_graph(), ids["S"], ids["T"], capacity="capacity"))
    rates = ", ".join(f"{''.join(sorted(name[lk.a] + name[lk.b]))} {lk.skr / 1000:.1f}k"
                      for lk in sorted(before.links.values(), key=lambda x: sorted(name[x.a] + name[x.b])))
    lines = [f"diamond on 4 agents, {seconds:.0f} s per plan, {number} x {size}-bit keys a call: link SKR (agents' ETSI 015) {rates}",
             f"  max-flow bound of the measured rates: {bound / 1000:.2f} kbit/s at start, {bound_after / 1000:.2f} at the end",
             f"  {'plan':<34} {'paths (planned virt_bandwidth)':<36} {'bound then':>10} {'delivered':>10} {'of bound':>9}"
             f" {'vs base':>8} {'refused':>8}"]
    base = results[0][2] or float("nan")
    for label, planned, rate, refused, wrong, now in results:
        lines.append(f"  {label:<34} {planned:<36} {now / 1000:>8.2f}k {rate / 1000:>8.2f}k {rate / now * 100:>8.1f}% "
                     f"{rate / base:>7.2f}x {refused:>8}" + (f"  {wrong} KEYS WRONG" if wrong else ""))
    lines += [f"  refused {n}x: {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])[:3]]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=40)
    ap.add_argument("--topologies", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--measured", type=float, default=0.0, metavar="SECONDS",
                    help="also relay keys on real agents for this long (0: computed figures only)")
    ap.add_argument("--keys-per-call", type=int, default=64, help="enc_keys number for --measured (ETSI 014 max 128 here)")
    args = ap.parse_args()
    print(f"{'topology':<22} {'plan':<20} {'pairs':>5} {'min':>7} {'p50':>7} {'mean':>7} {'>=95%':>7} "
          f"{'vs old':>6} {'paths':>5} {'time p50':>9}")
    topo = madqci.topology()
    ends = sorted(n for n, node in topo.nodes.items() if node.kms)
    cases = [("MadQCI (all pairs)", topo, list(combinations(ends, 2)))]
    rng = random.Random(args.seed)
    merged: dict[str, dict[str, list[float]]] = {m: {"frac": [], "paths": [], "ms": []} for m in MODES}
    for i in range(args.topologies):
        rt = random_topology(args.nodes, args.seed + i, degree=5.0)
        nodes = sorted(rt.nodes)
        pairs = [tuple(rng.sample(nodes, 2)) for _ in range(args.pairs)]
        for mode, r in measure(rt, pairs).items():
            for k in merged[mode]:
                merged[mode][k] += r[k]
    for name, t, pairs in cases:
        res = measure(t, pairs)
        for mode in MODES:
            print(row(name, mode, res[mode], res["node-disjoint (old)"]))
    name = f"random {args.nodes} x{args.topologies}"
    for mode in MODES:
        print(row(name, mode, merged[mode], merged["node-disjoint (old)"]))
    print("fraction = planned rate / max-flow bound, asking for the whole bound; vs old = mean over the"
          " old heuristic's mean; paths = mean paths of the plans that met the bound")
    if args.measured > 0:
        print()
        for line in measured(args.measured, args.keys_per_call):
            print(line)


if __name__ == "__main__":
    main()
