"""Structured output: the response format's checks, and grammar-constrained decoding on the
tiny random model with both local engines. The tiny model writes random tokens, so each
string here has a maxLength and each number a range (it would otherwise rarely close them);
the real-model tests (test_structured_real.py) use the schemas without such bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona
from hyperlex.structured import (
    InvalidResponseFormat,
    ReplyNotValid,
    ResponseFormat,
    bounded_strings,
    from_openai,
    load_schema,
)

WORD = {"type": "string", "maxLength": 8}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
# one schema per kind in OpenAI's structured-output guide
TINY_SCHEMAS: dict[str, dict] = {
    "object": {"type": "object", "properties": {
        "name": WORD, "age": DIGIT,
        "alive": {"type": "boolean"}}, "required": ["name", "age", "alive"],
        "additionalProperties": False},
    "array": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 3},
    "enum": {"type": "object", "properties": {"mood": {"enum": ["calm", "stormy", "grey"]}},
             "required": ["mood"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "ship": {"$ref": "#/$defs/ship"},
        "crew": {"type": "array", "items": {"$ref": "#/$defs/ship"}, "maxItems": 2}},
        "required": ["ship", "crew"], "additionalProperties": False,
        "$defs": {"ship": {"type": "object", "properties": {"name": WORD},
                           "required": ["name"], "additionalProperties": False}}},
    "anyOf": {"type": "object", "properties": {
        "value": {"anyOf": [WORD, DIGIT, {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"title": WORD, "note": WORD},
                 "required": ["title"], "additionalProperties": False},
    "formats": {"type": "object", "properties": {
        "time": {"type": "string", "format": "time"},
        "id": {"type": "string", "format": "uuid"}},
        "required": ["time", "id"], "additionalProperties": False},
}
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def personas(tiny_bundles: dict[str, Path]) -> list[Persona]:
    return [Persona.from_dir(p) for p in tiny_bundles.values()]


@pytest.fixture(scope="module")
def torch_engine(tiny_base: Path, personas):
    from hyperlex.engines.torch.engine import TorchEngine

    return TorchEngine(personas, base=str(tiny_base), progress=False)


@pytest.fixture(scope="module")
def llama_engine(tiny_base: Path, personas):
    pytest.importorskip("llama_cpp")
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(personas, base=str(tiny_base), exact=True, threads=1, n_ctx=512,
                          progress=False)


@pytest.fixture(params=["torch", "llama"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


# --- the response format -------------------------------------------------------------------


def test_openai_response_formats_are_read_as_openai_defines_them() -> None:
    assert from_openai(None) is None
    assert from_openai({"type": "text"}) is None
    assert from_openai({"type": "json_object"}).target == {"type": "object"}
    schema = TINY_SCHEMAS["enum"]
    fmt = from_openai({"type": "json_schema",
                       "json_schema": {"name": "mood", "schema": schema, "strict": True}})
    assert (fmt.target, fmt.name, fmt.strict) == (schema, "mood", True)
    assert fmt.as_openai()["json_schema"]["schema"] == schema


@pytest.mark.parametrize(("value", "named"), [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                       "not": {}}}},
     'Unimplemented keys: ["not"]'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
     "not a valid JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": WORD}}}}, "'additionalProperties' must be false"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": WORD}, "additionalProperties": False}}},
     "every property must be required (missing a)"),
])
def test_a_format_that_cannot_be_honoured_is_refused_naming_what(value, named) -> None:
    with pytest.raises(InvalidResponseFormat, match="response_format") as error:
        from_openai(value)
    assert named in str(error.value)


def test_a_schema_file_error_names_the_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "claim.json"
    broken.write_text('{\n  "type": "object",\n  "properties": {\n}')
    with pytest.raises(InvalidResponseFormat, match=r"claim\.json, line 4"):
        load_schema(broken)
    good = tmp_path / "claim.schema.json"
    good.write_text(json.dumps(TINY_SCHEMAS["enum"]))
    assert load_schema(good).name == "claim"


def test_parse_checks_the_reply_against_the_schema() -> None:
    fmt = ResponseFormat.json_schema(TINY_SCHEMAS["formats"])
    uuid = "0b9f4c9e-8f1e-4d55-9d5e-3c2a1b0f9e8d"
    assert fmt.parse(f'{{"time":"12:00:00Z","id":"{uuid}"}}')
    with pytest.raises(ReplyNotValid, match="cut by max_tokens"):
        fmt.parse('{"time":"12:')
    with pytest.raises(ReplyNotValid, match="at id"):
        fmt.parse('{"time":"12:00:00Z","id":"not-a-uuid"}')


def test_bounded_strings_bounds_only_the_strings_left_open() -> None:
    open_text = {"type": "string"}
    schema = {"type": "object", "properties": {
        "name": open_text, "nick": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
        "port": {"anyOf": [open_text, {"type": "null"}]},
        "notes": {"type": "object", "additionalProperties": open_text},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "day": {"type": "string", "format": "date"},
        "mood": {"type": "string", "enum": ["calm", "rough"]},
        "short": {"type": "string", "maxLength": 3}},
        "$defs": {"tag": open_text}}
    bounded = bounded_strings(schema, 20)
    props = bounded["properties"]
    assert [props[key].get("maxLength") for key in ("name", "nick")] == [20, 20]
    assert bounded["$defs"]["tag"]["maxLength"] == 20
    assert props["port"]["anyOf"][0]["maxLength"] == 20
    assert props["notes"]["additionalProperties"]["maxLength"] == 20
    assert [props[key].get("maxLength") for key in ("code", "day", "mood", "short")] == [
        None, None, None, 3]
    assert "maxLength" not in open_text  # the caller's schema is not changed
    ResponseFormat.json_schema(bounded)  # still a schema the grammar enforces
    for limit in (0, -1, True, 2.5):
        with pytest.raises(InvalidResponseFormat, match="positive integer"):
            bounded_strings(schema, limit)  # type: ignore[arg-type]


# --- constrained decoding ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TINY_SCHEMAS))
def test_every_reply_parses_and_validates_greedy_and_sampled(engine, kind: str) -> None:
    fmt = ResponseFormat.json_schema(TINY_SCHEMAS[kind])
    settings = [GenerationParams(temperature=0, max_new_tokens=160)] + [
        GenerationParams(temperature=1.0, top_p=1.0, max_new_tokens=160, seed=seed)
        for seed in range(20)]
    for params in settings:
        reply = engine.generate(MESSAGES, "alpha", params, response_format=fmt)
        assert reply.finish_reason == "stop", (params, reply.text)
        fmt.parse(reply.text)


def test_an_open_schema_gets_only_the_keys_it_names(engine) -> None:
    """A schema that allows other keys (no additionalProperties) is still answered with
    its own keys only, even sampled at temperature 1: the model invents none."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "tags": {"type": "array", "maxItems": 2,
                                                        "items": {"type": "object",
                                                                  "properties": {
                                                                      "x": {"type": "integer"}},
                                                                  "required": ["x"]}}},
              "required": ["name", "tags"]}
    fmt = ResponseFormat.json_schema(schema)
    finished = 0
    for seed in range(8):
        reply = engine.generate(MESSAGES, "beta", GenerationParams(
            temperature=1.0, top_p=1.0, max_new_tokens=120, seed=seed), response_format=fmt)
        if reply.finish_reason != "stop":
            continue
        finished += 1
        value = fmt.parse(reply.text)
        assert set(value) == {"name", "tags"}, reply.text
        assert all(set(tag) == {"x"} for tag in value["tags"]), reply.text
    assert finished >= 4


def test_any_json_object_in_json_object_mode(engine) -> None:
    fmt = ResponseFormat.json_object()
    for seed in range(5):
        reply = engine.generate(MESSAGES, "beta", GenerationParams(
            temperature=1.0, max_new_tokens=400, seed=seed), response_format=fmt)
        if reply.finish_reason == "stop":  # an open-ended object may run to the limit
            assert isinstance(fmt.parse(reply.text), dict)
        else:
            assert reply.text.startswith("{")


def test_a_reply_cut_by_max_tokens_reports_length_and_is_not_claimed_valid(engine) -> None:
    fmt = ResponseFormat.json_schema(TINY_SCHEMAS["nested"])
    reply = engine.generate(MESSAGES, "alpha", GenerationParams(temperature=0, max_new_tokens=3),
                            response_format=fmt)
    assert reply.finish_reason == "length"
    assert reply.text.startswith('{"')
    with pytest.raises(ReplyNotValid):
        fmt.parse(reply.text)


def test_streaming_stop_strings_and_cancel_still_work(engine) -> None:
    fmt = ResponseFormat.json_schema(TINY_SCHEMAS["object"])
    params = GenerationParams(temperature=0, max_new_tokens=160)
    whole = engine.generate(MESSAGES, "alpha", params, response_format=fmt).text
    stream = engine.stream(MESSAGES, "alpha", params, response_format=fmt)
    assert "".join(stream) == whole and stream.finish_reason == "stop"
    cut = engine.generate(MESSAGES, "alpha", params, stop=['"age"'], response_format=fmt)
    assert (cut.text, cut.finish_reason) == (whole[:whole.index('"age"')], "stop")
    stream = engine.stream(MESSAGES, "alpha", params, response_format=fmt)
    pieces = iter(stream)
    first = next(pieces)
    stream.cancel()
    assert list(pieces) == [] and stream.finish_reason == "cancelled"
    assert whole.startswith(first)


def test_the_two_engines_agree_on_greedy_structured_replies(torch_engine, llama_engine) -> None:
    fmt = ResponseFormat.json_schema(TINY_SCHEMAS["object"])
    params = GenerationParams(temperature=0, max_new_tokens=160)
    for persona in ("alpha", "beta", None):
        assert (torch_engine.generate(MESSAGES, persona, params, response_format=fmt).text
                == llama_engine.generate(MESSAGES, persona, params, response_format=fmt).text)


def test_a_torch_batch_holds_each_row_to_the_grammar(torch_engine) -> None:
    fmt = ResponseFormat.json_schema(TINY_SCHEMAS["array"])
    replies = torch_engine.generate_batch(
        [(MESSAGES, "alpha"), (MESSAGES, "beta"), (MESSAGES, None)],
        GenerationParams(temperature=1.0, max_new_tokens=160, seed=3), response_format=fmt)
    for reply in replies:
        assert reply.finish_reason == "stop"
        assert isinstance(fmt.parse(reply.text), list)
