"""V rows: what ``agent chat --best-of 4`` costs a turn on llama.cpp. V1: the wall time of a
turn that samples four replies and checks each against the user's facts, over a turn with
one reply; the samples decode together, in four sequences of one context, as ``agent chat
--best-of 4`` opens the engine. V2: that turn against the same with one sequence, where the
samples take turns."""

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
