"""The fast CPU backend: llama.cpp (llama-cpp-python) with every persona's adapter loaded once.

Each persona's PEFT adapter is converted to a GGUF LoRA adapter (``gguf_lora``,
cached by content hash) and loaded into the one model; switching persona is
``llama_set_adapters_lora`` on the context (microseconds; the first decode after a switch
rebuilds the graph). Moods are further adapters at a scale, as in PEFT's weighted sum.

llama.cpp keeps its KV cache across an adapter change, so a cache computed under one persona
would silently answer for another. Each context therefore remembers under which composition
(persona and moods) its cache was computed. Before a turn under another composition it saves
the cache's state (``llama_state_seq_get_data``) under the old composition, clears it, and
restores what the new composition last left (if anything); then only the tokens that differ
from what is cached are prefilled. A small pool of contexts serves concurrent turns; one
context never runs two turns at once. :meth:`LlamaCppEngine.slot` checks a context out of the
pool as a :class:`Slot`, whose steps (switch, prefill, decode, logits) are the ones a turn
takes; benchmarks and tests drive them directly.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hyperlex.engines.base import Engine
from hyperlex.engines.models import ResolvedBase, resolve_base
from hyperlex.errors import HyperlexError
from hyperlex.generation import Generation, GenerationParams, Layers, Message, finish_reason
from hyperlex.persona.bundle import Persona
from hyperlex.structured import GrammarState

if TYPE_CHECKING:
    from hyperlex.structured import ResponseFormat

INSTALL_HINT = "pip install 'hyperlex[llamacpp]'"
SAVED_STATES = 8  # cache states kept per context for compositions not active right now
PREFILL_BLOCK = 32
"""Prompts are decoded in blocks of this many tokens at positions that are multiples of it,
and a cached prefix is reused only up to a block boundary it was decoded to as a whole block:
llama.cpp's arithmetic for a token depends on the batch it was decoded in, so this way a
prompt's logits are bit for bit the same whether its prefix came from the cache or not (a
greedy reply never depends on what a context served before). Why 32: smaller blocks leave
less to decode again on a follow-up turn but prefill a new prompt more slowly
(``python -m bench.prefill_blocks``; the table is in docs/llamacpp.md)."""

Composition = tuple[str | None, tuple[tuple[str, float], ...]]


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


class Slot:
    """One llama.cpp context of an engine's pool and what its KV cache holds: the tokens
    (``tokens``), the composition they were computed under (``composition``; None: nothing
    that a turn may reuse) and the states kept aside for other compositions (``saved``).
    Check one out with :meth:`LlamaCppEngine.slot`; only the holder may use it.

    ``reusable`` is how many leading cached tokens were decoded as whole prefill blocks
    (:data:`PREFILL_BLOCK`): the only ones a later prompt may take from the cache."""

    def __init__(self, engine: LlamaCppEngine, ctx: Any):
        # a proxy, not a reference: no cycle, so a dropped engine frees llama.cpp's memory
        self._engine = weakref.proxy(engine)
        self.ctx = ctx
        self.composition: Composition | None = None
        self.tokens: list[int] = []  # the tokens whose KV is cached
        self.reusable = 0
        self.saved: OrderedDict[Composition, tuple[bytes, list[int], int]] = OrderedDict()

    def _memory(self) -> Any:
        return self._engine._lib.llama_get_memory(self.ctx)

    def set_adapters(self, composition: Composition) -> None:
        """Set the adapters of ``composition`` ((persona, ((mood, weight), ...))) on the
        context at their scales, and nothing else: the cache is left as it is (a turn calls
        :meth:`switch`, which keeps cache and composition together)."""
        engine = self._engine
        persona, moods = composition
        names = ([persona] if persona in engine._adapters else []) + [m for m, _ in moods]
        scales = ([engine.scales[persona]] if persona in engine._adapters else []) + [
            engine.scales[m] * weight for m, weight in moods]
        adapters = (engine._lib.llama_adapter_lora_p_ctypes * len(names))(
            *[engine._adapters[n] for n in names])
        values = (ctypes.c_float * len(names))(*scales)
        if engine._lib.llama_set_adapters_lora(self.ctx, adapters, len(names), values) != 0:
            raise HyperlexError(f"llama.cpp refused the adapters {names}")

    def switch(self, composition: Composition) -> None:
        """Make the cache belong to ``composition``: keep the old composition's cache aside,
        restore the new one's (or start empty) and set its adapters."""
        if self.composition == composition:
            return
        lib = self._engine._lib
        if self.composition is not None and self.tokens:
            size = lib.llama_state_seq_get_size(self.ctx, 0)
            buffer = (ctypes.c_uint8 * size)()
            written = lib.llama_state_seq_get_data(self.ctx, buffer, size, 0)
            self.saved[self.composition] = (bytes(buffer[:written]), self.tokens,
                                            self.reusable)
            self.saved.move_to_end(self.composition)
            while len(self.saved) > SAVED_STATES:
                self.saved.popitem(last=False)
        self._clear()
        saved = self.saved.pop(composition, None)
        if saved is not None:
            data, tokens, reusable = saved
            buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if lib.llama_state_seq_set_data(self.ctx, buffer, len(data), 0):
                self.tokens, self.reusable = tokens, reusable
            else:
                self._clear()
        self.set_adapters(composition)
        self.composition = composition

    def prefill(self, prompt: list[int]) -> None:
        """Decode what ``prompt`` adds to what the cache holds, from the last block boundary
        its cached prefix reaches (at least its last token, whose logits start the reply)."""
        keep = 0
        limit = min(self.reusable, len(prompt) - 1) if self._engine.prompt_cache else 0
        while keep < limit and self.tokens[keep] == prompt[keep]:
            keep += 1
        keep -= keep % PREFILL_BLOCK
        if keep < len(self.tokens):
            self.truncate(keep)
        for start in range(keep, len(prompt), PREFILL_BLOCK):
            self.decode(prompt[start:start + PREFILL_BLOCK])
        self.reusable = len(prompt) - len(prompt) % PREFILL_BLOCK

    def decode(self, tokens: list[int]) -> None:
        """Run ``tokens`` through the model after the cached ones, adding them to the cache
        (on failure the cache is emptied)."""
        lib = self._engine._lib
        array = (lib.llama_token * len(tokens))(*tokens)
        if lib.llama_decode(self.ctx, lib.llama_batch_get_one(array, len(tokens))) != 0:
            self._clear()
            raise HyperlexError("llama.cpp failed to decode (is the context full?)")
        self.tokens.extend(tokens)

    def logits(self) -> Any:
        """The next-token logits after the last decoded token (a float64 numpy copy)."""
        import numpy as np

        pointer = self._engine._lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._engine._n_vocab,)).astype(np.float64)

    def truncate(self, keep: int) -> None:
        """Drop the cached tokens from position ``keep`` on."""
        self._engine._lib.llama_memory_seq_rm(self._memory(), 0, keep, -1)
        self.tokens = self.tokens[:keep]
        self.reusable = min(self.reusable, keep)

    def _clear(self) -> None:
        self._engine._lib.llama_memory_clear(self._memory(), True)
        self.tokens = []
        self.reusable = 0

    def forget(self) -> None:
        """Empty the cache and drop the saved states: the next turn here starts from nothing
        (for a cache filled outside a turn, which no turn may reuse)."""
        self._clear()
        self.composition = None
        self.saved.clear()


class LlamaCppEngine(Engine):
    def __init__(
        self,
        personas: Sequence[Persona] = (),
        base: ResolvedBase | str | None = None,
        exact: bool = False,
        n_ctx: int = 2048,
        threads: int | None = None,
        contexts: int = 1,
        progress: bool = True,
        check_base: bool = True,
        prompt_cache: bool = True,
    ):
        """``exact``: run an F32 GGUF written from the base's weights (the transformers
        engine's numbers) instead of the embedded quantized GGUF (faster). ``contexts``: how
        many turns may run at once (each context holds its own KV cache, about 115 MB at
        2,048 tokens). ``prompt_cache``: reuse the cached part of a prompt (its prefix an
        earlier turn computed, in whole :data:`PREFILL_BLOCK` blocks, so the reply is the
        same as without the cache); False prefills every prompt whole."""
        llama_cpp = _llama_cpp()
        from hyperlex.engines.llamacpp.gguf_base import base_gguf

        if contexts < 1:
            raise HyperlexError(f"contexts must be >= 1, got {contexts}")
        self.base = base if isinstance(base, ResolvedBase) else resolve_base(base)
        self.base_name = self.base.name
        self.exact = exact
        self.prompt_cache = prompt_cache
        self.model_path = base_gguf(self.base, exact=exact, progress=progress)
        # exact: an F32 KV cache (llama.cpp's F16 default moves the logits by a KL of ~3e-5)
        cache_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        with _no_extra_buffer_types(llama_cpp):
            self.llama = llama_cpp.Llama(model_path=str(self.model_path), n_ctx=n_ctx,
                                         n_threads=threads, n_threads_batch=threads,
                                         flash_attn=False, verbose=False,
                                         **(cache_type if exact else {}))
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
        self._slots: queue.Queue[Slot] = queue.Queue()
        self._slots.put(Slot(self, self.llama.ctx))
        self._extra_contexts = []
        for _ in range(contexts - 1):
            ctx = llama_cpp.llama_init_from_model(self.llama.model, self.llama.context_params)
            if ctx is None:
                raise HyperlexError("llama.cpp could not create another context")
            self._extra_contexts.append(ctx)
            self._slots.put(Slot(self, ctx))

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
        """Free the extra contexts and the adapters (the model frees the rest)."""
        for ctx in self._extra_contexts:
            self._lib.llama_free(ctx)
        self._extra_contexts = []
        for adapter in self._adapters.values():
            self._lib.llama_adapter_lora_free(adapter)
        self._adapters = {}

    # contexts -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def slot(self) -> Iterator[Slot]:
        """Check a context out of the pool (waiting while each one runs a turn) for the block;
        no turn runs on it meanwhile. Turns and :meth:`prefill` take theirs this way."""
        slot = self._slots.get()
        try:
            yield slot
        finally:
            self._slots.put(slot)

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
        return int(self.llama.n_ctx())

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
        with self.slot() as slot:
            slot.switch(composition)
            slot.prefill(tokens)

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
        with engine.slot() as slot:
            start = time.perf_counter()
            slot.switch(self._composition)
            slot.prefill(self._prompt)
            sampler = Sampler(params, self._prompt)
            grammar = None if self._format is None else GrammarState(
                engine.grammar_tokenizer(), self._format)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            produced, limit, ended = 0, min(params.max_new_tokens, room), False
            while not self.cancelled and produced < limit:
                allowed = None if grammar is None else grammar.allowed()
                token = sampler.next(slot.logits(), allowed)
                produced += 1
                if engine._lib.llama_vocab_is_eog(engine._vocab, token):
                    ended = True
                    break
                if grammar is not None:
                    grammar.consume(token)
                slot.decode([token])
                piece = decoder.decode(engine.llama.detokenize([token], special=False))
                if piece:
                    yield piece
            self.finish_reason = finish_reason(produced, limit, ended, self.cancelled)
            self.usage.completion_tokens = produced
            self.seconds = time.perf_counter() - start


class Sampler:
    """Picks each next token from llama.cpp's logits the way transformers' ``generate`` does
    for the same settings: repetition penalty over the prompt and the reply, then greedy, or
    temperature, top-k and top-p sampling."""

    def __init__(self, params: GenerationParams, prompt: Sequence[int]):
        import numpy as np

        self.params = params
        self.seen = set(prompt)
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
            if params.top_p < 1.0:
                order = np.argsort(probs)  # ascending, as transformers' TopPLogitsWarper
                cumulative = np.cumsum(probs[order])
                drop = order[cumulative <= 1 - params.top_p]
                probs[drop] = 0.0
                probs /= probs.sum()
            token = int(self.rng.choice(len(probs), p=probs))
        self.seen.add(token)
        return token


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
