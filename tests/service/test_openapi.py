"""The API as an OpenAPI 3.1 document (GET /openapi.json) and schemathesis run against it: every
operation gets generated requests (valid and invalid), and no answer is a 5xx, breaks the document
(status, content type, response schema) or leaves a traceback in the log. The request schemas are
the ones the handlers validate with (http/schemas.py), so a body the document calls valid must not
be refused, and one it calls invalid must be a 4xx."""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.service.dbutil import backends, fresh_database
from tests.service.live_server import raw_request
from tests.service.serve_process import ServeProcess
from tokabatch.service.http.openapi import document
from tokabatch.service.http.schemas import batch_create_schema

pytestmark = pytest.mark.timeout(300)
# Per operation and mode: bounded and derandomized in the suite (the same requests every run, so CI is
# stable); TOKABATCH_FUZZ_EXAMPLES=500 explores further with fresh random requests each run.
MAX_EXAMPLES = int(os.environ.get("TOKABATCH_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = "TOKABATCH_FUZZ_EXAMPLES" not in os.environ


@pytest.fixture(scope="module", params=backends())
def live(request, tmp_path_factory):
    """`tokabatch serve` with an API key over the fake engine: every route, the batch runner included."""
    folder = tmp_path_factory.mktemp("openapi")
    with fresh_database(request.param, folder) as url:
        server = ServeProcess(folder / "data", folder / "serve.log", "--api-key", "sk-test",
                              engine="tests.cli.fake_loops:healthy", db_url=None if request.param == "sqlite" else url)
        try:
            yield server
        finally:
            server.stop()
    log = (folder / "serve.log").read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]


def test_the_document_is_served_without_a_key_and_publishes_the_validating_schemas(live):
    status, headers, body = raw_request(live.url + "/openapi.json")
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("application/json")
    for custom in (False, True):
        doc = document(custom)
        assert doc["openapi"] == "3.1.0"
        create = doc["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert create is batch_create_schema(custom)


def _operations(live: ServeProcess) -> list:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_every_operation_holds_to_the_document(live, mode):
    """(The pytest plugin of schemathesis 4.32 does not run under pytest 9: the same strategies are
    driven by hypothesis here.)"""
    operations = _operations(live)
    assert len(operations) == 17
    calls: list[tuple[str, int]] = []
    for operation in operations:
        _fuzz(operation, mode, calls)
    assert not [c for c in calls if c[1] >= 500], [c for c in calls if c[1] >= 500]
    print(f"\nschemathesis ({mode.value}): {len(calls)} requests over {len(operations)} operations; statuses "
          f"{sorted(collections.Counter(status for _, status in calls).items())}")


# What a schema cannot say, so a body or query the document calls valid may still be a 400 for it:
# `after` must name an existing object (contract §1.4), a dry run's `input_file_id` an uploaded batch file,
# an upload's content must be JSONL for purpose batch.
BEYOND_THE_SCHEMA = {"after", "input_file_id", "file"}
# The online bodies are checked field by field as they are rendered (jobs/render.py); the document names
# their main fields only, so for them a 400 is not a finding (a 5xx or a broken response still is).
RENDERED_BODIES = {"POST /v1/chat/completions", "POST /v1/completions"}


def _fuzz(operation, mode, calls: list[tuple[str, int]]) -> None:
    """MAX_EXAMPLES generated requests of `mode` to one operation, each checked against the document;
    a valid request (POSITIVE) refused with a 400 must name one of BEYOND_THE_SCHEMA."""

    excluded = [positive_data_acceptance]
    if operation.label == "POST /v1/files":
        # Multipart carries text only: a "schema-violating" part (an object where the document says a
        # string, an unknown part, which the server ignores) often reaches it as acceptable text.
        excluded.append(negative_data_rejection)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call_and_validate(headers={"Authorization": "Bearer sk-test"}, excluded_checks=excluded)
        if (mode is schemathesis.GenerationMode.POSITIVE and response.status_code == 400
                and operation.label not in RENDERED_BODIES):
            param = response.json()["error"]["param"]
            assert param in BEYOND_THE_SCHEMA, f"{operation.label}: a valid request refused: {response.text}"
        calls.append((operation.label, response.status_code))

    try:
        run()
    except Unsatisfiable:           # NEGATIVE, an operation with nothing to get wrong (GET /v1/models)
        assert mode is schemathesis.GenerationMode.NEGATIVE
