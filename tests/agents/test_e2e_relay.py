"""Three agent processes A - B - C with emulated QKD pairs on two fibres. Paths are
configured over NETCONF exactly as the controller does (PHYS links on both ends,
a VIRT link on every hop, applications at the ends); SAEs fetch keys through ETSI 014
over mutual TLS: A and C, two hops apart, get identical keys for the same key ID,
relayed through B. No key byte appears in any agent's log."""
from __future__ import annotations

import base64
import ssl
import time

import httpx
import pytest
from lxml import etree

from agentproc import AgentProc
from sdqkd.lab import plan as lab_plan

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
L1, L2 = "aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"
V = "bbbbbbbb-0000-4000-8000-0000000000ac"
APP_AC, APP_AB = "cccccccc-0000-4000-8000-0000000000ac", "cccccccc-0000-4000-8000-0000000000ab"

PROFILE = {"name": "dv", "technology": "etsi-qkd-node-types:DV-QKD", "band": "O-band", "max-absorption": "20.0",
           "reference-skr": "300.0", "reference-loss": "4.0", "qber": "2.5"}
TOPOLOGY = {"sdqkd-lab:lab": {
    "name": "line",
    "profile": [PROFILE],
    "node": [
        {"name": "A", "qkd-interface": [{"id": 1, "profile": "dv"}], "sae": [{"id": "sae-a"}]},
        {"name": "B", "qkd-interface": [{"id": 1, "profile": "dv"}, {"id": 2, "profile": "dv"}], "sae": [{"id": "sae-b"}]},
        {"name": "C", "qkd-interface": [{"id": 1, "profile": "dv"}], "sae": [{"id": "sae-c"}]},
    ],
    "fibre": [{"name": "ab", "a-end": {"node": "A"}, "b-end": {"node": "B"}, "length": "10.0", "loss": "4.0"},
              {"name": "bc", "a-end": {"node": "B"}, "b-end": {"node": "C"}, "length": "8.0", "loss": "3.5"}],
    "link": [{"name": "l1", "endpoints": ["A:1", "B:1"], "path": ["ab"]},
             {"name": "l2", "endpoints": ["B:2", "C:1"], "path": ["bc"]}],
}}


def phys(lid: str, local: str, lq: int, remote: str, rq: int, role: str) -> str:
    return (f"<qkd_link><qkdl_id>{lid}</qkdl_id><qkdl_enable>true</qkdl_enable>"
            f"<qkdl_local><qkdn_id>{local}</qkdn_id><qkdi_id>{lq}</qkdi_id></qkdl_local>"
            f"<qkdl_remote><qkdn_id>{remote}</qkdn_id><qkdi_id>{rq}</qkdi_id></qkdl_remote>"
            f"<qkdl_type>t:PHYS</qkdl_type><phys_qkd_role>t:{role}</phys_qkd_role></qkd_link>")


def virt(local: str, remote: str, prev: str | None, nxt: str | None) -> str:
    hops = (f"<virt_prev_hop>{prev}</virt_prev_hop>" if prev else "") + (f"<virt_next_hop>{nxt}</virt_next_hop>" if nxt else "")
    return (f"<qkd_link><qkdl_id>{V}</qkdl_id><qkdl_enable>true</qkdl_enable><qkdl_local><qkdn_id>{local}</qkdn_id></qkdl_local>"
            f"<qkdl_remote><qkdn_id>{remote}</qkdn_id></qkdl_remote><qkdl_type>t:VIRT</qkdl_type>{hops}</qkd_link>")


def app(app_id: str, server: str, client: str, backing: str, local: str, remote: str) -> str:
    return (f"<qkd_app><app_id>{app_id}</app_id><app_type>t:CLIENT</app_type><server_app_id>{server}</server_app_id>"
            f"<client_app_id>{client}</client_app_id><app_qos><ttl>600</ttl></app_qos><backing_qkdl_id>{backing}</backing_qkdl_id>"
            f"<local_qkdn_id>{local}</local_qkdn_id><remote_qkdn_id>{remote}</remote_qkdn_id></qkd_app>")


def config(links: str, apps: str = "") -> str:
    return (f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}" xmlns:t="{TYPES}"><qkd_applications>{apps}</qkd_applications>'
            f"<qkd_links>{links}</qkd_links></qkd_node></config>")


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("line")
    plan = lab_plan.make(TOPOLOGY, tmp, free_ports=True)
    procs = {}
    for name, np in plan.nodes.items():
        procs[name] = AgentProc(name, np.qkdn_id, np.netconf_port, np.config_path, np.dir).start()
    yield plan, procs
    for p in procs.values():
        p.stop()


def sae_client(plan, sae: str) -> httpx.Client:
    cert, key = plan.nodes[next(n for n, np in plan.nodes.items() if sae in np.saes)].sae_certs[sae]
    ctx = ssl.create_default_context(cafile=str(plan.ca[0]))
    ctx.load_cert_chain(str(cert), str(key))
    return httpx.Client(verify=ctx, timeout=20)


def wait_active(m, lid: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        data = m.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_links><qkd_link><qkdl_id>{lid}</qkdl_id>'
                                         "<qkdl_status/></qkd_link></qkd_links></qkd_node>")).data
        st = data.findtext(f".//{{{ETSI}}}qkdl_status") or ""
        if st.endswith("ACTIVE"):
            return
        time.sleep(0.2)
    raise AssertionError(f"link {lid} did not come up")


def test_keys_relayed_two_hops_through_etsi014(line) -> None:
    plan, procs = line
    a, b, c = (plan.nodes[n] for n in "ABC")
    m = {n: procs[n].connect(password=plan.password) for n in "ABC"}
    try:
        m["A"].create_subscription()
        provision(plan, m)
        for n, lid in (("A", L1), ("B", L1), ("B", L2), ("C", L2)):
            wait_active(m[n], lid)
        time.sleep(1.5)  # let some link key accumulate

        with sae_client(plan, "sae-a") as sa, sae_client(plan, "sae-c") as sc, sae_client(plan, "sae-b") as sb:
            base_a, base_c, base_b = (f"https://127.0.0.1:{x.kms_port}/api/v1/keys" for x in (a, c, b))
            status = sa.get(f"{base_a}/sae-c/status").json()
            assert status["source_KME_ID"] == a.qkdn_id and status["target_KME_ID"] == c.qkdn_id
            assert status["stored_key_count"] > 0
            r = sa.post(f"{base_a}/sae-c/enc_keys", json={"number": 3, "size": 256, "some_future_field": 1})
            assert r.status_code == 200, r.text
            keys = r.json()["keys"]
            r = sc.post(f"{base_c}/sae-a/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
            assert r.status_code == 200, r.text
            assert r.json()["keys"] == keys
            assert all(len(base64.b64decode(k["key"])) == 32 for k in keys)
            # delivered once only
            again = sc.get(f"{base_c}/sae-a/dec_keys", params={"key_ID": keys[0]["key_ID"]})
            assert again.status_code == 400 and "message" in again.json()
            # adjacent pair, GET forms
            r = sa.get(f"{base_a}/sae-b/enc_keys", params={"number": 2})
            kab = r.json()["keys"]
            got = [sb.get(f"{base_b}/sae-a/dec_keys", params={"key_ID": k["key_ID"]}).json()["keys"][0] for k in kab]
            assert got == kab
            # no application between B and C yet: 503, and the controller is told
            r = sb.get(f"{base_b}/sae-c/enc_keys")
            assert r.status_code == 503 and "message" in r.json()

        seen = []
        end = time.monotonic() + 5
        while time.monotonic() < end:
            n = m["A"].take_notification(block=True, timeout=0.5)
            if n is not None:
                seen.append(etree.fromstring(n.notification_xml.encode()))
        assert any(etree.QName(x[1]).localname == "sdqkdn_link_perf_update" for x in seen)

        # ETSI 015 application statistics count the consumed key
        data = m["A"].get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_applications><qkd_app><app_id>{APP_AC}</app_id>'
                                                '<app_statistics/></qkd_app></qkd_applications></qkd_node>')).data
        assert int(data.findtext(f".//{{{ETSI}}}consumed_bits")) == 3 * 256
    finally:
        for x in m.values():
            x.close_session()
    for p in procs.values():
        text = p.log()
        for k in keys + kab:
            assert k["key"] not in text
            assert base64.b64decode(k["key"]).hex() not in text


def provision(plan, m) -> None:
    """The path A - B - C: PHYS links A-B and B-C, the VIRT link A-C through B, the
    applications A-C and A-B (merge: the same entries again change nothing)."""
    a, b, c = (plan.nodes[n] for n in "ABC")
    m["A"].edit_config(target="running", config=config(
        phys(L1, a.qkdn_id, 1, b.qkdn_id, 1, "TRANSMITTER") + virt(a.qkdn_id, c.qkdn_id, None, b.qkdn_id),
        app(APP_AC, "sae-a", "sae-c", V, a.qkdn_id, c.qkdn_id) + app(APP_AB, "sae-a", "sae-b", L1, a.qkdn_id, b.qkdn_id)))
    m["B"].edit_config(target="running", config=config(
        phys(L1, b.qkdn_id, 1, a.qkdn_id, 1, "RECEIVER") + phys(L2, b.qkdn_id, 2, c.qkdn_id, 1, "TRANSMITTER")
        + virt(b.qkdn_id, c.qkdn_id, a.qkdn_id, c.qkdn_id), app(APP_AB, "sae-a", "sae-b", L1, b.qkdn_id, a.qkdn_id)))
    m["C"].edit_config(target="running", config=config(
        phys(L2, c.qkdn_id, 1, b.qkdn_id, 2, "RECEIVER") + virt(c.qkdn_id, a.qkdn_id, b.qkdn_id, None),
        app(APP_AC, "sae-a", "sae-c", V, c.qkdn_id, a.qkdn_id)))


def provisioned_and_relaying(plan, procs) -> None:
    """The path A - B - C provisioned over NETCONF, its PHYS links ACTIVE at both ends, and
    one key relayed A -> C: the state the kill -9 tests start from."""
    m = {n: procs[n].connect(password=plan.password) for n in "ABC"}
    try:
        provision(plan, m)
        for n, lid in (("A", L1), ("B", L1), ("B", L2), ("C", L2)):
            wait_active(m[n], lid)
        relay_once(plan, 20)
    finally:
        for x in m.values():
            x.close_session()


def relay_once(plan, timeout: float) -> float:
    """Seconds until one key A -> C (two hops) is served and C gives the same key by its ID."""
    a, c = plan.nodes["A"], plan.nodes["C"]
    start = time.monotonic()
    with sae_client(plan, "sae-a") as sa, sae_client(plan, "sae-c") as sc:
        while True:
            r = sa.post(f"https://127.0.0.1:{a.kms_port}/api/v1/keys/sae-c/enc_keys", json={"number": 1})
            if r.status_code == 200:
                keys = r.json()["keys"]
                got = sc.post(f"https://127.0.0.1:{c.kms_port}/api/v1/keys/sae-a/dec_keys",
                              json={"key_IDs": [{"key_ID": keys[0]["key_ID"]}]})
                assert got.status_code == 200 and got.json()["keys"] == keys, got.text
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, f"no key through B after {timeout} s: {r.status_code} {r.text}"
            time.sleep(0.2)


def test_transit_node_killed_comes_back_provisioned_and_relays_again(line) -> None:
    """kill -9 of the transit node B: started again on its state directory, with no NETCONF
    edit from anyone, it has its links, VIRT link and application back (persisted running),
    its QKD links come up again (drivers re-applied) and the LKMS relays keys A -> C through it."""
    plan, procs = line
    provisioned_and_relaying(plan, procs)
    procs["B"].kill()
    procs["B"].start()
    mb = procs["B"].connect(password=plan.password)
    try:
        data = mb.get_config("running").data
        assert {x.text for x in data.iter(f"{{{ETSI}}}qkdl_id")} == {L1, L2, V}
        assert data.findtext(f".//{{{ETSI}}}qkd_app/{{{ETSI}}}app_id") == APP_AB
        wait_active(mb, L1)
        wait_active(mb, L2)
    finally:
        mb.close_session()
    assert relay_once(plan, 30) < 30


def stored(plan) -> int:
    """A's ETSI 014 status for sae-a -> sae-c: the keys it could relay now (its link keys to B)."""
    a = plan.nodes["A"]
    with sae_client(plan, "sae-a") as sa:
        r = sa.get(f"https://127.0.0.1:{a.kms_port}/api/v1/keys/sae-c/status")
        assert r.status_code == 200, r.text
        return int(r.json()["stored_key_count"])


def settled(plan, timeout: float = 15) -> int:
    """stored() once no more link keys arrive (the link to B is down: nothing is distilled)."""
    last, end = stored(plan), time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(1.0)
        now = stored(plan)
        if now == last:
            return now
        last = now
    raise AssertionError("A's link keys to B kept changing with B down")


def fail_50(plan, status: int) -> list[str]:
    """50 key requests A -> C that fail with `status`; their error messages."""
    a = plan.nodes["A"]
    seen = []
    with sae_client(plan, "sae-a") as sa:
        for _ in range(50):
            r = sa.post(f"https://127.0.0.1:{a.kms_port}/api/v1/keys/sae-c/enc_keys", json={"number": 1})
            assert r.status_code == status, r.text
            seen.append(r.json()["message"])
    return seen


def test_failed_relays_through_a_dead_or_empty_transit_node_use_no_link_key(line) -> None:
    """The issue's case: transit B killed (unreachable), then back with an empty running (it
    refuses: "not a PHYS link"); 50 requests A -> C each time leave A's link keys as they were;
    once B is provisioned again keys flow, A and B agreeing on the link keys they hold."""
    plan, procs = line
    provisioned_and_relaying(plan, procs)
    procs["B"].kill()
    before = settled(plan)
    assert before > 0
    fail_50(plan, 503)
    assert stored(plan) == before
    (procs["B"].state_dir / "state" / "running.xml").unlink()  # B comes back as a fresh node would
    procs["B"].start()
    refusals = fail_50(plan, 400)
    assert all("not a PHYS link" in t for t in refusals), refusals[0]
    assert stored(plan) == before
    m = {n: procs[n].connect(password=plan.password) for n in "ABC"}
    try:
        provision(plan, m)
        wait_active(m["B"], L1)
        wait_active(m["B"], L2)
    finally:
        for x in m.values():
            x.close_session()
    relay_once(plan, 30)
