"""``agent serve``: the personas behind an OpenAI-compatible HTTP API.

:class:`PersonaService` answers requests without knowing about HTTP: each chat completion is
a controller turn (contract, scene, routing for ``auto``), or, in engine mode, the client's
messages sent as they are to the persona's adapter (what vLLM does; hyperlex's own
``--backend openai`` uses it). :class:`Server` is a threaded HTTP/1.1 server from the standard
library: one thread per connection, each blocking on its own generation, so concurrency is
the engine's (a pool of llama.cpp contexts, or the torch engine's lock, which serializes turns
and so never mixes adapters).

A conversation id (the ``X-Conversation-Id`` header, else the request's ``user`` field) keeps
a controller, and so the scene and the current persona, across requests; with a store the
conversation is saved as the session of that name and survives a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hyperlex.agent.controller import Controller, TurnStream, fit_reply
from hyperlex.agent.conversations import Conversations
from hyperlex.agent.router import DEFAULT_ROUTER
from hyperlex.agent.store import DEFAULT_TENANT
from hyperlex.engines.base import Engine
from hyperlex.errors import ContextTooLong, HyperlexError, PersonaNotAvailable, UnknownPersona
from hyperlex.generation import Generation, GenerationParams
from hyperlex.serve.openai_api import (
    ApiError,
    ChatRequest,
    bad_request,
    model_body,
    model_not_found,
    usage_body,
)

if TYPE_CHECKING:
    from hyperlex.agent.store import Store
    from hyperlex.agent.verify import ReplyProblem, VoiceScore
    from hyperlex.host import Host

AUTO = "auto"
CONVERSATION_HEADER = "X-Conversation-Id"
MODE_HEADER = "X-Hyperlex-Mode"  # "engine": the messages are the whole prompt
PERSONA_HEADER = "X-Hyperlex-Persona"


@dataclass
class _Conversation:
    controller: Controller
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reply:
    """A started answer: ``persona`` is known before the first piece; iterate for the text."""

    def __init__(self, persona: str, pieces: Iterator[str], generation: Generation,
                 extra: dict[str, Any], release: Any = None):
        self.persona = persona
        self.extra = extra
        self._pieces = pieces
        self.generation = generation
        self._release = release
        self.outcome: dict[str, Any] = {}  # a turn that ended on its own: turn, scene, diff

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._pieces
        finally:
            self.close()

    def cancel(self) -> None:
        """Stop generating (safe from any thread; the turn ends as cancelled, unsaved)."""
        self.generation.cancel()

    def close(self) -> None:
        """Stop generating (a client that went away) and free the conversation."""
        self.generation.cancel()
        with contextlib.suppress(Exception):
            self._pieces.close()  # type: ignore[attr-defined]
        if self._release is not None:
            release, self._release = self._release, None
            release()

    @property
    def usage(self) -> dict[str, int]:
        return usage_body(self.generation.usage.prompt_tokens,
                          self.generation.usage.completion_tokens)

    @property
    def finish_reason(self) -> str:
        reason = self.generation.finish_reason
        return reason if reason in ("stop", "length") else "stop"


class PersonaService:
    """The models and the turns behind the API."""

    def __init__(self, host: Host, engine: Engine, *, router: str | None = DEFAULT_ROUTER,
                 store: Store | None = None, overrides: dict[str, Any] | None = None,
                 max_conversations: int = 1000, voice: VoiceScore | None = None,
                 reply_problem: ReplyProblem | None = None):
        """``voice``: the probability that a text is a persona's, which ranks a request's
        ``best_of`` samples among equals; ``reply_problem``: what is wrong with a sample (a
        command that does not exist), which ranks it below the others
        (:mod:`hyperlex.agent.verify`)."""
        self.host = host
        self.voice = voice
        self.reply_problem = reply_problem
        self.engine = engine
        self.router = router
        self.store = store
        self.overrides = dict(overrides or {})
        self.max_conversations = max_conversations
        self.created = int(time.time())
        self.conversations: Conversations[tuple[str, str], _Conversation] = Conversations(
            lambda key: _Conversation(self._controller(key[1], key[0])), max_conversations)

    def warm_up(self) -> None:
        """Load the automatic router (its embedding model, the personas' prototypes) in the
        background now rather than in the first ``auto`` request."""
        def route_once() -> None:
            with contextlib.suppress(Exception):  # the first real request reports it
                self._controller(None).route("hello")

        threading.Thread(target=route_once, name="hyperlex-router-warm-up", daemon=True).start()

    @property
    def speakers(self) -> list[str]:
        return sorted(self.engine.personas)

    def models(self) -> list[dict[str, Any]]:
        length = self.engine.context_length
        models = [model_body(AUTO, self.created, "Routes each turn to the persona that fits "
                             "it and keeps the scene (send a conversation id to keep it "
                             "across requests)", length)]
        for name in self.speakers:
            persona = self.engine.personas[name]
            models.append(model_body(name, self.created, persona.description, length))
        return models

    def model(self, name: str) -> dict[str, Any]:
        for model in self.models():
            if model["id"] == name:
                return model
        raise model_not_found(name, [AUTO, *self.speakers])

    def start(self, request: ChatRequest, conversation: str | None = None,
              engine_mode: bool = False, tenant: str = DEFAULT_TENANT,
              own_history: bool = False) -> Reply:
        """Begin answering ``request`` in ``tenant``'s ``conversation``; errors before the
        first token are :class:`ApiError`. With ``own_history`` (the page's turns) the
        conversation keeps the history it has instead of taking the request's."""
        if request.model != AUTO:
            try:
                self.engine.persona(request.model)
            except PersonaNotAvailable as exc:
                error = model_not_found(request.model, [AUTO, *self.speakers])
                if not isinstance(exc, UnknownPersona):  # installed, but it could not load
                    error.message = f"{exc}; {error.message}"
                raise error from None
        if engine_mode:
            return self._start_engine(request)
        if conversation is None:
            controller = self._controller(None)
            return self._start_turn(controller, request, None)
        entry = self.conversations.get((tenant, conversation))
        entry.lock.acquire()
        try:
            return self._start_turn(entry.controller, request, entry.lock.release,
                                    conversation, own_history)
        except BaseException:
            entry.lock.release()
            raise

    def _start_engine(self, request: ChatRequest) -> Reply:
        if request.model == AUTO:
            raise bad_request(f"{MODE_HEADER}: engine needs a persona as the model, not "
                              "'auto'", "model")
        if request.mood is not None:
            raise bad_request(f"{MODE_HEADER}: engine applies one adapter; 'mood' needs the "
                              "agent mode", "mood")
        if request.best_of > 1:
            raise bad_request(f"{MODE_HEADER}: engine keeps no scene to check samples "
                              "against; 'best_of' needs the agent mode", "best_of")
        # like vLLM: the request's settings over plain defaults, not the persona's contract
        params = GenerationParams().updated(request.options, "request")
        generation = self._engine_call(lambda: self.engine.stream(
            request.messages, request.model, fit_reply(self.engine, request.messages, params),
            request.stop, response_format=request.response_format))
        return Reply(request.model, iter(generation), generation, {"persona": request.model})

    def _start_turn(self, controller: Controller, request: ChatRequest, release: Any,
                    conversation: str | None = None, own_history: bool = False) -> Reply:
        if not own_history:
            controller.history = list(request.history)  # the client's history is the truth
        before = controller.scene
        turn: TurnStream = self._engine_call(lambda: controller.send(
            request.message, persona=request.model, mood=request.mood, options=request.options,
            stop=request.stop, instructions=request.instructions,
            response_format=request.response_format, best_of=request.best_of))
        decision = controller.last_decision
        extra = {"persona": turn.turn.persona, "conversation": conversation,
                 "route": {"source": decision.source, "reason": decision.reason}
                 if decision else None}
        outcome: dict[str, Any] = {"route": decision.as_dict() if decision else None}

        def pieces() -> Iterator[str]:
            yield from turn
            if turn.turn.scene_version is not None:  # recorded: read it before the release
                outcome.update(turn=turn.turn.as_dict(), scene=controller.scene.to_dict(),
                               diff=before.diff(controller.scene).to_dict())

        reply = Reply(turn.turn.persona, pieces(), turn.generation, extra, release)
        reply.outcome = outcome
        return reply

    def _engine_call(self, call: Any) -> Any:
        try:
            return call()
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
        except HyperlexError as exc:
            raise bad_request(str(exc)) from None

    def _controller(self, session: str | None, tenant: str = DEFAULT_TENANT) -> Controller:
        store = self.store.for_tenant(tenant) if session is not None and self.store else None
        return Controller(self.host, self.engine, overrides=self.overrides,
                          router=self.router, store=store, session=session, voice=self.voice,
                          reply_problem=self.reply_problem)

    def conversation(self, tenant: str, name: str) -> dict[str, Any]:
        """``tenant``'s conversation ``name`` as saved (the session document: turns, scene),
        or as held in memory without a store; 404 when this tenant has none of that name."""
        from hyperlex.agent.store import export_document

        if self.store is not None:
            scoped = self.store.for_tenant(tenant)
            if scoped.has_session(name):
                return export_document(scoped.session(name))
        elif (tenant, name) in self.conversations:
            controller = self.conversations[(tenant, name)].controller
            return {"format": "hyperlex-session", "session": {"name": name, "tenant": tenant},
                    "turns": [t.as_dict() for t in controller.turns],
                    "scene": controller.scene.to_dict(), "scene_version": controller.scene.version}
        raise ApiError(404, f"no conversation {name!r}", "conversation", "not_found")


def conversation_name(header: str | None, user: str | None) -> str | None:
    """The conversation a request belongs to: the header, used as the session name (so it
    must be a valid one), else the ``user`` field, used as it is when it is a valid session
    name and as ``user-<hash>`` when it is not (an e-mail address, say)."""
    from hyperlex.agent.store import check_name

    if header:
        try:
            return check_name(header)
        except HyperlexError:
            raise bad_request(f"conversation id {header!r}: use 1-64 letters, digits, '-', "
                              "'_' or '.'", CONVERSATION_HEADER) from None
    if not user:
        return None
    try:
        return check_name(user)
    except HyperlexError:
        return "user-" + hashlib.sha256(user.encode()).hexdigest()[:16]
