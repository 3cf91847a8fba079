"""The real `openai` client against a real server on 127.0.0.1 (in-process null-executor instances)."""

from __future__ import annotations

import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shunter.runtime.handles import InstanceState
from shunter.server.runner import wait_until
from tests.server.conftest import MODEL, client, engine_requests, used_blocks


def test_completion_not_streamed_returns_text_and_usage(start_server):
    server = start_server()
    out = client(server).completions.create(model=MODEL, prompt="Say hello", max_tokens=4)
    assert out.choices[0].text == " hello world hello world"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 4
    assert out.usage.prompt_tokens == 2
    assert out.usage.total_tokens == 6


def test_completion_streamed_concatenates_to_the_same_text_with_usage_last(start_server):
    server = start_server()
    chunks = list(client(server).completions.create(model=MODEL, prompt="Say hello", max_tokens=6, stream=True,
                                                    stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == " hello world hello world hello world"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(start_server):
    server = start_server()
    chunks = list(client(server).completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True))
    assert all(c.choices for c in chunks)


def test_chat_applies_the_template_and_streams_role_then_content(start_server, tokenizer):
    server = start_server()
    messages = [{"role": "user", "content": "Hi"}]
    whole = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == " hello world"
    assert whole.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages))
    chunks = list(client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " hello world"
    assert chunks[-1].usage.completion_tokens == 2


def test_chat_without_max_tokens_runs_to_the_context_end(start_server, tokenizer):
    server = start_server(max_model_len=64)
    messages = [{"role": "user", "content": "Hi"}]
    out = client(server).chat.completions.create(model=MODEL, messages=messages)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == 64


def test_stop_string_ends_the_text_exactly_before_it_and_frees_the_request(start_server):
    server = start_server()
    out = client(server).completions.create(model=MODEL, prompt="x", max_tokens=50, stop=[" world hello w"])
    assert out.choices[0].text == " hello"
    assert out.choices[0].finish_reason == "stop"
    assert wait_until(lambda: engine_requests(server) == 0, 5)
    streamed = client(server).completions.create(model=MODEL, prompt="x", max_tokens=50, stop="o w", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == " hell"


def test_concurrent_streams_spread_over_both_instances(start_server):
    server = start_server(instances=2, policy="rr", null_step_time=0.01)
    results = []

    def one() -> None:
        chunks = client(server).completions.create(model=MODEL, prompt="x", max_tokens=8, stream=True)
        results.append("".join(c.choices[0].text for c in chunks))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [" hello world" * 4] * 10
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    per_instance = {s.labels["engine"]: s.value for s in families["shunter_dispatches"].samples
                    if s.name == "shunter_dispatches_total"}
    assert per_instance == {"0": 5.0, "1": 5.0}


def test_metrics_parse_and_count_tokens_and_successes(start_server):
    server = start_server(instances=1)
    client(server).completions.create(model=MODEL, prompt="Say hello", max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    labels = (("engine", "0"), ("model_name", MODEL))
    assert samples[("vllm:generation_tokens_total", labels)] == 5
    assert samples[("vllm:prompt_tokens_total", labels)] == 2
    assert samples[("vllm:request_success_total", (labels[0], ("finished_reason", "length"), labels[1]))] == 1
    assert samples[("vllm:time_to_first_token_seconds_count", labels)] == 1
    assert samples[("vllm:inter_token_latency_seconds_count", labels)] == 4
    assert samples[("vllm:e2e_request_latency_seconds_count", labels)] == 1
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (name, labels) in samples


def test_drained_instance_gets_no_new_work(start_server):
    server = start_server(instances=2, policy="rr")
    resp = httpx.post(server.url + "/admin/instances/0/drain")
    assert resp.status_code == 200 and resp.json()["state"] == "draining"
    for _ in range(6):
        client(server).completions.create(model=MODEL, prompt="x", max_tokens=2)
    dispatched = {s.labels["engine"]: s.value
                  for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
                  for s in f.samples if s.name == "shunter_dispatches_total"}
    assert dispatched == {"1": 6.0}
    listed = httpx.get(server.url + "/admin/instances").json()["instances"]
    assert [(i["id"], i["state"]) for i in listed] == [("0", "draining"), ("1", "ready")]
    assert listed[1]["load"]["num_total_blocks"] > 0


def test_admin_adds_an_instance_that_then_takes_work(start_server):
    server = start_server(instances=1, policy="rr")
    resp = httpx.post(server.url + "/admin/instances", timeout=30)
    assert resp.status_code == 201 and resp.json()["id"] == "1" and resp.json()["state"] == "ready"
    for _ in range(4):
        client(server).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert server.frontend.metrics.dispatches.labels("round-robin", "1")._value.get() == 2


def test_admin_unknown_instance_is_404_with_an_openai_body(start_server):
    server = start_server(instances=1)
    resp = httpx.post(server.url + "/admin/instances/7/drain")
    assert resp.status_code == 404
    assert "7" in resp.json()["error"]["message"]


def test_models_health_version(start_server):
    server = start_server(instances=1)
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_draining_the_last_instance_that_takes_work_is_refused(start_server):
    server = start_server(instances=2)
    assert httpx.post(server.url + "/admin/instances/0/drain").status_code == 200
    resp = httpx.post(server.url + "/admin/instances/1/drain")
    assert resp.status_code == 409 and "last mixed instance" in resp.json()["error"]["message"]
    assert server.frontend.handles["1"].state is InstanceState.READY
    assert httpx.get(server.url + "/health").status_code == 200
    assert client(server).completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text


def test_client_disconnect_mid_stream_aborts_and_frees_every_block(start_server):
    server = start_server(instances=1, null_step_time=0.02)
    body = {"model": MODEL, "prompt": "x" * 40, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine_requests(server) == 1
    assert wait_until(lambda: engine_requests(server) == 0, 5)
    assert used_blocks(server) == 0
    assert server.frontend.num_live_requests() == 0


def test_client_disconnect_while_waiting_for_a_whole_answer_aborts(start_server):
    server = start_server(instances=1, null_step_time=0.02)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200}
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    except httpx.TimeoutException:
        pass
    assert wait_until(lambda: engine_requests(server) == 0, 5)
    assert used_blocks(server) == 0


def test_client_disconnect_while_queued_on_its_instance_aborts_it_there(start_server):
    server = start_server(instances=1, null_step_time=0.02, max_num_seqs=1)
    handle = server.frontend.handles["0"]
    waiting = lambda: handle.loop.call(lambda e, now: len(e.scheduler.waiting)).result(5)  # noqa: E731
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes its connection
            assert next(lines).startswith("data: ")  # holds the only seat
            with http.stream("POST", server.url + "/v1/completions", json=body):  # queued behind it
                assert wait_until(lambda: waiting() == 1, 5)
            # The queued one's client is gone: it leaves the queue, the running one goes on.
            assert wait_until(lambda: waiting() == 0 and engine_requests(server) == 1, 5)
            assert server.frontend.num_live_requests() == 1
    assert wait_until(lambda: engine_requests(server) == 0, 5)
    assert used_blocks(server) == 0
    assert server.frontend.num_live_requests() == 0


def test_priority_field_runs_high_priority_requests_first(start_server):
    import time

    server = start_server(instances=1, null_step_time=0.01, max_num_seqs=1)
    finished: dict[str, float] = {}

    def send(name: str, priority: int) -> None:
        client(server).completions.create(model=MODEL, prompt="x", max_tokens=15, extra_body={"priority": priority})
        finished[name] = time.monotonic()

    threads = []
    for name, priority in [("low-1", 0), ("low-2", 0), ("low-3", 0), ("high", 5)]:
        threads.append(threading.Thread(target=send, args=(name, priority)))
        threads[-1].start()
        time.sleep(0.03)  # arrive in this order
    for t in threads:
        t.join(30)
    assert len(finished) == 4
    # One seat: the high-priority request, last to arrive, finishes before the low ones queued ahead of it.
    assert finished["high"] < finished["low-2"] and finished["high"] < finished["low-3"]


def test_bad_priority_type_is_refused(start_server):
    server = start_server(instances=1)
    resp = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "priority": "high"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "priority"
