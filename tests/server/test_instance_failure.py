"""An instance's process dies under load: its streams resume on a healthy instance, nothing hangs, dispatch goes on."""

from __future__ import annotations

import time

import httpx
import pytest

from shunter.cluster.bundles import build_policy
from shunter.runtime.spec import InstanceSpec
from shunter.server.cli import start_ray
from shunter.server.runner import Server, ServerSettings, ray_handles, wait_until
from tests.server.conftest import MODEL, client

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_null_server(tokenizer, hello_world_ids):
    import ray

    start_ray(None)
    spec = InstanceSpec(executor="null", max_model_len=512, null_token_ids=hello_world_ids, null_step_time=0.02)
    server = Server(ServerSettings(port=0, num_instances=2, served_model_names=(MODEL,)), spec,
                    build_policy("rr"), tokenizer, 512, ray_handles).start_in_thread(timeout=120)
    yield server
    server.stop()
    ray.shutdown()


def test_killing_an_instance_resumes_its_stream_elsewhere_and_dispatch_avoids_it(ray_null_server):
    import json

    import ray

    server = ray_null_server
    body = {"model": MODEL, "prompt": "x", "max_tokens": 100, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:  # on instance 0
            lines = resp.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            ray.kill(server.frontend.handles["0"].actor)
            rest = [line for line in lines if line]
    assert time.monotonic() - started < 20  # ended, not hung
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first] + rest[:-1]]
    assert not any("error" in c for c in chunks), chunks[-3:]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    # The null executor's k-th token is "hello" or "world" by k alone: a lost or repeated token shows.
    assert text == " hello world" * 50
    assert chunks[-1]["usage"]["completion_tokens"] == 100
    listed = {i["id"]: i for i in httpx.get(server.url + "/admin/instances").json()["instances"]}
    assert listed["0"]["state"] == "failed" and listed["0"]["error"]
    assert httpx.get(server.url + "/health").status_code == 200
    # Every new request goes to the healthy instance and completes.
    for _ in range(3):
        out = client(server).completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert out.choices[0].text == " hello world hello"
    assert wait_until(lambda: server.frontend.num_live_requests() == 0, 5)
