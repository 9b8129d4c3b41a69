"""Turns on the llama.cpp engine's contexts, decoded together when they share a composition.

Every turn waits in one queue. A context runs one composition at a time (adapters are per
context in llama.cpp) and up to ``sequences`` turns of it at once: each decode step is one
``llama_decode`` with the next token of every running turn (continuous batching: a turn of
the same composition joins between two steps, and leaves when it ends). Contexts are given
to compositions by demand:

- a context with running turns admits waiting turns of its composition while it has a free
  sequence, but only as long as it still runs a turn older than the oldest waiting turn of a
  composition no busy context runs; then it drains (so a stream of one persona's turns
  cannot starve another persona);
- a context with no running turns takes the composition of the oldest waiting turn
  (preferring the context whose cache already belongs to it, or keeps it aside) and admits
  up to ``sequences`` of its turns; only then does it switch its adapters.

Each context has its own decoder thread, which runs its steps while it has turns; the
threads that asked for the turns only wait for their tokens. (Steps run by whichever thread
waited were up to twice as slow on 2 cores: each calling thread gets its own team of
llama.cpp worker threads, and idle teams spin.) Each turn keeps its own sampler, grammar,
stop, cancel and stream.

A new turn's prompt is prefilled alone in its batch, in whole blocks, from the longest cached
prefix any sequence of its context holds, or not at all when a sequence there prefilled
exactly that prompt and still holds it (the samples of one best-of turn share one prefill
and its first logits, as vLLM's ``n`` does); a decode step batches one token per turn, whose
arithmetic does not depend on the other rows, so a greedy reply is the same whether it ran
alone or beside others.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hyperlex.engines.llamacpp.contexts import Composition, Context, Slot
from hyperlex.errors import HyperlexError

if TYPE_CHECKING:
    from hyperlex.engines.llamacpp.engine import Sampler
    from hyperlex.structured import GrammarState


@dataclass(eq=False)
class Turn:
    """One generation's place in the scheduler: its prompt and sampling, and what it has
    produced (``out``: tokens the consumer has not taken yet)."""

    composition: Composition
    prompt: list[int]
    limit: int  # tokens to sample; 0: prefill the prompt only
    sampler: Sampler | None
    grammar: GrammarState | None = None
    cancelled: Callable[[], bool] = lambda: False
    is_end: Callable[[int], bool] = lambda token: False
    context: Context | None = None
    slot: Slot | None = None
    started: bool = False
    pending: int | None = None  # sampled, not yet decoded
    produced: int = 0
    ended: bool = False  # stopped at an end-of-generation token
    done: bool = False
    abandoned: bool = False
    ticket: int = 0
    error: BaseException | None = None
    out: deque[int] = field(default_factory=deque)


class Scheduler:
    """Assigns waiting turns to contexts and runs the contexts' decode steps."""

    def __init__(self, contexts: list[Context]):
        self.contexts = contexts
        self._cond = threading.Condition()
        self._waiting: list[Turn] = []
        self._running: dict[int, list[Turn]] = {id(c): [] for c in contexts}
        self._driving: set[int] = set()
        self._held: set[int] = set()  # contexts checked out by hold()
        self._clock = 0  # orders the sequences by when a turn last took them
        self._workers: list[threading.Thread] = []
        self._stopped = False
        self._tickets = 0  # orders the turns by arrival

    # the consumer's side ----------------------------------------------------------------------

    def run(self, turn: Turn) -> Iterator[int]:
        """Queue ``turn`` and yield its tokens as they are sampled (end-of-generation
        excluded); when the iterator is closed early, the turn leaves its context."""
        with self._cond:
            if self._stopped:
                raise HyperlexError("the llama.cpp engine is closed")
            self._tickets += 1
            turn.ticket = self._tickets
            self._waiting.append(turn)
            self._assign()
            if not self._workers:
                self._workers = [threading.Thread(target=self._work, args=(context,),
                                                  daemon=True, name=f"hyperlex-llamacpp-{i}")
                                 for i, context in enumerate(self.contexts)]
                for worker in self._workers:
                    worker.start()
        try:
            while True:
                with self._cond:
                    while not turn.out and not turn.done:
                        self._cond.wait()
                    tokens = [turn.out.popleft() for _ in range(len(turn.out))]
                yield from tokens
                if turn.done and not turn.out:
                    if turn.error is not None:
                        raise turn.error
                    return
        finally:
            with self._cond:
                if not turn.done:  # the consumer went away: the turn leaves
                    turn.abandoned = True  # (a running one at the decoder's next step)
                    if turn in self._waiting:
                        self._waiting.remove(turn)
                        turn.done = True
                        self._assign()

    def stop(self, join: bool = True) -> None:
        """End the decoder threads (the engine is closing); waiting turns fail. ``join``:
        wait for the threads to end (not from a finalizer, which may run on one of them
        while it holds the lock the others need to return)."""
        with self._cond:
            self._stopped = True
            for turn in self._waiting:
                turn.error, turn.done = HyperlexError("the llama.cpp engine is closed"), True
            self._waiting.clear()
            self._cond.notify_all()
        for worker in self._workers if join else ():
            if worker is not threading.current_thread():
                worker.join()

    def counts(self) -> dict[str, int]:
        """Turns waiting for a context and turns running on one, now."""
        with self._cond:
            return {"waiting": len(self._waiting),
                    "running": sum(len(turns) for turns in self._running.values())}

    def hold(self) -> Context:
        """Check out a context with no turns for the caller's own use (benchmarks, tests):
        no turn is assigned to it until :meth:`release`."""
        with self._cond:
            while True:
                free = [c for c in self.contexts if self._idle(c)]
                if free:
                    self._held.add(id(free[0]))
                    return free[0]
                self._cond.wait()

    def release(self, context: Context) -> None:
        with self._cond:
            self._held.discard(id(context))
            self._assign()

    # assignment (under the lock) --------------------------------------------------------------

    def _idle(self, context: Context) -> bool:
        key = id(context)
        return not self._running[key] and key not in self._driving and key not in self._held

    def _assign(self) -> None:
        while True:
            busy = [c for c in self.contexts if self._running[id(c)]]
            running = {c.target for c in busy}
            starving = next((t for t in self._waiting if t.composition not in running), None)
            for context in busy:
                # keep admitting only while the context still runs a turn older than the
                # oldest turn that waits for a context: then it drains and can switch
                oldest = min(t.ticket for t in self._running[id(context)])
                if starving is None or oldest < starving.ticket:
                    self._admit(context, list(self._waiting))
            idle = [c for c in self.contexts if self._idle(c)]
            if not self._waiting or not idle:
                break
            first = starving if starving is not None and starving in self._waiting \
                else self._waiting[0]
            context = self._best_idle(idle, first.composition)
            context.target = first.composition
            self._admit(context, list(self._waiting))
        self._cond.notify_all()

    @staticmethod
    def _best_idle(idle: list[Context], composition: Composition) -> Context:
        return max(idle, key=lambda c: (c.composition == composition,
                                        any(s.composition == composition for s in c.saved),
                                        -max(s.used for s in c.slots)))

    def _admit(self, context: Context, candidates: list[Turn]) -> None:
        running = self._running[id(context)]
        for turn in candidates:
            if len(running) >= len(context.slots):
                break
            if turn.composition == context.target:
                self._waiting.remove(turn)
                turn.context = context
                running.append(turn)

    # the decoder threads -----------------------------------------------------------------------

    def _work(self, context: Context) -> None:
        """Step ``context`` while it has turns, until stopped. A context is always decoded
        on its own thread: llama.cpp's worker threads (an OpenMP team per calling thread)
        stay with it."""
        key = id(context)
        while True:
            with self._cond:
                while not self._running[key] or key in self._held:
                    if self._stopped:
                        return
                    self._cond.wait()
                if self._stopped:
                    return
                self._driving.add(key)
            self._drive(context)

    def _drive(self, context: Context) -> None:
        """Prefill the turns that joined ``context`` and run one decode step of the others."""
        with self._cond:
            turns = [t for t in self._running[id(context)] if not t.done]
        try:
            for turn in turns:
                if turn.abandoned or turn.cancelled():
                    turn.pending, turn.done = None, True
            turns = [t for t in turns if not t.done]
            if turns and context.target is not None and context.composition != context.target:
                context.switch(context.target)
            starting = [t for t in turns if not t.started]
            for turn in starting:
                self._start(context, turn, turns)
            if starting:  # their first tokens go out now, not after the step
                with self._cond:
                    self._cond.notify_all()
            stepping = [t for t in turns if t.pending is not None and not t.done]
            if stepping:
                context.step([t.slot for t in stepping], [t.pending for t in stepping])
                for turn in stepping:
                    self._sample(turn)
        except BaseException as exc:
            for turn in turns:
                if not turn.done:
                    turn.error, turn.done = exc, True
        finally:
            with self._cond:
                self._running[id(context)] = [t for t in self._running[id(context)]
                                              if not t.done]
                self._driving.discard(id(context))
                self._assign()

    def _start(self, context: Context, turn: Turn, turns: list[Turn]) -> None:
        """Start a turn that joined. When a sequence here prefilled exactly its prompt and
        still holds it (the samples of one best-of turn, a prompt asked again), the turn takes
        that cache and those first logits and prefills nothing, on that sequence if it is
        free; otherwise it prefills on the free sequence whose cache gives most of its prompt,
        copying a sibling's cache when one gives more."""
        taken = {id(t.slot) for t in turns if t.slot is not None}
        free = [s for s in context.slots if id(s) not in taken]
        twin = next((s for s in context.slots if s.prompt_logits(turn.prompt) is not None),
                    None)
        if twin is not None and id(twin) not in taken:
            slot = twin
        else:
            slot = max(free, key=lambda s: (s.reuse(turn.prompt), -s.used))
        self._clock += 1
        slot.used = self._clock
        turn.slot, turn.started = slot, True
        if twin is not None:
            logits = slot.take_prompt(turn.prompt, twin)
        else:
            source = max(context.slots, key=lambda s: s.reuse(turn.prompt))
            logits = slot.prefill(turn.prompt, source if source is not slot else None)
        if turn.limit == 0:
            turn.done = True
        else:
            self._sample(turn, logits.copy())  # the sampler may penalize in place

    def _sample(self, turn: Turn, logits: Any = None) -> None:
        """Draw the turn's next token from ``logits`` (default: its sequence's latest)."""
        assert turn.sampler is not None and turn.slot is not None
        if turn.abandoned or turn.cancelled():
            turn.pending, turn.done = None, True
            return
        allowed: Any = None if turn.grammar is None else turn.grammar.allowed()
        logits = turn.slot.logits() if logits is None else logits
        token = turn.sampler.next(logits, allowed)
        turn.produced += 1
        turn.pending = None
        if turn.is_end(token):
            turn.ended = turn.done = True
            return
        if turn.grammar is not None:
            turn.grammar.consume(token)
        turn.out.append(token)
        if turn.produced >= turn.limit:
            turn.done = True
        else:
            turn.pending = token
