"""Rejection-sampling self-distillation on the tiny model: every proposal is sampled, a
candidate is kept only when it reads back to its scene and is in the persona's voice, and
the best kept one per scene becomes a speak_scene record."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperlex.cli import cli
from hyperlex.eval.faithful import (
    NAMES_NO_SUCH_COMMAND,
    Proposal,
    chat_prompt,
    chat_proposals,
    chat_records,
    chat_statements,
    faithful_records,
)
from hyperlex.eval.roundtrip import EvalScene
from hyperlex.persona.bundle import Persona
from hyperlex.scene.model import USER, Delta, Hyperlexeme, Link, Scene
from hyperlex.training.data import parse_record

from .conftest import write_bundle

SCENE = Scene(hyperlexemes={"fox": Hyperlexeme("fox", "fox"),
                            "moon": Hyperlexeme("moon", "moon")},
              links=[Link("fox", "see", "moon", polarity=-1)])
SCENES = [EvalScene("s1", SCENE, None, "test"), EvalScene("s2", SCENE, None, "test")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path,
           tiny_bundles: dict[str, Path]):
    from hyperlex.engines.torch.engine import TorchEngine

    writer = write_bundle(tmp_path_factory.mktemp("writer"), "scribe", adapter_seed=7,
                          tiny_base=tiny_base, extra_yaml="layer: true\n")
    personas = [Persona.from_dir(tiny_bundles["alpha"]), Persona.from_dir(writer)]
    return TorchEngine(personas, base=str(tiny_base), progress=False)


class Voice:
    """A classifier that gives every reply to ``label`` with ``probability``."""

    def __init__(self, label: str, probability: float = 0.9):
        self.label, self.p = label, probability

    def predict(self, texts: list[str]) -> list[str]:
        return [self.label] * len(texts)

    def probability(self, texts: list[str], label: str) -> list[float]:
        return [self.p if label == self.label else 1 - self.p] * len(texts)

    def attribute(self, texts: list[str], label: str) -> list[tuple[str, float]]:
        return list(zip(self.predict(texts), self.probability(texts, label), strict=True))


def reads(scene: Scene | None):
    """An encoder that reads every reply back as ``scene`` (None: as nothing)."""
    def encode(text: str) -> Delta:
        if scene is None:
            return Delta()
        return Delta(hyperlexemes=list(scene.hyperlexemes.values()), links=list(scene.links))
    return encode


def params():
    from hyperlex.generation import GenerationParams

    return GenerationParams(temperature=0, max_new_tokens=8)


def test_faithful_candidates_in_the_persona_voice_become_records(engine) -> None:
    run = faithful_records(engine, engine.persona("alpha"), SCENES, [(), (("scribe", 0.5),)],
                           reads(SCENE), Voice("alpha"), params())
    assert run.candidates == 4 and sum(run.accepted.values()) == 4 and not run.refused
    assert [r["meta"]["scene_id"] for r in run.records] == ["s1", "s2"]
    example = parse_record({k: v for k, v in run.records[0].items()})
    assert example.speaks_scene and example.scene.render("all") == SCENE.render("all")
    assert run.records[0]["meta"]["proposal"] in ("alone", "scribe:0.5")


def test_candidates_that_lose_the_scene_or_the_voice_are_refused(engine) -> None:
    lost = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(None),
                            Voice("alpha"), params())
    assert lost.records == [] and lost.refused == {"hyperlexeme lost": 2}
    flipped = Scene.from_dict(SCENE.to_dict())
    flipped.links[0].polarity = 1
    negation = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(flipped),
                                Voice("alpha"), params())
    assert negation.refused == {"polarity flipped": 2}
    other = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(SCENE),
                             Voice("writer"), params())
    assert other.refused == {"voice read as writer": 2}


# chat turns: the persona answers a user's statement, as in agent chat ----------------------

STATEMENT = EvalScene("t1", SCENE, "The fox does not see the moon.", "test")


def test_a_chat_turn_that_keeps_the_negation_in_voice_becomes_an_ordinary_record(engine) -> None:
    run = chat_records(engine, engine.persona("alpha"), [STATEMENT], [Proposal((), params())],
                       reads(SCENE), Voice("alpha"))
    assert run.refused == {} and len(run.records) == 1
    example = parse_record(run.records[0])
    assert example.human == "The fox does not see the moon." and not example.speaks_scene
    assert example.scene.render("all") == SCENE.render("all")
    assert chat_prompt(engine.persona("alpha"), STATEMENT, engine)[-1] == {
        "role": "user", "content": "The fox does not see the moon."}


def test_a_chat_turn_that_drops_or_flips_the_negation_is_refused(engine) -> None:
    positive = Scene.from_dict(SCENE.to_dict())
    positive.links[0].polarity = 1
    only_nodes = Scene(hyperlexemes=dict(SCENE.hyperlexemes))
    for read, reason in ((positive, "polarity flipped"), (only_nodes, "negation lost")):
        run = chat_records(engine, engine.persona("alpha"), [STATEMENT], [Proposal((), params())],
                           reads(read), Voice("alpha"))
        assert run.records == [] and run.refused == {reason: 1}


def test_a_faithful_reply_that_fails_the_reply_problem_is_refused_with_its_problem(engine) -> None:
    """agent data faithful passes a check that the reply names only real commands; a
    candidate that keeps its scene in the voice but fails it is refused, in both rounds."""
    def check(reply: str) -> str:
        return f"`agent chat -p fox`: no persona 'fox' in {len(reply)} chars"

    chat = chat_records(engine, engine.persona("alpha"), [STATEMENT], [Proposal((), params())],
                        reads(SCENE), Voice("alpha"), reply_problem=check)
    scenes = faithful_records(engine, engine.persona("alpha"), SCENES, [()], reads(SCENE),
                              Voice("alpha"), params(), reply_problem=check)
    for run, refused in ((chat, 1), (scenes, 2)):
        assert run.records == [] and run.refused == {NAMES_NO_SUCH_COMMAND: refused}
        assert all("no persona 'fox'" in v["problem"] for v in run.verdicts)
    kept = chat_records(engine, engine.persona("alpha"), [STATEMENT], [Proposal((), params())],
                        reads(SCENE), Voice("alpha"), reply_problem=lambda reply: None)
    assert len(kept.records) == 1 and "problem" not in kept.verdicts[0]


def test_a_guided_proposal_samples_against_the_scene_less_chat(engine) -> None:
    """A chat round's guided proposal (agent data faithful --chat --guidance W) decodes each
    statement with scene guidance against the same conversation without its scene, beside
    the unguided proposal; both are candidates, told apart by their labels."""
    import dataclasses

    from hyperlex.eval.faithful import chat_guidance
    from hyperlex.scene.model import opening_scene

    alpha = engine.persona("alpha")
    said = Delta(hyperlexemes=list(SCENE.hyperlexemes.values()), links=list(SCENE.links))
    statement = EvalScene("t3", opening_scene(said), STATEMENT.reference, "test")
    sampled = dataclasses.replace(params(), seed=1)
    run = chat_records(engine, alpha, [statement],
                       [Proposal((), sampled), Proposal((), sampled, 3.0)], reads(SCENE),
                       Voice("alpha"))
    assert [v["proposal"] for v in run.verdicts] == ["alone#0", "alone guided 3#1"]
    prompt = chat_prompt(alpha, statement, engine)
    guided = engine.generate_batch([(prompt, "alpha")], sampled,
                                   guidance=chat_guidance(alpha, [statement], 3.0, engine))
    plain = engine.generate_batch([(prompt, "alpha")], sampled)
    assert [v["reply"] for v in run.verdicts] == [plain[0].text.strip(), guided[0].text.strip()]
    assert guided[0].text != plain[0].text


def test_a_chat_round_samples_every_stack_with_each_seed_plain_then_guided() -> None:
    writer = (("scribe", 0.5),)
    sampled = chat_proposals([(), writer], params(), samples=2, guidance=1.5)
    assert [(p.label, p.params.seed) for p in sampled] == [
        ("alone", 1), ("alone", 2), ("scribe:0.5", 1), ("scribe:0.5", 2),
        ("alone guided 1.5", 1), ("alone guided 1.5", 2),
        ("scribe:0.5 guided 1.5", 1), ("scribe:0.5 guided 1.5", 2)]
    assert {p.params.max_new_tokens for p in sampled} == {params().max_new_tokens}
    unguided = chat_proposals([writer], params(), samples=1)
    assert [(p.label, p.params.seed) for p in unguided] == [("scribe:0.5", 1)]


def test_data_faithful_refuses_chat_options_without_chat(runner) -> None:
    for args in (["--guidance", "2"], ["--statements", "s.txt"]):
        result = runner.invoke(cli, ["data", "faithful", *args])
        assert result.exit_code == 2 and "add --chat" in result.output, result.output


def test_chat_statements_state_a_negated_fact_read_as_the_user_said_it() -> None:
    statements = chat_statements(3, "train", seed=0)
    assert len(statements) == 3
    for item in statements:
        assert any(link.polarity < 0 for link in item.scene.links)
        assert all(h.said_by == [USER] for h in item.scene.hyperlexemes.values())
        assert item.reference.endswith(".") and "Think of" not in item.reference


def test_the_negation_eval_counts_kept_flipped_and_voice_per_row(engine) -> None:
    from hyperlex.eval.negation import negation_eval

    report = negation_eval(engine, {"alpha": engine.persona("alpha")}, [STATEMENT, STATEMENT],
                           reads(SCENE), Voice("alpha"), layers=(("scribe", 0.5),))
    assert report.rows == ["alpha", "alpha+scribe:0.5"]
    assert report.rates("alpha") == {"kept": 1.0, "flipped": 0.0, "own_voice": 1.0,
                                     "kept_in_voice": 1.0}
    assert "alpha+scribe:0.5" in report.table()


def test_the_negation_eval_with_best_of_judges_the_sample_that_keeps_the_fact(engine) -> None:
    from hyperlex.eval.negation import negation_eval

    flipped = Scene.from_dict(SCENE.to_dict())
    flipped.links[0].polarity = 1
    seen: list[str] = []

    def second_keeps(text: str) -> Delta:  # the second sample of each statement keeps it
        seen.append(text)
        return reads(SCENE if len(seen) % 2 == 0 else flipped)(text)

    report = negation_eval(engine, {"alpha": engine.persona("alpha")}, [STATEMENT, STATEMENT],
                           second_keeps, Voice("alpha"), best_of=2)
    assert len(seen) == 4 and report.as_dict()["best_of"] == 2
    assert report.rates("alpha") == {"kept": 1.0, "flipped": 0.0, "own_voice": 1.0,
                                     "kept_in_voice": 1.0}


def test_the_negation_eval_with_guidance_answers_against_the_scene_less_chat(engine) -> None:
    """--guidance W: each reply is the guided one, its negative prompt the same conversation
    with no scene in the system message."""
    import dataclasses

    from hyperlex.eval.faithful import chat_guidance
    from hyperlex.eval.negation import negation_eval
    from hyperlex.scene.model import opening_scene

    alpha = engine.persona("alpha")
    said = Delta(hyperlexemes=list(SCENE.hyperlexemes.values()), links=list(SCENE.links))
    statement = EvalScene("t2", opening_scene(said), STATEMENT.reference, "test")
    report = negation_eval(engine, {"alpha": alpha}, [statement], reads(SCENE),
                           Voice("alpha"), guidance=4.0)
    guidance = chat_guidance(alpha, [statement], 4.0, engine)
    prompt = chat_prompt(alpha, statement, engine)
    negative = guidance.negatives[0]
    assert "fox NOT see moon" in prompt[0]["content"]
    assert "fox" not in negative[0]["content"] and negative[1:] == prompt[1:]
    params = dataclasses.replace(alpha.contract.params(), seed=0)
    expected = engine.generate_batch([(prompt, "alpha")], params, guidance=guidance)
    plain = engine.generate_batch([(prompt, "alpha")], params)
    assert report.replies["alpha"][0]["reply"] == expected[0].text.strip()
    assert expected[0].text != plain[0].text
    assert report.as_dict()["guidance"] == 4.0
    assert chat_guidance(alpha, [statement], 0.0, engine) is None


def test_shipped_statements_each_state_a_negation(host) -> None:
    from hyperlex.eval.negation import load_statements

    statements = load_statements(host.scene_encoders["default"])
    assert len(statements) >= 48
    assert statements[0].reference == "The old fisherman does not trust the sea."


def test_a_statement_without_a_negation_is_named_by_file_and_line(host, tmp_path: Path) -> None:
    from hyperlex.errors import HyperlexError
    from hyperlex.eval.negation import load_statements

    path = tmp_path / "s.txt"
    path.write_text("# comment\nThe fox does not see the moon.\nThe fox sees the moon.\n")
    with pytest.raises(HyperlexError, match=r"s\.txt:3: 'The fox sees the moon\.' reads back "
                                            "with no negated link"):
        load_statements(host.scene_encoders["default"], path)
