"""ETSI GS QKD 014 key delivery throughput: `POST /api/v1/keys/{slave}/enc_keys` {"number": 1}
against the real front end (https.make_app + etsi014 routes over a real Lkms with both SAEs on
this node: end keys from the entropy source, stored in and delivered through the SQLite key
store; once as configured, once with durable=True, an fsync per group commit), and against a bare aiohttp HTTPS endpoint with the same mutual-TLS context that returns
a fixed key container (the baseline, measured in the same run). The relayed case is a key over
2 hops: three LKMS nodes A - B - C in this process, each with its own ETSI 014 HTTPS server and
forwarding module (real mutual-TLS relay, one-time pad + Poly1305 per hop, link keys stocked on
both ends of A-B and B-C); the client asks enc_keys at A for an SAE at C, then dec_keys at C,
and checks both got the same key. All servers run in threads of this process (HttpsServer); the
load comes from a separate process (aiohttp client, keep-alive, one connection per concurrent
worker and server) so the client does not share the servers' GIL.
Prints req/s (relayed: keys delivered end to end per second), p50/p99 latency and the ratios to
the bare endpoint and to the one-node delivery at the same concurrency. With ApacheBench
installed (`ab`, Debian apache2-utils), the bare and one-node cases run once more at the
highest concurrency from it: a C client leaves the server the CPU the Python client takes,
which shows the server's own ceiling (one event loop: about one core).

    .venv/bin/python bench/etsi014.py [--duration 3] [--rounds 3] [--concurrency 1 32] [--no-relay]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from rich.console import Console
from rich.table import Table

from sdqkd.agents.kms import etsi014
from sdqkd import pki
from sdqkd.agents.kms import forwarding as fm
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig
from sdqkd.agents.kms.routes import AppRoute, LinkRoute, RouteTable
from latency import p50_p99_ms  # noqa: E402  (bench/ is on sys.path when run as a script)

KME = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-bench/etsi014/kme"))
MASTER, SLAVE = "sae-a", "sae-b"
PATH = f"/api/v1/keys/{SLAVE}/enc_keys"
BODY = b'{"number": 1}'
# the relayed case: SAE "sa" on node A asks for a key shared with SAE "sc" on node C, via B
RELAY_KMES = {n: str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-bench/etsi014/{n}")) for n in "abc"}
RELAY_SAES = {"sa": RELAY_KMES["a"], "sc": RELAY_KMES["c"]}
L_AB, L_BC = "10000000-0000-4000-8000-0000000000ab", "10000000-0000-4000-8000-0000000000bc"
V_AC, APP_AC = "20000000-0000-4000-8000-0000000000ac", "30000000-0000-4000-8000-0000000000ac"
TARGET = 12_000  # req/s, the goal for real key delivery
RELAYED = "relayed 2 hops"
MAX_REQUESTS = 2_000_000  # per case: the load loop is bounded by count as well as by time


# --- load generator (runs in a child process) ----------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """Where the client sends a request, and as which SAE (client certificate and key)."""

    url: str
    path: str
    cert: str
    key: str


def load(enc: Endpoint, dec: Endpoint | None, ca: str, concurrency: int, duration: float, warmup: float) -> dict:
    """Keep `concurrency` workers busy for `duration` s after `warmup` s.

    Each worker asks enc_keys at `enc`; with `dec`, it then fetches the same key there with
    dec_keys and counts it only if both ends got the same bytes. Latencies of good requests.
    """
    return asyncio.run(_load(enc, dec, ca, concurrency, duration, warmup))


async def _load(enc: Endpoint, dec: Endpoint | None, ca: str, concurrency: int, duration: float, warmup: float) -> dict:
    import aiohttp  # noqa: PLC0415 (child process)

    def session(ep: Endpoint) -> aiohttp.ClientSession:
        conn = aiohttp.TCPConnector(ssl=pki.client_ssl_context(ep.cert, ep.key, ca), limit=concurrency, force_close=False)
        return aiohttp.ClientSession(base_url=ep.url, connector=conn, timeout=aiohttp.ClientTimeout(total=10))

    lat: list[float] = []
    lat_dec: list[float] = []
    bad = 0
    headers = {"Content-Type": "application/json"}
    cpu = [0.0]
    async with session(enc) as s, session(dec or enc) as s_dec:
        t0 = time.perf_counter()
        start, end = t0 + warmup, t0 + warmup + duration
        budget = [MAX_REQUESTS]

        async def worker() -> None:
            nonlocal bad
            while budget[0] > 0:
                t = time.perf_counter()
                if t >= end:
                    return
                budget[0] -= 1
                async with s.post(enc.path, data=BODY, headers=headers) as r:
                    payload = await r.read()
                    ok = r.status == 200 and b'"keys"' in payload
                done = time.perf_counter()
                if ok and dec is not None:
                    sent = json.loads(payload)["keys"][0]
                    body = json.dumps({"key_IDs": [{"key_ID": sent["key_ID"]}]})
                    async with s_dec.post(dec.path, data=body, headers=headers) as r:
                        got = await r.read()
                        ok = r.status == 200 and json.loads(got)["keys"][0]["key"] == sent["key"]
                    if t >= start and ok:
                        lat_dec.append(time.perf_counter() - done)
                if t >= start and not cpu[0]:
                    cpu[0] = _cpu()
                if t >= start:
                    if ok:
                        lat.append(done - t)
                    else:
                        bad += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        client_cpu = _cpu() - cpu[0]
    return {"lat": lat, "lat_dec": lat_dec, "bad": bad, "elapsed": elapsed, "client_cpu": client_cpu}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# --- servers ---------------------------------------------------------------------------------

def bare_app() -> web.Application:
    """One route, no middlewares, no LKMS: a fixed ETSI 014 key container (256-bit key)."""
    body = json.dumps({"keys": [{"key_ID": str(uuid.uuid4()), "key": base64.b64encode(os.urandom(32)).decode()}]}).encode()

    async def enc_keys(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/keys/{slave_SAE_ID}/enc_keys", enc_keys)
    return app


class RelayNet:
    """Nodes A - B - C, each an Lkms with a forwarding module and an ETSI 014 server, link keys stocked."""

    def __init__(self, d: Path, ca: tuple[Path, Path], stock: int) -> None:
        tables = {
            "a": RouteTable(RELAY_KMES["a"], {L_AB: LinkRoute(L_AB, "PHYS", True, RELAY_KMES["b"]),
                                              V_AC: LinkRoute(V_AC, "VIRT", True, RELAY_KMES["c"], None, (RELAY_KMES["b"],))},
                            (AppRoute(APP_AC, frozenset(RELAY_SAES), (V_AC,)),)),
            "b": RouteTable(RELAY_KMES["b"], {L_AB: LinkRoute(L_AB, "PHYS", True, RELAY_KMES["a"]),
                                              L_BC: LinkRoute(L_BC, "PHYS", True, RELAY_KMES["c"]),
                                              V_AC: LinkRoute(V_AC, "VIRT", True, RELAY_KMES["c"], RELAY_KMES["a"], (RELAY_KMES["c"],))},
                            ()),
            "c": RouteTable(RELAY_KMES["c"], {L_BC: LinkRoute(L_BC, "PHYS", True, RELAY_KMES["b"]),
                                              V_AC: LinkRoute(V_AC, "VIRT", True, RELAY_KMES["a"], RELAY_KMES["b"], ())},
                            (AppRoute(APP_AC, frozenset(RELAY_SAES), (V_AC,)),)),
        }
        fwd, self.nodes, self.servers = {}, {}, {}
        for n, kme in RELAY_KMES.items():
            cert = pki.issue(ca, kme, d / f"kme-{n}", server_names=["127.0.0.1"], client=True)
            fwd[n] = fm.Forwarder(kme, ("127.0.0.1", 0), pki.server_ssl_context(*cert, ca[0]),
                                  pki.client_ssl_context(*cert, ca[0]), {})
            self.nodes[n] = Lkms(LkmsConfig(kme, n, dict(RELAY_SAES), max_key_count=10_000_000),
                                 KeyStore(d / f"keys-{n}.sqlite"), os.urandom, fwd[n])
            self.nodes[n].update_routes(tables[n])
            app = make_app()
            etsi014.add_routes(app, self.nodes[n])
            self.servers[n] = HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*cert, ca[0]))
        for f in fwd.values():
            f.peers = {k: g.address for k, g in zip(RELAY_KMES.values(), fwd.values()) if g is not f}
        for link, ends in ((L_AB, "ab"), (L_BC, "bc")):  # what a QKD pair delivers to both ends
            for _ in range(0, stock, 10_000):
                keys = [(str(uuid.uuid4()), os.urandom(fm.LINK_KEY_BYTES)) for _ in range(min(10_000, stock))]
                for n in ends:
                    for kid, k in keys:
                        self.nodes[n].key_sink(link, kid, k)
                    self.nodes[n].store.flush()

    def start(self) -> None:
        for srv in self.servers.values():
            srv.start()

    def stop(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        for node in self.nodes.values():
            node.shutdown()


def ab_load(url: str, pem: Path, conc: int, duration: float) -> dict | None:
    """The same requests from ApacheBench (C, keep-alive): a client that needs a fraction of
    the Python one's CPU, so the server gets the machine. None when `ab` is not installed."""
    if shutil.which("ab") is None:
        return None
    body = pem.parent / "body.json"
    body.write_bytes(BODY)
    out = subprocess.run(["ab", "-q", "-k", "-c", str(conc), "-t", f"{duration:g}", "-n", str(MAX_REQUESTS), "-p", str(body),
                          "-T", "application/json", "-E", str(pem), url + PATH],
                         capture_output=True, text=True, timeout=duration + 60)

    def field(pattern: str) -> float:
        m = re.search(pattern, out.stdout, re.M)
        return float(m.group(1)) if m else float("nan")

    return {"rate": field(r"^Requests per second:\s+([\d.]+)"), "p50": field(r"^\s+50%\s+(\d+)"),
            "p99": field(r"^\s+99%\s+(\d+)"), "n": field(r"^Complete requests:\s+(\d+)"),
            "bad": int(field(r"^Failed requests:\s+(\d+)") + (field(r"^Non-2xx responses:\s+(\d+)") if "Non-2xx" in out.stdout else 0))}


def _row(label: str, conc: int, res: dict, lat: list[float]) -> tuple:
    """label, concurrency, req/s, p50 ms, p99 ms, server and client CPU µs per request, non-200s."""
    n = len(res["lat"])
    if not lat or not n:
        return (label, conc, 0.0, float("nan"), float("nan"), float("nan"), float("nan"), res["bad"])
    p50, p99 = p50_p99_ms(lat)
    return (label, conc, n / res["elapsed"], p50, p99, res["server_cpu"] / n * 1e6, res["client_cpu"] / n * 1e6, res["bad"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per case and round")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each case")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=3, help="runs of every case; the best one is shown")
    ap.add_argument("--no-relay", action="store_true", help="skip the 2-hop relayed case")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="sdqkd-bench-014-"))
    ca = pki.make_ca(d / "ca", "bench-ca")
    server_cert = pki.issue(ca, KME, d / "kme", server_names=["127.0.0.1"], client=True)
    client_cert = pki.issue(ca, MASTER, d / "sae", client=True)
    sa, sc = (pki.issue(ca, sae, d / sae, client=True) for sae in RELAY_SAES)

    cfg = LkmsConfig(kme_id=KME, node="bench", saes={MASTER: KME, SLAVE: KME}, max_key_count=10_000_000)
    lkms = Lkms(cfg, KeyStore(d / "keys.sqlite"), entropy=os.urandom)
    durable = Lkms(cfg, KeyStore(d / "keys-durable.sqlite", durable=True), entropy=os.urandom)
    servers = {"bare aiohttp (fixed JSON)": HttpsServer(bare_app(), "127.0.0.1", 0, pki.server_ssl_context(*server_cert, ca[0]))}
    for label, node in (("ETSI 014 + Lkms + SQLite", lkms), ("same, SQLite synchronous=FULL", durable)):
        app = make_app()
        etsi014.add_routes(app, node)
        servers[label] = HttpsServer(app, "127.0.0.1", 0, pki.server_ssl_context(*server_cert, ca[0]))
    # Each relayed 256-bit key takes 2 link keys per hop from the sender's half of the link's keys.
    relay = None if args.no_relay else RelayNet(d, ca, int(4 * 3000 * (args.duration + args.warmup)) * len(args.concurrency) * args.rounds)
    rows, ab_rows = [], []
    try:
        for srv in servers.values():
            srv.start()
        if relay is not None:
            relay.start()
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            def run(enc: Endpoint, dec: Endpoint | None, conc: int) -> dict:
                fut = pool.submit(load, enc, dec, str(ca[0]), conc, args.duration, args.warmup)
                before = _cpu()  # the servers' process (warm-up included: a slight overestimate)
                res = fut.result(timeout=args.duration + args.warmup + 60)
                res["server_cpu"] = (_cpu() - before) * args.duration / (args.duration + args.warmup)
                return res

            # Cases interleaved, `rounds` times; each case keeps its best round (the machine is shared).
            best: dict[tuple[str, int], dict] = {}

            def keep(label: str, conc: int, res: dict) -> None:
                if (label, conc) not in best or len(res["lat"]) / res["elapsed"] > len(best[label, conc]["lat"]) / best[label, conc]["elapsed"]:
                    best[label, conc] = res

            for _ in range(args.rounds):
                for conc in args.concurrency:
                    for label, srv in servers.items():
                        keep(label, conc, run(Endpoint(f"https://127.0.0.1:{srv.port}", PATH, *map(str, client_cert)), None, conc))
                    if relay is not None:
                        keep(RELAYED, conc, run(
                            Endpoint(f"https://127.0.0.1:{relay.servers['a'].port}", "/api/v1/keys/sc/enc_keys", *map(str, sa)),
                            Endpoint(f"https://127.0.0.1:{relay.servers['c'].port}", "/api/v1/keys/sa/dec_keys", *map(str, sc)),
                            conc))
            # the one-node cases once more at the highest concurrency, from a C client
            pem = d / "sae.pem"
            pem.write_text(Path(client_cert[0]).read_text() + Path(client_cert[1]).read_text())
            top = max(args.concurrency)
            for label in ("bare aiohttp (fixed JSON)", "ETSI 014 + Lkms + SQLite"):
                before = _cpu()
                res = ab_load(f"https://127.0.0.1:{servers[label].port}", pem, top, args.duration)
                if res is not None and res["n"] > 0:
                    ab_rows.append((f"{label}, ab client", top, res["rate"], res["p50"], res["p99"],
                                    (_cpu() - before) / res["n"] * 1e6, float("nan"), res["bad"]))
            for conc in args.concurrency:
                for label in [*servers, *([RELAYED] if relay is not None else [])]:
                    res = best[label, conc]
                    if label == RELAYED:
                        rows.append(_row("relayed 2 hops: enc_keys at A", conc, res, res["lat"]))
                        rows.append(_row("relayed 2 hops: dec_keys at C", conc, res, res["lat_dec"]))
                    else:
                        rows.append(_row(label, conc, res, res["lat"]))
    finally:
        for srv in servers.values():
            srv.stop()
        lkms.shutdown()
        durable.shutdown()
        if relay is not None:
            relay.stop()
        shutil.rmtree(d, ignore_errors=True)  # stores of a few hundred MB

    table = Table(title=f"ETSI 014 POST enc_keys {{\"number\": 1}}, mutual TLS, loopback, {os.cpu_count()} CPUs, "
                        f"{args.duration:g} s per case, best of {args.rounds} (target >= {TARGET:,} req/s)")
    for col in ("case", "concurrency", "req/s", "p50 ms", "p99 ms", "vs bare", "vs 1 node", "server CPU µs/req",
                "client CPU µs/req", "non-200"):
        table.add_column(col, justify="left" if col == "case" else "right")
    rows += ab_rows
    # ratios within the same client's rows: (client, concurrency) -> rate of the bare / one-node case
    base = {("ab client" in label, conc): rate for label, conc, rate, *_ in rows if label.startswith("bare")}
    one = {("ab client" in label, conc): rate for label, conc, rate, *_ in rows if label.startswith("ETSI")}
    for label, conc, rate, p50, p99, server, client, bad in rows:
        key = ("ab client" in label, conc)
        ratio = f"{rate / base[key]:.2f}x" if base.get(key) else "-"
        vs_one = f"{rate / one[key]:.2f}x" if one.get(key) and not label.startswith("bare") else "-"
        table.add_row(label, str(conc), f"{rate:,.0f}", f"{p50:.2f}", f"{p99:.2f}", ratio, vs_one, f"{server:,.0f}",
                      f"{client:,.0f}" if client == client else "-", str(bad))
    Console(width=170).print(table)
    print("server: every HttpsServer in a thread of one process (one event loop each; the relay nodes' forwarding "
          "modules too); client: one separate process, aiohttp keep-alive, one connection per concurrent worker "
          "and server. Relayed rows: req/s = keys delivered end to end (enc_keys at A, then dec_keys at C, same "
          "bytes) per second; latency of each request. CPU: user+system time of the servers' process and of the "
          "client's per request (relayed: per key, both requests). 'ab client' rows: the same requests from "
          "ApacheBench (apache2-utils; C, keep-alive, latency in whole ms), which leaves the server the CPU the "
          "Python client takes; their ratios are to the bare endpoint under ab.")


if __name__ == "__main__":
    main()
