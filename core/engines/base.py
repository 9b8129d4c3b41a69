"""The engine interface: one base model, many persona adapters, streamed generation.

Backends (torch, llama.cpp and OpenAI-compatible servers) implement
:class:`Engine`. Callers pass complete chat messages (the persona's system message already
rendered) and the persona whose adapter should be active; ``None`` means the bare base.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hyperlex.errors import HyperlexError, PersonaNotAvailable, UnknownPersona
from hyperlex.generation import (
    Completion,
    Generation,
    GenerationParams,
    Guidance,
    Layers,
    Message,
)

if TYPE_CHECKING:
    from hyperlex.persona.bundle import Persona
    from hyperlex.structured import ResponseFormat

class Engine(ABC):
    """A base model with persona adapters attached under their names."""

    base_name: str
    personas: dict[str, Persona]
    # the layers composable over a speaker: every mood, and each persona with ``layer: true``
    moods: dict[str, Persona]
    skipped: dict[str, str]  # persona name -> why its adapter was not attached

    def _register(self, persona: Persona) -> None:
        """File ``persona`` as a speaker, as a layer, or (``layer: true``) as both."""
        if not persona.is_mood:
            self.personas[persona.name] = persona
        if persona.is_layer:
            self.moods[persona.name] = persona

    def _unregister(self, name: str) -> None:
        self.personas.pop(name, None)
        self.moods.pop(name, None)

    def _adapter_wanted(self, persona: Persona, check_base: bool) -> bool:
        """Whether ``persona``'s adapter should be attached. A prompt-only persona is
        registered here, one trained on another base is skipped with the reason."""
        if persona.adapter_dir is None:  # a prompt-only persona runs on the bare base
            self._register(persona)
            return False
        if check_base and persona.base_model.lower() != self.base_name:
            self.skipped[persona.name] = (
                f"persona {persona.name!r} was trained on base {persona.base_model!r}, but the "
                f"loaded base is {self.base_name!r}")
            return False
        return True

    def persona(self, name: str, moods: bool = False) -> Persona:
        """The bundle of speaking persona ``name`` (or of a mood, with ``moods``): the one
        check, with the one message, that every entry point (chat, server, LangChain,
        evaluation, inspection) makes. :class:`UnknownPersona`, or
        :class:`PersonaNotAvailable` with the reason it was skipped."""
        if name in self.personas:
            return self.personas[name]
        if moods and name in self.moods:
            return self.moods[name]
        if name in self.skipped:
            raise PersonaNotAvailable(self.skipped[name])
        raise UnknownPersona(name, list(self.personas) + (list(self.moods) if moods else []))

    def check_request(self, persona: str | None, layers: Layers = ()) -> None:
        """Refuse a persona (None: the bare base) or a layer in ``layers`` this engine lacks,
        and a persona composed over itself."""
        if persona is not None:
            self.persona(persona)
        for name, _ in layers:
            if name not in self.moods:
                raise UnknownPersona(name, list(self.moods), kind="mood")
            if name == persona:
                raise HyperlexError(f"{name!r} is already speaking; compose it over another "
                                    "persona, or let it speak alone")

    @abstractmethod
    def stream(
        self,
        messages: Sequence[Message],
        persona: str | None,
        params: GenerationParams | None = None,
        stop: Sequence[str] = (),
        layers: Layers = (),
        response_format: ResponseFormat | None = None,
    ) -> Generation:
        """Start generating a reply to ``messages`` with ``persona``'s adapter active and each
        mood adapter in ``layers`` added on top at its weight; with ``response_format``, every
        token is chosen inside its grammar, so a reply that ends (not cut by the token limit
        or a stop string) is JSON matching the schema."""

    def generate(
        self,
        messages: Sequence[Message],
        persona: str | None,
        params: GenerationParams | None = None,
        stop: Sequence[str] = (),
        layers: Layers = (),
        response_format: ResponseFormat | None = None,
    ) -> Completion:
        return self.stream(messages, persona, params, stop, layers,
                           response_format=response_format).complete()

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], str | None]],
                       params: GenerationParams | None = None,
                       layers: Layers = (),
                       response_format: ResponseFormat | None = None,
                       guidance: Guidance | None = None) -> list[Completion]:
        """Replies to several (messages, persona) requests, each with the mood ``layers`` (and
        the ``response_format``); backends that can run different personas in one batch
        override this. The default runs them one after another. ``guidance`` (scene
        guidance, a negative prompt per request) is the torch engine's: any other refuses a
        weight above 0."""
        if guidance is not None and guidance.weight > 0:
            raise HyperlexError("scene guidance runs on the torch engine only, not on "
                                f"{type(self).__name__}: use --engine torch")
        return [self.generate(messages, persona, params, layers=layers,
                              response_format=response_format)
                for messages, persona in requests]

    def prefill(self, messages: Sequence[Message], persona: str | None,  # noqa: B027
                layers: Layers = ()) -> None:
        """Compute, ahead of the turn, what a backend with a prompt cache can keep for a prompt
        that will start with ``messages`` (no generation prompt). The default does nothing."""

    @abstractmethod
    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens ``messages`` take once rendered through the chat template."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The longest prompt plus reply the base model accepts, in tokens."""
