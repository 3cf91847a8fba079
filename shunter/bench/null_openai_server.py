"""A null OpenAI-compatible server: instant answers of one word per token, for testing load generators.

    with NullServer(NullServerConfig(statuses=(200, 500))) as server:
        result = asyncio.run(run_load(LoadConfig(server.url, requests)))

`POST /v1/completions` and `/v1/chat/completions` answer `max_tokens` words
(default 16), streamed one word per chunk (with a final usage chunk when
`stream_options.include_usage`) or in one body; `GET /v1/models` lists one
model; `GET /health` answers 200 and `GET /metrics` exposes vLLM's load metrics
(requests running, KV usage, prefix-cache counters, cache config) for a gateway
to scrape. Usage counts the prompt's whitespace-separated words as its tokens.
Options fail requests with OpenAI-style error bodies, slow every token, or
never answer. Run it by hand with `python -m shunter.bench.null_openai_server`.
FastAPI and uvicorn are imported only when an app is built.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations at run
# time, and that class is imported inside build_app.
import argparse
import asyncio
import itertools
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
WORDS = (" alpha", " beta", " gamma", " delta")  # the generated text cycles through these
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


@dataclass(frozen=True)
class NullServerConfig:
    """How the null server behaves.

    model: the one model id it serves; a request naming another gets 404.
    statuses: the k-th generation request (0-based, in the order they reach the
        server) is answered with statuses[k % len(statuses)]: 200 generates, any
        other status is an OpenAI-style error body with that status.
    token_delay_s: sleep before each generated word (0: instant).
    hang: accept generation requests and never answer them (until the client leaves).
    metrics: serve `/metrics` (vLLM's names); False answers it 404, as a server without metrics would.
    """

    model: str = "null-model"
    statuses: tuple[int, ...] = (200,)
    token_delay_s: float = 0.0
    hang: bool = False
    metrics: bool = True


NUM_BLOCKS = 1000  # the KV capacity the null server's metrics claim, in 16-token blocks


def build_app(config: NullServerConfig = NullServerConfig()):
    """The FastAPI app serving `config`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="shunter null OpenAI server")
    counter = itertools.count()  # one event loop serves the app: next() needs no lock
    load = {"running": 0, "prompt_tokens": 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model, "object": "model", "owned_by": "shunter"}]}

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics():
        if not config.metrics:
            return PlainTextResponse("not found", status_code=404)
        return PlainTextResponse(_metrics_text(config.model, load["running"], load["prompt_tokens"]))

    async def generate(request: Request, is_chat: bool):
        load["running"] += 1
        response = None
        try:
            response = await _generate(request, is_chat)
            return response
        finally:
            if isinstance(response, StreamingResponse):
                response.body_iterator = _counted(response.body_iterator)  # running until its last chunk
            else:
                load["running"] -= 1

    async def _counted(events):
        try:
            async for event in events:
                yield event
        finally:
            load["running"] -= 1

    async def _generate(request: Request, is_chat: bool):
        status = config.statuses[next(counter) % len(config.statuses)]
        if config.hang:
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return JSONResponse({}, status_code=499)
        try:
            body = await request.json()
            params = _parse_body(body, is_chat, config.model)
        except _RequestError as e:
            return _error_response(e.status, str(e))
        except ValueError:
            return _error_response(400, "the request body is not JSON")
        if status != 200:
            return _error_response(status, f"null server: request failed on purpose (status {status})")
        load["prompt_tokens"] += params[0]
        answer = _Answer(config, is_chat, *params)
        if body.get("stream"):
            return StreamingResponse(answer.events(), media_type="text/event-stream")
        return JSONResponse(await answer.whole())

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, is_chat=True)

    return app


def _metrics_text(model: str, num_running: int, num_prompt_tokens: int) -> str:
    """vLLM's load metrics in Prometheus text: what a gateway scrapes (a streamed request counts as
    running until its last chunk is written)."""
    labels = f'engine="0",model_name="{model}"'
    return (f"vllm:num_requests_running{{{labels}}} {num_running}\n"
            f"vllm:num_requests_waiting{{{labels}}} 0\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} {min(1.0, num_running / NUM_BLOCKS)}\n"
            f"vllm:prefix_cache_queries_total{{{labels}}} {num_prompt_tokens}\n"
            f"vllm:prefix_cache_hits_total{{{labels}}} 0\n"
            f'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="{NUM_BLOCKS}"}} 1.0\n')


class _RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_body(body: object, is_chat: bool, model: str) -> tuple[int, int, bool]:
    """(prompt word count, max_tokens, include_usage) of a request body; _RequestError if it is invalid."""
    if not isinstance(body, dict):
        raise _RequestError(400, "the request body must be a JSON object")
    if body.get("model", model) != model:
        raise _RequestError(404, f"The model `{body['model']}` does not exist.")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if type(max_tokens) is not int or max_tokens < 1:
        raise _RequestError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if is_chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(400, "messages must be a non-empty list")
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _RequestError(400, "prompt must be a string")
        text = prompt
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return len(text.split()), max_tokens, include_usage


def _error_response(status: int, message: str):
    from fastapi.responses import JSONResponse

    error = {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": None, "code": status}
    return JSONResponse({"error": error}, status_code=status)


class _Answer:
    """One generation: `max_tokens` words in OpenAI's completion or chat shape, streamed or whole."""

    def __init__(self, config: NullServerConfig, is_chat: bool, num_prompt_tokens: int, max_tokens: int,
                 include_usage: bool):
        self.config = config
        self.is_chat = is_chat
        self.max_tokens = max_tokens
        self.include_usage = include_usage
        self.usage = {"prompt_tokens": num_prompt_tokens, "completion_tokens": max_tokens,
                      "total_tokens": num_prompt_tokens + max_tokens}
        self.id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def words(self):
        for i in range(self.max_tokens):
            if self.config.token_delay_s:
                await asyncio.sleep(self.config.token_delay_s)
            yield WORDS[i % len(WORDS)]

    async def events(self):
        """Server-sent events: a role chunk (chat), one chunk per word, the finish, usage, `[DONE]`."""
        if self.is_chat:
            yield self._event([self._choice("", None, role="assistant")])
        async for word in self.words():
            yield self._event([self._choice(word, None)])
        yield self._event([self._choice("", "length")])
        if self.include_usage:
            yield self._event([], usage=self.usage)
        yield "data: [DONE]\n\n"

    async def whole(self) -> dict:
        """The non-streamed response body."""
        text = "".join([w async for w in self.words()])
        if self.is_chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {**self._head("chat.completion" if self.is_chat else "text_completion"), "choices": [choice],
                "usage": self.usage}

    def _choice(self, text: str, finish_reason: str | None, role: str | None = None) -> dict:
        if self.is_chat:
            delta = {"role": role, "content": text} if role else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _event(self, choices: list, usage: dict | None = None) -> str:
        chunk = {**self._head("chat.completion.chunk" if self.is_chat else "text_completion"), "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(chunk)}\n\n"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.config.model}


class NullServer:
    """The null server on 127.0.0.1 (a free port unless given) in a background thread; a context manager.

    `url` is its base URL once `start()` (or `with`) returns.
    """

    def __init__(self, config: NullServerConfig = NullServerConfig(), port: int = 0):
        self.config = config
        self.port = port
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "NullServer":
        """Bind, start serving in a daemon thread and wait until it accepts connections."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        # A short graceful shutdown: a hanging request must not hold up stop().
        uv_config = uvicorn.Config(build_app(self.config), log_level="warning", lifespan="off",
                                   timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"null-openai-server-{self.port}")
        self._thread.start()
        give_up = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > give_up:
                raise RuntimeError(f"the null OpenAI server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask the server to exit and wait for its thread."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "NullServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m shunter.bench.null_openai_server",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=NullServerConfig.model)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds before each generated word")
    args = parser.parse_args(argv)
    with NullServer(NullServerConfig(model=args.model, token_delay_s=args.token_delay), port=args.port) as server:
        print(f"null OpenAI server at {server.url} (model {args.model}); Ctrl-C stops it")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
