"""Block manager: allocation, free, prefix caching (chained hashes, token check, LRU), invariants."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from shunter.engine import block_manager as block_manager_module
from shunter.engine.block_manager import BlockManager, cdiv
from shunter.request import Request, SamplingParams


def req(tokens: list[int], rid: str) -> Request:
    return Request(rid, list(tokens), SamplingParams(temperature=0))


def snapshot(bm: BlockManager) -> dict:
    """Everything allocation may touch, deep-copied, in comparable form (free-list order included)."""
    return copy.deepcopy({
        "ref_counts": bm.ref_counts,
        "block_hashes": bm.block_hashes,
        "block_token_ids": bm.block_token_ids,
        "free_order": list(bm.free_block_ids),
        "hash_to_block_id": bm.hash_to_block_id,
        "req_to_block_ids": bm.req_to_block_ids,
        "req_to_num_cached_blocks": bm.req_to_num_cached_blocks,
        "req_to_block_hashes": bm.req_to_block_hashes,
    })


def prefill(bm: BlockManager, request: Request, num_tokens: int | None = None) -> list[int]:
    """Allocate (with prefix hits) and 'compute' `num_tokens` of the request, registering full blocks."""
    n = request.num_tokens if num_tokens is None else num_tokens
    cached = bm.find_cached_prefix(request)
    got = bm.allocate_slots(request.request_id, n, cached)
    assert got is not None
    request.num_computed_tokens = n
    bm.cache_computed_blocks(request)
    bm.check_invariants()
    return bm.block_ids(request.request_id)


A = [1, 2, 3, 4]
B = [5, 6, 7, 8]
C = [9, 10, 11, 12]
D = [13, 14, 15, 16]


# ---- allocate / free ------------------------------------------------------------
def test_allocate_returns_new_block_ids_and_grows_the_table():
    bm = BlockManager(8, block_size=4)
    first = bm.allocate_slots("a", 5)
    assert first is not None and len(first) == 2 and len(set(first)) == 2
    assert bm.block_ids("a") == first
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 2
    # Still inside the second block: nothing new.
    assert bm.allocate_slots("a", 8) == []
    grown = bm.allocate_slots("a", 9)
    assert grown is not None and len(grown) == 1 and grown[0] not in first
    assert bm.block_ids("a") == first + grown
    other = bm.allocate_slots("b", 4)
    assert other is not None and not set(other) & set(bm.block_ids("a"))
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_allocate_uses_exactly_the_free_blocks_then_refuses():
    bm = BlockManager(4, block_size=4)
    assert bm.allocate_slots("a", 16) is not None
    assert bm.num_free_blocks == 0
    assert bm.allocate_slots("b", 1) is None
    assert "b" not in bm.req_to_block_ids


def test_allocate_none_changes_nothing():
    bm = BlockManager(6, block_size=4)
    prefill(bm, req(A + B + C, "a"))  # 3 blocks, all registered
    bm.allocate_slots("b", 4)
    before = snapshot(bm)
    # A new request that does not fit.
    assert bm.allocate_slots("c", 4 * 3) is None
    assert snapshot(bm) == before
    # Growing an existing request beyond the free blocks.
    assert bm.allocate_slots("b", 4 * 4) is None
    assert snapshot(bm) == before
    bm.check_invariants()


def test_allocate_none_with_cached_blocks_changes_nothing():
    bm = BlockManager(4, block_size=4)
    prefill(bm, req(A + B + C, "a"))
    bm.free("a")  # 3 cached free blocks + 1 fresh one
    assert bm.allocate_slots("z", 2) is not None  # takes the fresh (unhashed) block
    r = req(A + B + C + D, "r")
    cached = bm.find_cached_prefix(r)
    assert len(cached) == 3
    before = snapshot(bm)
    # 3 revived + 1 new > 3 free: refused, and nothing moved (no revived block left the free list).
    assert bm.allocate_slots("r", 16, cached) is None
    assert snapshot(bm) == before
    bm.check_invariants()


def test_cached_blocks_only_start_a_table():
    bm = BlockManager(8, block_size=4)
    prefill(bm, req(A + B, "a"))
    bm.allocate_slots("b", 1)
    cached = bm.find_cached_prefix(req(A + B + C, "x"))
    with pytest.raises(ValueError, match="'b'"):
        bm.allocate_slots("b", 12, cached)


def test_free_returns_every_block():
    bm = BlockManager(10, block_size=4)
    bm.allocate_slots("a", 9)
    bm.allocate_slots("b", 4)
    bm.allocate_slots("a", 13)
    assert bm.free("a") == 4
    assert bm.block_ids("a") == []
    assert bm.num_free_blocks == 9
    assert bm.free("b") == 1
    assert bm.num_free_blocks == 10 and sorted(bm.free_block_ids) == list(range(10))
    assert bm.ref_counts == [0] * 10
    assert bm.free("b") == 0 and bm.free("never") == 0
    assert not bm.req_to_block_ids and not bm.req_to_block_hashes and not bm.req_to_num_cached_blocks
    bm.check_invariants()


def test_shared_block_is_freed_only_by_its_last_holder():
    bm = BlockManager(8, block_size=4)
    a_blocks = prefill(bm, req(A + B + C, "a"))
    b = req(A + B + D, "b")
    b_blocks = prefill(bm, b)
    assert b_blocks[:2] == a_blocks[:2] and b_blocks[2] != a_blocks[2]
    assert [bm.ref_counts[x] for x in a_blocks] == [2, 2, 1]
    assert bm.num_used_blocks == 4
    bm.free("a")
    assert bm.num_used_blocks == 3 and all(x not in bm.free_block_ids for x in b_blocks)
    bm.free("b")
    assert bm.num_free_blocks == 8
    bm.check_invariants()


# ---- prefix caching -----------------------------------------------------------------
def test_full_computed_blocks_hit_and_one_token_stays_uncached():
    bm = BlockManager(16, block_size=4)
    blocks = prefill(bm, req(A + B + C, "a"))
    assert bm.find_cached_prefix(req(A + B + C + [99], "x")) == blocks
    # The same prompt exactly: the last block is left to compute so the request gets logits.
    assert bm.find_cached_prefix(req(A + B + C, "y")) == blocks[:2]
    assert bm.find_cached_prefix(req(A + B + [0, 0, 0, 0], "z")) == blocks[:2]
    assert bm.find_cached_prefix(req(D + B + C + [1], "w")) == []


def test_one_token_stays_uncached_even_when_every_token_was_computed():
    bm = BlockManager(16, block_size=4)
    r = req(A + B, "r")
    blocks = prefill(bm, r)  # all 8 tokens computed: both blocks hashed and registered
    bm.free("r", forget_hashes=False)  # e.g. preempted; its token hashes are kept
    assert bm.find_cached_prefix(r) == blocks[:1]
    assert bm.find_cached_prefix(req(A + B, "fresh")) == blocks[:1]


def test_only_full_computed_blocks_are_cached():
    bm = BlockManager(16, block_size=4)
    a = req(A + B + C[:2], "a")
    blocks = prefill(bm, a, num_tokens=10)  # third block half full
    assert bm.find_cached_prefix(req(A + B + C + [0], "x")) == blocks[:2]
    c = req(D + B + C, "c")
    bm.allocate_slots("c", 12)
    c.num_computed_tokens = 5  # allocated 3 blocks, computed 1 full block only
    bm.cache_computed_blocks(c)
    assert bm.block_hashes[bm.block_ids("c")[0]] is not None
    assert bm.block_hashes[bm.block_ids("c")[1]] is None
    assert bm.block_hashes[bm.block_ids("c")[2]] is None


def test_same_block_tokens_after_a_different_prefix_do_not_hit():
    bm = BlockManager(16, block_size=4)
    blocks = prefill(bm, req(A + B + C, "a"))
    # B is cached as 'B after A'; as a first block (after the root) it is different content.
    assert bm.find_cached_prefix(req(B + C + [0], "x")) == []
    # C as 'C after D after ...' must not hit block 2 of 'a' either: chain breaks at D.
    assert bm.find_cached_prefix(req(D + B + C + [0], "y")) == []
    # Positive control: the real prefix hits every block.
    assert bm.find_cached_prefix(req(A + B + C + [0], "z")) == blocks
    # And the per-block hashes of equal tokens differ with the parent.
    h_ab = bm._block_hashes(req(A + B, "p"), 2)
    h_b = bm._block_hashes(req(B, "q"), 1)
    assert h_ab[1] != h_b[0]


def test_a_hash_collision_never_serves_wrong_tokens(monkeypatch):
    monkeypatch.setattr(block_manager_module, "hash", lambda _key: 42, raising=False)
    bm = BlockManager(16, block_size=4)
    blocks = prefill(bm, req(A + B, "a"))
    assert bm.hash_to_block_id == {42: blocks[0]}  # every block collides; the first one wins
    # Same hash, other tokens: the token check refuses the hit.
    assert bm.find_cached_prefix(req(C + D + [0], "x")) == []
    # Positive control: a real match still hits.
    assert bm.find_cached_prefix(req(A + C + [0], "y")) == [blocks[0]]


def test_a_wrong_registered_entry_is_not_a_hit():
    bm = BlockManager(16, block_size=4)
    blocks = prefill(bm, req(A + B, "a"))
    victim = req(C + [0], "x")
    (h_c,) = bm._block_hashes(victim, 1)
    # Register C's hash against the block that holds A (a forged collision).
    bm.hash_to_block_id[h_c] = blocks[0]
    del bm.hash_to_block_id[bm.block_hashes[blocks[0]]]
    bm.block_hashes[blocks[0]] = h_c
    bm.check_invariants()
    assert bm.find_cached_prefix(victim) == []


def test_cache_registration_is_idempotent_and_first_writer_wins():
    bm = BlockManager(16, block_size=4)
    a = req(A + B, "a")
    a_blocks = prefill(bm, a)
    index = dict(bm.hash_to_block_id)
    bm.cache_computed_blocks(a)
    assert bm.hash_to_block_id == index
    # Computed independently (no lookup) by another request: the index keeps pointing at 'a'.
    b = req(A + B, "b")
    bm.allocate_slots("b", 8)
    b.num_computed_tokens = 8
    bm.cache_computed_blocks(b)
    assert sorted(bm.hash_to_block_id.values()) == sorted(a_blocks)
    assert all(bm.block_hashes[x] is None for x in bm.block_ids("b"))
    bm.check_invariants()


def test_prefix_caching_disabled_caches_nothing():
    bm = BlockManager(16, block_size=4, enable_prefix_caching=False)
    prefill(bm, req(A + B + C, "a"))
    assert bm.hash_to_block_id == {} and set(bm.block_hashes) == {None}
    assert bm.find_cached_prefix(req(A + B + C + [0], "x")) == []


def test_freed_cached_blocks_are_reused_least_recently_freed_first():
    bm = BlockManager(4, block_size=4)
    (a_block,) = prefill(bm, req(A, "a"), 4)
    (b_block,) = prefill(bm, req(B, "b"), 4)
    bm.free("a")
    bm.free("b")
    # Never-used blocks hold nothing reusable and go first.
    fresh = bm.allocate_slots("x", 8)
    assert sorted(fresh) == sorted(set(range(4)) - {a_block, b_block})
    assert bm.find_cached_prefix(req(A + [0], "qa")) == [a_block]
    assert bm.find_cached_prefix(req(B + [0], "qb")) == [b_block]
    # Then the least recently freed: 'a'.
    assert bm.allocate_slots("y", 4) == [a_block]
    assert bm.block_hashes[a_block] is None and bm.block_token_ids[a_block] is None
    assert a_block not in bm.hash_to_block_id.values()
    assert bm.find_cached_prefix(req(A + [0], "qa2")) == []
    assert bm.find_cached_prefix(req(B + [0], "qb2")) == [b_block]
    bm.check_invariants()


def test_a_hit_refreshes_recency():
    bm = BlockManager(3, block_size=4)
    (a_block,) = prefill(bm, req(A, "a"), 4)
    (b_block,) = prefill(bm, req(B, "b"), 4)
    (fresh,) = set(range(3)) - {a_block, b_block}
    bm.free("a")
    bm.free("b")  # LRU order: a, then b
    # Reviving 'a' through a hit and freeing it again makes it the most recently freed.
    prefill(bm, req(A + [0], "a2"))
    assert bm.block_ids("a2") == [a_block, fresh]
    bm.free("a2")
    assert sorted(bm.allocate_slots("y", 8)) == sorted([fresh, b_block])
    assert bm.find_cached_prefix(req(B + [0], "qb")) == []
    assert bm.find_cached_prefix(req(A + [0], "qa")) == [a_block]


def test_freeing_releases_the_tail_first_so_the_prefix_survives_longest():
    bm = BlockManager(3, block_size=4)
    blocks = prefill(bm, req(A + B + C, "a"))
    bm.free("a")
    assert bm.allocate_slots("x", 4) == [blocks[2]]
    assert bm.find_cached_prefix(req(A + B + C + [0], "q")) == blocks[:2]
    assert bm.allocate_slots("y", 4) == [blocks[1]]
    assert bm.find_cached_prefix(req(A + B + C + [0], "q2")) == blocks[:1]


def test_reviving_cached_free_blocks_counts_them_against_the_free_list():
    bm = BlockManager(4, block_size=4)
    blocks = prefill(bm, req(A + B + C, "a"))
    bm.free("a")
    r = req(A + B + C + D, "r")
    cached = bm.find_cached_prefix(r)
    assert cached == blocks
    new = bm.allocate_slots("r", 16, cached)
    assert new is not None and new[:3] == blocks and len(new) == 4
    assert bm.num_free_blocks == 0 and bm.num_used_blocks == 4
    assert bm.block_ids("r") == new
    assert all(bm.ref_counts[b] == 1 for b in new)
    bm.check_invariants()
    bm.free("r")
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_hits_on_blocks_in_use_do_not_consume_free_blocks():
    bm = BlockManager(4, block_size=4)
    blocks = prefill(bm, req(A + B + C, "a"))  # still held
    r = req(A + B + C + D, "r")
    cached = bm.find_cached_prefix(r)
    assert bm.allocate_slots("r", 16, cached) is not None
    assert bm.num_free_blocks == 0
    assert [bm.ref_counts[b] for b in blocks] == [2, 2, 2]
    bm.check_invariants()


def test_preemption_keeps_token_hashes_until_forgotten():
    bm = BlockManager(8, block_size=4)
    r = req(A + B + [1], "r")
    blocks = prefill(bm, r)
    hashes = list(bm.req_to_block_hashes["r"])
    bm.free("r", forget_hashes=False)
    assert bm.req_to_block_hashes["r"] == hashes
    assert bm.find_cached_prefix(r) == blocks[:2]
    bm.forget("r")
    assert "r" not in bm.req_to_block_hashes


# ---- invariants catch corruption -----------------------------------------------------
def _healthy() -> BlockManager:
    bm = BlockManager(8, block_size=4)
    prefill(bm, req(A + B + C, "a"))
    prefill(bm, req(A + B + D, "b"))
    bm.check_invariants()
    return bm


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda bm: bm.ref_counts.__setitem__(bm.block_ids("a")[0], 1), id="ref-count-too-low"),
    pytest.param(lambda bm: bm.ref_counts.__setitem__(bm.block_ids("a")[2], 2), id="ref-count-too-high"),
    pytest.param(lambda bm: bm.free_unhashed_ids.append(bm.block_ids("b")[2]), id="used-block-in-free-list"),
    pytest.param(lambda bm: bm.free_unhashed_ids.pop(), id="free-block-leaked"),
    pytest.param(lambda bm: bm.free_unhashed_ids.append(bm.free_unhashed_ids[0]), id="free-block-twice"),
    pytest.param(lambda bm: bm.free_cached_ids.__setitem__(bm.free_unhashed_ids.pop(), None),
                 id="unhashed-block-among-cached"),
    pytest.param(lambda bm: bm.req_to_block_ids["b"].append(bm.block_ids("a")[2]), id="block-owned-twice"),
    pytest.param(lambda bm: bm.req_to_block_ids["a"].append(bm.block_ids("a")[0]), id="block-twice-in-a-table"),
    pytest.param(lambda bm: bm.hash_to_block_id.__setitem__(12345, bm.block_ids("a")[0]), id="hash-index-wrong-block"),
    pytest.param(lambda bm: bm.block_token_ids.__setitem__(bm.block_ids("a")[0], None), id="hashed-block-without-tokens"),
])
def test_check_invariants_catches_corruption(corrupt):
    bm = _healthy()
    corrupt(bm)
    with pytest.raises(AssertionError):
        bm.check_invariants()


# ---- random operation sequences -------------------------------------------------------
NUM_BLOCKS = 12
BS = 2
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # tiny alphabet: many shared blocks


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / compute / grow / preempt / resume / free against a shadow KV store.

    The shadow store records which token each block slot holds, so a prefix hit
    that would serve the wrong KV, or a write into a block someone else shares,
    fails here even when the bookkeeping is self-consistent.
    """

    holders = Bundle("holders")
    parked = Bundle("parked")

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
        self.kv: dict[int, list[int | None]] = {}
        self.slots: dict[str, int] = {}  # tokens each holder has slots for
        self.count = 0

    def _check_hits(self, request: Request, cached: list[int]) -> None:
        toks = request.all_token_ids
        for i, b in enumerate(cached):
            assert self.kv[b] == toks[i * BS:(i + 1) * BS], "prefix hit serves the wrong KV"

    def _start(self, request: Request, data) -> Request | None:
        cached = self.bm.find_cached_prefix(request)
        self._check_hits(request, cached)
        assert len(cached) * BS < request.num_tokens
        n = data.draw(st.integers(len(cached) * BS + 1, request.num_tokens), label="slots")
        before = snapshot(self.bm)
        free = self.bm.num_free_blocks
        got = self.bm.allocate_slots(request.request_id, n, cached)
        if got is None:
            assert snapshot(self.bm) == before
            needed = cdiv(n, BS) - len(cached) + sum(1 for b in cached if self.bm.ref_counts[b] == 0)
            assert needed > free
            return None
        assert got == self.bm.block_ids(request.request_id)
        assert len(got) == cdiv(n, BS)
        assert self.bm.num_free_blocks == free - (cdiv(n, BS) - len(cached)) - sum(
            1 for b in cached if self.bm.ref_counts[b] == 1)
        request.num_computed_tokens = len(cached) * BS
        self.slots[request.request_id] = n
        return request

    @rule(target=holders, tokens=token_lists, data=st.data())
    def start(self, tokens, data):
        self.count += 1
        request = req(tokens, f"q{self.count}")
        started = self._start(request, data)
        if started is None:
            self.bm.forget(request.request_id)
            return None
        return started

    @rule(request=holders, data=st.data())
    def compute(self, request, data):
        if request is None or request.request_id not in self.slots:
            return
        end = self.slots[request.request_id]
        if request.num_computed_tokens >= end:
            return
        n = data.draw(st.integers(request.num_computed_tokens + 1, end), label="computed")
        table = self.bm.block_ids(request.request_id)
        for pos in range(request.num_computed_tokens, n):
            b = table[pos // BS]
            assert self.bm.ref_counts[b] == 1, "writing into a shared block"
            self.kv.setdefault(b, [None] * BS)[pos % BS] = request.all_token_ids[pos]
        request.num_computed_tokens = n
        self.bm.cache_computed_blocks(request)

    @rule(request=holders, new_tokens=st.lists(st.integers(0, 2), max_size=5), data=st.data())
    def grow(self, request, new_tokens, data):
        if request is None or request.request_id not in self.slots:
            return
        for t in new_tokens:
            request.append_output_token(t)
        end = data.draw(st.integers(self.slots[request.request_id], request.num_tokens), label="grow to")
        before = snapshot(self.bm)
        free = self.bm.num_free_blocks
        needed = max(cdiv(end, BS) - len(self.bm.block_ids(request.request_id)), 0)
        got = self.bm.allocate_slots(request.request_id, end)
        if got is None:
            assert snapshot(self.bm) == before and needed > free
        else:
            assert len(got) == needed and self.bm.num_free_blocks == free - needed
            self.slots[request.request_id] = end

    @rule(target=parked, request=consumes(holders))
    def preempt(self, request):
        if request is None or request.request_id not in self.slots:
            return None
        n = len(self.bm.block_ids(request.request_id))
        assert self.bm.free(request.request_id, forget_hashes=False) == n
        del self.slots[request.request_id]
        request.num_computed_tokens = 0
        return request

    @rule(target=holders, request=consumes(parked), data=st.data())
    def resume(self, request, data):
        if request is None:
            return None
        started = self._start(request, data)
        if started is None:
            self.bm.forget(request.request_id)
        return started

    @rule(request=consumes(holders))
    def finish(self, request):
        if request is None or request.request_id not in self.slots:
            return
        n = len(self.bm.block_ids(request.request_id))
        assert self.bm.free(request.request_id) == n
        del self.slots[request.request_id]

    @rule(tokens=token_lists)
    def probe(self, tokens):
        request = req(tokens, "probe")
        self._check_hits(request, self.bm.find_cached_prefix(request))
        self.bm.forget("probe")

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        for h, b in self.bm.hash_to_block_id.items():
            assert tuple(self.kv[b]) == self.bm.block_token_ids[b], "registered block holds other tokens"
        assert set(self.bm.req_to_block_ids) == set(self.slots)
        for rid, n in self.slots.items():
            assert len(self.bm.block_ids(rid)) == cdiv(n, BS)

    def teardown(self):
        for rid in list(self.slots):
            self.bm.free(rid)
        for rid in list(self.bm.req_to_block_hashes):
            self.bm.forget(rid)  # parked (preempted) requests that never came back
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert self.bm.ref_counts == [0] * NUM_BLOCKS
        assert not self.bm.req_to_block_ids and not self.bm.req_to_num_cached_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerRandomOperations = BlockManagerMachine.TestCase
