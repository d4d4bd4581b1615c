"""Property-based fuzzing of every operation in our own /openapi.json (schemathesis),
against a real stack on the fake model: Redis, a Celery worker, the database, the API.

Schemathesis generates requests that follow the schema (positive) and requests that
break it (negative: wrong types, missing fields, out-of-range values, odd strings with
NUL and control characters), sends them over HTTP and checks each answer: never a 5xx,
a status code the operation documents, the documented content type and headers, and a
body that validates against the documented schema (the OpenAI error body included).
The number of examples per operation is bounded (LANEWAY_FUZZ_EXAMPLES, default 40) so
the suite stays fast; raise it to search harder.

The schema is built in-process from the same app factory the stack serves (collection
needs it before any stack runs), and a test checks it equals the served /openapi.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import Stack
from tests.integration.batch_support import FAKE, fake_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("LANEWAY_FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = fake_stack(
        tmp_path_factory.mktemp("fuzz-stack"),
        entries=[],
        env={"LANEWAY_MAX_REQUEST_BYTES": str(1 << 20), "LANEWAY_MAX_FILE_BYTES": str(1 << 20)},
    )
    try:
        yield stack
    finally:
        stack.close()


def local_document() -> dict[str, Any]:
    """The OpenAPI document of an API on the stack's settings (no key: none is set)."""
    from api.app import create_app
    from configs.settings import Settings

    return create_app(Settings(models=[FAKE])).openapi()


schema = schemathesis.openapi.from_dict(local_document())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, stack: Stack) -> None:
    case.call_and_validate(base_url=stack.base_url, checks=CHECKS, timeout=30)


def test_the_fuzzed_document_is_the_served_one(stack: Stack) -> None:
    import httpx

    assert httpx.get(f"{stack.base_url}/openapi.json", timeout=10).json() == local_document()


def test_the_document_describes_the_real_shapes(stack: Stack) -> None:
    """The schema the fuzzer trusts: multipart uploads, OpenAI's error body, no 422."""
    import httpx

    doc = httpx.get(f"{stack.base_url}/openapi.json", timeout=10).json()
    upload = doc["paths"]["/v1/files"]["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "purpose"]
    assert form["properties"]["file"] == {"type": "string", "format": "binary"}
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "422" not in codes, (method, path)
            if path.startswith("/v1/"):
                bad = operation["responses"]["500"]["content"]["application/json"]["schema"]
                assert bad == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
