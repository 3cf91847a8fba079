"""SIGTERM: `shunter serve` stops taking requests, lets the ones in flight finish, and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from shunter.bench import processes
from shunter.server.runner import free_port


def test_sigterm_lets_in_flight_streams_finish_refuses_new_work_and_exits_0():
    port = free_port()
    cmd = [sys.executable, "-m", "shunter", "serve", "--null-engine", "--null-step-time", "0.02", "--runtime",
           "local", "--instances", "1", "--port", str(port), "--shutdown-timeout", "20"]
    proc, _ = processes.start_until_healthy(cmd, port, 120, dict(os.environ), name="shunter serve")
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 100, "stream": True,
                "stream_options": {"include_usage": True}}
        lines: list[str] = []
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as resp:
                it = resp.iter_lines()
                lines.append(next(it))
                proc.send_signal(signal.SIGTERM)
                refused = {}

                def try_new() -> None:
                    try:
                        r = httpx.post(url + "/v1/completions", timeout=5,
                                       json={"model": body["model"], "prompt": "x", "max_tokens": 2})
                        refused["status"] = r.status_code
                    except httpx.TransportError as e:  # the listener is closed: refused at connect
                        refused["status"] = type(e).__name__

                t = threading.Thread(target=try_new)
                t.start()
                lines.extend(line for line in it if line)
                t.join(10)
        assert lines[-1] == "data: [DONE]"
        usage = [line for line in lines if '"usage"' in line and '"completion_tokens"' in line]
        assert usage and '"completion_tokens":100' in usage[-1]  # the in-flight stream ran to its end
        assert refused["status"] in (503, "ConnectError")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            processes.stop(proc)


def test_at_the_shutdown_deadline_a_stream_still_running_ends_with_a_clear_error_and_the_server_exits_0():
    port = free_port()
    cmd = [sys.executable, "-m", "shunter", "serve", "--null-engine", "--null-step-time", "0.02", "--runtime",
           "local", "--instances", "1", "--port", str(port), "--shutdown-timeout", "1.5"]
    proc, _ = processes.start_until_healthy(cmd, port, 120, dict(os.environ), name="shunter serve")
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 2000, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as resp:  # 40 s of tokens
                it = resp.iter_lines()
                lines = [next(it)]
                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                lines.extend(line for line in it if line)
                ended = time.monotonic() - started
        assert ended < 5  # at the deadline, not when the request would have finished
        assert lines[-1] == "data: [DONE]"
        assert '"error"' in lines[-2] and "shut down before the request finished" in lines[-2], lines[-3:]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            processes.stop(proc)
