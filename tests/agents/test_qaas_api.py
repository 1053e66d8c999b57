"""The quantum-as-a-service mount point: the node's HTTPS server carries /openapi.json
describing every service it mounts."""
from __future__ import annotations

import pytest

from sdqkd.agents.qaas import api, openapi


def test_document_merges_parts_and_refuses_a_path_defined_twice() -> None:
    a = {"paths": {"/x": {"get": {"responses": {"200": {"description": "ok"}}}}},
         "components": {"schemas": {"X": {"type": "string"}}}}
    b = {"paths": {"/y": {"get": {"responses": {"200": {"description": "ok"}}}}}}
    doc = openapi.document([a, b])
    assert set(doc["paths"]) == {"/x", "/y"}
    assert doc["openapi"].startswith("3.1") and {"X", "Error"} <= set(doc["components"]["schemas"])
    with pytest.raises(ValueError, match="/x"):
        openapi.document([a, a])


def test_every_service_module_has_routes_and_an_openapi_part() -> None:
    for mod in api.services():
        assert callable(mod.add_routes) and "paths" in mod.OPENAPI
