"""State filled into running's JSON on <get>: refilled, not accumulated, and encoded by
libyang (every value type-checked) into the operational document."""
from __future__ import annotations

import copy

from sdqkd.agents import operational
from sdqkd.agents.datastore.model import agent_models

NS = "urn:etsi:qkd:yang:etsi-qkd-node"
NODE_ID = "5c0a7c8e-0000-4000-8000-000000000001"
APP_ID = "5c0a7c8e-0000-4000-8000-0000000000a1"


def running() -> dict:
    cfg = {"etsi-qkd-sdn-node:qkd_node": {"qkdn_id": NODE_ID, "qkd_applications": {"qkd_app": [
        {"app_id": APP_ID, "server_app_id": "sae-a", "client_app_id": ["sae-b"]}]}}}
    from sdqkd import yangdata
    return yangdata.validate_json(cfg).by_module()


def test_statistics_windows_are_refilled_not_accumulated() -> None:
    data = running()
    windows = {APP_ID: [(0, 10, 5), (10, 20, 7)]}
    operational.fill(data, [], lambda app: windows.get(app, []))
    app = data["etsi-qkd-sdn-node"]["etsi-qkd-sdn-node:qkd_node"]["qkd_applications"]["qkd_app"][0]
    assert [s["end_time"] for s in app["app_statistics"]["statistics"]] == ["1970-01-01T00:00:10Z", "1970-01-01T00:00:20Z"]
    windows[APP_ID] = [(20, 30, 9)]  # the key store keeps the last windows only
    operational.fill(data, [], lambda app: windows.get(app, []))
    assert app["app_statistics"]["statistics"] == [
        {"end_time": "1970-01-01T00:00:30Z", "start_time": "1970-01-01T00:00:20Z", "consumed_bits": 9}]


def test_filled_state_encodes_through_libyang() -> None:
    data = running()
    before = copy.deepcopy(data)
    operational.fill(data, [], lambda app: [(0, 10, 2**40)])  # more bits than uint32 holds: capped, not refused
    [node] = agent_models().operational(data)
    assert node.findtext(f"{{{NS}}}qkdn_status") == "etsi-qkdn-types:OPERATING"
    stat = node.find(f".//{{{NS}}}statistics")
    assert stat.findtext(f"{{{NS}}}consumed_bits") == str(2**32 - 1)
    assert before != data and "qkdn_status" not in before["etsi-qkd-sdn-node"]["etsi-qkd-sdn-node:qkd_node"]


def test_wavelength_range_is_one_range_when_it_can_be() -> None:
    """ONOS's QKD driver reads wavelength_range as one "N-M" range."""
    assert operational.wavelength_range("34") == "34-34"
    assert operational.wavelength_range("20-22") == "20-22"
    assert operational.wavelength_range("22,20,21") == "20-22"
    assert operational.wavelength_range("1,12-20,40") == "1,12-20,40"  # gaps: a list, as ETSI allows
