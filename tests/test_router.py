"""Routing: requests in words, the routing order, the automatic router's hysteresis, and the
accuracy of the shipped router on the labelled set in tests/data/routing.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hyperlex import hookimpl
from hyperlex.agent.router import EmbeddingRouter, TurnRouter, requested_persona
from hyperlex.eval.routing import TARGETS, evaluate_routing, load_cases
from hyperlex.host import Host
from hyperlex.persona.bundle import Persona

ROUTING_SET = Path(__file__).parent / "data" / "routing.jsonl"
CAST = ["dreamer", "interface", "logician", "philosopher", "poet", "scientist"]


@pytest.mark.parametrize(("message", "persona", "rest"), [
    ("let the poet answer: what is rain?", "poet", "What is rain?"),
    ("Let the Poet answer this one", "poet", "Let the Poet answer this one"),
    ("switch to the scientist", "scientist", "switch to the scientist"),
    ("Switch to the scientist. Why is the sky blue?", "scientist", "Why is the sky blue?"),
    ("as a logician, is this valid: all men are mortal", "logician",
     "Is this valid: all men are mortal"),
    ("poet, write about the harbour at dawn", "poet", "Write about the harbour at dawn"),
    ("ask the scientist why ice floats", "scientist", "Why ice floats"),
    ("I'd like the dreamer to take this one: a city of glass", "dreamer", "A city of glass"),
    ("can the philosopher weigh in on lying to friends?", "philosopher",
     "Lying to friends?"),
    ("give me the logician's view on this argument about taxes", "logician",
     "This argument about taxes"),
    ("hand it over to the interface", "interface", "hand it over to the interface"),
    ("back to the philosopher: what did we say about courage", "philosopher",
     "What did we say about courage"),
])
def test_requests_in_words_name_the_persona_and_strip_the_request(message, persona, rest):
    assert requested_persona(message, CAST) == (persona, rest)


@pytest.mark.parametrize("message", [
    "What is the philosopher's stone?",
    "Tell me about the poet Keats and his odes",
    "Scientists say the universe is expanding",
    "Is a logician ever wrong?",
    "I dreamt of a poet last night",
])
def test_mentioning_a_persona_is_not_a_request(message):
    assert requested_persona(message, CAST) is None


def bundle(name: str, description: str, examples: list[str]) -> Persona:
    return Persona.from_mapping({
        "name": name, "description": description, "base_model": "tiny",
        "contract": {"system": "You are {persona}."},
        "routing": {"examples": examples}})


WORDS = ["sea", "moon", "poem", "verse", "atom", "cell", "energy", "measure", "hello"]


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for sentence embeddings: word counts over a tiny vocabulary."""
    rows = np.array([[t.lower().count(w) for w in WORDS] + [0.1] for t in texts], dtype=float)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


PERSONAS = {
    "poet": bundle("poet", "poem verse", ["a poem about the sea", "verse about the moon"]),
    "scientist": bundle("scientist", "atom cell energy",
                        ["measure the energy", "what is in a cell"]),
}


def test_the_router_picks_the_best_persona_when_nobody_spoke_yet():
    route = EmbeddingRouter(bag_of_words)("a poem about the moon", None, PERSONAS, None)
    assert route.persona == "poet"
    assert route.scores["poet"] > route.scores["scientist"] and route.confidence > 0.5


def test_hysteresis_keeps_the_current_persona_unless_another_is_clearly_better():
    router = EmbeddingRouter(bag_of_words)
    assert router("hello", None, PERSONAS, "scientist").persona == "scientist"
    assert router("hello", None, PERSONAS, "poet").persona == "poet"
    switch = router("a poem about the sea and the moon", None, PERSONAS, "scientist")
    assert switch.persona == "poet" and "clearly fits better" in switch.reason


def test_a_wide_margin_makes_the_router_stickier():
    sticky = EmbeddingRouter(bag_of_words, margin=2.0)
    assert sticky("a poem about the sea", None, PERSONAS, "scientist").persona == "scientist"


def test_the_scene_focus_tilts_an_ambiguous_message():
    from hyperlex.scene.model import Delta, Hyperlexeme, Scene

    scene = Scene().apply(Delta([Hyperlexeme("h1", "energy"), Hyperlexeme("h2", "atom")]))
    router = EmbeddingRouter(bag_of_words, focus_weight=0.5)
    plain = router("hello", None, PERSONAS, None).scores
    focused = router("hello", scene, PERSONAS, None).scores
    assert focused["scientist"] - focused["poet"] > plain["scientist"] - plain["poet"]


class Everything:
    def __init__(self, answer: str | None):
        self.answer = answer

    @hookimpl
    def route_turn(self, message, scene, personas, current):
        return self.answer

    @hookimpl
    def register_routers(self, register):
        register("embedding", EmbeddingRouter(bag_of_words))


def turn_router(hook_answer: str | None = None, router: str | None = "embedding") -> TurnRouter:
    host = Host(extra_plugins={"p": Everything(hook_answer)}, entry_points=False)
    return TurnRouter(host, PERSONAS, router)


def test_routing_order_pinned_address_request_hook_router():
    router = turn_router(hook_answer="scientist")
    assert router.decide("@poet a", pinned="scientist").source == "pinned"
    addressed = router.decide("@poet the sea at night", current="scientist")
    assert (addressed.persona, addressed.source, addressed.message) == (
        "poet", "address", "the sea at night")
    assert router.decide("let the poet answer: energy?").source == "request"
    assert router.decide("measure the energy").source == "hook"
    routed = turn_router().decide("a poem about the sea", current="scientist")
    assert (routed.persona, routed.source) == ("poet", "router")
    assert set(routed.scores) == {"poet", "scientist"}


def test_without_a_router_turns_stay_with_the_current_persona_then_the_default():
    router = turn_router(router=None)
    assert router.decide("a poem", current="scientist").source == "current"
    assert router.decide("a poem").source == "default"


def test_an_unknown_router_is_a_clear_error():
    from hyperlex.errors import HyperlexError

    with pytest.raises(HyperlexError, match="unknown router 'psychic'; registered routers: "
                                            "embedding"):
        turn_router(router="psychic")


def test_a_failing_router_is_reported_and_the_turn_still_routes():
    class Broken:
        @hookimpl
        def register_routers(self, register):
            register("embedding", lambda *args: 1 / 0)

    host = Host(extra_plugins={"broken": Broken()}, entry_points=False)
    decision = TurnRouter(host, PERSONAS).decide("a poem", current="poet")
    assert decision.source == "current"
    assert "router 'embedding' failed: ZeroDivisionError" in host.failures[-1]


def shipped_router() -> TurnRouter:
    host = Host()
    return TurnRouter(host, {n: p for n, p in host.personas.items() if not p.is_mood})


def test_routing_accuracy_on_the_labelled_set_meets_the_targets():
    """Shipped personas, the real MiniLM router: explicit and in-words requests are always
    right, implicit messages (incl. follow-ups that must stay) at least 0.85."""
    router = shipped_router()
    cases = load_cases(ROUTING_SET, set(router.personas))
    assert len(cases) >= 50 and {c.expected for c in cases} == set(CAST)
    report = evaluate_routing(router, cases)
    for kind, target in TARGETS.items():
        assert report.accuracy[kind] >= target, (kind, report.accuracy, report.errors)


def test_agent_route_prints_the_decision_with_all_scores():
    from hyperlex.cli import cli

    result = CliRunner().invoke(cli, ["route", "Why do magnets attract iron?", "--json"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert decision["persona"] == "scientist" and decision["source"] == "router"
    assert set(decision["scores"]) == {*CAST, "writer"}  # the scene-writer speaks too
    assert 0 < decision["confidence"] <= 1


def test_agent_route_rejects_an_unknown_current_persona():
    from hyperlex.cli import cli

    result = CliRunner().invoke(cli, ["route", "hi", "--current", "nobody"])
    assert result.exit_code == 2 and "unknown persona 'nobody'" in result.stderr
