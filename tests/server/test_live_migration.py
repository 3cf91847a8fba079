"""Live migration between serving instances: the stream continues with the same tokens, nothing leaks.

The instances run the real engine loop and scheduler over the fake executor,
whose next token is a hash of the KV it reads back, so a lost, stale or
misplaced block in a migration changes the output.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from shunter.server.runner import wait_until
from tests.server.conftest import MODEL, client, engine_requests, instance_requests, used_blocks

PROMPT = list(range(300, 337))  # token ids: 37 tokens, a partly filled last block of 4


def complete(server, max_tokens: int = 60, prompt=PROMPT, **kw) -> tuple[str, int]:
    out = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return out.choices[0].text, out.usage.completion_tokens


def stream_with_migration(server, after_chunks: int, to: str, max_tokens: int = 60, chat: bool = False):
    """Stream one request; after `after_chunks` chunks, migrate it to instance `to`. Returns (text, migration)."""
    migration = {}
    c = client(server)
    if chat:
        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}],
                                           max_tokens=max_tokens, temperature=0, stream=True)
    else:
        stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True)
    pieces, n = [], 0
    for chunk in stream:
        if not chunk.choices:
            continue
        pieces.append((chunk.choices[0].delta.content if chat else chunk.choices[0].text) or "")
        n += 1
        if n == after_chunks:
            rid = chunk.id
            t = threading.Thread(target=lambda: migration.update(
                httpx.post(f"{server.url}/admin/requests/{rid}/migrate", json={"to": to}, timeout=30).json()))
            t.start()
    t.join(30)
    return "".join(pieces), migration


def complete_all(server, prompts, max_tokens: int, wait: bool = True):
    """Send every prompt at once, one thread each; ({index: text}, threads), joined if `wait`."""
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p: results.update({i: complete(server, max_tokens, p)[0]}))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    if wait:
        for t in threads:
            t.join(30)
    return results, threads


def assert_clean(server) -> None:
    assert wait_until(lambda: engine_requests(server) == 0, 5)
    assert used_blocks(server) == 0
    assert server.frontend.num_live_requests() == 0
    assert not server.frontend.coordinator.active


@pytest.mark.parametrize("after_chunks", [1, 10, 40])
def test_greedy_output_is_the_same_with_a_migration_mid_decode(start_fake_server, after_chunks):
    server = start_fake_server(instances=2, policy="rr")
    reference, n = complete(server)  # lands on instance 0
    complete(server, max_tokens=1)  # the next request goes to instance 1: rr back on 0 for the streamed one
    text, migration = stream_with_migration(server, after_chunks, to="1")
    assert migration["outcome"] == "committed", migration
    assert migration["src"] == "0" and migration["dst"] == "1"
    assert migration["stages"] >= 1 and migration["downtime"] is not None
    assert text == reference and n == 60
    assert_clean(server)


def test_chat_stream_continues_through_a_migration(start_fake_server):
    server = start_fake_server(instances=2, policy="rr")
    whole = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}],
                                                   max_tokens=80, temperature=0)
    complete(server, max_tokens=1)
    text, migration = stream_with_migration(server, 3, to="1", max_tokens=80, chat=True)
    assert migration.get("outcome") == "committed", migration
    assert text == whole.choices[0].message.content
    assert_clean(server)


def test_a_queued_request_moves_without_kv(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", max_num_seqs=1, step_time=0.02)
    reference, _ = complete(server, max_tokens=20)
    complete(server, max_tokens=1)
    results = {}
    blocker = threading.Thread(target=lambda: results.update(blocker=complete(server, max_tokens=40, prompt=[5] * 9)))
    blocker.start()  # runs on instance 0 and holds its only seat
    time.sleep(0.1)
    complete(server, max_tokens=1)  # instance 1 again
    waiter = threading.Thread(target=lambda: results.update(waiter=complete(server, max_tokens=20)))
    waiter.start()  # queued behind the blocker on instance 0
    assert wait_until(lambda: len(server.frontend.streams) == 2, 5)
    rid = next(r for r, s in server.frontend.streams.items() if s.next_index == 0)
    m = httpx.post(f"{server.url}/admin/requests/{rid}/migrate", json={"to": "1"}, timeout=30).json()
    assert m["outcome"] == "committed" and m["waiting"] is True and m["blocks_per_stage"] == []
    waiter.join(30)
    blocker.join(30)
    assert results["waiter"][0] == reference
    assert_clean(server)


def test_a_destination_without_room_refuses_and_the_request_finishes_on_the_source(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", num_blocks=[64, 12])
    reference, _ = complete(server, max_tokens=40)
    complete(server, max_tokens=1)
    text, migration = stream_with_migration(server, 5, to="1", max_tokens=40)
    assert migration["outcome"] == "aborted" and "refused" in migration["abort_reason"]
    assert text == reference
    assert_clean(server)


def test_client_gone_during_a_migration_leaves_nothing_anywhere(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.02)
    complete(server, max_tokens=1)
    complete(server, max_tokens=1)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            rid = next(lines).split('"id":"')[1].split('"')[0]
            order = threading.Thread(target=lambda: httpx.post(
                f"{server.url}/admin/requests/{rid}/migrate", json={"to": "1"}, timeout=30))
            order.start()
            time.sleep(0.03)
    order.join(30)
    assert_clean(server)


def test_migration_orders_that_cannot_run_are_refused_and_change_nothing(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.02)
    result = {}
    t = threading.Thread(target=lambda: result.update(out=complete(server, max_tokens=60)))
    t.start()
    assert wait_until(lambda: len(server.frontend.streams) == 1, 5)
    rid = next(iter(server.frontend.streams))
    cases = [
        ("cmpl-nope", {"to": "1"}, 404, "no live request"),
        (rid, {"to": "9"}, 404, "no instance"),
        (rid, {"to": "0"}, 409, "same instance"),
        (rid, {"instance": "1"}, 400, '"to"'),
    ]
    for request_id, body, status, words in cases:
        resp = httpx.post(f"{server.url}/admin/requests/{request_id}/migrate", json=body, timeout=30)
        assert resp.status_code == status, resp.text
        assert words in resp.json()["error"]["message"]
    assert server.frontend.streams[rid].instance_id == "0"
    t.join(30)
    assert result["out"][1] == 60
    assert_clean(server)


def test_a_migration_to_a_draining_instance_is_refused(start_fake_server):
    server = start_fake_server(instances=3, policy="rr", step_time=0.02)
    httpx.post(server.url + "/admin/instances/2/drain")
    t = threading.Thread(target=lambda: complete(server, max_tokens=40))
    t.start()
    assert wait_until(lambda: len(server.frontend.streams) == 1, 5)
    rid = next(iter(server.frontend.streams))
    resp = httpx.post(f"{server.url}/admin/requests/{rid}/migrate", json={"to": "2"}, timeout=30)
    assert resp.status_code == 409 and "draining" in resp.json()["error"]["message"]
    t.join(30)
    assert_clean(server)


def test_drain_moves_every_request_away_while_clients_see_normal_completions(start_fake_server):
    server = start_fake_server(instances=2, policy="rr", step_time=0.01, num_blocks=512)
    prompts = [[100 + i] * (9 + i) for i in range(6)]
    references, _ = complete_all(server, prompts, 200)
    results, threads = complete_all(server, prompts, 200, wait=False)
    assert wait_until(lambda: instance_requests(server, "0") == 3, 5)
    drained_at = time.monotonic()
    assert httpx.post(server.url + "/admin/instances/0/drain").status_code == 200
    assert wait_until(lambda: instance_requests(server, "0") == 0, 10)
    drain_seconds = time.monotonic() - drained_at
    still_running = sum(1 for t in threads if t.is_alive())
    for t in threads:
        t.join(30)
    assert [results[i] for i in range(6)] == [references[i] for i in range(6)]
    # Instance 0 emptied while its clients were still streaming: by migration, not by finishing.
    assert still_running > 0, drain_seconds
    moved = server.frontend.metrics.migrations.labels("0", "1", "committed")._value.get()
    assert moved == 3
    assert_clean(server)


def test_metrics_count_migrations_and_their_downtime(start_fake_server):
    server = start_fake_server(instances=2, policy="rr")
    complete(server, max_tokens=1)
    complete(server, max_tokens=1)
    stream_with_migration(server, 5, to="1")
    text = httpx.get(server.url + "/metrics").text
    assert 'shunter_migrations_total{dst="1",outcome="committed",src="0"} 1.0' in text
    assert "shunter_migration_downtime_seconds_count 1.0" in text


def test_the_llumnix_policy_migrates_on_its_own_from_a_crowded_to_a_free_instance(start_fake_server):
    # Instance 0 has room for ~2 of these requests, instance 1 for many: round robin splits them evenly,
    # so instance 0 runs short of blocks and Llumnix's pairing moves requests to instance 1.
    server = start_fake_server(instances=2, policy="rr", migration="llumnix", num_blocks=[40, 512], step_time=0.01)
    prompts = [[200 + i] * (20 + i) for i in range(6)]
    results, _ = complete_all(server, prompts, 100)
    moved = server.frontend.metrics.migrations.labels("0", "1", "committed")._value.get()
    assert moved >= 1
    # The same prompts on a cluster that never migrates give the same text.
    plain = start_fake_server(instances=2, policy="rr", num_blocks=[512, 512], step_time=0.0)
    references, _ = complete_all(plain, prompts, 100)
    assert results == references
    assert_clean(server)


def test_pd_mode_prefills_on_one_role_decodes_on_the_other_with_the_same_output(start_fake_server, tokenizer):
    plain = start_fake_server(instances=2, policy="rr", num_blocks=512, step_time=0.0)
    prompts = [[300 + i] * (11 + 3 * i) for i in range(4)]
    references, _ = complete_all(plain, prompts, 40)
    server = start_fake_server(instances=2, policy="infaas", num_blocks=512, step_time=0.01, pd=(1, 1))
    listed = httpx.get(server.url + "/admin/instances").json()["instances"]
    assert [(i["id"], i["role"]) for i in listed] == [("0", "prefill"), ("1", "decode")]
    results, _ = complete_all(server, prompts, 40)
    assert results == references
    # Every request prefilled on instance 0 and was handed to instance 1 after its first token.
    assert server.frontend.metrics.dispatches.labels("infaas", "0")._value.get() == 4
    history = [(m.outcome, m.abort_reason, m.num_stages) for m in server.frontend.migrations.history]
    assert server.frontend.metrics.migrations.labels("0", "1", "committed")._value.get() == 4, history
    assert_clean(server)


def test_pd_admin_adds_an_instance_of_a_role_and_refuses_a_bad_one(start_fake_server):
    server = start_fake_server(instances=2, pd=(1, 1))
    resp = httpx.post(server.url + "/admin/instances", json={"role": "decode"}, timeout=30)
    assert resp.status_code == 201 and resp.json()["role"] == "decode"
    resp = httpx.post(server.url + "/admin/instances", json={"role": "chef"}, timeout=30)
    assert resp.status_code == 400 and "role" in resp.json()["error"]["message"]
    resp = httpx.post(server.url + "/admin/instances/0/drain")
    assert resp.status_code == 409 and "last prefill" in resp.json()["error"]["message"]


def test_pd_mode_streamed_chat_equals_plain_serving(start_fake_server):
    messages = [{"role": "user", "content": "count to ten"}]
    plain = start_fake_server(instances=1, num_blocks=512, step_time=0.0)
    reference = client(plain).chat.completions.create(model=MODEL, messages=messages, max_tokens=60,
                                                      temperature=0).choices[0].message.content
    server = start_fake_server(instances=2, num_blocks=512, step_time=0.01, pd=(1, 1))
    chunks = list(client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=60,
                                                         temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    assert server.frontend.metrics.migrations.labels("0", "1", "committed")._value.get() == 1
    assert_clean(server)


def test_a_request_preempted_while_migrating_stays_on_the_source_and_finishes_right(start_fake_server):
    # Instance 0 has 24 blocks of 4 tokens. While the migrating request's copy is on a slow link, a
    # high-priority request arrives there whose first chunk only fits if the migrating one is preempted.
    server = start_fake_server(instances=2, policy="rr", num_blocks=[26, 64], step_time=0.01)
    reference, _ = complete(server, max_tokens=60)  # instance 0
    complete(server, max_tokens=1)  # instance 1: round robin is back on 0
    src = server.frontend.handles["0"]
    copy = src.copy_blocks
    src.copy_blocks = lambda *a, **kw: (time.sleep(0.5), copy(*a, **kw))[1]
    scheduler = src.loop.engine.scheduler
    preempted, preempt = [], scheduler._preempt  # instrumented: which requests the source preempts
    scheduler._preempt = lambda request: (preempted.append(request.request_id), preempt(request))[1]
    results = {}
    stream = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    order = threading.Thread(target=lambda: results.update(m=httpx.post(
        f"{server.url}/admin/requests/{first.id}/migrate", json={"to": "1"}, timeout=30).json()))
    order.start()
    time.sleep(0.1)  # the first stage's copy is under way
    complete(server, max_tokens=1)  # instance 1
    high = threading.Thread(target=lambda: results.update(high=complete(
        server, max_tokens=10, prompt=[7] * 60, extra_body={"priority": 5})))
    high.start()
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    order.join(30)
    high.join(30)
    assert preempted == [first.id]
    assert results["m"]["outcome"] == "aborted" and "preempted" in results["m"]["abort_reason"], results["m"]
    assert text == reference
    assert results["high"][1] == 10
    assert_clean(server)
