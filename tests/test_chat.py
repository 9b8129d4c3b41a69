"""The controller and the chat loop on the tiny model: routing, hooks, cancel, history."""

from __future__ import annotations

import pytest

from hyperlex import hookimpl
from hyperlex.agent.controller import Controller
from hyperlex.cli.repl import ChatLoop
from hyperlex.host import Host


class Recorder:
    def __init__(self) -> None:
        self.turns = []

    @hookimpl
    def on_turn(self, turn, scene):
        turn.annotations["seen_by"] = "recorder"
        self.turns.append(turn)


def make_controller(engine, *plugins, persona=None, store=None, session=None,
                    **overrides) -> Controller:
    host = Host(extra_plugins={f"p{i}": p for i, p in enumerate(plugins)}, entry_points=False)
    return Controller(host, engine, persona=persona, overrides={"max_new_tokens": 6, **overrides},
                      store=store, session=session)


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
    import hyperlex.cli.repl as chat_module

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


class WordEncoder:
    """A tiny input adapter for the tiny model's gibberish: every word of five letters or more
    is a concept; "X not Y" is a negated link."""

    @hookimpl
    def register_scene_encoders(self, register):
        register("default", self.encode)

    @staticmethod
    def encode(text: str):
        import re

        from hyperlex.scene.model import Delta, Hyperlexeme, Link

        words = list(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z]{5,}", text)))
        ids = {w: f"h{i}" for i, w in enumerate(words)}
        links = [Link(ids[a.lower()], "is", ids[b.lower()], -1)
                 for a, b in re.findall(r"([A-Za-z]{5,}) not ([A-Za-z]{5,})", text)]
        return Delta([Hyperlexeme(ids[w], w) for w in words], links)


def labels(controller) -> set[str]:
    return {h.label for h in controller.scene.hyperlexemes.values()}


def test_personas_share_one_scene_across_a_handoff(engine) -> None:
    controller = make_controller(engine, WordEncoder())
    first = controller.send("@alpha harbour lighthouse not tempest").complete()
    assert {"harbour", "lighthouse", "tempest"} <= labels(controller)
    assert first.scene_version == controller.scene.version == 2  # the message, then the reply
    link = controller.scene.links[0]
    assert (link.rel, link.polarity) == ("is", -1)
    # beta takes over and its prompt carries what was established under alpha
    assert "harbour" in controller.system_message("beta")
    second = controller.send("@beta and the gulls?").complete()
    assert second.persona == "beta" and {"harbour", "gulls"} <= labels(controller)
    assert controller.scene.version == 4


def test_a_cancelled_turn_leaves_the_scene_as_it_was(engine) -> None:
    controller = make_controller(engine, WordEncoder(), persona="beta", max_new_tokens=50)
    controller.send("remember the orchard").complete()
    before = controller.scene.to_json()
    stream = controller.send("forget everything about lanterns")
    for _ in stream:
        stream.cancel()
    assert controller.scene.to_json() == before


def test_a_failing_encoder_is_reported_and_the_turn_goes_on(engine) -> None:
    class Broken:
        @hookimpl
        def register_scene_encoders(self, register):
            register("default", lambda text: 1 / 0)

    controller = make_controller(engine, Broken(), persona="alpha")
    assert controller.send("hello there").complete().reply is not None
    assert controller.scene.empty
    assert "scene encoder 'default' failed: ZeroDivisionError" in controller.host.failures[-1]


def test_turns_scene_and_routing_are_stored_and_a_session_resumes(engine, tmp_path) -> None:
    from hyperlex.agent.store import Store

    store = Store(tmp_path / "hyperlex.db")
    controller = make_controller(engine, WordEncoder(), store=store, session="walk")
    controller.send("@beta meadow river").complete()
    controller.send("and the willows").complete()
    record = store.session("walk")
    assert [(t["index"], t["persona"]) for t in record.turns] == [(0, "beta"), (1, "beta")]
    assert record.turns[0]["reason"] == "addressed as @beta"
    assert record.turns[0]["route"]["source"] == "address"
    assert record.turns[1]["usage"]["completion_tokens"] > 0

    resumed = make_controller(engine, WordEncoder(), store=Store(tmp_path / "hyperlex.db"),
                              session="walk")
    assert resumed.scene.to_json() == controller.scene.to_json()
    assert resumed.history == controller.history and resumed.current == "beta"
    assert resumed.first_index == 2
    assert resumed.send("more about the meadow").complete().index == 2
    assert len(store.session("walk").turns) == 3


def test_pinned_persona_and_mood_are_part_of_the_session(engine, tmp_path) -> None:
    from hyperlex.agent.store import Store

    controller = make_controller(engine, store=Store(tmp_path / "db"), session="s")
    controller.pin("alpha")
    resumed = make_controller(engine, store=Store(tmp_path / "db"), session="s")
    assert resumed.pinned == "alpha"
    assert make_controller(engine, persona="auto", store=Store(tmp_path / "db"),
                           session="s").pinned is None  # an explicit auto routes again
    assert Store(tmp_path / "db").session("s").info.persona is None
    make_controller(engine, persona="alpha", store=Store(tmp_path / "db"), session="s")
    assert make_controller(engine, persona="beta", store=Store(tmp_path / "db"),
                           session="s").pinned == "beta"
    assert Store(tmp_path / "db").session("s").info.persona == "beta"
    make_controller(engine, store=Store(tmp_path / "db"), session="s").pin(None)
    assert make_controller(engine, store=Store(tmp_path / "db"), session="s").pinned is None


def test_a_session_is_opened_with_one_write(engine, tmp_path, monkeypatch) -> None:
    from hyperlex.agent.store import Store

    store = Store(tmp_path / "db")
    writes = []
    transaction = store.transaction

    def counted(write: bool = True):
        writes.append(write)
        return transaction(write)

    monkeypatch.setattr(store, "transaction", counted)
    created = make_controller(engine, persona="alpha", store=store)  # a new, generated name
    assert writes.count(True) == 1 and created.session is not None
    assert store.session(created.session).info.persona == "alpha"
    writes.clear()
    make_controller(engine, persona="alpha", store=store, session=created.session)
    assert writes.count(True) == 1  # resumed as saved: nothing to change


def test_unknown_mood_is_a_clear_error(engine) -> None:
    from hyperlex.errors import HyperlexError

    controller = make_controller(engine)
    with pytest.raises(HyperlexError, match="unknown mood 'gloomy'; installed moods: none"):
        controller.set_mood("gloomy")


def test_slash_commands_show_the_scene_the_routing_and_the_mood(engine, capsys) -> None:
    controller = make_controller(engine, WordEncoder(), persona="alpha")
    loop = ChatLoop(controller)
    loop.piped(["/why\n", "orchard blossom not winter\n", "/why\n", "/scene\n",
                "/scene tree\n", "/scene json\n", "/scene sideways\n", "/mood\n",
                "/mood gloomy\n", "/session\n"])
    out, err = capsys.readouterr()
    assert "no turn yet" in err and "alpha: pinned to alpha" in err
    assert "orchard" in out and "blossom NOT is winter" in out  # the table's links
    assert "└─ NOT is → winter" in out  # the tree
    assert '"hyperlexemes":[' in out  # canonical JSON
    assert "/scene sideways: choose table, tree or json" in err
    assert "mood: off (available: none installed)" in err
    assert "unknown mood 'gloomy'" in err
    assert "session: not saved (--no-store)" in err


def test_a_persona_and_mood_can_be_chosen_for_one_turn(engine) -> None:
    from hyperlex.errors import HyperlexError, UnknownPersona

    controller = make_controller(engine, persona="alpha")
    once = controller.send("hi", persona="beta").complete()
    assert (once.persona, once.route["source"]) == ("beta", "pinned")
    assert controller.pinned == "alpha" and controller.send("hi").complete().persona == "alpha"
    assert controller.send("@beta hi", persona="auto").complete().persona == "beta"
    with pytest.raises(UnknownPersona, match="unknown persona 'nobody'"):
        controller.send("x", persona="nobody")
    with pytest.raises(HyperlexError, match="unknown mood 'gloomy'"):
        controller.send("x", mood="gloomy")


FOLLOW_UPS = ("And then?", "Tell me more.", "What else?")


class ScriptedReader:
    """Reads the user's first message as "fisherman NOT trust sea" and every reply as new
    inventions that also claim the fisherman trusts the sea (what a careless reply does)."""

    @hookimpl
    def register_scene_encoders(self, register):
        def read(text):
            from hyperlex.scene.model import Delta, Hyperlexeme, Link

            def unit(hid, label):
                return Hyperlexeme(id=hid, label=label, kind="entity")

            if text.startswith("The old fisherman"):
                return Delta([unit("f", "fisherman"), unit("s", "sea")],
                             [Link("f", "trust", "s", -1)])
            if text in FOLLOW_UPS:
                return Delta()
            n = len(text)
            return Delta([unit("f", "fisherman"), unit("s", "sea"), unit("a", f"boat {n}"),
                          unit("b", f"listener {n}"), unit("c", f"salt {n}")],
                         [Link("f", "trust", "s", 1), Link("a", "carry", "b")])

        register("default", read)


def test_after_three_persona_turns_the_users_negated_fact_leads_the_scene(engine) -> None:
    controller = make_controller(engine, ScriptedReader(), persona="alpha")
    controller.send("The old fisherman does not trust the sea.").complete()
    for question in FOLLOW_UPS:
        controller.send(question).complete()
    scene = controller.scene
    assert {"fisherman", "sea"} <= set(scene.focus[:2])
    first, negation = scene.render("focus").split("\n")[:2]
    assert first.split("; ")[:2] in (["fisherman", "sea"], ["sea", "fisherman"])
    assert negation == "fisherman NOT trust sea"
    assert "(by alpha)" in scene.render("all")
    assert "fisherman NOT trust sea" in controller.system_message("alpha")
