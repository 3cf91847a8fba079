"""The engine loop: commands between steps, sequenced step messages, reports, failures. No model."""

from __future__ import annotations

import threading
import time

import pytest

from shunter.request import TokenDelta
from shunter.runtime.engine_loop import ERROR_FINISH, EngineLoop
from shunter.server.streams import RequestStream
from tests.factories import make_engine, make_request, reference_output


def collect(loop: EngineLoop, until_finished: set[str], timeout: float = 10.0):
    """Poll like a frontend until every id in `until_finished` has its closing delta; returns (deltas, messages)."""
    seq, deltas, messages = 0, [], []
    deadline = time.monotonic() + timeout
    pending = set(until_finished)
    while pending and time.monotonic() < deadline:
        for m in loop.poll(seq, 0.5):
            seq = m.seq
            messages.append(m)
            for d in m.deltas:
                deltas.append(d)
                if d.is_finished:
                    pending.discard(d.request_id)
    assert not pending, f"no closing delta for {pending}"
    return deltas, messages


@pytest.fixture
def loop():
    engine = make_engine(step_time=0.0)
    loop = EngineLoop(engine, report_interval=0.01)
    loop.start()
    yield loop
    loop.stop()


def test_requests_run_to_their_reference_output_with_consecutive_indices(loop):
    requests = [make_request(prompt_len=9 + i, max_tokens=6) for i in range(4)]
    for r in requests:
        loop.add_request(r)
    deltas, messages = collect(loop, {r.request_id for r in requests})
    for r in requests:
        mine = [d for d in deltas if d.request_id == r.request_id]
        assert [t for d in mine for t in d.new_token_ids] == reference_output(r.prompt_token_ids, 6)
        assert [d.output_index for d in mine] == list(range(6))
    seqs = [m.seq for m in messages]
    assert seqs == sorted(set(seqs))


def test_one_message_per_step_carries_every_delta_of_that_step(loop):
    requests = [make_request(prompt_len=8, max_tokens=4) for _ in range(3)]
    # Both added in one command batch, so they step together.
    loop.call(lambda engine, now: [engine.add_request(r) for r in requests]).result(5)
    _, messages = collect(loop, {r.request_id for r in requests})
    with_tokens = [m for m in messages if m.deltas]
    assert len(with_tokens) == 4
    assert all(len(m.deltas) == 3 for m in with_tokens)


def test_poll_returns_unacknowledged_messages_again(loop):
    r = make_request(prompt_len=8, max_tokens=3)
    loop.add_request(r)
    time.sleep(0.2)
    first = loop.poll(0, 0.5)
    again = loop.poll(0, 0.5)  # the reply was "lost": nothing was acknowledged
    assert [m.seq for m in first] == [m.seq for m in again[:len(first)]]
    acked = loop.poll(first[-1].seq, 0.05)
    assert all(m.seq > first[-1].seq for m in acked)


def test_reports_are_pushed_while_idle(loop):
    time.sleep(0.1)
    reports = [m.report for m in loop.poll(0, 0.5) if m.report is not None]
    assert reports and reports[-1].num_running == 0
    seq = loop.poll(0, 0.1)[-1].seq
    assert loop.poll(seq, 0.5)[0].report is not None  # a fresh one arrives within the interval


def test_commands_apply_between_steps_never_during_one():
    engine = make_engine(step_time=0.0)
    in_step = threading.Event()
    overlaps = []
    inner = engine.executor.execute

    def slow_execute(batch):
        in_step.set()
        time.sleep(0.005)
        out = inner(batch)
        in_step.clear()
        return out

    engine.executor.execute = slow_execute
    loop = EngineLoop(engine, report_interval=0.01)
    loop.start()
    try:
        requests = [make_request(prompt_len=8, max_tokens=30) for _ in range(6)]
        for r in requests:
            loop.add_request(r)
            loop.call(lambda e, now: overlaps.append(in_step.is_set())).result(5)
            time.sleep(0.003)
        for r in requests[:3]:
            loop.abort_request(r.request_id).result(5)
        collect(loop, {r.request_id for r in requests})
    finally:
        loop.stop()
    assert overlaps and not any(overlaps)


def slow_down(loop: EngineLoop, seconds: float) -> None:
    """Make each step take `seconds` of wall time (the fake executor takes none)."""
    inner = loop.engine.executor.execute
    loop.engine.executor.execute = lambda batch: (time.sleep(seconds), inner(batch))[1]


def test_abort_frees_blocks_and_sends_a_closing_delta(loop):
    slow_down(loop, 0.005)
    r = make_request(prompt_len=12, max_tokens=200)
    loop.add_request(r)
    time.sleep(0.05)
    closing = loop.abort_request(r.request_id).result(5)
    assert closing.finish_reason == "abort"
    deltas, _ = collect(loop, {r.request_id})
    assert deltas[-1].finish_reason == "abort" and deltas[-1].output_index == closing.output_index
    used = loop.call(lambda e, now: e.scheduler.block_manager.num_used_blocks).result(5)
    assert used == 0


def test_a_request_the_engine_refuses_ends_with_an_error_and_its_reason(loop):
    too_long = make_request(prompt_len=600, max_tokens=4)  # max_model_len is 512
    loop.add_request(too_long)
    deltas, messages = collect(loop, {too_long.request_id})
    assert deltas[-1].finish_reason == ERROR_FINISH
    reason = next(m.errors[too_long.request_id] for m in messages if too_long.request_id in m.errors)
    assert "context" in reason


def test_a_failing_step_ends_every_request_with_an_error_and_the_loop_lives_on():
    engine = make_engine(step_time=0.0)
    engine.executor.execute = lambda batch: (_ for _ in ()).throw(RuntimeError("device lost"))
    loop = EngineLoop(engine, report_interval=0.01)
    loop.start()
    try:
        rs = [make_request(prompt_len=8, max_tokens=4) for _ in range(2)]
        for r in rs:
            loop.add_request(r)
        deltas, messages = collect(loop, {r.request_id for r in rs})
        assert {d.finish_reason for d in deltas} == {ERROR_FINISH}
        reasons = [e for m in messages for e in m.errors.values()]
        assert reasons and all("RuntimeError" in e and "device lost" not in e for e in reasons)
        assert loop.is_alive and "device lost" in loop.last_error
        assert loop.call(lambda e, now: e.scheduler.block_manager.num_used_blocks).result(5) == 0
    finally:
        loop.stop()


def test_commands_after_stop_fail_instead_of_hanging():
    loop = EngineLoop(make_engine(), report_interval=0.01)
    loop.start()
    loop.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        loop.add_request(make_request()).result(1)


# ---- the frontend's stream: indices -------------------------------------------------------

async def _drain(stream: RequestStream) -> list:
    out = []
    while not stream.queue.empty():
        out.append(stream.queue.get_nowait())
    return out


def test_stream_drops_duplicates_trims_overlaps_and_waits_for_a_gap_to_fill():
    import asyncio

    async def run():
        s = RequestStream("r", "0", 3, 0.0)
        s.push(TokenDelta("r", [5], 0.1, None, 0))
        s.push(TokenDelta("r", [5], 0.1, None, 0))  # duplicate
        s.push(TokenDelta("r", [5, 6, 7], 0.2, None, 0))  # overlaps: only 6, 7 are new
        events = await _drain(s)
        assert [e.token_ids for e in events] == [[5], [6, 7]]
        assert s.next_index == 3 and s.num_duplicates == 2
        s.push(TokenDelta("r", [9], 0.3, None, 5))  # tokens 3 and 4 have not come yet (another instance's)
        s.push(TokenDelta("r", [], 0.35, "length", 6))
        assert await _drain(s) == []
        s.push(TokenDelta("r", [7, 8], 0.4, None, 3))  # the gap fills: everything flows in order
        events = await _drain(s)
        assert [e.token_ids for e in events] == [[7, 8], [9], []]
        assert events[-1].finish_reason == "length" and s.next_index == 6
        s.push(TokenDelta("r", [8], 0.5, None, 6))  # after the end: ignored
        assert await _drain(s) == []

    asyncio.run(run())


def test_stream_with_a_gap_that_never_fills_ends_with_an_error(monkeypatch):
    import asyncio

    from shunter.server import streams

    monkeypatch.setattr(streams, "MAX_AHEAD", 3)

    async def run():
        s = RequestStream("r", "0", 3, 0.0)
        for i in range(4):
            s.push(TokenDelta("r", [1], 0.1, None, 2 + i))
        events = await _drain(s)
        assert events[-1].finish_reason == "error" and "lost tokens" in events[-1].error

    asyncio.run(run())


def test_an_import_into_an_idle_instance_runs_at_once_not_at_its_next_report():
    from shunter.engine.scheduler import RequestState

    engine = make_engine(step_time=0.0)
    loop = EngineLoop(engine, report_interval=5.0)  # an idle loop would sleep 5 s before looking again
    loop.start()
    try:
        time.sleep(0.2)  # idle: waiting for a command or its next report
        request = make_request(prompt_len=10, max_tokens=4)
        started = time.monotonic()
        loop.engine_call("import_request", RequestState.of(request, [])).result(5)  # a concurrent call
        deltas, _ = collect(loop, {request.request_id}, timeout=3)
        assert time.monotonic() - started < 1.0
        assert [t for d in deltas for t in d.new_token_ids] == reference_output(request.prompt_token_ids, 4)
    finally:
        loop.stop()
