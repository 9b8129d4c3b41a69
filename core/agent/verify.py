"""Best-of-n replies checked against the user's facts (``agent chat --best-of N``).

A small persona often answers around what the user just said: told "The old fisherman does
not trust the sea.", it writes about the sea and drops the *not*. Sampling is cheap next to
a wrong answer, so with ``best_of`` the controller samples several replies (each seeded
``seed + i`` when the turn has a seed), reads each back with the persona's scene encoder,
and keeps the one that agrees best with the user, judged in this order:

1. it reverses none of the user's facts in the scene (a negation lost or invented on a link
   the user stated, or of unknown provenance; matched as the round trip matches links:
   :mod:`hyperlex.scene.agreement`);
2. it names no command that does not exist, when a ``problem`` check is given (``agent
   chat`` and ``agent serve`` give the CLI's: :mod:`hyperlex.cli.command_refs`);
3. it restates the most negated facts of the user's message, with their negation;
4. it is most the persona's own, when a ``voice`` score is given (the probability that the
   text is the persona's, from the fidelity classifier);
5. it restates the most of the user's facts;
6. it came first.

The chosen reply streams whole once every sample is done; the turn's ``annotations``
record each sample's check (``best_of``). The host owns this policy: the samples are
ordinary generations of the engine, so every engine and every persona gets it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.generation import Completion, Generation, GenerationParams, Usage
from hyperlex.scene.agreement import link_triples, pair_links
from hyperlex.scene.model import Delta, Scene

# texts, persona -> the probability that each text is the persona's
VoiceScore = Callable[[list[str], str], list[float]]
# a reply -> what is wrong with it beyond the scene, e.g. a command that does not exist
# (None: nothing)
ReplyProblem = Callable[[str], str | None]
MAX_BEST_OF = 16


@dataclass(frozen=True)
class ReplyCheck:
    """How one sampled reply agrees with the user's facts (see the module docstring)."""

    index: int
    facts: int  # the user's links in the scene
    facts_kept: int  # matched with the same polarity
    flipped: int  # matched with the other polarity
    negations: int  # negated links of the user's message this turn
    negations_kept: int
    voice: float | None = None
    problem: str | None = None  # what a ReplyProblem check found wrong

    @property
    def rank(self) -> tuple[float, ...]:
        return (-self.flipped, -(self.problem is not None), self.negations_kept,
                self.voice or 0.0, self.facts_kept, -self.index)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_best_of(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BEST_OF:
        raise HyperlexError(f"best_of must be a whole number from 1 to {MAX_BEST_OF}, got {n!r}")
    return n


def check_reply(scene: Scene, turn: int, reading: Delta, index: int = 0,
                voice: float | None = None, problem: str | None = None) -> ReplyCheck:
    """Compare what a reply says (``reading``, its scene encoder's delta) with the user's
    facts in ``scene``; ``turn`` is the index of the turn whose user message it answers;
    ``voice`` and ``problem``: what the voice score and a :data:`ReplyProblem` check said of
    it."""
    facts = [link for link in scene.links if link.is_fact]
    negated_now = [link for link in facts if link.turn == turn and link.polarity < 0]
    labels = scene.hyperlexemes.values()
    source = link_triples(labels, facts)
    negated = set(link_triples(labels, negated_now))
    said = Scene().apply(reading)  # as the round trip reads a reply back
    reply = link_triples(said.hyperlexemes.values(), said.links)
    pairs, _ = pair_links(source, reply)
    agree = [s for s, r in pairs if source[s] == reply[r]]
    return ReplyCheck(
        index=index, facts=len(source), facts_kept=len(agree), flipped=len(pairs) - len(agree),
        negations=len(negated), negations_kept=sum(1 for s in agree if s in negated),
        voice=voice, problem=problem)


def best(checks: Sequence[ReplyCheck]) -> ReplyCheck:
    return max(checks, key=lambda check: check.rank)


def sample_params(params: GenerationParams, n: int) -> list[GenerationParams]:
    """The parameters of each of ``n`` samples: seeds ``seed + i``, or all unseeded."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def complete_together(generations: Sequence[Generation]) -> list[Completion]:
    """Run started ``generations`` to their end at once (each on its own thread, so an
    engine that batches concurrent turns decodes them together), in order."""
    with ThreadPoolExecutor(max_workers=max(1, len(generations))) as pool:
        return list(pool.map(lambda g: g.complete(), generations))


class BestOfGeneration(Generation):
    """Starts every sample (``samples``: one function each that starts it), runs them all to
    their end, checks their texts (``check``: one :class:`ReplyCheck` per text, in order) and
    yields the sample whose check ranks first, whole."""

    def __init__(self, persona: str | None, samples: Sequence[Callable[[], Generation]],
                 check: Callable[[list[str]], list[ReplyCheck]]):
        super().__init__(persona)
        self._starts = list(samples)
        self._check = check
        self._running: list[Generation] = []
        self.samples: list[Completion] = []
        self.checks: list[ReplyCheck] = []
        self.chosen: int | None = None

    def cancel(self) -> None:
        super().cancel()
        for generation in self._running:
            generation.cancel()

    def _pieces(self) -> Iterator[str]:
        if self.cancelled:
            return
        self._running = [start() for start in self._starts]
        if self.cancelled:  # cancel() came while they started
            for generation in self._running:
                generation.cancel()
        done = complete_together(self._running)
        if self.cancelled or any(c.finish_reason == "cancelled" for c in done):
            return
        self.samples = done
        self.checks = self._check([c.text for c in done])
        self.chosen = best(self.checks).index
        chosen = done[self.chosen]
        self.usage = Usage(chosen.usage.prompt_tokens,
                           sum(c.usage.completion_tokens for c in done))
        self.finish_reason = chosen.finish_reason
        self.seconds = max(c.seconds for c in done)
        yield chosen.text

    def report(self) -> dict[str, Any]:
        """What the turn's ``annotations["best_of"]`` keep: every sample with its check, and
        which one was chosen."""
        return {"n": len(self._starts), "chosen": self.chosen,
                "samples": [{"text": sample.text, "finish_reason": sample.finish_reason,
                             "completion_tokens": sample.usage.completion_tokens,
                             **check.as_dict()}
                            for sample, check in zip(self.samples, self.checks, strict=True)]}
