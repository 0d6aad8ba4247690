"""schemathesis against /openapi.json of a real `kizo api` process: no 5xx, and every answer
matches the schema it claims. Examples are bounded (hypothesis settings) to keep the suite fast."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from infra.servers import free_port
from tests.conftest import (
    ServerSet,
    kizo_env,
    stop_process,
    template_database,
    unique_email,
    wait_http,
)


@pytest.fixture(scope="module")
def live_api(servers: ServerSet) -> Iterator[tuple[str, dict[str, str]]]:
    """A real API process on a database of its own, with one signed-up user."""
    with template_database(servers, f"kizo_schema_{free_port()}") as db_url:
        port = free_port()
        env = kizo_env(servers, db_url, KIZO_API_PORT=str(port), KIZO_RATE_LIMITS="off")
        proc = subprocess.Popen([sys.executable, "-m", "kizo.cli", "api"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/health", proc=proc)
            signup = httpx.post(
                f"{url}/api/v1/auth/signup",
                timeout=10,
                json={"email": unique_email(), "password": "long enough pw", "name": "S"},
            )
            assert signup.status_code == 201
            yield url, {"Authorization": f"Bearer {signup.json()['access_token']}"}
        finally:
            stop_process(proc)


EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_no_server_errors_and_answers_match_the_schema(
    live_api: tuple[str, dict[str, str]],
) -> None:
    url, auth = live_api
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(base_url=url, headers=auth, checks=CHECKS)

        check()
