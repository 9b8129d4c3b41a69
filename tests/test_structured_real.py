"""Structured output on the real embedded model: every kind of schema in OpenAI's
structured-output guide, greedy and 20 seeded
samples, on both local engines; and LangChain's standard suite with its structured-output
tests on."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from hyperlex.generation import GenerationParams
from hyperlex.host import Host
from hyperlex.structured import ResponseFormat

from .test_langchain import TinyChatPersona

pytestmark = pytest.mark.real_model

# a bound on names, as a schema for a small model should have: sampled at 0.8, the 135M base
# otherwise sometimes keeps a string going past any token limit
NAME = {"type": "string", "description": "a short name", "maxLength": 40}
SCHEMAS: dict[str, dict] = {
    "object": {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer"}, "brave": {"type": "boolean"}},
        "required": ["name", "age", "brave"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"crew": {"type": "array", "items": NAME,
                                                        "maxItems": 4}},
              "required": ["crew"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"sea": {"enum": ["calm", "rough", "frozen"]}},
             "required": ["sea"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "captain": {"$ref": "#/$defs/sailor"},
        "mate": {"$ref": "#/$defs/sailor"}},
        "required": ["captain", "mate"], "additionalProperties": False,
        "$defs": {"sailor": {"type": "object", "properties": {
            "name": NAME, "years": {"type": "integer", "minimum": 0, "maximum": 80}},
            "required": ["name", "years"], "additionalProperties": False}}},
    "anyOf": {"type": "object", "properties": {
        "port": {"anyOf": [NAME, {"type": "null"}]}},
        "required": ["port"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"ship": NAME, "flag": NAME},
                 "required": ["ship"], "additionalProperties": False},
    "formats": {"type": "object", "properties": {
        "sailed": {"type": "string", "format": "date"},
        "log": {"type": "string", "format": "uuid"}},
        "required": ["sailed", "log"], "additionalProperties": False},
}
PROMPT = [{"role": "user", "content": "Describe the crew of a small fishing boat."}]
LIMIT = 128
STANDARD_LIMIT = 160
# the suite's jokes leave their strings unbounded, and whether the 135M model's greedy string
# closed within STANDARD_LIMIT moved with the CPU's kernels (one machine's setup ran to the
# limit and lost the punchline): bounded, a joke's two strings of English and their keys
# take about 70 tokens, a bound the grammar holds whatever the kernels
STANDARD_STRING_LIMIT = 100


@pytest.fixture(scope="module")
def torch_engine():
    from hyperlex.engines.torch.engine import TorchEngine

    return TorchEngine(progress=False)


@pytest.fixture(scope="module")
def llama_engine():
    pytest.importorskip("llama_cpp")
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(list(Host().personas.values()), progress=False)


@pytest.fixture(scope="module")
def uncached_llama_engine():
    pytest.importorskip("llama_cpp")
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(list(Host().personas.values()), progress=False, prompt_cache=False)


def prompt(fmt: ResponseFormat) -> list[dict[str, str]]:
    return [{"role": "system", "content": fmt.instruction}, *PROMPT]


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_torch_greedy_replies_validate(torch_engine, kind: str) -> None:
    fmt = ResponseFormat.json_schema(SCHEMAS[kind])
    reply = torch_engine.generate(prompt(fmt), None, GenerationParams(
        temperature=0, max_new_tokens=LIMIT), response_format=fmt)
    assert reply.finish_reason == "stop", reply.text
    fmt.parse(reply.text)


def test_a_torch_batch_of_20_seeded_samples_validates(torch_engine) -> None:
    """One batch, each row with its own grammar state (the grammar itself is the one the
    llama.cpp test below samples 20 times per kind)."""
    fmt = ResponseFormat.json_schema(SCHEMAS["nested"])
    sampled = torch_engine.generate_batch(
        [(prompt(fmt), None)] * 20,
        GenerationParams(temperature=0.8, max_new_tokens=LIMIT, seed=7), response_format=fmt)
    for reply in sampled:
        assert reply.finish_reason == "stop", reply.text
        fmt.parse(reply.text)


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_llama_cpp_greedy_and_20_seeds_all_validate(llama_engine, kind: str) -> None:
    fmt = ResponseFormat.json_schema(SCHEMAS[kind])
    settings = [GenerationParams(temperature=0, max_new_tokens=LIMIT)] + [
        GenerationParams(temperature=0.8, max_new_tokens=LIMIT, seed=seed)
        for seed in range(20)]
    for params in settings:
        reply = llama_engine.generate(prompt(fmt), "interface", params, response_format=fmt)
        assert reply.finish_reason == "stop", (params.seed, reply.text)
        fmt.parse(reply.text)


class TestChatPersonaStructured(TinyChatPersona, ChatModelIntegrationTests):
    """LangChain's standard integration suite with structured output and JSON mode on, run
    on the real model: the tiny random model of test_langchain.py cannot close a JSON string
    within a reply. llama.cpp, greedy, without its prompt cache: a reply then depends on its
    prompt only (with the cache, a near-tie can make the suite's invoke and stream of one
    prompt differ), and the suite takes two minutes instead of the torch engine's five."""

    @pytest.fixture(autouse=True)
    def _tiny_engine(self, uncached_llama_engine) -> None:
        type(self).tiny_engine = uncached_llama_engine

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"persona": "interface", "engine": self.tiny_engine, "temperature": 0,
                "max_tokens": STANDARD_LIMIT}

    @property
    def has_structured_output(self) -> bool:
        return True  # decoded under the schema's grammar

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"max_string_length": STANDARD_STRING_LIMIT}

    @property
    def supports_json_mode(self) -> bool:
        """Off for the suite's own ``test_json_mode``: its joke strings are unbounded, and
        whether the 135M model's greedy string closes within the token limit moved with the
        CPU's kernels (it closed on one machine and ran to the limit on another, and the
        parse of the cut reply lost ``punchline``). The suite forbids overriding its tests,
        so :meth:`test_json_mode_with_bounded_strings` runs the same steps."""
        return False

    def test_json_mode_with_bounded_strings(self, model) -> None:
        """The suite's ``test_json_mode`` steps (pydantic and dict schema, invoke and stream)
        with the joke's strings bounded, so the reply always closes. JSON mode promises a
        JSON object, not its keys (the schema only parses the reply): the keys asked for must
        be there, and the model may add one (the round-3 interface adds a file path)."""
        from pydantic import BaseModel, Field

        class Joke(BaseModel):
            """Joke to tell user."""

            setup: str = Field(description="question to set up a joke", max_length=60)
            punchline: str = Field(description="answer to resolve the joke", max_length=60)

        msg = ("Tell me a joke about cats. Return the result as a JSON with 'setup' and "
               "'punchline' keys. Return nothing other than JSON.")
        as_model = model.with_structured_output(Joke, method="json_mode")
        assert isinstance(as_model.invoke(msg), Joke)
        assert all(isinstance(chunk, Joke) for chunk in as_model.stream(msg))
        as_dict = model.with_structured_output(Joke.model_json_schema(), method="json_mode")
        assert {"setup", "punchline"} <= set(as_dict.invoke(msg))
        chunks = list(as_dict.stream(msg))
        assert chunks and {"setup", "punchline"} <= set(chunks[-1])
