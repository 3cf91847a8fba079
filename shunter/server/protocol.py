"""The OpenAI request bodies Shunter accepts, checked into a prompt and `SamplingParams`.

Every field of the OpenAI API is either supported, accepted only at its
default (`logprobs: null`, `repetition_penalty: 1.0`, ...), or refused with a
400 that names it: a parameter is never silently ignored. Unknown fields are
refused too, so a typo does not pass as a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, WithJsonSchema

from shunter.request import SamplingParams
from shunter.server.errors import OpenAIError, bad_request

# Parameters of the OpenAI (or vLLM) API that Shunter accepts only at these values.
_DEFAULT_ONLY: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "best_of": (None, 1), "echo": (None, False),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "min_tokens": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}), "prompt_logprobs": (None,), "min_p": (None, 0),
    "use_beam_search": (None, False), "skip_special_tokens": (None, True), "include_stop_str_in_output": (None, False),
    "logprobs_mode": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}
# Accepted and without effect on generation (metadata a client may send).
_IGNORED = ("user", "metadata", "store", "service_tier", "request_id")


# What the OpenAPI schema says a field accepts, where that is narrower than its type. Only the schema:
# the values are checked by `generation` & co., so that each refusal names the field in our words.
_POSITIVE = WithJsonSchema({"type": "integer", "minimum": 1})
_TEXT = WithJsonSchema({"type": "string", "minLength": 1})
_TOKEN_IDS = WithJsonSchema({"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}})


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr
    temperature: Annotated[float, WithJsonSchema({"type": "number", "minimum": 0})] | None = None
    top_p: Annotated[float, WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": 1})] | None = None
    top_k: Annotated[StrictInt, WithJsonSchema({"type": "integer", "minimum": -1})] | None = None
    seed: StrictInt | None = None
    stop: Annotated[StrictStr, _TEXT] | list[Annotated[StrictStr, _TEXT]] | None = None
    stop_token_ids: list[Annotated[StrictInt, WithJsonSchema({"type": "integer", "minimum": 0})]] | None = None
    ignore_eos: StrictBool = False
    n: Annotated[StrictInt, WithJsonSchema({"type": "integer", "const": 1})] = 1
    stream: StrictBool = False
    stream_options: Annotated[dict[str, Any], WithJsonSchema({
        "type": "object", "additionalProperties": False, "description": "only with stream: true",
        "properties": {"include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}}})] \
        | None = None
    priority: StrictInt = 0


class CompletionRequest(_Common):
    # One prompt: text, token ids, or a list holding one of those.
    prompt: Annotated[StrictStr, _TEXT] | Annotated[list[StrictInt], _TOKEN_IDS] \
        | Annotated[list[StrictStr], WithJsonSchema({"type": "array", "minItems": 1, "maxItems": 1,
                                                     "items": {"type": "string", "minLength": 1}})] \
        | Annotated[list[list[StrictInt]], WithJsonSchema({"type": "array", "minItems": 1, "maxItems": 1,
                                                           "items": _TOKEN_IDS.json_schema})]
    max_tokens: Annotated[StrictInt, _POSITIVE] | None = 16


def _message_extras(schema: dict) -> None:
    schema["properties"]["name"] = {"description": "accepted and unused"}
    schema["additionalProperties"] = False  # no other field: `chat_messages` refuses them


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_message_extras)

    role: Annotated[StrictStr, WithJsonSchema({"enum": ["system", "user", "assistant", "developer"]})]
    content: StrictStr | Annotated[list[dict[str, Any]], WithJsonSchema({"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}})] | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(json_schema_extra={"minItems": 1})]
    max_tokens: Annotated[StrictInt, _POSITIVE] | None = None
    max_completion_tokens: Annotated[StrictInt, _POSITIVE] | None = None


@dataclass
class Generation:
    """A checked request: what to dispatch and how to answer."""

    model: str
    params: SamplingParams
    priority: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool  # False: run to the context's end (chat's default)


def parse(cls: type[_Common], body: Any) -> _Common:
    """Validate a JSON body against `cls`; 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        field = str(err["loc"][0]) if err["loc"] else None
        raise bad_request(f"invalid value for '{param}': {err['msg']}", param=field) from None
    _check_extras(req)
    return req


def _check_extras(req: _Common) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in _IGNORED:
            continue
        if name not in _DEFAULT_ONLY:
            raise bad_request(f"unknown parameter '{name}'", param=name)
        if not _is_default(value, _DEFAULT_ONLY[name]):
            raise bad_request(f"parameter '{name}' is not supported by Shunter (got {value!r}); "
                              f"leave it out", param=name)


def _is_default(value: Any, allowed: tuple) -> bool:
    # bool is an int in Python: `logprobs: 0` is not `logprobs: false`.
    return value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def generation(req: _Common, max_tokens: int | None) -> Generation:
    """Sampling parameters from the common fields; 400 naming a bad value."""
    if req.n != 1:
        raise bad_request(f"n must be 1 (Shunter returns one choice per request), got {req.n}", param="n")
    opts = req.stream_options or {}
    unknown = set(opts) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise bad_request(f"unknown stream option(s): {', '.join(sorted(unknown))}", param="stream_options")
    for name, value in opts.items():
        if not isinstance(value, bool):
            raise bad_request(f"stream_options.{name} must be true or false, got {value!r}", param="stream_options")
    if opts and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    for name in ("temperature", "top_p"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number, got {value!r}", param=name)
    if max_tokens is not None and max_tokens <= 0:
        raise bad_request(f"max_tokens must be a positive integer, got {max_tokens}", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", param="stop")
    try:
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=-1 if req.top_k is None or req.top_k == 0 else req.top_k,
            max_tokens=max_tokens or 1,  # replaced by the context's room when not given
            seed=req.seed,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
        )
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=param) from None
    return Generation(req.model, params, req.priority, req.stream, bool(opts.get("include_usage")),
                      max_tokens is not None)


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request (text or token ids)."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"one prompt per request is supported, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("the prompt is empty", param="prompt")
    return prompt


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as plain {role, content} dicts for the chat template (text parts joined)."""
    if not req.messages:
        raise bad_request("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.model_extra:
            name = next(iter(m.model_extra))
            if name != "name":
                raise bad_request(f"message field '{name}' is not supported", param=f"messages.{i}.{name}")
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"only text content parts are supported, got {part.get('type')!r}",
                                      param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if m.role not in ("system", "user", "assistant", "developer"):
            raise bad_request(f"unsupported message role {m.role!r}", param=f"messages.{i}.role")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def openapi_body(cls: type[_Common]) -> dict:
    """The OpenAPI `requestBody` that describes `cls` (the handlers read the raw JSON themselves, so that
    every error is ours; this only documents the body, for clients and for the schema-driven fuzz test)."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})
    # The extra fields `_check_extras` lets through, and no others.
    for name, allowed in _DEFAULT_ONLY.items():
        schema["properties"][name] = {"enum": list(allowed), "description": "accepted at its default only"}
    for name in _IGNORED:
        schema["properties"][name] = {"description": "accepted and unused"}
    schema["additionalProperties"] = False

    def inline(node: Any) -> Any:  # `#/$defs/...` would resolve against the OpenAPI document, not this schema
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"required": True, "content": {"application/json": {"schema": inline(schema)}}}


def check_model(name: str, served: list[str]) -> None:
    if name not in served:
        raise OpenAIError(404, f"The model '{name}' does not exist. Served: {', '.join(served)}",
                          "NotFoundError", "model", "model_not_found")
