"""API keys, the admin API's key and reach, request-size and in-flight limits: refusals in OpenAI's shape."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from shunter.cluster.bundles import build_policy
from shunter.runtime.spec import InstanceSpec
from shunter.server.runner import Server, ServerSettings, wait_until
from shunter.server.security import AccessPolicy
from tests.server.conftest import MODEL, engine_requests, used_blocks

KEY, ADMIN = "sk-test-123", "admin-456"


@pytest.fixture
def secured(tokenizer, hello_world_ids):
    servers = []

    def start(**settings) -> Server:
        spec = InstanceSpec(executor="null", max_model_len=256, null_token_ids=hello_world_ids, null_step_time=0.01)
        server = Server(ServerSettings(port=0, num_instances=1, served_model_names=(MODEL,), **settings), spec,
                        build_policy("rr"), tokenizer, 256).start_in_thread(timeout=60)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def test_v1_needs_the_key_when_one_is_set_and_probes_stay_open(secured):
    server = secured(access=AccessPolicy(api_key=KEY))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key" and KEY not in resp.text
    assert httpx.get(server.url + "/v1/models").status_code == 401
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(**body).choices[0].text == " hello world"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).completions.create(**body)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert engine_requests(server) == 0


def test_admin_needs_its_own_key(secured):
    server = secured(access=AccessPolicy(api_key=KEY, admin_key=ADMIN))
    assert httpx.get(server.url + "/admin/instances").status_code == 401
    assert httpx.get(server.url + "/admin/instances", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    resp = httpx.get(server.url + "/admin/instances", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200 and resp.json()["instances"]


def test_admin_answers_only_loopback_clients_unless_told_otherwise():
    from shunter.server.security import GuardMiddleware

    guard = GuardMiddleware(None, AccessPolicy())
    remote = {"type": "http", "path": "/admin/instances", "headers": [], "client": ("10.1.2.3", 5555)}
    local = dict(remote, client=("127.0.0.1", 5555))
    assert guard._check(remote).status == 403
    assert guard._check(local) is None
    assert GuardMiddleware(None, AccessPolicy(admin_remote=True))._check(remote) is None
    assert guard._check(dict(remote, path="/v1/completions")) is None


def test_a_body_over_the_limit_is_413_and_nothing_runs(secured):
    server = secured(access=AccessPolicy(max_body_bytes=1000))
    resp = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 5000})
    assert resp.status_code == 413 and "limit is 1000" in resp.json()["error"]["message"]

    def chunks():  # no Content-Length: refused once the body read so far passes the limit
        yield b'{"model": "smol", "prompt": "'
        yield b"y" * 3000
        yield b'"}'

    resp = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert engine_requests(server) == 0


def test_beyond_the_in_flight_limit_requests_get_429_with_retry_after_and_admitted_ones_finish(secured):
    server = secured(max_live_requests=2)
    results = []

    def long_one() -> None:
        out = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions.create(
            model=MODEL, prompt="x", max_tokens=60)
        results.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=long_one) for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_until(lambda: server.frontend.num_live_requests() == 2, 5)
    resp = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "RateLimitError"
    for t in threads:
        t.join(30)
    assert results == [60, 60]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'shunter_requests_rejected_total{status="429"} 1.0' in metrics


def test_a_burst_far_above_capacity_stays_bounded_and_loses_nothing_admitted(secured):
    """2,000 requests at once against a limit of 32: the rest get 429 at once, memory stays bounded,
    every admitted request completes whole, and nothing is left allocated afterwards."""
    import asyncio

    import aiohttp

    server = secured(max_live_requests=32)
    peak, statuses, lengths = [0], [], []

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    async def one(http) -> None:
        async with http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 20}) as resp:
            statuses.append(resp.status)
            body = await resp.json()
            if resp.status == 200:
                lengths.append(body["usage"]["completion_tokens"])
            else:
                assert body["error"]["type"] == "RateLimitError" and resp.headers["retry-after"]

    async def burst() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(server.url, connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=60)) as http:
            tasks = [asyncio.create_task(one(http)) for _ in range(2000)]
            while not all(t.done() for t in tasks):
                peak[0] = max(peak[0], server.frontend.num_live_requests())
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)

    before = rss_mb()
    asyncio.run(burst())
    assert len(statuses) == 2000 and set(statuses) <= {200, 429}
    assert statuses.count(200) >= 32 and statuses.count(429) > 1000
    assert lengths == [20] * statuses.count(200)  # every admitted request whole
    assert peak[0] <= 32  # the in-flight bound held at every sample
    assert rss_mb() - before < 100  # client and server share this process: both stayed bounded
    assert wait_until(lambda: server.frontend.num_live_requests() == 0 and engine_requests(server) == 0, 5)
    assert used_blocks(server) == 0
