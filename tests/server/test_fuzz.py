"""Schema-driven fuzzing of both OpenAI endpoints: no 5xx, no hang, nothing left allocated.

Schemathesis reads the server's own `/openapi.json` (the request bodies are
described from the pydantic models in `protocol.py`) and generates bodies that
fit it (positive) and bodies that break it (negative); each goes to a real
server on 127.0.0.1 whose instances run the real engine loop and scheduler
over the null executor. Every answer must come within a bounded time, be a
2xx or a 4xx with an OpenAI-style error body that carries no traceback or
file path, and leave no request or KV block behind anywhere. Derandomized, so
a run explores the same bodies every time.
"""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shunter.cluster.bundles import build_policy
from shunter.runtime.spec import InstanceSpec
from shunter.server.runner import Server, ServerSettings, wait_until
from tests.server.conftest import MODEL, engine_requests, used_blocks

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
REQUEST_TIMEOUT_S = 10.0  # per request: a hang fails the example instead of the whole run
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
REAL_MODEL_FUZZ = settings(FUZZ, max_examples=200)  # 100 missed the top_p bug; 200 finds it


@pytest.fixture(scope="module")
def server(tokenizer, hello_world_ids):
    spec = InstanceSpec(executor="null", max_model_len=256, null_token_ids=hello_world_ids, report_interval=0.02)
    srv = Server(ServerSettings(port=0, num_instances=2, served_model_names=(MODEL,)), spec,
                 build_policy("rr"), tokenizer, 256).start_in_thread(timeout=60)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def test_the_openapi_schema_describes_both_request_bodies(server):
    paths = requests.get(server.url + "/openapi.json", timeout=5).json()["paths"]
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"model", field} <= set(body["required"])
        assert "$ref" not in json.dumps(body)  # self-contained: nothing to resolve elsewhere


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_fuzzed_bodies_get_no_5xx_no_hang_and_leave_nothing_allocated(server, schema, session, path, mode):
    fuzz(server, schema[path]["POST"].as_strategy(generation_mode=mode), session, mode, FUZZ)


@pytest.mark.slow
@pytest.mark.parametrize("path", ENDPOINTS)
def test_fuzzed_sampling_parameters_on_the_real_model_get_no_5xx(tokenizer, session, path):
    # The null executor samples nothing: here the real sampler meets the fuzzed temperatures, top_p and
    # top_k (it once picked no real token for temperature 1e-300, and failed the step for top_p 1e-300).
    from shunter.model.loader import prepare_checkpoint, source_path

    spec = InstanceSpec(model=source_path(prepare_checkpoint(None)), num_threads=1, max_model_len=256,
                        report_interval=0.02)
    srv = Server(ServerSettings(port=0, num_instances=1, served_model_names=(MODEL,)), spec,
                 build_policy("rr"), tokenizer, 256).start_in_thread(timeout=120)
    try:
        strategy = schemathesis.openapi.from_url(srv.url + "/openapi.json")[path]["POST"].as_strategy()
        fuzz(srv, strategy, session, GenerationMode.POSITIVE, REAL_MODEL_FUZZ, max_tokens=3)
    finally:
        srv.stop()


def fuzz(server: Server, strategy, session, mode: GenerationMode, fuzz_settings, max_tokens: int | None = None):
    """Send each body `strategy` draws to `server`; check the answer and that nothing is left behind."""

    @fuzz_settings
    @given(data=st.data())
    def run(data) -> None:
        case = data.draw(strategy)
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL  # any other name is a 404 before the rest is looked at (test_bad_input)
        if max_tokens is not None and isinstance(case.body, dict):  # a few tokens each: the model is slow
            case.body["max_tokens"] = max_tokens
            case.body.pop("max_completion_tokens", None)
        resp = session.request(**case.as_transport_kwargs(base_url=server.url), timeout=REQUEST_TIMEOUT_S)
        check_answer(resp, negative=mode.is_negative)
        assert wait_until(lambda: server.frontend.num_live_requests() == 0, 5), "a request left in the frontend"
        assert engine_requests(server) == 0 and used_blocks(server) == 0, "a request or block left on an instance"

    run()


def check_answer(resp, negative: bool) -> None:
    body = resp.request.body
    assert resp.status_code < 500, f"{resp.status_code} for {body!r}: {resp.text[:500]}"
    if negative:  # a body the schema rules out is refused, never run
        assert 400 <= resp.status_code < 500, f"{resp.status_code} for {body!r}: {resp.text[:500]}"
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in resp.text and ".py" not in resp.text and "/work" not in resp.text
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.endswith("data: [DONE]\n\n"), resp.text[-300:]
    else:
        assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
