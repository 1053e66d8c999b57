"""QKD-keyed IPsec: two real strongSwan charons (kernel-libipsec, user-space ESP over TUN)
in two network namespaces this test makes, IKEv2 with PSK + RFC 8784 PPK; then the
HTTPS API on the cloud lab (real agents, LKMS keys relayed through CCS). Checked with
ping through the tunnel and swanctl, strongSwan's own client."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from sdqkd import pki
from sdqkd.agents.qaas.strongswan import Charon, Endpoint, StrongswanError
from sdqkd.lab import hosts, launcher
from testlib import REPO

TOPOLOGIES = REPO / "lab" / "topologies"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN device)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun: kernel-libipsec needs TUN"
    if not shutil.which("ip") or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "no iproute2 network namespace support"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def ping(h: hosts.Host, dst: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", h.netns, "ping", "-c1", "-W1", "-I", h.inner, dst],
                          capture_output=True).returncode == 0


def swanctl(c: Charon, *args: str) -> str:
    """swanctl inside the daemon's own mount namespace (its /run, its VICI socket)."""
    assert c.pid is not None
    res = subprocess.run(["nsenter", "--target", str(c.pid), "--mount", "--net", "swanctl", *args],
                         capture_output=True, text=True, env={**os.environ, "STRONGSWAN_CONF": str(c.conf)})
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _key_in(text: str, key: bytes) -> bool:
    return key[:8].hex() in text.replace(" ", "").replace(":", "").lower()


@pytest.fixture
def pair(tmp_path):
    tag = f"t{os.getpid()}-{tmp_path.name[-6:]}"
    hs = hosts.plan(tag, ["a", "b"])
    hosts.up(tag, hs)
    a, b = Charon(hs[0].netns, tmp_path / "a"), Charon(hs[1].netns, tmp_path / "b")
    try:
        a.start()
        b.start()
        yield hs, a, b
    finally:
        a.stop()
        b.stop()
        hosts.down(tag, hs)
    assert not {h.netns for h in hs} & hosts.existing()


def test_tunnel_with_ppk_reauth_and_teardown(pair) -> None:
    (ha, hb), a, b = pair
    ea, eb = Endpoint(ha.address, ha.inner), Endpoint(hb.address, hb.inner)
    psk, ppk1, ppk2 = os.urandom(32), os.urandom(32), os.urandom(32)
    assert not ping(ha, hb.inner)  # the inner address is reachable through the tunnel only
    a.load("t", ea, eb, psk, "ppk-t", ppk1)
    b.load("t", eb, ea, psk, "ppk-t", ppk1)
    a.initiate("t")
    assert ping(ha, hb.inner) and ping(hb, ha.inner)
    sas = swanctl(a, "--list-sas")
    assert "ESTABLISHED" in sas and "/PPK" in sas and "INSTALLED" in sas, sas
    assert "PPK" in swanctl(b, "--list-sas")
    first = a.state("t")
    assert first is not None and first.ppk and first.child_spi_in == b.state("t").child_spi_out
    counters = swanctl(a, "--list-sas")
    assert " 1 packets" in counters or " 2 packets" in counters  # the pings went through the ESP SA

    b.set_ppk("t", "ppk-t", ppk2)
    a.set_ppk("t", "ppk-t", ppk2)
    second = a.reauthenticate("t")
    assert second.ppk and second.ike_spi_i != first.ike_spi_i and second.ike_spi_r != first.ike_spi_r
    assert {second.child_spi_in, second.child_spi_out}.isdisjoint({first.child_spi_in, first.child_spi_out})
    assert ping(ha, hb.inner)
    sas = swanctl(a, "--list-sas")
    assert first.ike_spi_i not in sas and second.ike_spi_i in sas and first.child_spi_in not in sas
    a.set_ppk("t", "ppk-t", os.urandom(32))  # re-authentication really uses the PPK loaded now:
    with pytest.raises(StrongswanError):  # with ends that disagree it fails...
        a.reauthenticate("t", timeout=2)
    assert a.state("t").ike_spi_i == second.ike_spi_i and ping(ha, hb.inner)  # ...and the old SA stays

    logs = (a.dir / "charon.log").read_text() + (b.dir / "charon.log").read_text()
    assert "using PPK for PPK_ID 'ppk-t'" in logs
    assert not any(_key_in(logs, k) for k in (psk, ppk1, ppk2))

    a.unload("t")  # closes the SAs at both ends (IKE DELETE)
    assert a.state("t") is None and b.state("t") is None and "t:" not in swanctl(b, "--list-sas")
    assert not ping(ha, hb.inner)
    pids = [a.pid, b.pid]
    a.stop()
    b.stop()
    assert all(p is not None and _gone(p) for p in pids)
    left = subprocess.run(["ip", "netns", "pids", ha.netns], capture_output=True, text=True).stdout
    assert not left.strip() and not ping(ha, hb.inner)


def test_ends_with_different_ppks_do_not_come_up(pair) -> None:
    (ha, hb), a, b = pair
    ea, eb = Endpoint(ha.address, ha.inner), Endpoint(hb.address, hb.inner)
    psk = os.urandom(32)
    a.load("t", ea, eb, psk, "ppk-t", os.urandom(32))
    b.load("t", eb, ea, psk, "ppk-t", os.urandom(32))
    with pytest.raises(StrongswanError):
        a.initiate("t", timeout=5)
    assert a.state("t") is None and b.state("t") is None
    assert "t:" not in swanctl(a, "--list-sas") and not ping(ha, hb.inner)
    assert "AUTHENTICATION_FAILED" in (a.dir / "charon.log").read_text()


# --- the API, on the cloud lab ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    root = tmp_path_factory.mktemp("ipsec-lab") / "lab"  # <lab dir>/lab, as the command lays it out
    data = launcher.up(TOPOLOGIES / "cloud.json", root=root, free_ports=True, console=Console(file=open(os.devnull, "w")))
    prefix = f"sdqkd-{hosts.lab_tag(data['name'], data['dir'])}-"
    try:
        yield data, prefix
    finally:
        launcher.down("cloud", root)
    assert not any(n.startswith(prefix) for n in hosts.existing())


def sdqkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdqkd", *args], capture_output=True, text=True, timeout=60)


def lab_env(data) -> dict[str, str]:
    """`sdqkd lab env`'s variables, read back as a shell would."""
    res = sdqkd("lab", "env", "--lab-dir", str(Path(data["dir"]).parent.parent), data["name"])
    assert res.returncode == 0, res.stderr
    return {k: shlex.split(v)[0] for k, v in (ln.removeprefix("export ").split("=", 1) for ln in res.stdout.splitlines())}


def _client(data, node: str) -> tuple[httpx.Client, str]:
    n = next(x for x in data["nodes"] if x["name"] == node)
    sae = n["saes"][0]
    ctx = pki.client_ssl_context(sae["cert"], sae["key"], data["ca"]["cert"])
    return httpx.Client(verify=ctx, timeout=60), n["kms"]["url"] + "/api/v1/ipsec"


def test_api_sets_up_reauths_and_deletes_both_ends(cloud) -> None:
    cloud, prefix = cloud
    cait, url_a = _client(cloud, "CAIT")
    rect, url_b = _client(cloud, "Rectorado")
    with cait, rect:
        r = cait.post(url_a, json={"to": "Rectorado", "reauth_interval": 2})
        assert r.status_code == 201, r.text
        t = r.json()
        assert t["state"] == "ESTABLISHED" and t["sa"]["ike"]["ppk"] and t["role"] == "initiator"
        tid = t["id"]
        peer = rect.get(f"{url_b}/{tid}").json()
        assert peer["role"] == "responder" and peer["ppk_key_id"] == t["ppk_key_id"]
        assert peer["sa"]["child"]["spi_in"] == t["sa"]["child"]["spi_out"]
        nss = sorted(n for n in hosts.existing() if n.startswith(prefix))
        # as the README shows it: the addresses from `sdqkd lab env`, the ping on CAIT's host by `sdqkd lab exec`
        env = lab_env(cloud)
        assert env["CAIT_NETNS"] in nss and env["RECTORADO_NETNS"] in nss
        ping_cmd = ["ping", "-c1", "-W2", "-I", env["CAIT_INNER"], env["RECTORADO_INNER"]]
        assert sdqkd("lab", "exec", "--lab-dir", env["SDQKD_LAB_DIR"], "CAIT", "--", *ping_cmd).returncode == 0

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = cait.get(f"{url_a}/{tid}").json()
            if now["reauths"] >= 1 and now["sa"] and now["sa"]["ike"]["spi_i"] != t["sa"]["ike"]["spi_i"]:
                break
            time.sleep(0.5)
        assert now["reauths"] >= 1 and now["ppk_key_id"] != t["ppk_key_id"], now
        assert now["sa"]["child"]["spi_in"] != t["sa"]["child"]["spi_in"] and now["sa"]["ike"]["ppk"]
        assert t["created"] <= t["established"] <= now["established"] <= time.time() + 1
        listed = cait.get(url_a).json()["tunnels"]
        assert [x["id"] for x in listed] == [tid]
        again = cait.post(url_a, json={"to": "Rectorado"})  # one tunnel per pair of hosts
        assert again.status_code == 409 and tid in again.json()["message"]

        assert rect.delete(f"{url_b}/{tid}").status_code == 409  # the initiator owns it
        assert cait.delete(f"{url_a}/{tid}").status_code == 204
        assert cait.get(f"{url_a}/{tid}").status_code == 404 and rect.get(f"{url_b}/{tid}").status_code == 404
        for ns in nss:
            assert not subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.strip()
        assert sdqkd("lab", "exec", "--lab-dir", env["SDQKD_LAB_DIR"], "CAIT", "--", *ping_cmd).returncode != 0
        r = cait.post(url_a, json={"to": "Rectorado"})  # the pair is free again, the daemons start anew
        assert r.status_code == 201 and r.json()["sa"]["ike"]["ppk"], r.text
        assert cait.delete(f"{url_a}/{r.json()['id']}").status_code == 204

        # bad input
        for body, status in [({"to": "Nowhere"}, 404), ({"to": "CCS"}, 400), ({"to": "CAIT"}, 400),
                             ({}, 400), ({"to": "Rectorado", "reauth_interval": 0}, 400),
                             ({"to": "Rectorado", "reauth_interval": True}, 400)]:
            r = cait.post(url_a, json=body)
            assert r.status_code == status and r.json()["message"], (body, r.text)
        r = cait.post(url_a, content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["message"]
        assert cait.delete(f"{url_a}/not-a-tunnel").status_code == 404
        # only a node's KME may set up a responder end: an SAE certificate is not a KME's
        r = rect.put(f"{url_b}/{tid}/peer", json={"from": "CAIT", "key_ids": [tid, tid]})
        assert r.status_code == 401 and r.json()["message"] == "a KME client certificate is required"

    logs = "".join(Path(n["log"]).read_text() for n in cloud["nodes"])
    assert "Traceback" not in logs


# --- the lab's hosts in the topology, plan and agent config ------------------------------------

def test_cloud_plan_gives_hosts_to_cait_and_rectorado(tmp_path) -> None:
    from sdqkd.agents import config
    from sdqkd.lab import plan as lab_plan
    from sdqkd.lab import topology

    lab = topology.load(TOPOLOGIES / "cloud.json")
    plan = lab_plan.make(lab, tmp_path, free_ports=True)
    assert set(plan.hosts) == {"CAIT", "Rectorado"}
    cfgs = {n: config.load(p.config_path) for n, p in plan.nodes.items()}
    assert cfgs["CCS"].ipsec is None
    cait = cfgs["CAIT"].ipsec
    assert cait.sae_id == "sae-cait" and cait.netns == plan.hosts["CAIT"].netns
    assert set(cait.peers) == {"Rectorado"} and cait.peers["Rectorado"].inner == plan.hosts["Rectorado"].inner
    assert cait.peers["Rectorado"].api == ["127.0.0.1", plan.nodes["Rectorado"].kms_port]
    # another lab directory, other namespaces: two cloud labs can run side by side
    assert lab_plan.make(lab, tmp_path / "other", free_ports=True).hosts["CAIT"].netns != cait.netns

    bad = json.loads(json.dumps(lab))
    next(n for n in bad["sdqkd-lab:lab"]["node"] if n["name"] == "CAIT")["host"] = {"sae": "sae-ccs"}
    problems = topology.check(bad)
    assert any("host/sae" in p.path and "sae-ccs" in p.message for p in problems), problems
    data = json.loads(Path(plan.nodes["CAIT"].config_path).read_text())
    data["ipsec"]["peers"]["Rectorado"]["api"] = "nowhere"
    del data["kms"]
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert any("ipsec.peers.Rectorado.api" in p for p in err.value.problems)
