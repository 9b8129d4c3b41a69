"""The remote backend: each turn goes to an OpenAI-compatible server, ``model`` = the persona.

The server hosts the same adapters by persona name: vLLM started with the command
``agent export vllm`` prints, or another ``agent serve``. hyperlex keeps the controller, the
scene and the store; only generation runs remotely. Prompts are rendered here (the persona's
contract and the scene are in the system message) and sent as they are; the
``X-Hyperlex-Mode: engine`` header tells a hyperlex server not to add its own contract (vLLM
ignores it). Token counts for fitting the history come from the base's tokenizer, loaded
locally (no weights).

vLLM applies one adapter per request and cannot mix adapters at weights, so mood adapters
are refused here; prompt-only moods work, since they only change the system message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hyperlex.engines.base import Engine
from hyperlex.engines.models import ResolvedBase, base_source, resolve_base
from hyperlex.errors import HyperlexError
from hyperlex.generation import Generation, GenerationParams, Layers, Message
from hyperlex.persona.bundle import Persona
from hyperlex.persona.prompt import ChatTemplateCounter

if TYPE_CHECKING:
    from hyperlex.structured import ResponseFormat

ENGINE_MODE = {"X-Hyperlex-Mode": "engine"}


class OpenAIEngine(Engine):
    def __init__(self, personas: Sequence[Persona], base_url: str, api_key: str | None = None,
                 base: ResolvedBase | str | None = None, timeout: float = 600.0,
                 check_base: bool = True):
        """Ask the server at ``base_url`` (ending in ``/v1``) which models it serves; each
        persona it serves by name (a prompt-only one: by name or as the base, under the
        base's name) is usable, the rest are in ``skipped`` with the reason."""
        import openai

        self.base = base if isinstance(base, ResolvedBase) else resolve_base(base)
        self.base_name = self.base.name
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none",
                                    timeout=timeout, max_retries=0)
        served = self._served_models()
        self.personas: dict[str, Persona] = {}
        self.moods: dict[str, Persona] = {}
        self.skipped: dict[str, str] = {}
        self.models: dict[str | None, str] = {}  # persona (None: the base) -> served model
        if self.base_name in served:
            self.models[None] = self.base_name
        for persona in personas:
            wanted = self._adapter_wanted(persona, check_base)
            if persona.is_mood:  # kept so that choosing one says why it cannot run here
                self.moods[persona.name] = persona
                continue
            if not wanted and persona.adapter_dir is not None:
                continue
            if persona.name in served:
                self._register(persona)
                self.models[persona.name] = persona.name
            elif persona.adapter_dir is None and None in self.models:
                self.models[persona.name] = self.base_name
            else:
                self._unregister(persona.name)
                self.skipped[persona.name] = (
                    f"the server at {base_url} does not serve a model named {persona.name!r} "
                    f"(it serves {', '.join(sorted(served)) or 'nothing'})")
        source = base_source(self.base, progress=False)
        self._tokenizer = _tokenizer(source)
        lengths = [served[m] for m in self.models.values() if served.get(m)]
        self._context_length = min(lengths) if lengths else _context_length(source)

    def _served_models(self) -> dict[str, int | None]:
        """Model id -> its context length where the server says (vLLM: ``max_model_len``)."""
        try:
            models = self.client.models.list().data
        except Exception as exc:
            raise remote_error(self.base_url, exc) from None
        return {m.id: getattr(m, "max_model_len", None) for m in models}

    def stream(self, messages: Sequence[Message], persona: str | None,
               params: GenerationParams | None = None, stop: Sequence[str] = (),
               layers: Layers = (), response_format: ResponseFormat | None = None
               ) -> Generation:
        self.check_request(persona, layers)
        if layers:
            raise HyperlexError(
                "the openai backend sends one adapter per request: a mood adapter cannot be "
                "composed over a persona there (vLLM has no weighted mixing); use a "
                "prompt-only mood or a local engine")
        if persona not in self.models:
            raise HyperlexError(f"the server at {self.base_url} does not serve the bare base "
                                f"under the name {self.base_name!r}")
        return _RemoteGeneration(self, self.models[persona], list(messages), persona,
                                 params or GenerationParams(), stop, response_format)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return ChatTemplateCounter(self._tokenizer).count_tokens(messages)

    @property
    def context_length(self) -> int:
        return self._context_length


class _RemoteGeneration(Generation):
    def __init__(self, engine: OpenAIEngine, model: str, messages: list[Message],
                 persona: str | None, params: GenerationParams, stop: Sequence[str],
                 response_format: ResponseFormat | None = None):
        super().__init__(persona, stop)
        self.engine = engine
        self.model = model
        self.messages = messages
        self.params = params
        self.response_format = response_format

    def _request(self) -> dict[str, Any]:
        params = self.params
        request: dict[str, Any] = {
            "model": self.model, "messages": self.messages, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": params.temperature,
            "top_p": params.top_p, "max_tokens": params.max_new_tokens,
            "extra_headers": ENGINE_MODE}
        if self.stop:
            request["stop"] = list(self.stop[:4])  # the rest are cut locally
        if params.seed is not None:
            request["seed"] = params.seed
        if self.response_format is not None:  # the server holds the reply to it
            request["response_format"] = self.response_format.as_openai()
        extra = {k: v for k, v in (("top_k", params.top_k),
                                   ("repetition_penalty", params.repetition_penalty))
                 if v != getattr(GenerationParams, k)}
        if extra:  # vLLM's sampling extensions; sent only when asked for
            request["extra_body"] = extra
        return request

    def _pieces(self) -> Iterator[str]:
        import time

        start = time.perf_counter()
        try:
            stream = self.engine.client.chat.completions.create(**self._request())
        except Exception as exc:
            raise remote_error(self.engine.base_url, exc) from None
        try:
            for chunk in stream:
                if self.cancelled:
                    return
                if chunk.usage is not None:
                    self.usage.prompt_tokens = chunk.usage.prompt_tokens
                    self.usage.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.finish_reason in ("stop", "length"):
                        self.finish_reason = choice.finish_reason
                    if choice.delta.content:
                        yield choice.delta.content
        except Exception as exc:
            raise remote_error(self.engine.base_url, exc) from None
        finally:
            stream.close()
            self.seconds = time.perf_counter() - start


def remote_error(url: str, exc: Exception) -> HyperlexError:
    """A one-line error for anything the server or the connection did."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return HyperlexError(f"{url} answered {exc.status_code}: {_message(exc)}")
    if isinstance(exc, openai.APIConnectionError):
        return HyperlexError(f"cannot reach {url}: {exc.__cause__ or exc}")
    return HyperlexError(f"{url}: {type(exc).__name__}: {exc}")


def _message(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(exc.message)


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    from hyperlex.engines.models import quiet_libraries

    quiet_libraries()
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as exc:
        raise HyperlexError(f"could not load the tokenizer of {source!r}: "
                            f"{str(exc).splitlines()[0]}") from None


def _context_length(source: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    return int(getattr(config, "max_position_embeddings", 2048))


def create_engine(personas: Sequence[Persona], base: ResolvedBase | str | None,
                  base_url: str | None = None, **options: Any) -> OpenAIEngine:
    """The registry's constructor (:func:`hyperlex.engines.registry.open_engine`)."""
    if not base_url:
        raise HyperlexError("the openai engine needs base_url, e.g. http://127.0.0.1:8000/v1")
    return OpenAIEngine(personas, base_url, base=base, **options)
