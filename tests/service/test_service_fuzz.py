"""Property-based fuzzing of the OpenAPI document with schemathesis, against the real server
through httpx: valid and invalid requests generated from the schema of every operation
(bounded examples, derandomised); no 5xx, every response documented and matching its
schema, invalid data refused."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

pytestmark = [pytest.mark.slow]

SCALE = int(os.environ.get("FACEMETRIC_FUZZ_SCALE", "1"))
EXAMPLES = {GenerationMode.POSITIVE: 12 * SCALE, GenerationMode.NEGATIVE: 5 * SCALE}
"""Examples per operation (negative ones are slow to generate: long path parameters);
``FACEMETRIC_FUZZ_SCALE=10`` for a deeper run by hand."""
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(server) -> Any:
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(doc)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode()


def _files(files: Any) -> list[tuple[str, Any]]:
    """requests' ``files`` (a dict or pairs; a value or a (name, content, type) tuple) with
    every content as bytes — negative examples put numbers and objects there."""
    items = files.items() if isinstance(files, dict) else files
    out = []
    for name, value in items:
        if isinstance(value, tuple):
            out.append((name, (value[0], _as_bytes(value[1]), *value[2:])))
        else:
            out.append((name, _as_bytes(value)))
    return out


def _request(http: httpx.Client, kwargs: dict[str, Any]) -> httpx.Request:
    """requests-style keyword arguments (what schemathesis serialises) → an httpx request
    whose body is read (so the checks can look at it)."""
    assert not kwargs.get("cookies"), "the API takes no cookies"
    out = {k: kwargs[k] for k in ("method", "url", "headers", "params") if kwargs.get(k)}
    if "json" in kwargs:
        out["json"] = kwargs["json"]
    data = kwargs.get("data")
    if isinstance(data, bytes | str):
        out["content"] = data
    elif data is not None:
        out["data"] = data
    if kwargs.get("files"):
        out["files"] = _files(kwargs["files"])
    request = http.build_request(**out)
    request.read()
    return request


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzzing(mode, api_schema, server, admin):
    """Every operation, ``EXAMPLES`` generated requests each (the schemathesis pytest
    plugin is driven by hand: its lazy-fixture loader does not run on this pytest)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 18
    failures: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for operation in operations:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=SCALE == 1,
                      database=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.generate])
            def run(case: Any) -> None:
                kwargs = case.as_transport_kwargs(base_url=server.url, headers=dict(admin))
                response = http.send(_request(http, kwargs))
                assert "Traceback" not in response.text
                assert response.headers.get("x-request-id")
                case.validate_response(response, checks=CHECKS, headers=kwargs.get("headers"))

            try:
                run()
            except Unsatisfiable:  # nothing to negate (an operation without inputs)
                assert mode == GenerationMode.NEGATIVE, operation.label
            except Exception as err:  # collect every operation's failure, then report
                failures.append(f"{operation.label}: {type(err).__name__}: {err}"[:3000])
    assert client_alive(server)
    assert not failures, "\n\n".join(failures)


def client_alive(server) -> bool:
    return httpx.get(f"{server.url}/v1/health", timeout=30).status_code == 200
