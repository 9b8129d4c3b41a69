"""Structured output: a reply that must be JSON, and of which shape.

A :class:`ResponseFormat` travels with a generation request to the engine, which decodes
under the grammar compiled from it: each local engine keeps a :class:`GrammarState` per reply
and masks the tokens it forbids (the openai backend sends ``response_format`` to its server).
:func:`check_schema` refuses, naming the keyword and where it is, what the grammar could not
enforce, so that a reply is never claimed to match a schema it was not held to.

The grammar engine is llguidance, on both local engines: it reports unimplemented keywords
instead of dropping them (xgrammar drops ``not`` and ``uniqueItems`` silently), and works on
bytes, so no token can smuggle invalid UTF-8 into a string. llama-cpp-python's own JSON
schema to GBNF path was tried first and measured worse on all three counts: it ignores
``minimum``/``maximum`` and other keywords without a word, lets control characters into
strings, and its sampler accepts tokens whose bytes are not UTF-8 (docs/serving.md).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# compact JSON: a small model given free whitespace can spend its whole reply on newlines
GRAMMAR_OPTIONS = {"whitespace_flexible": False}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class InvalidResponseFormat(HyperlexError, ValueError):
    """A response format or schema that cannot be honoured; the message names where."""


class ReplyNotValid(HyperlexError):
    """A reply that does not parse, or does not match its schema (a cut reply, usually)."""


@dataclass(frozen=True)
class ResponseFormat:
    """JSON that matches ``schema``; ``None`` means any JSON object (OpenAI's
    ``json_object``). Build one with :meth:`json_object`, :meth:`json_schema` or
    :func:`from_openai`; each checks the schema."""

    schema: Mapping[str, Any] | None = None
    name: str = "response"
    strict: bool = False
    grammar: str = field(default="", compare=False, repr=False)  # llguidance's, compiled once

    def __post_init__(self) -> None:
        if not self.grammar:  # built directly rather than by a checking constructor
            object.__setattr__(self, "grammar", check_schema(self.target, strict=self.strict))

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls(None)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], name: str = "response",
                    strict: bool = False, where: str = "schema") -> ResponseFormat:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidResponseFormat(
                f"{where}: name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        grammar = check_schema(schema, where, strict=strict)
        return cls(dict(schema), name, bool(strict), grammar=grammar)

    @property
    def target(self) -> dict[str, Any]:
        """The schema a reply is held to."""
        return dict(self.schema) if self.schema is not None else dict(ANY_OBJECT)

    @property
    def instruction(self) -> str:
        """What the persona is told in its system message (the grammar enforces it anyway;
        a model told the shape fills it with better values)."""
        if self.schema is None:
            return "Answer with one JSON object and nothing else."
        return ("Answer with one JSON object and nothing else, matching this JSON Schema: "
                + json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False))

    def as_openai(self) -> dict[str, Any]:
        """The ``response_format`` field of an OpenAI chat request."""
        if self.schema is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {
            "name": self.name, "schema": dict(self.schema), "strict": self.strict}}

    def parse(self, text: str) -> Any:
        """The reply's JSON value, checked against the schema: :class:`ReplyNotValid`
        otherwise (a reply cut by its token limit before the JSON closed, for instance)."""
        import jsonschema

        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReplyNotValid(f"the reply is not valid JSON ({exc.msg} at character "
                                f"{exc.pos}); was it cut by max_tokens?") from None
        validator = jsonschema.Draft202012Validator(
            self.target, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            at = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            raise ReplyNotValid(f"the reply does not match the schema at {at}: {error.message}")
        return value


def from_openai(value: Any, where: str = "response_format") -> ResponseFormat | None:
    """The response format of an OpenAI chat request's ``response_format`` field; ``None``
    for plain text (``{"type": "text"}`` or no field)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidResponseFormat(f"{where} must be an object, got {value!r}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind != "json_schema":
        raise InvalidResponseFormat(f"{where}.type must be 'text', 'json_object' or "
                                    f"'json_schema', got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidResponseFormat(f"{where}.json_schema must be an object with a name and a "
                                    "schema")
    strict = spec.get("strict") or False
    if not isinstance(strict, bool):
        raise InvalidResponseFormat(f"{where}.json_schema.strict must be true or false, got "
                                    f"{strict!r}")
    schema = spec.get("schema")
    if schema is None:  # OpenAI allows a format without a schema: any JSON object
        schema = ANY_OBJECT
    return ResponseFormat.json_schema(schema, spec.get("name", "response"), strict,
                                      where=f"{where}.json_schema.schema")


class GrammarState:
    """One reply's place in its response format's grammar, over an engine's vocabulary:
    which tokens may come next (:meth:`allowed`), and :meth:`consume` for each one chosen.
    ``grammar_tokenizer`` is llguidance's view of the engine's tokenizer."""

    def __init__(self, grammar_tokenizer: Any, response_format: ResponseFormat):
        import numpy as np
        from llguidance import LLMatcher

        self._matcher = LLMatcher(grammar_tokenizer, response_format.grammar)
        self._size = grammar_tokenizer.vocab_size
        self._packed = np.full((self._size + 31) // 32, -1, dtype=np.int32)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise HyperlexError(f"structured output: the grammar failed: "
                                f"{self._matcher.get_error()}")

    def allowed(self) -> Any:
        """A boolean numpy array over the vocabulary: True where a token may come next."""
        import numpy as np

        packed = self._packed
        self._matcher.unsafe_compute_mask_ptr(packed.ctypes.data, packed.nbytes)
        self._check()
        bits = np.unpackbits(packed.view(np.uint8), bitorder="little")
        return bits[: self._size].astype(bool)

    def consume(self, token: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token)
            self._check()


def load_schema(path: str | Path, max_string_length: int | None = None) -> ResponseFormat:
    """A response format from a JSON Schema file (``agent chat --schema``), its open strings
    bounded by ``max_string_length`` if given (:func:`bounded_strings`); errors name the
    file, and the line where the JSON is broken."""
    path = Path(path)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidResponseFormat(f"{path}: cannot read the schema: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidResponseFormat(f"{path}, line {exc.lineno}: not JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise InvalidResponseFormat(f"{path}: not UTF-8 text") from None
    if max_string_length is not None and isinstance(schema, Mapping):
        schema = bounded_strings(schema, max_string_length)
    return ResponseFormat.json_schema(schema, _name_from(path), where=str(path))


def _name_from(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem.removesuffix(".schema"))[:64]
    return name or "response"


def check_schema(schema: Any, where: str = "schema", strict: bool = False) -> str:
    """The llguidance grammar for ``schema``, once it is known to be a JSON Schema every
    engine can enforce; :class:`InvalidResponseFormat` naming ``where`` and the keyword
    otherwise. ``strict`` adds OpenAI's strict-mode rules (every object closed with
    ``additionalProperties: false``, every property required)."""
    import jsonschema
    from llguidance import LLMatcher

    if not isinstance(schema, Mapping):
        raise InvalidResponseFormat(f"{where} must be a JSON object (a JSON Schema), got "
                                    f"{type(schema).__name__}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidResponseFormat(
            f"{where}: not a valid JSON Schema{f' at {at}' if at else ''}: {exc.message}"
        ) from None
    if strict:
        for problem in strict_problems(schema):
            raise InvalidResponseFormat(f"{where}: strict schema: {problem}")
    try:
        grammar = LLMatcher.grammar_from_json_schema(closed_objects(schema),
                                                     defaults=GRAMMAR_OPTIONS)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as exc:  # llguidance raises ValueError on what it cannot parse
        failed, messages = True, [str(exc)]
    if failed:
        raise InvalidResponseFormat(f"{where}: cannot be enforced while decoding: "
                                    f"{'; '.join(messages)}")
    return grammar


def closed_objects(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with every object that names its properties, and says nothing of others,
    closed (``additionalProperties: false``), as the grammar to decode under. A reply still
    matches the schema as given; the model is only kept from inventing keys, which a small
    model does by copying the schema's own words ("required") from its prompt. (vLLM's
    xgrammar does the same by default, its ``strict_mode``.) Branches of ``allOf`` are left
    open: closing each would reject the keys the others add."""
    def close(node: dict[str, Any]) -> None:
        if ("properties" in node and "additionalProperties" not in node
                and "patternProperties" not in node):
            node["additionalProperties"] = False
        for _, sub in _subschemas(node, ("anyOf", "oneOf", "prefixItems")):
            close(sub)

    closed = copy.deepcopy(dict(schema))
    close(closed)
    return closed


def bounded_strings(schema: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """``schema`` with every string it leaves unbounded held to ``limit`` characters
    (``maxLength``). A small model's greedy string can run on to the token limit and cut the
    reply before its JSON closes; a bound makes the grammar close the string, so the reply
    ends within a known number of tokens. Strings with an ``enum``, ``const``, ``pattern``,
    ``format`` or their own ``maxLength`` already have a shape and are left as they are."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidResponseFormat(f"a string bound must be a positive integer, got {limit!r}")
    shaped = ("maxLength", "enum", "const", "pattern", "format")

    def bound(node: dict[str, Any]) -> None:
        kind = node.get("type")
        is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
        if is_string and not any(key in node for key in shaped):
            node["maxLength"] = limit
        subschemas = [sub for _, sub in _subschemas(
            node, ("anyOf", "oneOf", "allOf", "prefixItems"))]
        if isinstance(node.get("additionalProperties"), Mapping):
            subschemas.append(node["additionalProperties"])
        for sub in subschemas:
            bound(sub)

    bounded = copy.deepcopy(dict(schema))
    bound(bounded)
    return bounded


def strict_problems(schema: Mapping[str, Any], at: str = "#") -> Iterator[str]:
    """Where ``schema`` breaks OpenAI's strict structured-output rules."""
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties", True) is not False:
            yield f"{at}: 'additionalProperties' must be false"
        missing = sorted(set(schema.get("properties", {})) - set(schema.get("required", [])))
        if missing:
            yield f"{at}: every property must be required (missing {', '.join(missing)})"
    for where, sub in _subschemas(schema, ("anyOf", "allOf", "prefixItems")):
        yield from strict_problems(sub, f"{at}/{where}")


def _subschemas(schema: Mapping[str, Any], branches: tuple[str, ...]
                ) -> Iterator[tuple[str, Any]]:
    """``schema``'s direct subschemas, each with its JSON pointer from ``schema``: named ones
    (properties, definitions), the ``branches`` lists' entries, and ``items``."""
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), Mapping):
            yield from ((f"{key}/{name}", sub) for name, sub in schema[key].items()
                        if isinstance(sub, Mapping))
    for key in branches:
        if isinstance(schema.get(key), list):
            yield from ((f"{key}/{i}", sub) for i, sub in enumerate(schema[key])
                        if isinstance(sub, Mapping))
    if isinstance(schema.get("items"), Mapping):
        yield "items", schema["items"]
