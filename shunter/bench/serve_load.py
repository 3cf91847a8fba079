"""`run_load`: send timed requests to an OpenAI-compatible server and time every streamed chunk.

One `aiohttp` client session (HTTP/1.1 keep-alive, as many connections as
requests may be in flight; aiohttp rather than httpx because a Python client
shares this machine's cores with the server it measures, and aiohttp costs
about half as much CPU per streamed request) sends each request at its arrival time, waiting
for a slot when `max_concurrency` requests are already out. Every request
streams (`stream_options.include_usage`) and is read as server-sent events
until `data: [DONE]`:

- TTFT: send -> first chunk with non-empty text (a completion's `text`, a
  chat delta's `content`); waiting for a concurrency slot is not included.
- ITL: between consecutive chunks with text.
- E2E: send -> `[DONE]`.
- Token counts from the final chunk's `usage` when the server sends it, else
  the prompt's word count and the number of chunks with text.

A request with `after` (a conversation's next turn) is not sent before that
request has finished. When any request has one, the requests are sent by
`max_concurrency` workers instead, each taking the first request in the given
order that is due and whose `after` has finished: a turn waiting for its
predecessor lets the requests behind it go ahead, and is sent as soon as it
can be, before any request listed after it.

The whole run has one deadline: whatever is still outstanding then is
cancelled and recorded as a "timeout" error, so a run always ends. Only
loopback servers are accepted: a load test stays on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

from shunter.bench.serve_workload import ServeRequest
from shunter.errors import CLIError

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MODELS_PATH = "/v1/models"
DONE = object()  # what `parse_sse_line` returns for `data: [DONE]`


@dataclass(frozen=True)
class LoadConfig:
    """Where and how to send `requests`.

    url: the server's base URL (http://127.0.0.1:8000); only loopback hosts.
    model: the model name to send; None asks the server (`GET /v1/models`, first id).
    endpoint: "completions" or "chat".
    max_concurrency: at most this many requests in flight (None: no limit).
    timeout_s: the whole run's bound, model lookup included.
    """

    url: str
    requests: Sequence[ServeRequest]
    model: str | None = None
    endpoint: str = "completions"
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        check_loopback_url(self.url)
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")


@dataclass
class ServeRecord:
    """What one request experienced; times in seconds, `arrival_time` and `send_time` from the run's start.

    num_prompt_tokens, num_output_tokens: the server's `usage` when `has_usage`,
        else the prompt's word count and the chunks with text received.
    error_kind: None for a success, else "http_<status>", "timeout", "connection",
        "stream_error" (an error event or bad JSON in the stream), "incomplete"
        (no `[DONE]`) or "empty" (no text at all); `error` says more.
    """

    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    max_tokens: int
    send_time: float | None = None
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    has_usage: bool = False
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None

    @property
    def is_success(self) -> bool:
        """Whether the request streamed text and ended with `[DONE]`."""
        return self.error_kind is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None for a failed request or one of a single token."""
        if not self.is_success or self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)

    def fail(self, kind: str, message: str, http_status: int | None = None) -> None:
        """Mark the request failed, keeping the first error if it already has one."""
        if self.error_kind is None:
            self.error_kind, self.error, self.http_status = kind, message, http_status


@dataclass
class LoadResult:
    """A run's records (one per request, in the order given) and its wall time from the first send slot."""

    model: str
    endpoint: str
    records: list[ServeRecord]
    duration_s: float


def check_loopback_url(url: str) -> None:
    """CLIError naming `url` unless it is http(s) to localhost, 127.0.0.0/8 or ::1."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise CLIError(f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    if not _is_loopback(host):
        raise CLIError(f"--url {url!r}: host {host} is not loopback (127.0.0.0/8, ::1, localhost); "
                       "load tests stay on this machine")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it could resolve anywhere
        return False


async def run_load(config: LoadConfig) -> LoadResult:
    """Send `config.requests` on their schedule and record each; returns within about `timeout_s`."""
    import aiohttp

    deadline = time.perf_counter() + config.timeout_s
    num_connections = config.max_concurrency or max(1, len(config.requests))
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # No client-side timeouts: the run's deadline bounds every request instead. trust_env=False:
    # a proxy from the environment must not carry the load off this machine.
    connector = aiohttp.TCPConnector(limit=num_connections)
    async with aiohttp.ClientSession(base_url=config.url.rstrip("/") + "/", connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None), trust_env=False) as client:
        model = config.model or await first_model_id(client, config.url, deadline)
        records = [ServeRecord(r.request_id, r.arrival_time, r.num_prompt_tokens, r.max_tokens)
                   for r in config.requests]
        sender = _Sender(client, config.endpoint, model, config.max_concurrency)
        if any(r.after is not None for r in config.requests):
            await _send_ordered(sender, config.requests, records, config.max_concurrency or len(records), deadline)
        else:
            await asyncio.gather(*(_bounded(sender.send_at(r, rec), rec, deadline)
                                   for r, rec in zip(config.requests, records)))
        return LoadResult(model, config.endpoint, records, time.perf_counter() - sender.start)


async def first_model_id(client, base_url: str, deadline: float) -> str:
    """The first model id `GET /v1/models` lists; CLIError if the server does not say."""
    import aiohttp

    url = f"{base_url.rstrip('/')}{MODELS_PATH}"
    try:
        async with client.get(MODELS_PATH.lstrip("/"), timeout=aiohttp.ClientTimeout(
                total=max(0.001, deadline - time.perf_counter()))) as response:
            response.raise_for_status()
            return (await response.json())["data"][0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CLIError(f"cannot read a model id from {url} ({type(e).__name__}: {e}); give --model") from None


async def _bounded(send, record: ServeRecord, deadline: float) -> None:
    """Await `send`, recording a "timeout" error if the deadline comes first."""
    try:
        await asyncio.wait_for(send, timeout=max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        message = "not sent before the deadline" if record.send_time is None else "no [DONE] before the deadline"
        record.fail("timeout", message)


async def _send_ordered(sender, requests: Sequence[ServeRequest], records: list[ServeRecord], num_workers: int,
                        deadline: float) -> None:
    """`num_workers` workers; each sends the first listed request that is due and whose `after` has finished."""
    pending = list(range(len(requests)))
    finished: set[str] = set()
    changed = asyncio.Condition()

    def next_ready(now: float) -> int | None:
        for i in pending:
            r = requests[i]
            if r.arrival_time <= now and (r.after is None or r.after in finished):
                return i
        return None

    async def worker() -> None:
        while True:
            async with changed:
                while True:
                    if not pending:
                        return
                    now = time.perf_counter() - sender.start
                    i = next_ready(now)
                    if i is not None:
                        pending.remove(i)
                        break
                    due = [requests[j].arrival_time for j in pending if requests[j].arrival_time > now]
                    try:  # a finish, or the next arrival, may make one ready
                        await asyncio.wait_for(changed.wait(), timeout=min(due) - now if due else None)
                    except asyncio.TimeoutError:
                        pass
            try:
                await sender._send(requests[i], records[i])
            finally:
                async with changed:
                    finished.add(requests[i].request_id)
                    changed.notify_all()

    tasks = [asyncio.ensure_future(worker()) for _ in range(num_workers)]
    done, not_done = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for task in not_done:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for record in records:
        if record.send_time is None:
            record.fail("timeout", "not sent before the deadline")
        elif record.error_kind is None and record.e2e is None:
            record.fail("timeout", "no [DONE] before the deadline")


class _Sender:
    """Sends requests on one client; times are measured from its creation (the run's start)."""

    def __init__(self, client, endpoint: str, model: str, max_concurrency: int | None):
        self.client = client
        self.endpoint = endpoint
        self.model = model
        self.slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        self.start = time.perf_counter()

    async def send_at(self, request: ServeRequest, record: ServeRecord) -> None:
        """Wait for the request's arrival time and a free slot, then send it and fill `record`."""
        await asyncio.sleep(max(0.0, self.start + request.arrival_time - time.perf_counter()))
        async with self.slots:
            await self._send(request, record)

    async def _send(self, request: ServeRequest, record: ServeRecord) -> None:
        import aiohttp

        sent = time.perf_counter()
        record.send_time = sent - self.start
        try:
            async with self.client.post(ENDPOINT_PATHS[self.endpoint].lstrip("/"),
                                        json=request_payload(self.endpoint, self.model, request)) as response:
                if response.status != 200:
                    body = await response.read()
                    record.fail(f"http_{response.status}", error_message(body), response.status)
                    return
                await read_stream(_text_lines(response.content), record, sent, self.endpoint)
        except aiohttp.ClientError as e:
            record.fail("connection", f"{type(e).__name__}: {e}")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            # A chunk of an unexpected shape fails its request, not the whole run.
            record.fail("stream_error", f"unexpected chunk ({type(e).__name__}: {e})")


async def _text_lines(content):
    """The response body's lines as text, without line endings."""
    async for raw in content:
        yield raw.decode("utf-8").rstrip("\r\n")


def request_payload(endpoint: str, model: str, request: ServeRequest) -> dict:
    """The JSON body: exactly `max_tokens` tokens (`ignore_eos`, a vLLM extension), greedy, streamed with usage.

    Greedy so that runs differ only in timing, not in what the server samples.
    """
    body: dict = {"model": model, "max_tokens": request.max_tokens, "ignore_eos": True, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


async def read_stream(lines, record: ServeRecord, sent: float, endpoint: str) -> None:
    """Read server-sent-event `lines` (an async iterator of str) into `record`: chunk times, usage, how it ended.

    `sent` is the `time.perf_counter()` at which the request went out.
    """
    last_text_time = None
    num_text_chunks = 0
    async for line in lines:
        try:
            event = parse_sse_line(line)
        except ValueError as e:
            record.fail("stream_error", f"bad JSON in the stream: {e}")
            return
        if event is None:
            continue
        if event is DONE:
            break
        if event.get("error"):
            record.fail("stream_error", _error_text(event["error"]))
            return
        now = time.perf_counter()
        if chunk_text(event, endpoint):
            if last_text_time is None:
                record.ttft = now - sent
            else:
                record.itls.append(now - last_text_time)
            last_text_time = now
            num_text_chunks += 1
        usage = event.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            record.num_prompt_tokens = usage.get("prompt_tokens", record.num_prompt_tokens)
            record.num_output_tokens = usage["completion_tokens"]
            record.has_usage = True
    else:
        record.fail("incomplete", "the stream ended without data: [DONE]")
        return
    if last_text_time is None:
        record.fail("empty", "no chunk with text before data: [DONE]")
        return
    if not record.has_usage:
        record.num_output_tokens = num_text_chunks
    record.e2e = time.perf_counter() - sent


def parse_sse_line(line: str):
    """One server-sent-events line: the decoded `data:` JSON, `DONE`, or None for anything else.

    ValueError if the data is not JSON.
    """
    if not line.startswith("data:"):
        return None  # blank separators, comments (":"), event names
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return DONE
    return json.loads(data) if data else None


def chunk_text(event: dict, endpoint: str) -> str:
    """The text a streamed chunk carries ("" for a role-only, usage-only or finishing chunk)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body's start."""
    try:
        return _error_text(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or "(empty body)"


def _error_text(error: object) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
