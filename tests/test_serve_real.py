"""``agent serve`` as users run it: a real process on loopback with the installed personas on
the embedded model, spoken to by the official ``openai`` client and by ``agent chat
--backend openai``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from bench.cold import agent_command

pytestmark = pytest.mark.real_model

KEY = "sk-hyperlex-test"
QUESTION = "What is time?"


@pytest.fixture(scope="module")
def real_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(autouse=True)
def use_real_home(real_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERLEX_HOME", str(real_home))


@contextlib.contextmanager
def serving(real_home: Path, *args: str, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A running ``agent serve ARGS`` process and its URL; killed on exit if still running."""
    env = {**os.environ, "HYPERLEX_HOME": str(real_home), **env}
    proc = subprocess.Popen([*agent_command(), "serve", "--port", "0", "--quiet", *args],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("Serving"):
            break
    else:
        pytest.fail("agent serve exited before serving:\n" + "".join(lines))
    url = line.split(" on ", 1)[1].split(";")[0].split(" ")[0]
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(real_home: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    with serving(real_home, HYPERLEX_API_KEY=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: tuple[subprocess.Popen, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0, timeout=300)


def ask(client: openai.OpenAI, model: str, **kwargs) -> object:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=24, **kwargs)


def test_the_server_binds_loopback_and_lists_every_persona(server, client) -> None:
    assert server[1].startswith("http://127.0.0.1:")
    from hyperlex.host import Host

    installed = sorted(n for n, p in Host().personas.items() if not p.is_mood)
    assert [m.id for m in client.models.list().data] == ["auto", *installed]


def test_every_persona_answers_the_official_client(client) -> None:
    replies = {}
    for model in [m.id for m in client.models.list().data]:
        reply = ask(client, model)
        text = reply.choices[0].message.content
        assert text and reply.usage.completion_tokens > 0, model
        if model != "auto":
            assert reply.model == model
            replies[model] = text
    assert len(set(replies.values())) == len(replies)  # each persona speaks its own way


@pytest.mark.parametrize("persona", ["philosopher", "poet"])
def test_a_stream_is_the_same_reply_as_the_completion(client, persona: str) -> None:
    whole = ask(client, persona).choices[0].message.content
    chunks = list(ask(client, persona, stream=True))
    assert {c.model for c in chunks} == {persona}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_greedy_replies_are_the_same_on_every_context_whatever_it_served(client) -> None:
    """agent serve runs four llama.cpp contexts by default. Concurrent requests spread over
    them, and between the repeats each context serves other questions, other personas and
    longer conversations (so its cache holds other prefixes): the same greedy request still
    gets the same reply, word for word."""
    baseline = ask(client, "philosopher").choices[0].message.content
    others = [("poet", [{"role": "user", "content": QUESTION}]),
              ("philosopher", [{"role": "user", "content": "What is a friend?"}]),
              ("philosopher", [{"role": "user", "content": QUESTION},
                               {"role": "assistant", "content": baseline},
                               {"role": "user", "content": "And what is change?"}])]

    def request(i: int) -> str | None:
        if i % 2:
            model, messages = others[i // 2 % len(others)]
            client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=24)
            return None
        return ask(client, "philosopher").choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = [r for r in pool.map(request, range(24)) if r is not None]
    assert replies == [baseline] * 12


def test_a_wrong_key_is_refused(server) -> None:
    stranger = openai.OpenAI(base_url=server[1], api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_chat_on_the_openai_backend_gets_the_servers_reply(server, client,
                                                           real_home: Path) -> None:
    """The controller runs in `agent chat`; generation runs in the server. The prompt the
    chat renders is the one the server renders itself for the same turn, so the greedy
    replies agree word for word."""
    env = {**os.environ, "HYPERLEX_HOME": str(real_home), "OPENAI_API_KEY": KEY}
    result = subprocess.run(
        [*agent_command(), "chat", "--backend", "openai", "--base-url", server[1], "-p",
         "philosopher", "-m", QUESTION, "-o", "temperature", "0", "-o", "max_new_tokens",
         "24", "--no-store"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"served by {server[1]}" in result.stderr
    assert result.stdout.strip() == ask(client, "philosopher").choices[0].message.content


class Sighting(BaseModel):
    """What a sailor saw."""

    thing: str = Field(max_length=40)
    near: bool
    sea: Literal["calm", "rough"]


def test_the_official_clients_parse_gets_a_pydantic_object(client) -> None:
    completion = client.chat.completions.parse(
        model="interface", response_format=Sighting, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "A sailor saw a lighthouse across a calm sea."}])
    message = completion.choices[0].message
    assert isinstance(message.parsed, Sighting) and message.refusal is None
    assert completion.choices[0].finish_reason == "stop"


def test_langchains_chat_openai_structured_output_against_agent_serve(server) -> None:
    """As OpenAI's structured outputs are used: strict, so every object is closed (an open
    one lets a small model add properties until the token limit)."""
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="interface", base_url=server[1], api_key=KEY, temperature=0,
                       max_tokens=128, max_retries=0)
    text = "A sailor saw a lighthouse across a calm sea."
    sighting = model.with_structured_output(Sighting, strict=True).invoke(text)
    assert isinstance(sighting, Sighting)
    schema = {**Sighting.model_json_schema(), "additionalProperties": False}
    as_dict = model.with_structured_output(schema, method="json_schema",
                                           strict=True).invoke(text)
    assert set(as_dict) == {"thing", "near", "sea"}


def test_tenants_of_a_real_server_each_see_only_their_own(real_home: Path,
                                                         tmp_path: Path) -> None:
    """``agent serve --api-keys FILE``: two tenants use the same conversation id; each gets
    its own conversation and session, and one's id is a 404 to the other."""
    import httpx

    keys = tmp_path / "keys.txt"
    keys.write_text("sk-ada-1 ada\nsk-bob-2 bob\n")
    with serving(real_home, "--api-keys", str(keys), "--parallel", "1") as (proc, url):
        def say(key: str, question: str, conversation: str) -> None:
            tenant = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
            tenant.chat.completions.create(
                model="philosopher", messages=[{"role": "user", "content": question}],
                temperature=0, max_tokens=8, extra_headers={"X-Conversation-Id": conversation})

        def read(key: str, conversation: str) -> httpx.Response:
            return httpx.get(f"{url}/conversations/{conversation}", timeout=30,
                             headers={"Authorization": f"Bearer {key}"})

        say("sk-ada-1", QUESTION, "plans")
        say("sk-bob-2", "What is a friend?", "plans")
        say("sk-ada-1", "What is a secret?", "ada-notes")
        ada, bob = read("sk-ada-1", "plans").text, read("sk-bob-2", "plans").text
        assert QUESTION in ada and "friend" not in ada
        assert "friend" in bob and QUESTION not in bob
        hidden = read("sk-bob-2", "ada-notes")
        assert hidden.status_code == 404 and hidden.json()["error"]["param"] == "conversation"
        proc.send_signal(signal.SIGTERM)  # the sessions are read after a clean stop
        proc.communicate(timeout=60)
    listed = subprocess.run([*agent_command(), "sessions", "list", "--json"], capture_output=True,
                            text=True, timeout=120, env={**os.environ,
                                                         "HYPERLEX_HOME": str(real_home)})
    assert listed.returncode == 0, listed.stderr
    plans = sorted(s["tenant"] for s in json.loads(listed.stdout) if s["name"] == "plans")
    assert plans == ["ada", "bob"]


def test_ctrl_c_stops_the_server(server) -> None:
    proc, _ = server
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Stopped." in err
