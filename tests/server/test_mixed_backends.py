"""A mixed server: Shunter's own instances (null executor: ' hello world' ...) and remote null backends
(' alpha beta ...', `null_backend`) behind one OpenAI endpoint, one dispatch policy over both kinds."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from shunter.cluster.bundles import build_policy
from shunter.gateway.backends import BackendSpec
from shunter.gateway.gateway import BackendProbeError
from shunter.runtime.spec import InstanceSpec
from shunter.cli import main
from shunter.server.runner import Server, ServerSettings, free_port, wait_until
from tests.server.conftest import MODEL, client

HELLO = " hello world hello world"  # 4 tokens of an own instance
ALPHA = " alpha beta gamma delta"  # 4 tokens of a backend


def dispatches(server, engine: str) -> float:
    return server.frontend.metrics.registry.get_sample_value(
        "shunter_dispatches_total", {"policy": "round-robin", "engine": engine}) or 0.0


def texts(c: openai.OpenAI, kind: str) -> list[str]:
    """Two requests of one kind in a row (round robin: one to each instance), their texts."""
    out = []
    for _ in range(2):
        if kind == "completion":
            out.append(c.completions.create(model=MODEL, prompt="hi", max_tokens=4).choices[0].text)
        elif kind == "chat":
            out.append(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4).choices[0].message.content)
        elif kind == "completion stream":
            chunks = c.completions.create(model=MODEL, prompt="hi", max_tokens=4, stream=True)
            out.append("".join(ch.choices[0].text for ch in chunks if ch.choices))
        else:
            chunks = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, stream=True)
            out.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
    return out


def test_one_endpoint_serves_through_own_instances_and_backends_under_one_policy(start_server, null_backend):
    same, other = null_backend(model=MODEL), null_backend(model="other")
    server = start_server(instances=1, backends=(same.url, other.url))
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL, "other"]
    # Round robin over instance 0 (own) and backend b0 (same model); b1 serves another model only.
    for kind in ("completion", "chat", "completion stream", "chat stream"):
        assert texts(c, kind) == [HELLO, ALPHA], kind
    assert dispatches(server, "0") == dispatches(server, "b0") == 4
    out = c.completions.create(model="other", prompt="hi", max_tokens=2)
    assert out.choices[0].text == " alpha beta" and dispatches(server, "b1") == 1
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert f"Served: {MODEL}, other" in str(err.value)
    # A body fit for the backend but not for Shunter is refused for the own model (either kind may get it) ...
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=2)
    # ... and passed through to the backend that judges it for a backend-only model.
    assert c.completions.create(model="other", prompt="hi", max_tokens=2, logprobs=2).choices[0].text
    listed = httpx.get(server.url + "/admin/instances").json()["instances"]
    assert [(i["id"], i["kind"], i["state"]) for i in listed] == [
        ("0", "shunter", "ready"), ("b0", "remote", "ready"), ("b1", "remote", "ready")]
    # Serving mode's metric names, per instance of either kind (a relayed stream is counted as it closes).
    e2e = 'vllm:e2e_request_latency_seconds_count{engine="%s",model_name="%s"} 4.0'
    assert wait_until(lambda: all(e2e % (e, MODEL) in httpx.get(server.url + "/metrics").text for e in ("0", "b0")),
                      5)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'shunter_instances{state="ready"} 3.0' in metrics
    for engine in ("0", "b0"):
        assert f'vllm:time_to_first_token_seconds_count{{engine="{engine}",model_name="{MODEL}"}}' in metrics
    assert httpx.get(server.url + "/health").status_code == 200


def test_migration_is_refused_from_and_to_a_remote_backend(start_server, null_backend):
    backend = null_backend(model=MODEL, token_delay_s=0.05)
    server = start_server(instances=1, backends=(backend.url,), null_step_time=0.05)
    c = client(server)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        own = pool.submit(c.completions.create, model=MODEL, prompt="hi", max_tokens=30)  # round robin: to 0
        assert wait_until(lambda: server.frontend.streams, 5)
        remote = pool.submit(c.completions.create, model=MODEL, prompt="hi", max_tokens=30)  # to b0
        assert wait_until(lambda: server.gateway.backends["b0"].calls, 5)
        live = {r["instance"]: r["id"] for r in httpx.get(server.url + "/admin/requests").json()["requests"]}
        assert set(live) == {"0", "b0"}
        away = httpx.post(f"{server.url}/admin/requests/{live['b0']}/migrate", json={"to": "0"})
        assert away.status_code == 409
        assert "runs on remote backend b0" in away.json()["error"]["message"]
        assert "live migration is not available for remote backends" in away.json()["error"]["message"]
        onto = httpx.post(f"{server.url}/admin/requests/{live['0']}/migrate", json={"to": "b0"})
        assert onto.status_code == 409 and "instance b0 is a remote backend" in onto.json()["error"]["message"]
        assert own.result(20).choices[0].text.startswith(HELLO)
        assert remote.result(20).choices[0].text.startswith(ALPHA)
    assert server.frontend.migrations.history == []


def test_draining_a_backend_stops_dispatch_to_it_and_waits_for_its_requests(start_server, null_backend):
    backend = null_backend(model=MODEL, token_delay_s=0.05)
    server = start_server(instances=1, backends=(backend.url,))
    c = client(server)
    c.completions.create(model=MODEL, prompt="hi", max_tokens=1)  # round robin: to 0; the next to b0
    stream = c.completions.create(model=MODEL, prompt="hi", max_tokens=20, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].text == " alpha"
    drained = httpx.post(server.url + "/admin/instances/b0/drain").json()
    assert (drained["kind"], drained["state"]) == ("remote", "draining")
    last = httpx.post(server.url + "/admin/instances/0/drain")
    assert last.status_code == 409 and "last mixed instance taking work" in last.json()["error"]["message"]
    for _ in range(4):  # all to the own instance now
        assert c.completions.create(model=MODEL, prompt="hi", max_tokens=4).choices[0].text == HELLO
    assert dispatches(server, "b0") == 1
    # The request under way on the backend runs to its end; then the backend is stopped.
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) == 19
    assert wait_until(lambda: server.gateway.backends["b0"].state.value == "stopped", 5)


def test_a_dead_backend_leaves_dispatch_and_the_own_instances_take_its_work(start_server, null_backend):
    backend = null_backend(model=MODEL, token_delay_s=0.05)
    server = start_server(instances=1, backends=(backend.url,))
    c = client(server)
    c.completions.create(model=MODEL, prompt="hi", max_tokens=1)  # round robin: to 0; the next to b0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.completions.create, model=MODEL, prompt="hi", max_tokens=20)
        assert wait_until(lambda: server.gateway.backends["b0"].calls, 5)
        backend.stop()
        # Lost before it answered: sent once more, and dispatch's only choice left is the own instance.
        assert pending.result(20).choices[0].text == " hello world" * 10
    assert server.gateway.backends["b0"].state.value == "failed"
    assert texts(c, "chat") == [HELLO, HELLO]
    assert httpx.get(server.url + "/health").status_code == 200
    # Back on its port: healthy at its next check, and dispatch picks it again.
    null_backend(port=backend.port, model=MODEL)
    assert wait_until(lambda: server.gateway.backends["b0"].state.value == "ready", 10)
    assert sorted(texts(c, "completion")) == [ALPHA, HELLO]


def test_a_backend_serving_only_some_of_the_own_names_is_refused_at_start_up(null_backend, tokenizer):
    backend = null_backend(model=MODEL)
    settings = ServerSettings(port=0, num_instances=1, served_model_names=(MODEL, "smol-chat"),
                              backends=(BackendSpec(backend.url),))
    server = Server(settings, InstanceSpec(executor="null", max_model_len=256), build_policy("rr"), tokenizer, 256)
    with pytest.raises(BackendProbeError, match=f"serves {MODEL} but not smol-chat"):
        server.start_in_thread(timeout=30)


def test_a_dead_own_instances_stream_resumes_on_an_own_instance_never_on_a_backend(start_server, null_backend):
    backend = null_backend(model=MODEL)
    server = start_server(instances=2, backends=(backend.url,), null_step_time=0.02)
    stream = client(server).completions.create(model=MODEL, prompt="hi", max_tokens=40, stream=True)  # to 0
    pieces = []
    for n, chunk in enumerate(stream):
        pieces.append(chunk.choices[0].text if chunk.choices else "")
        if n == 4:
            server.frontend.handles["0"].loop.stop()  # its engine loop gone: the in-process instance died
    # Round robin would pick the backend next; a resume needs the tokens so far re-prefilled: instance 1.
    assert "".join(pieces) == " hello world" * 20
    assert server.frontend.handles["0"].state.value == "failed"
    assert server.frontend.metrics.registry.get_sample_value("shunter_request_resumes_total") == 1
    assert dispatches(server, "b0") == 0



def test_shunter_serve_names_a_mixed_servers_backend_that_does_not_answer(capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    argv = ["serve", "--instances", "1", "--runtime", "local", "--null-engine", "--port", str(free_port()),
            "--backend", dead]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shunter: error:") and f"backend {dead} does not answer" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
