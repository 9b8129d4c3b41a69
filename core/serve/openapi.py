"""``GET /openapi.json``: the API ``agent serve`` answers, as an OpenAPI 3.1 document.

Written out rather than generated, because the request is validated by
:func:`hyperlex.serve.openai_api.parse_chat_request` (OpenAI's rules, errors that name the
field), not by a model class; ``tests/test_serve_hostile.py`` holds the two together by
fuzzing the server from this document (schemathesis).
"""

from __future__ import annotations

from typing import Any

from hyperlex import __version__

_NUMBER = {"type": ["number", "null"]}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {"400": _error("The request is invalid; 'param' names the field"),
           "401": _error("No or a wrong API key"),
           "404": _error("No such model, conversation or route")}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
        ]},
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1,
                  "description": "A persona, or 'auto' to route each turn"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE,
                     "description": "The conversation; the last message is the user's turn"},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": 0},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "repetition_penalty": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**64 - 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "null"},
                           {"type": "array", "maxItems": 4, "items": {"type": "string"}}]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"],
                           "properties": {"include_usage": {"type": "boolean"}}},
        "user": {"type": ["string", "null"],
                 "description": "Keeps a conversation when no X-Conversation-Id is sent"},
        "mood": {"type": ["string", "null"], "description": "hyperlex: NAME or NAME:WEIGHT"},
        "response_format": {"type": ["object", "null"],
                            "description": "{'type': 'text' | 'json_object' | 'json_schema'}"},
        "n": {"enum": [1, None]},
        "frequency_penalty": {"enum": [0, None]},
        "presence_penalty": {"enum": [0, None]},
    },
}

_HEADERS = [
    {"name": "X-Conversation-Id", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
     "description": "Keep the scene and persona across requests (saved as a session)"},
    {"name": "X-Hyperlex-Mode", "in": "header", "required": False,
     "schema": {"enum": ["agent", "engine"]},
     "description": "engine: the messages are the whole prompt, as on vLLM"},
]


_NAME = {"name": "name", "in": "path", "required": True,
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
         "description": "The session (the page's conversation; X-Conversation-Id on /v1)"}
_TURN_REQUEST = {
    "type": "object",
    "required": ["message"],
    "additionalProperties": False,
    "properties": {
        "message": {"type": "string", "minLength": 1, "description": "The user's turn"},
        "persona": {"type": "string", "minLength": 1,
                    "description": "'auto' (route; the default) or a persona for this turn"},
        "mood": {"type": ["string", "null"], "description": "A mood layer's name"},
        "mood_weight": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 2},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    },
}


def _page_paths(json_body: dict[str, Any]) -> dict[str, Any]:
    """The page's JSON API (hyperlex.serve.page, docs/ui.md)."""
    def read(operation: str, description: str) -> dict[str, Any]:
        return {"get": {"operationId": operation, "description": description,
                        "parameters": [_NAME], "responses": {
                            "200": {"description": description, "content": json_body},
                            **_ERRORS}}}

    session = read("getSession", "The session: its turns (each with its routing record: "
                   "source, reason, scores) and its latest scene")
    session["delete"] = {"operationId": "deleteSession", "parameters": [_NAME],
                         "description": "Delete the session with its turns and scenes",
                         "responses": {"200": {"description": "{'deleted': name}",
                                               "content": json_body}, **_ERRORS}}
    return {
        "/api/info": {"get": {"operationId": "pageInfo", "responses": {
            "200": {"description": "The personas, moods, router and whether sessions are "
                    "saved", "content": json_body}, **_ERRORS}}},
        "/api/sessions": {"get": {"operationId": "listSessions", "responses": {
            "200": {"description": "{'data': [session info]}, most recently updated first",
                    "content": json_body}, **_ERRORS}}},
        "/api/sessions/{name}": session,
        "/api/sessions/{name}/scenes": read(
            "listSceneVersions", "{'data': [{version, turn, scene, created_at}]}, every "
            "scene version of the session, oldest first"),
        "/api/sessions/{name}/export": {"get": {
            "operationId": "exportSession",
            "parameters": [_NAME, {"name": "format", "in": "query", "required": False,
                                   "schema": {"enum": ["json", "markdown"]}}],
            "responses": {"200": {"description": "The session as agent sessions export "
                                  "writes it", "content": {**json_body, "text/markdown": {
                                      "schema": {"type": "string"}}}}, **_ERRORS}}},
        "/api/sessions/{name}/turns": {"post": {
            "operationId": "createTurn",
            "description": "A turn in the session, streamed as events: route (persona, "
            "source, reason, scores), delta (a piece of the reply), done (the turn, the "
            "scene after it, its diff), then [DONE]; closing the stream cancels the turn",
            "parameters": [_NAME],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/TurnRequest"}}}},
            "responses": {"200": {"description": "Server-Sent Events", "content": {
                "text/event-stream": {"schema": {"type": "string"}}}},
                **_ERRORS, "503": _error("Over --limit-concurrency requests in progress")}}},
    }


def openapi_document() -> dict[str, Any]:
    json_body = {"application/json": {"schema": {"type": "object"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "hyperlex agent serve", "version": __version__,
                 "description": "The personas behind an OpenAI-compatible API (docs/serving.md)"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": ["string", "null"]},
                                   "code": {"type": ["string", "null"]}}}}},
                "ChatCompletionRequest": _CHAT_REQUEST,
                "TurnRequest": _TURN_REQUEST,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"operationId": "health", "security": [],
                                "responses": {"200": {"description": "Serving",
                                                      "content": json_body}}}},
            "/v1/models": {"get": {"operationId": "listModels", "responses": {
                "200": {"description": "'auto' and every persona", "content": json_body},
                **_ERRORS}}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel",
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model", "content": json_body},
                              **_ERRORS}}},
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "parameters": _HEADERS,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {
                    "200": {"description": "A chat.completion, or with stream: true, "
                            "chat.completion.chunk events",
                            "content": {**json_body, "text/event-stream": {
                                "schema": {"type": "string"}}}},
                    **_ERRORS,
                    "413": _error("The body is over --max-body-bytes"),
                    "503": _error("Over --limit-concurrency requests in progress"),
                    "504": _error("The reply took longer than --timeout-generation"),
                }}},
            "/v1/conversations/{conversation}": {"get": {
                "operationId": "retrieveConversation",
                "description": "The caller's saved conversation: its turns and scene",
                "parameters": [{"name": "conversation", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The session document",
                                      "content": json_body}, **_ERRORS}}},
            **_page_paths(json_body),
        },
    }
