"""One turn on the torch engine, and what every ``generate`` call there shares: the
keyword arguments, the end-of-turn and padding tokens, and the token streamer."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hyperlex.errors import HyperlexError
from hyperlex.generation import Generation, GenerationParams, Layers, Message, finish_reason

if TYPE_CHECKING:
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.structured import ResponseFormat


class TorchGeneration(Generation):
    """A turn for the engine's scheduler (:mod:`hyperlex.engines.torch.batching`), which runs it in
    its worker thread, alone or as one row of a batch, while the engine lock is held from
    switch to last token, so concurrent callers never see another persona's weights."""

    def __init__(
        self,
        engine: TorchEngine,
        messages: Sequence[Message],
        persona: str | None,
        params: GenerationParams,
        stop: Sequence[str],
        layers: Layers = (),
        response_format: ResponseFormat | None = None,
    ):
        super().__init__(persona, stop)
        self.layers = layers
        self.params = params
        self.response_format = response_format
        self._engine = engine
        self._inputs = engine.encode(messages)
        self.prompt_ids: list[int] = self._inputs["input_ids"][0].tolist()
        self.usage.prompt_tokens = len(self.prompt_ids)
        self.streamer = TokenStreamer(engine.tokenizer)
        self.error: BaseException | None = None
        self._released = threading.Event()
        self._submitted = False

    def run(self) -> None:
        """Generate this turn alone (called in the scheduler's thread)."""
        import torch

        engine, params = self._engine, self.params
        try:
            with engine.activate(self.persona, self.layers) as model, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                start = time.perf_counter()
                output = model.generate(
                    **self._inputs,
                    streamer=self.streamer,
                    stopping_criteria=[CancelCriteria(self._cancelled)],
                    **generate_kwargs(params, engine.tokenizer, len(self.prompt_ids),
                                      engine.grammar_processors([self.response_format])),
                )
                self.seconds = time.perf_counter() - start
            new_tokens = output[0, self.usage.prompt_tokens :].tolist()
            self.usage.completion_tokens = len(new_tokens)
            eos = set(eos_ids(engine.tokenizer, engine.inner_model))
            self.finish_reason = self.finish_reason or finish_reason(
                len(new_tokens), params.max_new_tokens,
                ended=bool(new_tokens) and new_tokens[-1] in eos, cancelled=self.cancelled)
        except BaseException as exc:  # re-raised in the consuming thread
            self.error = exc
        finally:
            self.release()

    def release(self) -> None:
        """The turn is over (done, failed or dropped): end its stream and wake its caller."""
        self.streamer.end()
        self._released.set()

    def _pieces(self) -> Iterator[str]:
        self._submitted = True
        self._engine.scheduler.submit(self)
        yield from self.streamer
        self._released.wait()
        if self.error is not None:
            raise self.error

    def _finish(self) -> None:
        if self._submitted:
            self._released.wait()


def complete_text(text: str) -> str:
    """A reply cut off inside a multi-byte character ends in U+FFFD; drop it, as streaming
    does, so batched and streamed generation give the same text."""
    return text.rstrip("\ufffd")


class TokenStreamer:
    """Receives tokens from ``generate`` and yields text token by token.

    The reply is re-decoded as a whole each step and only its new, complete suffix is emitted,
    so multi-byte characters split across tokens never come out broken.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get()) is not None:
            yield piece


class CancelCriteria:
    """A stopping criterion that ends generation once the Generation is cancelled."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def generate_kwargs(params: GenerationParams, tokenizer: Any, prompt_width: int,
                    processors: Sequence[Any] = ()) -> dict[str, Any]:
    """``generate``'s keyword arguments for ``params``, with ``processors`` (a response
    format's grammar) after the built-in ones. The repetition penalty counts only the
    reply's own tokens, not the prompt's (``prompt_width``: the padded prompt's length;
    transformers' ``prompt_ignore_length``): a persona must be free to say the scene's and
    the user's words again, and over the prompt a penalty of 1.1 made the cast answer
    around a fact the user had just stated."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    penalty = [] if params.repetition_penalty == 1.0 else [RepetitionPenaltyLogitsProcessor(
        float(params.repetition_penalty), prompt_ignore_length=prompt_width)]
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        # kept, so generate places its penalty where it always does; the custom one above,
        # of the same type, takes that place
        "repetition_penalty": params.repetition_penalty,
        "pad_token_id": pad_token_id(tokenizer),
        "logits_processor": LogitsProcessorList([*penalty, *processors]),
    }
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or None,
        )
    return kwargs


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids + [tokenizer.eos_token_id] if i is not None]


def encode_exchange(tokenizer: Any, messages: Sequence[Message],
                    reply: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the generation prompt) and of prompt + ``reply``; the
    first is checked to be a prefix of the second, so the reply's tokens can be told apart."""
    prompt_ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": reply}], tokenize=True,
        return_dict=True)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise HyperlexError("the chat template does not render the prompt as a prefix of the "
                            "full exchange; cannot tell the reply's tokens apart")
    return prompt_ids, full_ids


def pad_token_id(tokenizer: Any) -> int:
    """The token that pads a batch: the tokenizer's own pad token, else its end token (base
    models such as SmolLM2 have no pad token; padded positions are masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
