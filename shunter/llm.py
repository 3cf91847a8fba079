"""Offline generation: `LLM().generate(prompts, params)` and `LLM().chat(messages)`, as in vLLM.

One in-process `InstanceEngine` over the real model. Requests are validated
before any is queued, so a bad prompt or parameter leaves nothing allocated.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from shunter.config import SchedulerConfig
from shunter.engine import InstanceEngine
from shunter.request import Request, SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


@dataclass
class RequestOutput:
    """One prompt's result: the generated part only, as text and as token ids."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class LLM:
    """Shunter's engine over a local model, for offline batches.

    model: None for the built-in SmolLM2-135M-Instruct, or a local Hugging Face
        Llama-family directory (config.json + *.safetensors) or .gguf file.
    dtype: "auto", "float32" or "bfloat16".
    The scheduler knobs (`block_size`, `num_blocks`, `max_num_seqs`,
    `max_num_batched_tokens`, `max_prefill_chunk`, `enable_prefix_caching`)
    are those of `SchedulerConfig`; `num_blocks=None` sizes the KV cache for the device.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        *,
        device: str | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_prefill_chunk: int | None = None,
        enable_prefix_caching: bool = True,
        num_threads: int | None = None,
        seed: int | None = 0,
    ) -> None:
        from shunter.model import ModelExecutor, default_num_blocks, load_weights

        loaded = load_weights(model, dtype, device)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.model.dtype
        if num_blocks is None:
            num_blocks = default_num_blocks(loaded.config, block_size, loaded.model.dtype, loaded.model.device)
        config = SchedulerConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_prefill_chunk=max_prefill_chunk,
            max_model_len=loaded.config.max_model_len,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.executor = ModelExecutor(loaded.model, num_blocks, block_size, num_threads=num_threads, seed=seed)
        self.engine = InstanceEngine(config, self.executor)
        self._ids = itertools.count()

    # ---- public API --------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: int | Sequence[int] = 0,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, tokenized as given, or token ids); one result per prompt, in order."""
        prompt_list = _as_prompt_list(prompts)
        texts = [p if isinstance(p, str) else None for p in prompt_list]
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt_list]
        return self._run(texts, token_ids, sampling_params, priority)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations:
            raise ValueError("messages is empty")
        token_ids = [self.tokenizer.apply_chat_template(_checked_messages(c)) for c in conversations]
        return self._run([None] * len(token_ids), token_ids, sampling_params, 0)

    def stream_chat(self, messages: Messages, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated."""
        prompt_ids = self.tokenizer.apply_chat_template(_checked_messages(messages))
        request = self._make_requests([prompt_ids], [sampling_params or SamplingParams()], [0])[0]
        yield from self._stream_one(request)

    # ---- the loop ---------------------------------------------------------------------
    def _run(self, texts, token_ids, sampling_params, priority) -> list[RequestOutput]:
        n = len(token_ids)
        params = _broadcast(sampling_params if sampling_params is not None else SamplingParams(), n, "sampling_params")
        priorities = _broadcast(priority, n, "priority")
        requests = self._make_requests(token_ids, params, priorities)
        outputs = {r.request_id: RequestOutput(r.request_id, t, r.prompt_token_ids) for r, t in zip(requests, texts)}
        detoks = {r.request_id: self.tokenizer.detokenizer(r.sampling_params.stop) for r in requests}
        for request_id, new_ids, finish_reason in self._drive(requests):
            out = outputs[request_id]
            out.token_ids.extend(new_ids)
            detok = detoks[request_id]
            delta = detok.add_tokens(new_ids)
            out.text += delta.text
            if delta.stopped and finish_reason is None:
                self.engine.finish_request(request_id, time.monotonic())
                finish_reason = "stop"
            if finish_reason is not None:
                out.text += detok.flush()
                out.finish_reason = finish_reason
        return [outputs[r.request_id] for r in requests]

    def _stream_one(self, request: Request) -> Iterator[str]:
        detok = self.tokenizer.detokenizer(request.sampling_params.stop)
        for request_id, new_ids, finish_reason in self._drive([request]):
            delta = detok.add_tokens(new_ids)
            if delta.text:
                yield delta.text
            if delta.stopped and finish_reason is None:
                self.engine.finish_request(request_id, time.monotonic())
                finish_reason = "stop"
            if finish_reason is not None:
                tail = detok.flush()
                if tail:
                    yield tail

    def _drive(self, requests: list[Request]) -> Iterator[tuple[str, list[int], str | None]]:
        """Queue the requests and step the engine until all are done; yields (id, new tokens, finish reason).

        If the caller stops early or an error escapes, the remaining requests are
        aborted so no KV block stays allocated.
        """
        for r in requests:
            self.engine.add_request(r)
        pending = {r.request_id for r in requests}
        try:
            while pending:
                for delta in self.engine.step(time.monotonic()):
                    if delta.is_finished:
                        pending.discard(delta.request_id)
                    yield delta.request_id, delta.new_token_ids, delta.finish_reason
                pending = {rid for rid in pending if self.engine.get_request(rid) is not None}
        finally:
            for rid in pending:
                self.engine.abort_request(rid, time.monotonic())

    def _make_requests(self, token_ids: list[list[int]], params: list[SamplingParams], priorities: list[int]) -> list[Request]:
        """Build and validate every request before any is queued (a bad one leaves nothing behind)."""
        now = time.monotonic()
        requests = []
        for ids, p, prio in zip(token_ids, params, priorities):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
            p.validate()
            request = Request(
                request_id=f"llm-{next(self._ids)}",
                prompt_token_ids=ids,
                sampling_params=p,
                arrival_time=now,
                priority=prio,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            self.engine.scheduler.validate_request(request)
            requests.append(request)
        return requests


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, (str, list, tuple)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
        if not p:
            raise ValueError("the prompt is empty")
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _broadcast(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _checked_messages(messages: Messages) -> Messages:
    if not messages:
        raise ValueError("the conversation has no messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs a 'role' and a 'content', got {m!r}")
    return messages
