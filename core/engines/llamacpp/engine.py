"""The fast CPU backend: llama.cpp (llama-cpp-python) with every persona's adapter loaded once.

Each persona's PEFT adapter is converted to a GGUF LoRA adapter (``gguf_lora``,
cached by content hash) and loaded into the one model; switching persona is
``llama_set_adapters_lora`` on a context (microseconds; the first decode after a switch
rebuilds the graph). Moods are further adapters at a scale, as in PEFT's weighted sum.

A pool of ``contexts`` llama.cpp contexts serves concurrent turns, each context running one
composition (persona and moods) with up to ``sequences`` turns of it decoded together
(``contexts``: the sequences, their caches and composition switches; ``batching``: which turn
runs where, and the decode steps). :meth:`LlamaCppEngine.slot` checks an idle context out as
the :class:`Slot` of its first sequence, whose steps (switch, prefill, decode, logits) are the
ones a turn takes; benchmarks and tests drive them directly.
"""

from __future__ import annotations

import codecs
import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hyperlex.engines.base import Engine
from hyperlex.engines.llamacpp.batching import Scheduler, Turn
from hyperlex.engines.llamacpp.contexts import Composition, Context, Slot
from hyperlex.engines.models import ResolvedBase, resolve_base
from hyperlex.errors import HyperlexError
from hyperlex.generation import Generation, GenerationParams, Layers, Message, finish_reason
from hyperlex.persona.bundle import Persona
from hyperlex.structured import GrammarState

if TYPE_CHECKING:
    from hyperlex.structured import ResponseFormat

INSTALL_HINT = "pip install 'hyperlex[llamacpp]'"

class LlamaCppUnavailable(HyperlexError):
    """llama-cpp-python is not installed."""


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppUnavailable(
            f"the llama.cpp engine needs llama-cpp-python: {INSTALL_HINT} ({exc})") from None
    return llama_cpp


_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """Load models without ggml's extra CPU buffer types (``use_extra_bufts = False``).

    On a CPU with AMX, llama-cpp-python 0.3.36 puts quantized weights in ggml's AMX buffer
    and its ``ggml_backend_amx_mul_mat`` segfaults on the first prompt (seen on these
    machines with the embedded Q4_1 GGUF, adapters or not). The other extra type, CPU weight
    repacking, has kernels for Q4_0, Q8_0, IQ4_NL and K-quants but none for Q4_1, so the
    embedded model loses nothing on other CPUs. ``Llama`` takes no such option: it asks
    ``llama_model_default_params`` while it loads, so that function answers without the
    extra types for the duration of one load."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params() -> Any:
        model_params = default()
        model_params.use_extra_bufts = False
        return model_params

    with _LOAD_LOCK:
        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = default


class LlamaCppEngine(Engine):
    def __init__(
        self,
        personas: Sequence[Persona] = (),
        base: ResolvedBase | str | None = None,
        exact: bool = False,
        n_ctx: int = 2048,
        threads: int | None = None,
        contexts: int = 1,
        sequences: int = 1,
        progress: bool = True,
        check_base: bool = True,
        prompt_cache: bool = True,
    ):
        """``exact``: run an F32 GGUF written from the base's weights (the transformers
        engine's numbers) instead of the embedded quantized GGUF (faster). ``contexts``: how
        many compositions (persona and moods) may run at once; ``sequences``: how many turns
        of one composition each context decodes together (1: one turn per context). Each
        sequence holds its own KV cache of ``n_ctx`` tokens (about 47 MB at 2,048 tokens,
        twice that with ``exact``). ``prompt_cache``: reuse the cached part of a prompt (its
        prefix an earlier turn computed, in whole :data:`PREFILL_BLOCK` blocks, so the reply
        is the same as without the cache); False prefills every prompt whole."""
        llama_cpp = _llama_cpp()
        from hyperlex.engines.llamacpp.gguf_base import base_gguf

        if contexts < 1:
            raise HyperlexError(f"contexts must be >= 1, got {contexts}")
        if sequences < 1:
            raise HyperlexError(f"sequences must be >= 1, got {sequences}")
        self.base = base if isinstance(base, ResolvedBase) else resolve_base(base)
        self.base_name = self.base.name
        self.exact = exact
        self.prompt_cache = prompt_cache
        self.contexts = contexts
        self.sequences = sequences
        self.model_path = base_gguf(self.base, exact=exact, progress=progress)
        # exact: an F32 KV cache (llama.cpp's F16 default moves the logits by a KL of ~3e-5)
        cache_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        self._n_ctx = n_ctx
        self.batch_tokens = min(n_ctx, 512)  # the most tokens one llama_decode takes
        # with one sequence per context, the Llama object's own context is the first one;
        # otherwise every context is made here, and the Llama object's stays small
        own = sequences == 1
        with _no_extra_buffer_types(llama_cpp):
            self.llama = llama_cpp.Llama(model_path=str(self.model_path),
                                         n_ctx=n_ctx if own else min(n_ctx, 256),
                                         n_batch=self.batch_tokens, n_threads=threads,
                                         n_threads_batch=threads, flash_attn=False,
                                         verbose=False, **(cache_type if exact else {}))
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self._n_vocab = self.llama.n_vocab()
        self._template = _chat_template(self.llama.metadata)
        self._grammar_tokenizer: Any = None  # llguidance's, built on the first structured turn
        from hyperlex.engines.llamacpp.gguf_lora import shape_from_metadata

        self._shape = shape_from_metadata(self.llama.metadata, str(self.model_path))
        self.personas: dict[str, Persona] = {}
        self.moods: dict[str, Persona] = {}
        self.skipped: dict[str, str] = {}
        self.scales: dict[str, float] = {}
        self._adapters: dict[str, Any] = {}
        for persona in personas:
            self._attach(persona, check_base)
        self._contexts: list[Context] = []
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llama.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * sequences, sequences, False
        params.n_batch = params.n_ubatch = self.batch_tokens
        for i in range(contexts):
            ctx = self.llama.ctx if own and i == 0 else \
                llama_cpp.llama_init_from_model(self.llama.model, params)
            if ctx is None:
                raise HyperlexError("llama.cpp could not create another context")
            self._contexts.append(Context(self, ctx, sequences, owned=not (own and i == 0)))
        self._scheduler = Scheduler(self._contexts)
        weakref.finalize(self, self._scheduler.stop, False)

    # adapters ------------------------------------------------------------------------------

    def _attach(self, persona: Persona, check_base: bool) -> None:
        if not self._adapter_wanted(persona, check_base):
            return
        from hyperlex.engines.llamacpp.gguf_lora import cached_gguf_adapter

        try:
            path = cached_gguf_adapter(persona.adapter_dir, self._shape)
        except HyperlexError as exc:
            self.skipped[persona.name] = f"adapter of persona {persona.name!r}: {exc}"
            return
        adapter = self._lib.llama_adapter_lora_init(self.llama.model, str(path).encode())
        if not adapter:
            self.skipped[persona.name] = (
                f"adapter of persona {persona.name!r} ({path}) failed to load in llama.cpp")
            return
        self._adapters[persona.name] = adapter
        self.scales[persona.name] = persona.scale
        self._register(persona)

    def grammar_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (about a second to build; kept)."""
        if self._grammar_tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            lib, vocab = self._lib, self._vocab
            eos = [t for t in (lib.llama_vocab_eos(vocab), lib.llama_vocab_eot(vocab)) if t >= 0]
            self._grammar_tokenizer = lltokenizer_from_vocab(vocab, n_vocab=self._n_vocab,
                                                             eos_token=eos)
        return self._grammar_tokenizer

    def close(self) -> None:
        """Stop the decoder threads, free the contexts made here and the adapters (the model
        frees the rest)."""
        self._scheduler.stop()
        for context in self._contexts:
            context.close()
        for adapter in self._adapters.values():
            self._lib.llama_adapter_lora_free(adapter)
        self._adapters = {}

    # contexts -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def slot(self) -> Iterator[Slot]:
        """Check an idle context out of the pool (waiting while each one runs turns) for the
        block, as the :class:`Slot` of its first sequence; no turn runs on it meanwhile."""
        context = self._scheduler.hold()
        try:
            yield context.slots[0]
        finally:
            self._scheduler.release(context)

    def turns(self) -> dict[str, int]:
        """How many turns wait for a context and how many run, now."""
        return self._scheduler.counts()

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # prompts --------------------------------------------------------------------------------

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token="", eos_token="")

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True
               ) -> list[int]:
        text = self.render(messages, add_generation_prompt)
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.encode(messages))

    @property
    def context_length(self) -> int:
        return self._n_ctx

    # generation -----------------------------------------------------------------------------

    def _composition(self, persona: str | None, layers: Layers) -> Composition:
        self.check_request(persona, layers)
        moods = tuple((n, float(w)) for n, w in layers if n in self._adapters)
        return (persona if persona in self._adapters else None, moods)

    def prefill(self, messages: Sequence[Message], persona: str | None,
                layers: Layers = ()) -> None:
        """Decode ``messages`` (say the system message) into a context's cache under
        ``persona``, so the turn that starts with them decodes only the rest."""
        composition = self._composition(persona, layers)
        tokens = self.encode(messages, add_generation_prompt=False)
        for _ in self._scheduler.run(Turn(composition, tokens, limit=0, sampler=None)):
            pass

    def stream(self, messages: Sequence[Message], persona: str | None,
               params: GenerationParams | None = None, stop: Sequence[str] = (),
               layers: Layers = (), response_format: ResponseFormat | None = None
               ) -> Generation:
        composition = self._composition(persona, layers)
        return _LlamaGeneration(self, self.encode(messages), persona, composition,
                                params or GenerationParams(), stop, response_format)


class _LlamaGeneration(Generation):
    def __init__(self, engine: LlamaCppEngine, prompt: list[int], persona: str | None,
                 composition: Composition, params: GenerationParams, stop: Sequence[str],
                 response_format: ResponseFormat | None = None):
        super().__init__(persona, stop)
        self._engine = engine
        self._prompt = prompt
        self._composition = composition
        self._params = params
        self._format = response_format
        self.usage.prompt_tokens = len(prompt)

    def _pieces(self) -> Iterator[str]:
        engine, params = self._engine, self._params
        room = engine.context_length - len(self._prompt)
        if room < 1:
            raise HyperlexError(f"the prompt takes {len(self._prompt)} tokens; the context holds "
                                f"{engine.context_length}")
        start = time.perf_counter()
        grammar = None if self._format is None else GrammarState(
            engine.grammar_tokenizer(), self._format)
        turn = Turn(self._composition, self._prompt, min(params.max_new_tokens, room),
                    Sampler(params), grammar, cancelled=lambda: self.cancelled,
                    is_end=engine.is_end_of_generation)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in engine._scheduler.run(turn):
            piece = decoder.decode(engine.llama.detokenize([token], special=False))
            if piece:
                yield piece
        self.finish_reason = finish_reason(turn.produced, turn.limit, turn.ended, self.cancelled)
        self.usage.completion_tokens = turn.produced
        self.seconds = time.perf_counter() - start


class Sampler:
    """Picks each next token from llama.cpp's logits the way the torch engine's ``generate``
    does for the same settings: repetition penalty over the reply's own tokens (not the
    prompt's), then greedy, or temperature, top-k and top-p sampling."""

    def __init__(self, params: GenerationParams):
        import numpy as np

        self.params = params
        self.seen: set[int] = set()
        self.rng = np.random.default_rng(params.seed)

    def next(self, logits: Any, allowed: Any = None) -> int:
        """The next token; with ``allowed`` (a boolean mask over the vocabulary: a response
        format's grammar), one of those, masked after the penalty as transformers does."""
        import numpy as np

        params = self.params
        if params.repetition_penalty != 1.0 and self.seen:
            index = np.fromiter(self.seen, dtype=np.int64)
            scores = logits[index]
            logits[index] = np.where(scores < 0, scores * params.repetition_penalty,
                                     scores / params.repetition_penalty)
        if allowed is not None:
            logits = np.where(allowed[: len(logits)], logits, -np.inf)
        if params.greedy:
            token = int(np.argmax(logits))
        else:
            logits = logits / params.temperature
            if params.top_k:
                cutoff = np.partition(logits, -params.top_k)[-params.top_k]
                logits = np.where(logits < cutoff, -np.inf, logits)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            candidates = (nucleus(probs, params.top_p) if params.top_p < 1.0
                          else np.flatnonzero(probs))
            token = draw(self.rng, probs, candidates)
        self.seen.add(token)
        return token


def nucleus(probs: Any, top_p: float) -> Any:
    """The tokens of ``probs``' nucleus, in vocabulary order: the most probable ones, taken
    while the mass above each is under ``top_p`` (transformers' ``TopPLogitsWarper`` drops a
    token where the ascending cumulative mass is at most ``1 - top_p``). Sorting the whole
    vocabulary took 4-5 ms a token; the nucleus is almost always among the few most probable
    tokens, so only those are sorted (more when they hold less than ``top_p``)."""
    import numpy as np

    size = len(probs)
    head = min(64, size)
    while True:
        top = np.argpartition(probs, size - head)[size - head:]
        if head == size or probs[top].sum() >= top_p:
            break
        head = min(head * 8, size)
    top = top[np.argsort(-probs[top], kind="stable")]
    mass = probs[top].astype(np.float64)
    return np.sort(top[np.cumsum(mass) - mass < top_p])


def draw(rng: Any, probs: Any, candidates: Any) -> int:
    """One of ``candidates`` (token ids in vocabulary order), drawn in proportion to its
    probability: what ``rng.choice(len(probs), p=...)`` gives with every other token's
    probability zeroed, without building and checking a vocabulary-sized distribution."""
    import numpy as np

    cdf = np.cumsum(probs[candidates], dtype=np.float64)
    cdf /= cdf[-1]
    return int(candidates[np.searchsorted(cdf, rng.random(), side="right")])


def _chat_template(metadata: dict[str, str]) -> Any:
    """The base's chat template from its GGUF, rendered by a sandboxed jinja2 as transformers
    renders it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = metadata.get("tokenizer.chat_template")
    if not source:
        raise HyperlexError("the base GGUF has no chat template; hyperlex needs an "
                            "instruction-tuned model")

    def raise_exception(message: str) -> None:
        raise HyperlexError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def create_engine(personas: Sequence[Persona], base: ResolvedBase | str | None,
                  **options: Any) -> LlamaCppEngine:
    """The registry's constructor (:func:`hyperlex.engines.registry.open_engine`)."""
    return LlamaCppEngine(personas, base=base, **options)
