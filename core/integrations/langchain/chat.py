"""LangChain integration: a persona as a chat model, the routed agent as a Runnable.

- :class:`ChatPersona` is a ``BaseChatModel`` for one persona. It holds the engine by
  reference: an ``engine=`` you pass, or the process-wide :func:`shared_engine` for its
  ``base``, loaded on the first call. Constructing one never loads weights, so LangChain's
  ``configurable_fields`` (which builds a new object on every call) costs nothing.
- :class:`HyperlexAgent` is the meta-controller as a ``Runnable``: each
  ``config["configurable"]["thread_id"]`` is a conversation with its own history and scene,
  saved in the session store. Each turn's reply is generated through a nested
  :class:`ChatPersona` run with the call's callbacks, so tracing and ``astream_events``
  show the chosen persona's chat-model stream inside the agent's run.

This module imports ``langchain_core`` (install hyperlex, which depends on it) but not torch:
the engine is loaded on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal, Union

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs, run_in_executor
from langchain_core.runnables.utils import ConfigurableFieldSpec
from pydantic import Field, model_validator

from hyperlex.agent.conversations import Conversations
from hyperlex.agent.moods import parse_mood
from hyperlex.engines.base import Engine
from hyperlex.errors import HyperlexError, PersonaNotAvailable
from hyperlex.generation import Generation, GenerationParams, InvalidParameter, Layers, Message
from hyperlex.persona.prompt import system_message
from hyperlex.structured import ResponseFormat, bounded_strings, from_openai

if TYPE_CHECKING:
    from hyperlex.agent.controller import Controller
    from hyperlex.agent.store import Store
    from hyperlex.agent.verify import ReplyProblem, VoiceScore
    from hyperlex.host import Host
    from hyperlex.persona.bundle import Persona

__all__ = ["ChatPersona", "HyperlexAgent", "PersonaNotAvailable", "shared_engine"]


# --- the shared engine --------------------------------------------------------------------------

_ENGINES: dict[str, tuple[Engine, str, str | None]] = {}  # base source -> engine, dtype, quantize
_ENGINES_LOCK = threading.Lock()


def shared_engine(base: str | None = None, *, dtype: str | None = None,
                  quantize: str | None = None) -> Engine:
    """The process-wide engine for ``base`` (None: the embedded model; a local directory or a
    hub id), with every installed persona and mood attached. Loaded on the first call, then
    returned as it is: one base model in memory, however many ChatPersonas and agents use it.

    ``dtype`` ("float32" | "bfloat16") and ``quantize`` ("nf4") apply when it is loaded (None:
    float32, unquantized); asking for settings other than those it was loaded with raises.
    """
    from hyperlex.engines.models import resolve_base

    resolved = resolve_base(base)
    with _ENGINES_LOCK:
        if resolved.source in _ENGINES:
            engine, loaded_dtype, loaded_quantize = _ENGINES[resolved.source]
            if (dtype not in (None, loaded_dtype)
                    or (quantize is not None and quantize != loaded_quantize)):
                raise HyperlexError(
                    f"the shared engine for {resolved.name} is already loaded with dtype "
                    f"{loaded_dtype}, quantize {loaded_quantize}; pass engine= to use another")
            return engine
        from hyperlex.engines.torch.engine import TorchEngine
        from hyperlex.host import Host

        engine = TorchEngine(list(Host().personas.values()), base=resolved,
                             dtype=dtype or "float32", quantize=quantize)
        _ENGINES[resolved.source] = (engine, dtype or "float32", quantize)
        return engine


def _base_name(engine: Engine | None, base: str | None) -> str:
    if engine is not None:
        return engine.base_name
    from hyperlex.engines.models import resolve_base

    return resolve_base(base).name


def _parse_mood(engine: Engine, spec: str | None) -> tuple[str, float] | None:
    """The same rules as ``agent chat --mood``; a bad weight is a ``ValueError`` too."""
    try:
        return parse_mood(engine.moods, spec)
    except PersonaNotAvailable:
        raise
    except HyperlexError as exc:
        raise PersonaNotAvailable(str(exc)) from None


# --- messages ----------------------------------------------------------------------------------

_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant",
          "assistant": "assistant"}


def _text_of(message: BaseMessage) -> str:
    """The text of a message; anything but text (images, audio, files, tool calls) is refused
    with a clear error rather than silently dropped."""
    if isinstance(message, AIMessage) and message.tool_calls:
        raise ValueError("ChatPersona does not support tool calling (the personas are plain "
                         "text models); got an AIMessage with tool_calls")
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
            continue  # a model's own reasoning is not part of the conversation text
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatPersona takes text only; got a {kind!r} content block "
                             "(images, audio and files are not supported)")
    return "".join(parts)


def _role_of(message: BaseMessage) -> str:
    role = message.role if isinstance(message, ChatMessage) else message.type
    if role in _ROLES:
        return _ROLES[role]
    if role in ("tool", "function"):
        raise ValueError(f"ChatPersona does not support tool calling; got a {role} message")
    raise ValueError(f"ChatPersona cannot use a message with role {role!r}")


def _engine_messages(messages: Sequence[BaseMessage]) -> tuple[list[str], list[Message]]:
    """(system texts, the rest as chat messages with consecutive same-role messages merged).

    System messages are collected wherever they stand: small chat templates expect one system
    message, first."""
    systems: list[str] = []
    dialog: list[Message] = []
    for message in messages:
        role, text = _role_of(message), _text_of(message)
        if role == "system":
            if text.strip():
                systems.append(text)
        elif dialog and dialog[-1]["role"] == role:
            dialog[-1] = {"role": role, "content": dialog[-1]["content"] + "\n\n" + text}
        else:
            dialog.append({"role": role, "content": text})
    return systems, dialog


def _lc_message(message: Message) -> BaseMessage:
    role, content = message["role"], message["content"]
    if role == "system":
        return SystemMessage(content)
    if role == "assistant":
        return AIMessage(content)
    return HumanMessage(content)


# --- ChatPersona -------------------------------------------------------------------------------

# Per-call options: ``model.bind(persona="poet", temperature=0)`` or ``invoke(..., seed=1)``.
# ``response_format`` is OpenAI's field ({"type": "json_object"} or {"type": "json_schema",
# ...}), as ChatOpenAI binds it; with_structured_output binds it for you.
_CALL_OPTIONS = ("persona", "mood", "temperature", "top_p", "top_k", "max_tokens",
                 "repetition_penalty", "seed", "response_format")
_SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed")
# Client options other chat models take (and LangChain's standard tests pass); a local engine
# has no use for them, so they are accepted and ignored.
_IGNORED_INIT = ("timeout", "max_retries", "api_key")


def _params_update(values: Mapping[str, Any]) -> dict[str, Any]:
    """ChatPersona's sampling names -> GenerationParams' (``max_tokens`` -> ``max_new_tokens``),
    leaving out those not set."""
    return {("max_new_tokens" if k == "max_tokens" else k): v
            for k, v in values.items() if k in _SAMPLING and v is not None}


def _sampling(params: GenerationParams, values: Mapping[str, Any]) -> GenerationParams:
    """``params`` with the sampling options in ``values`` applied (a bad value: ValueError)."""
    try:
        return params.updated(_params_update(values), where="ChatPersona")
    except InvalidParameter as exc:
        raise ValueError(str(exc)) from None


def _response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's ``response_format`` field (or a ResponseFormat) as the engine takes it."""
    if value is None or isinstance(value, ResponseFormat):
        return value
    return from_openai(value)


@dataclass
class _Call:
    persona: str
    messages: list[Message]
    params: GenerationParams
    stop: tuple[str, ...]
    layers: Layers
    response_format: ResponseFormat | None = None


class ChatPersona(BaseChatModel):
    """One hyperlex persona as a LangChain chat model.

    The persona's prompt contract (rendered with an empty scene) is the system message; any
    ``SystemMessage`` in the input is appended after it. Consecutive messages of one role are
    merged before the chat template. Sampling options left unset come from the persona's
    contract. ``stop`` strings may span several tokens; they are cut from the reply.

    Per call, ``bind(persona=..., temperature=..., ...)`` or ``configurable_fields`` /
    ``configurable_alternatives`` change the persona and options.

    ``with_structured_output(schema)`` (a pydantic model, a TypedDict or a JSON schema;
    ``method="json_schema"``, ``"json_mode"``, or ``"function_calling"``, which is served the
    same way since personas have no tool-call format) decodes the reply under the schema's
    grammar, so it always parses unless it is cut by ``max_tokens``. Tool calling and
    image/audio/file inputs are not supported.

    Example:
        ```python
        from hyperlex.integrations.langchain.chat import ChatPersona

        poet = ChatPersona(persona="poet", max_tokens=60)
        print(poet.invoke("Write about autumn rain.").content)
        ```
    """

    persona: str
    """The persona that speaks (an installed persona's name)."""
    base: str | None = None
    """The base model of the shared engine (None: the embedded model); ignored with ``engine``."""
    engine: Any = Field(default=None, exclude=True, repr=False)
    """An engine to use instead of the shared one (held by reference, never serialized)."""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy. None: the persona's contract."""
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    """Most tokens to generate (the engine's ``max_new_tokens``). None: the contract."""
    repetition_penalty: float | None = None
    seed: int | None = None
    """Seed for sampling, for reproducible replies."""
    stop: list[str] | None = None
    """Stop strings (any length); a per-call ``stop`` replaces these."""
    mood: str | None = None
    """A mood layer, ``NAME`` or ``NAME:WEIGHT``, composed over the persona."""
    contract: bool = True
    """Render the persona's contract as the system message. False: send the messages as given
    (the agent does this, having rendered the contract with the scene itself)."""
    streaming: bool = False
    """Stream internally in ``invoke`` too (callbacks then see every token)."""

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = {k: v for k, v in values.items() if k not in _IGNORED_INIT}
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            hint = "; choose the persona with persona=" if "model" in unknown else ""
            raise ValueError(f"ChatPersona got unknown argument(s) {', '.join(unknown)}{hint}")
        return values

    @model_validator(mode="after")
    def _check_sampling(self) -> ChatPersona:
        _sampling(GenerationParams(), self.__dict__)
        return self

    @property
    def _llm_type(self) -> str:
        return "hyperlex-persona"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes a reply, so LangChain's cache never hands one persona's (or
        one setting's) answer to another. Reading it never loads the engine."""
        return {
            "persona": self.persona,
            "base": _base_name(self.engine, self.base),
            "mood": self.mood,
            "contract": self.contract,
            **{name: getattr(self, name) for name in _SAMPLING},
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "hyperlex"
        params["ls_model_name"] = (kwargs["model"] if isinstance(kwargs.get("model"), str)
                                   else _base_name(self.engine, self.base))
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _get_engine(self) -> Engine:
        return self.engine if self.engine is not None else shared_engine(self.base)

    def _call(self, engine: Engine, messages: Sequence[BaseMessage], stop: list[str] | None,
              options: Mapping[str, Any]) -> _Call:
        """Resolve one call: the persona, the prompt, the sampling parameters and the stops."""
        unknown = sorted(set(options) - set(_CALL_OPTIONS) - {"stream"})
        if "tools" in unknown or "tool_choice" in unknown:
            raise ValueError("ChatPersona does not support tool calling")
        if unknown:
            raise ValueError(f"ChatPersona got unsupported option(s) {', '.join(unknown)}; "
                             f"per-call options: {', '.join(_CALL_OPTIONS)}, stop")
        name = options.get("persona", self.persona)
        persona = engine.persona(name)
        mood = _parse_mood(engine, options.get("mood", self.mood))
        settings = {k: getattr(self, k) for k in _SAMPLING}
        settings.update({k: v for k, v in options.items() if k in _SAMPLING})
        params = _sampling(persona.contract.params(), settings)
        response_format = _response_format(options.get("response_format"))
        prompt = self._prompt(engine, persona, mood, messages, response_format)
        room = engine.context_length - engine.count_tokens(prompt)
        if room < 1:
            raise ValueError(f"the prompt takes {engine.context_length - room} tokens; "
                             f"{engine.base_name} accepts {engine.context_length} in all")
        if params.max_new_tokens > room:
            params = params.updated({"max_new_tokens": room})
        layers = [mood] if mood and engine.moods[mood[0]].adapter_dir is not None else []
        stops = stop if stop is not None else (self.stop or [])
        return _Call(name, prompt, params, tuple(stops), layers, response_format)

    def _prompt(self, engine: Engine, persona: Persona, mood: tuple[str, float] | None,
                messages: Sequence[BaseMessage],
                response_format: ResponseFormat | None = None) -> list[Message]:
        """The chat messages the engine gets: one system message first (the contract, then the
        input's system messages, then what shape of JSON to answer with), then the rest with
        same-role neighbours merged."""
        systems, dialog = _engine_messages(messages)
        if not dialog and not systems:
            raise ValueError("ChatPersona got no messages")
        if response_format is not None and self.contract:
            systems = [*systems, response_format.instruction]
        if self.contract:
            systems = [system_message(persona, None, engine,
                                      engine.moods[mood[0]] if mood else None, systems)]
        head: list[Message] = [{"role": "system", "content": "\n\n".join(systems)}] \
            if systems else []
        return head + dialog

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        """The prompt's tokens as the engine counts them: the contract, the merged messages and
        the chat template included (LangChain's default would guess with GPT-2's tokenizer)."""
        if tools:
            raise NotImplementedError("ChatPersona does not support tool calling")
        engine = self._get_engine()
        persona = engine.persona(self.persona)
        prompt = self._prompt(engine, persona, _parse_mood(engine, self.mood), messages)
        return engine.count_tokens(prompt)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the base model's own tokenizer (backends without a local
        tokenizer cannot tell)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        tokenizer = getattr(self._get_engine(), "tokenizer", None)
        if tokenizer is None:
            raise NotImplementedError("this engine does not expose its tokenizer")
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self._get_engine()
        call = self._call(engine, messages, stop, kwargs)
        generation = engine.stream(call.messages, call.persona, call.params, call.stop,
                                   call.layers, response_format=call.response_format)
        pieces = iter(generation)
        try:
            for piece in pieces:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        finally:  # the consumer may stop early: stop the engine at the next token
            generation.cancel()
            pieces.close()
        usage = generation.usage
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="",
            chunk_position="last",
            usage_metadata=UsageMetadata(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens),
            response_metadata={"model_name": engine.base_name, "persona": call.persona,
                               "finish_reason": generation.finish_reason or "stop"},
        ))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Token callbacks fire only when LangChain asks for streaming (it then calls _stream).
        return generate_from_stream(self._stream(messages, stop, None, **kwargs))

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        max_string_length: int | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, Any]:
        """A runnable that answers with ``schema``'s shape: a pydantic model instance for a
        pydantic ``schema``, a dict otherwise (streamed as growing partial dicts);
        ``include_raw`` gives ``{"raw", "parsed", "parsing_error"}`` instead.

        The reply is decoded under the schema's grammar with every method: a 135M persona
        asked for keys in words (what ``json_mode`` means elsewhere) does not reliably write
        them, so ``json_mode`` holds it to the schema too, and to any JSON object only
        without one. ``function_calling`` is served the same way: personas have no
        tool-call format.

        ``max_string_length`` holds every string the schema leaves unbounded to that many
        characters, so that a small model's greedy string cannot run the reply past
        ``max_tokens`` (:func:`hyperlex.structured.bounded_strings`)."""
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.utils.pydantic import is_basemodel_subclass

        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method not in ("json_schema", "json_mode", "function_calling"):
            raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', "
                             f"got {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"with_structured_output(method={method!r}) needs a schema")
        if schema is None and max_string_length is not None:
            raise ValueError("with_structured_output(max_string_length=...) needs a schema "
                             "whose strings it bounds")
        if schema is None:
            response_format = ResponseFormat.json_object()
        else:
            target = _json_schema(schema, strict)
            if max_string_length is not None:
                target = bounded_strings(target, max_string_length)
            response_format = ResponseFormat.json_schema(
                target, _schema_name(target), where="with_structured_output schema")
        options = {"method": method, "strict": strict, "max_string_length": max_string_length}
        traced = {} if schema is None else {"ls_structured_output_format": {
            "kwargs": options, "schema": schema}}
        llm = self.bind(response_format=response_format.as_openai(), **traced)
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            if isinstance(schema, type) and is_basemodel_subclass(schema)
            else JsonOutputParser())
        if not include_raw:
            return llm | parser
        from operator import itemgetter

        from langchain_core.runnables import RunnableMap, RunnablePassthrough

        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                            parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed],
                                                            exception_key="parsing_error")


def _json_schema(schema: dict[str, Any] | type, strict: bool | None) -> dict[str, Any]:
    """The JSON Schema of a pydantic model, a TypedDict, an OpenAI tool or a JSON schema."""
    from langchain_core.utils.function_calling import convert_to_json_schema

    try:
        return convert_to_json_schema(schema, strict=strict)
    except ValueError:
        if isinstance(schema, dict):  # a plain JSON schema without a title
            return schema
        raise


def _schema_name(schema: Mapping[str, Any]) -> str:
    title = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64]
    return title or "response"


# --- the agent: each turn through a nested ChatPersona run --------------------------------------


class _TurnEngine(Engine):
    """The engine an agent's controller sees: the real one, except that each turn's reply is
    generated by a :class:`ChatPersona` run under the current call's config, so callbacks
    (tracing, ``astream_events``) see the persona's chat-model run nested in the agent's."""

    def __init__(self, engine: Engine):
        self.inner = engine
        self.config: RunnableConfig | None = None

    @property  # type: ignore[override]
    def base_name(self) -> str:
        return self.inner.base_name

    @property  # type: ignore[override]
    def personas(self) -> dict[str, Persona]:
        return self.inner.personas

    @property  # type: ignore[override]
    def moods(self) -> dict[str, Persona]:
        return self.inner.moods

    @property  # type: ignore[override]
    def skipped(self) -> dict[str, str]:
        return self.inner.skipped

    def stream(self, messages: Sequence[Message], persona: str | None,
               params: GenerationParams | None = None, stop: Sequence[str] = (),
               layers: Layers = (), response_format: ResponseFormat | None = None
               ) -> Generation:
        if persona is None:  # the controller always names a persona
            return self.inner.stream(messages, persona, params, stop, layers,
                                     response_format=response_format)
        return _ChatPersonaGeneration(self.inner, messages, persona,
                                      params or GenerationParams(), stop, layers, self.config,
                                      response_format)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return self.inner.count_tokens(messages)

    @property
    def context_length(self) -> int:
        return self.inner.context_length


class _ChatPersonaGeneration(Generation):
    """A Generation whose pieces come from ``ChatPersona.stream`` (the prompt as the controller
    built it, ``contract=False``); usage and finish reason are read from its last chunk."""

    def __init__(self, engine: Engine, messages: Sequence[Message], persona: str,
                 params: GenerationParams, stop: Sequence[str], layers: Layers,
                 config: RunnableConfig | None, response_format: ResponseFormat | None = None):
        super().__init__(persona)  # the inner generation cuts the stop strings
        mood = f"{layers[0][0]}:{layers[0][1]:g}" if layers else None
        self._model = ChatPersona(
            persona=persona, engine=engine, contract=False, mood=mood,
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
            seed=params.seed, stop=list(stop) or None)
        self._messages = [_lc_message(m) for m in messages]
        self._config = merge_configs(config, {"metadata": {"persona": persona}})
        self._format = {} if response_format is None else {
            "response_format": response_format.as_openai()}

    def _pieces(self) -> Iterator[str]:
        chunks = self._model.stream(self._messages, self._config, **self._format)
        try:
            for chunk in chunks:
                if chunk.usage_metadata:
                    self.usage.prompt_tokens = chunk.usage_metadata["input_tokens"]
                    self.usage.completion_tokens = chunk.usage_metadata["output_tokens"]
                if chunk.response_metadata.get("finish_reason"):
                    self.finish_reason = chunk.response_metadata["finish_reason"]
                if chunk.text:
                    yield chunk.text
                if self.cancelled:
                    return
        finally:
            chunks.close()


AgentInput = Union[str, PromptValue, Sequence[Any], Mapping[str, Any]]  # noqa: UP007


def _agent_input(value: Any) -> tuple[str, list[Message]]:
    """The turn (the last human message) and what came before it, as chat messages."""
    if isinstance(value, str):
        return value, []
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, Mapping):
        if "messages" not in value:
            raise ValueError("HyperlexAgent takes a string, a list of messages or "
                             f"{{'messages': [...]}}; got a mapping with keys {sorted(value)}")
        messages = convert_to_messages(value["messages"])
    elif isinstance(value, Sequence):
        messages = convert_to_messages(value)
    else:
        raise ValueError(f"HyperlexAgent cannot take a {type(value).__name__} as input")
    if not messages or not isinstance(messages[-1], HumanMessage):
        raise ValueError("HyperlexAgent answers the last message, which must be a human message")
    _, dialog = _engine_messages(messages[:-1])  # system messages: not used, see the docs
    return _text_of(messages[-1]), dialog


class _Trim:
    """Streams text with leading and trailing whitespace removed, so the streamed reply is the
    same as the one ``invoke`` returns and the store keeps."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def __call__(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body):]
        return body


@dataclass
class _Thread:
    controller: Controller
    engine: _TurnEngine
    lock: threading.Lock = field(default_factory=threading.Lock)


_SESSION_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,61}$")


class HyperlexAgent(Runnable[AgentInput, AIMessage]):
    """The routed multi-persona agent as a LangChain Runnable.

    Input: a string, a list of messages, a prompt value or ``{"messages": [...]}``. The last
    message (a human one) is the turn; earlier messages seed the conversation's history only
    when its thread is new (afterwards the store's history wins). Output: an ``AIMessage``
    named after the persona that answered, with ``response_metadata`` = persona, reason,
    route, model_name, finish_reason, session, and ``usage_metadata``.

    ``config["configurable"]``:

    - ``thread_id``: the conversation. Its history, scene, persona and mood are kept in the
      session store as session ``lc-<thread_id>`` (see :meth:`session_name`). Without one,
      each call is a fresh conversation that is not saved.
    - ``persona``: the persona that answers this call ("auto": route); not saved.
    - ``mood``: a mood layer for this call, ``NAME[:WEIGHT]`` ("off": none); not saved.

    ``engine``: the engine to share (default: :func:`shared_engine` for ``base``, loaded on
    the first call); ``host``: plugins for routing, scene encoders and hooks (default: the
    installed ones); ``store``: a :class:`~hyperlex.agent.store.Store`, a database path, None for
    the default database, or False for none (memory then lasts as long as this object);
    ``persona``/``mood``: pinned persona and mood for new threads; ``options``: generation
    options (``max_new_tokens``, ``temperature``, ...) over every persona's contract;
    ``best_of``: sample that many replies per turn and answer with the one that keeps the
    user's facts best (``agent chat --best-of``; each sample's check is in the reply's
    ``response_metadata["best_of"]``); ``reply_problem``: a check of each sample's text that
    returns what is wrong with it or None, whose samples rank below the others as ``agent
    chat`` ranks a sample naming an ``agent`` command that does not exist (pass
    ``CommandReferences(hyperlex.cli.cli, personas).problem`` for that check).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        base: str | None = None,
        host: Host | None = None,
        store: Store | str | PathLike[str] | Literal[False] | None = None,
        persona: str | None = None,
        router: str | None = "embedding",
        mood: str | None = None,
        options: Mapping[str, Any] | None = None,
        name: str | None = None,
        max_threads: int = 256,
        best_of: int = 1,
        reply_problem: ReplyProblem | None = None,
    ):
        from hyperlex.agent.verify import check_best_of

        self.name = name or "HyperlexAgent"
        self.best_of = check_best_of(best_of)
        self.reply_problem = reply_problem
        self._voice: VoiceScore | None = None
        self.base = base
        self.persona = persona
        self.router = router
        self.mood = mood
        self.options = dict(options or {})
        GenerationParams().updated(self.options, where="HyperlexAgent options")
        self.max_threads = max_threads
        self._engine = engine
        self._host = host
        self._store_spec = store
        self._store: Store | None = None
        self.threads: Conversations[str, _Thread] = Conversations(self._thread_for, max_threads)

    # configuration ---------------------------------------------------------------------------

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        return [
            ConfigurableFieldSpec(id="thread_id", annotation=str, name="Thread ID",
                                  description="The conversation; kept in the session store.",
                                  default="", is_shared=True),
            ConfigurableFieldSpec(id="persona", annotation=Union[str, None],  # noqa: UP007
                                  name="Persona", default=None,
                                  description="The persona that answers ('auto': route)."),
            ConfigurableFieldSpec(id="mood", annotation=Union[str, None],  # noqa: UP007
                                  name="Mood", default=None,
                                  description="A mood layer, NAME[:WEIGHT] ('off': none)."),
        ]

    @staticmethod
    def session_name(thread_id: Any) -> str:
        """The store session of a thread: ``lc-<thread_id>`` when that is a valid session name,
        else ``lc.`` and a hash of it (so any thread id works, and the two never collide)."""
        text = str(thread_id)
        if _SESSION_SAFE.match(text):
            return f"lc-{text}"
        return "lc." + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    @property
    def engine(self) -> Engine:
        """The engine (the shared one is loaded here on first use)."""
        if self._engine is None:
            self._engine = shared_engine(self.base)
        return self._engine

    @property
    def host(self) -> Host:
        if self._host is None:
            from hyperlex.host import Host

            self._host = Host()
        return self._host

    @property
    def store(self) -> Store | None:
        """The session store (opened on first use); None when ``store=False``."""
        if self._store_spec is False:
            return None
        if self._store is None:
            from hyperlex.agent.store import Store

            spec = self._store_spec
            self._store = spec if isinstance(spec, Store) else Store(spec)
        return self._store

    # threads ---------------------------------------------------------------------------------

    def _new_thread(self, session: str | None) -> _Thread:
        from hyperlex.agent.controller import Controller

        engine = _TurnEngine(self.engine)
        if self.best_of > 1 and self._voice is None:
            from hyperlex.eval.fidelity import voice_scorer

            self._voice = voice_scorer(self.engine.personas)
        controller = Controller(self.host, engine, persona=self.persona,
                                overrides=self.options, router=self.router, mood=self.mood,
                                store=self.store if session else None, session=session,
                                best_of=self.best_of, voice=self._voice,
                                reply_problem=self.reply_problem)
        return _Thread(controller, engine)

    def _thread(self, thread_id: Any) -> _Thread:
        if thread_id is None or thread_id == "":
            return self._new_thread(None)
        # without a store an evicted thread would lose its history: keep them all
        return self.threads.get(str(thread_id), evict=self.store is not None)

    def _thread_for(self, key: str) -> _Thread:
        return self._new_thread(self.session_name(key) if self.store is not None else None)

    # one turn --------------------------------------------------------------------------------

    def _turn(self, value: Any, config: RunnableConfig) -> Iterator[AIMessageChunk]:
        """Route, generate (streamed), record: yields the reply's chunks, then one last chunk
        with the metadata and usage."""
        text, history = _agent_input(value)
        configurable = config.get("configurable") or {}
        thread = self._thread(configurable.get("thread_id"))
        with thread.lock:
            controller = thread.controller
            if history and not controller.history:
                controller.history = history
            choice = configurable.get("persona")
            if choice is not None and choice != "auto":
                controller.engine.persona(choice)
            _parse_mood(controller.engine, configurable.get("mood"))
            try:
                thread.engine.config = config
                stream = controller.send(text, persona=choice, mood=configurable.get("mood"))
                turn = stream.turn
                trim = _Trim()
                pieces = iter(stream)
                try:
                    for piece in pieces:
                        if body := trim(piece):
                            yield AIMessageChunk(content=body, name=turn.persona)
                finally:
                    pieces.close()
            finally:
                thread.engine.config = None
        yield AIMessageChunk(
            content="",
            name=turn.persona,
            chunk_position="last",
            usage_metadata=UsageMetadata(
                input_tokens=turn.prompt_tokens, output_tokens=turn.completion_tokens,
                total_tokens=turn.prompt_tokens + turn.completion_tokens),
            response_metadata={
                "persona": turn.persona,
                "reason": turn.reason,
                "route": turn.route,
                "model_name": controller.engine.base_name,
                "finish_reason": turn.finish_reason,
                "mood": turn.mood,
                "session": controller.session if controller.store is not None else None,
                **({"best_of": turn.annotations["best_of"]}
                   if "best_of" in turn.annotations else {}),
            },
        )

    def _invoke(self, value: AgentInput, config: RunnableConfig) -> AIMessage:
        full: AIMessageChunk | None = None
        for chunk in self._turn(value, config):
            full = chunk if full is None else full + chunk
        assert full is not None
        return AIMessage(content=full.content, name=full.response_metadata["persona"],
                         response_metadata=full.response_metadata,
                         usage_metadata=full.usage_metadata)

    def invoke(self, input: AgentInput, config: RunnableConfig | None = None,
               **kwargs: Any) -> AIMessage:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def stream(self, input: AgentInput, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[AIMessageChunk]:
        def transform(inputs: Iterator[AgentInput],
                      config: RunnableConfig) -> Iterator[AIMessageChunk]:
            yield from self._turn(_single(inputs), config)

        yield from self._transform_stream_with_config(iter([input]), transform, config,
                                                      **kwargs)

    async def astream(self, input: AgentInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async def inputs() -> AsyncIterator[AgentInput]:
            yield input

        stream = self._atransform_stream_with_config(inputs(), self._aturn, config, **kwargs)
        try:
            async for chunk in stream:
                yield chunk
        finally:  # closed now, not whenever the event loop finalizes it: ends the turn early
            await stream.aclose()

    async def _aturn(self, inputs: AsyncIterator[AgentInput],
                     config: RunnableConfig) -> AsyncIterator[AIMessageChunk]:
        """:meth:`_turn` for the event loop. The controller, router, encoders and engine are
        synchronous, so the turn runs in one worker thread, which takes each next chunk only
        when the consumer asks for it (as the sync stream does). If the consumer stops early
        or is cancelled, the worker closes the turn (it is not recorded, the thread's lock is
        released) and is awaited."""
        value = _single(iter([item async for item in inputs]))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[AIMessageChunk | None, BaseException | None]] = \
            asyncio.Queue()
        wanted = threading.Semaphore(0)
        stop = threading.Event()

        def put(item: tuple[AIMessageChunk | None, BaseException | None]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        def work() -> None:
            chunks = self._turn(value, config)
            try:
                while wanted.acquire() and not stop.is_set():
                    chunk = next(chunks, None)
                    put((chunk, None))
                    if chunk is None:
                        break
            except BaseException as exc:
                put((None, exc))
            finally:
                chunks.close()

        worker = asyncio.ensure_future(run_in_executor(config, work))
        try:
            while True:
                wanted.release()
                chunk, error = await queue.get()
                if error is not None:
                    raise error
                if chunk is None:
                    break
                yield chunk
        finally:
            stop.set()
            wanted.release()
            await asyncio.shield(worker)

    # LangGraph ---------------------------------------------------------------------------------

    def as_node(self, key: str = "messages"
                ) -> Callable[..., dict[str, list[AIMessage]]]:
        """A LangGraph node: ``(state, config) -> {"messages": [AIMessage]}``, for a state
        with a list of messages under ``key`` (a mapping or an object with that attribute).
        The graph's ``thread_id`` is the conversation; langgraph is not imported."""

        def node(state: Any, config: RunnableConfig | None = None
                 ) -> dict[str, list[AIMessage]]:
            messages = state[key] if isinstance(state, Mapping) else getattr(state, key)
            return {key: [self.invoke({"messages": messages}, config)]}

        node.__name__ = node.__qualname__ = re.sub(r"\W", "_", self.name or "hyperlex")
        return node


def _single(values: Iterator[Any]) -> Any:
    items = list(values)
    if len(items) != 1:
        raise ValueError(f"HyperlexAgent takes one input per call, got {len(items)}")
    return items[0]
