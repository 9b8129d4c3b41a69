"""Training data: JSONL records in the scene <-> text <-> human format.

One record per line, either

    {"human": "...", "text": "...", "scene": {...}?, "field": {...}?}

the scene-speaking form (the persona says a scene: the prompt is the one
:func:`hyperlex.persona.prompt.scene_prompt` builds, the scene whole in the system message
and its facts in the user message)

    {"speak_scene": true, "scene": {...}, "text": "..."}

the plain form (text with no prompt and no chat template, all of it the target: replay
text that keeps an adapter near the base on ordinary text, :mod:`hyperlex.training.replay`)

    {"plain": "..."}

or the chat form

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...], "scene"?, "field"?}

whose last message is the persona's reply and whose earlier turns become history. The
system message always comes from the persona's contract (with the record's scene and field
rendered into it), so a record carries none. Every bad line is reported with its number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.persona.prompt import say_scene_message
from hyperlex.scene.model import Scene, SceneField

Message = dict[str, str]
RECORD_KEYS = {"human", "text", "scene", "field", "messages", "meta", "speak_scene", "plain"}


class DataError(HyperlexError):
    """A dataset has bad records; ``problems`` holds one ``FILE:LINE: reason`` per record."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20
                                 else [])
        super().__init__(f"{len(problems)} bad record(s):\n" + "\n".join(shown))


@dataclass
class Example:
    """One training exchange: the human's turn, the persona's reply, and its context."""

    human: str
    text: str
    history: list[Message] = field(default_factory=list)
    scene: Scene | None = None
    line: int = 0
    speaks_scene: bool = False  # the persona is asked to say ``scene`` (``human`` is that ask)
    plain: bool = False  # ``text`` alone, no prompt, no chat template (``human`` is empty)

    @property
    def is_chat(self) -> bool:
        """A human turn and the persona's reply to it (not a scene to say, not plain text)."""
        return not (self.speaks_scene or self.plain)

    def as_record(self) -> dict[str, Any]:
        if self.plain:
            return {"plain": self.text}
        if self.speaks_scene and self.scene is not None:
            return {"speak_scene": True, "scene": self.scene.to_dict(), "text": self.text}
        record: dict[str, Any] = {"human": self.human, "text": self.text}
        if self.scene is not None:
            record["scene"] = self.scene.to_dict()
        return record


def parse_record(record: Any) -> Example:
    """Validate one decoded JSON record; raise ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - RECORD_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(RECORD_KEYS))}")
    if "speak_scene" in record:
        return _scene_speaking(record)
    if "plain" in record:
        extra = sorted(set(record) - {"plain", "meta"})
        if extra:
            raise ValueError(f"a plain record has only plain (and meta), not "
                             f"{', '.join(extra)}")
        return Example(human="", text=_string(record, "plain"), plain=True)
    if "messages" in record:
        if "human" in record or "text" in record:
            raise ValueError("use either messages or human/text, not both")
        human, text, history = _from_messages(record["messages"])
    else:
        human, text, history = _string(record, "human"), _string(record, "text"), []
    return Example(human=human, text=text, history=history, scene=_scene(record))


def _scene_speaking(record: dict[str, Any]) -> Example:
    if record["speak_scene"] is not True:
        raise ValueError("speak_scene must be true (leave it out for an ordinary record)")
    if "human" in record or "messages" in record:
        raise ValueError("a speak_scene record has no human or messages: its prompt is the "
                         "scene's")
    scene = _scene(record)
    if scene is None or scene.empty:
        raise ValueError("a speak_scene record needs a non-empty scene")
    return Example(human=say_scene_message(scene), text=_string(record, "text"), scene=scene,
                   speaks_scene=True)


def _string(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} is missing or not a string")
    if not value.strip():
        raise ValueError(f"{key} is empty")
    return value


def _from_messages(messages: Any) -> tuple[str, str, list[Message]]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("messages must be a list of at least a user and an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string content")
        role = message.get("role")
        if role == "system":
            raise ValueError(f"messages[{i}]: no system message; the persona's contract "
                             "supplies it")
        expected = "user" if i % 2 == len(messages) % 2 else "assistant"
        if role != expected:
            raise ValueError(f"messages[{i}]: expected role {expected!r} (turns alternate and "
                             f"end with the assistant), got {role!r}")
        if not message["content"].strip():
            raise ValueError(f"messages[{i}]: content is empty")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-2]]
    return messages[-2]["content"], messages[-1]["content"], history


def _scene(record: dict[str, Any]) -> Scene | None:
    scene_data, field_data = record.get("scene"), record.get("field")
    if scene_data is None and field_data is None:
        return None
    try:
        scene = Scene.from_dict(scene_data) if scene_data is not None else Scene()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"scene is not a valid scene: {exc}") from None
    if field_data is not None:
        if not isinstance(field_data, dict):
            raise ValueError("field must be an object")
        try:
            scene.field = SceneField(**field_data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"field: {exc}") from None
    return scene


def read_dataset(path: Path) -> list[Example]:
    """Read a JSONL dataset; every bad line is collected and reported in one DataError."""
    if not path.is_file():
        raise HyperlexError(f"{path}: dataset not found")
    examples, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise HyperlexError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            example = parse_record(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc}")
            continue
        example.line = number
        examples.append(example)
    if problems:
        raise DataError(problems)
    if not examples:
        raise HyperlexError(f"{path}: no records")
    return examples


def write_records(path: Path, records: Iterable[dict[str, Any]], append: bool = False) -> int:
    """Write records as JSONL, flushing each line so an interrupted run keeps what it wrote."""
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            count += 1
    return count


def normalize_prompt(text: str) -> str:
    """The key used to deduplicate prompts: case- and whitespace-insensitive."""
    return " ".join(text.lower().split())
