"""``agent serve`` on the tiny model, spoken to by the official ``openai`` client over loopback;
and the ``openai`` backend (engine_openai) talking to that server."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from hyperlex.agent.controller import Controller
from hyperlex.agent.store import Store
from hyperlex.generation import GenerationParams
from hyperlex.host import Host
from hyperlex.serve.http import Server
from hyperlex.serve.server import PersonaService

from .conftest import write_bundle

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(host: Host, engine, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("serve") / "store.db")
    with Server(PersonaService(host, engine, store=store), port=0, log=False) as running:
        yield running
    store.close()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def reference(host: Host, engine, persona: str, message: str, **options: Any) -> str:
    """What ``agent chat --persona PERSONA`` would answer: a fresh controller's turn."""
    controller = Controller(host, engine, persona=persona, overrides=options)
    return controller.send(message).complete().reply


def ask(client: openai.OpenAI, model: str, text: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs)


def test_models_lists_auto_and_every_persona(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["auto", "alpha", "beta"]
    assert client.models.retrieve("beta").description == "A test persona called beta."


@pytest.mark.parametrize("persona", ["alpha", "beta"])
def test_a_completion_is_the_personas_turn(client, host, engine, persona: str) -> None:
    reply = ask(client, persona, "What is time?", max_tokens=6)
    assert reply.model == persona
    assert reply.choices[0].message.content == reference(host, engine, persona, "What is time?",
                                                         max_new_tokens=6)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


@pytest.mark.parametrize("persona", ["alpha", "beta"])
def test_a_stream_sends_the_same_reply_in_chunks(client, host, engine, persona: str) -> None:
    chunks = list(ask(client, persona, "What is time?", max_tokens=6, stream=True,
                      stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {persona}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == reference(host, engine, persona, "What is time?", max_new_tokens=6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_the_two_personas_answer_differently(client) -> None:
    alpha, beta = (ask(client, p, "What is time?", max_tokens=6).choices[0].message.content
                   for p in ("alpha", "beta"))
    assert alpha != beta  # otherwise the mixing test below could not see a mix


def test_concurrent_requests_never_mix_personas(client, host, engine) -> None:
    expected = {p: reference(host, engine, p, "Tell me.", max_new_tokens=8)
                for p in ("alpha", "beta")}
    results: list[tuple[str, str]] = []

    def one(persona: str) -> None:
        chunks = ask(client, persona, "Tell me.", max_tokens=8, stream=True)
        results.append((persona, "".join(c.choices[0].delta.content or "" for c in chunks
                                         if c.choices).strip()))

    threads = [threading.Thread(target=one, args=("alpha" if i % 2 else "beta",))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(text == expected[persona] for persona, text in results)


def test_sampling_fields_are_honoured(client, host, engine) -> None:
    full = ask(client, "alpha", "Tell me.", max_tokens=8).choices[0].message.content
    stop = full[len(full) // 2:][:2]
    cut = ask(client, "alpha", "Tell me.", max_tokens=8, stop=[stop]).choices[0]
    assert full.startswith(cut.message.content) and stop not in cut.message.content
    assert cut.finish_reason == "stop"
    sampled = [ask(client, "alpha", "Tell me.", max_tokens=8, temperature=1.5, top_p=0.95,
                   seed=seed).choices[0].message.content for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the seed makes sampling repeatable


def test_the_clients_system_message_is_added_to_the_contract(client, engine) -> None:
    seen: list[Any] = []
    original = engine.stream

    def spy(messages, *args, **kwargs):
        seen.append(messages)
        return original(messages, *args, **kwargs)

    engine.stream = spy
    try:
        client.chat.completions.create(model="alpha", max_tokens=2, messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"}])
    finally:
        del engine.stream
    system, *rest = seen[0]
    assert system["content"].startswith("You are The Alpha.")
    assert system["content"].endswith("Answer in French.")
    assert rest == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Again"}]


def test_an_unknown_model_is_a_404_with_an_error_body(client) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "oracle", "Hi")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'oracle' does not exist" in error["message"] and "alpha" in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "alpha"}, "messages"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     "temperature"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     "max_tokens"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"model": "alpha", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"model": "alpha", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
])
def test_a_bad_body_is_a_400_naming_the_field(client, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=body, cast_to=object)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def raw(server: Server, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else None


def test_invalid_json_and_unknown_routes_get_openai_error_bodies(server: Server) -> None:
    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json",
                       {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(server, "GET", "/v1/embeddings")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_the_connection_survives_an_error(server: Server) -> None:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(2):
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "nobody"}')
        response = connection.getresponse()
        assert response.status == 400 and json.loads(response.read())["error"]["param"]
    connection.request("GET", "/v1/models")
    assert connection.getresponse().status == 200
    connection.close()


def test_an_api_key_is_required_when_the_server_has_one(host, engine) -> None:
    with Server(PersonaService(host, engine), port=0, api_key=KEY, log=False) as secured:
        wrong = openai.OpenAI(base_url=secured.url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.status_code == 401
        assert caught.value.body["code"] == "invalid_api_key"
        status, body = raw(secured, "POST", "/v1/chat/completions", b"{}")  # no key at all
        assert status == 401 and "no API key" in body["error"]["message"]
        keyed = openai.OpenAI(base_url=secured.url, api_key=KEY, max_retries=0)
        assert ask(keyed, "alpha", "Hi", max_tokens=2).choices[0].message.content
        assert raw(secured, "GET", "/health")[0] == 200


def test_a_conversation_id_keeps_the_scene_and_is_saved(client, server: Server) -> None:
    headers = {"X-Conversation-Id": "served-1"}
    first = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "@beta The old lighthouse."}],
        max_tokens=4, extra_headers=headers)
    assert first.model == "beta" and first.hyperlex["route"]["source"] == "address"
    second = client.chat.completions.create(model="auto", max_tokens=4, extra_headers=headers,
                                            messages=[{"role": "user", "content": "And then?"}])
    assert second.model == "beta"  # the conversation remembers who was speaking
    record = server.service.store.session("served-1")
    assert [t["persona"] for t in record.turns] == ["beta", "beta"]
    assert "lighthouse" in record.latest_scene()
    stateless = ask(client, "auto", "And then?", max_tokens=4)
    assert stateless.model == "alpha"  # a request without an id starts from nothing


def test_the_user_field_is_a_conversation_id(client, server: Server) -> None:
    for text in ("@beta A red kite.", "More?"):
        reply = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": text}], max_tokens=3,
            user="visitor-7")
        assert reply.model == "beta"
    assert len(server.service.store.session("visitor-7").turns) == 2


# the openai backend --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(server: Server, tiny_base: Path, tiny_bundles: dict[str, Path]):
    from hyperlex.engines.openai import OpenAIEngine
    from hyperlex.persona.bundle import Persona

    return OpenAIEngine([Persona.from_dir(p) for p in tiny_bundles.values()], server.url,
                        base=str(tiny_base))


def test_the_backend_generates_what_the_local_engine_would(remote, engine) -> None:
    messages = [{"role": "system", "content": "Be alpha."}, {"role": "user", "content": "Go"}]
    for persona in ("alpha", "beta"):
        params = engine.personas[persona].contract.params()
        local = engine.generate(messages, persona, params)
        served = remote.generate(messages, persona, params)
        assert served.text.strip() == local.text.strip()
        assert served.usage.completion_tokens == local.usage.completion_tokens
        assert served.usage.prompt_tokens == local.usage.prompt_tokens
    assert remote.count_tokens(messages) == engine.count_tokens(messages)


def test_a_controller_on_the_backend_keeps_scene_and_history_locally(remote, host,
                                                                     engine) -> None:
    on_server = Controller(host, remote, persona="beta")
    local = Controller(host, engine, persona="beta")
    for text in ("The moon and the sea.", "What else?"):
        assert on_server.send(text).complete().reply == local.send(text).complete().reply
    assert on_server.scene.to_json() == local.scene.to_json()
    assert len(on_server.history) == 4


def test_the_backend_names_what_the_server_lacks(server: Server, tiny_base, tiny_bundles,
                                                 tmp_path: Path) -> None:
    from hyperlex.engines.openai import OpenAIEngine
    from hyperlex.errors import HyperlexError
    from hyperlex.persona.bundle import Persona

    extra = Persona.from_dir(write_bundle(tmp_path, "gamma", adapter_seed=3,
                                          tiny_base=tiny_base))
    mood = Persona.from_dir(write_bundle(tmp_path, "gloomy", adapter_seed=4, tiny_base=tiny_base,
                                         extra_yaml="kind: mood\n"))
    alpha = Persona.from_dir(tiny_bundles["alpha"])
    backend = OpenAIEngine([extra, mood, alpha], server.url, base=str(tiny_base))
    assert "does not serve a model named 'gamma'" in backend.skipped["gamma"]
    assert list(backend.personas) == ["alpha"] and list(backend.moods) == ["gloomy"]
    with pytest.raises(HyperlexError, match="one adapter per request"):
        backend.stream([{"role": "user", "content": "Hi"}], "alpha", layers=[("gloomy", 0.5)])
    with pytest.raises(HyperlexError, match="cannot reach http://127.0.0.1:9/v1"):
        OpenAIEngine([extra], "http://127.0.0.1:9/v1", base=str(tiny_base))


def test_a_client_that_leaves_mid_stream_cancels_the_turn(client, server: Server) -> None:
    headers = {"X-Conversation-Id": "left-early"}
    stream = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Talk for a long time."}],
        max_tokens=400, stream=True, extra_headers=headers)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    # the conversation is free again (not locked by the abandoned turn) and has no turn saved
    after = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Short, then."}], max_tokens=2,
        extra_headers=headers)
    assert after.choices[0].finish_reason == "length"
    turns = server.service.store.session("left-early").turns
    assert [t["user"] for t in turns] == ["Short, then."]


def test_a_prompt_longer_than_the_context_is_a_400_and_changes_nothing(client,
                                                                       server: Server) -> None:
    headers = {"X-Conversation-Id": "too-long"}
    ask(client, "alpha", "A first short turn.", max_tokens=2, extra_headers=headers)
    before = server.service.store.session("too-long").latest_scene()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, "alpha", "time " * 1000, max_tokens=5, stream=stream,
                extra_headers=headers)
        assert caught.value.body["code"] == "context_length_exceeded"
        assert "holds 512" in caught.value.body["message"]
    record = server.service.store.session("too-long")
    assert len(record.turns) == 1 and record.latest_scene() == before
    again = ask(client, "alpha", "Short.", max_tokens=2, extra_headers=headers)
    assert again.choices[0].finish_reason == "length"


def test_a_mood_can_be_asked_for_per_request(client, host, engine, tmp_path_factory,
                                             tiny_base: Path, tiny_bundles) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    root = tmp_path_factory.mktemp("moods")
    gloomy = write_bundle(root, "gloomy", adapter_seed=5, tiny_base=tiny_base,
                          extra_yaml="kind: mood\n")
    with_mood = TorchEngine([Persona.from_dir(p) for p in (*tiny_bundles.values(), gloomy)],
                            base=str(tiny_base))
    with Server(PersonaService(host, with_mood), port=0, log=False) as moody:
        mood_client = openai.OpenAI(base_url=moody.url, api_key="unused", max_retries=0)
        plain = ask(mood_client, "alpha", "Tell me.", max_tokens=8)
        layered = ask(mood_client, "alpha", "Tell me.", max_tokens=8,
                      extra_body={"mood": "gloomy:1.5"})
        expected = Controller(host, with_mood, persona="alpha", mood="gloomy:1.5",
                              overrides={"max_new_tokens": 8}).send("Tell me.").complete()
        assert layered.choices[0].message.content == expected.reply
        assert layered.choices[0].message.content != plain.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="unknown mood 'sunny'"):
            ask(mood_client, "alpha", "Tell me.", extra_body={"mood": "sunny"})


def test_an_email_in_the_user_field_still_keeps_a_conversation(client, server) -> None:
    for text in ("@beta Hello there.", "And you?"):
        reply = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": text}], max_tokens=2,
            user="alice@example.com")
        assert reply.model == "beta"
        assert reply.hyperlex["conversation"].startswith("user-")


def test_other_methods_and_string_numbers_get_error_bodies(server: Server, client) -> None:
    status, body = raw(server, "DELETE", "/v1/models")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", cast_to=object, body={
            "model": "alpha", "messages": [{"role": "user", "content": "x"}],
            "temperature": "3"})
    assert caught.value.body["param"] == "temperature"


def test_a_persona_that_could_not_be_loaded_says_why(host, tiny_base: Path, tiny_bundles,
                                                     tmp_path: Path) -> None:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    stranger = Persona.from_dir(write_bundle(tmp_path, "stranger", adapter_seed=6,
                                             tiny_base=tiny_base, base_model="another-base"))
    engine = TorchEngine([Persona.from_dir(tiny_bundles["alpha"]), stranger],
                         base=str(tiny_base))
    with Server(PersonaService(host, engine), port=0, log=False) as serving:
        c = openai.OpenAI(base_url=serving.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            ask(c, "stranger", "Hi")
        assert "trained on base 'another-base'" in caught.value.body["message"]


# structured output ------------------------------------------------------------------------

MOOD_SCHEMA = {"type": "object", "properties": {
    "mood": {"enum": ["calm", "stormy"]}, "word": {"type": "string", "maxLength": 6}},
    "required": ["mood", "word"], "additionalProperties": False}


@pytest.mark.parametrize("mode", ["", "engine"])
def test_a_json_schema_response_format_is_honoured(client, server: Server, mode: str) -> None:
    from hyperlex.structured import ResponseFormat

    headers = {"X-Hyperlex-Mode": mode} if mode else {}
    fmt = {"type": "json_schema",
           "json_schema": {"name": "mood", "schema": MOOD_SCHEMA, "strict": True}}
    reply = ask(client, "alpha", "How is the sea?", response_format=fmt, max_tokens=64,
                temperature=0, extra_headers=headers)
    assert reply.choices[0].finish_reason == "stop"
    assert ResponseFormat.json_schema(MOOD_SCHEMA).parse(reply.choices[0].message.content)
    chunks = ask(client, "alpha", "How is the sea?", response_format=fmt, max_tokens=64,
                 temperature=0, extra_headers=headers, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content


def test_json_object_mode_and_a_cut_reply(client) -> None:
    reply = ask(client, "beta", "Any JSON", response_format={"type": "json_object"},
                max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(("response_format", "named"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}},
     "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}, "additionalProperties"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_a_response_format_that_cannot_be_honoured_is_a_400(client, response_format,
                                                            named: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "alpha", "Hi", response_format=response_format)
    assert caught.value.body["param"] == "response_format"
    assert named in caught.value.body["message"]


def test_the_backend_passes_the_response_format_through(remote, engine) -> None:
    from hyperlex.structured import ResponseFormat

    fmt = ResponseFormat.json_schema(MOOD_SCHEMA)
    messages = [{"role": "user", "content": "Go"}]
    params = GenerationParams(temperature=0, max_new_tokens=64)
    served = remote.generate(messages, "alpha", params, response_format=fmt)
    assert served.text == engine.generate(messages, "alpha", params, response_format=fmt).text
    assert fmt.parse(served.text)


def test_best_of_answers_with_one_of_the_samples_and_bad_values_are_refused(
        client, host, engine) -> None:
    """``best_of`` (vLLM's extension) samples that many replies and answers with the one the
    controller's check ranks first: the same reply a controller gives for the same seed."""
    sampling = {"max_tokens": 6, "temperature": 1.0, "seed": 4}
    reply = ask(client, "alpha", "Tell me.", extra_body={"best_of": 3}, **sampling)
    expected = Controller(host, engine, persona="alpha", overrides={
        "max_new_tokens": 6, "temperature": 1.0, "seed": 4}).send(
            "Tell me.", best_of=3).complete()
    assert reply.choices[0].message.content == expected.reply
    assert reply.usage.completion_tokens == expected.completion_tokens
    for bad, message in ((0, "best_of must be a whole number from 1 to 16"),
                         (17, "best_of must be a whole number from 1 to 16")):
        with pytest.raises(openai.BadRequestError, match=message) as caught:
            ask(client, "alpha", "Tell me.", extra_body={"best_of": bad}, **sampling)
        assert caught.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError, match="cannot be combined with 'response_format'"):
        ask(client, "alpha", "Tell me.", extra_body={"best_of": 2},
            response_format={"type": "json_object"}, **sampling)
    with pytest.raises(openai.BadRequestError, match="best_of 2 needs sampling"):
        ask(client, "alpha", "Tell me.", extra_body={"best_of": 2}, max_tokens=6, temperature=0)
    with pytest.raises(openai.BadRequestError, match="'best_of' needs the agent mode"):
        ask(client, "alpha", "Tell me.", extra_body={"best_of": 2},
            extra_headers={"X-Hyperlex-Mode": "engine"}, **sampling)
