"""A real agent process on loopback, driven over NETCONF/SSH by ncclient, a raw
SSH client, netconf-console2 and yangcli."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from agentproc import PASSWORD, agent_config

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
ETSI = "urn:etsi:qkd:yang:etsi-qkd-node"
LINK = "11111111-2222-4333-8444-555555555555"
PEER = "3b1e7c22-5d4f-4a9b-9e0c-6a7b8c9d0e1f"
ETSI_TYPES = "urn:etsi:qkd:yang:etsi-qkd-node-types"


def cfg(body: str, attrs: str = "") -> str:
    return f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}" {attrs}>{body}</qkd_node></config>'


APP = (
    "<qkd_applications><qkd_app><app_id>c0ffee00-1234-4abc-8def-0123456789ab</app_id>"
    "<app_type xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:CLIENT</app_type>"
    "<server_app_id>sae://alice/enc1</server_app_id><app_priority>2</app_priority>"
    "<app_qos><max_bandwidth>2048</max_bandwidth><min_bandwidth>256</min_bandwidth></app_qos>"
    "</qkd_app></qkd_applications>"
)


def running(m) -> etree._Element:
    return m.get_config("running").data


def test_hello_tells_the_truth(nc, agent) -> None:
    caps = set(nc.server_capabilities)
    for cap in ("urn:ietf:params:netconf:base:1.0", "urn:ietf:params:netconf:base:1.1",
                "urn:ietf:params:netconf:capability:candidate:1.0",
                "urn:ietf:params:netconf:capability:confirmed-commit:1.1",
                "urn:ietf:params:netconf:capability:startup:1.0",
                "urn:ietf:params:netconf:capability:notification:1.0"):
        assert cap in caps
    assert f"{ETSI}?module=etsi-qkd-sdn-node&revision=2022-01-30" in caps
    assert not any("xpath" in c for c in caps)  # we do not do XPath filters, so we do not say so
    assert nc.session_id and int(nc.session_id) > 0


def test_get_config_and_subtree_filter(nc, agent) -> None:
    data = running(nc)
    assert data.findtext(f"{{{ETSI}}}qkd_node/{{{ETSI}}}qkdn_id") == agent.qkdn_id
    reply = nc.get(filter=("subtree", f'<qkd_node xmlns="{ETSI}"><qkdn_status/></qkd_node>')).data
    node = reply.find(f"{{{ETSI}}}qkd_node")
    assert [etree.QName(c).localname for c in node] == ["qkdn_status"]
    assert node[0].text.endswith(":OPERATING")
    # get-config never shows state
    assert running(nc).find(f".//{{{ETSI}}}qkdn_status") is None


def test_candidate_edit_commit_discard(nc) -> None:
    nc.edit_config(target="candidate", config=cfg(APP))
    assert running(nc).find(f".//{{{ETSI}}}qkd_app") is None  # not yet committed
    nc.commit()
    assert running(nc).findtext(f".//{{{ETSI}}}server_app_id") == "sae://alice/enc1"
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Elsewhere</qkdn_location_id>"))
    nc.discard_changes()
    nc.commit()
    assert running(nc).findtext(f".//{{{ETSI}}}qkdn_location_id") != "Elsewhere"
    # delete it again through running directly
    nc.edit_config(target="running", config=cfg(
        f'<qkd_applications><qkd_app xmlns:nc="{NC}" nc:operation="delete"><app_id>c0ffee00-1234-4abc-8def-0123456789ab</app_id></qkd_app></qkd_applications>'))
    assert running(nc).find(f".//{{{ETSI}}}qkd_app") is None


def test_application_events_are_notified(agent, nc) -> None:
    watcher = agent.connect()
    try:
        watcher.create_subscription()
        nc.edit_config(target="running", config=cfg(APP))
        nc.edit_config(target="running", config=cfg(APP.replace("<max_bandwidth>2048", "<max_bandwidth>4096")))
        nc.edit_config(target="running", config=cfg(
            f'<qkd_applications><qkd_app xmlns:nc="{NC}" nc:operation="delete"><app_id>c0ffee00-1234-4abc-8def-0123456789ab</app_id></qkd_app></qkd_applications>'))
        seen = []
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            n = watcher.take_notification(block=True, timeout=0.5)
            if n is not None:
                seen.append(etree.QName(etree.fromstring(n.notification_xml.encode())[1]).localname)
        assert seen == ["event", "sdqkdn_application_qos_update", "sdqkdn_application_disconnected"]
    finally:
        watcher.close_session()


def test_edit_operations(nc) -> None:
    link = (f"<qkd_links><qkd_link{{op}}><qkdl_id>{LINK}</qkdl_id>"
            "<qkdl_type xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:VIRT</qkdl_type>"
            f"<qkdl_remote><qkdn_id>{PEER}</qkdn_id></qkdl_remote><virt_bandwidth>{{bw}}</virt_bandwidth></qkd_link></qkd_links>")
    create = f' xmlns:nc="{NC}" nc:operation="create"'
    nc.edit_config(target="running", config=cfg(link.format(op=create, bw=100)))
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=cfg(link.format(op=create, bw=200)))
    assert err.value.tag == "data-exists"
    nc.edit_config(target="running", config=cfg(link.format(op=f' xmlns:nc="{NC}" nc:operation="replace"', bw=300)))
    assert running(nc).findtext(f".//{{{ETSI}}}virt_bandwidth") == "300"
    remove = f'<qkd_links><qkd_link xmlns:nc="{NC}" nc:operation="{{op}}"><qkdl_id>{LINK}</qkdl_id></qkd_link></qkd_links>'
    nc.edit_config(target="running", config=cfg(remove.format(op="delete")))
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=cfg(remove.format(op="delete")))
    assert err.value.tag == "data-missing"
    nc.edit_config(target="running", config=cfg(remove.format(op="remove")))  # no error when absent


@pytest.mark.parametrize(
    "body, tag, path_part",
    [
        ("<bogus>1</bogus>", "unknown-element", "bogus"),
        ("<qkd_interfaces><qkd_interface><qkdi_id>x</qkdi_id></qkd_interface></qkd_interfaces>", "invalid-value", "qkdi_id"),
        ("<qkd_links><qkd_link><qkdl_enable>true</qkdl_enable></qkd_link></qkd_links>", "missing-element", "qkdl_id"),
        ("<qkdn_capabilities><link_stats_support>maybe</link_stats_support></qkdn_capabilities>", "invalid-value", "link_stats_support"),
        ("<qkdn_status>UP</qkdn_status>", "invalid-value", "qkdn_status"),
        ("<qkdn_id>00000000-0000-4000-8000-000000000000</qkdn_id>", "invalid-value", "qkdn_id"),
        (f"<qkd_applications><qkd_app><app_id>c0ffee00-1234-4abc-8def-0123456789ab</app_id><backing_qkdl_id>{LINK}</backing_qkdl_id></qkd_app></qkd_applications>", "invalid-value", "backing_qkdl_id"),
    ],
)
def test_bad_edits_get_rpc_errors_and_change_nothing(nc, body, tag, path_part) -> None:
    before = etree.tostring(running(nc), method="c14n")
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=cfg(body))
    assert err.value.tag == tag
    assert path_part in (err.value.path or "")
    assert etree.tostring(running(nc), method="c14n") == before


def test_get_filter_matches_identities_by_namespace(nc) -> None:
    """RFC 6241 6.2.5 content match on an identityref: the filter's prefix is resolved
    through the filter's declarations, the data's through its own."""
    link = (f'<config xmlns="{NC}"><qkd_node xmlns="{ETSI}"><qkd_links><qkd_link{{op}}><qkdl_id>{LINK}</qkdl_id>'
            f"<qkdl_type xmlns:t='{ETSI_TYPES}'>t:VIRT</qkdl_type><qkdl_remote><qkdn_id>{PEER}</qkdn_id></qkdl_remote>"
            "</qkd_link></qkd_links></qkd_node></config>")
    nc.edit_config(target="running", config=link.format(op=""))
    try:
        def links(kind: str, ns: str = ETSI_TYPES) -> list[str]:
            filt = (f'<qkd_node xmlns="{ETSI}"><qkd_links><qkd_link>'
                    f'<qkdl_type xmlns:x="{ns}">x:{kind}</qkdl_type></qkd_link></qkd_links></qkd_node>')
            found = [[e.text for e in reply.data.iter(f"{{{ETSI}}}qkdl_id")]
                     for reply in (nc.get(filter=("subtree", filt)), nc.get_config("running", filter=("subtree", filt)))]
            assert found[0] == found[1]
            return found[0]

        assert links("VIRT") == [LINK]
        assert links("PHYS") == []
        assert links("VIRT", "urn:example:not-the-etsi-types") == []
    finally:
        nc.edit_config(target="running", config=link.format(op=f' xmlns:nc="{NC}" nc:operation="delete"'))


def test_unknown_namespace_and_operation(nc) -> None:
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=f'<config xmlns="{NC}"><x xmlns="urn:example:nope"/></config>')
    assert err.value.tag == "unknown-namespace"
    with pytest.raises(RPCError) as err:
        nc.dispatch(etree.fromstring('<frobnicate xmlns="urn:example:nope"/>'))
    assert err.value.tag == "operation-not-supported"


def test_several_validation_errors_in_one_reply(nc) -> None:
    body = (f"<qkd_links><qkd_link><qkdl_id>{LINK}</qkdl_id>"
            "<qkdl_type xmlns:t='urn:etsi:qkd:yang:etsi-qkd-node-types'>t:PHYS</qkdl_type>"
            "<qkdl_local><qkdi_id>99</qkdi_id></qkdl_local></qkd_link></qkd_links>")
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=cfg(body))
    tags = sorted(e.tag for e in err.value.errors)
    assert tags == ["invalid-value", "missing-element"]  # no interface 99, no qkdl_remote


def test_locks(agent, nc) -> None:
    other = agent.connect()
    try:
        nc.lock("running")
        with pytest.raises(RPCError) as err:
            other.lock("running")
        assert err.value.tag == "lock-denied"
        assert err.value.info and str(nc.session_id) in err.value.info
        with pytest.raises(RPCError) as err:
            other.edit_config(target="running", config=cfg("<qkdn_location_id>X</qkdn_location_id>"))
        assert err.value.tag == "in-use"
        nc.close_session()  # closing releases the lock
        other.lock("running")
        other.unlock("running")
    finally:
        other.close_session()


def test_candidate_lock_refused_while_dirty(agent, nc) -> None:
    other = agent.connect()
    try:
        nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Dirty</qkdn_location_id>"))
        with pytest.raises(RPCError) as err:
            other.lock("candidate")
        assert err.value.tag == "lock-denied"
        nc.discard_changes()
        other.lock("candidate")
        other.unlock("candidate")
    finally:
        other.close_session()


def test_confirmed_commit_rolls_back_on_timeout(nc) -> None:
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Temporary</qkdn_location_id>"))
    nc.commit(confirmed=True, timeout="1")
    assert running(nc).findtext(f".//{{{ETSI}}}qkdn_location_id") == "Temporary"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and running(nc).findtext(f".//{{{ETSI}}}qkdn_location_id") == "Temporary":
        time.sleep(0.2)
    assert running(nc).findtext(f".//{{{ETSI}}}qkdn_location_id") != "Temporary"


def test_confirmed_commit_confirmed_and_cancelled(agent, nc) -> None:
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Kept</qkdn_location_id>"))
    nc.commit(confirmed=True, timeout="30")
    nc.commit()  # confirm
    time.sleep(0.2)
    assert running(nc).findtext(f".//{{{ETSI}}}qkdn_location_id") == "Kept"
    nc.edit_config(target="candidate", config=cfg("<qkdn_location_id>Cancelled</qkdn_location_id>"))
    nc.commit(confirmed=True, timeout="30", persist="tok-1")
    other = agent.connect()
    try:
        other.cancel_commit(persist_id="tok-1")  # persistent: any session with the id
    finally:
        other.close_session()
    assert running(nc).findtext(f".//{{{ETSI}}}qkdn_location_id") == "Kept"


def test_confirmed_commit_rolls_back_when_session_drops(agent) -> None:
    a = agent.connect()
    a.edit_config(target="candidate", config=cfg("<qkdn_location_id>Dropped</qkdn_location_id>"))
    a.commit(confirmed=True, timeout="60")
    a.close_session()
    b = agent.connect()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and running(b).findtext(f".//{{{ETSI}}}qkdn_location_id") == "Dropped":
            time.sleep(0.1)
        assert running(b).findtext(f".//{{{ETSI}}}qkdn_location_id") != "Dropped"
    finally:
        b.close_session()


def test_validate_and_test_only(nc) -> None:
    nc.edit_config(target="candidate", config=cfg(APP))
    nc.validate(source="candidate")
    nc.discard_changes()
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", test_option="test-only", config=cfg("<qkdn_id>not-a-uuid</qkdn_id>"))
    assert err.value.tag == "invalid-value"


def test_startup_and_running_survive_restart(tmp_path) -> None:
    """Both are kept apart: the restarted node runs what it ran (persisted running), and
    startup is still what was saved (see test_agent_persist.py)."""
    a = agent_config(tmp_path, "bob").start()
    try:
        m = a.connect()
        m.edit_config(target="running", config=cfg("<qkdn_location_id>Persisted</qkdn_location_id>"))
        m.copy_config(source="running", target="startup")
        m.edit_config(target="running", config=cfg("<qkdn_location_id>NotSaved</qkdn_location_id>"))
        m.close_session()
    finally:
        a.stop()
    assert (a.state_dir / "startup.xml").exists()
    a.start()
    try:
        m = a.connect()
        assert running(m).findtext(f".//{{{ETSI}}}qkdn_location_id") == "NotSaved"
        assert m.get_config("startup").data.findtext(f".//{{{ETSI}}}qkdn_location_id") == "Persisted"
        m.close_session()
    finally:
        a.stop()


def test_public_key_auth_and_wrong_password(tmp_path) -> None:
    key = paramiko.Ed25519Key.from_private_key_file(str(_make_key(tmp_path)))
    a = agent_config(tmp_path, "carol", authorized_keys=[f"{key.get_name()} {key.get_base64()} test"]).start()
    try:
        m = a.connect(password=None, key_filename=str(tmp_path / "id_ed25519"))
        assert running(m).find(f"{{{ETSI}}}qkd_node") is not None
        m.close_session()
        with pytest.raises(Exception):
            a.connect(password="wrong")
    finally:
        a.stop()


def _make_key(tmp: Path) -> Path:
    path = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True) if shutil.which("ssh-keygen") else _py_key(path)
    return path


def _py_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    path.chmod(0o600)


def _raw_session(agent) -> paramiko.Channel:
    """A bare NETCONF 1.0 session: what an old or broken client sends."""
    t = paramiko.Transport(socket.create_connection(("127.0.0.1", agent.port)))
    t.connect(username="admin", password=PASSWORD)
    ch = t.open_session()
    ch.invoke_subsystem("netconf")
    ch.settimeout(10)
    _read(ch)  # server hello
    ch.sendall(f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:1.0</capability></capabilities></hello>]]>]]>'.encode())
    return ch


def _read(ch: paramiko.Channel) -> str:
    buf = b""
    while b"]]>]]>" not in buf:
        buf += ch.recv(65536)
    return buf.split(b"]]>]]>")[0].decode()


def test_malformed_xml_gets_an_error_and_the_session_goes_on(agent) -> None:
    ch = _raw_session(agent)
    try:
        ch.sendall(b"<rpc message-id='1' xmlns='urn:ietf:params:xml:ns:netconf:base:1.0'><get>]]>]]>")
        reply = etree.fromstring(_read(ch).encode())
        # RFC 6241 App. A: malformed-message is base:1.1's; a base:1.0 client gets operation-failed
        assert reply.findtext(f".//{{{NC}}}error-tag") == "operation-failed"
        assert reply.findtext(f".//{{{NC}}}error-type") == "rpc"
        ch.sendall(f'<rpc xmlns="{NC}"><get/></rpc>]]>]]>'.encode())  # no message-id
        reply = etree.fromstring(_read(ch).encode())
        assert reply.findtext(f".//{{{NC}}}error-tag") == "missing-attribute"
        ch.sendall(f'<rpc message-id="7" xmlns="{NC}"><get-config><source><running/></source></get-config></rpc>]]>]]>'.encode())
        text = _read(ch)
        reply = etree.fromstring(text.encode())
        assert reply.tag == f"{{{NC}}}rpc-reply" and reply.get("message-id") == "7"
        assert 'message-id="7"' in text and "<rpc-reply" in text and "nc:" not in text  # ONOS reads text
        assert reply.find(f"{{{NC}}}data/{{{ETSI}}}qkd_node") is not None
    finally:
        ch.close()


def test_netconf_console2(agent) -> None:
    exe = Path(sys.executable).with_name("netconf-console2")
    base = [str(exe), "--host", "127.0.0.1", "--port", str(agent.port), "-u", "admin", "-p", PASSWORD]
    out = subprocess.run([*base, "--get-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert agent.qkdn_id in out.stdout
    out = subprocess.run([*base, "--get-schema", "etsi-qkd-sdn-node"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "module etsi-qkd-sdn-node" in out.stdout


def test_yangcli_reads_and_edits(agent, tmp_path) -> None:
    yangcli = shutil.which("yangcli")
    if yangcli is None:
        pytest.fail("yangcli is not installed (make test installs Debian's yangcli)")
    script = tmp_path / "edit.yc"
    script.write_text("merge /qkd_node/qkdn_location_id value=FromYangcli\ncommit\nsget-config /qkd_node/qkdn_location_id source=running\n")
    out = subprocess.run(
        [yangcli, "--server=127.0.0.1", f"--ncport={agent.port}", "--user=admin", f"--password={PASSWORD}",
         "--batch-mode", f"--run-script={script}"],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    assert "qkdn_location_id FromYangcli" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "etsi-qkd-sdn-node@2022-01-30" in out.stdout


def _resident_anon_kib(pid: int) -> list[int]:
    sizes, anon = [], False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and ":" not in parts[0]:
            anon = len(parts) == 5
        elif parts and parts[0] == "Rss:" and anon:
            sizes.append(int(parts[1]))
    return sizes


def test_password_checks_give_their_memory_back(agent) -> None:
    """Each password login runs scrypt over 16 MiB; after several, none of it stays resident
    (glibc kept it in a thread arena once its mmap threshold had risen: 16 MiB per agent)."""
    for _ in range(3):
        m = agent.connect()
        m.close_session()
    time.sleep(0.5)
    assert max(_resident_anon_kib(agent.proc.pid)) < 12 * 1024
