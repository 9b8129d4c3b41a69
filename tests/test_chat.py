"""The controller and the chat loop on the tiny model: routing, hooks, cancel, history."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperlex import hookimpl
from hyperlex.chat import ChatLoop
from hyperlex.controller import Controller
from hyperlex.host import Host


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path]):
    from hyperlex.engine_torch import TorchEngine
    from hyperlex.persona import Persona

    return TorchEngine([Persona.from_dir(p) for p in tiny_bundles.values()], base=str(tiny_base))


class Recorder:
    def __init__(self) -> None:
        self.turns = []

    @hookimpl
    def on_turn(self, turn, scene):
        turn.annotations["seen_by"] = "recorder"
        self.turns.append(turn)


def make_controller(engine, *plugins, persona=None, **overrides) -> Controller:
    host = Host(extra_plugins={f"p{i}": p for i, p in enumerate(plugins)}, entry_points=False)
    return Controller(host, engine, persona=persona, overrides={"max_new_tokens": 6, **overrides})


def test_finished_turns_are_recorded_and_shown_to_on_turn_hooks(engine) -> None:
    recorder = Recorder()
    controller = make_controller(engine, recorder, persona="alpha")
    turn = controller.send("hello").complete()
    assert recorder.turns == [turn] and turn.annotations == {"seen_by": "recorder"}
    assert controller.history == [{"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": turn.reply}]
    assert turn.completion_tokens > 0 and turn.seconds > 0


def test_route_turn_hook_decides_when_nothing_is_pinned(engine) -> None:
    class ToBeta:
        @hookimpl
        def route_turn(self, message, scene, personas, current):
            return "beta" if "b-topic" in message else None

    controller = make_controller(engine, ToBeta())
    first = controller.send("a b-topic question").complete()
    assert (first.persona, first.reason) == ("beta", "route_turn hook of plugin 'p0'")
    controller.pin("alpha")
    assert controller.send("another b-topic question").complete().persona == "alpha"


def test_default_persona_when_no_one_is_chosen(engine) -> None:
    turn = make_controller(engine).send("hi").complete()
    assert (turn.persona, turn.reason) == ("alpha", "default persona")


def test_cancelled_reply_leaves_the_conversation_unchanged(engine) -> None:
    recorder = Recorder()
    controller = make_controller(engine, recorder, persona="beta", max_new_tokens=50)
    stream = controller.send("tell me everything")
    for _ in stream:
        stream.cancel()
    assert stream.turn.finish_reason == "cancelled"
    assert controller.history == [] and controller.turns == [] and recorder.turns == []
    assert controller.send("still there?").complete().reply is not None
    assert len(controller.history) == 2


def test_long_history_is_trimmed_to_fit_the_context(engine) -> None:
    controller = make_controller(engine, persona="alpha")
    controller.history = [{"role": role, "content": "word " * 60}
                          for _ in range(20) for role in ("user", "assistant")]
    turn = controller.send("short question").complete()
    assert turn.prompt_tokens + 6 <= engine.context_length


def test_ctrl_c_during_a_reply_cancels_it_and_the_chat_goes_on(engine, monkeypatch,
                                                                capsys) -> None:
    import hyperlex.chat as chat_module

    controller = make_controller(engine, persona="alpha", max_new_tokens=40)
    real_echo = chat_module.click.echo
    interrupted = []

    def echo(message=None, nl=True, err=False, **kwargs):
        if not err and not nl and not interrupted:  # the first streamed piece
            interrupted.append(message)
            raise KeyboardInterrupt
        real_echo(message, nl=nl, err=err, **kwargs)

    monkeypatch.setattr(chat_module.click, "echo", echo)
    loop = ChatLoop(controller)
    loop.piped(["a long story please\n", "and now a short one\n"])
    assert interrupted
    assert "(reply cancelled)" in capsys.readouterr().err
    assert [t.user for t in controller.turns] == ["and now a short one"]
