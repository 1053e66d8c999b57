"""Property-based checks of a node's HTTPS API against the OpenAPI document it serves
(schemathesis over hypothesis), with a client certificate."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode


def conforms(base: str, cert: str, key: str, ca: str, path: str, method: str, mode: GenerationMode,
             examples: int = 25, excluded: Sequence[Callable[..., Any]] = ()) -> list[int]:
    """Draw `examples` requests for one operation of the served document (valid ones in
    POSITIVE mode, invalid ones in NEGATIVE) and check every answer: no server error,
    documented status code, content type, headers and body schema, less the schemathesis
    checks in `excluded` (for an API whose valid-looking requests may be refused by
    runtime state the document cannot know). The status codes seen."""
    with requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override our CA
        session.cert, session.verify = (cert, key), ca
        doc = session.get(f"{base}/openapi.json", timeout=10).json()
        op = schemathesis.openapi.from_dict(doc)[path][method]
        calls: list[int] = []

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call_and_validate(base_url=base, session=session, verify=ca, cert=(cert, key),
                                              excluded_checks=list(excluded) or None)
            calls.append(response.status_code)

        check()
    return calls
