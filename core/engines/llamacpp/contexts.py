"""llama.cpp contexts and the sequences in them: what each KV cache holds, and under which
adapters it was computed.

A :class:`Context` is one llama.cpp context with ``sequences`` sequences (``n_seq_max``), each
in its own KV stream (``kv_unified = False``: a sequence attends only to its own cells, and
each has the whole per-turn context length). Adapters are set per context in llama.cpp, so a
context runs one composition (persona and moods) at a time, and every sequence in it is
decoded under it; :meth:`Context.step` decodes one token of each running sequence in one
``llama_decode``. A :class:`Slot` is one sequence: the tokens its cache holds and how many of
them a later prompt may reuse.

llama.cpp keeps its KV cache across an adapter change, so a cache computed under one
composition would silently answer for another. A context therefore switches composition only
as a whole (:meth:`Context.switch`): it keeps each sequence's state aside under the old
composition (``llama_state_seq_get_data``), clears the cache, restores what the new
composition last left and sets its adapters. No sequence ever sees another composition's
cache.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError

if TYPE_CHECKING:
    from hyperlex.engines.llamacpp.engine import LlamaCppEngine

SAVED_STATES = 8  # sequence states kept per context for compositions not active right now
PREFILL_BLOCK = 32
"""Prompts are decoded in blocks of this many tokens at positions that are multiples of it,
and a cached prefix is reused only up to a block boundary it was decoded to as a whole block:
llama.cpp's arithmetic for a token depends on the batch it was decoded in, so this way a
prompt's logits are bit for bit the same whether its prefix came from the cache or not (a
greedy reply never depends on what a context served before). Why 32: smaller blocks leave
less to decode again on a follow-up turn but prefill a new prompt more slowly
(``python -m bench.prefill_blocks``; the table is in docs/llamacpp.md)."""

Composition = tuple[str | None, tuple[tuple[str, float], ...]]


@dataclass
class SavedState:
    """A sequence's cache kept aside while its context runs another composition."""

    composition: Composition
    data: bytes
    tokens: list[int]
    reusable: int


class Context:
    """One llama.cpp context: its sequences (:attr:`slots`), the composition their caches
    belong to and the states kept aside for other compositions. Only one thread uses it at
    a time (the engine's scheduler sees to that)."""

    def __init__(self, engine: LlamaCppEngine, ctx: Any, sequences: int, owned: bool):
        # a proxy, not a reference: no cycle, so a dropped engine frees llama.cpp's memory
        self._engine = weakref.proxy(engine)
        self._lib = engine._lib
        self.ctx = ctx
        self.owned = owned  # freed by close(); the Llama object frees its own context
        self.composition: Composition | None = None
        self.target: Composition | None = None  # what the scheduler runs here next
        self.slots = [Slot(self, seq) for seq in range(sequences)]
        self.saved: list[SavedState] = []  # oldest first
        self._batch = self._lib.llama_batch_init(engine.batch_tokens, 0, 1)

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self.owned and self.ctx is not None:
            self._lib.llama_free(self.ctx)
        self.ctx = None

    def memory(self) -> Any:
        return self._lib.llama_get_memory(self.ctx)

    def set_adapters(self, composition: Composition) -> None:
        """Set the adapters of ``composition`` ((persona, ((mood, weight), ...))) on the
        context at their scales, and nothing else: the caches are left as they are (a turn
        calls :meth:`switch`, which keeps caches and composition together)."""
        engine = self._engine
        persona, moods = composition
        names = ([persona] if persona in engine._adapters else []) + [m for m, _ in moods]
        scales = ([engine.scales[persona]] if persona in engine._adapters else []) + [
            engine.scales[m] * weight for m, weight in moods]
        adapters = (self._lib.llama_adapter_lora_p_ctypes * len(names))(
            *[engine._adapters[n] for n in names])
        values = (ctypes.c_float * len(names))(*scales)
        if self._lib.llama_set_adapters_lora(self.ctx, adapters, len(names), values) != 0:
            raise HyperlexError(f"llama.cpp refused the adapters {names}")

    def switch(self, composition: Composition) -> None:
        """Make every cache here belong to ``composition``: keep the old composition's
        sequence states aside, restore the new one's (or start empty) and set its adapters."""
        if self.composition == composition:
            return
        if self.composition is not None:
            for slot in sorted(self.slots, key=lambda s: s.used):  # the most recent kept last
                if slot.tokens:
                    self.saved.append(SavedState(self.composition, slot.state(), slot.tokens,
                                                 slot.reusable))
            del self.saved[:-SAVED_STATES]
        self.clear()
        restored = [s for s in self.saved if s.composition == composition][-len(self.slots):]
        for slot, state in zip(self.slots, restored, strict=False):
            self.saved.remove(state)
            slot.restore(state.data, state.tokens, state.reusable)
        self.set_adapters(composition)
        self.composition = composition

    def clear(self) -> None:
        self._lib.llama_memory_clear(self.memory(), True)
        for slot in self.slots:
            slot.tokens, slot.reusable = [], 0

    def forget(self) -> None:
        """Empty every cache and drop the saved states: the next turn here starts from
        nothing (for a cache filled outside a turn, which no turn may reuse)."""
        self.clear()
        self.composition = None
        self.saved.clear()

    def decode(self, entries: list[tuple[Slot, int]], outputs: str) -> None:
        """One ``llama_decode`` of ``entries`` ((slot, token) in order; each token goes after
        what its slot's cache holds and is added to it). ``outputs``: ``"last"`` (logits of
        the last entry) or ``"all"``; each slot's :meth:`Slot.logits` reads its own."""
        lib, batch = self._lib, self._batch
        if batch is None:
            raise HyperlexError("the llama.cpp engine is closed")
        positions: dict[int, int] = {}
        for i, (slot, token) in enumerate(entries):
            position = positions.get(slot.seq, len(slot.tokens))
            positions[slot.seq] = position + 1
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq
            last = i == len(entries) - 1
            batch.logits[i] = outputs == "all" or last
            if outputs == "all" or last:
                slot.output = i
        batch.n_tokens = len(entries)
        if lib.llama_decode(self.ctx, batch) != 0:
            self.clear()
            raise HyperlexError("llama.cpp failed to decode (is the context full?)")
        for slot, token in entries:
            slot.tokens.append(token)

    def step(self, slots: list[Slot], tokens: list[int]) -> None:
        """Decode one token for each of ``slots`` together (a decode step of their turns)."""
        self.decode(list(zip(slots, tokens, strict=True)), "all")


class Slot:
    """One sequence of a :class:`Context` and what its KV cache holds: the tokens
    (``tokens``). ``reusable`` is how many leading cached tokens were decoded as whole
    prefill blocks (:data:`PREFILL_BLOCK`): the only ones a later prompt may take from the
    cache. Check one out with :meth:`LlamaCppEngine.slot`; only the holder may use it."""

    def __init__(self, context: Context, seq: int):
        self.context = context
        self.seq = seq
        self.tokens: list[int] = []
        self.reusable = 0
        self.output = -1  # the index of this sequence's logits in the last decode
        self.used = 0  # when a turn last took this sequence (the scheduler's clock)
        # the last prompt prefilled here, under which composition, and its last logits
        self.prefilled: tuple[Composition | None, list[int], Any] | None = None

    @property
    def composition(self) -> Composition | None:
        return self.context.composition

    def set_adapters(self, composition: Composition) -> None:
        self.context.set_adapters(composition)

    def switch(self, composition: Composition) -> None:
        self.context.switch(composition)

    def forget(self) -> None:
        self.context.forget()

    def reuse(self, prompt: list[int]) -> int:
        """How many of ``prompt``'s leading tokens this cache can give (whole blocks only,
        and never the last token, whose logits start the reply)."""
        if not self.context._engine.prompt_cache:
            return 0
        keep, limit = 0, min(self.reusable, len(prompt) - 1)
        while keep < limit and self.tokens[keep] == prompt[keep]:
            keep += 1
        return keep - keep % PREFILL_BLOCK

    def prefill(self, prompt: list[int], source: Slot | None = None) -> Any:
        """Decode what ``prompt`` adds to what the cache holds, from the last block boundary
        its cached prefix reaches (at least its last token, whose logits start the reply),
        and return those next-token logits. With ``source`` (another sequence of this
        context that can give more of the prompt), that sequence's cache is copied here
        first."""
        if source is not None and source.reuse(prompt) > self.reuse(prompt):
            self.restore(source.state(), list(source.tokens), source.reusable)
        keep = self.reuse(prompt)
        if keep < len(self.tokens):
            self.truncate(keep)
        for start in range(keep, len(prompt), PREFILL_BLOCK):
            self.decode(prompt[start:start + PREFILL_BLOCK])
        self.reusable = len(prompt) - len(prompt) % PREFILL_BLOCK
        self.prefilled = (self.composition, list(prompt), self.logits())
        return self.prefilled[2]

    def prompt_logits(self, prompt: list[int]) -> Any | None:
        """The next-token logits after ``prompt`` when this sequence prefilled exactly
        ``prompt`` under the context's composition and its cache still holds it; else None."""
        if self.prefilled is None or not self.context._engine.prompt_cache:
            return None
        composition, tokens, logits = self.prefilled
        held = composition == self.composition and self.tokens[:len(tokens)] == tokens
        return logits if held and tokens == prompt else None

    def take_prompt(self, prompt: list[int], source: Slot) -> Any:
        """Start a turn on ``prompt`` without prefilling it: ``source`` (this sequence or a
        sibling, whose :meth:`prompt_logits` has it) gives its cache, cut back to the
        prompt, and its next-token logits, which are returned. The arithmetic is the
        prefill's own, so the turn goes on bit for bit as if it had prefilled (and does
        prefill when llama.cpp refuses the copied state)."""
        logits = source.prompt_logits(prompt)
        if logits is None:
            raise ValueError("the source sequence does not hold this prompt's logits")
        if source is not self:
            self.restore(source.state(), list(source.tokens), source.reusable)
            if not self.tokens:  # llama.cpp refused the state: prefill after all
                return self.prefill(prompt)
            self.prefilled = source.prefilled
        self.truncate(len(prompt))
        return logits

    def decode(self, tokens: list[int]) -> None:
        """Run ``tokens`` through the model after the cached ones, alone in their batch,
        adding them to the cache (on failure every cache of the context is emptied)."""
        self.context.decode([(self, token) for token in tokens], "last")

    def logits(self) -> Any:
        """The next-token logits after this sequence's last decoded token (a float64 numpy
        copy; valid until the context decodes again)."""
        import numpy as np

        engine = self.context._engine
        pointer = self.context._lib.llama_get_logits_ith(self.context.ctx, self.output)
        return np.ctypeslib.as_array(pointer, shape=(engine._n_vocab,)).astype(np.float64)

    def truncate(self, keep: int) -> None:
        """Drop the cached tokens from position ``keep`` on."""
        self.context._lib.llama_memory_seq_rm(self.context.memory(), self.seq, keep, -1)
        self.tokens = self.tokens[:keep]
        self.reusable = min(self.reusable, keep)

    def state(self) -> bytes:
        """This sequence's cache as llama.cpp serializes it."""
        lib, ctx = self.context._lib, self.context.ctx
        size = lib.llama_state_seq_get_size(ctx, self.seq)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(ctx, buffer, size, self.seq)
        return ctypes.string_at(buffer, written)  # slicing the array would build a list of ints

    def restore(self, data: bytes, tokens: list[int], reusable: int) -> None:
        """Replace this sequence's cache with a state from :meth:`state` (of any sequence
        whose cache belongs to this context's composition)."""
        lib = self.context._lib
        lib.llama_memory_seq_rm(self.context.memory(), self.seq, -1, -1)
        self.prefilled = None
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if lib.llama_state_seq_set_data(self.context.ctx, buffer, len(data), self.seq):
            self.tokens, self.reusable = tokens, reusable
        else:
            lib.llama_memory_seq_rm(self.context.memory(), self.seq, -1, -1)
            self.tokens, self.reusable = [], 0
