"""schemathesis against the API server's own `/openapi.json`, in process, over a fake controller and fake workers.

Every operation the schema documents is called with generated requests, valid ones (the schema's shapes, which
the server may still refuse for reasons the schema cannot say, like an unknown model) and invalid ones (wrong
types, missing fields, out-of-range values). Whatever comes back must be: no 5xx, a status the schema documents
for the operation, the content type it documents, and a body that matches the documented schema (so every error
is the `{"error": {...}}` shape). Bounded and derandomized: the same cases on every run, well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python import asgi as schemathesis_asgi  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lmfleet.api.app import ApiSettings, create_app  # noqa: E402
from tests.api.fakes import CONTROLLER, Fleet  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 400, GenerationMode.NEGATIVE: 400}


def steer(case, to_echo: bool):  # noqa: ANN001, ANN201
    """Half the generated cases name the served model (`echo`), so they get past model resolution to a worker and
    the streaming code instead of all ending in 404 model_not_found; the other half keep their random name."""
    if to_echo:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "echo"
        if case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = "echo"
    return case


@pytest.fixture(scope="module")
def schema() -> Iterator[object]:
    fleet = Fleet({"echo": ["a"]})
    app = create_app(
        ApiSettings(controller_address=CONTROLLER, max_request_bytes=64 * 1024), http_client=fleet.http_client()
    )
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield loaded
    schemathesis_asgi.shutdown_lifespans()  # runs the app's lifespan shutdown


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
def test_generated_requests_get_documented_answers(schema, mode: GenerationMode) -> None:
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(generation_mode=mode).flatmap(lambda c: st.booleans().map(lambda b: steer(c, b))))
    def run(case) -> None:  # noqa: ANN001
        case.call_and_validate(checks=CHECKS)

    run()
