"""Servers on 127.0.0.1 for the tests: the real frontend and HTTP app over in-process engines.

The instances here run the real engine loop and scheduler with a null or fake
executor (no model), and the real SmolLM2 tokenizer, so the tests exercise
everything from HTTP to the block manager in seconds.
"""

from __future__ import annotations

import contextlib

import openai
import pytest

from shunter.cluster.bundles import build_policy
from shunter.model.loader import load_tokenizer_and_context, prepare_checkpoint
from shunter.runtime.spec import InstanceSpec
from shunter.server.runner import Server, ServerSettings

MODEL = "smol"


@pytest.fixture(scope="session")
def tokenizer():
    tok, _ = load_tokenizer_and_context(prepare_checkpoint(None))
    return tok


@pytest.fixture(scope="session")
def hello_world_ids(tokenizer) -> list[int]:
    """The null executor's output: ' hello world' over and over."""
    return tokenizer.encode(" hello world", add_special_tokens=False)


@pytest.fixture
def start_server(tokenizer, hello_world_ids):
    """start_server(instances=2, policy="rr", **spec fields) -> a running Server; stopped after the test."""
    servers = []

    def start(instances: int = 2, policy: str = "rr", dispatch: str | None = None, max_model_len: int = 256,
              **spec_fields) -> Server:
        spec_fields.setdefault("null_token_ids", hello_world_ids)
        spec = InstanceSpec(executor="null", max_model_len=max_model_len, report_interval=0.02, **spec_fields)
        settings = ServerSettings(port=0, num_instances=instances, served_model_names=(MODEL,))
        server = Server(settings, spec, build_policy(policy, dispatch=dispatch), tokenizer, max_model_len)
        servers.append(server.start_in_thread(timeout=60))
        return server

    yield start
    for server in servers:
        server.stop()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def engines(server: Server):
    """The in-process engines behind a server (LocalInstance handles only)."""
    return [h.loop.engine for h in server.frontend.handles.values()]


def engine_requests(server: Server) -> int:
    """Requests live on any instance, read in each loop thread between steps."""
    return sum(h.loop.call(lambda e, now: len(e.scheduler.requests)).result(5)
               for h in server.frontend.handles.values())


def used_blocks(server: Server) -> int:
    """KV blocks in use on any instance (prefix-cached blocks no request holds count as free)."""
    return sum(h.loop.call(lambda e, now: e.scheduler.block_manager.num_used_blocks).result(5)
               for h in server.frontend.handles.values())
