"""The reference backend: transformers + PEFT on CPU or GPU.

All persona adapters are attached once, before the first forward pass (bitsandbytes' CPU
NF4 path requires it). Switching persona sets the active adapter on every LoRA layer
directly: PEFT's ``set_adapter`` walks all modules and costs tens of milliseconds, while the
layer list cached here switches in well under one, with identical outputs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hyperlex.engines.base import Engine
from hyperlex.engines.models import ResolvedBase, load_base, resolve_base
from hyperlex.engines.torch.attach import attach_to_layers, keep_stored_dtype, lora_layers
from hyperlex.engines.torch.batching import Scheduler
from hyperlex.engines.torch.generation import (
    TorchGeneration,
    complete_text,
    encode_exchange,
    eos_ids,
    generate_kwargs,
    pad_token_id,
)
from hyperlex.errors import HyperlexError
from hyperlex.generation import (
    Completion,
    Generation,
    GenerationParams,
    Guidance,
    Layers,
    Message,
    Usage,
    finish_reason,
)
from hyperlex.persona.bundle import Persona, check_scale

if TYPE_CHECKING:
    from hyperlex.structured import ResponseFormat


class TorchEngine(Engine):
    def __init__(
        self,
        personas: Sequence[Persona] = (),
        base: ResolvedBase | str | None = None,
        dtype: str = "float32",
        quantize: str | None = None,
        progress: bool = True,
        check_base: bool = True,
        merge: bool = False,
        max_batch: int = 8,
    ):
        """``max_batch``: how many streamed turns that wait together may run as one batch
        (1: one at a time; see :mod:`hyperlex.engines.torch.batching`).

        ``merge``: fold the active persona's LoRA into the base weights while it speaks
        alone (no mood, not in a mixed batch), so decoding runs at the bare base's speed;
        each switch then costs an unmerge and a merge (``bench`` P2 measures both). Only for a
        float32 base: a 4-bit base cannot hold merged weights and bfloat16 would round the
        base a little more at every switch."""
        if merge and (quantize is not None or dtype != "float32"):
            raise HyperlexError(
                f"merging persona weights needs a float32 base (got dtype {dtype!r}"
                f"{f', quantize {quantize!r}' if quantize else ''}); leave merging off")
        self.base = base if isinstance(base, ResolvedBase) else resolve_base(base)
        self.base_name = self.base.name
        self.model, self.tokenizer = load_base(self.base, dtype, quantize, progress)
        self.personas: dict[str, Persona] = {}
        self.moods: dict[str, Persona] = {}
        self.skipped: dict[str, str] = {}
        self._lock = threading.Lock()
        self.scheduler = Scheduler(self, max_batch)
        self._lora_layers: list[Any] = []
        self._layer_by_name: dict[str, Any] = {}
        # per adapter: each LoRA layer with PEFT's own scaling (alpha / r) and with the
        # effective one (times the adapter's scale), the base a mood weight multiplies
        self._unit_scalings: dict[str, list[tuple[Any, float]]] = {}
        self._scalings: dict[str, list[tuple[Any, float]]] = {}
        self.scales: dict[str, float] = {}  # read it; change it with set_scale
        self._active: tuple[str | None, tuple[tuple[str, float], ...]] | None = None
        self.merge = merge
        self._grammar_tokenizer: Any = None  # llguidance's, built on the first structured turn
        self._merged: str | None = None  # the persona whose LoRA is folded into the base
        for persona in personas:
            self._attach(persona, check_base)
        if self._lora_layers:
            self._switch(None)

    # adapters ------------------------------------------------------------------------------

    def _attach(self, persona: Persona, check_base: bool) -> None:
        if not self._adapter_wanted(persona, check_base):
            return
        import torch
        from peft import PeftModel

        if hasattr(torch.nn.ModuleDict(), persona.name) or persona.name == "default":
            # PEFT keeps adapters in ModuleDicts keyed by name: "half" or "train" would
            # shadow a torch method and break every layer.
            self.skipped[persona.name] = (
                f"persona name {persona.name!r} clashes with a torch module attribute; rename "
                "the persona")
            return
        try:
            fast = isinstance(self.model, PeftModel) and attach_to_layers(
                self.model, self._layer_by_name, persona)
            if not fast and isinstance(self.model, PeftModel):
                self.model.load_adapter(str(persona.adapter_dir), adapter_name=persona.name)
            elif not fast:
                self.model = PeftModel.from_pretrained(
                    self.model, str(persona.adapter_dir), adapter_name=persona.name
                )
        except Exception as exc:  # shape mismatches, unknown target modules, corrupt files
            self.skipped[persona.name] = (
                f"adapter of persona {persona.name!r} ({persona.adapter_dir}) failed to load: {exc}"
            )
            return
        if not fast:
            self.model.eval()
            self._index_lora_layers()
            keep_stored_dtype(self._lora_layers, persona.name, persona.adapter_dir)
        self._register(persona)
        self._unit_scalings[persona.name] = [
            (layer, layer.scaling[persona.name])
            for layer in self._lora_layers if persona.name in layer.scaling
        ]
        self._apply_scale(persona.name, persona.scale)

    def _index_lora_layers(self) -> None:
        self._layer_by_name = lora_layers(self.model)
        self._lora_layers = list(self._layer_by_name.values())

    def set_scale(self, persona: str, scale: float) -> None:
        """Multiply ``persona``'s (or a mood's) LoRA scaling by ``scale`` instead of its
        bundle's ``scale``, for this engine only (``agent eval calibrate`` sweeps it). The
        value is in (0, 2]; it holds across switches and composes with a mood's weight."""
        self.persona(persona, moods=True)
        if persona not in self._unit_scalings:
            raise HyperlexError(f"persona {persona!r} has no adapter to scale")
        try:
            value = check_scale(scale)
        except ValueError as exc:
            raise HyperlexError(f"scale of {persona!r}: {exc}") from None
        with self._lock:
            self._apply_scale(persona, value)

    def _apply_scale(self, name: str, scale: float) -> None:
        self._unmerge()  # a merged delta must come out with the scaling it went in with
        self.scales[name] = scale
        self._scalings[name] = [(layer, unit * scale) for layer, unit in self._unit_scalings[name]]
        for layer, scaling in self._scalings[name]:
            layer.scaling[name] = scaling
        self._active = None  # a mood's weighted scaling is re-applied at the next activation

    @contextlib.contextmanager
    def activate(self, persona: str | None, layers: Layers = ()) -> Iterator[Any]:
        """Hold the engine (no other turn runs) with ``persona``'s adapter active and the mood
        ``layers`` on top; yields the transformers model to run. The way to run the model
        with a persona from outside the engine (inspection, batching, benchmarks)."""
        with self._lock:
            self._switch(persona, layers)
            yield self.inner_model

    def _switch(self, persona: str | None, layers: Layers = ()) -> None:
        """Make ``persona``'s adapter active (``None``: the bare base), with each mood adapter in
        ``layers`` summed on top at its weight: PEFT adds every active adapter's delta, and a
        mood's weight scales its LoRA ``scaling``. Setting the layers directly costs well under
        a millisecond, where PEFT's ``set_adapter`` walks every module."""
        if persona is not None and (
            persona not in self.personas or self.personas[persona].adapter_dir is None
        ):
            persona = None
        moods = tuple((name, weight) for name, weight in layers if name in self._scalings)
        if (persona, moods) == self._active:
            return
        if self._merged is not None and (self._merged != persona or moods):
            self._unmerge()
        self._full_weight([persona])  # before a merge folds the scaling into the base
        if self.merge and persona is not None and not moods and self._merged is None:
            for layer in self._lora_layers:
                if persona in layer.lora_A:
                    layer.merge(adapter_names=[persona])
            self._merged = persona
        for name, weight in moods:
            for layer, scaling in self._scalings[name]:
                layer.scaling[name] = scaling * weight
        active = ([persona] if persona else []) + [name for name, _ in moods]
        for layer in self._lora_layers:
            layer._active_adapter = active
        self._active = (persona, moods)

    def _full_weight(self, speakers: Sequence[str | None]) -> None:
        """A layer persona (``layer: true``) that speaks does so at its own scale, whatever
        weight it last had as a layer."""
        for name in speakers:
            if name in self.moods and name in self._scalings:
                for layer, scaling in self._scalings[name]:
                    layer.scaling[name] = scaling

    def _unmerge(self) -> None:
        """Take a merged persona's delta back out of the base weights (PEFT subtracts what it
        added, so a float32 base returns to within rounding)."""
        if self._merged is None:
            return
        for layer in self._lora_layers:
            if layer.merged:
                layer.unmerge()
        self._merged = None
        self._active = None

    @property
    def lora_modules(self) -> list[Any]:
        """Every LoRA layer of the model (PEFT ``LoraLayer``), each holding every adapter."""
        return list(self._lora_layers)

    @property
    def merged(self) -> str | None:
        """The persona whose LoRA is folded into the base weights now (``merge=True``)."""
        return self._merged

    @property
    def inner_model(self) -> Any:
        """The transformers model (inside PEFT's wrapper, whose layers now carry the LoRA)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # generation -----------------------------------------------------------------------------

    def encode(self, messages: Sequence[Message]) -> dict[str, Any]:
        """``messages`` through the chat template with the generation prompt, as tensors."""
        return self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def reply_nll(self, messages: Sequence[Message], reply: str,
                  persona: str | None) -> tuple[float, int]:
        """Summed negative log-likelihood of ``reply`` as the assistant's answer to
        ``messages`` with ``persona`` active, and the number of reply tokens scored."""
        prompt, full = encode_exchange(self.tokenizer, messages, reply)
        return self._nll(full, len(prompt), persona)

    def text_nll(self, text: str, persona: str | None) -> tuple[float, int]:
        """Summed NLL of plain ``text`` (no chat template) and its scored token count."""
        ids = self.tokenizer(text)["input_ids"][: self.context_length]
        return self._nll(ids, 1, persona)

    def _nll(self, ids: list[int], start: int, persona: str | None) -> tuple[float, int]:
        import torch

        tokens = torch.tensor([ids])
        with self.activate(persona) as model, torch.inference_mode():
            logits = model(input_ids=tokens).logits[0, start - 1:-1].float()
        targets = tokens[0, start:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        return float(nll), int(targets.numel())

    def adapter_bytes(self) -> dict[str, int]:
        """Resident bytes of each attached adapter's weights (``"__base__"``: the base)."""
        sizes = {name: 0 for name in self.personas}
        for layer in self._lora_layers:
            for modules in (layer.lora_A, layer.lora_B):
                for name, module in modules.items():
                    sizes[name] = sizes.get(name, 0) + sum(
                        p.numel() * p.element_size() for p in module.parameters())
        base = sum(p.numel() * p.element_size() for n, p in self.inner_model.named_parameters()
                   if "lora_" not in n)
        return {"__base__": base, **sizes}

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return int(self.encode(messages)["input_ids"].shape[1])

    @property
    def context_length(self) -> int:
        return int(getattr(self.inner_model.config, "max_position_embeddings", 2048))

    def stream(
        self,
        messages: Sequence[Message],
        persona: str | None,
        params: GenerationParams | None = None,
        stop: Sequence[str] = (),
        layers: Layers = (),
        response_format: ResponseFormat | None = None,
    ) -> Generation:
        self.check_request(persona, layers)
        return TorchGeneration(self, messages, persona, params or GenerationParams(), stop,
                                tuple(layers), response_format)

    def grammar_processors(self, formats: Sequence[ResponseFormat | None]) -> list[Any]:
        """The logits processors that hold each row to its response format (none without)."""
        if not any(formats):
            return []
        if None in formats:
            raise HyperlexError("a batch is either all structured or all free text")
        from hyperlex.engines.torch.grammar import GrammarProcessor, grammar_tokenizer

        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(
                self.tokenizer, self.inner_model.config.vocab_size,
                eos_ids(self.tokenizer, self.inner_model))
        return [GrammarProcessor(self._grammar_tokenizer, formats)]

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], str | None]],
                       params: GenerationParams | None = None,
                       layers: Layers = (),
                       response_format: ResponseFormat | None = None,
                       guidance: Guidance | None = None) -> list[Completion]:
        """One left-padded ``generate`` call for all requests; each row runs with its own
        persona's adapter (PEFT ``adapter_names``; ``"__base__"`` for the bare base), and its
        own grammar matcher with a ``response_format``. With mood ``layers``, rows are grouped
        by persona and each group runs with its composition. With ``guidance``, each row is
        also steered away from its negative prompt (:mod:`hyperlex.engines.torch.guidance`)."""
        params = params or GenerationParams()
        for _, persona in requests:
            self.check_request(persona)
        self.check_request(None, layers)
        if guidance is not None and len(guidance.negatives) != len(requests):
            raise HyperlexError(f"scene guidance needs one negative prompt per request: "
                                f"{len(guidance.negatives)} for {len(requests)}")
        if not layers:
            return self._batch(requests, params, None, response_format, guidance)
        results: dict[int, Completion] = {}
        for persona in dict.fromkeys(p for _, p in requests):
            rows = [i for i, (_, p) in enumerate(requests) if p == persona]
            part = None if guidance is None else Guidance(
                guidance.weight, [guidance.negatives[i] for i in rows])
            done = self._batch([requests[i] for i in rows], params, (persona, tuple(layers)),
                               response_format, part)
            results.update(zip(rows, done, strict=True))
        return [results[i] for i in range(len(requests))]

    def left_padded(self, rows: Sequence[list[int]]) -> tuple[Any, Any]:
        """Prompt token rows as one left-padded batch: (input_ids, attention_mask)."""
        import torch

        width = max(len(r) for r in rows)
        pad = pad_token_id(self.tokenizer)
        return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))

    def generate_rows(self, input_ids: Any, attention: Any, personas: Sequence[str | None],
                      seed: int | None = None,
                      guidance: tuple[float, list[list[int]]] | None = None,
                      **kwargs: Any) -> Any:
        """One ``generate`` in which each row runs with its own persona's adapter (PEFT's
        per-row ``adapter_names``; ``"__base__"``: none), holding the engine; ``seed`` seeds
        torch's generator first; ``guidance``: (weight, each row's negative prompt tokens)."""
        import torch
        from peft import PeftModel

        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            adapters = None
            if isinstance(self.model, PeftModel):
                self._unmerge()  # PEFT's per-row adapters need unmerged layers
                self._full_weight(personas)
                self._active = None  # scalings may have changed under the cached composition
                adapters = kwargs["adapter_names"] = [
                    p if p is not None and self.personas[p].adapter_dir is not None
                    else "__base__" for p in personas]
            if guidance is not None:
                self._guide(kwargs, self.model, guidance, adapters)
            return self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)

    def _guide(self, kwargs: dict[str, Any], model: Any,
               guidance: tuple[float, list[list[int]]], adapters: list[str] | None) -> None:
        """Add scene guidance to ``generate``'s logits processors after the repetition
        penalty (which weighs the prompt's own logits) and before a grammar (which must have
        the last word on what may follow)."""
        from transformers import RepetitionPenaltyLogitsProcessor

        from hyperlex.engines.torch.guidance import SceneGuidance

        weight, negatives = guidance
        ids, mask = self.left_padded(negatives)
        processors = kwargs["logits_processor"]
        after = sum(isinstance(p, RepetitionPenaltyLogitsProcessor) for p in processors)
        processors.insert(after, SceneGuidance(model, ids, mask, weight, adapters))

    def _batch(self, requests: Sequence[tuple[Sequence[Message], str | None]],
               params: GenerationParams,
               composition: tuple[str | None, tuple[tuple[str, float], ...]] | None,
               response_format: ResponseFormat | None = None,
               guidance: Guidance | None = None) -> list[Completion]:
        """``composition`` None: per-row adapters through PEFT; else one (persona, layers)
        activated for every row."""
        import torch

        if not requests:
            return []
        rows = [self.encode(messages)["input_ids"][0].tolist() for messages, _ in requests]
        width = max(len(r) for r in rows)
        input_ids, attention = self.left_padded(rows)
        kwargs = generate_kwargs(params, self.tokenizer, width,
                                 self.grammar_processors([response_format] * len(rows)))
        guided = None
        if guidance is not None and guidance.weight > 0:
            guided = (guidance.weight, [self.encode(messages)["input_ids"][0].tolist()
                                        for messages in guidance.negatives])
        start = time.perf_counter()
        if composition is not None:
            with self.activate(*composition) as model, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                if guided is not None:
                    self._guide(kwargs, model, guided, None)
                output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        else:
            output = self.generate_rows(input_ids, attention, [p for _, p in requests],
                                        seed=params.seed, guidance=guided, **kwargs)
        seconds = time.perf_counter() - start
        eos = set(eos_ids(self.tokenizer, self.inner_model))
        completions = []
        for (_, persona), row, prompt in zip(requests, output.tolist(), rows, strict=True):
            new = row[width:]
            ended = next((i for i, t in enumerate(new) if t in eos), None)
            tokens = new if ended is None else new[:ended]
            reason = finish_reason(len(new), params.max_new_tokens, ended=ended is not None)
            completions.append(Completion(
                complete_text(self.tokenizer.decode(tokens, skip_special_tokens=True)),
                persona, reason,
                Usage(len(prompt), len(tokens) + (ended is not None)), seconds))
        return completions


def create_engine(personas: Sequence[Persona], base: ResolvedBase | str | None,
                  **options: Any) -> TorchEngine:
    """The registry's constructor (:func:`hyperlex.engines.registry.open_engine`)."""
    return TorchEngine(personas, base=base, **options)
