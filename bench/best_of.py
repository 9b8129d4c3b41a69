"""V rows: what ``agent chat --best-of 4`` costs a turn on llama.cpp. V1: the wall time of a
turn that samples four replies and checks each against the user's facts, over a turn with
one reply; the samples decode together, in four sequences of one context, as ``agent chat
--best-of 4`` opens the engine. V2: that turn against the same with one sequence, where the
samples take turns. V3: what the first such turn pays once, fitting the voice classifier on
the cast's reference replies and scoring the four samples, against the sentence-embedding
classifier it replaced (docs/verification.md, "The voice classifier")."""

from __future__ import annotations

from typing import Any

from bench.cast import Cast
from bench.common import Config, Row, collect, median_time

STATEMENT = "The old fisherman does not trust the sea."
BEST_OF = 4


def best_of_rows(config: Config, cast: Cast) -> list[Row]:
    from hyperlex.engines.registry import engine_entry

    if not engine_entry("llamacpp").available():
        return []
    from bench.llamacpp import llama_threads
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine
    from hyperlex.host import Host

    host = Host()
    host.scene_encoders["default"](STATEMENT)  # spaCy loads outside the timings
    persona = cast.personas(1)[0]
    times: dict[int, dict[str, Any]] = {}
    for sequences in (BEST_OF, 1):
        engine = LlamaCppEngine([persona], base=config.base, progress=False,
                                threads=llama_threads(), sequences=sequences)
        times[sequences] = {"best_of": turn_time(host, engine, persona, BEST_OF, config)}
        if sequences == BEST_OF:
            times[sequences]["one"] = turn_time(host, engine, persona, 1, config)
        engine.close()
        collect()
    together, apart = times[BEST_OF]["best_of"], times[1]["best_of"]
    one = times[BEST_OF]["one"]
    details = {"one": one[1], "together": together[1], "apart": apart[1]}
    return [
        Row("V1", f"llama.cpp: a --best-of {BEST_OF} turn (vs one reply)", together[0], one[0],
            unit="s", alt_label="one reply", ratio=together[0] / one[0], target="<= 3x",
            met=together[0] / one[0] <= 3, details=details),
        Row("V2", f"llama.cpp: --best-of {BEST_OF}, samples decoded together (vs one after "
            "another)", together[0], apart[0], unit="s", alt_label="1 sequence",
            ratio=together[0] / apart[0], target="<= 0.8x", met=together[0] / apart[0] <= 0.8,
            details=details),
    ]


def voice_rows(config: Config) -> list[Row]:
    """V3: the stylometric classifier's fit and four scores, against all-MiniLM-L6-v2 loaded,
    the references embedded and a logistic regression fitted on them, then the same scores;
    each from cold (a new classifier, a new embedder) per repeat."""
    from sklearn.linear_model import LogisticRegression

    from hyperlex.engines.embeddings import minilm_embedder
    from hyperlex.eval.fidelity import PersonaClassifier, load_sets
    from hyperlex.host import Host

    references = {n: load_sets(p)[1] for n, p in Host().personas.items()
                  if not p.is_layer and p.adapter_dir is not None}
    samples = [STATEMENT] * BEST_OF

    def stylometric() -> None:
        PersonaClassifier(references).probability(samples, "poet")

    def embeddings() -> None:
        embed = minilm_embedder()
        texts = [t for name in sorted(references) for t in references[name]]
        labels = [name for name in sorted(references) for _ in references[name]]
        LogisticRegression(max_iter=2000).fit(embed(texts), labels).predict_proba(
            embed(samples))

    repeats = 1 if config.quick else min(config.repeats, 3)
    ours, ours_samples = median_time(stylometric, repeats)
    theirs, their_samples = median_time(embeddings, repeats)
    return [Row("V3", "the first --best-of turn's voice classifier: fit and score (vs "
                "sentence embeddings)", ours, theirs, unit="s", alt_label="MiniLM",
                ratio=ours / theirs, target="<= 0.5x", met=ours / theirs <= 0.5,
                details={"references": sum(map(len, references.values())),
                         "stylometric": ours_samples, "minilm": their_samples})]


def turn_time(host: Any, engine: Any, persona: Any, best_of: int,
              config: Config) -> tuple[float, dict[str, Any]]:
    """Median wall seconds of a first turn answering :data:`STATEMENT` with ``best_of``
    samples (the persona's sampling settings, or temperature 0.7 for a greedy contract;
    seed 0, ``config.max_new_tokens``), after a warm-up turn. Each turn is a new
    conversation as ``agent chat`` starts one: the caches emptied (no turn reuses another's
    prompt or reply), then the system message prefilled ahead, untimed."""
    from hyperlex.agent.controller import Controller

    tokens: list[int] = []
    temperature = persona.contract.params().temperature or 0.7
    options = {"seed": 0, "max_new_tokens": config.max_new_tokens, "temperature": temperature}
    controllers: list[Any] = []

    def start() -> None:
        with engine.slot() as slot:
            slot.forget()
        controller = Controller(host, engine, persona=persona.name, router=None,
                                overrides=options)
        controller.prefill()
        controllers.append(controller)

    def turn() -> None:
        sent = controllers.pop().send(STATEMENT, best_of=best_of)
        tokens.append(sent.complete().completion_tokens)

    start()
    turn()
    seconds, samples = median_time(turn, config.repeats, setup=start)
    return seconds, {"seconds": samples, "completion_tokens": tokens[1:]}
