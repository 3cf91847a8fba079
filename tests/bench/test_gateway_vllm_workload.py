"""The Mooncake-conversation workload of `shunter bench gateway --vllm` (no vLLM needed)."""

from __future__ import annotations

import gzip
import json

from shunter.bench.gateway_vllm import block_reuse, conversation_rows, mooncake_conversations


def row(t, *ids):
    return {"timestamp": t, "input_length": 512 * len(ids), "output_length": 8, "hash_ids": list(ids)}


ROWS = [row(0, 0, 1, 2), row(1, 0, 5, 6), row(2, 0, 9), row(3, 0, 1, 2, 3), row(4, 0, 5, 7),
        row(5, 0, 1, 2, 3, 4), row(6, 0, 12, 13)]


def test_conversations_are_taken_whole_in_trace_order_with_their_previous_turns():
    rows, previous = conversation_rows(ROWS, num_conversations=2, min_turns=1)
    assert [r["timestamp"] for r in rows] == [0, 1, 3, 4, 5]  # conversations (0, 1) and (0, 5), every turn
    assert previous == [None, None, 0, 1, 2]
    rows, previous = conversation_rows(ROWS, num_conversations=5, min_turns=3)
    assert [r["timestamp"] for r in rows] == [0, 3, 5] and previous == [None, 0, 1]


def test_block_reuse_counts_blocks_seen_before_within_the_cap():
    assert block_reuse([row(0, 0, 1), row(1, 0, 1, 2)], max_blocks=8) == 2 / 5
    assert block_reuse([row(0, 0, 1), row(1, 0, 1, 2)], max_blocks=1) == 1 / 2


def test_turns_share_words_where_they_share_blocks_and_wait_for_their_previous_turn(tmp_path):
    path = tmp_path / "trace.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    requests = mooncake_conversations(path, 2, 1, words_per_block=3, max_blocks=4, output_len=8, seed=1)
    assert [r.after for r in requests] == [None, None, "m0", "m1", "m2"]
    assert requests[2].prompt.startswith(requests[0].prompt + " ")
    assert requests[4].num_prompt_tokens == 12  # capped at 4 blocks of 3 words
    assert requests[0].prompt.split()[:3] == requests[1].prompt.split()[:3]  # block 0, the shared system prompt
