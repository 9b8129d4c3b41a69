"""Integration tests on the real embedded SmolLM2-135M-Instruct and the trained philosopher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is time?"}]


@pytest.fixture(scope="module")
def real_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One HYPERLEX_HOME for this module: the embedded model is converted once, then cached."""
    return tmp_path_factory.mktemp("real-home")


@pytest.fixture(autouse=True)
def use_real_home(real_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERLEX_HOME", str(real_home))


@pytest.fixture(scope="module")
def engine(real_home: Path):
    os.environ["HYPERLEX_HOME"] = str(real_home)
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.host import Host

    return TorchEngine(list(Host().personas.values()))


def test_embedded_model_is_converted_once_then_loaded_from_the_cache(engine, real_home: Path):
    from hyperlex.engines.models import ensure_embedded

    cached = real_home / "models" / "smollm2-135m-instruct"
    weights = cached / "model.safetensors"
    assert weights.is_file() and (cached / "tokenizer.json").is_file()
    stamp = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_embedded() == cached
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == stamp


def test_philosopher_adapter_is_attached_to_the_embedded_base(engine) -> None:
    assert engine.base_name == "smollm2-135m-instruct"
    assert "philosopher" in engine.personas and not engine.skipped
    assert engine.model.peft_config["philosopher"].r == 6


def test_philosopher_answers_differently_from_the_base_and_in_character(engine) -> None:
    from hyperlex.generation import GenerationParams

    philosopher = engine.personas["philosopher"]
    messages = [{"role": "system", "content": philosopher.system_message()}, *QUESTION]
    params = GenerationParams(temperature=0, max_new_tokens=120, repetition_penalty=1.1)
    persona_reply = engine.generate(messages, "philosopher", params).text
    base_reply = engine.generate(messages, None, params).text
    assert persona_reply != base_reply
    assert "?" in persona_reply  # the philosopher hands a question back


def test_first_piece_streams_before_the_reply_is_finished(engine) -> None:
    from hyperlex.generation import GenerationParams

    generation = engine.stream(QUESTION, "philosopher",
                               GenerationParams(temperature=0, max_new_tokens=40))
    start = time.perf_counter()
    first_at = None
    for _ in generation:
        first_at = first_at or time.perf_counter() - start
    total = time.perf_counter() - start
    assert first_at is not None and first_at < total / 4
    assert generation.usage.completion_tokens > 10


def test_agent_chat_one_shot_on_the_real_model(real_home: Path) -> None:
    agent = Path(sys.executable).with_name("agent")
    done = subprocess.run(
        [str(agent), "chat", "--persona", "philosopher", "-m", "What is time?",
         "-o", "temperature", "0", "-o", "max_new_tokens", "80"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYPERLEX_HOME": str(real_home), "HYPERLEX_LOAD_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) > 10
    assert "Loading smollm2-135m-instruct with" in done.stderr
    assert "Traceback" not in done.stderr


def test_nf4_base_with_the_philosopher_adapter_generates(real_home: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.generation import GenerationParams
    from hyperlex.host import Host

    engine = TorchEngine([Host().persona("philosopher")], quantize="nf4")
    reply = engine.generate(QUESTION, "philosopher",
                            GenerationParams(temperature=0, max_new_tokens=30))
    assert len(reply.text.split()) > 5


def test_every_shipped_persona_loads_and_answers(engine) -> None:
    from hyperlex.generation import GenerationParams

    trained = {n: p for n, p in engine.personas.items() if p.adapter_dir is not None}
    assert "philosopher" in trained
    for name, persona in trained.items():
        messages = [{"role": "system", "content": persona.system_message()},
                    {"role": "user", "content": "Hello! What can you tell me about rain?"}]
        reply = engine.generate(messages, name, GenerationParams(temperature=0,
                                                                 max_new_tokens=24)).text
        # a sentence at least: the scene-writer, with an empty scene, says only what it was
        # asked about ("The rain falls.")
        assert len(reply.split()) >= 3 and any(c.isalpha() for c in reply), (name, reply)


def test_the_cast_shares_one_vllm_portable_configuration(engine) -> None:
    configs = {name: engine.model.peft_config[name] for name, p in engine.personas.items()
               if p.adapter_dir is not None}
    assert len({(c.r, c.lora_alpha) for c in configs.values()}) == 1
    for name, config in configs.items():
        assert not config.use_dora and config.bias == "none" and not config.modules_to_save, name
    sizes = engine.adapter_bytes()
    per_persona = max(sizes[name] for name in configs)
    assert 32 * per_persona <= 0.25 * sizes["__base__"]


def run_agent(real_home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    agent = Path(sys.executable).with_name("agent")
    done = subprocess.run(
        [str(agent), *args], input=stdin, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HYPERLEX_HOME": str(real_home), "HYPERLEX_LOAD_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def test_a_routed_conversation_is_stored_with_its_scene_and_resumes(real_home: Path) -> None:
    """The issue's end-to-end check: personas change by address, by request in words and by
    the router; every turn's persona and reason are stored; the scene accumulates; the
    session resumes in a new process."""
    import json

    greedy = ["-o", "temperature", "0", "-o", "max_new_tokens", "32"]
    run_agent(real_home, "chat", "--session", "harbour", "--json", *greedy, stdin=(
        "@scientist How did the salt get into the sea?\n"
        "let the poet answer: the old keeper never saw the ships\n"
        "How do vaccines train the immune system?\n"))
    shown = json.loads(run_agent(real_home, "sessions", "show", "harbour", "--json").stdout)
    turns = shown["turns"]
    assert [t["persona"] for t in turns] == ["scientist", "poet", "scientist"]
    assert [t["route"]["source"] for t in turns] == ["address", "request", "router"]
    assert turns[1]["user"] == "The old keeper never saw the ships"
    scene = shown["scene"]
    labels = {h["id"]: h["label"] for h in scene["hyperlexemes"]}
    assert {"salt", "sea", "keeper", "ship"} <= set(labels.values())
    links = {(labels[k["src"]], k["rel"], labels[k["dst"]], k["polarity"]) for k in scene["links"]}
    assert ("keeper", "see", "ship", -1) in links  # negation is first-class
    assert ("salt", "get into", "sea", 1) in links

    resumed = run_agent(real_home, "chat", "--session", "harbour", "--json", *greedy,
                        "-m", "tell me more")
    assert "resumed at turn 3" in resumed.stderr
    turn = json.loads(resumed.stdout)
    assert turn["index"] == 3 and turn["persona"] == "scientist"  # a follow-up stays
    again = json.loads(run_agent(real_home, "sessions", "show", "harbour", "--json").stdout)
    assert len(again["turns"]) == 4 and again["scene_version"] > shown["scene_version"]


def test_the_melancholic_mood_composes_over_a_persona(engine) -> None:
    from hyperlex.generation import GenerationParams

    assert "melancholic" in engine.moods and "melancholic" not in engine.personas
    poet = engine.personas["poet"]
    messages = [{"role": "system", "content": poet.system_message()},
                {"role": "user", "content": "Write about a summer afternoon at the beach."}]
    params = GenerationParams(temperature=0, max_new_tokens=40)
    alone = engine.generate(messages, "poet", params).text
    tinted = engine.generate(messages, "poet", params, layers=[("melancholic", 1.0)]).text
    assert len(tinted.split()) > 5 and tinted != alone


def test_every_shipped_persona_answers_through_llama_cpp_as_through_torch(engine) -> None:
    """The llama.cpp engine on an F32 GGUF of the same weights gives each persona's greedy
    reply token for token (the tiny-model tests check the mechanics)."""
    pytest.importorskip("llama_cpp")
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine
    from hyperlex.generation import GenerationParams

    fast = LlamaCppEngine([*engine.personas.values(), *engine.moods.values()], exact=True,
                          progress=False)
    assert not fast.skipped and set(fast.personas) == set(engine.personas)
    greedy = GenerationParams(temperature=0, max_new_tokens=16)
    for name, persona in engine.personas.items():
        messages = [{"role": "system", "content": persona.system_message()},
                    {"role": "user", "content": "What do you make of the rain?"}]
        ours, theirs = fast.generate(messages, name, greedy), engine.generate(messages, name,
                                                                               greedy)
        assert ours.text == theirs.text, name
    fast.close()


def test_the_cast_decoded_together_on_llama_cpp_replies_as_alone(engine) -> None:
    """agent serve's default engine (the embedded quantized GGUF) with batching on: each
    persona's turns run together in a context, the personas share two contexts by demand, and
    every greedy reply is the one that persona gives alone."""
    pytest.importorskip("llama_cpp")
    import threading

    from hyperlex.engines.llamacpp.engine import LlamaCppEngine
    from hyperlex.generation import GenerationParams

    personas = [*engine.personas.values(), *engine.moods.values()]
    alone = LlamaCppEngine(personas, progress=False)
    batched = LlamaCppEngine(personas, contexts=2, sequences=4, progress=False)
    greedy = GenerationParams(temperature=0, max_new_tokens=24)
    jobs = [(name, question) for question in ("What do you make of the rain?", "Is a promise "
            "binding?") for name in engine.personas]

    def messages(name: str, question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": engine.personas[name].system_message()},
                {"role": "user", "content": question}]

    expected = {job: alone.generate(messages(*job), job[0], greedy).text for job in jobs}
    alone.close()
    got: dict[tuple[str, str], str] = {}

    def ask(job: tuple[str, str]) -> None:
        got[job] = batched.generate(messages(*job), job[0], greedy).text

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batched.close()
    assert got == expected


def test_agent_chat_runs_on_llama_cpp_when_it_is_installed(real_home: Path) -> None:
    pytest.importorskip("llama_cpp")
    agent = Path(sys.executable).with_name("agent")
    done = subprocess.run(
        [str(agent), "chat", "--persona", "poet", "-m", "Write about the sea.", "--no-store",
         "-o", "max_new_tokens", "40"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYPERLEX_HOME": str(real_home), "HYPERLEX_LOAD_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    assert "on llama.cpp..." in done.stderr and len(done.stdout.split()) > 5


def test_the_philosopher_is_trained_evaluated_and_chatted_with_on_one_prompt(engine) -> None:
    from hyperlex.eval.roundtrip import shipped_scenes
    from hyperlex.host import Host
    from tests.test_prompt import HISTORY, MESSAGE, three_prompts

    scene = shipped_scenes()[0].scene
    prompts = three_prompts(engine, Host(), "philosopher", scene, HISTORY, MESSAGE)
    assert prompts["training"] == prompts["evaluation"] == prompts["chat"]
    assert next(iter(scene.hyperlexemes.values())).label in engine.tokenizer.decode(
        prompts["chat"])


def test_the_python_api_example_runs_on_the_front_door(engine) -> None:
    """examples/python_api.py, which imports only from ``hyperlex``, answers as the
    philosopher (the module's engine fixture has converted the embedded model already)."""
    example = Path(__file__).resolve().parent.parent / "examples" / "python_api.py"
    run = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    first, last = run.stdout.strip().splitlines()[0], run.stdout.strip().splitlines()[-1]
    assert first.strip() and last.startswith("[philosopher, pinned to philosopher, ")


def test_the_users_negated_fact_leads_the_scene_after_three_poet_turns(engine) -> None:
    """The real poet and the default (spaCy) encoder: the user's fact stays first, negated,
    and what the poet invented is marked as the poet's."""
    from hyperlex.agent.controller import Controller
    from hyperlex.host import Host

    controller = Controller(Host(), engine, persona="poet", router=None,
                            overrides={"max_new_tokens": 48, "temperature": 0})
    controller.send("The old fisherman does not trust the sea.").complete()
    for question in ("Go on.", "And then?", "Please continue."):
        controller.send(question).complete()
    scene = controller.scene
    assert {"fisherman", "sea"} <= {scene.hyperlexemes[h].label for h in scene.focus}
    assert scene.render("focus").split("\n")[1] == "fisherman NOT trust sea"
    assert any(not hx.is_fact for hx in scene.hyperlexemes.values())  # the poet's additions
    assert "(by poet)" in scene.render("all")


def test_the_scene_writer_keeps_held_out_scenes_and_lifts_a_persona_composed(engine) -> None:
    """The trained scene-writer on held-out scenes it never saw: it keeps most of what they
    hold and flips no negation; composed over the poet it makes the poet keep more."""
    from hyperlex.eval.roundtrip import load_scenes, roundtrip
    from hyperlex.host import Host

    host = Host()
    scenes = load_scenes(["heldout"], shipped=False)[:4]
    report = roundtrip(engine, {n: engine.persona(n) for n in ("poet", "writer")}, scenes,
                       host.scene_encoders["default"], layers=(("writer", 1.0),))
    writer, poet, composed = (report.metrics[n] for n in ("writer", "poet", "poet+writer:1"))
    assert writer["hyperlexeme_recall"] >= 0.6 and writer["logical_loss"] == 0, writer
    assert composed["hyperlexeme_recall"] > poet["hyperlexeme_recall"] + 0.2, (poet, composed)


def test_scene_guidance_makes_the_scientist_keep_more_of_held_out_scenes(engine) -> None:
    """The scientist alone keeps few of a held-out scene's things (0.22 of the first four);
    decoded with scene guidance at 3 it keeps most of them (0.61), from the same adapter."""
    from hyperlex.eval.roundtrip import load_scenes, roundtrip
    from hyperlex.host import Host

    encoder = Host().scene_encoders["default"]
    scenes = load_scenes(["heldout"], shipped=False)[:4]
    speaker = {"scientist": engine.persona("scientist")}
    plain = roundtrip(engine, speaker, scenes, encoder).metrics["scientist"]
    guided = roundtrip(engine, speaker, scenes, encoder, guidance=3.0).metrics["scientist"]
    assert guided["hyperlexeme_recall"] >= plain["hyperlexeme_recall"] + 0.2, (plain, guided)


def test_the_shipped_round_trip_gate_holds_on_a_slice_of_the_held_out_scenes(
        real_home: Path) -> None:
    """eval-thresholds.yaml gates the cast; a slice of it runs here, so a persona or writer
    that stops keeping the scene fails CI (exit 3 lists the metric that missed)."""
    root = Path(__file__).resolve().parents[1]
    done = run_agent(real_home, "eval", "roundtrip", "-p", "logician", "-p", "writer",
                     "--scenes", "heldout", "--no-shipped-scenes", "--limit", "3",
                     "--compose", "writer:1", "--engine", "torch",
                     "--thresholds", str(root / "eval-thresholds.yaml"))
    rows = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert {"logician", "writer", "logician+writer:1"} <= rows


def test_the_scene_reader_reads_a_negated_sentence_into_a_delta_under_its_grammar() -> None:
    """The trained reader (plugins/reader) on the real model: its reading parses, names what
    the sentence names and keeps its negation (docs/scene.md#the-scene-reader)."""
    from hyperlex.agent.reader import ReaderEncoder
    from hyperlex.plugins.builtin_encoders import READER_BUNDLE

    delta = ReaderEncoder(READER_BUNDLE)("The old fisherman does not trust the sea.")
    labels = {h.id: h.label for h in delta.hyperlexemes}
    assert {"fisherman", "sea"} <= set(labels.values())
    assert ("fisherman", "trust", "sea", -1) in {
        (labels[k.src], k.rel, labels[k.dst], k.polarity) for k in delta.links}


def test_the_scene_reader_holds_its_floor_on_blind_gold_sentences(
        real_home: Path, tmp_path: Path) -> None:
    """agent scene eval --encoder reader on 12 sentences of the first blind gold batch (never
    in the reader's data): floors under what round 4 measured on them, so a reader that
    stops reading things, links or negations fails CI (measured 0.87 / 0.48 / 0.86)."""
    import json

    root = Path(__file__).resolve().parents[1]
    gold = (root / "tests" / "data" / "scene_gold.jsonl").read_text().splitlines()[86:98]
    slice_file = tmp_path / "blind.jsonl"
    slice_file.write_text("\n".join(gold) + "\n")
    done = run_agent(real_home, "scene", "eval", "--encoder", "reader", "--gold",
                     str(slice_file), "--json")
    scores = json.loads(done.stdout)
    assert scores["sentences"] == 12
    assert scores["hyperlexemes"]["f1"] >= 0.75, scores["hyperlexemes"]
    assert scores["links"]["f1"] >= 0.3, scores["links"]
    assert scores["polarity"]["accuracy"] >= 0.7, scores["polarity"]


def test_the_negation_eval_answers_held_out_statements_as_agent_chat_does(
        real_home: Path) -> None:
    """agent eval negation on the real logician: each held-out statement gets a reply read
    back and judged (kept, flipped, lost; whose voice), and the rates are those verdicts; the
    shipped floor on negated facts kept holds (exit 3 would name the metric that missed)."""
    import json

    root = Path(__file__).resolve().parents[1]
    done = run_agent(real_home, "eval", "negation", "-p", "logician", "--limit", "3", "--json",
                     "--thresholds", str(root / "eval-thresholds.yaml"))
    row = json.loads(done.stdout)["rows"]["logician"]
    assert [v["statement"] for v in row["replies"]][0] == \
        "The old fisherman does not trust the sea."
    assert all(v["negations"] >= 1 and v["reply"] for v in row["replies"])
    kept = sum(v["negations_kept"] == v["negations"] for v in row["replies"])
    assert row["kept"] == kept / 3


# The chat round on ordinary statements (docs/verification.md, "A chat round on ordinary
# statements"): each slice's floors fail the round-4 adapter. Measured with the stylometric
# voice classifier (2026-12-06), kept / kept in voice, round 4 -> round 5: the dreamer 2 / 1
# -> 5 / 5 (best of 4, first 6 statements); the poet 12 / 12 -> 33 / 27 and the philosopher
# 15 / 12 -> 27 / 19 (one reply, all 48).
STATEMENT_ROUND_FLOORS = [  # persona, eval negation options, kept, kept in voice
    ("dreamer", ("--best-of", "4", "--limit", "6"), 3, 3),
    ("poet", (), 20, 18),
    ("philosopher", (), 21, 15),
]


@pytest.mark.parametrize(("persona", "args", "kept_floor", "in_voice_floor"),
                         STATEMENT_ROUND_FLOORS, ids=[p for p, *_ in STATEMENT_ROUND_FLOORS])
def test_a_persona_keeps_a_negated_fact_it_is_told_in_its_own_voice(
        real_home: Path, persona: str, args: tuple[str, ...], kept_floor: int,
        in_voice_floor: int) -> None:
    """Told a negated fact, the persona keeps it in at least ``kept_floor`` of the held-out
    statements, and in a reply the classifier gives to it in at least ``in_voice_floor``."""
    import json

    done = run_agent(real_home, "eval", "negation", "-p", persona, *args, "--json")
    replies = json.loads(done.stdout)["rows"][persona]["replies"]
    kept = [v for v in replies if v["negations_kept"] == v["negations"]]
    kept_in_voice = [v for v in replies if v["refused"] is None]
    summary = [(v["refused"], v["reply"]) for v in replies]
    assert len(kept) >= kept_floor, summary
    assert len(kept_in_voice) >= in_voice_floor, summary


def test_best_of_keeps_the_real_interface_from_pointing_at_commands_that_do_not_exist(
        real_home: Path) -> None:
    """agent eval negation -p interface --best-of 4 on the first 12 statements ranks as
    agent chat --best-of does: a sample naming an agent command, option or persona that does
    not exist goes below the others. Measured: 7 of the 12 chosen replies named one
    ("Try `agent chat -p hunter`") before the check, none with it."""
    import json

    from hyperlex.cli import cli
    from hyperlex.cli.command_refs import CommandReferences
    from hyperlex.host import Host

    done = run_agent(real_home, "eval", "negation", "-p", "interface", "--best-of", "4",
                     "--limit", "12", "--json")
    replies = json.loads(done.stdout)["rows"]["interface"]["replies"]
    refs = CommandReferences(cli, Host().personas)
    wrong = [(problem, v["reply"]) for v in replies if (problem := refs.problem(v["reply"]))]
    assert len(replies) == 12 and len(wrong) <= 1, wrong


def test_best_of_ranks_the_real_poets_chosen_sample_at_least_as_high_as_one_reply(
        engine) -> None:
    """agent eval negation --best-of 4 on the real poet (3 statements, 48 tokens): the first
    sample of each statement is the reply --best-of 1 gives (same seed, same batch), and the
    chosen sample ranks at least as high: where that reply flips none of the statement's
    facts, neither does the chosen one, and it keeps at least as many negations."""
    from dataclasses import replace

    from hyperlex.eval.faithful import Proposal, chat_records, chat_verdicts
    from hyperlex.eval.fidelity import PersonaClassifier, load_sets
    from hyperlex.eval.negation import best_replies, load_statements
    from hyperlex.host import Host

    encoder = Host().scene_encoders["default"]
    statements = load_statements(encoder)[:3]
    poet = engine.personas["poet"]
    classifier = PersonaClassifier({n: load_sets(p)[1] for n, p in engine.personas.items()
                                    if not p.is_layer})
    params = replace(poet.contract.params(), seed=0, max_new_tokens=48)
    one = chat_records(engine, poet, statements, [Proposal((), params)], encoder,
                       classifier).verdicts
    replies, readings, attributions = best_replies(engine, poet, statements, (), params, 4,
                                                   encoder, classifier)
    four = chat_verdicts("poet", statements, "best of 4", replies, readings, classifier,
                         attributions).verdicts
    for single, chosen in zip(one, four, strict=True):
        assert single["statement"] == chosen["statement"]
        if single["refused"] != "polarity flipped":
            assert chosen["refused"] != "polarity flipped", (single, chosen)
            assert chosen["negations_kept"] >= single["negations_kept"], (single, chosen)
    assert sum(v["negations_kept"] for v in four) >= 1  # some sample restates a negation


CAST = ("dreamer", "interface", "logician", "philosopher", "poet", "scientist")


@pytest.fixture(scope="module")
def voice_classifier() -> Any:
    from hyperlex.eval.fidelity import PersonaClassifier, load_sets
    from hyperlex.host import Host

    return PersonaClassifier({n: load_sets(p)[1] for n, p in Host().personas.items()
                              if not p.is_layer})


@pytest.mark.parametrize("persona", CAST)
def test_agent_chat_best_of_keeps_the_users_negated_fact_in_each_personas_voice(
        real_home: Path, voice_classifier: Any, persona: str) -> None:
    """Issue 17's check: told "The old fisherman does not trust the sea.", each persona
    answers with agent chat --best-of 4 (seed 0) with a reply that keeps the negation and
    that the voice classifier gives to it. The four samples are each read back and scored;
    the reply is the one that ranks first (flips none of the user's facts, names no command
    that does not exist, keeps the most negations, then reads most as the persona's)."""
    import json

    done = run_agent(real_home, "chat", "-p", persona, "--best-of", "4", "--no-store",
                     "--json", "-o", "seed", "0", "-m",
                     "The old fisherman does not trust the sea.")
    turn = json.loads(done.stdout.splitlines()[-1])
    report = turn["annotations"]["best_of"]
    samples = report["samples"]
    chosen = samples[report["chosen"]]
    assert report["n"] == len(samples) == 4
    assert turn["reply"] == chosen["text"].strip()
    assert all(0.0 <= s["voice"] <= 1.0 for s in samples)
    assert all(s["facts"] == s["negations"] >= 1 for s in samples)
    rank = [(-s["flipped"], -(s["problem"] is not None), s["negations_kept"], s["voice"],
             s["facts_kept"], -s["index"]) for s in samples]
    assert rank[report["chosen"]] == max(rank)
    assert turn["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in samples)
    assert chosen["flipped"] == 0 and chosen["negations_kept"] == chosen["negations"], turn
    assert voice_classifier.predict([turn["reply"]]) == [persona], turn["reply"]


def test_scene_say_best_of_says_the_writers_most_faithful_sample(real_home: Path,
                                                                 tmp_path: Path) -> None:
    """agent scene say --best-of 4 with the real scene-writer on a held-out scene with a
    negated link (llama.cpp, four sequences): every sample is read back, and the one said
    ranks first (no flip, then the most links and things kept)."""
    import json

    from hyperlex.eval.roundtrip import load_scenes

    scene = next(s for s in load_scenes(["heldout"], shipped=False)
                 if any(link.polarity < 0 for link in s.scene.links))
    scene_file = tmp_path / "scene.json"
    scene_file.write_text(json.dumps(scene.scene.to_dict()))
    done = run_agent(real_home, "scene", "say", str(scene_file), "--best-of", "4", "-o",
                     "seed", "0", "--engine", "llamacpp", "--json")
    said = json.loads(done.stdout)
    samples = said["best_of"]["samples"]
    ranks = [tuple(s["rank"]) for s in samples]
    assert len(samples) == 4 and said["best_of"]["chosen"] == ranks.index(max(ranks))
    assert said["reply"] == samples[said["best_of"]["chosen"]]["text"]
    assert said["score"]["hyperlexemes"]["recall"] >= 0.6, said


def test_self_replay_has_the_real_philosopher_answer_prompts_it_never_saw(
        real_home: Path, tmp_path: Path) -> None:
    """agent data distill --self --fresh-prompts: the prompts come from the other personas'
    data, none of the philosopher's own or held out anywhere, and its adapter answers them
    (greedy, the replies are not the bare base's)."""
    import json

    from hyperlex.host import Host
    from hyperlex.training.data import normalize_prompt
    from hyperlex.training.distill import training_prompts

    replies = {}
    for teacher in ("self", "base"):
        out = tmp_path / f"{teacher}.jsonl"
        run_agent(real_home, "data", "distill", "-p", "philosopher", "--fresh-prompts", "2",
                  "--seed", "5", "--out", str(out), *(["--self"] if teacher == "self" else []),
                  "-o", "temperature", "0", "-o", "max_new_tokens", "24")
        replies[teacher] = {r["human"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert replies["self"].keys() == replies["base"].keys() and len(replies["self"]) == 2
    personas = [p for p in Host().personas.values() if not (p.is_layer or p.is_mood)]
    philosopher = next(p for p in personas if p.name == "philosopher")
    off_limits = training_prompts(philosopher).union(
        *(training_prompts(p, heldout=True) for p in personas))
    for prompt, record in replies["self"].items():
        assert normalize_prompt(prompt) not in off_limits
        assert record["meta"]["teacher"] == "self:philosopher@local:smollm2-135m-instruct"
        assert record["text"] != replies["base"][prompt]["text"]


def test_an_anchored_round_of_the_real_philosopher_starts_at_its_anchor(
        real_home: Path, tmp_path: Path) -> None:
    """agent train --anchor-adapter on the real model: the anchor's states line up with the
    round's reply positions (the first step's KL is 0 when the round starts from its anchor,
    dropout off), the counterfactual turns left free add nothing to it, and the round moves."""
    import json
    import shutil

    from hyperlex.personas import __file__ as personas_init

    bundle = Path(shutil.copytree(Path(personas_init).parent / "philosopher",
                                  tmp_path / "philosopher"))
    shipped = json.loads((bundle / "adapter" / "training_card.json").read_text())["round"]
    voice = (bundle / "data" / "train.jsonl").read_text().splitlines()[:3]
    turns = (bundle / "data" / "hindsight-negated.jsonl").read_text().splitlines()[:3]
    (bundle / "data" / "voice.jsonl").write_text("\n".join(voice) + "\n")
    (bundle / "data" / "turns.jsonl").write_text("\n".join(turns) + "\n")
    card = json.loads(run_agent(
        real_home, "train", str(bundle), "--data", "data/voice.jsonl", "--extra-data",
        "data/turns.jsonl", "--heldout", "data/none.jsonl", "--init-adapter", "adapter/",
        "--anchor-adapter", "adapter/", "--unanchored-data", "data/turns.jsonl",
        "--dropout", "0", "--epochs", "2", "--batch-size", "6", "--lr", "0.005",
        "--json").stdout)
    assert card["round"] == shipped + 1 and card["steps"] == 2
    assert card["anchor"]["round"] == shipped and card["anchor"]["unanchored_data"] == [
        "data/turns.jsonl"]
    assert card["anchor"]["first_kl"] == pytest.approx(0.0, abs=1e-4)
    assert card["anchor"]["final_kl"] > 10 * max(card["anchor"]["first_kl"], 1e-6)
