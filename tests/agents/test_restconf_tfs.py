"""TeraFlowSDN's QKD driver against an agent's RESTCONF server, its requests replayed byte
for byte over TLS, and its parsing of the answers re-stated (read, not copied).

Source: github.com/gintatkinson/tfs-controller-hardened (a TFS mirror) at commit
66a1f90c6ce693c89c17447cddb6a96c2f72d5ea:
- src/device/service/drivers/qkd/QKDDriver2.py: Connect() and GetState() GET
  {root}/restconf/data/etsi-qkd-sdn-node:qkd_node (no trailing slash) and need a 2xx with
  a JSON body; GetInitialConfig() then reads the member 'qkd_node' of it.
- src/device/service/drivers/qkd/Tools2.py: config_getter() GETs
  {root}/restconf/data/etsi-qkd-sdn-node:qkd_node/ plus 'qkd_interfaces/', 'qkd_links/',
  'qkd_applications/' or 'qkdn_capabilities/' (trailing slashes), raise_for_status(), then:
  interfaces: body['qkd_interfaces']['qkd_interface'] if that is an object, else
  body['qkd_interface']; each entry's qkdi_id, and qkdi_att_point device and port;
  links: iterates body['qkd_links'] (a list of link objects), keeps those whose
  qkdl_type is 'PHYS' or 'VIRT'; apps: body['qkd_applications']['qkd_app'], each app_id;
  capabilities: the body as is; node: the body less its qkdn_capabilities, qkd_applications,
  qkd_interfaces and qkd_links members, whose 'qkdn_id' the service handler reads
  (src/service/service/service_handlers/qkd/qkd_service_handler.py).
  create_connectivity_link() POSTs to {root}/restconf/data/etsi-qkd-sdn-node:qkd_node/qkd_links/
  `requests.post(url, json=data, verify=False, auth=auth)`: body
  {'qkd_links': {'qkd_link': [link]}}, link = qkdl_id, qkdl_type 'etsi-qkd-node-types:PHYS'
  or ':VIRT', qkdl_local/qkdl_remote {qkdn_id, qkdi_id}, and for VIRT virt_prev_hop (None
  on the first hop), virt_next_hop (a list) and virt_bandwidth (0 from the service handler).
- The root is $QKD_API_URL when set (https://host:port here), auth the device settings'
  'auth' ((user, password): HTTP basic).

Requests are what requests 2.x puts on the wire: its default headers (User-Agent,
Accept-Encoding, Accept: */*, Connection: keep-alive), Authorization from the auth tuple,
and for json= a body from json.dumps with its default separators and
Content-Type: application/json."""
from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

import h11
import pytest

from agentproc import PASSWORD, agent_config, free_port
from restconfproc import RestconfAgent, start
from sdqkd.lab import plan as lab_plan

NODE_URL = "/restconf/data/etsi-qkd-sdn-node:qkd_node"
LAB = {
    "name": "tfs",
    "domain": [{"name": "RM"}],
    "profile": [{
        "name": "dv-o", "vendor": "Toshiba", "model": "QKD-MU", "technology": "etsi-qkd-node-types:DV-QKD",
        "protocol": "BB84-decoy", "band": "O-band", "max-absorption": "20.0", "reference-skr": "40.0",
        "reference-loss": "5.0", "qber": "3.0", "qber-noise": "0.3",
    }],
    "node": [
        {"name": "qkd1", "domain": "RM", "qkd-interface": [{"id": 1, "profile": "dv-o", "role": "etsi-qkd-node-types:TRANSMITTER"}]},
        {"name": "qkd2", "domain": "RM", "qkd-interface": [{"id": 1, "profile": "dv-o", "role": "etsi-qkd-node-types:RECEIVER"}]},
    ],
    "fibre": [{"name": "f12", "a-end": {"node": "qkd1"}, "b-end": {"node": "qkd2"}, "length": "12.0", "loss": "4.0"}],
    "link": [{"name": "l12", "endpoints": ["qkd1:1", "qkd2:1"], "path": ["f12"]}],
}
IDS = {n: str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqkd-test/{n}")) for n in ("qkd1", "qkd2", "qkd3")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestconfAgent]:
    tmp = tmp_path_factory.mktemp("tfs")
    key, service = secrets.token_hex(32), {n: free_port() for n in ("qkd1", "qkd2")}

    def extra(name: str, other: str, role: str) -> dict[str, Any]:
        return {
            "plant": {"inventory": lab_plan.plant_inventory(LAB), "state": str(tmp / "plant.sqlite")},
            "service_key": key,
            "qkd_modules": [{"qkdi_id": 1, "role": role, "service_port": service[name], "device": "sw1", "port": 3,
                             "profile": lab_plan.resolved_profile(LAB, name, 1, "dv-o").to_dict()}],
            "peers": {IDS[other]: {"node": other, "service": {"1": ["127.0.0.1", service[other]]}}},
        }
    peer = agent_config(tmp, "qkd2", IDS["qkd2"], extra=extra("qkd2", "qkd1", "RECEIVER")).start()
    try:
        rc = start(tmp, "qkd1", extra=extra("qkd1", "qkd2", "TRANSMITTER"))
    except Exception:
        peer.stop()
        raise
    yield rc
    rc.stop()
    peer.stop()


def request(method: str, target: str, port: int, body: bytes | None = None) -> bytes:
    """The bytes requests 2.x sends for requests.<method>(url, [json=...], verify=False, auth=(user, pw))."""
    auth = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "User-Agent: python-requests/2.32.3",
             "Accept-Encoding: gzip, deflate", "Accept: */*", "Connection: keep-alive"]
    if body is not None:
        lines += [f"Content-Length: {len(body)}", "Content-Type: application/json"]
    lines.append(f"Authorization: Basic {auth}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def replay(rc: RestconfAgent, raw: bytes) -> tuple[int, Any]:
    """Send `raw` on a TLS connection (verify=False, as the driver does) and read the answer."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", rc.port), timeout=20) as sock, ctx.wrap_socket(sock) as tls:
        tls.sendall(raw)
        conn.send(h11.Request(method=raw.split(b" ", 1)[0], target=raw.split(b" ")[1], headers=[("Host", "x")]))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(tls.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    return status, json.loads(body) if body else None


def get(rc: RestconfAgent, path: str) -> Any:
    status, body = replay(rc, request("GET", path, rc.port))
    assert 200 <= status < 300, (path, status, body)  # raise_for_status()
    return body


def post_link(rc: RestconfAgent, link: dict[str, Any]) -> int:
    body = json.dumps({"qkd_links": {"qkd_link": [link]}}).encode()  # requests' json=: json.dumps defaults
    status, _ = replay(rc, request("POST", f"{NODE_URL}/qkd_links/", rc.port, body))
    return status


def test_connect_and_state_read_the_rfc_shape(pair: RestconfAgent) -> None:
    data = get(pair, NODE_URL)  # Connect() / GetState(): a 2xx with JSON is all they need
    assert data["etsi-qkd-sdn-node:qkd_node"]["qkdn_id"] == IDS["qkd1"]
    assert data.get("qkd_node", {}) == {}  # GetInitialConfig(): RFC 8040 names the module (README)


def test_config_getters_parse(pair: RestconfAgent) -> None:
    node = get(pair, f"{NODE_URL}/")
    for sub in ("qkdn_capabilities", "qkd_applications", "qkd_interfaces", "qkd_links"):
        node.pop(sub, None)
    assert node["qkdn_id"] == IDS["qkd1"]  # the service handler's '__node__' qkdn_id

    body = get(pair, f"{NODE_URL}/qkd_interfaces/")
    ifs = body["qkd_interfaces"]["qkd_interface"] if isinstance(body.get("qkd_interfaces"), dict) else body.get("qkd_interface", [])
    endpoints = [f"{i['qkdi_att_point']['device']}:{i['qkdi_att_point']['port']}" for i in ifs
                 if "device" in i.get("qkdi_att_point", {}) and "port" in i.get("qkdi_att_point", {})]
    assert [i["qkdi_id"] for i in ifs] == [1] and endpoints == ["sw1:3"]

    caps = get(pair, f"{NODE_URL}/qkdn_capabilities/")
    assert isinstance(caps, dict) and caps

    apps = get(pair, f"{NODE_URL}/qkd_applications/").get("qkd_applications", {}).get("qkd_app", [])
    assert apps == []


def test_driver_creates_phys_and_virt_links(pair: RestconfAgent) -> None:
    phys_id, virt_id = str(uuid.uuid4()), str(uuid.uuid4())
    phys = {"qkdl_id": phys_id, "qkdl_type": "etsi-qkd-node-types:PHYS",
            "qkdl_local": {"qkdn_id": IDS["qkd1"], "qkdi_id": 1}, "qkdl_remote": {"qkdn_id": IDS["qkd2"], "qkdi_id": 1}}
    assert post_link(pair, phys) == 201
    virt = {"qkdl_id": virt_id, "qkdl_type": "etsi-qkd-node-types:VIRT",
            "qkdl_local": {"qkdn_id": IDS["qkd1"], "qkdi_id": 1}, "qkdl_remote": {"qkdn_id": IDS["qkd3"], "qkdi_id": 1},
            "virt_prev_hop": None, "virt_next_hop": [IDS["qkd2"], IDS["qkd3"]], "virt_bandwidth": 0}
    assert post_link(pair, virt) == 201
    assert post_link(pair, virt) == 409  # already there: create, not merge

    links = get(pair, f"{NODE_URL}/qkd_links/").get("qkd_links", [])
    seen = {l["qkdl_id"]: l["qkdl_type"] for l in links if isinstance(l, dict) and l.get("qkdl_type") in ("PHYS", "VIRT")}
    assert seen == {phys_id: "PHYS", virt_id: "VIRT"}
    stored = next(l for l in links if l["qkdl_id"] == virt_id)
    assert "virt_prev_hop" not in stored and stored["virt_next_hop"] == [IDS["qkd2"], IDS["qkd3"]]

    m = pair.agent.connect()  # one datastore: NETCONF sees what the driver made
    try:
        running = m.get_config("running").data_xml
        assert phys_id in running and virt_id in running
    finally:
        m.close_session()


def test_device_checks_apply_to_restconf_edits(pair: RestconfAgent) -> None:
    """Not the driver's: the QKD module's own refusal (Driver.check) reaches a RESTCONF client."""
    link = {"qkdl_id": str(uuid.uuid4()), "qkdl_type": "etsi-qkd-node-types:PHYS", "phys_channel_att": "45.0",
            "qkdl_local": {"qkdn_id": IDS["qkd1"], "qkdi_id": 1}, "qkdl_remote": {"qkdn_id": IDS["qkd2"], "qkdi_id": 1}}
    with pair.client() as c:
        r = c.post(f"{NODE_URL}/qkd_links", content=json.dumps({"etsi-qkd-sdn-node:qkd_link": [link]}),
                   headers={"Content-Type": "application/yang-data+json"})
        assert r.status_code == 400
        err = r.json()["ietf-restconf:errors"]["error"][0]
        assert err["error-tag"] == "invalid-value" and "phys_channel_att" in err["error-message"]
        assert c.get(f"{NODE_URL}/qkd_links/qkd_link={link['qkdl_id']}").status_code == 404
