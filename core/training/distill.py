"""Building datasets by asking a teacher (``agent data distill``).

Teachers: the local base model with the persona's full contract as its system prompt
(context distillation: the adapter then learns to behave as the prompted base does, without
the prompt's cost), or any OpenAI-compatible ``/chat/completions`` endpoint. Prompts are
deduplicated; every finished record is appended at once, so a rerun resumes where the last
one stopped.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from hyperlex.errors import HyperlexError
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import Persona
from hyperlex.persona.prompt import build_prompt
from hyperlex.training.data import normalize_prompt, write_records

Message = dict[str, str]


class Teacher(Protocol):
    name: str

    def answer(self, conversations: Sequence[list[Message]],
               params: GenerationParams) -> list[str]:
        """Replies to a batch of conversations, in order."""


class LocalTeacher:
    """The local base model (no adapter), answering a batch at a time."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.name = f"local:{engine.base_name}"

    def answer(self, conversations: Sequence[list[Message]],
               params: GenerationParams) -> list[str]:
        return [c.text for c in self.engine.generate_batch(
            [(conversation, None) for conversation in conversations], params)]


class OpenAITeacher:
    """Any OpenAI-compatible server: ``POST {url}/chat/completions``, requests in parallel."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120,
                 retries: int = 2):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.name = f"openai:{model}@{url}"

    def _one(self, messages: list[Message], params: GenerationParams) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "temperature": params.temperature, "top_p": params.top_p,
                                "max_tokens": params.max_new_tokens}
        if params.seed is not None:
            body["seed"] = params.seed
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:200]
                if exc.code < 500 or attempt == self.retries:
                    raise HyperlexError(f"teacher {self.url} answered HTTP {exc.code}: "
                                        f"{detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise HyperlexError(f"teacher {self.url} unreachable: {reason}") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                raise HyperlexError(f"teacher {self.url} sent a reply without "
                                    "choices[0].message.content") from None
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def answer(self, conversations: Sequence[list[Message]],
               params: GenerationParams) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, len(conversations))) as pool:
            return list(pool.map(lambda c: self._one(c, params), conversations))


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (``human`` or ``prompt`` fields),
    deduplicated in order."""
    if not path.is_file():
        raise HyperlexError(f"{path}: prompts file not found")
    prompts, seen, problems = [], set(), []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(text)
                text = record.get("human") or record.get("prompt")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError
            except (json.JSONDecodeError, ValueError, AttributeError):
                problems.append(f"{path}:{number}: expected a JSON object with a human or "
                                "prompt string")
                continue
        key = normalize_prompt(text)
        if key not in seen:
            seen.add(key)
            prompts.append(text.strip())
    if problems:
        raise HyperlexError("bad prompts:\n" + "\n".join(problems))
    return prompts


def already_done(out: Path) -> set[str]:
    """Prompts that already have a record in ``out`` (for resuming)."""
    if not out.is_file():
        return set()
    done = set()
    for line in _read_text(out).splitlines():
        try:
            done.add(normalize_prompt(json.loads(line)["human"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue  # a line cut by an interrupted run: its prompt is asked again
    return done


def pending(prompts: list[str], out: Path) -> list[str]:
    """The prompts that still need a teacher's reply."""
    done = already_done(out)
    return [p for p in prompts if normalize_prompt(p) not in done]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HyperlexError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def distill(prompts: list[str], persona: Persona, teacher: Teacher, out: Path,
            params: GenerationParams, batch_size: int = 8,
            on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """Ask ``teacher`` for each prompt not yet in ``out`` and append the records. The
    teacher gets ``persona``'s prompt as training will build it for those records (they carry
    no scene): :func:`hyperlex.persona.prompt.build_prompt`."""
    todo = pending(prompts, out)
    written = empty = 0
    for batch in _chunks(todo, batch_size):
        conversations = [build_prompt(persona, prompt) for prompt in batch]
        replies = teacher.answer(conversations, params)
        records = [{"human": prompt, "text": reply.strip(), "meta": {"teacher": teacher.name}}
                   for prompt, reply in zip(batch, replies, strict=True) if reply.strip()]
        empty += len(batch) - len(records)
        written += write_records(out, records, append=True)
        if on_batch is not None:
            on_batch(len(batch))
    return {"prompts": len(prompts), "skipped_existing": len(prompts) - len(todo),
            "written": written, "empty_replies": empty}


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def api_key_from(env_var: str | None) -> str | None:
    return os.environ.get(env_var) if env_var else None
