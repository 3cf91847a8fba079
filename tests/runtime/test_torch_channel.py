"""The torch-distributed KV channel's links: two instances' ends in one process, one thread each."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from shunter.runtime.torch_channel import KVLinks, dtype_named, link_rank

HOST = "127.0.0.1"


@pytest.fixture
def pair():
    a, b = KVLinks("3", HOST, timedelta(seconds=20)), KVLinks("10", HOST, timedelta(seconds=20))
    yield a, b
    a.close()
    b.close()


def test_blocks_arrive_bit_for_bit_in_either_direction_on_one_link(pair):
    a, b = pair
    payload = torch.randn(2, 3, 16, 6, 8).to(torch.bfloat16)  # layers, blocks, block size, 2 x heads, dim
    with ThreadPoolExecutor(2) as pool:
        received = pool.submit(b.receive, "3", a.address, "3/10/0", tuple(payload.shape), torch.bfloat16, 1)
        pool.submit(a.send, "10", b.address, "3/10/0", payload, 1).result(timeout=30)
        assert torch.equal(received.result(timeout=30), payload)
        # The same link the other way round ("10" sorts before "3": it is rank 0 and hosts the meeting).
        back = torch.arange(24, dtype=torch.float32).reshape(2, 12)
        received = pool.submit(a.receive, "10", b.address, "3/10/0", (2, 12), torch.float32, 2)
        pool.submit(b.send, "3", a.address, "3/10/0", back, 2).result(timeout=30)
        assert torch.equal(received.result(timeout=30), back)
    assert list(a._groups) == list(b._groups) == ["3/10/0"]  # joined once, reused


def test_the_links_to_a_peer_that_is_gone_are_dropped_and_a_new_key_joins_afresh(pair):
    a, b = pair
    with ThreadPoolExecutor(2) as pool:
        got = pool.submit(b.receive, "3", a.address, "3/10/0", (3,), torch.float32, 1)
        a.send("10", b.address, "3/10/0", torch.ones(3), 1)
        got.result(timeout=30)
        assert a.peers == {"10"} and b.peers == {"3"}
        a.forget("10")
        b.forget("3")
        assert a.peers == b.peers == set() and a._groups == b._groups == {}
        got = pool.submit(b.receive, "3", a.address, "3/10/1", (3,), torch.float32, 2)
        a.send("10", b.address, "3/10/1", torch.full((3,), 2.0), 2)
        assert torch.equal(got.result(timeout=30), torch.full((3,), 2.0))


def test_copies_in_flight_together_are_told_apart_by_their_tags(pair):
    a, b = pair
    first, second = torch.zeros(1000), torch.ones(1000)
    with ThreadPoolExecutor(4) as pool:
        got_second = pool.submit(b.receive, "3", a.address, "k", (1000,), torch.float32, 8)
        got_first = pool.submit(b.receive, "3", a.address, "k", (1000,), torch.float32, 7)
        pool.submit(a.send, "10", b.address, "k", first, 7).result(timeout=30)
        pool.submit(a.send, "10", b.address, "k", second, 8).result(timeout=30)
        assert torch.equal(got_first.result(timeout=30), first)
        assert torch.equal(got_second.result(timeout=30), second)


def test_a_link_whose_peer_never_comes_fails_at_the_timeout_and_is_dropped():
    lonely = KVLinks("0", HOST, timedelta(seconds=1))
    peer = KVLinks("1", HOST, timedelta(seconds=1))  # listens, never joins
    with pytest.raises(Exception):
        lonely.send("1", peer.address, "0/1/0", torch.zeros(4), 1)
    assert lonely._groups == {}


def test_ranks_and_names_are_checked():
    assert link_rank("1", "2") == 0 and link_rank("2", "1") == 1
    with pytest.raises(ValueError, match="itself"):
        link_rank("4", "4")
    assert dtype_named("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="'int9'"):
        dtype_named("int9")
