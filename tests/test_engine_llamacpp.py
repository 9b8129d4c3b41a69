"""The llama.cpp engine on the tiny random Llama (an F32 GGUF written from its weights): the
same greedy replies as the transformers engine, persona switches that never reuse another
persona's KV cache, moods as adapter scales, concurrent turns on a pool of contexts."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

import pytest

from hyperlex.engines.llamacpp.contexts import PREFILL_BLOCK
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona

from .conftest import write_bundle

pytest.importorskip("llama_cpp")

GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
MESSAGES = [{"role": "system", "content": "You are a test."},
            {"role": "user", "content": "What is time?"}]


@pytest.fixture(scope="module")
def bundles(tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path_factory) -> list[Persona]:
    gloom = write_bundle(tmp_path_factory.mktemp("moods"), "gloom", adapter_seed=7,
                         tiny_base=tiny_base, extra_yaml="kind: mood\n")
    return [Persona.from_dir(p) for p in (tiny_bundles["alpha"], tiny_bundles["beta"], gloom)]


@pytest.fixture(scope="module")
def torch_engine(tiny_base: Path, bundles: list[Persona]):
    from hyperlex.engines.torch.engine import TorchEngine

    return TorchEngine(bundles, base=str(tiny_base), progress=False)


def llama_engine(tiny_base: Path, bundles: list[Persona], **kwargs):
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(bundles, base=str(tiny_base), exact=True, threads=1, n_ctx=512,
                          progress=False, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_base: Path, bundles: list[Persona]):
    return llama_engine(tiny_base, bundles)


def test_models_load_without_ggml_extra_buffer_types(engine) -> None:
    """ggml's AMX buffer type segfaults on the first prompt on CPUs with AMX (llama-cpp-python
    0.3.36, the embedded Q4_1 GGUF): the engine loads its model without extra buffer types,
    and leaves llama-cpp-python's defaults as they were for anyone else."""
    import llama_cpp

    assert engine.llama.model_params.use_extra_bufts is False
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True


def test_prompts_are_the_tokens_transformers_would_feed(engine, torch_engine) -> None:
    history = [*MESSAGES, {"role": "assistant", "content": "It passes."},
               {"role": "user", "content": "And space? ünïcode, 42"}]
    for messages in (MESSAGES, history, MESSAGES[1:]):
        expected = torch_engine.encode(messages)["input_ids"][0].tolist()
        assert engine.encode(messages) == expected
    assert engine.count_tokens(MESSAGES) == torch_engine.count_tokens(MESSAGES)


def test_each_persona_and_the_bare_base_reply_as_the_transformers_engine(engine, torch_engine):
    for persona in ("alpha", "beta", None):
        ours = engine.generate(MESSAGES, persona, GREEDY)
        theirs = torch_engine.generate(MESSAGES, persona, GREEDY)
        assert ours.text == theirs.text, persona
        assert ours.usage == theirs.usage and ours.finish_reason == theirs.finish_reason
    assert len({engine.generate(MESSAGES, p, GREEDY).text for p in ("alpha", "beta", None)}) == 3


def test_the_repetition_penalty_counts_the_reply_and_matches_transformers(
        engine, torch_engine) -> None:
    """A penalty over the reply's own tokens (not the prompt's) on both engines: the first
    token, chosen before the reply holds any, is the unpenalized one, and the replies agree."""
    penalized = GenerationParams(temperature=0, max_new_tokens=12, repetition_penalty=1.3)
    first = GenerationParams(temperature=0, max_new_tokens=1)
    for persona in ("alpha", None):
        ours = engine.generate(MESSAGES, persona, penalized)
        assert ours.text == torch_engine.generate(MESSAGES, persona, penalized).text
        assert ours.text.startswith(engine.generate(MESSAGES, persona, first).text)
    assert engine.generate(MESSAGES, "alpha", penalized).text != \
        engine.generate(MESSAGES, "alpha", GREEDY).text


def test_a_mood_layer_is_the_mood_adapter_at_its_weight(engine, torch_engine) -> None:
    for weight in (1.0, 0.5):
        layers = [("gloom", weight)]
        assert engine.generate(MESSAGES, "alpha", GREEDY, layers=layers).text == \
            torch_engine.generate(MESSAGES, "alpha", GREEDY, layers=layers).text
    with pytest.raises(UnknownPersona, match="unknown mood 'alpha'"):
        engine.stream(MESSAGES, "alpha", layers=[("alpha", 1.0)])


def test_a_conversation_switching_personas_equals_fresh_runs(tiny_base: Path, bundles,
                                                             engine) -> None:
    """Each turn, whatever ran before it in the same context, gives the tokens of that
    persona run from an empty cache."""
    turns = [("alpha", "What is time?"), ("beta", "And space?"), ("alpha", "Say more."),
             (None, "Plainly?"), ("beta", "Last one.")]
    messages: list[dict[str, str]] = [MESSAGES[0]]
    for persona, text in turns:
        messages.append({"role": "user", "content": text})
        reply = engine.generate(messages, persona, GREEDY).text
        fresh = llama_engine(tiny_base, bundles)
        assert reply == fresh.generate(messages, persona, GREEDY).text, (persona, text)
        fresh.close()
        messages.append({"role": "assistant", "content": reply})


def test_without_the_prompt_cache_every_prompt_is_prefilled_whole(tiny_base: Path, bundles,
                                                                  monkeypatch) -> None:
    from hyperlex.engines.llamacpp.contexts import Slot

    fresh = llama_engine(tiny_base, bundles, prompt_cache=False)
    params = GenerationParams(temperature=0, max_new_tokens=1)
    fresh.generate(MESSAGES, "alpha", params)
    decoded: list[int] = []
    original = Slot.decode
    monkeypatch.setattr(Slot, "decode", lambda slot, tokens: (decoded.append(len(tokens)),
                                                              original(slot, tokens))[1])
    fresh.generate(MESSAGES, "alpha", params)
    # the prompt, whole; the one reply token is sampled and never decoded (nothing follows)
    assert sum(decoded) == fresh.count_tokens(MESSAGES)


def test_a_prompt_gets_the_same_logits_whatever_the_cache_held(engine) -> None:
    """Greedy replies are reproducible: the logits after a prompt are bit for bit the same
    from an empty cache, from a cache holding a longer conversation that shares only part of
    the prompt, and from a cache that holds the prompt's prefix and a reply decoded token by
    token."""
    import numpy as np

    long = [MESSAGES[0], {"role": "user", "content": "word " * 150},
            {"role": "assistant", "content": "reply " * 40}]
    prompt = engine.encode([*long[:2], {"role": "user", "content": "Again?"}])
    others = [engine.encode([*long, {"role": "user", "content": "More?"}]),  # shares 150+
              engine.encode(long[:2], add_generation_prompt=False)[:-3],  # a cut prefix
              engine.encode(long[:2])]
    with engine.slot() as slot:
        slot.switch(("alpha", ()))
        slot.forget()
        slot.switch(("alpha", ()))
        slot.prefill(prompt)
        fresh = slot.logits()
        for other in others:
            slot.prefill(other)
            for _ in range(5):  # a reply, decoded one token at a time
                slot.decode([int(np.argmax(slot.logits()))])
            slot.prefill(prompt)
            assert np.array_equal(slot.logits(), fresh)
        slot.forget()


def test_returning_to_a_persona_prefills_only_what_was_added(engine, monkeypatch) -> None:
    from hyperlex.engines.llamacpp.contexts import Slot

    decoded: list[int] = []
    original = Slot.decode

    def counting(slot, tokens):
        decoded.append(len(tokens))
        return original(slot, tokens)

    params = GenerationParams(temperature=0, max_new_tokens=1)
    first = [MESSAGES[0], {"role": "user", "content": "A question for alpha. " * 30}]
    engine.generate(first, "alpha", params)
    engine.generate([MESSAGES[0], {"role": "user", "content": "Now beta."}], "beta", params)
    monkeypatch.setattr(Slot, "decode", counting)
    later = [*first, {"role": "assistant", "content": "x"}, {"role": "user", "content": "More."}]
    engine.generate(later, "alpha", params)
    # alpha's cache came back: only the new tail of the prompt is decoded, from the last
    # whole block of the cached prefix, not all of it
    added = engine.count_tokens(later) - engine.count_tokens(first)
    assert 0 < sum(decoded) < added + PREFILL_BLOCK + 1 < engine.count_tokens(later)


def test_streaming_stop_strings_and_lengths(engine, torch_engine) -> None:
    generation = engine.stream(MESSAGES, "alpha", GREEDY)
    pieces = list(generation)
    assert "".join(pieces) == generation.text and len(pieces) > 1
    assert generation.usage.completion_tokens == GREEDY.max_new_tokens
    assert generation.finish_reason == "length"
    full = generation.text
    stop = full[3:6]
    cut = engine.generate(MESSAGES, "alpha", GREEDY, stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(engine) -> None:
    params = GenerationParams(temperature=1.0, top_p=0.9, top_k=40, seed=3, max_new_tokens=10)
    assert engine.generate(MESSAGES, "beta", params).text == \
        engine.generate(MESSAGES, "beta", params).text


def test_concurrent_turns_on_two_contexts_never_mix_personas(tiny_base: Path, bundles,
                                                             engine) -> None:
    expected = {p: engine.generate(MESSAGES, p, GREEDY).text for p in ("alpha", "beta")}
    pool = llama_engine(tiny_base, bundles, contexts=2)
    results: dict[tuple[str, int], str] = {}

    def worker(persona: str, i: int) -> None:
        results[(persona, i)] = pool.generate(MESSAGES, persona, GREEDY).text

    threads = [threading.Thread(target=worker, args=(p, i)) for i in range(3)
               for p in ("alpha", "beta")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()
    assert all(text == expected[persona] for (persona, _), text in results.items())


def test_unknown_persona_and_missing_library_are_clear_errors(engine, monkeypatch) -> None:
    with pytest.raises(UnknownPersona, match="unknown persona 'gamma'"):
        engine.stream(MESSAGES, "gamma")
    import hyperlex.engines.llamacpp.engine as engine_llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(HyperlexError, match=r"pip install 'hyperlex\[llamacpp\]'"):
        engine_llamacpp.LlamaCppEngine([])


def test_prefill_ahead_leaves_only_the_new_message_to_decode(engine, monkeypatch) -> None:
    from hyperlex.engines.llamacpp.contexts import Slot

    decoded: list[int] = []
    original = Slot.decode
    system = {"role": "system", "content": "You are a test. Scene: a long prefix. " * 8}
    engine.prefill([system], "beta")
    monkeypatch.setattr(Slot, "decode",
                        lambda slot, tokens: decoded.append(len(tokens)) or original(slot, tokens))
    messages = [system, {"role": "user", "content": "Hi"}]
    reply = engine.generate(messages, "beta", GenerationParams(temperature=0, max_new_tokens=1))
    ahead = len(engine.encode([system], add_generation_prompt=False))
    reused = ahead - ahead % PREFILL_BLOCK  # the whole blocks of the prefilled prefix
    assert sum(decoded) == engine.count_tokens(messages) - reused
    assert reused > 0
    monkeypatch.undo()
    with engine.slot() as slot:  # the engine's one context
        slot.forget()  # a fresh run must give the same reply
    assert reply.text == engine.generate(messages, "beta", GenerationParams(
        temperature=0, max_new_tokens=1)).text


# batched decoding: several turns of one composition in one context ----------------------------

QUESTIONS = ["What is time?", "Why do we dream?", "Describe the sea.", "Can machines think?"]


def ask(question: str) -> list[dict[str, str]]:
    return [MESSAGES[0], {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def alone(engine) -> dict[tuple[str, str], str]:
    """Every (persona, question)'s greedy reply with one turn per context."""
    return {(p, q): engine.generate(ask(q), p, GREEDY).text
            for p in ("alpha", "beta") for q in QUESTIONS}


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """The number of turns in each decode step any context runs."""
    from hyperlex.engines.llamacpp.contexts import Context

    sizes: list[int] = []
    original = Context.step
    monkeypatch.setattr(Context, "step", lambda context, slots, tokens: (
        sizes.append(len(slots)), original(context, slots, tokens))[1])
    return sizes


def run_together(pool, jobs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``jobs`` as concurrent turns, queued while the pool's contexts are held so that they
    start together."""
    results: dict[tuple[str, str], str] = {}

    def worker(persona: str, question: str) -> None:
        results[(persona, question)] = pool.generate(ask(question), persona, GREEDY).text

    start_together(pool, [threading.Thread(target=worker, args=job) for job in jobs])
    return results


def start_together(pool, threads: list[threading.Thread]) -> None:
    """Run ``threads`` (one turn each) to their end, their turns queued while the pool's
    contexts are held so that they start together."""
    with contextlib.ExitStack() as held:
        for _ in range(pool.contexts):
            held.enter_context(pool.slot())
        for thread in threads:
            thread.start()
        wait_until(lambda: pool.turns()["waiting"] == len(threads))
    for thread in threads:
        thread.join()


def wait_until(condition) -> None:
    """Wait for a state the test itself brings about (no timing is asserted)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the state was never reached"
        time.sleep(0.01)


def test_turns_of_one_persona_decode_together_and_reply_as_alone(tiny_base, bundles, alone,
                                                                 steps) -> None:
    pool = llama_engine(tiny_base, bundles, sequences=4)
    together = run_together(pool, [("alpha", q) for q in QUESTIONS])
    pool.close()
    assert together == {k: v for k, v in alone.items() if k[0] == "alpha"}
    assert max(steps) == 4  # one llama_decode per step for the four turns


def test_two_personas_on_one_context_take_turns_and_never_mix(tiny_base, bundles, alone,
                                                              steps) -> None:
    pool = llama_engine(tiny_base, bundles, sequences=4)
    jobs = [(p, q) for q in QUESTIONS for p in ("alpha", "beta")]
    together = run_together(pool, jobs)
    pool.close()
    assert together == alone
    assert max(steps) == 4  # each persona's four turns together, one persona at a time


def test_contexts_are_given_to_personas_by_demand(tiny_base, bundles, alone, steps) -> None:
    pool = llama_engine(tiny_base, bundles, contexts=2, sequences=2)
    jobs = [(p, q) for q in QUESTIONS for p in ("alpha", "beta")]
    together = run_together(pool, jobs)
    pool.close()
    assert together == alone
    assert max(steps) == 2


@pytest.fixture
def gated_steps(monkeypatch) -> tuple[list[int], threading.Event]:
    """Like ``steps``, but the decoder waits inside its first step until the event is set."""
    from hyperlex.engines.llamacpp.contexts import Context

    sizes: list[int] = []
    gate = threading.Event()
    original = Context.step

    def gated(context, slots, tokens):
        sizes.append(len(slots))
        if len(sizes) == 1:
            assert gate.wait(60), "the test never opened the gate"
        return original(context, slots, tokens)

    monkeypatch.setattr(Context, "step", gated)
    return sizes, gate


def test_a_turn_joins_a_running_batch_between_steps(tiny_base, bundles, alone,
                                                    gated_steps) -> None:
    """Continuous batching: a turn that arrives while another runs is admitted beside it
    and decoded in the same steps from its next one on; both reply as alone."""
    sizes, gate = gated_steps
    pool = llama_engine(tiny_base, bundles, sequences=4)
    results: dict[str, str] = {}

    def worker(question: str) -> None:
        results[question] = pool.generate(ask(question), "alpha", GREEDY).text

    first = threading.Thread(target=worker, args=(QUESTIONS[0],))
    first.start()
    wait_until(lambda: len(sizes) == 1)  # the first turn's first step is under way
    second = threading.Thread(target=worker, args=(QUESTIONS[1],))
    second.start()
    wait_until(lambda: pool.turns()["running"] == 2)
    gate.set()
    first.join()
    second.join()
    pool.close()
    assert sizes[0] == 1 and 2 in sizes
    assert results == {q: alone[("alpha", q)] for q in QUESTIONS[:2]}


def test_cancelling_one_turn_of_a_batch_leaves_the_others_as_alone(tiny_base, bundles, alone,
                                                                   gated_steps) -> None:
    sizes, gate = gated_steps
    pool = llama_engine(tiny_base, bundles, sequences=4)
    results: dict[str, str] = {}
    long = GenerationParams(temperature=0, max_new_tokens=400)
    cancelled = pool.stream(ask(QUESTIONS[1]), "alpha", long)

    def keep() -> None:
        results["kept"] = pool.generate(ask(QUESTIONS[0]), "alpha", GREEDY).text

    def cancel() -> None:
        for _ in cancelled:  # the first pieces: then cancel, and let the decoder go on
            cancelled.cancel()
            gate.set()

    start_together(pool, [threading.Thread(target=keep), threading.Thread(target=cancel)])
    pool.close()
    assert cancelled.finish_reason == "cancelled" and cancelled.usage.completion_tokens < 400
    assert results["kept"] == alone[("alpha", QUESTIONS[0])] and sizes[0] == 2


def test_a_new_turn_copies_the_prompt_prefix_a_sibling_sequence_holds(tiny_base, bundles,
                                                                      monkeypatch) -> None:
    from hyperlex.engines.llamacpp.contexts import Slot

    pool = llama_engine(tiny_base, bundles, sequences=2)
    system = {"role": "system", "content": "You are a test. Scene: a long prefix. " * 8}
    params = GenerationParams(temperature=0, max_new_tokens=4)
    first = pool.stream([system, {"role": "user", "content": "Hi"}], "beta", params)
    pieces = iter(first)
    next(pieces)  # the first turn holds sequence 0 while the second starts
    decoded: list[int] = []
    original = Slot.decode
    monkeypatch.setattr(Slot, "decode",
                        lambda slot, tokens: decoded.append(len(tokens)) or original(slot, tokens))
    messages = [system, {"role": "user", "content": "Hello there"}]
    reply = pool.generate(messages, "beta", params).text
    shared = len(pool.encode([system], add_generation_prompt=False))
    assert sum(decoded) == pool.count_tokens(messages) - (shared - shared % PREFILL_BLOCK)
    list(pieces)
    monkeypatch.undo()
    fresh = llama_engine(tiny_base, bundles)
    assert reply == fresh.generate(messages, "beta", params).text
    fresh.close()
    pool.close()


@pytest.fixture
def prefilled(monkeypatch) -> list[int]:
    """The tokens of every prompt block any sequence decodes (prefill, not decode steps)."""
    from hyperlex.engines.llamacpp.contexts import Slot

    sizes: list[int] = []
    original = Slot.decode
    monkeypatch.setattr(Slot, "decode",
                        lambda slot, tokens: sizes.append(len(tokens)) or original(slot, tokens))
    return sizes


def test_samples_of_one_prompt_prefill_it_once_and_draw_as_alone(tiny_base, bundles, steps,
                                                                 prefilled) -> None:
    """The samples of a best-of turn: four seeds of one prompt started together take the
    first one's prefill and first logits, and each draws what it draws alone."""
    samples = [GenerationParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=seed)
               for seed in range(4)]
    messages = ask(QUESTIONS[2])
    pool = llama_engine(tiny_base, bundles, sequences=4)
    results: dict[int, list[str]] = {}

    def worker(params: GenerationParams) -> None:
        generation = pool.stream(messages, "alpha", params)
        results[params.seed] = list(generation)

    start_together(pool, [threading.Thread(target=worker, args=(p,)) for p in samples])
    assert sum(prefilled) == pool.count_tokens(messages)
    assert max(steps) == 4
    pool.close()
    single = llama_engine(tiny_base, bundles)
    alone = {p.seed: list(single.stream(messages, "alpha", p)) for p in samples}
    single.close()
    assert results == alone
    assert len({"".join(pieces) for pieces in alone.values()}) > 1  # the seeds differ


def test_a_sample_whose_copied_cache_is_refused_prefills_its_prompt(
        tiny_base, bundles, alone, prefilled, monkeypatch) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data", lambda *args: 0)
    pool = llama_engine(tiny_base, bundles, sequences=2)
    messages = ask(QUESTIONS[0])
    replies: list[str] = []
    start_together(pool, [threading.Thread(target=lambda: replies.append(
        pool.generate(messages, "alpha", GREEDY).text)) for _ in range(2)])
    assert sum(prefilled) == 2 * pool.count_tokens(messages)
    pool.close()
    assert replies == [alone[("alpha", QUESTIONS[0])]] * 2


def test_a_prompt_asked_again_is_not_prefilled_again_under_its_own_persona_only(
        tiny_base, bundles, prefilled) -> None:
    engine = llama_engine(tiny_base, bundles)
    first = engine.generate(MESSAGES, "alpha", GREEDY).text
    prefilled.clear()
    assert engine.generate(MESSAGES, "alpha", GREEDY).text == first
    assert prefilled == []  # the sequence still held the prompt and its first logits
    other = engine.generate(MESSAGES, "beta", GREEDY).text
    assert sum(prefilled) == engine.count_tokens(MESSAGES)  # another persona's cache: anew
    engine.close()
    fresh = llama_engine(tiny_base, bundles)
    assert fresh.generate(MESSAGES, "beta", GREEDY).text == other
    fresh.close()


def test_the_sampler_keeps_transformers_nucleus_and_draws_as_numpy_choice() -> None:
    """top-p sorts only the head of the vocabulary, and the draw skips numpy's
    vocabulary-sized choice; on a language model's peaked distributions both give what the
    whole sort and ``Generator.choice`` give."""
    import numpy as np

    from hyperlex.engines.llamacpp.engine import draw, nucleus

    def whole_sort(probs, top_p):  # TopPLogitsWarper, in float64
        order = np.argsort(probs)
        kept = probs.copy()
        kept[order[np.cumsum(probs[order]) <= 1 - top_p]] = 0.0
        return kept / kept.sum()

    rng = np.random.default_rng(0)
    for case in range(60):
        logits = rng.standard_normal(49152) * (3 + case % 6)
        logits[rng.integers(49152, size=4)] += 12  # a few likely tokens, as after a prompt
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        for top_p in (0.5, 0.9, 0.95):
            reference = whole_sort(probs, top_p)
            candidates = nucleus(probs.astype(np.float32), top_p)
            assert list(candidates) == list(np.flatnonzero(reference)), (case, top_p)
            for seed in range(3):
                expected = np.random.default_rng(seed).choice(len(reference), p=reference)
                assert draw(np.random.default_rng(seed), probs, candidates) == expected
    flat = np.full(1000, 1 / 1000)
    assert len(nucleus(flat, 0.5)) == 500  # the head grows until it holds top_p
