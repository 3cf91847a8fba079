"""Servers on 127.0.0.1 for the tests: the real frontend and HTTP app over in-process engines.

The instances here run the real engine loop and scheduler with a null or fake
executor (no model), and the real SmolLM2 tokenizer, so the tests exercise
everything from HTTP to the block manager in seconds.
"""

from __future__ import annotations

import time

import openai
import pytest

from shunter.cluster.bundles import build_policy
from shunter.gateway.backends import BackendSpec
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
    """start_server(instances=2, policy="rr", backends=(), **spec fields) -> a running Server; stopped after the test.

    `backends`: URLs of remote OpenAI servers beside the instances (a mixed server, backend ids b0, b1, ...).
    """
    servers = []

    def start(instances: int = 2, policy: str = "rr", dispatch: str | None = None, max_model_len: int = 256,
              backends: tuple[str, ...] = (), **spec_fields) -> Server:
        spec_fields.setdefault("null_token_ids", hello_world_ids)
        spec = InstanceSpec(executor="null", max_model_len=max_model_len, report_interval=0.02, **spec_fields)
        settings = ServerSettings(port=0, num_instances=instances, served_model_names=(MODEL,),
                                  backends=tuple(BackendSpec(url) for url in backends))
        server = Server(settings, spec, build_policy(policy, dispatch=dispatch), tokenizer, max_model_len)
        servers.append(server.start_in_thread(timeout=60))
        return server

    yield start
    for server in servers:
        server.stop()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def engine_requests(server: Server) -> int:
    """Requests live on any instance, read in each loop thread between steps."""
    return sum(h.loop.call(lambda e, now: len(e.scheduler.requests)).result(5) for h in live_handles(server))


def used_blocks(server: Server) -> int:
    """KV blocks in use on any instance (prefix-cached blocks no request holds count as free)."""
    return sum(h.loop.call(lambda e, now: e.scheduler.block_manager.num_used_blocks).result(5)
               for h in live_handles(server))


def live_handles(server: Server):
    """Handles of instances not stopped (a stopped one was checked empty when it was stopped)."""
    return [h for h in server.frontend.handles.values() if h.state.value != "stopped"]


@pytest.fixture
def start_fake_server(tokenizer):
    """start_fake_server(instances=2, step_time=0.01, num_blocks=64 or a list, **policy) -> a running Server.

    Its instances run the real engine loop and scheduler over the tests' `FakeExecutor`, whose tokens
    depend on the KV it reads back from the blocks: a block lost or copied wrong in a migration
    changes the output.
    """
    from shunter.runtime.handles import LocalInstance
    from tests.factories import make_engine

    servers = []

    def start(instances: int = 2, step_time: float = 0.01, num_blocks=64, policy: str = "rr",
              migration: str | None = None, max_num_seqs: int = 16, pd: tuple[int, int] | None = None,
              scaling=None, restart_failed: bool = False, stage_timeout: float = 10.0,
              instance_timeout: float = 60.0) -> Server:
        blocks = num_blocks if isinstance(num_blocks, list) else [num_blocks] * instances

        def make_handle(instance_id: str, spec: InstanceSpec) -> LocalInstance:
            engine = make_engine(instance_id, num_blocks=blocks[min(int(instance_id), len(blocks) - 1)],
                                 max_num_seqs=max_num_seqs)
            inner = engine.executor.execute
            engine.executor.execute = lambda batch: (time.sleep(step_time), inner(batch))[1]
            return LocalInstance(instance_id, spec, engine=engine)

        spec = InstanceSpec(executor="null", block_size=4, report_interval=0.02)
        settings = ServerSettings(port=0, num_instances=instances, served_model_names=(MODEL,),
                                  control_interval=0.02, pd=pd, restart_failed=restart_failed,
                                  migration_stage_timeout=stage_timeout, instance_timeout=instance_timeout)
        server = Server(settings, spec, build_policy(policy, migration=migration, scaling=scaling), tokenizer, 512,
                        make_handle)
        servers.append(server.start_in_thread(timeout=60))
        return server

    yield start
    for server in servers:
        server.stop()


def instance_requests(server: Server, instance_id: str) -> int:
    handle = server.frontend.handles[instance_id]
    return handle.loop.call(lambda e, now: len(e.scheduler.requests) + len(e.scheduler.incoming)).result(5)
