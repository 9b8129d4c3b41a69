"""One prompt builder: for the same persona, scene and history, the prompt a persona is
trained on, the one it is evaluated on and the one it gets in a conversation (chat, the
server, LangChain's agent: all controllers) are the same tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hyperlex.scene.model import Delta, Hyperlexeme, Link, Scene

HISTORY = [{"role": "user", "content": "Who keeps the lighthouse?"},
           {"role": "assistant", "content": "An old keeper, they say."}]
MESSAGE = "Did the sailor see it?"


def busy_scene() -> Scene:
    """A scene larger than a small budget, so the budget cut (with the real tokenizer) shows."""
    units = [Hyperlexeme(id=label.replace(" ", "_"), label=label, kind="entity")
             for label in ("sailor", "lighthouse", "sea", "keeper", "storm", "harbour", "rope",
                           "gull", "lamp", "night")]
    links = [Link(src="sailor", rel="see", dst="lighthouse", polarity=-1),
             Link(src="keeper", rel="light", dst="lamp"), Link(src="storm", rel="hit", dst="sea")]
    return Scene().apply(Delta(hyperlexemes=units, links=links), turn=1)


def three_prompts(engine, host, name: str, scene: Scene, history: list, message: str,
                  scene_budget: int | None = None) -> dict[str, list[int]]:
    """Token ids of ``name``'s prompt as training, evaluation and a conversation build it."""
    from hyperlex.agent.controller import Controller
    from hyperlex.eval.fidelity import persona_messages
    from hyperlex.training.data import Example
    from hyperlex.training.train import encode_example

    persona = engine.personas[name]
    if scene_budget is not None:
        persona = dataclasses.replace(
            persona, contract=dataclasses.replace(persona.contract, scene_budget=scene_budget))
        engine.personas[name] = persona
    example = Example(human=message, text="A reply.", history=list(history), scene=scene)
    ids, labels = encode_example(engine.tokenizer, persona, example, max_length=100_000)
    training = ids[:labels.count(-100)]
    evaluation = engine.encode(persona_messages(persona, example, engine))["input_ids"][0]
    controller = Controller(host, engine, persona=name, router=None)
    controller.scene, controller.history = scene, list(history)
    chat = engine.encode(controller.prompt(name, message))["input_ids"][0]
    return {"training": training, "evaluation": evaluation.tolist(), "chat": chat.tolist()}


def test_training_evaluation_and_chat_prompts_are_the_same_tokens(tiny_base: Path,
                                                                   tiny_bundles) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.host import Host
    from hyperlex.persona.bundle import Persona

    engine = TorchEngine([Persona.from_dir(tiny_bundles["alpha"])], base=str(tiny_base),
                         progress=False)
    prompts = three_prompts(engine, Host(), "alpha", busy_scene(), HISTORY, MESSAGE,
                            scene_budget=12)
    assert prompts["training"] == prompts["evaluation"] == prompts["chat"]
    text = engine.tokenizer.decode(prompts["chat"])
    assert "sailor" in text and "night" not in text  # the budget cut the least salient part
    assert HISTORY[0]["content"] in text and text.count(MESSAGE) == 1


def test_the_scene_budget_is_counted_with_the_tokenizer(tiny_base: Path, tiny_bundles) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona
    from hyperlex.persona.prompt import system_message, text_tokens

    engine = TorchEngine([Persona.from_dir(tiny_bundles["alpha"])], base=str(tiny_base),
                         progress=False)
    persona = engine.personas["alpha"]
    budget = 10
    narrow = dataclasses.replace(
        persona, contract=dataclasses.replace(persona.contract, scene_budget=budget))
    shown = system_message(narrow, busy_scene(), engine).split("Scene: ", 1)[1].split("\nStyle")[0]
    count = text_tokens(engine)
    assert 0 < count(shown) <= budget
    assert count(busy_scene().render("focus")) > budget
