"""Instances die under load, also in the middle of a live migration: streams go on, nothing is lost or doubled.

The instances run the real engine loop and scheduler over the fake executor,
whose next token is a hash of the KV it reads back: a request resumed from the
wrong tokens, or one that lost or repeated a token, changes the output. An
in-process instance "dies" when its engine-loop thread stops (`kill`), the
in-process equivalent of its process going away.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from shunter.server.runner import wait_until
from tests.server.conftest import MODEL, client, live_handles
from tests.server.test_live_migration import PROMPT, complete


def kill(server, instance_id: str) -> None:
    """Stop the instance's engine loop: from now on it answers nothing, as if its process died."""
    server.frontend.handles[instance_id].loop.stop()


def assert_clean(server) -> None:
    """No request left in the frontend, and no block or request left on any live instance."""
    assert wait_until(lambda: server.frontend.num_live_requests() == 0, 5)
    alive = [h for h in live_handles(server) if h.loop.is_alive and h.state.value in ("ready", "draining")]

    def leftovers():
        return [(h.instance_id, h.loop.call(lambda e, now: (len(e.scheduler.requests), len(e.scheduler.incoming),
                                                              e.scheduler.block_manager.num_used_blocks)).result(5))
                for h in alive]
    assert wait_until(lambda: all(v == (0, 0, 0) for _, v in leftovers()), 5), leftovers()


def stream_text(stream, on_chunk=None) -> tuple[str, list]:
    """Read a completions stream to its end; (text, chunks); `on_chunk(n, chunk)` after each chunk."""
    pieces, chunks = [], []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            pieces.append(chunk.choices[0].text or "")
        if on_chunk is not None:
            on_chunk(len(chunks), chunk)
    return "".join(pieces), chunks


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_a_dead_instances_stream_resumes_elsewhere_with_the_same_tokens(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.01)
    forgotten = []  # the live instance is told to drop its KV links to the dead one
    server.frontend.handles["1"].forget_peer = forgotten.append
    reference, _ = complete(server, max_tokens=60)  # instance 0
    complete(server, max_tokens=1)  # instance 1: round robin is back on 0
    stream = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
    text, chunks = stream_text(stream, on_chunk=lambda n, _: n == 5 and kill(server, "0"))
    assert text == reference  # one continuous stream: nothing lost, nothing twice
    assert chunks[-1].usage.completion_tokens == 60
    assert all(c.choices[0].finish_reason in (None, "length") for c in chunks if c.choices)
    assert server.frontend.handles["0"].state.value == "failed"
    assert forgotten == ["0"]
    assert metric(server, "shunter_request_resumes_total") == 1
    assert metric(server, "shunter_instance_failures_total") == 1
    assert complete(server, max_tokens=60)[0] == reference  # dispatch goes on, to the live instance
    assert_clean(server)


def test_every_request_of_a_dead_instance_resumes_and_finishes_right(start_fake_server):
    server = start_fake_server(instances=3, policy="rr", step_time=0.01)
    prompts = [PROMPT[i:] + [500 + i] for i in range(9)]
    references = {i: complete(server, 40, p)[0] for i, p in enumerate(prompts)}
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p: results.update({i: complete(server, 40, p)[0]}))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    assert wait_until(lambda: any(s.token_ids for s in server.frontend.streams.values()
                                  if s.instance_id == "1"), 10)
    kill(server, "1")
    for t in threads:
        t.join(30)
    assert results == references
    assert metric(server, "shunter_request_resumes_total") >= 1
    assert_clean(server)


def test_with_no_instance_left_the_stream_ends_with_a_clear_error(start_fake_server):
    server = start_fake_server(instances=1, step_time=0.02)
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "stream": True}
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            kill(server, "0")
            rest = [line for line in lines if line]
    assert time.monotonic() - started < 10  # ended, never hung
    assert any('"error"' in line and "instance 0 failed" in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"
    assert server.frontend.num_live_requests() == 0
    assert httpx.get(server.url + "/health").status_code == 503


def test_restart_failed_starts_a_replacement_that_takes_work(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.01, restart_failed=True)
    reference, _ = complete(server, max_tokens=30)
    kill(server, "0")
    assert wait_until(lambda: "2" in server.frontend.handles and server.frontend.handles["2"].state.value == "ready", 10)
    assert {h.instance_id for h in server.frontend.ready_instances} == {"1", "2"}
    texts = {complete(server, max_tokens=30)[0] for _ in range(4)}  # round robin over 1 and 2
    assert texts == {reference}
    assert 'shunter_dispatches_total{engine="2",policy="round-robin"} 2.0' in httpx.get(server.url + "/metrics").text
    assert metric(server, "shunter_instance_restarts_total") == 1
    assert_clean(server)


def migrate_in_background(server, request_id: str, to: str) -> tuple[threading.Thread, dict]:
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(httpx.post(
        f"{server.url}/admin/requests/{request_id}/migrate", json={"to": to}, timeout=30).json()))
    t.start()
    return t, result


def slow_copies(server, instance_id: str, seconds: float) -> None:
    """Every KV copy out of `instance_id` first waits `seconds` (a slow link)."""
    src = server.frontend.handles[instance_id]
    copy = src.copy_blocks
    src.copy_blocks = lambda *a, **kw: (time.sleep(seconds), copy(*a, **kw))[1]


def test_destination_dies_mid_migration_the_request_goes_on_at_the_source(start_fake_server):
    server = start_fake_server(instances=3, policy="rr", step_time=0.01)
    reference, _ = complete(server, max_tokens=60)  # instance 0
    complete(server, max_tokens=1)
    complete(server, max_tokens=1)  # round robin is back on 0
    slow_copies(server, "0", 0.4)
    stream = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    order, result = migrate_in_background(server, first.id, "1")
    time.sleep(0.15)  # the first stage's copy is under way
    kill(server, "1")
    text = first.choices[0].text + stream_text(stream)[0]
    order.join(30)
    assert result["outcome"] == "aborted", result
    assert text == reference
    assert server.frontend.coordinator.active == {}
    assert metric(server, "shunter_request_resumes_total") == 0  # it never left the source
    assert_clean(server)


def test_source_dies_mid_migration_the_request_resumes_once_elsewhere(start_fake_server):
    server = start_fake_server(instances=3, policy="rr", step_time=0.01)
    reference, _ = complete(server, max_tokens=60)  # instance 0
    complete(server, max_tokens=1)
    complete(server, max_tokens=1)
    slow_copies(server, "0", 0.4)
    stream = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    order, result = migrate_in_background(server, first.id, "1")
    time.sleep(0.15)
    kill(server, "0")
    text = first.choices[0].text + stream_text(stream)[0]
    order.join(30)
    assert result["outcome"] == "aborted", result
    assert text == reference
    assert metric(server, "shunter_request_resumes_total") == 1
    assert server.frontend.coordinator.active == {}
    assert_clean(server)  # the destination's reservation is freed too


def test_a_stage_that_times_out_aborts_and_the_request_goes_on_at_the_source(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.01, stage_timeout=0.2)
    reference, _ = complete(server, max_tokens=60)
    complete(server, max_tokens=1)
    dst = server.frontend.handles["1"].loop.engine.executor
    write, writes_done = dst.write_blocks, []
    # A hung link: the copy into instance 1 takes far longer than a stage may, then completes.
    dst.write_blocks = lambda ids, payload: (time.sleep(1.0), write(ids, payload), writes_done.append(ids))[1]
    stream = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    started = time.monotonic()
    order, result = migrate_in_background(server, first.id, "1")
    order.join(30)
    assert time.monotonic() - started < 0.9  # given up at the stage's deadline, not at the copy's end
    assert result["outcome"] == "aborted" and "took over 0.2 s" in result["abort_reason"], result
    text = first.choices[0].text + stream_text(stream)[0]
    assert text == reference
    # The late copy still lands in the reserved blocks; only then is the reservation freed.
    assert wait_until(lambda: writes_done, 5)
    assert_clean(server)


def test_an_instance_that_hangs_is_found_by_the_health_check_and_its_requests_resume(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.01, instance_timeout=1.0)
    reference, _ = complete(server, max_tokens=60)  # instance 0
    complete(server, max_tokens=1)
    stuck, release = server.frontend.handles["0"].loop.engine.executor, threading.Event()
    execute = stuck.execute

    def hang_after_some_tokens(batch, steps=[0]):  # noqa: B006 (a counter across calls)
        steps[0] += 1
        if steps[0] > 8:
            release.wait(30)  # a step that never returns (a hung kernel), until the test lets go
        return execute(batch)

    stuck.execute = hang_after_some_tokens
    try:
        started = time.monotonic()
        text = stream_text(client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60,
                                                             temperature=0, stream=True))[0]
        assert text == reference
        assert time.monotonic() - started < 10  # found within the timeout, not after the hang
        handle = server.frontend.handles["0"]
        assert handle.state.value in ("failed", "stopped") and "sent nothing" in handle.error
        assert metric(server, "shunter_request_resumes_total") == 1
    finally:
        release.set()
    assert_clean(server)
