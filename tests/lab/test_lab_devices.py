"""Real QKD devices declared in a topology file: an interface's `device` becomes an ETSI 014
driver in its agent's config, and `lab up` runs the link on the devices' keys.

The devices are not ours to control: they are the ETSI 014 KMEs of a second sdqkd lab
("vendor", two nodes joined by their own emulated link), reached over HTTPS with that lab's
CA and SAE certificates, as an operator reaches a vendor's KMEs. The lab under test
("site") knows nothing of the vendor lab but the URLs, SAE IDs and files in its topology."""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sdqkd.lab import failures, keys, launcher, plan, topology
from testlib import REPO

HEQA = next(p for p in json.loads((REPO / "lab" / "topologies" / "cloud.json").read_text())["sdqkd-lab:lab"]["profile"]
            if p["name"] == "heqa-dv-o")


def two_nodes(name: str, a: str, b: str, saes: tuple[str, str], **iface: Any) -> dict[str, Any]:
    """A two-node lab: one O-band DV link a:1 -> b:1 over one fibre, one SAE per node."""
    return {"sdqkd-lab:lab": {
        "name": name,
        "profile": [HEQA],
        "node": [{"name": n, "kms": True, "sae": [{"id": s}],
                  "qkd-interface": [{"id": 1, "profile": "heqa-dv-o", "role": f"etsi-qkd-node-types:{r}", **iface.get(n, {})}]}
                 for n, s, r in ((a, saes[0], "TRANSMITTER"), (b, saes[1], "RECEIVER"))],
        "fibre": [{"name": f"f-{a}-{b}".lower(), "a-end": {"node": a}, "b-end": {"node": b}, "length": "2.0", "loss": "3.0"}],
        "link": [{"name": f"{a}-{b}".lower(), "endpoints": [f"{a}:1", f"{b}:1"], "path": [f"f-{a}-{b}".lower()], "loss": "3.0"}],
    }}


def write(path: Path, topo: dict[str, Any]) -> Path:
    path.write_text(json.dumps(topo, indent=1))
    return path


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The devices: a running lab whose two KMEs share keys between SAEs dev-a and dev-b."""
    root = tmp_path_factory.mktemp("labs")
    topo = two_nodes("vendor", "VA", "VB", ("dev-a", "dev-b"))
    topo["sdqkd-lab:lab"]["key-link"] = [{"name": "devices", "master-sae": "dev-a", "slave-sae": "dev-b"}]
    data = launcher.up(write(root / "vendor.json", topo), root=root, free_ports=True, console=quiet())
    try:
        yield root, data
    finally:
        launcher.down("vendor", root)


def device(vendor_lab: dict[str, Any], node: str, peer_sae: str, base: Path | None = None) -> dict[str, Any]:
    """The `device` of an interface backed by the vendor's KME at `node` (paths relative to
    `base` when given, as an operator writes them next to the topology)."""
    n = next(x for x in vendor_lab["nodes"] if x["name"] == node)
    sae = n["saes"][0]

    def rel(p: str) -> str:
        return os.path.relpath(p, base) if base else p

    return {"url": n["kms"]["url"], "sae-id": sae["id"], "peer-sae-id": peer_sae,
            "ca-certificate": rel(vendor_lab["ca"]["cert"]), "certificate": rel(sae["cert"]), "private-key": rel(sae["key"])}


def site_topology(vendor_lab: dict[str, Any], base: Path) -> dict[str, Any]:
    return two_nodes("site", "SA", "SB", ("sae-sa", "sae-sb"),
                     SA={"device": device(vendor_lab, "VA", "dev-b", base)},
                     SB={"device": device(vendor_lab, "VB", "dev-a")})


def test_real_device_link_relays_an_application_key(vendor) -> None:
    root, vendor_lab = vendor
    path = write(root / "site.json", site_topology(vendor_lab, root))
    data = launcher.up(path, root=root, free_ports=True, console=quiet())
    try:
        cfg = json.loads(Path(next(n for n in data["nodes"] if n["name"] == "SA")["config"]).read_text())
        (mod,) = cfg["qkd_modules"]
        va = next(x for x in vendor_lab["nodes"] if x["name"] == "VA")
        assert mod["driver"] == "qkd-etsi014" and mod["etsi014"] == {
            "url": va["kms"]["url"], "sae_id": "dev-a", "peer_sae_id": "dev-b", "ca": vendor_lab["ca"]["cert"],
            "cert": va["saes"][0]["cert"], "key": va["saes"][0]["key"]}  # relative paths resolved
        st = launcher.status("site", root)
        assert [(lk["status"], lk["skr_kbps"] > 0) for lk in st["links"]] == [("ACTIVE", True)]
        # marked as a real-device link, with both devices' ETSI 014 URLs
        vb = next(x for x in vendor_lab["nodes"] if x["name"] == "VB")
        assert st["links"][0]["device"] == "real"
        assert sorted(st["links"][0]["device_urls"]) == sorted([va["kms"]["url"], vb["kms"]["url"]])
        res = keys.get(data, "SA", "SB")  # relayed over the device link; raises unless both ends agree
        assert len(res.key) == 32
        # the link's keys are the devices': without device VA the link stops
        failures.kill("VA", "vendor", root)
        deadline = time.monotonic() + 30
        while launcher.status("site", root)["links"][0]["status"] == "ACTIVE":
            assert time.monotonic() < deadline, "the link stayed ACTIVE without its device"
            time.sleep(0.5)
        failures.start("VA", "vendor", root)  # the driver finds its device again
        deadline = time.monotonic() + 60
        while launcher.status("site", root)["links"][0]["status"] != "ACTIVE":
            assert time.monotonic() < deadline, "the link did not come back with its device"
            time.sleep(0.5)
        assert keys.get(data, "SA", "SB").key_id != res.key_id
    finally:
        launcher.down("site", root)


def _device_lab(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A site topology with real devices whose files exist (contents are not read by check)."""
    def dev(sae: str, peer: str) -> dict[str, Any]:
        files = {}
        for leaf, mode in (("ca.pem", 0o644), ("cert.pem", 0o644), ("key.pem", 0o600)):
            p = tmp_path / f"{sae}-{leaf}"
            p.write_text("PEM")
            p.chmod(mode)
            files[leaf] = str(p)
        return {"url": "https://127.0.0.1:9443", "sae-id": sae, "peer-sae-id": peer,
                "ca-certificate": files["ca.pem"], "certificate": files["cert.pem"], "private-key": files["key.pem"]}

    topo = two_nodes("site", "SA", "SB", ("sae-sa", "sae-sb"), SA={"device": dev("dev-a", "dev-b")},
                     SB={"device": dev("dev-b", "dev-a")})
    return topo, tmp_path / "dev-a-key.pem"


def _iface(topo: dict[str, Any], node: str) -> dict[str, Any]:
    return next(n for n in topo["sdqkd-lab:lab"]["node"] if n["name"] == node)["qkd-interface"][0]


def _problems(topo: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(p.check, p.path, p.message) for p in topology.check(topology.decode(topo))]


def test_good_device_declaration_checks_and_plans(tmp_path: Path) -> None:
    topo, _ = _device_lab(tmp_path)
    assert _problems(topo) == []
    lp = plan.make(topology.decode(copy.deepcopy(topo)), tmp_path / "lab", free_ports=True)
    mods = {n: json.loads(p.config_path.read_text())["qkd_modules"][0] for n, p in lp.nodes.items()}  # type: ignore[union-attr]
    assert mods["SB"]["driver"] == "qkd-etsi014"
    assert mods["SB"]["etsi014"]["sae_id"] == "dev-b" and mods["SB"]["etsi014"]["peer_sae_id"] == "dev-a"
    assert mods["SA"]["etsi014"]["key"] == str(tmp_path / "dev-a-key.pem")
    emulated = plan.make(topology.decode(two_nodes("emu", "A", "B", ("s1", "s2"))), tmp_path / "emu", free_ports=True)
    mod = json.loads(emulated.nodes["A"].config_path.read_text())["qkd_modules"][0]  # type: ignore[union-attr]
    assert "driver" not in mod and "etsi014" not in mod  # emulated interfaces as before


def test_relative_device_files_resolve_from_the_topology_folder(tmp_path: Path) -> None:
    topo, key = _device_lab(tmp_path)
    _iface(topo, "SA")["device"]["private-key"] = "dev-a-key.pem"
    data = topology.load(write(tmp_path / "t.json", topo))
    assert topology.check(data) == []
    assert _iface(data, "SA")["device"]["private-key"] == str(key)


def _emulated_peer(topo: dict[str, Any], _: Path) -> None:
    del _iface(topo, "SB")["device"]


def _not_a_pair(topo: dict[str, Any], _: Path) -> None:
    _iface(topo, "SB")["device"]["peer-sae-id"] = "dev-x"


def _no_key(topo: dict[str, Any], _: Path) -> None:
    del _iface(topo, "SA")["device"]["private-key"]


def _open_key(topo: dict[str, Any], key: Path) -> None:
    key.chmod(0o644)


def _missing_ca(topo: dict[str, Any], key: Path) -> None:
    _iface(topo, "SA")["device"]["ca-certificate"] = str(key.parent / "nope.pem")


def _http(topo: dict[str, Any], _: Path) -> None:
    _iface(topo, "SA")["device"]["url"] = "http://127.0.0.1:9443"


def _own_sae(topo: dict[str, Any], _: Path) -> None:
    _iface(topo, "SA")["device"]["peer-sae-id"] = "dev-a"


def _no_link(topo: dict[str, Any], _: Path) -> None:
    lab = topo["sdqkd-lab:lab"]
    lab["node"][0]["qkd-interface"].append({**copy.deepcopy(_iface(topo, "SA")), "id": 2})


@pytest.mark.parametrize("mutate, check, path, message", [
    (_emulated_peer, "device-links", "link[name='sa-sb']/endpoints",
     "'SA:1' is a real device but 'SB:1' is emulated: both ends of a link are real devices of one pair, or both emulated"),
    (_not_a_pair, "device-links", "link[name='sa-sb']/endpoints", "the devices are not one pair: 'SA:1' is SAE 'dev-a'"),
    (_no_key, "devices", "qkd-interface[id='1']/device/private-key", "a device needs its private-key (PEM file)"),
    (_open_key, "devices", "qkd-interface[id='1']/device/private-key", "is open to others (mode 644): chmod 600 it"),
    (_missing_ca, "devices", "qkd-interface[id='1']/device/ca-certificate", "cannot be read: No such file"),
    (_http, "devices", "qkd-interface[id='1']/device/url", "a device's ETSI 014 API is https://host:port"),
    (_own_sae, "devices", "qkd-interface[id='1']/device/peer-sae-id", "peer-sae-id is this end's own sae-id 'dev-a'"),
    (_no_link, "devices", "qkd-interface[id='2']/device", "a real device needs the link to its peer device"),
])
def test_bad_device_declaration_is_one_problem(tmp_path: Path, mutate, check: str, path: str, message: str) -> None:
    topo, key = _device_lab(tmp_path)
    mutate(topo, key)
    problems = _problems(topo)
    assert len(problems) == 1, problems
    (got_check, got_path, got_message), = problems
    assert got_check == check and got_path.endswith(path) and message in got_message, problems
