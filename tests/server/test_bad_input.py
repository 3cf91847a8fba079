"""Bad requests get a 4xx with an OpenAI-style error body naming the problem, and allocate nothing."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, client, engine_requests, used_blocks

CASES = [
    # (endpoint, body, status, words the message must contain, param)
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, ["max_tokens"], "max_tokens"),
    ("completions", {"model": MODEL, "prompt": 5}, 400, ["prompt"], "prompt"),
    ("completions", {"model": "gpt-9", "prompt": "x"}, 404, ["gpt-9", "does not exist"], "model"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, ["empty"], "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, 400, ["empty"], "prompt"),
    ("completions", {"model": MODEL, "prompt": "word " * 300}, 400, ["context"], "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, ["max_tokens"], "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, ["max_tokens"], "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400, ["max_tokens", "context"], "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, ["n must be 1"], "n"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, ["logprobs", "not supported"], "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, ["best_of"], "best_of"),
    ("completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, ["echo"], "echo"),
    ("completions", {"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, ["unknown parameter", "frobnicate"], "frobnicate"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, ["temperature"], "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, ["top_p"], "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "top_k": -5}, 400, ["top_k"], "top_k"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, ["stop"], "stop"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, ["one prompt"], "prompt"),
    ("completions", {"model": MODEL, "prompt": [10**9]}, 400, ["token ids"], "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     ["stream_options"], "stream_options"),
    ("completions", {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": []}}, 400,
     ["include_usage", "true or false"], "stream_options"),  # found by the fuzz test: [] passed as false
    ("completions", {"prompt": "x"}, 400, ["model"], "model"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, ["messages"], "messages"),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, ["messages"], "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, ["tools"], "tools"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
     400, ["logprobs"], "logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, ["role"],
     "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, ["text content"], "messages.0.content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     400, ["max_tokens"], "max_tokens"),
    ("chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, ["nope"], "model"),
]


@pytest.fixture(scope="module")
def server(tokenizer, hello_world_ids):
    from shunter.cluster.bundles import build_policy
    from shunter.runtime.spec import InstanceSpec
    from shunter.server.runner import Server, ServerSettings

    spec = InstanceSpec(executor="null", max_model_len=256, null_token_ids=hello_world_ids)
    srv = Server(ServerSettings(port=0, num_instances=2, served_model_names=(MODEL,)), spec,
                 build_policy("rr"), tokenizer, 256).start_in_thread(timeout=60)
    yield srv
    srv.stop()


@pytest.mark.parametrize("endpoint,body,status,words,param", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_request_is_refused_with_an_openai_error_and_nothing_allocated(server, endpoint, body, status, words, param):
    resp = httpx.post(f"{server.url}/v1/{endpoint}", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    assert error["param"] == param
    assert "Traceback" not in resp.text and "/work" not in resp.text and ".py" not in resp.text
    assert engine_requests(server) == 0 and used_blocks(server) == 0
    assert server.frontend.num_live_requests() == 0


def test_malformed_json_is_a_400(server):
    resp = httpx.post(f"{server.url}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=[1, 2])
    assert resp.status_code == 400 and "JSON object" in resp.json()["error"]["message"]


def test_unknown_route_and_wrong_method_answer_in_openai_shape(server):
    resp = httpx.get(f"{server.url}/v1/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = httpx.get(f"{server.url}/v1/completions")
    assert resp.status_code == 405 and "error" in resp.json()


def test_openai_client_raises_its_typed_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model=MODEL, prompt="x", n=3)
    assert "n must be 1" in str(info.value)


def test_defaults_of_unsupported_parameters_are_accepted(server):
    # What clients such as vLLM's benchmark send: explicit defaults are not "unsupported".
    resp = httpx.post(f"{server.url}/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "logprobs": None, "repetition_penalty": 1.0,
        "best_of": 1, "echo": False, "presence_penalty": 0, "user": "me"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == " hello world"
