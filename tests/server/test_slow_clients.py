"""Slow and idle clients are cut off within the limits while normal clients are served; error bodies
carry no traceback or file path.

Raw sockets on 127.0.0.1 play each kind of slow client against a server with short limits (keep-alive
0.5 s, headers 1 s, body 1 s); each must see its connection closed (with a 408 where a request had
begun) within its limit plus a margin, and leave nothing allocated.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from shunter.cluster.bundles import build_policy
from shunter.runtime.spec import InstanceSpec
from shunter.server.runner import Server, ServerSettings, wait_until
from shunter.server.timeouts import ConnectionTimeouts
from tests.server.conftest import MODEL, engine_requests, used_blocks

LIMITS = ConnectionTimeouts(keep_alive=0.5, request_header=1.0, request_body=1.0)
MARGIN_S = 1.5  # scheduling slack on a busy machine
BODY = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 4}).encode()


@pytest.fixture(scope="module")
def server(tokenizer, hello_world_ids):
    spec = InstanceSpec(executor="null", max_model_len=256, null_token_ids=hello_world_ids)
    srv = Server(ServerSettings(port=0, num_instances=1, served_model_names=(MODEL,), timeouts=LIMITS), spec,
                 build_policy("rr"), tokenizer, 256).start_in_thread(timeout=60)
    yield srv
    srv.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection((server.settings.host, server.settings.port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (s from now)."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s + MARGIN_S)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        pytest.fail(f"the connection was still open after {limit_s + MARGIN_S} s; got {data[:200]!r}")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def trickle(sock: socket.socket, parts: list[bytes], interval: float, stop: threading.Event) -> None:
    """Send `parts` one every `interval` s until done, stopped, or the server closes the connection."""
    for part in parts:
        if stop.wait(interval):
            return
        try:
            sock.sendall(part)
        except OSError:
            return


def assert_408(data: bytes, what: str) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:300]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == 408 and error["type"] == "RequestTimeout" and what in error["message"]


def assert_nothing_left(server: Server) -> None:
    assert wait_until(lambda: server.frontend.num_live_requests() == 0, 5)
    assert engine_requests(server) == 0 and used_blocks(server) == 0


def served_normally(server: Server) -> None:
    resp = httpx.post(server.url + "/v1/completions", content=BODY, headers={"content-type": "application/json"},
                      timeout=10)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"]


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_time(server):
    sock = connect(server)
    served_normally(server)
    data, elapsed = read_until_closed(sock, LIMITS.keep_alive)
    assert data == b"" and elapsed < LIMITS.keep_alive + MARGIN_S
    sock.close()


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        data, elapsed = read_until_closed(sock, LIMITS.keep_alive)
        assert data == b"" and elapsed < LIMITS.keep_alive + MARGIN_S


def test_slowloris_headers_get_408_and_the_connection_is_closed_within_the_header_limit(server):
    # A header line every 0.2 s: each byte would reset uvicorn's keep-alive timer; the deadline holds.
    parts = [b"POST /v1/completions HTTP/1.1\r\n"] + [b"X-Slow-%d: y\r\n" % i for i in range(100)]
    stop = threading.Event()
    with connect(server) as sock:
        sender = threading.Thread(target=trickle, args=(sock, parts, 0.2, stop), daemon=True)
        sender.start()
        served_normally(server)  # served meanwhile
        data, elapsed = read_until_closed(sock, LIMITS.request_header)
        stop.set()
        sender.join(5)
    assert_408(data, "headers")
    assert elapsed < LIMITS.request_header + MARGIN_S
    assert_nothing_left(server)


@pytest.mark.parametrize("interval", [None, 0.2], ids=["stalls", "trickles"])
def test_a_body_that_stalls_or_trickles_gets_408_with_an_openai_body(server, interval):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY))
    stop = threading.Event()
    with connect(server) as sock:
        sock.sendall(head + BODY[:10])
        if interval is not None:  # one more byte every 0.2 s: the limit is on the whole body, not the gaps
            threading.Thread(target=trickle, args=(sock, [bytes([b]) for b in BODY[10:-1]], interval, stop),
                             daemon=True).start()
        served_normally(server)
        data, elapsed = read_until_closed(sock, LIMITS.request_body)
        stop.set()
    assert_408(data, "body")
    assert elapsed < LIMITS.request_body + MARGIN_S
    assert "Traceback" not in data.decode() and ".py" not in data.decode()
    assert_nothing_left(server)
    assert 'shunter_requests_rejected_total{status="408"}' in httpx.get(server.url + "/metrics").text


def test_a_request_sent_in_pieces_within_the_limits_is_served(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY))
    with connect(server) as sock:
        for part in (head[:20], head[20:], BODY[:5], BODY[5:]):
            sock.sendall(part)
            time.sleep(0.1)
        data, _ = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 200") and b'"choices"' in data


def test_an_unexpected_error_answers_500_without_traceback_or_path(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('File "/srv/shunter/secret/module.py", line 12, in encode')

    monkeypatch.setattr(server.state.tokenizer, "encode", broken)
    resp = httpx.post(server.url + "/v1/completions", content=BODY, headers={"content-type": "application/json"})
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "InternalServerError" and "RuntimeError" in error["message"]
    assert "Traceback" not in resp.text and ".py" not in resp.text and "/srv" not in resp.text
    assert_nothing_left(server)


def test_a_failing_step_reaches_the_client_without_its_message(server, monkeypatch):
    # The exception's message may name files (torch's do); the client gets its type, the log the rest.
    handle = next(iter(server.frontend.handles.values()))

    def failing(batch):
        raise RuntimeError("kernel failed at /opt/torch/aten/src/kernel.cpp:78")

    executor = handle.loop.call(lambda e, now: e.executor).result(5)
    monkeypatch.setattr(executor, "execute", failing)
    for stream in (False, True):
        resp = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": stream},
                          timeout=10)
        assert "RuntimeError" in resp.text, resp.text
        assert "/opt" not in resp.text and ".cpp" not in resp.text and "Traceback" not in resp.text
    assert_nothing_left(server)
