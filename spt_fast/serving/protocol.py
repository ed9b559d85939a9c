"""The OpenAI chat-completions interface, for what applies to SPT.

Request: `messages` (a `system` message, or an explicit `persona` field, is the persona; `user` /
`assistant` turns are the history, oldest first, the last one from the user), `max_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `stream`, `n` = 1, and `prompt` (an extra field: force one
soft prompt). Reply: the OpenAI shape plus an `spt` object (the soft prompt used, whether the
conversation was truncated to fit, how many context tokens came from the context cache).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

# Fields that would change what the reply means and that SPT does not do: refused, not ignored.
_UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                "response_format", "logit_bias", "presence_penalty", "frequency_penalty", "best_of")
_KNOWN = {"model", "messages", "persona", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "stream", "stream_options", "n", "prompt", "user", "metadata", "store", *_UNSUPPORTED}


class BadRequest(Exception):
    """A client error: HTTP `status` with a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequest:
    persona: list[str]
    history: list[str]
    options: dict  # keyword options of Engine.generate (max_new_tokens, temperature, ...)
    stream: bool
    model: str


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body[name]
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return value


def parse_chat(body, max_tokens_limit: int, num_prompts: int, default_max_tokens: int = 32) -> ChatRequest:
    """A ChatRequest from a decoded JSON body; BadRequest naming the field at fault."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise BadRequest(f"'{name}' is not supported by this server")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    persona, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role' and a 'content'")
        content = m.get("content")
        if isinstance(content, list):  # the OpenAI "content parts" form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = " ".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        role = m["role"]
        if role in ("system", "developer"):
            persona.append(content)
        elif role in ("user", "assistant"):
            if turns and turns[-1][0] == role:  # two in a row from one side: one turn
                turns[-1] = (role, f"{turns[-1][1]} {content}")
            else:
                turns.append((role, content))
        else:
            raise BadRequest(f"messages[{i}].role must be system, user or assistant, got {role!r}")
    if "persona" in body:
        p = body["persona"]
        if isinstance(p, str):
            p = [p]
        if not isinstance(p, list) or not all(isinstance(x, str) for x in p):
            raise BadRequest("'persona' must be a string or a list of strings")
        persona = list(p) + persona
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message must be from the user (the bot replies to it)")

    options = {"max_new_tokens": default_max_tokens}
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            options["max_new_tokens"] = _number(body, name, 1, max_tokens_limit, integer=True)
    if body.get("temperature") is not None:
        options["temperature"] = float(_number(body, "temperature", 0, 2))
    if body.get("top_p") is not None:
        options["top_p"] = float(_number(body, "top_p", 1e-9, 1))
    if body.get("seed") is not None:
        options["seed"] = _number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
    if body.get("n") is not None and _number(body, "n", 1, 1, integer=True) != 1:
        raise BadRequest("'n' must be 1")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= 32 for s in stops) \
                or len(stops) > 4:
            raise BadRequest("'stop' must be a string or a list of up to 4 strings of 1 to 32 characters")
        options["stops"] = tuple(dict.fromkeys(("\n", "Q:", "R:", *stops)))  # the turn still ends a reply
    if body.get("prompt") is not None:
        options["prompt"] = _number(body, "prompt", 0, num_prompts - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    model = body.get("model", "spt")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    return ChatRequest(persona, [t for _, t in turns], options, stream, model)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def finish_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"  # eos and stop strings both end the turn


def completion(cid: str, model: str, reply, prompt_tokens: int, cached: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": finish_reason(reply.finish), "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.tokens),
                      "total_tokens": prompt_tokens + len(reply.tokens)},
            "spt": spt_info(reply.prompt, reply.truncated, cached)}


def spt_info(prompt: int, truncated: bool, cached: int) -> dict:
    info = {"prompt": prompt, "truncated": truncated, "cached_tokens": cached}
    if truncated:
        info["warning"] = "the conversation was longer than the model's context: its oldest turns were dropped"
    return info


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if extra:
        out.update(extra)
    return out
