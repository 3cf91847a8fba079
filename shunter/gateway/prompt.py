"""What dispatch sees of a proxied request's prompt, without the backend's tokenizer.

The dispatch policies read `Request.prompt_token_ids`: its length (KV demand,
queued prefill) and, for `prefix`, its blocks (stable BLAKE2b digests, see
`shunter.cluster.dispatch.PrefixIndex`). The gateway does not tokenize: it
stands in a *pseudo token* for every 4 bytes of the prompt's UTF-8 text. Equal
text prefixes give equal pseudo-token prefixes, so the prefix policy's digests
match exactly where the backend's own prefix cache would, and 4 bytes is
about one token of English text, so lengths are about right too. A prompt
given as token ids is used as is.
"""

from __future__ import annotations

from array import array

BYTES_PER_TOKEN = 4


def pseudo_token_ids(text: str) -> list[int]:
    """One integer per 4 bytes of `text` (UTF-8); at least one."""
    data = text.encode("utf-8", "surrogatepass")
    data += b"\0" * (-len(data) % BYTES_PER_TOKEN)
    return array("I", data).tolist() or [0]


def prompt_token_ids(body: dict, is_chat: bool) -> list[int]:
    """Token ids (real when the client sent ids, else pseudo) of a completion's prompt or a chat's messages."""
    if is_chat:
        return pseudo_token_ids(_chat_text(body.get("messages")))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        if all(type(t) is int for t in prompt):
            return prompt
        if isinstance(prompt[0], list) and prompt[0] and all(type(t) is int for t in prompt[0]):
            return prompt[0]  # a batch of prompts: the first stands for them (they go to one backend)
        if all(isinstance(p, str) for p in prompt):
            return pseudo_token_ids("\0".join(prompt))
    return pseudo_token_ids(prompt if isinstance(prompt, str) else "")


def _chat_text(messages: object) -> str:
    """The messages as one string, role and content each ended by a NUL: a conversation's earlier turns
    are a prefix of its later requests' text, as they are of the chat-templated prompt."""
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # content parts: only the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}\0{content if isinstance(content, str) else ''}\0")
    return "".join(parts)
