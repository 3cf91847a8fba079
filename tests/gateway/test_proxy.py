"""The gateway against null backends, through the real `openai` client: proxying, routing, errors, metrics."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from shunter.gateway.backends import BackendSpec
from shunter.server.threaded import wait_until
from tests.gateway.conftest import client


def sample(server, name: str, **labels) -> float:
    return server.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def dispatches(server, engine: str) -> float:
    return sample(server, "shunter_dispatches_total", policy=server.gateway.policy.dispatch, engine=engine)


def test_completions_and_chat_pass_through_with_usage(null_backend, start_gateway):
    a, b = null_backend(model="m"), null_backend(model="m")
    gw = start_gateway([a.url, b.url])
    c = client(gw)
    out = c.completions.create(model="m", prompt="one two three", max_tokens=5)
    assert out.choices[0].text == " alpha beta gamma delta alpha"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 5)
    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}], max_tokens=3)
    assert chat.choices[0].message.content == " alpha beta gamma"
    assert chat.usage.completion_tokens == 3
    # Round robin over the two backends: one request each.
    assert dispatches(gw, "0") == dispatches(gw, "1") == 1


@pytest.mark.parametrize("chat", [False, True])
def test_streams_pass_through_chunk_by_chunk_with_usage(null_backend, start_gateway, chat):
    a = null_backend(model="m")
    gw = start_gateway([a.url])
    c = client(gw)
    kwargs = dict(model="m", max_tokens=4, stream=True, stream_options={"include_usage": True})
    if chat:
        chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "x y"}], **kwargs))
        texts = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    else:
        chunks = list(c.completions.create(prompt="x y", **kwargs))
        texts = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert texts == [" alpha", " beta", " gamma", " delta"]
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 2
    assert sample(gw, "vllm:time_to_first_token_seconds_count", model_name="m", engine="0") == 1
    # The relay counts a stream's tokens when the backend's stream has ended, which can be just after
    # the client read `[DONE]` (the client stops there, before the body's end).
    assert wait_until(lambda: sample(gw, "vllm:generation_tokens_total", model_name="m", engine="0") == 4, 5)


def test_requests_route_by_model_and_models_lists_the_union(null_backend, start_gateway):
    a, b = null_backend(model="llama"), null_backend(model="qwen")
    gw = start_gateway([a.url, b.url])
    c = client(gw)
    assert sorted(m.id for m in c.models.list().data) == ["llama", "qwen"]
    for _ in range(3):
        assert c.completions.create(model="qwen", prompt="p", max_tokens=1).model == "qwen"
    assert (dispatches(gw, "0"), dispatches(gw, "1")) == (0, 3)
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="mistral", prompt="p", max_tokens=1)
    assert err.value.body["message"] == "The model `mistral` does not exist."
    assert err.value.body["code"] == "model_not_found"


def test_a_model_label_restricts_a_backend(null_backend, start_gateway):
    a = null_backend(model="m")
    gw = start_gateway([BackendSpec(a.url, models=("m",))])
    assert gw.gateway.models == ["m"]


def test_backend_4xx_passes_through_as_is(null_backend, start_gateway):
    a = null_backend(model="m")
    gw = start_gateway([a.url])
    with pytest.raises(openai.BadRequestError) as err:
        client(gw).completions.create(model="m", prompt="p", max_tokens=0)
    # The null backend's own message and body, unchanged.
    assert err.value.body == {"message": "max_tokens must be an integer >= 1, got 0", "type": "BadRequestError",
                              "param": None, "code": 400}


def test_backend_5xx_becomes_502(null_backend, start_gateway):
    a = null_backend(model="m", statuses=(500,))
    gw = start_gateway([a.url])
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as err:
            client(gw).completions.create(model="m", prompt="p", max_tokens=2, stream=stream)
        assert err.value.status_code == 502
        assert err.value.body["type"] == "BadGatewayError"
        assert "answered 500: null server: request failed on purpose" in err.value.body["message"]
    assert sample(gw, "shunter_backend_errors_total", engine="0", kind="status_5xx") == 2
    assert gw.gateway.backends["0"].state.value == "ready"  # a 5xx is the request's failure, not the backend's


def test_a_silent_backend_gives_504(null_backend, start_gateway):
    a = null_backend(model="m", hang=True)
    gw = start_gateway([a.url], backend_timeout=0.5)
    with pytest.raises(openai.APIStatusError) as err:
        client(gw).completions.create(model="m", prompt="p", max_tokens=2)
    assert err.value.status_code == 504
    assert err.value.body["type"] == "GatewayTimeoutError" and "--backend-timeout" in err.value.body["message"]


def test_bad_bodies_are_openai_errors(null_backend, start_gateway):
    gw = start_gateway([null_backend(model="m").url])
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (b'{"prompt": "p"}', 400)):
        req = urllib.request.Request(gw.url + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == status
        assert set(json.loads(err.value.read())["error"]) == {"message", "type", "param", "code"}


def test_metrics_have_serving_names_per_backend(null_backend, start_gateway):
    # A pause between tokens, so that the chunks arrive apart and inter-token latency is observed.
    a, b = null_backend(model="m", token_delay_s=0.005), null_backend(model="m", token_delay_s=0.005)
    gw = start_gateway([a.url, b.url])
    c = client(gw)
    for _ in range(4):
        list(c.completions.create(model="m", prompt="p q", max_tokens=3, stream=True))
    text = urllib.request.urlopen(gw.url + "/metrics", timeout=10).read().decode()
    for engine in ("0", "1"):
        assert f'shunter_dispatches_total{{engine="{engine}",policy="round-robin"}} 2.0' in text
        assert f'vllm:time_to_first_token_seconds_count{{engine="{engine}",model_name="m"}} 2.0' in text
        assert f'vllm:inter_token_latency_seconds_count{{engine="{engine}",model_name="m"}}' in text
        assert f'vllm:e2e_request_latency_seconds_count{{engine="{engine}",model_name="m"}} 2.0' in text
        assert f'vllm:num_requests_running{{engine="{engine}",model_name="m"}}' in text  # scraped
    assert 'shunter_instances{state="ready"} 2.0' in text


def test_a_client_leaving_mid_stream_ends_the_backend_request(null_backend, start_gateway):
    from shunter.server.runner import wait_until

    a = null_backend(model="m", token_delay_s=0.1)
    gw = start_gateway([a.url])
    stream = client(gw).completions.create(model="m", prompt="p", max_tokens=50, stream=True)
    next(iter(stream))
    stream.close()
    # Noticed between chunks (every 0.5 s at most): the backend connection is closed, the call ends.
    assert wait_until(lambda: not gw.gateway.backends["0"].calls, 5)
    metrics = urllib.request.urlopen(a.url + "/metrics", timeout=5).read().decode()
    assert wait_until(lambda: 'vllm:num_requests_running{engine="0",model_name="m"} 0' in
                      urllib.request.urlopen(a.url + "/metrics", timeout=5).read().decode(), 5), metrics
