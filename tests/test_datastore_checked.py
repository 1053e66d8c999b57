"""Configs type-checked entry by entry (agents/datastore/checked.py) give exactly what a
whole pyangbind decode gives; the live running bindings follow commits entry by entry;
the controller's schema-walked edits are the XML the bindings would write."""
from __future__ import annotations

import copy
import uuid
from decimal import Decimal

import pytest
from lxml import etree

from sdqkd import yangcodec
from sdqkd.agents.datastore.model import agent_models
from sdqkd.bindings.etsi_qkd_sdn_node import etsi_qkd_sdn_node
from sdqkd.bindings.sdqkd_optical_switch import sdqkd_optical_switch
from sdqkd.controller.southbound.ops import AppEdit, CrossConnectEdit, LinkEdit

E = "urn:etsi:qkd:yang:etsi-qkd-node"
T = "urn:etsi:qkd:yang:etsi-qkd-node-types"
O = "urn:sdqkd:yang:sdqkd-optical-switch"
ME = "5b1f0d3c-8a51-4c2e-9a7e-0d2b6c1f0a01"


def _u(n: int) -> str:
    return str(uuid.UUID(int=n))


def _link(n: int, extra: str = "") -> str:
    return (f'<qkd_link><qkdl_type xmlns:x="{T}">x:PHYS</qkdl_type><qkdl_id>{_u(n)}</qkdl_id>'
            f'<qkdl_local><qkdi_id>{n}</qkdi_id><qkdn_id>{ME}</qkdn_id></qkdl_local>'
            f'<qkdl_remote><qkdn_id>{_u(100 + n)}</qkdn_id></qkdl_remote>{extra}</qkd_link>')


def _config(links: list[str], osw: str = "<switch><name>osw1</name><cross-connect><port-a>1</port-a><port-b>2</port-b></cross-connect></switch>") -> list[etree._Element]:
    """Links before interfaces, prefixes that are not the module's: nothing canonical."""
    node = etree.fromstring(
        f'<qkd_node xmlns="{E}" xmlns:t="{T}"><qkd_links>{"".join(links)}</qkd_links>'
        f'<qkdn_id>{ME}</qkdn_id><qkd_interfaces>'
        + "".join(f"<qkd_interface><qkdi_id>{i}</qkdi_id><qkdi_type>t:DV-QKD</qkdi_type></qkd_interface>" for i in (3, 1, 2))
        + f"</qkd_interfaces><qkd_applications><qkd_app><app_id>{_u(50)}</app_id><backing_qkdl_id>{_u(1)}</backing_qkdl_id>"
        "<app_type>t:CLIENT</app_type></qkd_app></qkd_applications></qkd_node>"
    )
    return [node, etree.fromstring(f'<optical-switches xmlns="{O}">{osw}</optical-switches>')]


def _whole(ms, els):
    roots = ms.decode(els)
    xml = ms.dump(roots, config_only=True)
    js = {name: yangcodec.encode_json(roots[name], m.schema, config_only=True) for name, m in ms.models.items()}
    return [etree.tostring(e, method="c14n") for e in xml], js


def _checked(ms, els):
    cfg = ms.check(els)
    return [etree.tostring(e, method="c14n") for e in cfg.elements], cfg.json


def test_entry_by_entry_equals_a_whole_decode() -> None:
    ms = agent_models()
    first = _config([_link(1), _link(2)])
    assert _checked(ms, first) == _whole(ms, first)
    # one entry changed, one added, the others come from the cache
    second = _config([_link(2, "<phys_wavelength>7</phys_wavelength>"), _link(1), _link(3, "<phys_channel_att>3.250</phys_channel_att>")])
    assert _checked(ms, second) == _whole(ms, second)
    canonical = list(ms.check(second).elements)
    assert _checked(ms, canonical) == _whole(ms, canonical)  # a fixed point
    # same-key entries are merged, as pyangbind merges them
    dup = _config([_link(4), _link(4, "<phys_wavelength>9</phys_wavelength>")])
    assert _checked(ms, dup) == _whole(ms, dup)
    empty: list[etree._Element] = []
    assert _checked(ms, empty) == _whole(ms, empty)
    no_apps = _without_apps(second)  # same skeleton as `second`: its container must not come back
    assert _checked(ms, no_apps) == _whole(ms, no_apps)


def _without_apps(els: list[etree._Element]) -> list[etree._Element]:
    els = [copy.deepcopy(e) for e in els]
    els[0].remove(els[0].find(f"{{{E}}}qkd_applications"))
    return els


def test_a_bad_new_entry_fails_like_a_whole_decode() -> None:
    ms = agent_models()
    ms.check(_config([_link(10), _link(11)]))  # both cached now
    bad = _config([_link(10), _link(11), _link(12, "<virt_bandwidth>lots</virt_bandwidth>")])
    with pytest.raises(yangcodec.CodecError) as whole:
        ms.decode(bad)
    with pytest.raises(yangcodec.CodecError) as checked:
        ms.check(bad)
    assert (checked.value.kind, checked.value.path) == (whole.value.kind, whole.value.path)
    assert "qkdl_id='" in checked.value.path


def test_live_bindings_follow_running_entry_by_entry() -> None:
    ms = agent_models()
    old = list(ms.check(_config([_link(20), _link(21)])).elements)
    roots = ms.decode(old)
    for links in ([_link(20), _link(21), _link(22)],  # added
                  [_link(20), _link(22)],  # deleted
                  [_link(20), _link(22, "<phys_wavelength>4</phys_wavelength>")]):  # changed (stays last)
        new = list(ms.check(_config(links)).elements)
        assert ms.update(roots, old, new)
        fresh = ms.decode(new)
        for name, m in ms.models.items():
            assert yangcodec.encode_json(roots[name], m.schema) == yangcodec.encode_json(fresh[name], m.schema)
        old = new
    # the first entry of a list, and the last one going: still entry by entry
    for cfg in (_without_apps(_config([_link(20)])), _config([_link(20)]), _without_apps(_config([_link(20)]))):
        new = list(ms.check(cfg).elements)
        assert ms.update(roots, old, new)
        assert yangcodec.encode_json(roots["etsi-qkd-sdn-node"], ms.models["etsi-qkd-sdn-node"].schema) == \
            yangcodec.encode_json(ms.decode(new)["etsi-qkd-sdn-node"], ms.models["etsi-qkd-sdn-node"].schema)
        old = new
    # an entry that goes and comes back (delete then create again) comes back
    # without the state a <get> filled into it
    node = roots["etsi-qkd-sdn-node"].qkd_node
    yangcodec.set_leaf(node.qkd_links.qkd_link[_u(20)].qkdl_performance, "skr", 1234)
    for cfg in (_without_apps(_config([])), _without_apps(_config([_link(20)]))):
        new = list(ms.check(cfg).elements)
        assert ms.update(roots, old, new)
        assert yangcodec.encode_json(roots["etsi-qkd-sdn-node"], ms.models["etsi-qkd-sdn-node"].schema) == \
            yangcodec.encode_json(ms.decode(new)["etsi-qkd-sdn-node"], ms.models["etsi-qkd-sdn-node"].schema)
        old = new
    old = list(ms.check(_config([_link(20), _link(22, "<phys_wavelength>4</phys_wavelength>")])).elements)
    roots = ms.decode(old)
    # a change that would reorder entries, or a skeleton change: decode afresh
    reordered = list(ms.check(_config([_link(20, "<phys_wavelength>5</phys_wavelength>"), _link(22, "<phys_wavelength>4</phys_wavelength>")])).elements)
    assert not ms.update(copy.copy(roots), old, reordered)
    other = list(ms.check(_config([_link(20), _link(22, "<phys_wavelength>4</phys_wavelength>")], osw="")).elements)
    assert ms.update(ms.decode(old), old, other)  # a whole top-level node gone: entries only
    renamed = [copy.deepcopy(e) for e in old]
    renamed[0].find(f"{{{E}}}qkdn_id").text = _u(99)
    assert not ms.update(ms.decode(old), old, renamed)


def _pyangbind_link(e: LinkEdit) -> bytes:
    root = etsi_qkd_sdn_node()
    lk = root.qkd_node.qkd_links.qkd_link.add(e.qkdl_id)
    lk.qkdl_type = f"etsi-qkd-node-types:{e.kind}"
    lk.qkdl_enable = e.enable
    lk.qkdl_local.qkdn_id, lk.qkdl_remote.qkdn_id = e.local, e.remote
    if e.local_qkdi is not None:
        lk.qkdl_local.qkdi_id, lk.qkdl_remote.qkdi_id = e.local_qkdi, e.remote_qkdi
    if e.prev_hop:
        lk.virt_prev_hop = e.prev_hop
    for h in e.next_hops:
        lk.virt_next_hop.append(h)
    if e.bandwidth is not None:
        lk.virt_bandwidth = e.bandwidth
    if e.role:
        lk.phys_qkd_role = f"etsi-qkd-node-types:{e.role}"
        lk.phys_wavelength = str(e.channel)
        lk.phys_channel_att = Decimal(str(round(e.attenuation, 3)))
    return etree.tostring(yangcodec.encode_xml(root, agent_models().models["etsi-qkd-sdn-node"].schema, config_only=True)[0])


def test_controller_edits_are_what_the_bindings_write() -> None:
    phys = LinkEdit(_u(1), "PHYS", ME, _u(2), local_qkdi=1, remote_qkdi=2, role="TRANSMITTER", channel=5, attenuation=3.25)
    virt = LinkEdit(_u(3), "VIRT", ME, _u(2), prev_hop=_u(4), next_hops=(_u(5),), bandwidth=1000)
    for e in (phys, virt):
        assert etree.tostring(e.elements()[0]) == _pyangbind_link(e)
    root = etsi_qkd_sdn_node()
    app = root.qkd_node.qkd_applications.qkd_app.add(_u(9))
    app.app_type, app.server_app_id = "etsi-qkd-node-types:CLIENT", "sae-a"
    app.client_app_id.append("sae-b")
    app.backing_qkdl_id.append(_u(3))
    app.app_qos.ttl = 30
    want = yangcodec.encode_xml(root, agent_models().models["etsi-qkd-sdn-node"].schema, config_only=True)[0]
    got = AppEdit(_u(9), "sae-a", ("sae-b",), (_u(3),), ttl=30).elements()[0]
    for el in got.iter():
        el.attrib.pop("{urn:ietf:params:xml:ns:netconf:base:1.0}operation", None)
    etree.cleanup_namespaces(got, keep_ns_prefixes=["etsi-qkdn-types"])
    assert etree.tostring(got) == etree.tostring(want)
    osw = sdqkd_optical_switch()
    osw.optical_switches.switch.add("osw1").cross_connect.add(1).port_b = 2
    want = yangcodec.encode_xml(osw, agent_models().models["sdqkd-optical-switch"].schema, config_only=True)[0]
    assert etree.tostring(CrossConnectEdit("osw1", 1, 2).elements()[0]) == etree.tostring(want)
    with pytest.raises(yangcodec.CodecError):
        yangcodec.json_to_xml({"etsi-qkd-sdn-node:qkd_node": {"no_such_leaf": 1}}, agent_models().models["etsi-qkd-sdn-node"].schema)
