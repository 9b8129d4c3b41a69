"""The page's JSON API (``/api``) and the page itself on ``agent serve``, over loopback on the
tiny model: turns streamed with their routing and scene, sessions, export, errors that name
the field, tenants kept apart, ``--no-ui``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hyperlex.agent.store import Store
from hyperlex.serve.http import Server
from hyperlex.serve.openapi import openapi_document
from hyperlex.serve.server import PersonaService
from hyperlex.serve.tenants import load_keys

NEGATION = "The sailor does not see the lighthouse."


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store(tmp_path_factory.mktemp("ui") / "store.db") as opened:
        yield opened


@pytest.fixture(scope="module")
def base(host, engine, store: Store) -> Iterator[str]:
    with Server(PersonaService(host, engine, store=store), port=0, log=False) as server:
        yield server.url.removesuffix("/v1")


def turn(base: str, session: str, headers: dict[str, str] | None = None,
         **body: Any) -> list[dict[str, Any]]:
    """The events of one streamed turn (``[DONE]`` left out)."""
    events = []
    with httpx.stream("POST", f"{base}/api/sessions/{session}/turns", json=body,
                      headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_a_turn_streams_its_route_pieces_and_the_scene_it_left(base: str, store: Store) -> None:
    events = turn(base, "sea", message=NEGATION, persona="beta")
    route, *deltas, done = events
    assert route["type"] == "route" and route["persona"] == "beta"
    assert route["route"]["source"] == "pinned" and route["route"]["reason"]
    assert {e["type"] for e in deltas} == {"delta"}
    assert done["type"] == "done" and done["persona"] == "beta"
    assert done["turn"]["reply"] == "".join(e["content"] for e in deltas).strip()
    labels = {h["id"]: h["label"] for h in done["scene"]["hyperlexemes"]}
    negated = [(labels[link["src"]], link["rel"], labels[link["dst"]])
               for link in done["scene"]["links"] if link["polarity"] == -1]
    assert ("sailor", "see", "lighthouse") in negated
    assert {labels[i] for i in done["diff"]["added"]} >= {"sailor", "lighthouse"}
    assert store.session("sea").turns[0]["reply"] == done["turn"]["reply"]


def test_auto_routes_and_records_the_scores(base: str) -> None:
    route = turn(base, "auto-routed", message="beta, tell me.", persona="auto")[0]
    assert route["persona"] == "beta" and route["route"]["source"] == "request"
    done = httpx.get(f"{base}/api/sessions/auto-routed").json()
    assert done["turns"][0]["route"]["source"] == "request"


def test_sessions_scenes_export_and_delete(base: str) -> None:
    for text in ("The cat sleeps.", NEGATION):
        turn(base, "kept", message=text, persona="alpha")
    names = [s["name"] for s in httpx.get(f"{base}/api/sessions").json()["data"]]
    assert "kept" in names
    versions = httpx.get(f"{base}/api/sessions/kept/scenes").json()["data"]
    assert [v["turn"] for v in versions] == [0, 1]
    assert versions[0]["version"] < versions[1]["version"]
    assert all("field" in v["scene"] for v in versions)
    markdown = httpx.get(f"{base}/api/sessions/kept/export", params={"format": "markdown"})
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text.startswith("# Session kept") and "attachment" in \
        markdown.headers["content-disposition"]
    exported = httpx.get(f"{base}/api/sessions/kept/export").json()
    assert exported["format"] == "hyperlex-session" and len(exported["turns"]) == 2
    assert httpx.delete(f"{base}/api/sessions/kept").json() == {"deleted": "kept"}
    assert httpx.get(f"{base}/api/sessions/kept").status_code == 404


def test_a_turn_resumes_the_sessions_history(base: str, store: Store) -> None:
    turn(base, "two", message="The cat sleeps.", persona="alpha")
    turn(base, "two", message="Where?", persona="alpha")
    assert [t["user"] for t in store.session("two").turns] == ["The cat sleeps.", "Where?"]


@pytest.mark.parametrize(("body", "param"), [
    ({}, "message"),
    ({"message": "  "}, "message"),
    ({"message": 3}, "message"),
    ({"message": "hi", "persona": 7}, "persona"),
    ({"message": "hi", "persona": "nobody"}, "persona"),
    ({"message": "hi", "mood": "nobody"}, "mood"),
    ({"message": "hi", "mood_weight": 3}, "mood_weight"),
    ({"message": "hi", "max_tokens": 0}, "max_tokens"),
    ({"message": "hi", "colour": "red"}, "colour"),
    ([], None),
])
def test_bad_input_is_a_json_error_naming_the_field(base: str, body: Any,
                                                     param: str | None) -> None:
    response = httpx.post(f"{base}/api/sessions/bad/turns", json=body)
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_bad_names_and_formats_are_400s(base: str) -> None:
    assert httpx.get(f"{base}/api/sessions/no%20way").json()["error"]["param"] == "name"
    turn(base, "fmt", message="Hi.", persona="alpha")
    error = httpx.get(f"{base}/api/sessions/fmt/export", params={"format": "pdf"}).json()
    assert error["error"]["param"] == "format"


def test_the_page_and_its_vendored_files_are_served(base: str) -> None:
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("vendor/cytoscape.min.js", "vendor/chart.umd.min.js", "page.js", "page.css"):
        assert f"/ui/{path}" in page.text
        assert httpx.get(f"{base}/ui/{path}").status_code == 200
    missing = httpx.get(f"{base}/ui/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    info = httpx.get(f"{base}/api/info").json()
    assert [p["name"] for p in info["personas"]] == ["alpha", "beta"] and info["store"]


def test_no_ui_leaves_the_api(host, engine) -> None:
    with Server(PersonaService(host, engine), port=0, log=False, ui=False) as server:
        base = server.url.removesuffix("/v1")
        assert httpx.get(f"{base}/").status_code == 404
        assert httpx.get(f"{base}/ui/page.js").status_code == 404
        assert httpx.get(f"{base}/api/info").json()["store"] is False
        assert httpx.get(f"{base}/api/sessions").json() == {"data": []}
        turn(base, "memory", message=NEGATION, persona="alpha")
        scenes = httpx.get(f"{base}/api/sessions/memory/scenes").json()["data"]
        assert len(scenes) == 1 and scenes[0]["scene"]["links"]


def test_a_tenant_never_sees_another_tenants_sessions(host, engine, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("sk-ada-0001 ada\nsk-bob-0002 bob\n")
    ada, bob = ({"Authorization": f"Bearer {key}"} for key in ("sk-ada-0001", "sk-bob-0002"))
    with Store(tmp_path / "store.db") as store, \
            Server(PersonaService(host, engine, store=store), port=0, log=False,
                   keys=load_keys(keys_file)) as server:
        base = server.url.removesuffix("/v1")
        assert httpx.get(f"{base}/").status_code == 200  # the page holds no data
        assert httpx.get(f"{base}/api/sessions").json()["error"]["code"] == "invalid_api_key"
        turn(base, "secret", headers=ada, message="Hi.", persona="alpha")
        assert [s["name"] for s in httpx.get(f"{base}/api/sessions", headers=ada).json()
                ["data"]] == ["secret"]
        assert httpx.get(f"{base}/api/sessions", headers=bob).json() == {"data": []}
        for method, path in (("GET", ""), ("GET", "/scenes"), ("GET", "/export"),
                             ("DELETE", "")):
            response = httpx.request(method, f"{base}/api/sessions/secret{path}", headers=bob)
            assert response.status_code == 404, (method, path)
        assert store.for_tenant("ada").session("secret").info.turns == 1


def test_the_openapi_document_describes_the_page_api() -> None:
    paths = openapi_document()["paths"]
    assert {"/api/info", "/api/sessions", "/api/sessions/{name}",
            "/api/sessions/{name}/scenes", "/api/sessions/{name}/export",
            "/api/sessions/{name}/turns"} <= set(paths)
    assert set(paths["/api/sessions/{name}"]) == {"get", "delete"}
