"""The OpenAI chat-completions protocol: request validation, response and chunk bodies, errors.

Pure Python (no HTTP, no model) so that both the server and its tests use one definition of
what a valid request is. Fields OpenAI defines but hyperlex cannot honour (``n > 1``, tools,
logprobs) are refused with a 400 that names the field rather than silently ignored; vLLM's
sampling extensions ``top_k``, ``repetition_penalty``, ``seed`` and ``best_of`` are accepted
(``best_of``: the reply that agrees best with the user's facts of that many samples,
:mod:`hyperlex.agent.verify`), and so is ``response_format`` (``json_object``,
``json_schema``; :mod:`hyperlex.structured`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hyperlex.agent.verify import check_best_of
from hyperlex.errors import HyperlexError
from hyperlex.generation import GenerationParams, InvalidParameter, Message
from hyperlex.structured import InvalidResponseFormat, ResponseFormat, from_openai

MAX_STOP_STRINGS = 4  # OpenAI's limit
# request field -> GenerationParams field
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "repetition_penalty": "repetition_penalty", "seed": "seed"}
# fields that are accepted only with a value that asks for nothing hyperlex lacks
NEUTRAL_FIELDS = {"n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
                  "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
                  "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
                  "logit_bias": (None, {})}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered with OpenAI's error body: ``{"error": {message, type, param, code}}``."""

    TYPES = {500: "server_error", 503: "server_error", 504: "server_error"}  # else client's

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, close: bool = False):
        """``close``: answer with ``Connection: close``, so that the rest of what the client
        sent (a body not read, a smuggled request) is never read as another request."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.close = close

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_value" if param else None)


def model_not_found(model: str, served: list[str]) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist; served models: "
                    f"{', '.join(served)}", "model", "model_not_found")


@dataclass
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    model: str
    history: list[Message]  # user/assistant messages before the last user message
    message: str  # the last user message: the turn to answer
    instructions: str | None  # the client's system/developer messages, joined
    options: dict[str, Any] = field(default_factory=dict)  # GenerationParams fields
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    mood: str | None = None  # hyperlex's extension: a mood layer for this turn
    response_format: ResponseFormat | None = None  # None: free text
    best_of: int = 1  # vLLM's extension: the best of this many samples

    @property
    def messages(self) -> list[Message]:
        """The conversation as the client sent it (system messages first)."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return [*system, *self.history, {"role": "user", "content": self.message}]


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON; every way it can be malformed (not UTF-8, not JSON, nested
    beyond what Python can parse, text that is not Unicode) is a 400 that says which."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8: {exc}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    _check_unicode(body)
    return body


def _check_unicode(body: Any) -> None:
    """Refuse lone surrogates (JSON's ``"\\ud800"``): they are not text, and nothing
    downstream (a tokenizer, the store) can encode them."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{where or 'the body'} holds a lone surrogate "
                                  "(\\ud800-\\udfff), which is not text",
                                  where or None) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, key))
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a persona name or 'auto'", "model")
    for name, neutral in NEUTRAL_FIELDS.items():
        if name in body and body[name] not in neutral:
            raise bad_request(f"'{name}' = {body[name]!r} is not supported by hyperlex", name)
    system, history, message = _split_messages(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string", "user")
    mood = body.get("mood")
    if mood is not None and not isinstance(mood, str):
        raise bad_request("'mood' must be a string: NAME or NAME:WEIGHT", "mood")
    try:
        response_format = from_openai(body.get("response_format"))
    except InvalidResponseFormat as exc:
        raise bad_request(str(exc), "response_format") from None
    best_of = body.get("best_of")
    if best_of is not None:
        try:
            best_of = check_best_of(best_of)
        except HyperlexError as exc:
            raise bad_request(str(exc), "best_of") from None
        if best_of > 1 and response_format is not None:
            raise bad_request("'best_of' ranks replies by what they say; it cannot be combined "
                              "with 'response_format'", "best_of")
    return ChatRequest(model=model, history=history, message=message,
                       instructions="\n\n".join(system) or None, options=_options(body),
                       stop=_stop(body.get("stop")), stream=bool(stream),
                       include_usage=bool(stream_options.get("include_usage")), user=user,
                       mood=mood, response_format=response_format, best_of=best_of or 1)


def _split_messages(messages: Any) -> tuple[list[str], list[Message], str]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[Message] = []
    for i, item in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(f"{where}.role {item.get('role')!r} is not supported; use "
                              f"{', '.join(ROLES)}", f"{where}.role")
        content = _text(item.get("content"), f"{where}.content")
        if role == "system":
            system.append(content)
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise bad_request("the last message must be the user's: it is the turn to answer",
                          "messages")
    return system, turns[:-1], turns[-1]["content"]


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}]: only text parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where} must be a string or a list of text parts", where)


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, target in SAMPLING_FIELDS.items():
        if body.get(name) is None:
            continue
        if not isinstance(body[name], (int, float)) or isinstance(body[name], bool):
            raise bad_request(f"'{name}' must be a number, got {body[name]!r}", name)
        if name == "temperature" and body[name] > 2:
            raise bad_request(f"'temperature' must be between 0 and 2, got {body[name]!r}", name)
        try:
            options[target] = GenerationParams().updated({target: body[name]}, name) \
                .as_dict()[target]
        except InvalidParameter as exc:
            raise bad_request(str(exc).replace(f"{name}: {target}", name), name) from None
    return options


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return [s for s in stops if s]


# responses ----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str,
                    usage: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "refusal": None},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage, "system_fingerprint": None, "hyperlex": extra}


def chunk_body(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage: dict[str, int] | None = None, extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with ``usage`` it is the final, choice-less usage chunk."""
    choices = [] if usage is not None else [
        {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model, "choices": choices,
                            "system_fingerprint": None}
    if usage is not None:
        body["usage"] = usage
    if extra:
        body["hyperlex"] = extra
    return body


def model_body(name: str, created: int, description: str, max_model_len: int
               ) -> dict[str, Any]:
    """A ``model`` object; ``max_model_len`` is vLLM's field for the context length."""
    return {"id": name, "object": "model", "created": created, "owned_by": "hyperlex",
            "description": description, "max_model_len": max_model_len}
