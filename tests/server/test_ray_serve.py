"""End to end with the real model: two Ray-actor instances behind the real server, the openai client in front."""

from __future__ import annotations

import threading

import httpx
import pytest

from shunter.cluster.bundles import build_policy
from shunter.model.loader import load_tokenizer_and_context, prepare_checkpoint, source_path
from shunter.runtime.spec import InstanceSpec
from shunter.server.cli import start_ray
from shunter.server.runner import Server, ServerSettings, ray_handles, wait_until
from tests.server.conftest import client

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def ray_server():
    import ray

    source = prepare_checkpoint(None)
    tokenizer, model_len = load_tokenizer_and_context(source)
    start_ray(None)
    spec = InstanceSpec(model=source_path(source), num_threads=1, max_model_len=1024, num_blocks=512)
    server = Server(ServerSettings(port=0, num_instances=2, served_model_names=(MODEL,)), spec,
                    build_policy("rr"), tokenizer, model_len, ray_handles).start_in_thread(timeout=180)
    yield server
    server.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def gloo_server(ray_server):
    """Two more instances, in the Ray started for `ray_server`, whose migrations send KV over gloo."""
    source = prepare_checkpoint(None)
    tokenizer, model_len = load_tokenizer_and_context(source)
    spec = InstanceSpec(model=source_path(source), num_threads=1, max_model_len=1024, num_blocks=512,
                        kv_channel="torch-distributed")
    server = Server(ServerSettings(port=0, num_instances=2, served_model_names=(MODEL,)), spec,
                    build_policy("rr"), tokenizer, model_len, ray_handles).start_in_thread(timeout=180)
    yield server
    server.stop()


def test_instances_are_separate_processes(ray_server):
    listed = httpx.get(ray_server.url + "/admin/instances").json()["instances"]
    pids = {i["facts"]["pid"] for i in listed}
    assert len(listed) == 2 and len(pids) == 2
    assert all(i["facts"]["num_threads"] == 1 and i["state"] == "ready" for i in listed)
    # Their caches are in shared memory, so migrations between them read KV directly (kv_channel).
    assert all(i["facts"]["kv_cache"] == "shared-memory" for i in listed)


def test_greedy_output_equals_offline_generation(ray_server):
    from shunter import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):"]
    served = [client(ray_server).completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0)
              for p in prompts]
    llm = LLM(num_blocks=256, max_num_seqs=4)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    assert [s.choices[0].text for s in served] == [o.text for o in offline]
    assert [s.usage.completion_tokens for s in served] == [len(o.token_ids) for o in offline]


def test_concurrent_chat_streams_on_both_instances(ray_server):
    texts = []

    def one(i: int) -> None:
        stream = client(ray_server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=12,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 12
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(texts) == 4 and all(texts)
    metrics = httpx.get(ray_server.url + "/metrics").text
    for instance in ("0", "1"):
        assert f'shunter_dispatches_total{{engine="{instance}",policy="round-robin"}}' in metrics


@pytest.mark.parametrize("channel", ["shared-memory", "torch-distributed"])
def test_a_live_migration_between_ray_actors_keeps_the_greedy_output(channel, request):
    from shunter import LLM, SamplingParams

    ray_server = request.getfixturevalue("ray_server" if channel == "shared-memory" else "gloo_server")
    listed = httpx.get(ray_server.url + "/admin/instances").json()["instances"]
    assert {i["facts"]["kv_channel"] for i in listed} == {channel}
    assert {i["facts"]["kv_cache"] for i in listed} == {"shared-memory" if channel == "shared-memory" else "private"}

    # Over 40 tokens: several full KV blocks of 16 exist whenever the migration starts.
    prompt = ("Write a short story about a lighthouse keeper who lives alone on a rocky island, keeps a "
              "logbook of every passing ship, and one stormy night sees a light where no ship should be.")
    offline = LLM(num_blocks=256, max_num_seqs=4).generate([prompt], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    stream = client(ray_server).completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
    pieces, migration = [], {}
    for i, chunk in enumerate(stream):
        pieces.append(chunk.choices[0].text)
        if i == 3:
            owner = next(r["instance"] for r in httpx.get(ray_server.url + "/admin/requests").json()["requests"]
                         if r["id"] == chunk.id)
            other = "1" if owner == "0" else "0"
            t = threading.Thread(target=lambda: migration.update(httpx.post(
                f"{ray_server.url}/admin/requests/{chunk.id}/migrate", json={"to": other}, timeout=60).json()))
            t.start()
    t.join(60)
    assert migration["outcome"] == "committed", migration
    assert sum(migration["blocks_per_stage"]) >= 2
    assert "".join(pieces) == offline.text

    def all_free() -> bool:
        listed = httpx.get(ray_server.url + "/admin/instances").json()["instances"]
        return all(i["load"]["num_running"] == 0 and i["load"]["num_used_blocks"] == 0 for i in listed)

    assert wait_until(all_free, 5)  # the pushed reports catch up within a report interval
