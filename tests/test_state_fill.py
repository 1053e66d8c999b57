"""State written into the live running bindings on <get> is refilled, not accumulated:
the bindings outlive the request (Datastores.running_roots), so what an earlier <get>
wrote must not show up in a later one."""
from __future__ import annotations

from samples import APP_ID, populated_node

from sdqkd.agents import state
from sdqkd.bindings.sdqkd_optical_switch import sdqkd_optical_switch


def test_statistics_windows_are_refilled_not_accumulated() -> None:
    roots = {"etsi-qkd-sdn-node": populated_node(), "sdqkd-optical-switch": sdqkd_optical_switch()}
    windows = {APP_ID: [(0, 10, 5), (10, 20, 7)]}
    state.fill(roots, [], lambda app: windows.get(app, []))
    stats = roots["etsi-qkd-sdn-node"].qkd_node.qkd_applications.qkd_app[APP_ID].app_statistics.statistics
    assert len(stats) == 2
    windows[APP_ID] = [(20, 30, 9)]  # the key store keeps the last windows only
    state.fill(roots, [], lambda app: windows.get(app, []))
    assert [str(k) for k in stats.keys()] == ["1970-01-01T00:00:30Z"]
    assert int(stats["1970-01-01T00:00:30Z"].consumed_bits) == 9
