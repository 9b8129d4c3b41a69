"""The one prompt builder: the chat messages a persona answers to.

Chat, the server, LangChain, training, distillation and every evaluation build a persona's
prompt here, so a persona is trained and evaluated on exactly the prompts it gets in a
conversation. The scene in the system message is cut to the contract's ``scene_budget``
counted with the real tokenizer (any :class:`TokenCounter`: an engine, or
:class:`ChatTemplateCounter` over a transformers tokenizer when training), and the history is
cut, oldest exchange first, until the prompt and the reply fit the context window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hyperlex.generation import Message

if TYPE_CHECKING:
    from hyperlex.persona.bundle import Persona
    from hyperlex.scene.model import Scene


class TokenCounter(Protocol):
    """What the builder needs of a tokenizer: every engine is one."""

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens ``messages`` take through the chat template (generation prompt
        included)."""
        ...


class ChatTemplateCounter:
    """A :class:`TokenCounter` over a transformers tokenizer (training has no engine)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def count_tokens(self, messages: Sequence[Message]) -> int:
        encoded = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
        return len(encoded["input_ids"])


def text_tokens(counter: TokenCounter) -> Callable[[str], int]:
    """A function counting the tokens of a piece of text as it stands inside a message: the
    difference it makes to a one-message prompt (so the template's own tokens, and any
    default system prompt it adds, are not counted)."""
    empty: list[int] = []

    def count(text: str) -> int:
        if not empty:
            empty.append(counter.count_tokens([{"role": "user", "content": ""}]))
        return max(0, counter.count_tokens([{"role": "user", "content": text}]) - empty[0])

    return count


def system_message(persona: Persona, scene: Scene | None = None,
                   counter: TokenCounter | None = None, mood: Persona | None = None,
                   extra: Sequence[str] = ()) -> str:
    """The persona's contract with the scene; a prompt-only ``mood`` adds its own contract,
    and each text of ``extra`` (instructions, a client's system messages) follows after a
    blank line. Without ``counter`` the scene budget is estimated (4 characters a token);
    every caller that has a tokenizer passes one."""
    count = text_tokens(counter) if counter is not None else None
    text = persona.contract.render(persona, scene, count)
    if mood is not None and mood.adapter_dir is None:  # a prompt-only mood speaks in words
        text += "\n" + mood.contract.render(mood, scene, count)
    return "\n\n".join([text, *(e for e in extra if e)])


def build_prompt(persona: Persona, message: str, *, scene: Scene | None = None,
                 history: Sequence[Message] = (), counter: TokenCounter | None = None,
                 mood: Persona | None = None, extra: Sequence[str] = (),
                 context_length: int | None = None, reserve: int = 0) -> list[Message]:
    """System message, history, then the user's ``message``. With ``context_length``, the
    oldest exchanges of ``history`` are dropped until the prompt plus ``reserve`` reply
    tokens fit (the newest message always stays)."""
    system: Message = {"role": "system",
                       "content": system_message(persona, scene, counter, mood, extra)}
    user: Message = {"role": "user", "content": message}
    kept = list(history)
    while True:
        messages = [system, *kept, user]
        if context_length is None or counter is None or not kept:
            return messages
        if counter.count_tokens(messages) + reserve <= context_length:
            return messages
        kept = kept[2:]


def example_prompt(persona: Persona | None, example: Any,
                   counter: TokenCounter | None) -> list[Message]:
    """The prompt of a training or evaluation record (its ``scene``, ``history`` and
    ``human`` message), exactly as a conversation would build it; ``persona`` None: the bare
    base with no system message."""
    if persona is None:
        return [*example.history, {"role": "user", "content": example.human}]
    if getattr(example, "speaks_scene", False):
        return scene_prompt(persona, example.scene, counter)
    return build_prompt(persona, example.human, scene=example.scene, history=example.history,
                        counter=counter)


# speaking a scene --------------------------------------------------------------------------

SAY_SCENE = ("Describe this scene in your own voice, keeping every fact (NOT marks a negated "
             "relation):\n{facts}")
"""The user message that asks a persona to speak a scene (``agent scene say``, the round
trip, the scene-writer's and the self-distilled training records)."""
FULL_SCENE_BUDGET = 1_000_000
"""The scene budget when a scene is spoken: large enough that nothing is cut."""


def scene_facts(scene: Scene) -> str:
    """The scene as :data:`SAY_SCENE` states it: ``Scene.render("all")`` (hyperlexemes with
    their attributes, then one ``src [NOT ]rel dst`` line per link), then the associations."""
    lines = [scene.render("all")]
    associations = [f"{hx.label}: {', '.join(hx.associations)}"
                    for hid in scene.ranked() if (hx := scene.hyperlexemes[hid]).associations]
    if associations:
        lines.append("Associations: " + "; ".join(associations))
    return "\n".join(line for line in lines if line)


def say_scene_message(scene: Scene) -> str:
    """:data:`SAY_SCENE` with ``scene``'s facts."""
    return SAY_SCENE.format(facts=scene_facts(scene))


def whole_scene(persona: Persona) -> Persona:
    """``persona`` with a contract that shows the whole scene (``scene_view`` all, no budget):
    what it is given when asked to speak a scene, whatever its own view and budget."""
    contract = dataclasses.replace(persona.contract, scene_view="all",
                                   scene_budget=FULL_SCENE_BUDGET)
    return dataclasses.replace(persona, contract=contract)


def scene_prompt(persona: Persona, scene: Scene,
                 counter: TokenCounter | None = None) -> list[Message]:
    """The chat a persona answers to speak ``scene``: its contract's system message with the
    whole scene, then :func:`say_scene_message`."""
    return build_prompt(whole_scene(persona), say_scene_message(scene), scene=scene,
                        counter=counter)


def unguided_prompt(persona: Persona, counter: TokenCounter | None = None) -> list[Message]:
    """:func:`scene_prompt` for an empty scene: the negative prompt of scene guidance, which
    amplifies what the scene's facts add to the persona's next word."""
    from hyperlex.scene.model import Scene

    return scene_prompt(persona, Scene(), counter)
