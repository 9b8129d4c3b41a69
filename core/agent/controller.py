"""The meta-controller: decides who speaks each turn, keeps the scene and records the turn.

Routing is :class:`hyperlex.agent.router.TurnRouter`'s (explicit choices, requests in words, the
``route_turn`` hook, the automatic router). Per turn the user's message is encoded into the
scene before the persona speaks (so the prompt shows it) and the reply is encoded after; all
personas read and write that one scene. With a store, each finished turn and the scene it
left are saved in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from hyperlex.agent.moods import mood_label, parse_mood
from hyperlex.agent.router import DEFAULT_ROUTER, RouteDecision, TurnRouter
from hyperlex.agent.verify import (
    BestOfGeneration,
    ReplyCheck,
    ReplyProblem,
    VoiceScore,
    check_best_of,
    check_reply,
    sample_params,
)
from hyperlex.engines.base import Engine
from hyperlex.errors import ContextTooLong, HyperlexError
from hyperlex.generation import Generation, GenerationParams, Message
from hyperlex.host import Host
from hyperlex.persona.prompt import build_prompt, system_message
from hyperlex.scene.model import USER, Delta, Scene

T = TypeVar("T")

if TYPE_CHECKING:
    from hyperlex.agent.store import Store
    from hyperlex.persona.bundle import Persona
    from hyperlex.structured import ResponseFormat


@dataclass
class Turn:
    """One finished (or running) exchange: who answered, why, and what it cost."""

    index: int
    user: str
    persona: str
    reason: str
    reply: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    route: dict[str, Any] = field(default_factory=dict)
    mood: str | None = None
    scene_version: int | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "persona": self.persona,
            "reason": self.reason,
            "user": self.user,
            "reply": self.reply,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "seconds": round(self.seconds, 3),
            "route": self.route,
            "mood": self.mood,
            "scene_version": self.scene_version,
            "annotations": self.annotations,
        }


class Controller:
    def __init__(
        self,
        host: Host,
        engine: Engine,
        persona: str | None = None,
        overrides: dict[str, Any] | None = None,
        *,
        router: str | None = DEFAULT_ROUTER,
        mood: str | None = None,
        store: Store | None = None,
        session: str | None = None,
        best_of: int = 1,
        voice: VoiceScore | None = None,
        reply_problem: ReplyProblem | None = None,
    ):
        """``persona`` pins a persona ("auto": route; None: route, or keep the persona a resumed
        session had pinned). ``router`` names a registered router (None: no automatic
        routing). With ``store`` the conversation is saved turn by turn as ``session`` (None:
        a new session with a generated name, then in ``self.session``); an existing session
        resumes with its history, scene, pinned persona and mood. A named session that does
        not exist yet is created with the first thing worth saving (a turn, a pinned persona
        or mood), so a conversation that never got a turn leaves no empty session.

        ``best_of`` > 1 samples that many replies per turn and keeps the one that agrees
        best with the user's facts (:mod:`hyperlex.agent.verify`), ranking by ``voice``
        (the probability that a text is a persona's) among equals, and below the others a
        sample in which ``reply_problem`` finds something wrong (a command that does not
        exist)."""
        self.host = host
        self.engine = engine
        self.overrides = dict(overrides or {})
        self.best_of = check_best_of(best_of)
        self.voice = voice
        self.reply_problem = reply_problem
        self.scene = Scene()
        self.history: list[Message] = []
        self.turns: list[Turn] = []
        self.first_index = 0  # turns a resumed session already had
        self.pinned: str | None = None
        self.current: str | None = None
        self.mood: tuple[str, float] | None = None
        self.last_decision: RouteDecision | None = None
        self.store = store
        self.session = session
        self._session_exists = False
        self.turn_router = TurnRouter(host, engine.personas, router)
        if persona is not None:
            self.pinned = None if persona == "auto" else self._check(persona)
            self.current = self.pinned
        if mood is not None:
            self.mood = parse_mood(self.engine.moods, mood)
        if store is not None:
            self._open_session(persona, mood)

    # state -----------------------------------------------------------------------------------

    @property
    def personas(self) -> list[str]:
        return sorted(self.engine.personas)

    @property
    def mood_label(self) -> str | None:
        return mood_label(self.mood)

    def _check(self, name: str) -> str:
        return self.engine.persona(name).name

    def pin(self, name: str | None) -> None:
        """Make ``name`` answer every turn until unpinned (``None``/"auto": route)."""
        self.pinned = None if name in (None, "auto") else self._check(name)
        if self.pinned is not None:
            self.current = self.pinned
        self._save_session_state()

    def set_mood(self, spec: str | None) -> None:
        """Compose a mood layer over every persona: ``NAME`` or ``NAME:WEIGHT`` (``None`` or
        "off": no mood)."""
        self.mood = parse_mood(self.engine.moods, spec)
        self._save_session_state()

    def _save_session_state(self) -> None:
        if self._ensure_session():
            self.store.update_session(self.session, persona=self.pinned, mood=self.mood_label)

    def _ensure_session(self) -> bool:
        """Create the session now if it is still to be created; False without a store."""
        if self.store is None or self.session is None:
            return False
        if not self._session_exists:
            self.store.open_session(self.session, persona=self.pinned, mood=self.mood_label)
            self._session_exists = True
        return True

    def _open_session(self, persona: str | None, mood: str | None) -> None:
        """Resume the session: its history and scene, and its persona and mood where none was
        asked for; an existing session whose saved persona or mood differs from the one asked
        for is updated (one write). A new generated name is created at once (the caller shows
        it); a new given name waits for :meth:`_ensure_session`."""
        assert self.store is not None
        self._session_exists = self.session is None or self.store.has_session(self.session)
        if not self._session_exists:
            return
        record = self.store.open_session(self.session, persona=self.pinned,
                                         mood=self.mood_label)
        self.session = record.info.name
        asked = {"persona": self.pinned} if persona is not None else {}
        if mood is not None:
            asked["mood"] = self.mood_label
        for saved in record.turns:
            self.history += [{"role": "user", "content": saved["user"]},
                             {"role": "assistant", "content": saved["reply"]}]
            self.current = saved["persona"] if saved["persona"] in self.engine.personas else None
        if self.pinned is not None:
            self.current = self.pinned
        self.first_index = len(record.turns)
        scene = record.latest_scene()
        if scene is not None:
            self.scene = Scene.from_json(scene)
        if persona is None and record.info.persona in self.engine.personas:
            self.pinned = self.current = record.info.persona
        if mood is None and record.info.mood:
            try:
                self.mood = parse_mood(self.engine.moods, record.info.mood)
            except HyperlexError as exc:
                self.host.report(f"session {self.session!r}: mood not restored: {exc}")
        changed = {k: v for k, v in asked.items() if getattr(record.info, k) != v}
        if changed:
            self.store.update_session(self.session, **changed)

    # routing ---------------------------------------------------------------------------------

    def route(self, message: str, persona: str | None = None) -> RouteDecision:
        """Choose who answers ``message`` (see :class:`hyperlex.agent.router.TurnRouter`);
        ``persona`` overrides the pinned persona for this decision ("auto": route)."""
        pinned = self.pinned if persona is None else (
            None if persona == "auto" else self._check(persona))
        return self.turn_router.decide(message, self.scene, self.current, pinned)

    # the scene -------------------------------------------------------------------------------

    def read(self, text: str, persona: str) -> Delta | None:
        """What ``text`` says, read by ``persona``'s scene encoder (None: no encoder, or it
        failed, which is reported)."""
        return self._read(text, persona, lambda delta: delta)

    def encode(self, text: str, persona: str, turn: int, speaker: str | None = None) -> None:
        """Merge what ``text`` says into the scene with ``persona``'s encoder, as said by
        ``speaker`` (:data:`~hyperlex.scene.model.USER` or the persona that spoke)."""
        scene = self._read(text, persona,
                           lambda delta: self.scene.apply(delta, turn=turn, speaker=speaker))
        if scene is not None:
            self.scene = scene

    def _read(self, text: str, persona: str, then: Callable[[Delta], T]) -> T | None:
        wanted = self.engine.personas[persona].scene_encoder
        encoders = self.host.scene_encoders
        encoder = encoders.get(wanted) or encoders.get("default")
        if encoder is None:
            return None
        try:
            return then(encoder(text))
        except Exception as exc:  # plugin code: report it and keep the conversation going
            self.host.report(f"scene encoder {wanted!r} failed: {type(exc).__name__}: {exc}")
            return None

    def check_replies(self, texts: list[str], persona: str, turn: int,
                      readings: dict[str, Delta | None] | None = None) -> list[ReplyCheck]:
        """How each of ``texts`` agrees with the user's facts in the scene, as ``turn``'s
        reply by ``persona`` (:func:`hyperlex.agent.verify.check_reply`). ``readings``, if
        given, gets each text's reading (by its stripped text), so that the chosen reply is
        not read again when it joins the scene."""
        voices = self.voice(texts, persona) if self.voice is not None else [None] * len(texts)
        checks = []
        for i, (text, voice) in enumerate(zip(texts, voices, strict=True)):
            reading = self.read(text, persona)
            if readings is not None:
                readings[text.strip()] = reading
            problem = self.reply_problem(text) if self.reply_problem is not None else None
            checks.append(check_reply(self.scene, turn, reading or Delta(), i, voice, problem))
        return checks

    # turns -----------------------------------------------------------------------------------

    def params_for(self, persona: str) -> GenerationParams:
        return self.engine.personas[persona].contract.params().updated(self.overrides, "-o")

    def _prompt_mood(self, mood: tuple[str, float] | None) -> Persona | None:
        return self.engine.moods[mood[0]] if mood is not None else None

    def system_message(self, persona: str, mood: tuple[str, float] | None = None) -> str:
        """The persona's contract with the scene; a prompt-only ``mood`` (default: the
        controller's) adds its own contract text."""
        return system_message(self.engine.personas[persona], self.scene, self.engine,
                              self._prompt_mood(mood or self.mood))

    def prompt(self, persona: str, message: str, params: GenerationParams | None = None,
               mood: tuple[str, float] | None = None, instructions: str | None = None
               ) -> list[Message]:
        """What ``persona`` gets for ``message`` now: the system message with the scene (+
        ``instructions``), as much recent history as fits the context window with room for
        the reply, and the message (:func:`hyperlex.persona.prompt.build_prompt`)."""
        params = params or self.params_for(persona)
        return build_prompt(self.engine.personas[persona], message, scene=self.scene,
                            history=self.history, counter=self.engine,
                            mood=self._prompt_mood(mood), extra=[instructions or ""],
                            context_length=self.engine.context_length,
                            reserve=params.max_new_tokens)

    def prefill(self) -> None:
        """Let the engine compute the next turn's prompt ahead, as far as it is known: the
        pinned (or current) persona's system message and the history. A cache-keeping engine
        (llama.cpp) then decodes only the scene's change and the new message."""
        persona = self.pinned or self.current
        if persona is None or persona not in self.engine.personas:
            return
        system = {"role": "system", "content": self.system_message(persona)}
        adapter_mood = self.mood and self.engine.moods[self.mood[0]].adapter_dir is not None
        self.engine.prefill([system, *self.history], persona,
                            [self.mood] if adapter_mood and self.mood else [])

    def send(self, message: str, *, persona: str | None = None, mood: str | None = None,
             options: Mapping[str, Any] | None = None, stop: Sequence[str] = (),
             instructions: str | None = None,
             response_format: ResponseFormat | None = None,
             best_of: int | None = None) -> TurnStream:
        """Start a turn. Iterate the result for the streamed reply; the turn is recorded
        (and ``on_turn`` hooks run) when the reply finishes, unless it was cancelled.

        ``persona`` and ``mood`` override the pinned persona ("auto": route) and the mood
        for this turn only; they are not saved with the session. ``options`` (generation
        options over the contract's and the controller's), ``stop`` strings and
        ``instructions`` (appended to the persona's system message) apply to this turn only:
        this is how a served request carries its own settings. With ``response_format`` the
        reply is decoded as JSON matching it, the system message says so (with the schema, as
        OpenAI's models are told), and the scene reads the reply's text as usual.
        ``best_of`` overrides the controller's for this turn."""
        best_of = self.best_of if best_of is None else check_best_of(best_of)
        if best_of > 1 and response_format is not None:
            raise HyperlexError("best_of ranks replies by what they say about the scene; it "
                                "cannot be combined with a response format")
        turn_mood = self.mood if mood is None else parse_mood(self.engine.moods, mood)
        decision = self.route(message, persona)
        self.last_decision = decision
        persona = decision.persona
        self.current = persona
        params = self.params_for(persona).updated(options or {}, "request")
        if best_of > 1 and params.greedy:
            raise HyperlexError(f"best_of {best_of} needs sampling: with temperature 0 every "
                                "sample is the same reply")
        index = self.first_index + len(self.turns)
        turn = Turn(index=index, user=decision.message, persona=persona, reason=decision.reason,
                    route=decision.as_dict(), mood=mood_label(turn_mood))
        scene_before = self.scene
        self.encode(decision.message, persona, index, speaker=USER)
        adapter_mood = turn_mood and self.engine.moods[turn_mood[0]].adapter_dir is not None
        layers = [turn_mood] if adapter_mood else []
        if response_format is not None:
            instructions = "\n\n".join(filter(None, [instructions, response_format.instruction]))
        messages = self.prompt(persona, decision.message, params, turn_mood, instructions)
        try:
            params = fit_reply(self.engine, messages, params)
        except ContextTooLong:
            self.scene = scene_before
            raise
        generation: Generation
        readings: dict[str, Delta | None] | None = None
        if best_of > 1:
            readings = {}
            generation = BestOfGeneration(
                persona, [lambda p=p: self.engine.stream(messages, persona, p, stop, layers)
                          for p in sample_params(params, best_of)],
                lambda texts: self.check_replies(texts, persona, index, readings))
        else:
            generation = self.engine.stream(messages, persona, params, stop, layers,
                                            response_format=response_format)
        return TurnStream(self, turn, generation, scene_before, readings)

    def _record(self, turn: Turn, readings: Mapping[str, Delta | None] | None = None) -> None:
        """Keep a finished turn: its reply joins the scene (read by the persona's encoder,
        unless ``readings`` has that text's reading already), the history and the store."""
        if readings is not None and turn.reply in readings:
            reading = readings[turn.reply]
            if reading is not None:
                self.scene = self.scene.apply(reading, turn=turn.index, speaker=turn.persona)
        else:
            self.encode(turn.reply, turn.persona, turn.index, speaker=turn.persona)
        turn.scene_version = self.scene.version
        self.history += [
            {"role": "user", "content": turn.user},
            {"role": "assistant", "content": turn.reply},
        ]
        self.turns.append(turn)
        self.host.on_turn(turn, self.scene)
        if self._ensure_session():
            self.store.record_turn(self.session, turn.as_dict(), self.scene.to_json(),
                                   self.scene.version)


def fit_reply(engine: Engine, messages: Sequence[Message],
              params: GenerationParams) -> GenerationParams:
    """``params`` with ``max_new_tokens`` cut to the room the context leaves after the prompt;
    :class:`ContextTooLong` when the prompt alone fills it."""
    prompt_tokens = engine.count_tokens(messages)
    room = engine.context_length - prompt_tokens
    if room < 1:
        raise ContextTooLong(prompt_tokens, engine.context_length)
    return params if params.max_new_tokens <= room else replace(params, max_new_tokens=room)


class TurnStream:
    def __init__(self, controller: Controller, turn: Turn, generation: Generation,
                 scene_before: Scene, readings: Mapping[str, Delta | None] | None = None):
        self.controller = controller
        self.turn = turn
        self.generation = generation
        self._scene_before = scene_before
        self._readings = readings

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        try:
            yield from self.generation
        finally:
            gen, turn = self.generation, self.turn
            turn.reply = gen.text.strip()
            turn.finish_reason = gen.finish_reason
            turn.prompt_tokens = gen.usage.prompt_tokens
            turn.completion_tokens = gen.usage.completion_tokens
            turn.seconds = time.perf_counter() - start
            if isinstance(gen, BestOfGeneration):
                turn.annotations["best_of"] = gen.report()
            if gen.finish_reason in ("stop", "length"):
                self.controller._record(turn, self._readings)
            else:  # cancelled or failed: the turn never happened
                self.controller.scene = self._scene_before

    def cancel(self) -> None:
        self.generation.cancel()

    def complete(self) -> Turn:
        for _ in self:
            pass
        return self.turn
