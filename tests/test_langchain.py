"""The LangChain integration on the tiny model: LangChain's own standard test suites for
ChatPersona, then ChatPersona's and HyperlexAgent's behaviour, and one example chain on the
real embedded model."""

from __future__ import annotations

import inspect
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

import hyperlex.integrations.langchain.chat as hl
from hyperlex import hookimpl
from hyperlex.agent.store import Store, check_name
from hyperlex.errors import HyperlexError
from hyperlex.host import Host
from hyperlex.integrations.langchain.chat import ChatPersona, HyperlexAgent, PersonaNotAvailable
from hyperlex.persona.bundle import Persona

from .conftest import bundles_plugin, install_plugin, write_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path], tmp_path_factory):
    """The tiny base with personas alpha and beta and the mood gloom."""
    from hyperlex.engines.torch.engine import TorchEngine

    gloom = write_bundle(tmp_path_factory.mktemp("moods"), "gloom", adapter_seed=7,
                         tiny_base=tiny_base, extra_yaml="kind: mood\n")
    bundles = [*tiny_bundles.values(), gloom]
    return TorchEngine([Persona.from_dir(p) for p in bundles], base=str(tiny_base),
                       progress=False)


@pytest.fixture(autouse=True)
def no_shared_engines(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every test starts with an empty shared-engine registry (and leaves none behind)."""
    engines: dict[str, Any] = {}
    monkeypatch.setattr(hl, "_ENGINES", engines)
    return engines


# --- LangChain's standard suites -------------------------------------------------------------


class TinyChatPersona:
    """What the standard suites share: ChatPersona over an engine, and what it cannot do (the
    real-model suite in test_structured_real.py reuses it). The suites read
    ``chat_model_params`` as a property, so the module's engine fixture is put on the class
    by an autouse fixture before each test."""

    tiny_engine: Any = None

    @pytest.fixture(autouse=True)
    def _tiny_engine(self, engine) -> None:
        type(self).tiny_engine = engine

    @property
    def chat_model_class(self) -> type[ChatPersona]:
        return ChatPersona

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"persona": "alpha", "engine": self.tiny_engine}  # 8 tokens: the contract

    @property
    def has_tool_calling(self) -> bool:
        return False  # personas are plain text LoRA adapters; no tool-call format is trained

    @property
    def has_structured_output(self) -> bool:
        return False  # 8-token replies hold no JSON object; test_structured_real.py runs these

    @property
    def supports_json_mode(self) -> bool:
        return False  # as above

    @property
    def supports_image_inputs(self) -> bool:
        return False  # the base models are text-only; image blocks raise a ValueError

    @property
    def supports_image_urls(self) -> bool:
        return False  # text-only, as above

    @property
    def supports_image_tool_message(self) -> bool:
        return False  # neither images nor tool messages

    @property
    def supports_pdf_inputs(self) -> bool:
        return False  # text-only

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False  # neither files nor tool messages

    @property
    def supports_audio_inputs(self) -> bool:
        return False  # text-only

    @property
    def supports_video_inputs(self) -> bool:
        return False  # text-only

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False  # Anthropic's content format carries tool_use blocks; no tool calling

    @property
    def returns_usage_metadata(self) -> bool:
        return True  # the final chunk carries the engine's token counts

    @property
    def supports_model_override(self) -> bool:
        return False  # one base per engine; the per-call switch is persona=, not model=

    @property
    def enable_vcr_tests(self) -> bool:
        return False  # VCR records HTTP; the engine runs in-process


class TestChatPersonaUnit(TinyChatPersona, ChatModelUnitTests):
    pass


class TestChatPersonaIntegration(TinyChatPersona, ChatModelIntegrationTests):
    pass


# --- ChatPersona -------------------------------------------------------------------------------


class Spy:
    """Records every ``engine.stream`` call (messages, persona, params, stop, layers)."""

    def __init__(self, engine, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[tuple[Any, ...]] = []
        real = engine.stream

        def stream(messages, persona, params=None, stop=(), layers=(), **kwargs):
            self.calls.append((list(messages), persona, params, tuple(stop), tuple(layers)))
            return real(messages, persona, params, stop, layers, **kwargs)

        monkeypatch.setattr(engine, "stream", stream)

    @property
    def last(self) -> tuple[Any, ...]:
        return self.calls[-1]


def test_importing_the_integration_loads_neither_torch_nor_weights() -> None:
    code = ("import sys, hyperlex; assert 'langchain_core' not in sys.modules; "
            "from hyperlex.integrations.langchain.chat import ChatPersona, HyperlexAgent; "
            "m = ChatPersona(persona='poet', temperature=0); HyperlexAgent(); "
            "m._identifying_params; m._get_ls_params(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_shared_engine_is_loaded_on_the_first_call_and_only_once(
        tiny_base: Path, tiny_bundles: dict[str, Path], plugin_site: Path,
        monkeypatch: pytest.MonkeyPatch, no_shared_engines: dict[str, Any]) -> None:
    install_plugin(plugin_site, "tiny-cast", "tiny_cast", bundles_plugin(*tiny_bundles.values()))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "tiny-cast")
    model = ChatPersona(persona="alpha", base=str(tiny_base), temperature=0, max_tokens=4)
    configurable = model.configurable_fields(persona=ConfigurableField(id="persona"))
    assert model._identifying_params["base"] == "tiny-llama"
    assert no_shared_engines == {}  # constructing and identifying loads nothing

    first = configurable.invoke("hello", {"configurable": {"persona": "beta"}})
    assert first.response_metadata["persona"] == "beta"
    assert len(no_shared_engines) == 1
    loaded = hl.shared_engine(str(tiny_base))
    assert set(loaded.personas) >= {"alpha", "beta"}
    model.invoke("hello again")
    ChatPersona(persona="beta", base=str(tiny_base), max_tokens=2).invoke("and again")
    assert len(no_shared_engines) == 1 and hl.shared_engine(str(tiny_base)) is loaded
    with pytest.raises(HyperlexError, match="already loaded with dtype float32"):
        hl.shared_engine(str(tiny_base), dtype="bfloat16")


def test_an_unknown_persona_or_mood_names_the_installed_ones(engine) -> None:
    with pytest.raises(PersonaNotAvailable,
                       match="unknown persona 'nobody'; installed personas: alpha, beta"):
        ChatPersona(persona="nobody", engine=engine).invoke("hi")
    with pytest.raises(ValueError, match="installed personas: alpha, beta"):
        ChatPersona(persona="alpha", engine=engine).bind(persona="gloom").invoke("hi")
    with pytest.raises(ValueError, match="unknown mood 'sad'; installed moods: gloom"):
        ChatPersona(persona="alpha", engine=engine, mood="sad").invoke("hi")
    with pytest.raises(ValueError, match=r"must be in \(0, 2\]"):
        ChatPersona(persona="alpha", engine=engine, mood="gloom:3").invoke("hi")


def test_bad_arguments_are_refused_and_client_options_ignored(engine) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown argument.*model; choose the persona"):
        ChatPersona(model="alpha")
    with pytest.raises(ValidationError, match="temperature must be >= 0"):
        ChatPersona(persona="alpha", temperature=-1)
    ChatPersona(persona="alpha", timeout=5, max_retries=1, api_key="unused")
    with pytest.raises(ValueError, match="unsupported option.*colour"):
        ChatPersona(persona="alpha", engine=engine).invoke("hi", colour="red")


def test_tool_calling_and_images_are_refused_clearly(engine) -> None:
    model = ChatPersona(persona="alpha", engine=engine)
    with pytest.raises(NotImplementedError):
        model.bind_tools([])
    with pytest.raises(ValueError, match="does not support tool calling"):
        model.invoke([HumanMessage("hi"),
                      AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}])])
    image = {"type": "image", "url": "https://example.com/cat.png"}
    with pytest.raises(ValueError, match="takes text only; got a 'image' content block"):
        model.invoke([HumanMessage(content=[{"type": "text", "text": "see"}, image])])


def test_max_string_length_closes_every_string_the_schema_left_open(engine) -> None:
    """The random model never ends a string on its own; bounded, every reply closes and
    parses, sampled too, and the bound also reaches strings in lists and ``anyOf``."""
    from pydantic import BaseModel, Field

    class Log(BaseModel):
        ship: str
        crew: list[str] = Field(max_length=3)  # a bounded list: the reply fits max_tokens
        port: str | None

    for seed in range(6):
        model = ChatPersona(persona="alpha", engine=engine, temperature=1.0, seed=seed,
                            max_tokens=200)
        log = model.with_structured_output(Log, max_string_length=6).invoke("Log the ship.")
        assert isinstance(log, Log)
        assert all(len(text) <= 6 for text in [log.ship, *log.crew, log.port or ""])
    with pytest.raises(ValueError, match="needs a schema"):
        model.with_structured_output(method="json_mode", max_string_length=6)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        model.with_structured_output(Log, max_string_length=0)


def test_sampling_defaults_come_from_the_contract(engine, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    ChatPersona(persona="alpha", engine=engine).invoke("hi")
    params = spy.last[2]
    assert (params.temperature, params.max_new_tokens) == (0, 8)  # the tiny contract's
    ChatPersona(persona="alpha", engine=engine, max_tokens=3, top_p=0.5, seed=1,
                repetition_penalty=1.2).bind(temperature=0.5).invoke("hi")
    params = spy.last[2]
    assert (params.temperature, params.top_p, params.max_new_tokens, params.seed,
            params.repetition_penalty) == (0.5, 0.5, 3, 1, 1.2)


def test_the_contract_is_the_system_message_and_same_role_messages_merge(
        engine, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    model = ChatPersona(persona="alpha", engine=engine, max_tokens=2)
    model.invoke([HumanMessage("one"), HumanMessage("two"), AIMessage("a"), AIMessage("b"),
                  SystemMessage("Answer in French."), HumanMessage("three")])
    contract = engine.personas["alpha"].system_message()
    assert contract.startswith("You are The Alpha. Scene: (empty)")
    assert spy.last[0] == [
        {"role": "system", "content": contract + "\n\nAnswer in French."},
        {"role": "user", "content": "one\n\ntwo"},
        {"role": "assistant", "content": "a\n\nb"},
        {"role": "user", "content": "three"},
    ]
    ChatPersona(persona="alpha", engine=engine, max_tokens=2, contract=False).invoke("hi")
    assert spy.last[0] == [{"role": "user", "content": "hi"}]


def test_bind_switches_the_persona_per_call(engine) -> None:
    alpha = ChatPersona(persona="alpha", engine=engine, max_tokens=6)
    beta = ChatPersona(persona="beta", engine=engine, max_tokens=6)
    bound = alpha.bind(persona="beta").invoke("What is time?")
    assert bound.response_metadata["persona"] == "beta"
    assert bound.content == beta.invoke("What is time?").content
    assert bound.content != alpha.invoke("What is time?").content


def test_configurable_fields_and_alternatives_choose_the_persona(engine) -> None:
    model = ChatPersona(persona="alpha", engine=engine, max_tokens=4)
    by_field = model.configurable_fields(
        persona=ConfigurableField(id="persona"),
        temperature=ConfigurableField(id="temperature"))
    reply = by_field.invoke("hi", {"configurable": {"persona": "beta", "temperature": 0}})
    assert reply.response_metadata["persona"] == "beta"
    assert by_field.invoke("hi").response_metadata["persona"] == "alpha"
    by_alternative = model.configurable_alternatives(
        ConfigurableField(id="voice"), default_key="alpha",
        beta=ChatPersona(persona="beta", engine=engine, max_tokens=4))
    assert by_alternative.invoke("hi", {"configurable": {"voice": "beta"}}
                                 ).response_metadata["persona"] == "beta"


def test_the_cache_never_hands_one_personas_answer_to_another(engine, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    cache = InMemoryCache()
    alpha = ChatPersona(persona="alpha", engine=engine, max_tokens=6, cache=cache)
    beta = ChatPersona(persona="beta", engine=engine, max_tokens=6, cache=cache)
    assert alpha._get_llm_string() != beta._get_llm_string()
    # a per-call persona is part of the key: alpha bound to beta *is* beta
    assert alpha._get_llm_string(persona="beta") == beta._get_llm_string()
    first = alpha.invoke("What is time?")
    assert beta.invoke("What is time?").response_metadata["persona"] == "beta"
    assert alpha.bind(max_tokens=5).invoke("What is time?").usage_metadata["output_tokens"] == 5
    assert len(spy.calls) == 3  # three different keys: nothing answered from the cache yet
    assert alpha.invoke("What is time?").content == first.content
    assert alpha.bind(persona="beta").invoke("What is time?").response_metadata[
        "persona"] == "beta"
    assert len(spy.calls) == 3  # the same persona and settings: answered from the cache


def test_stop_strings_spanning_tokens_are_cut(engine) -> None:
    model = ChatPersona(persona="beta", engine=engine, max_tokens=24)
    pieces = [chunk.text for chunk in model.stream("What is time?") if chunk.text]
    assert len(pieces) >= 3
    full = "".join(pieces)
    stop = pieces[1][-2:] + pieces[2][:2]  # crosses the boundary between two tokens
    expected = full[: full.index(stop)]
    for reply in (model.invoke("What is time?", stop=[stop]),
                  ChatPersona(persona="beta", engine=engine, max_tokens=24,
                              stop=[stop]).invoke("What is time?")):
        assert reply.content == expected
        assert reply.response_metadata["finish_reason"] == "stop"


def test_the_last_chunk_carries_usage_and_response_metadata(engine, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    chunks = list(ChatPersona(persona="beta", engine=engine, max_tokens=5).stream("hi"))
    *pieces, last = chunks
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert all(c.usage_metadata is None and not c.response_metadata for c in pieces)
    assert last.chunk_position == "last" and last.content == ""
    assert last.response_metadata == {"model_name": "tiny-llama", "persona": "beta",
                                      "finish_reason": "length"}
    prompt_tokens = engine.count_tokens(spy.last[0])
    assert last.usage_metadata == {"input_tokens": prompt_tokens, "output_tokens": 5,
                                   "total_tokens": prompt_tokens + 5}


def test_token_counts_use_the_engines_tokenizer_and_template(engine) -> None:
    model = ChatPersona(persona="beta", engine=engine, max_tokens=2)
    messages = [SystemMessage("Be kind."), HumanMessage("hi"), HumanMessage("there")]
    counted = model.get_num_tokens_from_messages(messages)
    assert counted == model.invoke(messages).usage_metadata["input_tokens"]
    assert model.get_token_ids("hello world") == engine.tokenizer.encode(
        "hello world", add_special_tokens=False)
    assert model.get_num_tokens("hello world") == len(model.get_token_ids("hello world"))


def test_a_mood_layer_changes_the_reply(engine, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    plain = ChatPersona(persona="alpha", engine=engine, max_tokens=8).invoke("What is time?")
    moody = ChatPersona(persona="alpha", engine=engine, max_tokens=8,
                        mood="gloom:1.5").invoke("What is time?")
    assert spy.last[4] == (("gloom", 1.5),)
    assert moody.content != plain.content


async def test_async_streaming_gives_the_same_reply(engine) -> None:
    model = ChatPersona(persona="beta", engine=engine, max_tokens=6)
    chunks = [chunk async for chunk in model.astream("What is time?")]
    assert "".join(c.text for c in chunks) == (await model.ainvoke("What is time?")).content
    assert chunks[-1].usage_metadata["output_tokens"] == 6


# --- HyperlexAgent -----------------------------------------------------------------------------


class ToBeta:
    """Routes messages mentioning 'poem' to beta (the tiny host has no automatic router)."""

    @hookimpl
    def route_turn(self, message, scene, personas, current):
        return "beta" if "poem" in message else None


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "hyperlex.db")


def make_agent(engine, store: Store | None | bool = False, **kwargs: Any) -> HyperlexAgent:
    host = Host(extra_plugins={"to_beta": ToBeta()}, entry_points=False)
    kwargs.setdefault("options", {"max_new_tokens": 6})
    return HyperlexAgent(engine, host=host, store=store, **kwargs)


def thread(name: str, **configurable: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": name, **configurable}}


def test_agent_best_of_answers_with_the_chosen_sample_and_says_which(engine) -> None:
    options = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    reply = make_agent(engine, persona="alpha", options=options, best_of=3).invoke("Tell me.")
    report = reply.response_metadata["best_of"]
    assert report["n"] == 3 and len(report["samples"]) == 3
    assert reply.content == report["samples"][report["chosen"]]["text"].strip()
    assert reply.usage_metadata["output_tokens"] == sum(
        s["completion_tokens"] for s in report["samples"])
    assert "best_of" not in make_agent(engine, persona="alpha").invoke("Hi.").response_metadata
    with pytest.raises(HyperlexError, match="best_of must be a whole number from 1 to 16"):
        make_agent(engine, best_of=0)


def test_agent_best_of_ranks_a_sample_its_reply_problem_check_finds_wrong_below_the_rest(
        engine) -> None:
    options = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    first = make_agent(engine, persona="alpha", options=options, best_of=3).invoke("Tell me.")
    texts = [s["text"] for s in first.response_metadata["best_of"]["samples"]]
    keep = next(i for i in (2, 1) if i != first.response_metadata["best_of"]["chosen"])

    def problem(text: str) -> str | None:
        return None if text == texts[keep] else "`agent nope`: no command 'agent nope'"

    reply = make_agent(engine, persona="alpha", options=options, best_of=3,
                       reply_problem=problem).invoke("Tell me.")
    report = reply.response_metadata["best_of"]
    assert report["chosen"] == keep and reply.content == texts[keep].strip()
    assert [s["problem"] for s in report["samples"]] == [problem(t) for t in texts]


def test_agent_invoke_says_who_answered_and_why(engine, store) -> None:
    reply = make_agent(engine, store).invoke("write a poem about rain", thread("t1"))
    assert isinstance(reply, AIMessage) and reply.content and reply.name == "beta"
    meta = reply.response_metadata
    assert (meta["persona"], meta["reason"]) == ("beta", "route_turn hook of plugin 'to_beta'")
    assert meta["route"]["source"] == "hook" and meta["model_name"] == "tiny-llama"
    assert meta["finish_reason"] in ("stop", "length") and meta["session"] == "lc-t1"
    usage = reply.usage_metadata
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == (
        usage["input_tokens"] + usage["output_tokens"])
    saved = store.session("lc-t1").turns
    assert [(t["persona"], t["reply"]) for t in saved] == [("beta", reply.content)]


def test_agent_stream_yields_the_reply_then_its_metadata(engine, store) -> None:
    chunks = list(make_agent(engine, store).stream("@alpha hello", thread("t1")))
    *pieces, last = chunks
    assert pieces and all(isinstance(c, AIMessageChunk) and c.content for c in pieces)
    assert last.chunk_position == "last" and last.response_metadata["persona"] == "alpha"
    assert last.usage_metadata["output_tokens"] > 0
    assert "".join(c.content for c in pieces) == store.session("lc-t1").turns[0]["reply"]


def test_memory_and_scene_persist_across_invocations_of_one_thread(engine, store) -> None:
    agent = make_agent(engine, store)
    first = agent.invoke("@beta remember the lighthouse", thread("walk"))
    second = agent.invoke("and then?", thread("walk"))
    assert second.response_metadata["persona"] == "beta"  # the thread's current persona
    assert second.response_metadata["reason"] == "continuing with the current persona"
    assert agent.invoke("hello", thread("other")).response_metadata["persona"] == "alpha"
    controller = agent.threads["walk"].controller
    assert controller.history[:2] == [
        {"role": "user", "content": "remember the lighthouse"},
        {"role": "assistant", "content": first.content}]

    again = make_agent(engine, Store(store.path))  # another process, the same database
    third = again.invoke("go on", thread("walk"))
    assert third.response_metadata["persona"] == "beta"
    turns = store.session("lc-walk").turns
    assert [t["user"] for t in turns] == ["remember the lighthouse", "and then?", "go on"]
    # the earlier turns are in the prompt
    assert turns[2]["usage"]["prompt_tokens"] > turns[0]["usage"]["prompt_tokens"]


def test_input_forms_and_history_seeding(engine, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    agent = make_agent(engine)
    prompt = ChatPromptTemplate.from_messages([("human", "@alpha {question}")])
    assert (prompt | agent).invoke({"question": "why?"}).response_metadata["persona"] == "alpha"
    assert spy.last[0][-1] == {"role": "user", "content": "why?"}
    earlier = [HumanMessage("first question"), AIMessage("first answer")]
    agent.invoke({"messages": [*earlier, HumanMessage("@beta next")]}, thread("seeded"))
    assert spy.last[0][1:] == [{"role": "user", "content": "first question"},
                               {"role": "assistant", "content": "first answer"},
                               {"role": "user", "content": "next"}]
    # an existing thread keeps its own history: earlier messages in the input are not used
    history = list(agent.threads["seeded"].controller.history)
    agent.invoke([HumanMessage("something else"), AIMessage("x"), HumanMessage("last")],
                 thread("seeded"))
    assert spy.last[0][1:] == [*history, {"role": "user", "content": "last"}]
    assert agent.invoke([("human", "@beta tuple form")]).response_metadata["persona"] == "beta"
    with pytest.raises(ValueError, match="must be a human message"):
        agent.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ValueError, match="got a mapping with keys"):
        agent.invoke({"question": "hi"})


def test_without_a_thread_id_nothing_is_remembered(engine, store) -> None:
    agent = make_agent(engine, store)
    agent.invoke("@beta hello")
    assert agent.invoke("hello").response_metadata["persona"] == "alpha"
    assert store.sessions() == [] and len(agent.threads) == 0


def test_persona_and_mood_overrides_apply_to_one_call(engine, store, monkeypatch) -> None:
    spy = Spy(engine, monkeypatch)
    agent = make_agent(engine, store)
    reply = agent.invoke("a poem please", thread("t", persona="alpha", mood="gloom:0.5"))
    assert (reply.response_metadata["persona"], reply.response_metadata["mood"]) == (
        "alpha", "gloom:0.5")
    assert reply.response_metadata["reason"] == "pinned to alpha"
    assert spy.last[4] == (("gloom", 0.5),)
    assert agent.invoke("a poem please", thread("t")).response_metadata["persona"] == "beta"
    assert spy.last[4] == ()
    info = store.session("lc-t").info
    assert (info.persona, info.mood) == (None, None)
    with pytest.raises(PersonaNotAvailable, match="installed personas: alpha, beta"):
        agent.invoke("hi", thread("t", persona="nobody"))
    assert agent.invoke("hi", thread("t")).content  # the thread is still usable


def test_a_stream_abandoned_midway_records_nothing(engine, store) -> None:
    agent = make_agent(engine, store, options={"max_new_tokens": 40})
    stream = agent.stream("@beta tell me a long story", thread("t"))
    next(stream)
    stream.close()
    assert not store.has_session("lc-t")  # not even an empty session
    assert agent.invoke("@beta short", thread("t")).content  # the thread's lock was released
    assert len(store.session("lc-t").turns) == 1


def test_without_a_store_memory_lasts_as_long_as_the_agent(engine, tmp_path) -> None:
    agent = make_agent(engine, store=False)
    agent.invoke("@beta hi", thread("t"))
    assert agent.invoke("more", thread("t")).response_metadata["persona"] == "beta"
    assert agent.invoke("more", thread("t")).response_metadata["session"] is None
    assert not (tmp_path / "home" / "hyperlex.db").exists()


def test_thread_ids_become_valid_session_names() -> None:
    assert HyperlexAgent.session_name("user-42") == "lc-user-42"
    odd = [HyperlexAgent.session_name(t) for t in ("user 42/ä", "x" * 80, 7)]
    assert all(check_name(name) for name in odd)
    assert odd[0].startswith("lc.") and odd[2] == "lc-7" and len(set(odd)) == 3


async def test_agent_ainvoke_and_astream(engine, store) -> None:
    agent = make_agent(engine, store)
    reply = await agent.ainvoke("@beta hello", thread("a"))
    chunks = [chunk async for chunk in agent.astream("and more", thread("a"))]
    assert chunks[-1].response_metadata["persona"] == "beta"
    text = "".join(c.content for c in chunks)
    assert [t["reply"] for t in store.session("lc-a").turns] == [reply.content, text]


async def test_an_async_stream_abandoned_midway_records_nothing(engine, store) -> None:
    agent = make_agent(engine, store, options={"max_new_tokens": 40})
    stream = agent.astream("@beta tell me a long story", thread("t"))
    assert (await anext(stream)).content
    await stream.aclose()
    assert not store.has_session("lc-t")  # not even an empty session
    assert (await agent.ainvoke("@beta short", thread("t"))).content
    assert len(store.session("lc-t").turns) == 1


async def test_astream_events_shows_the_nested_chat_model_stream(engine, store) -> None:
    agent = make_agent(engine, store)
    events = [e async for e in agent.astream_events("@beta hello", thread("e"),
                                                    version="v2")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_chain_start" and kinds[-1] == "on_chain_end"
    agent_run = events[0]["run_id"]
    model_events = [e for e in events if e["event"].startswith("on_chat_model")]
    assert model_events[0]["event"] == "on_chat_model_start"
    assert model_events[0]["name"] == "ChatPersona"
    assert model_events[0]["metadata"]["persona"] == "beta"
    assert all(agent_run in e["parent_ids"] for e in model_events)
    streamed = "".join(e["data"]["chunk"].text for e in model_events
                       if e["event"] == "on_chat_model_stream")
    reply = events[-1]["data"]["output"]
    assert streamed.strip() == reply.content and reply.response_metadata["persona"] == "beta"
    assert "on_chain_stream" in kinds and "on_chat_model_end" in kinds


def test_as_node_works_like_a_langgraph_node(engine, store) -> None:
    node = make_agent(engine, store).as_node()
    assert list(inspect.signature(node).parameters) == ["state", "config"]
    state: dict[str, list[Any]] = {"messages": [HumanMessage("@beta hello")]}
    update = node(state, thread("g"))
    assert list(update) == ["messages"] and len(update["messages"]) == 1
    assert isinstance(update["messages"][0], AIMessage)
    state["messages"] += [*update["messages"], HumanMessage("and?")]  # what add_messages does
    second = node(state, thread("g"))["messages"][0]
    assert second.response_metadata["persona"] == "beta"
    assert [t["user"] for t in store.session("lc-g").turns] == ["hello", "and?"]
    assert "langgraph" not in sys.modules


# --- the real embedded model ---------------------------------------------------------------------


@pytest.mark.real_model
def test_the_persona_chain_example_runs_on_the_real_model(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERLEX_HOME", str(tmp_path_factory.mktemp("real-home")))
    example = runpy.run_path(str(ROOT / "examples" / "langchain_persona_chain.py"))
    chain = example["build_chain"](max_tokens=40)
    poem = chain.invoke({"topic": "the sea at night"})
    assert isinstance(poem, str) and len(poem.split()) > 5, poem
