"""Bad input is refused with a ValueError naming the bad value, and leaves nothing behind."""

from __future__ import annotations

import pytest

from shunter.config import SchedulerConfig
from shunter.engine.block_manager import BlockManager
from shunter.request import Request, SamplingParams
from tests.engine.helpers import assert_all_free, drain, step
from tests.factories import make_engine, make_request, reference_output


def _assert_untouched(engine, live=()):
    """Only the requests in `live` are known; no block is held beyond theirs."""
    s = engine.scheduler
    assert set(s.requests) == {r.request_id for r in live}
    assert {r.request_id for r in s.waiting + s.running} == {r.request_id for r in live}
    reservations = {("migration", m) for m in s.incoming}
    assert set(s.block_manager.req_to_block_ids) <= {r.request_id for r in live} | reservations
    assert not set(s.block_manager.req_to_block_hashes) - {r.request_id for r in live}
    engine.check_invariants()


def test_empty_prompt():
    with pytest.raises(ValueError, match="empty"):
        Request("e", [])
    with pytest.raises(ValueError, match="empty"):
        make_request(prompt=[])


@pytest.mark.parametrize("prompt_len", [32, 33, 100])
def test_prompt_at_or_over_max_model_len(prompt_len):
    engine = make_engine(max_model_len=32)
    r = make_request(prompt_len=prompt_len)
    with pytest.raises(ValueError, match=rf"{prompt_len} tokens.*32"):
        engine.add_request(r)
    _assert_untouched(engine)
    assert_all_free(engine)


def test_longest_prompt_that_fits_max_model_len_runs():
    engine = make_engine(max_model_len=32)
    r = make_request(prompt_len=31, max_tokens=5)
    engine.add_request(r)
    drain(engine)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 1)  # reached the context
    assert r.status.finish_reason == "length"


def test_request_needing_more_blocks_than_the_instance_has():
    engine = make_engine(num_blocks=4, block_size=4)  # 16 token slots
    with pytest.raises(ValueError, match=r"needs 5 KV blocks.*4"):
        engine.add_request(make_request(prompt_len=16, max_tokens=1))
    _assert_untouched(engine)
    assert_all_free(engine)
    ok = make_request(prompt_len=15, max_tokens=1)
    engine.add_request(ok)
    drain(engine)
    assert ok.output_token_ids == reference_output(ok.prompt_token_ids, 1)


@pytest.mark.parametrize("prompt_len,max_tokens,max_model_len,needed", [
    (20, 14, 512, 9),  # 33 tokens of KV > 32 slots: it would preempt itself forever
    (20, 100, 512, 30),
    (1, 40, 512, 10),
])
def test_request_that_could_outgrow_the_instance(prompt_len, max_tokens, max_model_len, needed):
    engine = make_engine(num_blocks=8, block_size=4, max_model_len=max_model_len)
    waiting = make_request(prompt_len=3, max_tokens=2)
    engine.add_request(waiting)
    with pytest.raises(ValueError, match=rf"needs {needed} KV blocks.*8"):
        engine.add_request(make_request(prompt_len=prompt_len, max_tokens=max_tokens))
    _assert_untouched(engine, [waiting])


@pytest.mark.parametrize("prompt_len,max_tokens,max_model_len", [(20, 13, 512), (20, 100, 33), (31, 2, 512)])
def test_request_that_just_fits_the_instance_is_accepted(prompt_len, max_tokens, max_model_len):
    engine = make_engine(num_blocks=8, block_size=4, max_model_len=max_model_len)
    r = make_request(prompt_len=prompt_len, max_tokens=max_tokens)
    engine.add_request(r)
    drain(engine)
    expected = min(max_tokens, max_model_len - prompt_len)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, expected)
    assert_all_free(engine)


@pytest.mark.parametrize("kwargs,named", [
    (dict(max_tokens=0), "max_tokens.*0"),
    (dict(max_tokens=-3), "max_tokens.*-3"),
    (dict(max_tokens=2.5), "max_tokens.*2.5"),
    (dict(temperature=-0.5), "temperature.*-0.5"),
    (dict(temperature=float("nan")), "temperature.*nan"),
    (dict(top_p=0.0), r"top_p.*0\.0"),
    (dict(top_p=1.5), r"top_p.*1\.5"),
    (dict(top_p=-1), r"top_p.*-1"),
    (dict(top_k=-2), "top_k.*-2"),
    (dict(top_k=0), "top_k.*0"),
    (dict(seed=1.5), r"seed.*1\.5"),
    (dict(stop_token_ids=[-1]), r"stop_token_ids.*-1"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field,value,named", [
    ("max_tokens", 0, "max_tokens.*0"),
    ("temperature", -1.0, r"temperature.*-1\.0"),
    ("top_p", 2.0, r"top_p.*2\.0"),
    ("top_k", 0, "top_k.*0"),
])
def test_sampling_params_changed_after_construction_are_refused_at_admission(field, value, named):
    engine = make_engine()
    r = make_request()
    setattr(r.sampling_params, field, value)
    with pytest.raises(ValueError, match=named):
        engine.add_request(r)
    _assert_untouched(engine)
    assert_all_free(engine)


@pytest.mark.parametrize("boundary", [dict(top_p=1.0), dict(top_k=-1), dict(top_k=1), dict(temperature=0.0),
                                      dict(max_tokens=1), dict(top_p=1e-9)])
def test_boundary_sampling_params_are_accepted(boundary):
    SamplingParams(**boundary)


def test_duplicate_request_id():
    engine = make_engine()
    first = make_request(prompt_len=9, max_tokens=4, request_id="dup")
    engine.add_request(first)
    step(engine)
    used = engine.scheduler.block_manager.num_used_blocks
    with pytest.raises(ValueError, match="'dup'"):
        engine.add_request(make_request(prompt_len=5, request_id="dup"))
    _assert_untouched(engine, [first])
    assert engine.scheduler.block_manager.num_used_blocks == used
    assert engine.get_request("dup") is first
    drain(engine)
    assert first.output_token_ids == reference_output(first.prompt_token_ids, 4)
    # Once finished the id is free again.
    again = make_request(prompt_len=5, max_tokens=2, request_id="dup")
    engine.add_request(again)
    drain(engine)
    assert again.output_token_ids == reference_output(again.prompt_token_ids, 2)
    assert_all_free(engine)


def test_duplicate_of_a_waiting_request_id():
    engine = make_engine()
    engine.add_request(make_request(request_id="w"))
    with pytest.raises(ValueError, match="'w'"):
        engine.add_request(make_request(request_id="w"))
    assert len(engine.scheduler.waiting) == 1


def test_id_of_a_request_migrating_here_is_in_use():
    engine = make_engine()
    assert engine.reserve_migration("m1", "x", 10) is not None
    reserved = list(engine.reserved_block_ids("m1"))
    with pytest.raises(ValueError, match="'x'"):
        engine.add_request(make_request(prompt_len=5, request_id="x"))
    assert engine.reserved_block_ids("m1") == reserved
    assert not engine.scheduler.requests
    engine.check_invariants()
    engine.cancel_migration("m1")
    assert_all_free(engine)


@pytest.mark.parametrize("kwargs,named", [
    (dict(num_blocks=0), "num_blocks"),
    (dict(block_size=-1), "block_size"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_prefill_chunk=0), "max_prefill_chunk"),
])
def test_bad_scheduler_config(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SchedulerConfig(**kwargs)


@pytest.mark.parametrize("kwargs,named", [(dict(num_blocks=0), "num_blocks"), (dict(num_blocks=4, block_size=0), "block_size")])
def test_bad_block_manager(kwargs, named):
    with pytest.raises(ValueError, match=named):
        BlockManager(**kwargs)
