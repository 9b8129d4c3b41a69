"""The web page of ``agent serve`` (``GET /``) and the small JSON API it runs on (``/api/``).

The page is server-rendered HTML with hand-written JavaScript and two vendored libraries
(``web/static/vendor/VENDORED.md``); it holds no data itself, so it is served without a key,
and everything it shows comes from the JSON API below, under the same API key and tenant
rules as the OpenAI routes (a tenant sees only its own sessions). Everything the page does
is an API call: a client without the page can do the same (docs/ui.md).

- ``GET /api/info``: the personas, moods, router, and whether sessions are saved;
- ``GET /api/sessions``: the tenant's sessions, most recent first;
- ``GET /api/sessions/{name}``: one session (turns with their routing records, scene);
- ``GET /api/sessions/{name}/scenes``: every scene version of it;
- ``GET /api/sessions/{name}/export?format=json|markdown``: as ``agent sessions export``;
- ``DELETE /api/sessions/{name}``;
- ``POST /api/sessions/{name}/turns``: a turn, streamed as events: ``route`` (who speaks
  and why, the router's scores), ``delta`` (a piece of the reply), ``done`` (the recorded
  turn, the scene after it and its diff), then ``[DONE]``; closing the stream cancels it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from hyperlex import __version__
from hyperlex.agent.moods import parse_mood
from hyperlex.agent.store import EXPORT_FORMATS, Store, check_name, export_document
from hyperlex.errors import HyperlexError
from hyperlex.serve.events import EventStream
from hyperlex.serve.openai_api import ApiError, bad_request, parse_chat_request, parse_json_body

if TYPE_CHECKING:
    from hyperlex.serve.app import Api

WEB = Path(__file__).parent / "web"
TURN_FIELDS = ("message", "persona", "mood", "mood_weight", "max_tokens")
MEDIA = {"json": "application/json", "markdown": "text/markdown; charset=utf-8"}


def page_routes(api: Api, ui: bool = True) -> list[BaseRoute]:
    """The JSON API's routes, and with ``ui`` the page and its static files."""
    page = Page(api)
    routes: list[BaseRoute] = [
        Route("/api/info", page.info, methods=["GET"]),
        Route("/api/sessions", page.sessions, methods=["GET"]),
        Route("/api/sessions/{name}", page.session, methods=["GET"]),
        Route("/api/sessions/{name}", page.delete, methods=["DELETE"]),
        Route("/api/sessions/{name}/scenes", page.scenes, methods=["GET"]),
        Route("/api/sessions/{name}/export", page.export, methods=["GET"]),
        Route("/api/sessions/{name}/turns", page.turn, methods=["POST"]),
    ]
    if ui:
        routes += [Route("/", page.index, methods=["GET"]),
                   Mount("/ui", StaticFiles(directory=WEB / "static"), name="ui")]
    return routes


class Page:
    def __init__(self, api: Api):
        self.api = api
        self.service = api.service
        self.templates = Jinja2Templates(directory=WEB / "templates")

    # -- the page ---------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return self.templates.TemplateResponse(request, "index.html", {
            "version": __version__, "key_required": self.api.keys.required})

    # -- the JSON API -----------------------------------------------------------------------

    async def info(self, request: Request) -> Response:
        self.api.tenant(request)
        engine = self.service.engine
        personas = [{"name": name, "title": engine.personas[name].title,
                     "description": engine.personas[name].description}
                    for name in self.service.speakers]
        return JSONResponse({"version": __version__, "personas": personas,
                             "moods": sorted(engine.moods), "router": self.service.router,
                             "store": self.service.store is not None})

    async def sessions(self, request: Request) -> Response:
        tenant = self.api.tenant(request)
        if self.service.store is None:
            return JSONResponse({"data": []})
        infos = await anyio.to_thread.run_sync(self.service.store.for_tenant(tenant).sessions)
        return JSONResponse({"data": [info.as_dict() for info in infos]})

    async def session(self, request: Request) -> Response:
        tenant, name = self._named(request)
        if self.service.store is None:  # a conversation held in memory
            return JSONResponse(await anyio.to_thread.run_sync(
                self.service.conversation, tenant, name))
        record = await self._stored(tenant, name, lambda store: store.session(name))
        return JSONResponse(export_document(record))

    async def scenes(self, request: Request) -> Response:
        tenant, name = self._named(request)
        if self.service.store is None:
            document = await anyio.to_thread.run_sync(self.service.conversation, tenant, name)
            versions = [{"version": document["scene_version"], "turn": None,
                         "scene": document["scene"], "created_at": None}]
        else:
            versions = await self._stored(tenant, name, lambda store: store.scenes(name))
        return JSONResponse({"data": versions})

    async def export(self, request: Request) -> Response:
        tenant, name = self._named(request)
        fmt = request.query_params.get("format", "json")
        if fmt not in EXPORT_FORMATS:
            raise bad_request(f"format must be one of {', '.join(EXPORT_FORMATS)}, got "
                              f"{fmt!r}", "format")
        text = await self._stored(tenant, name, lambda store: store.export(name, fmt))
        suffix = "md" if fmt == "markdown" else "json"
        return Response(text, media_type=MEDIA[fmt], headers={
            "content-disposition": f'attachment; filename="{name}.{suffix}"'})

    async def delete(self, request: Request) -> Response:
        tenant, name = self._named(request)
        await self._stored(tenant, name, lambda store: store.delete_session(name))
        return JSONResponse({"deleted": name})

    async def turn(self, request: Request) -> Response:
        tenant, name = self._named(request)
        return await self.api.admitted(partial(self._turn, request, tenant, name))

    async def _turn(self, request: Request, tenant: str, name: str) -> Response:
        chat = self._chat_request(parse_json_body(await self.api.body(request)))
        start = partial(self.service.start, chat, name, tenant=tenant, own_history=True)
        try:
            reply = await anyio.to_thread.run_sync(start)
        except ApiError as error:
            if error.param == "model":  # the page's field is the persona
                error.param, error.message = "persona", error.message.replace(
                    "The model", "The persona").replace("served models", "personas")
            raise
        opening = {"type": "route", "session": name, "persona": reply.persona,
                   "route": reply.outcome.get("route")}
        return EventStream(self.api, reply, [opening],
                           lambda piece: {"type": "delta", "content": piece},
                           lambda: [{"type": "done", "persona": reply.persona,
                                     "finish_reason": reply.finish_reason, **reply.outcome}])

    # -- helpers ----------------------------------------------------------------------------

    def _named(self, request: Request) -> tuple[str, str]:
        tenant = self.api.tenant(request)
        name = request.path_params["name"]
        try:
            return tenant, check_name(name)
        except HyperlexError:
            raise bad_request(f"session name {name!r}: use 1-64 letters, digits, '-', '_' "
                              "or '.'", "name") from None

    async def _stored(self, tenant: str, name: str, read: Any) -> Any:
        """``read(store)`` on ``tenant``'s view of the store, in a worker thread; a session
        the tenant does not have is a 404 (as if no other tenant had it either)."""
        if self.service.store is None:
            raise ApiError(404, "sessions are not saved: the server runs with --no-store",
                           "name", "not_found")
        store: Store = self.service.store.for_tenant(tenant)
        try:
            return await anyio.to_thread.run_sync(read, store)
        except HyperlexError:
            raise ApiError(404, f"no session {name!r}", "name", "not_found") from None

    def _chat_request(self, body: Any) -> Any:
        """The page's turn body as a chat request; errors name the page's field."""
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object with a 'message'")
        unknown = sorted(set(body) - set(TURN_FIELDS))
        if unknown:
            raise bad_request(f"unknown field {unknown[0]!r}; the fields are "
                              f"{', '.join(TURN_FIELDS)}", unknown[0])
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise bad_request("'message' must be a non-empty string", "message")
        persona = body.get("persona", "auto")
        if not isinstance(persona, str) or not persona:
            raise bad_request("'persona' must be 'auto' or a persona's name", "persona")
        mood = self._mood(body.get("mood"), body.get("mood_weight"))
        return parse_chat_request({"model": persona, "stream": True, "mood": mood,
                                   "max_tokens": body.get("max_tokens"),
                                   "messages": [{"role": "user", "content": message}]})

    def _mood(self, mood: Any, weight: Any) -> str | None:
        if mood is not None and not isinstance(mood, str):
            raise bad_request("'mood' must be a mood's name or null", "mood")
        if weight is not None and (isinstance(weight, bool)
                                   or not isinstance(weight, int | float)
                                   or not 0 < weight <= 2):
            raise bad_request("'mood_weight' must be a number in (0, 2]", "mood_weight")
        if mood in (None, "", "off", "none"):
            return None
        spec = mood if weight is None else f"{mood}:{weight:g}"
        try:
            parse_mood(self.service.engine.moods, spec)
        except HyperlexError as exc:
            raise bad_request(str(exc), "mood") from None
        return spec
