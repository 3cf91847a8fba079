"""Random operation sequences against whole engines: invariants after every operation,
reference outputs and no leaked block at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from shunter.cluster.instance import InProcessInstance
from shunter.cluster.migration import COMMITTED, MigrationConfig, MigrationCoordinator
from shunter.engine.block_manager import cdiv
from shunter.request import Request, RequestStatus, SamplingParams, TokenDelta
from tests.engine.helpers import assert_all_free, assert_closed_once, migrate, tokens_of
from tests.factories import make_engine, reference_output

# Prompts start with a slice of one of a few shared bases so prefix hits happen.
BASES = [[(31 * k + 7 * i) % 1000 for i in range(24)] for k in range(3)]
MAX_PROMPT = 24
MAX_TOKENS = 12
CAPACITY = 40  # KV token slots per engine: every request fits alone (prompt + max_tokens - 1 <= 35)

settings_ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    bs = draw(st.sampled_from([2, 4]))
    return dict(
        block_size=bs,
        num_blocks=cdiv(CAPACITY, bs),
        max_num_batched_tokens=draw(st.sampled_from([4, 8, 32])),
        max_prefill_chunk=draw(st.sampled_from([None, 3, 8])),
        max_num_seqs=draw(st.sampled_from([1, 3, 8, 8])),
        enable_prefix_caching=draw(st.booleans()),
        max_model_len=64,
    )


@st.composite
def new_requests(draw):
    base = BASES[draw(st.integers(0, len(BASES) - 1))]
    prefix = base[:draw(st.integers(0, MAX_PROMPT))]
    tail = draw(st.lists(st.integers(0, 999), max_size=MAX_PROMPT - len(prefix)))
    prompt = (prefix + tail) or [draw(st.integers(0, 999))]
    max_tokens = draw(st.integers(1, MAX_TOKENS))
    ref = reference_output(prompt, max_tokens)
    eos_at = draw(st.none() | st.integers(0, max_tokens - 1))
    eos = None if eos_at is None else ref[eos_at]
    return ("add", prompt, max_tokens, draw(st.integers(0, 2)), eos)


def expected_output(prompt: list[int], max_tokens: int, eos: int | None) -> tuple[list[int], str]:
    ref = reference_output(prompt, max_tokens)
    if eos is not None and eos in ref:
        return ref[:ref.index(eos) + 1], "stop"
    return ref, "length"


@dataclass
class Run:
    """Bookkeeping shared by the random tests."""

    requests: dict[str, Request] = field(default_factory=dict)
    spec: dict[str, tuple[list[int], int, int | None]] = field(default_factory=dict)
    deltas: dict[str, list[TokenDelta]] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    now: float = 0.0

    def add(self, engine, op) -> None:
        _, prompt, max_tokens, priority, eos = op
        rid = f"q{len(self.requests)}"
        r = Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens),
                    arrival_time=self.now, priority=priority, eos_token_id=eos)
        engine.add_request(r)
        self.requests[rid] = r
        self.spec[rid] = (prompt, max_tokens, eos)

    def abort(self, engine, index: int) -> None:
        if not self.requests:
            return
        rid = sorted(self.requests)[index % len(self.requests)]
        was_live = engine.get_request(rid) is not None
        delta = engine.abort_request(rid, self.now)
        if was_live:
            assert delta is not None and delta.finish_reason == "abort"
            self.deltas.setdefault(rid, []).append(delta)
            self.aborted.add(rid)
            assert self.requests[rid].status is RequestStatus.FINISHED_ABORTED
        else:
            assert delta is None  # finished, aborted before, or living on another engine

    def step(self, engine) -> None:
        self.now += 0.01
        for d in engine.step(self.now):
            assert d.request_id not in self.aborted
            self.deltas.setdefault(d.request_id, []).append(d)

    def check_outputs(self) -> None:
        for rid, r in self.requests.items():
            prompt, max_tokens, eos = self.spec[rid]
            expected, reason = expected_output(prompt, max_tokens, eos)
            got = tokens_of(self.deltas.get(rid, []))
            if rid in self.aborted:
                assert got == expected[:len(got)], f"{rid}: wrong tokens before the abort"
                assert_closed_once(self.deltas[rid], "abort")
            else:
                assert got == expected, f"{rid}: output differs from the reference"
                assert_closed_once(self.deltas[rid], reason)


def _check(*engines) -> None:
    for e in engines:
        e.check_invariants()
        bm = e.scheduler.block_manager
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


def _drain(run: Run, *engines) -> None:
    for _ in range(5_000):
        if not any(e.has_unfinished_requests for e in engines):
            return
        for e in engines:
            run.step(e)
            _check(e)
    raise AssertionError("engines did not finish")


ops = st.lists(
    st.one_of(new_requests(), new_requests(), st.tuples(st.just("abort"), st.integers(0, 1000)),
              st.tuples(st.just("step"), st.integers(1, 4)), st.tuples(st.just("step"), st.integers(1, 4))),
    min_size=5, max_size=50,
)


@settings_
@given(config=configs(), operations=ops)
def test_random_operations_keep_invariants_and_reference_outputs(config, operations):
    engine = make_engine(**config)
    run = Run()
    for op in operations:
        if op[0] == "add":
            run.add(engine, op)
        elif op[0] == "abort":
            run.abort(engine, op[1])
        else:
            for _ in range(op[1]):
                run.step(engine)
                _check(engine)
        _check(engine)
    _drain(run, engine)
    num_preemptions = sum(r.num_preemptions for r in run.requests.values())
    event(f"preempted: {num_preemptions > 0}")
    target(float(num_preemptions), label="preemptions")
    run.check_outputs()
    assert_all_free(engine)


@settings_
@given(config=configs(), operations=st.lists(
    st.one_of(new_requests().map(lambda op: op + (0,)), new_requests().map(lambda op: op + (1,)),
              st.tuples(st.just("abort"), st.integers(0, 1000)),
              st.tuples(st.just("step"), st.integers(0, 1), st.integers(1, 3)),
              st.tuples(st.just("step"), st.integers(0, 1), st.integers(1, 3)),
              st.tuples(st.just("migrate"), st.integers(0, 1000)),
              st.tuples(st.just("migrate"), st.integers(0, 1000))),
    min_size=5, max_size=50))
def test_random_live_migrations_keep_greedy_output(config, operations):
    engines = [make_engine("A", **config), make_engine("B", **config)]
    bs = config["block_size"]
    run = Run()
    home: dict[str, int] = {}
    coordinator = MigrationCoordinator(MigrationConfig(), bs)
    for op in operations:
        if op[0] == "add":
            run.add(engines[op[-1]], op[:-1])
            home[f"q{len(run.requests) - 1}"] = op[-1]
        elif op[0] == "abort":
            if run.requests:
                rid = sorted(run.requests)[op[1] % len(run.requests)]
                run.abort(engines[home[rid]], op[1])
        elif op[0] == "step":
            for _ in range(op[2]):
                run.step(engines[op[1]])
        else:
            live = [r for r in run.requests.values() if r.status is RequestStatus.RUNNING]
            if live:
                r = live[op[1] % len(live)]
                src_i = home[r.request_id]
                src, dst = engines[src_i], engines[1 - src_i]
                current = src.get_request(r.request_id)
                m = migrate(coordinator, InProcessInstance(src), InProcessInstance(dst), r.request_id, run.now)
                if m.outcome == COMMITTED:
                    assert current.status is RequestStatus.FINISHED_MIGRATED
                    run.requests[r.request_id] = dst.get_request(r.request_id)
                    home[r.request_id] = 1 - src_i
                else:
                    assert current.status is RequestStatus.RUNNING
        _check(*engines)
    _drain(run, *engines)
    num_migrations = sum(r.num_migrations for r in run.requests.values())
    event(f"migrated: {num_migrations > 0}")
    num_preemptions = sum(r.num_preemptions for r in run.requests.values())
    event(f"preempted: {num_preemptions > 0}")
    target(float(num_migrations), label="migrations")
    target(float(num_preemptions), label="preemptions")
    run.check_outputs()
    for e in engines:
        assert_all_free(e)
