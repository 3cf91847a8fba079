"""Backends that die, come back, are missing at start-up or are drained."""

from __future__ import annotations

import concurrent.futures
import http.server
import subprocess
import sys
import threading

import openai
import pytest

from shunter.gateway.gateway import BackendProbeError
from shunter.server.runner import free_port, wait_until
from tests.gateway.conftest import client

SLOW = dict(model="m", token_delay_s=0.1)  # 10 tokens take a second: time to kill the backend mid-request


def state(gw, instance_id: str) -> str:
    return gw.gateway.backends[instance_id].state.value


def test_a_dead_backend_leaves_dispatch_its_whole_requests_retry_once_and_it_comes_back(null_backend,
                                                                                         start_gateway):
    a, b = null_backend(**SLOW), null_backend(**SLOW)
    gw = start_gateway([a.url, b.url])
    c = client(gw)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.completions.create, model="m", prompt="p", max_tokens=10)  # round robin: to a
        assert wait_until(lambda: gw.gateway.backends["0"].calls, 5)
        a.stop()
        out = pending.result(timeout=20)
    assert out.choices[0].text.split() == ["alpha", "beta", "gamma", "delta"] * 2 + ["alpha", "beta"]
    assert state(gw, "0") == "failed"
    assert gw.gateway.metrics.registry.get_sample_value("shunter_backend_retries_total", {"engine": "0"}) == 1
    for _ in range(3):  # all to b now
        c.completions.create(model="m", prompt="p", max_tokens=1)
    assert len(gw.gateway.backends["1"].calls) == 0
    # Back on the same port: healthy at its next check, and it takes work again.
    null_backend(port=a.port, model="m")
    assert wait_until(lambda: state(gw, "0") == "ready", 10)
    before = gw.gateway.metrics.registry.get_sample_value("shunter_dispatches_total",
                                                          {"policy": "round-robin", "engine": "0"})
    for _ in range(2):
        c.completions.create(model="m", prompt="p", max_tokens=1)
    after = gw.gateway.metrics.registry.get_sample_value("shunter_dispatches_total",
                                                         {"policy": "round-robin", "engine": "0"})
    assert after == before + 1


def test_a_started_stream_ends_with_an_error_event_when_its_backend_dies(null_backend, start_gateway):
    a, b = null_backend(**SLOW), null_backend(**SLOW)
    gw = start_gateway([a.url, b.url])
    stream = client(gw).completions.create(model="m", prompt="p", max_tokens=10, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text == " alpha"
    threading.Thread(target=a.stop, daemon=True).start()
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert "backend 0" in str(err.value) and "failed" in str(err.value)
    assert wait_until(lambda: state(gw, "0") == "failed", 5)


def test_start_up_names_a_backend_that_does_not_answer(null_backend, start_gateway):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendProbeError) as err:
        start_gateway([null_backend(model="m").url, dead])
    assert f"backend {dead} does not answer" in str(err.value)
    assert "--allow-missing-backends" in str(err.value)


def test_start_up_names_a_backend_that_is_not_an_openai_server(start_gateway):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(BackendProbeError) as err:
            start_gateway([url])
    finally:
        httpd.shutdown()
    assert f"backend {url} is not an OpenAI server: GET /v1/models answered 404" in str(err.value)


def test_allow_missing_backends_starts_without_them(null_backend, start_gateway):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway([dead, null_backend(model="m").url], allow_missing=True)
    assert len(gw.gateway.backends) == 1 and gw.gateway.warnings[0].startswith(f"left out: backend {dead}")
    assert client(gw).completions.create(model="m", prompt="p", max_tokens=2).choices[0].text == " alpha beta"


def test_the_cli_start_up_error_is_one_line_naming_the_backend():
    dead = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "shunter", "serve", "--backend", dead, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"shunter: error: backend {dead} does not answer")
    assert "Traceback" not in done.stderr


def test_cli_refuses_migration_for_remote_backends():
    done = subprocess.run([sys.executable, "-m", "shunter", "serve", "--backend", "http://127.0.0.1:1",
                           "--migration", "llumnix"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "live migration is not available for remote backends" in done.stderr


def test_draining_a_backend_stops_dispatch_and_waits_for_its_requests(null_backend, start_gateway):
    a, b = null_backend(**SLOW), null_backend(**SLOW)
    gw = start_gateway([a.url, b.url])
    c = client(gw)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.completions.create, model="m", prompt="p", max_tokens=10)  # to backend 0
        assert wait_until(lambda: gw.gateway.backends["0"].calls, 5)
        import urllib.request
        req = urllib.request.Request(gw.url + "/admin/instances/0/drain", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        assert state(gw, "0") == "draining"
        for _ in range(2):
            c.completions.create(model="m", prompt="p", max_tokens=1)  # both to backend 1
        assert pending.result(timeout=20).usage.completion_tokens == 10  # finished where it ran
    assert wait_until(lambda: state(gw, "0") == "stopped", 5)
    registry = gw.gateway.metrics.registry
    assert registry.get_sample_value("shunter_dispatches_total", {"policy": "round-robin", "engine": "1"}) == 2


def test_a_backend_without_metrics_is_dispatched_on_what_the_gateway_sent_it(null_backend, start_gateway):
    a = null_backend(model="m", metrics=False)
    gw = start_gateway([a.url])
    assert gw.gateway.warnings == [f"backend {a.url} has no /metrics: its load is what the gateway sent it"]
    assert client(gw).completions.create(model="m", prompt="p", max_tokens=2).usage.completion_tokens == 2
    backend = gw.gateway.backends["0"]
    assert not backend.has_metrics and backend.scraped is None and state(gw, "0") == "ready"
