"""The registered dispatch policies, unchanged, over remote backends' reports. No server, no model."""

from __future__ import annotations

import pytest

from shunter.cluster.bundles import build_policy
from shunter.cluster.global_scheduler import GlobalScheduler
from shunter.gateway.backends import BackendSpec
from shunter.gateway.prompt import prompt_token_ids, pseudo_token_ids
from shunter.gateway.remote import RemoteBackend
from shunter.gateway.scrape import Scraped, load_report
from shunter.request import Request, SamplingParams


def backends(n: int, running=(0, 0)) -> list[RemoteBackend]:
    out = []
    for i in range(n):
        b = RemoteBackend(str(i), BackendSpec(f"http://127.0.0.1:{9000 + i}"), ("m",), has_metrics=True)
        b.last_report = load_report(b.instance_id, Scraped("vllm", running[i], 0, 0.1 * running[i]), 0.0, [])
        out.append(b)
    return out


def scheduler(dispatch: str, instances) -> GlobalScheduler:
    s = GlobalScheduler(policy=build_policy("rr", dispatch=dispatch, migration="none"))
    for b in instances:
        s.add_instance(b, b.last_report)
    return s


def chat(i: int, messages: list[dict]) -> Request:
    return Request(f"r{i}", prompt_token_ids({"messages": messages}, is_chat=True), SamplingParams(max_tokens=8))


def test_equal_text_prefixes_give_equal_pseudo_token_prefixes():
    a, b = pseudo_token_ids("x" * 1000 + "tail one"), pseudo_token_ids("x" * 1000 + "another tail")
    assert a[:250] == b[:250] and a != b
    assert prompt_token_ids({"prompt": [5, 6, 7]}, is_chat=False) == [5, 6, 7]  # token ids are used as they are


def test_prefix_dispatch_keeps_a_conversation_on_one_backend():
    instances = backends(2)
    s = scheduler("prefix", instances)
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    turns = [system, {"role": "user", "content": "first question " * 20}]
    first = s.dispatch(chat(0, turns), 0.0)
    other = s.dispatch(chat(1, [{"role": "user", "content": "unrelated " * 100}]), 0.0)
    assert other is not first  # least load: the idle backend
    turns += [{"role": "assistant", "content": "an answer " * 20}, {"role": "user", "content": "and then?"}]
    assert s.dispatch(chat(2, turns), 0.0) is first


def test_least_load_reads_the_scraped_reports_plus_what_it_sent_since():
    instances = backends(2, running=(3, 0))
    s = scheduler("least-requests", instances)
    picks = [s.dispatch(chat(i, [{"role": "user", "content": "q"}]), 0.0).instance_id for i in range(4)]
    # Backend 1 is idle by its report; after three dispatches there it is as loaded as backend 0.
    assert picks == ["1", "1", "1", "0"]


def test_remote_backends_offer_no_migration():
    b = backends(1)[0]
    assert b.migration_candidates() == []
    with pytest.raises(NotImplementedError, match="not available for remote backends"):
        b.engine_call("begin_migration", "r0")


def test_queued_prefill_is_the_gateways_requests_with_nothing_back_yet():
    import time

    from shunter.gateway.gateway import Gateway
    from shunter.runtime.handles import InstanceState

    gw = Gateway([BackendSpec("http://127.0.0.1:9000")], build_policy("rr", dispatch="prefix", migration="none"))
    backend = backends(1)[0]
    backend.state = InstanceState.READY
    gw.backends["0"] = backend
    gw.schedulers["m"] = s = GlobalScheduler(policy=gw.policy)
    s.add_instance(backend, backend.last_report, movable=False)
    calls = []
    for i, n in enumerate((100, 60)):  # as the proxy does: dispatch, then the call in flight
        request = Request(f"r{i}", list(range(n)), SamplingParams(max_tokens=8))
        calls.append(gw.begin(gw.dispatch("m", request), request))
    assert s.views["0"].num_pending_prefill_tokens == 160
    gw.prefilled(backend, calls[0])  # its first chunk came back
    assert s.views["0"].num_pending_prefill_tokens == 60 and calls[0].first_at is not None
    assert backend.unprefilled_prompt_tokens(time.monotonic() + 1) == [60]
    # A scrape: the report counts what is still unprefilled among the calls sent before it began...
    gw._passed(backend, Scraped("vllm", 2, 0, 0.1), calls[1].sent_at + 1e-9)
    assert s.views["0"].num_pending_prefill_tokens == 60
    # ... and, begun before both were sent, the ones sent since, as dispatch did, less those prefilled.
    gw._passed(backend, Scraped("vllm", 2, 0, 0.1), calls[0].sent_at)
    assert s.views["0"].num_pending_prefill_tokens == 60
    gw.end(backend, calls[1])  # over, though no chunk was seen (a whole answer): nothing left to prefill
    assert s.views["0"].num_pending_prefill_tokens == 0
