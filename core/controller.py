"""The meta-controller: decides who speaks each turn, builds the prompt and records the turn.

Routing order: a pinned persona (``--persona``, ``/persona NAME``), an ``@name`` address at the
start of the message, a plugin's ``route_turn`` answer, the persona of the previous turn, then
the default persona. Every decision carries its reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hyperlex.engine import Engine, Generation, Message
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.generation import GenerationParams
from hyperlex.host import Host
from hyperlex.scene import Scene

DEFAULT_PERSONA = "philosopher"
_ADDRESS = re.compile(r"^@([a-z][a-z0-9_-]*)[\s,:]+(.*)$", re.DOTALL)


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
            "annotations": self.annotations,
        }


class Controller:
    def __init__(
        self,
        host: Host,
        engine: Engine,
        persona: str | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        self.host = host
        self.engine = engine
        self.overrides = dict(overrides or {})
        self.scene = Scene()
        self.history: list[Message] = []
        self.turns: list[Turn] = []
        self.pinned: str | None = None
        self.current: str | None = None
        if persona is not None:
            self.pin(persona)

    @property
    def personas(self) -> list[str]:
        return sorted(self.engine.personas)

    def _check(self, name: str) -> str:
        if name in self.engine.personas:
            return name
        if name in self.engine.skipped:
            raise HyperlexError(self.engine.skipped[name])
        raise UnknownPersona(name, self.personas)

    def pin(self, name: str | None) -> None:
        """Make ``name`` answer every turn until unpinned (``None``: route automatically)."""
        self.pinned = None if name is None else self._check(name)
        if name is not None:
            self.current = self.pinned

    def route(self, message: str) -> tuple[str, str, str]:
        """Choose who answers: (persona, reason, message with any @address removed)."""
        if self.pinned:
            return self.pinned, "pinned persona", message
        match = _ADDRESS.match(message.strip())
        if match and match.group(1) in self.engine.personas:
            return match.group(1), f"addressed as @{match.group(1)}", match.group(2).strip()
        chosen = self.host.route_turn(message, self.scene, self.personas, self.current)
        if chosen:
            return chosen[0], f"route_turn hook of plugin {chosen[1]!r}", message
        if self.current:
            return self.current, "continuing with the current persona", message
        if not self.personas:
            raise HyperlexError("no personas are installed")
        default = DEFAULT_PERSONA if DEFAULT_PERSONA in self.personas else self.personas[0]
        return default, "default persona", message

    def params_for(self, persona: str) -> GenerationParams:
        return self.engine.personas[persona].contract.params().updated(self.overrides, "-o")

    def _prompt(self, persona: str, message: str, params: GenerationParams) -> list[Message]:
        """System message + as much recent history as fits the context window + the message."""
        system = {
            "role": "system",
            "content": self.engine.personas[persona].system_message(self.scene),
        }
        user = {"role": "user", "content": message}
        history = list(self.history)
        while True:
            messages = [system, *history, user]
            fits = (
                self.engine.count_tokens(messages) + params.max_new_tokens
                <= self.engine.context_length
            )
            if fits or not history:
                return messages
            history = history[2:]

    def send(self, message: str) -> TurnStream:
        """Start a turn. Iterate the result for the streamed reply; the turn is recorded
        (and ``on_turn`` hooks run) when the reply finishes, unless it was cancelled."""
        persona, reason, text = self.route(message)
        self.current = persona
        params = self.params_for(persona)
        turn = Turn(index=len(self.turns), user=text, persona=persona, reason=reason)
        generation = self.engine.stream(self._prompt(persona, text, params), persona, params)
        return TurnStream(self, turn, generation)

    def _record(self, turn: Turn) -> None:
        self.history += [
            {"role": "user", "content": turn.user},
            {"role": "assistant", "content": turn.reply},
        ]
        self.turns.append(turn)
        self.host.on_turn(turn, self.scene)


class TurnStream:
    def __init__(self, controller: Controller, turn: Turn, generation: Generation):
        self.controller = controller
        self.turn = turn
        self.generation = generation

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        yield from self.generation
        gen, turn = self.generation, self.turn
        turn.reply = gen.text.strip()
        turn.finish_reason = gen.finish_reason
        turn.prompt_tokens = gen.usage.prompt_tokens
        turn.completion_tokens = gen.usage.completion_tokens
        turn.seconds = time.perf_counter() - start
        if gen.finish_reason != "cancelled":
            self.controller._record(turn)

    def cancel(self) -> None:
        self.generation.cancel()

    def complete(self) -> Turn:
        for _ in self:
            pass
        return self.turn
