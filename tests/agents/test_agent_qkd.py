"""Two agent processes with emulated QKD modules on one fibre: a PHYS link set up over
NETCONF comes up, reports SKR and QBER in <get>, and a fibre cut (done to the shared
optical plant, as the lab does) sends ETSI 015 notifications."""
from __future__ import annotations

import json
import secrets
import time
import uuid

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from agentproc import agent_config, free_port
from sdqkd import yangdata, yangmodels
from sdqkd.agents.emulation.plant import Plant
from sdqkd.lab import plan as lab_plan
from testlib import run

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
LINK = "5a1e0000-0000-4000-8000-0000000000ab"
ONOS_LINK = "5a1e0000-0000-4000-8000-0000000000cd"
TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"
BOB_CHANNEL = 34  # bob's module has one fixed DWDM channel

TOPOLOGY = {
    "sdqkd-lab:lab": {
        "name": "pair",
        "domain": [{"name": "RM"}],
        "profile": [{
            "name": "dv-o", "vendor": "Toshiba", "model": "QKD-MU", "technology": "etsi-qkd-node-types:DV-QKD",
            "protocol": "BB84-decoy", "band": "O-band", "max-absorption": "20.0", "reference-skr": "40.0",
            "reference-loss": "5.0", "qber": "3.0", "qber-noise": "0.3",
        }],
        "node": [
            {"name": "alice", "domain": "RM", "qkd-interface": [{"id": 1, "profile": "dv-o", "role": "etsi-qkd-node-types:TRANSMITTER"}]},
            {"name": "bob", "domain": "RM", "qkd-interface": [{"id": 1, "profile": "dv-o", "role": "etsi-qkd-node-types:RECEIVER"}]},
        ],
        "fibre": [{"name": "f-ab", "a-end": {"node": "alice"}, "b-end": {"node": "bob"}, "length": "12.0", "loss": "4.0",
                   "classical-channel": [{"name": "c1", "channel": "34", "rate": "10.0"}]}],
        "link": [{"name": "ab", "endpoints": ["alice:1", "bob:1"], "path": ["f-ab"]}],
    }
}


def test_topology_is_a_valid_sdqkd_lab_instance(tmp_path, yanglint) -> None:
    assert yangdata.validate_json(TOPOLOGY).json["sdqkd-lab:lab"]["node"][0]["name"] == "alice"
    (tmp_path / "lab.json").write_text(json.dumps(TOPOLOGY))
    mods = [str(yangmodels.module_path(m)) for m in ("etsi-qkd-node-types", "sdqkd-lab")]
    proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "config", *mods, str(tmp_path / "lab.json")])
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    plant_state = tmp / "plant.sqlite"
    key = secrets.token_hex(32)
    ids = {n: str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/{n}")) for n in ("alice", "bob")}
    service = {n: free_port() for n in ids}
    agents = {}
    for name, role in (("alice", "TRANSMITTER"), ("bob", "RECEIVER")):
        other = "bob" if name == "alice" else "alice"
        extra = {
            "plant": {"inventory": lab_plan.plant_inventory(TOPOLOGY["sdqkd-lab:lab"]), "state": str(plant_state)},
            "service_key": key,
            "qkd_modules": [{"qkdi_id": 1, "role": role, "service_port": service[name],
                             "profile": lab_plan.resolved_profile(TOPOLOGY["sdqkd-lab:lab"], name, 1, "dv-o").to_dict(),
                             **({"channel": BOB_CHANNEL} if name == "bob" else {})}],
            "peers": {ids[other]: {"node": other, "service": {"1": ["127.0.0.1", service[other]]}}},
        }
        agents[name] = agent_config(tmp, name, ids[name], extra=extra).start()
    yield agents, Plant(TOPOLOGY, plant_state)
    for a in agents.values():
        a.stop()


def link_config(local: str, remote: str, role: str, enable: bool = True) -> str:
    return (
        f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}" xmlns:t="urn:etsi:qkd:yang:etsi-qkd-node-types">'
        f"<qkd_links><qkd_link><qkdl_id>{LINK}</qkdl_id><qkdl_enable>{str(enable).lower()}</qkdl_enable>"
        f"<qkdl_local><qkdn_id>{local}</qkdn_id><qkdi_id>1</qkdi_id></qkdl_local>"
        f"<qkdl_remote><qkdn_id>{remote}</qkdn_id><qkdi_id>1</qkdi_id></qkdl_remote>"
        f"<qkdl_type>t:PHYS</qkdl_type><phys_channel_att>4.0</phys_channel_att><phys_qkd_role>t:{role}</phys_qkd_role>"
        "</qkd_link></qkd_links></qkd_node></config>"
    )


def link_state(m) -> tuple[str | None, int]:
    data = m.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_links/></qkd_node>')).data
    status = data.findtext(f".//{{{ETSI}}}qkdl_status")
    skr = data.findtext(f".//{{{ETSI}}}skr")
    return (status.rsplit(":", 1)[-1] if status else None), int(skr or 0)


def wait_status(m, want: str, timeout: float = 15.0) -> int:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = link_state(m)
        if last[0] == want:
            return last[1]
        time.sleep(0.2)
    raise AssertionError(f"link is {last}, not {want}")


def notifications(m, timeout: float) -> list[etree._Element]:
    out = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = m.take_notification(block=True, timeout=0.5)
        if n is not None:
            out.append(etree.fromstring(n.notification_xml.encode()))
    return out


def test_phys_link_comes_up_and_reacts_to_a_fibre_cut(pair, tmp_path, yanglint) -> None:
    agents, plant = pair
    alice, bob = agents["alice"], agents["bob"]
    ma, mb = alice.connect(), bob.connect()
    try:
        ma.create_subscription()
        mb.edit_config(target="running", config=link_config(bob.qkdn_id, alice.qkdn_id, "RECEIVER"))
        ma.edit_config(target="candidate", config=link_config(alice.qkdn_id, bob.qkdn_id, "TRANSMITTER"))
        ma.commit()
        skr_a = wait_status(ma, "ACTIVE")
        wait_status(mb, "ACTIVE")
        time.sleep(2.5)
        _, skr_a = link_state(ma)
        _, skr_b = link_state(mb)
        assert skr_a > 1000 and skr_b > 1000  # ~tens of kb/s at 4 dB for this profile
        # The operational view validates against our modules (with the link's key stock).
        data = ma.get().data
        node = data.find(f"{{{ETSI}}}qkd_node")
        assert int(node.findtext(".//{urn:sdqkd:yang:sdqkd-key-stock}stored-keys")) > 0
        (tmp_path / "get.xml").write_text(etree.tostring(node, encoding="unicode"))
        mods = [str(yangmodels.module_path(n)) for n in ("etsi-qkd-node-types", "etsi-qkd-sdn-node", "sdqkd-key-stock")]
        proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "data", *mods, str(tmp_path / "get.xml")])
        assert proc.returncode == 0, proc.stderr
        qber = node.findtext(f".//{{{ETSI}}}phys_perf/{{{ETSI}}}value")
        assert qber is not None and 0.0 < float(qber) < 0.11

        plant.cut_fibre("f-ab")
        wait_status(ma, "PASSIVE")
        got = notifications(ma, 3.0)
        names = {etree.QName(n[1]).localname for n in got if len(n) > 1}
        assert "sdqkdn_link_down" in names, names
        down = next(n for n in got if etree.QName(n[1]).localname == "sdqkdn_link_down")
        assert down.findtext(f".//{{{ETSI}}}qkdl_id") == LINK
        for i, n in enumerate(got):  # every notification is valid against the module
            (tmp_path / f"n{i}.xml").write_text(etree.tostring(n[1], encoding="unicode"))
            proc = run([yanglint, "-p", str(yangmodels.YANG_DIR), "-t", "notif", *mods, str(tmp_path / f"n{i}.xml")])
            assert proc.returncode == 0, proc.stderr
        plant.cut_fibre("f-ab", cut=False)
        wait_status(ma, "ACTIVE")

        # Disabling the link through NETCONF stops it on this end.
        ma.edit_config(target="running", config=link_config(alice.qkdn_id, bob.qkdn_id, "TRANSMITTER", enable=False))
        wait_status(ma, "OFF")
    finally:
        for m in (ma, mb):  # the interfaces are free for the next link
            m.edit_config(target="running", config=(
                f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}"><qkd_links><qkd_link xmlns:nc="{NC}" nc:operation="remove">'
                f"<qkdl_id>{LINK}</qkdl_id></qkd_link></qkd_links></qkd_node></config>"))
            m.close_session()


# --- ONOS's QKD app and driver (org.onosproject.drivers.quantum, org.quantum.app) ------------
# What they send, as they send it: edit-config on running with qkdl_status written with the
# etsi-qkdn-types prefix declared on the leaf, inside a <config> that declares nc.

ONOS_TYPES = f'xmlns:etsi-qkdn-types="{TYPES}"'


def onos_edit(m, body: str) -> None:
    m.edit_config(target="running", config=(
        f'<config xmlns="{NC}" xmlns:nc="{NC}"><qkd_node xmlns="{ETSI}"><qkd_links>{body}</qkd_links></qkd_node></config>'))


def onos_create(local: str, remote: str, role: str) -> str:
    """QkdLinkManager.createLinkFilterSource / Destination: a PHYS link, created OFF."""
    return (f"<qkd_link><qkdl_id>{ONOS_LINK}</qkdl_id>"
            f"<qkdl_status {ONOS_TYPES}>etsi-qkdn-types:OFF</qkdl_status><qkdl_enable>true</qkdl_enable>"
            f"<qkdl_local><qkdn_id>{local}</qkdn_id><qkdi_id>1</qkdi_id></qkdl_local>"
            f"<qkdl_remote><qkdn_id>{remote}</qkdn_id><qkdi_id>1</qkdi_id></qkdl_remote>"
            f"<qkdl_type {ONOS_TYPES}>etsi-qkdn-types:PHYS</qkdl_type>"
            f"<phys_qkd_role {ONOS_TYPES}>etsi-qkdn-types:{role}</phys_qkd_role></qkd_link>")


def onos_activate(attenuation: float, channel: int) -> str:
    """QkdLinkManager.activateLinkFilter."""
    return (f"<qkd_link><qkdl_id>{ONOS_LINK}</qkdl_id>"
            f"<qkdl_status {ONOS_TYPES}>etsi-qkdn-types:ACTIVE</qkdl_status>"
            f"<phys_channel_att>{attenuation:.2f}</phys_channel_att><phys_wavelength>{channel}</phys_wavelength></qkd_link>")


def onos_status(status: str) -> str:
    """QkdLinkManager.deactivateLinkFilter (OFF), or any other qkdl_status alone."""
    return f"<qkd_link><qkdl_id>{ONOS_LINK}</qkdl_id><qkdl_status {ONOS_TYPES}>etsi-qkdn-types:{status}</qkdl_status></qkd_link>"


def onos_lambdas(wavelength_range: str) -> list[int]:
    """QuantumLambdaQuery.queryLambdas: split on "-", first and last channel, every channel between."""
    min_max = wavelength_range.split("-")  # "34": no second number (an exception in ONOS)
    lo, hi = min_max[0], min_max[1]
    return list(range(int(lo), int(hi) + 1))


def onos_link(m) -> tuple[str | None, int]:
    """(status, SKR) of ONOS's link in <get>."""
    filt = f'<qkd_node xmlns="{ETSI}"><qkd_links><qkd_link><qkdl_id>{ONOS_LINK}</qkdl_id></qkd_link></qkd_links></qkd_node>'
    data = m.get(filter=("subtree", filt)).data
    status = data.findtext(f".//{{{ETSI}}}qkdl_status")
    return (status.rsplit(":", 1)[-1] if status else None), int(data.findtext(f".//{{{ETSI}}}skr") or 0)


def wait_onos(ms, want: str, timeout: float = 15.0) -> list[int]:
    end = time.monotonic() + timeout
    seen = [onos_link(m) for m in ms]
    while time.monotonic() < end and any(s != want for s, _ in seen):
        time.sleep(0.2)
        seen = [onos_link(m) for m in ms]
    assert all(s == want for s, _ in seen), f"ONOS's link is {seen}, not {want}"
    return [skr for _, skr in seen]


def interfaces(m) -> dict[int, etree._Element]:
    data = m.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkd_interfaces/></qkd_node>')).data
    return {int(i.findtext(f"{{{ETSI}}}qkdi_id")): i for i in data.iter(f"{{{ETSI}}}qkd_interface")}


def test_wavelength_range_reads_as_onos_parses_it(pair) -> None:
    """A fixed-channel module's wavelength_range is one N-M range (ONOS's parser needs the
    dash), still an ETSI wavelength-range-type (libyang encoded it)."""
    agents, _ = pair
    m = agents["bob"].connect()
    try:
        rng = interfaces(m)[1].findtext(f"{{{ETSI}}}qkdi_capabilities/{{{ETSI}}}wavelength_range")
        assert rng == f"{BOB_CHANNEL}-{BOB_CHANNEL}"
        assert onos_lambdas(rng) == [BOB_CHANNEL]
    finally:
        m.close_session()


def test_every_interface_shows_its_status(pair) -> None:
    """qkdi_status for every interface: its module's, or DISABLED when no module serves it."""
    agents, _ = pair
    m = agents["alice"].connect()
    spare = f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}"><qkd_interfaces><qkd_interface{{op}}><qkdi_id>7</qkdi_id>' \
            "<qkdi_model>spare slot</qkdi_model></qkd_interface></qkd_interfaces></qkd_node></config>"
    try:
        m.edit_config(target="running", config=spare.format(op=""))
        status = {k: (i.findtext(f"{{{ETSI}}}qkdi_status") or "").rsplit(":", 1)[-1] for k, i in interfaces(m).items()}
        assert status == {1: "ENABLED", 7: "DISABLED"}
    finally:
        m.edit_config(target="running", config=spare.format(op=f' xmlns:nc="{NC}" nc:operation="delete"'))
        m.close_session()


def test_onos_switches_a_link_with_qkdl_status(pair) -> None:
    """ONOS's QKD app creates a link with qkdl_status OFF, activates it with ACTIVE (and the
    channel its driver parsed from wavelength_range, and the attenuation), deactivates it
    with OFF and deletes it, on both nodes: OFF makes no key, ACTIVE makes key again."""
    agents, _ = pair
    alice, bob = agents["alice"], agents["bob"]
    ma, mb = alice.connect(), bob.connect()
    try:
        onos_edit(ma, onos_create(alice.qkdn_id, bob.qkdn_id, "TRANSMITTER"))
        onos_edit(mb, onos_create(bob.qkdn_id, alice.qkdn_id, "RECEIVER"))
        time.sleep(1.5)  # long enough for a switched-on link to pair and make key
        assert [onos_link(m) for m in (ma, mb)] == [("OFF", 0), ("OFF", 0)]

        rng = interfaces(mb)[1].findtext(f"{{{ETSI}}}qkdi_capabilities/{{{ETSI}}}wavelength_range")
        channel = onos_lambdas(rng)[0]
        for m in (ma, mb):
            onos_edit(m, onos_activate(4.0, channel))
        wait_onos((ma, mb), "ACTIVE")
        time.sleep(1.5)
        assert all(skr > 1000 for skr in wait_onos((ma, mb), "ACTIVE"))

        for m in (ma, mb):
            onos_edit(m, onos_status("OFF"))
        wait_onos((ma, mb), "OFF")
        time.sleep(1.0)
        assert [onos_link(m) for m in (ma, mb)] == [("OFF", 0), ("OFF", 0)]  # no key while OFF

        with pytest.raises(RPCError) as err:  # ON is an application status, not a link's
            onos_edit(ma, onos_status("ON"))
        assert err.value.tag == "invalid-value"

        for m in (ma, mb):
            onos_edit(m, onos_status("ACTIVE"))
        wait_onos((ma, mb), "ACTIVE")
    finally:
        for m in (ma, mb):
            onos_edit(m, f'<qkd_link nc:operation="delete"><qkdl_id>{ONOS_LINK}</qkdl_id></qkd_link>')
            m.close_session()
