"""Best-of-n replies (agent chat --best-of): each sample is read back and the one that keeps
the user's facts wins; on the tiny model with a scripted reader, so which sample keeps
them is known."""

from __future__ import annotations

import pytest

from hyperlex import hookimpl
from hyperlex.agent.controller import Controller
from hyperlex.agent.verify import ReplyCheck, best, check_best_of, check_reply
from hyperlex.errors import HyperlexError
from hyperlex.host import Host
from hyperlex.scene.model import USER, Delta, Hyperlexeme, Link, Scene

STATEMENT = "The old fisherman does not trust the sea."


def unit(hid: str, label: str) -> Hyperlexeme:
    return Hyperlexeme(id=hid, label=label, kind="entity")


def said(polarity: int, rel: str = "trust") -> Delta:
    """A reading that says the fisherman (does not) ``rel`` the sea, with its own ids."""
    return Delta([unit("x", "fisherman"), unit("y", "sea")], [Link("x", rel, "y", polarity)])


def user_scene() -> Scene:
    scene = Scene().apply(said(-1), turn=0, speaker=USER)
    return scene.apply(Delta([unit("b", "boat"), unit("s", "sea")], [Link("b", "cross", "s")]),
                       turn=1, speaker="poet")


# the check ----------------------------------------------------------------------------------


def test_a_reply_that_restates_the_negation_keeps_it_and_one_without_it_flips_it() -> None:
    scene = user_scene()
    kept = check_reply(scene, 0, said(-1))
    assert (kept.facts, kept.facts_kept, kept.flipped) == (1, 1, 0)
    assert (kept.negations, kept.negations_kept) == (1, 1)
    flipped = check_reply(scene, 0, said(1))
    assert (flipped.facts_kept, flipped.flipped, flipped.negations_kept) == (0, 1, 0)
    silent = check_reply(scene, 0, Delta())
    assert (silent.facts_kept, silent.flipped, silent.negations_kept) == (0, 0, 0)


def test_a_relation_between_the_same_two_things_keeps_the_fact_as_the_round_trip_does() -> None:
    check = check_reply(user_scene(), 0, said(-1, rel="believe"))
    assert (check.facts_kept, check.negations_kept, check.flipped) == (1, 1, 0)


def test_only_the_users_links_are_facts_and_only_this_turns_negations_count() -> None:
    scene = user_scene()  # the poet's "boat cross sea" is an elaboration, not a fact
    contradicting_the_poet = Delta([unit("b", "boat"), unit("s", "sea")],
                                   [Link("b", "cross", "s", -1)])
    assert check_reply(scene, 0, contradicting_the_poet).flipped == 0
    later = check_reply(scene, 2, said(-1))  # answering a later turn: the fact still counts
    assert (later.negations, later.facts_kept) == (0, 1)


def test_the_ranking_puts_facts_before_voice_and_voice_before_order() -> None:
    def check(index: int, flipped: int = 0, kept: int = 0, voice: float | None = None):
        return ReplyCheck(index, facts=1, facts_kept=kept, flipped=flipped, negations=1,
                          negations_kept=kept, voice=voice)

    assert best([check(0, flipped=1, voice=0.99), check(1, voice=0.1)]).index == 1
    assert best([check(0, voice=0.99), check(1, kept=1, voice=0.2)]).index == 1
    assert best([check(0, kept=1, voice=0.3), check(1, kept=1, voice=0.8)]).index == 1
    assert best([check(0, kept=1), check(1, kept=1)]).index == 0


def test_a_sample_naming_a_command_that_does_not_exist_ranks_below_one_that_loses_a_fact(
        ) -> None:
    def check(index: int, flipped: int = 0, kept: int = 0, problem: str | None = None):
        return ReplyCheck(index, facts=1, facts_kept=kept, flipped=flipped, negations=1,
                          negations_kept=kept, voice=0.5, problem=problem)

    wrong = "`agent chat -p postman`: no persona 'postman'"
    assert best([check(0, kept=1, problem=wrong), check(1)]).index == 1
    assert best([check(0, problem=wrong), check(1, flipped=1)]).index == 0
    assert best([check(0, kept=1, problem=wrong), check(1, kept=1, problem=wrong)]).index == 0


@pytest.mark.parametrize("bad", [0, 17, "3", True, 2.0])
def test_best_of_outside_1_to_16_is_refused_by_name(bad) -> None:
    with pytest.raises(HyperlexError, match="best_of must be a whole number from 1 to 16"):
        check_best_of(bad)


# the controller -----------------------------------------------------------------------------


class KeepsOnly:
    """Reads the user's statement as "fisherman NOT trust sea", the reply ``keeper`` as
    keeping it, and every other reply as saying the fisherman trusts the sea."""

    def __init__(self, keeper: str | None = None):
        self.keeper = keeper
        self.read: list[str] = []  # every text read, in order

    @hookimpl
    def register_scene_encoders(self, register):
        def read(text: str):
            self.read.append(text)
            return said(-1 if text in (STATEMENT, self.keeper) else 1)

        register("default", read)


def controller_with(engine, reader: KeepsOnly, **kwargs) -> Controller:
    host = Host(extra_plugins={"reader": reader}, entry_points=False)
    return Controller(host, engine, persona="alpha", overrides={"max_new_tokens": 8, "seed": 5,
                                                                "temperature": 1.0}, **kwargs)


def test_the_sample_that_keeps_the_users_negation_is_the_reply(engine) -> None:
    samples = controller_with(engine, KeepsOnly(), best_of=3).send(STATEMENT).complete()
    texts = [s["text"] for s in samples.annotations["best_of"]["samples"]]
    assert len(set(texts)) == 3, texts  # seeds 5, 6, 7 sample three different replies
    assert samples.annotations["best_of"]["chosen"] == 0  # all flip it: the first

    controller = controller_with(engine, KeepsOnly(keeper=texts[2]), best_of=3)
    turn = controller.send(STATEMENT).complete()
    assert turn.reply == texts[2].strip()
    report = turn.annotations["best_of"]
    assert report["chosen"] == 2 and [s["text"] for s in report["samples"]] == texts
    assert [(s["flipped"], s["negations_kept"]) for s in report["samples"]] == [
        (1, 0), (1, 0), (0, 1)]
    assert turn.completion_tokens == sum(s["completion_tokens"] for s in report["samples"])
    fact = [link for link in controller.scene.links if link.said_by == USER]
    assert [(link.polarity, link.turn) for link in fact] == [(-1, 0)]


def test_each_sample_is_read_once_and_the_chosen_reading_joins_the_scene(engine) -> None:
    reader = KeepsOnly()
    controller = controller_with(engine, reader, best_of=3)
    turn = controller.send(STATEMENT).complete()
    samples = [s["text"] for s in turn.annotations["best_of"]["samples"]]
    assert reader.read == [STATEMENT, *samples]
    expected = controller_with(engine, KeepsOnly())
    expected.encode(STATEMENT, "alpha", 0, speaker=USER)
    before = expected.scene.to_dict()
    expected.encode(turn.reply, "alpha", 0, speaker="alpha")
    assert controller.scene.to_dict() == expected.scene.to_dict() != before


def test_the_voice_score_breaks_a_tie_between_samples_that_keep_the_facts(engine) -> None:
    seen = []

    def voice(texts: list[str], persona: str) -> list[float]:
        seen.append(persona)
        return [0.1, 0.9, 0.5][: len(texts)]

    turn = controller_with(engine, KeepsOnly(), best_of=3, voice=voice).send(
        "hello there").complete()
    assert seen == ["alpha"] and turn.annotations["best_of"]["chosen"] == 1


def test_the_reply_problem_check_sends_a_sample_below_the_others(engine) -> None:
    """agent chat and agent serve pass the CLI's command check: a sample it finds wrong is
    kept only if every sample is, and its problem is in the turn's annotations."""
    first = controller_with(engine, KeepsOnly(), best_of=3).send("hello there").complete()
    texts = [s["text"] for s in first.annotations["best_of"]["samples"]]
    assert first.annotations["best_of"]["chosen"] == 0

    def problem(text: str) -> str | None:
        return None if text == texts[2] else "`agent nope`: no command 'agent nope'"

    turn = controller_with(engine, KeepsOnly(), best_of=3, reply_problem=problem).send(
        "hello there").complete()
    report = turn.annotations["best_of"]
    assert report["chosen"] == 2 and turn.reply == texts[2].strip()
    assert [s["problem"] for s in report["samples"]] == [problem(t) for t in texts]


def test_one_turn_may_ask_for_best_of_but_not_greedy_or_with_a_json_reply(engine) -> None:
    from hyperlex.structured import ResponseFormat

    controller = controller_with(engine, KeepsOnly())
    assert "best_of" not in controller.send("plain").complete().annotations
    assert controller.send("sampled", best_of=2).complete().annotations["best_of"]["n"] == 2
    with pytest.raises(HyperlexError, match="cannot be combined with a response format"):
        controller.send("json", best_of=2, response_format=ResponseFormat.json_object())
    with pytest.raises(HyperlexError, match="best_of 2 needs sampling"):
        controller.send("greedy", best_of=2, options={"temperature": 0})
    assert len(controller.turns) == 2


def test_the_voice_scorer_reads_reference_replies_only_when_first_asked(tmp_path) -> None:
    from hyperlex.eval.fidelity import voice_scorer
    from hyperlex.persona.bundle import Persona

    from .conftest import write_bundle

    def bundle(name: str, replies: list[str] | None) -> Persona:
        root = write_bundle(tmp_path, name, adapter_seed=None)
        if replies is not None:
            (root / "data").mkdir()
            for split in ("train", "heldout"):
                (root / "data" / f"{split}.jsonl").write_text("".join(
                    f'{{"human": "Say it.", "text": "{text}"}}\n' for text in replies))
        return Persona.from_dir(root)

    from sklearn.preprocessing import FunctionTransformer

    calls = []

    def features(texts: list[str]):  # "sea" words one way, "stone" words the other
        calls.append(len(texts))
        return [[t.count("sea") + 0.1, t.count("stone") + 0.1] for t in texts]

    personas = {"sailor": bundle("sailor", ["sea sea", "the sea", "sea and sea"]),
                "mason": bundle("mason", ["stone", "stone stone", "a stone"]),
                "mute": bundle("mute", None)}
    score = voice_scorer(personas, FunctionTransformer(features))
    assert calls == []
    sailor, mason = score(["sea sea sea", "stone stone"], "sailor")
    assert sailor > 0.5 > mason
    assert score(["sea"], "mute") == [0.0]
    assert calls[0] == 6  # fitted once, on the two bundles with data


def test_a_cancelled_best_of_turn_is_not_recorded(engine) -> None:
    controller = controller_with(engine, KeepsOnly(), best_of=3)
    stream = controller.send(STATEMENT)
    stream.cancel()
    assert list(stream) == [] and stream.turn.finish_reason == "cancelled"
    assert controller.turns == [] and controller.scene.empty


def test_agent_chat_best_of_answers_and_the_repl_command_sets_it(engine, capsys) -> None:
    from hyperlex.cli.repl import ChatLoop

    controller = controller_with(engine, KeepsOnly())
    loop = ChatLoop(controller)
    loop.handle("/best-of 4")
    loop.handle("/best-of 40")
    err = capsys.readouterr().err
    assert "best-of: 4" in err and "best_of must be a whole number from 1 to 16" in err
    loop.handle(STATEMENT)
    assert controller.turns[-1].annotations["best_of"]["n"] == 4
