"""ETSI GS QKD 014 key delivery throughput: `POST /api/v1/keys/{slave}/enc_keys` {"number": 1}
against the real front end (https.make_app + etsi014 routes over a real Lkms with both SAEs on
this node: end keys from the entropy source, stored in and delivered through the SQLite key
store), and against a bare aiohttp HTTPS endpoint with the same mutual-TLS context that returns
a fixed key container (the baseline, measured in the same run). Both servers run in threads of
this process (HttpsServer); the load comes from a separate process (aiohttp client, keep-alive,
one connection per concurrent worker) so the client does not share the servers' GIL.
Prints req/s, p50/p99 latency and the ratio to the bare endpoint at the same concurrency.

    .venv/bin/python bench/etsi014.py [--duration 5] [--concurrency 1 32]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from aiohttp import web
from rich.console import Console
from rich.table import Table

from sdqkd.agents.kms import etsi014, pki
from sdqkd.agents.kms.https import HttpsServer, make_app
from sdqkd.agents.kms.keystore import KeyStore
from sdqkd.agents.kms.lkms import Lkms, LkmsConfig

KME = str(uuid.uuid5(uuid.NAMESPACE_URL, "sdqkd-bench/etsi014/kme"))
MASTER, SLAVE = "sae-a", "sae-b"
PATH = f"/api/v1/keys/{SLAVE}/enc_keys"
BODY = b'{"number": 1}'
TARGET = 12_000  # req/s, the goal for real key delivery
MAX_REQUESTS = 2_000_000  # per case: the load loop is bounded by count as well as by time


# --- load generator (runs in a child process) ----------------------------------------------

def load(url: str, cert: str, key: str, ca: str, concurrency: int, duration: float, warmup: float) -> dict:
    """Keep `concurrency` requests in flight for `duration` s after `warmup` s; latencies of 200s."""
    return asyncio.run(_load(url, cert, key, ca, concurrency, duration, warmup))


async def _load(url: str, cert: str, key: str, ca: str, concurrency: int, duration: float, warmup: float) -> dict:
    import aiohttp  # noqa: PLC0415 (child process)

    ctx = pki.client_ssl_context(cert, key, ca)
    conn = aiohttp.TCPConnector(ssl=ctx, limit=concurrency, force_close=False)
    lat: list[float] = []
    bad = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(base_url=url, connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as s:
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
                async with s.post(PATH, data=BODY, headers=headers) as r:
                    payload = await r.read()
                    ok = r.status == 200
                done = time.perf_counter()
                if t >= start:
                    if ok and b'"keys"' in payload:
                        lat.append(done - t)
                    else:
                        bad += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"lat": lat, "bad": bad, "elapsed": elapsed}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per case")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each case")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="sdqkd-bench-014-"))
    ca = pki.make_ca(d / "ca", "bench-ca")
    server_cert = pki.issue(ca, KME, d / "kme", server_names=["127.0.0.1"], client=True)
    client_cert = pki.issue(ca, MASTER, d / "sae", client=True)

    lkms = Lkms(LkmsConfig(kme_id=KME, node="bench", saes={MASTER: KME, SLAVE: KME}, max_key_count=10_000_000),
                KeyStore(d / "keys.sqlite"), entropy=os.urandom)
    real = make_app()
    etsi014.add_routes(real, lkms)
    servers = {
        "bare aiohttp (fixed JSON)": HttpsServer(bare_app(), "127.0.0.1", 0, pki.server_ssl_context(*server_cert, ca[0])),
        "ETSI 014 + Lkms + SQLite": HttpsServer(real, "127.0.0.1", 0, pki.server_ssl_context(*server_cert, ca[0])),
    }
    rows = []
    try:
        for srv in servers.values():
            srv.start()
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            for conc in args.concurrency:
                for label, srv in servers.items():
                    fut = pool.submit(load, f"https://127.0.0.1:{srv.port}", str(client_cert[0]), str(client_cert[1]),
                                      str(ca[0]), conc, args.duration, args.warmup)
                    res = fut.result(timeout=args.duration + args.warmup + 60)
                    lat = sorted(res["lat"])
                    if not lat:
                        rows.append((label, conc, 0.0, float("nan"), float("nan"), res["bad"]))
                        continue
                    p50 = statistics.median(lat) * 1000
                    p99 = lat[int(0.99 * (len(lat) - 1))] * 1000
                    rows.append((label, conc, len(lat) / res["elapsed"], p50, p99, res["bad"]))
    finally:
        for srv in servers.values():
            srv.stop()
        lkms.shutdown()

    table = Table(title=f"ETSI 014 POST enc_keys {{\"number\": 1}}, mutual TLS, loopback, {os.cpu_count()} CPUs, "
                        f"{args.duration:g} s per case (target >= {TARGET:,} req/s)")
    for col in ("case", "concurrency", "req/s", "p50 ms", "p99 ms", "vs bare", "non-200"):
        table.add_column(col, justify="left" if col == "case" else "right")
    base = {conc: rate for label, conc, rate, *_ in rows if label.startswith("bare")}
    for label, conc, rate, p50, p99, bad in rows:
        ratio = f"{rate / base[conc]:.2f}x" if base.get(conc) else "-"
        table.add_row(label, str(conc), f"{rate:,.0f}", f"{p50:.2f}", f"{p99:.2f}", ratio, str(bad))
    Console(width=120).print(table)
    print("server: both HttpsServer threads in one process (one event loop each); "
          "client: one separate process, aiohttp keep-alive, one connection per concurrent request")


if __name__ == "__main__":
    main()
