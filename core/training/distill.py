"""Building datasets by asking a teacher (``agent data distill``).

Teachers: the local base model with the persona's full contract as its system prompt
(context distillation: the adapter then learns to behave as the prompted base does, without
the prompt's cost), the persona's own adapter (self-replay, below), or any OpenAI-compatible
``/chat/completions`` endpoint. Prompts are deduplicated; every finished record is appended
at once, so a rerun resumes where the last one stopped.

Self-replay is learning without forgetting (Li and Hoiem, 2016) for a persona's voice: a
further training round on new data (scenes, negated facts) drifts the adapter off its voice,
and its own voice data cannot hold it, since earlier rounds fitted them already. Its current
adapter's replies to prompts it was never trained on (:func:`fresh_prompts`) can: the next
round's cross-entropy on them is, in expectation, the KL divergence from the current voice to
the new one (plus a constant), asked of prompts the new data say nothing about. That holds
for samples of the adapter's own distribution, so self-replay samples at temperature 1
(:data:`SELF_REPLAY_SAMPLING`), not with the persona's chat settings: the philosopher's
(temperature 0.7, top-p 0.9, repetition penalty 1.1) sharpen it, and a round on such
samples fitted its held-out replies worse than the same round without them.
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
from hyperlex.training.replay import TOP_P

Message = dict[str, str]

# the adapter's own distribution, less the tail that hyperlex.training.replay cuts too
SELF_REPLAY_SAMPLING = {"temperature": 1.0, "top_p": TOP_P, "top_k": 0,
                        "repetition_penalty": 1.0}


class Teacher(Protocol):
    name: str

    def answer(self, conversations: Sequence[list[Message]],
               params: GenerationParams) -> list[str]:
        """Replies to a batch of conversations, in order."""


class LocalTeacher:
    """The local base model, answering a batch at a time: bare, or with the adapter of the
    persona ``adapter`` (which the engine must hold)."""

    def __init__(self, engine: Any, adapter: str | None = None):
        self.engine = engine
        self.adapter = adapter
        self.name = (f"self:{adapter}@local:{engine.base_name}" if adapter
                     else f"local:{engine.base_name}")

    def answer(self, conversations: Sequence[list[Message]],
               params: GenerationParams) -> list[str]:
        return [c.text for c in self.engine.generate_batch(
            [(conversation, self.adapter) for conversation in conversations], params)]


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


def training_prompts(persona: Persona, heldout: bool = False,
                     besides: Path | None = None) -> set[str]:
    """The normalized prompts of ``persona``'s chat records: every data file of its bundle
    but the held-out one and ``besides``, or (``heldout``) the held-out one alone.
    Scene-speaking and plain records have no prompt of their own."""
    from hyperlex.training.data import read_dataset
    from hyperlex.training.train import bundle_chat_examples, load_config

    if persona.root is None or not (persona.root / "data").is_dir():
        return set()
    if heldout:
        held = persona.root / load_config(persona.root).heldout
        examples = [e for e in read_dataset(held) if e.is_chat] if held.is_file() else []
    else:
        examples = bundle_chat_examples(persona.root, besides)
    return {normalize_prompt(e.human) for e in examples}


def fresh_prompts(persona: Persona, others: Sequence[Persona], count: int,
                  seed: int = 0, out: Path | None = None) -> list[str]:
    """Up to ``count`` prompts ``persona`` was never trained on, drawn at random (``seed``)
    from the other personas' training prompts, less its own and less every persona's
    held-out prompts (persona identification is measured on those). The prompts of ``out``,
    the file being written, do not count as its own, so that a rerun draws the same prompts
    and resumes."""
    import random

    from hyperlex.training.data import read_dataset
    from hyperlex.training.train import load_config

    excluded = training_prompts(persona, besides=out)
    for bundle in (persona, *others):
        excluded |= training_prompts(bundle, heldout=True)
    candidates, seen = [], set()
    for other in others:
        if other.name == persona.name or other.root is None:
            continue
        source = other.root / load_config(other.root).data
        if not source.is_file():
            continue
        for example in read_dataset(source):
            key = normalize_prompt(example.human)
            if not example.is_chat or key in excluded or key in seen:
                continue
            seen.add(key)
            candidates.append(example.human.strip())
    if not candidates:
        raise HyperlexError(f"no fresh prompts for {persona.name!r}: the other personas' "
                            "training prompts are all its own or held out")
    return random.Random(seed).sample(candidates, min(count, len(candidates)))


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
