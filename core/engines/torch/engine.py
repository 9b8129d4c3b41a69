"""The reference backend: transformers + PEFT on CPU or GPU.

All persona adapters are attached once, before the first forward pass (bitsandbytes' CPU
NF4 path requires it). Switching persona sets the active adapter on every LoRA layer
directly: PEFT's ``set_adapter`` walks all modules and costs tens of milliseconds, while the
layer list cached here switches in well under one, with identical outputs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hyperlex.engines.base import Completion, Engine, Generation, Layers, Message, Usage
from hyperlex.engines.models import BaseModel, load_base, resolve_base
from hyperlex.engines.torch.batching import Scheduler
from hyperlex.errors import HyperlexError, UnknownPersona
from hyperlex.generation import GenerationParams
from hyperlex.persona.bundle import ADAPTER_WEIGHTS, Persona, check_scale


class TorchEngine(Engine):
    def __init__(
        self,
        personas: Sequence[Persona] = (),
        base: BaseModel | str | None = None,
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
        self.base = base if isinstance(base, BaseModel) else resolve_base(base)
        self.base_name = self.base.name
        self.model, self.tokenizer = load_base(self.base, dtype, quantize, progress)
        self.personas: dict[str, Persona] = {}
        self.moods: dict[str, Persona] = {}
        self.skipped: dict[str, str] = {}
        self._lock = threading.Lock()
        self._scheduler = Scheduler(self, max_batch)
        self._lora_layers: list[Any] = []
        self._layer_by_name: dict[str, Any] = {}
        # per adapter: each LoRA layer with PEFT's own scaling (alpha / r) and with the
        # effective one (times the adapter's scale), the base a mood weight multiplies
        self._unit_scalings: dict[str, list[tuple[Any, float]]] = {}
        self._scalings: dict[str, list[tuple[Any, float]]] = {}
        self.scales: dict[str, float] = {}  # read it; change it with set_scale
        self._active: tuple[str | None, tuple[tuple[str, float], ...]] | None = None
        self.merge = merge
        self._merged: str | None = None  # the persona whose LoRA is folded into the base
        for persona in personas:
            self._attach(persona, check_base)
        if self._lora_layers:
            self._activate(None)

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
            fast = isinstance(self.model, PeftModel) and _attach_to_layers(
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
            _keep_stored_dtype(self._lora_layers, persona.name, persona.adapter_dir)
        self._bundles(persona)[persona.name] = persona
        self._unit_scalings[persona.name] = [
            (layer, layer.scaling[persona.name])
            for layer in self._lora_layers if persona.name in layer.scaling
        ]
        self._apply_scale(persona.name, persona.scale)

    def _index_lora_layers(self) -> None:
        self._layer_by_name = _lora_layers(self.model)
        self._lora_layers = list(self._layer_by_name.values())

    def set_scale(self, persona: str, scale: float) -> None:
        """Multiply ``persona``'s (or a mood's) LoRA scaling by ``scale`` instead of its
        bundle's ``scale``, for this engine only (``agent eval calibrate`` sweeps it). The
        value is in (0, 2]; it holds across switches and composes with a mood's weight."""
        if persona not in self._unit_scalings:
            if persona in self.skipped:
                raise HyperlexError(self.skipped[persona])
            if persona in self.personas or persona in self.moods:
                raise HyperlexError(f"persona {persona!r} has no adapter to scale")
            raise UnknownPersona(persona, [*self._unit_scalings])
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

    def _activate(self, persona: str | None, layers: Layers = ()) -> None:
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
    def _inner(self) -> Any:
        """The transformers model (inside PEFT's wrapper, whose layers now carry the LoRA)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # generation -----------------------------------------------------------------------------

    def _encode(self, messages: Sequence[Message]) -> dict[str, Any]:
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
        with self._lock, torch.inference_mode():
            self._activate(persona)
            logits = self._inner(input_ids=tokens).logits[0, start - 1:-1].float()
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
        base = sum(p.numel() * p.element_size() for n, p in self._inner.named_parameters()
                   if "lora_" not in n)
        return {"__base__": base, **sizes}

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return int(self._encode(messages)["input_ids"].shape[1])

    @property
    def context_length(self) -> int:
        return int(getattr(self._inner.config, "max_position_embeddings", 2048))

    def stream(
        self,
        messages: Sequence[Message],
        persona: str | None,
        params: GenerationParams | None = None,
        stop: Sequence[str] = (),
        layers: Layers = (),
    ) -> Generation:
        self._check_persona(persona)
        self._check_layers(layers)
        return _TorchGeneration(self, messages, persona, params or GenerationParams(), stop,
                                tuple(layers))

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], str | None]],
                       params: GenerationParams | None = None,
                       layers: Layers = ()) -> list[Completion]:
        """One left-padded ``generate`` call for all requests; each row runs with its own
        persona's adapter (PEFT ``adapter_names``; ``"__base__"`` for the bare base). With mood
        ``layers``, rows are grouped by persona and each group runs with its composition."""
        params = params or GenerationParams()
        for _, persona in requests:
            self._check_persona(persona)
        self._check_layers(layers)
        if not layers:
            return self._batch(requests, params, None)
        results: dict[int, Completion] = {}
        for persona in dict.fromkeys(p for _, p in requests):
            rows = [i for i, (_, p) in enumerate(requests) if p == persona]
            done = self._batch([requests[i] for i in rows], params, (persona, tuple(layers)))
            results.update(zip(rows, done, strict=True))
        return [results[i] for i in range(len(requests))]

    def _left_padded(self, rows: Sequence[list[int]]) -> tuple[Any, Any]:
        """Prompt token rows as one left-padded batch: (input_ids, attention_mask)."""
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))

    def _generate_rows(self, input_ids: Any, attention: Any, personas: Sequence[str | None],
                       **kwargs: Any) -> Any:
        """One ``generate`` in which each row runs with its own persona's adapter (PEFT's
        per-row ``adapter_names``; ``"__base__"``: none). Call it holding the lock."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self._unmerge()  # PEFT's per-row adapters need unmerged layers
            kwargs["adapter_names"] = [
                p if p is not None and self.personas[p].adapter_dir is not None else "__base__"
                for p in personas]
        return self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)

    def _batch(self, requests: Sequence[tuple[Sequence[Message], str | None]],
               params: GenerationParams,
               composition: tuple[str | None, tuple[tuple[str, float], ...]] | None
               ) -> list[Completion]:
        """``composition`` None: per-row adapters through PEFT; else one (persona, layers)
        activated for every row."""
        import torch

        if not requests:
            return []
        rows = [self._encode(messages)["input_ids"][0].tolist() for messages, _ in requests]
        width = max(len(r) for r in rows)
        input_ids, attention = self._left_padded(rows)
        kwargs = _generate_kwargs(params, self.tokenizer)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            if composition is not None:
                self._activate(*composition)
                output = self._inner.generate(input_ids=input_ids, attention_mask=attention,
                                              **kwargs)
            else:
                output = self._generate_rows(input_ids, attention, [p for _, p in requests],
                                             **kwargs)
        seconds = time.perf_counter() - start
        eos = set(_eos_ids(self.tokenizer, self._inner))
        completions = []
        for (_, persona), row, prompt in zip(requests, output.tolist(), rows, strict=True):
            new = row[width:]
            ended = next((i for i, t in enumerate(new) if t in eos), None)
            tokens = new if ended is None else new[:ended]
            reason = "stop" if ended is not None or len(new) < params.max_new_tokens else "length"
            completions.append(Completion(
                _complete_text(self.tokenizer.decode(tokens, skip_special_tokens=True)),
                persona, reason,
                Usage(len(prompt), len(tokens) + (ended is not None)), seconds))
        return completions


class _TorchGeneration(Generation):
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
    ):
        super().__init__(persona, stop)
        self.layers = layers
        self.params = params
        self._engine = engine
        self._inputs = engine._encode(messages)
        self.prompt_ids: list[int] = self._inputs["input_ids"][0].tolist()
        self.usage.prompt_tokens = len(self.prompt_ids)
        self.streamer = _TokenStreamer(engine.tokenizer)
        self.error: BaseException | None = None
        self._released = threading.Event()
        self._submitted = False

    def run(self) -> None:
        """Generate this turn alone (called in the scheduler's thread)."""
        import torch

        engine, params = self._engine, self.params
        try:
            with engine._lock, torch.inference_mode():
                engine._activate(self.persona, self.layers)
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                start = time.perf_counter()
                output = engine._inner.generate(
                    **self._inputs,
                    streamer=self.streamer,
                    stopping_criteria=[_CancelCriteria(self._cancelled)],
                    **_generate_kwargs(params, engine.tokenizer),
                )
                self.seconds = time.perf_counter() - start
            new_tokens = output[0, self.usage.prompt_tokens :].tolist()
            self.usage.completion_tokens = len(new_tokens)
            eos = set(_eos_ids(engine.tokenizer, engine._inner))
            if self.cancelled:
                self.finish_reason = self.finish_reason or "cancelled"
            elif new_tokens and new_tokens[-1] in eos:
                self.finish_reason = "stop"
            else:
                self.finish_reason = (
                    "length" if len(new_tokens) >= params.max_new_tokens else "stop"
                )
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
        self._engine._scheduler.submit(self)
        yield from self.streamer
        self._released.wait()
        if self.error is not None:
            raise self.error

    def _finish(self) -> None:
        if self._submitted:
            self._released.wait()


def _complete_text(text: str) -> str:
    """A reply cut off inside a multi-byte character ends in U+FFFD; drop it, as streaming
    does, so batched and streamed generation give the same text."""
    return text.rstrip("\ufffd")


class _TokenStreamer:
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


class _CancelCriteria:
    """A stopping criterion that ends generation once the Generation is cancelled."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def _generate_kwargs(params: GenerationParams, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
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


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
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


def _keep_stored_dtype(layers: list[Any], name: str, adapter_dir: Path) -> None:
    """Hold the adapter's weights in the dtype they were stored in (PEFT upcasts them to the
    base's dtype). A bfloat16 adapter then costs half the memory; the LoRA layer casts its
    input to that dtype and adds the result to the base output in full precision."""
    from safetensors import safe_open

    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as weights:
        first = next(iter(weights.keys()), None)
        stored = weights.get_slice(first).get_dtype() if first else None
    dtype = {"BF16": "bfloat16", "F16": "float16"}.get(stored or "")
    if dtype is None:
        return
    import torch

    target = getattr(torch, dtype)
    for layer in layers:
        for modules in (layer.lora_A, layer.lora_B):
            if name in modules:
                modules[name].to(target)


def _lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


_LAYER_FIELDS = ("r", "lora_alpha", "scaling", "lora_A", "lora_B", "lora_dropout", "lora_bias",
                 "use_rslora", "use_dora")


def _attach_to_layers(model: Any, layers: dict[str, Any], persona: Persona) -> bool:
    """Add ``persona``'s adapter to LoRA layers that already exist, straight from its
    safetensors file; False (nothing changed) when it needs PEFT's general ``load_adapter``.

    PEFT's ``load_adapter`` walks the module tree several times, initialises weights it then
    overwrites, and checks every adapter's parameters on each layer; with 31 adapters attached
    the next one takes over a second. A plain LoRA adapter whose tensors all land on existing
    layers (the cast's adapters share their target modules) needs none of that: each layer gets
    the entries PEFT's ``LoraLayer.update_layer`` would make for an inference-only adapter,
    holding the stored tensors. ``tests/test_engine.py`` checks the logits equal PEFT's own
    ``load_adapter`` exactly.
    """
    import math

    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    assert persona.adapter_dir is not None
    config = LoraConfig.from_pretrained(str(persona.adapter_dir))
    if (config.use_dora or config.rank_pattern or config.alpha_pattern or config.lora_bias
            or config.modules_to_save or config.trainable_token_indices
            or config.layer_replication or getattr(config, "use_qalora", False)):
        return False
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(persona.adapter_dir / ADAPTER_WEIGHTS).items():
        module, sep, leaf = key.rpartition(".lora_")
        if not sep or leaf not in ("A.weight", "B.weight") or module not in layers:
            return False
        pairs.setdefault(module, {})[leaf[0]] = tensor
    if not pairs or any(len(pair) != 2 for pair in pairs.values()):
        return False
    for module, pair in pairs.items():
        layer, a, b = layers[module], pair["A"], pair["B"]
        if not all(hasattr(layer, f) for f in (*_LAYER_FIELDS, "in_features", "out_features")):
            return False
        if a.shape != (config.r, layer.in_features) or b.shape != (layer.out_features, config.r):
            raise HyperlexError(f"{module}: adapter tensors {tuple(a.shape)} and "
                                f"{tuple(b.shape)} do not fit the base layer")
    name, r, alpha = persona.name, config.r, config.lora_alpha
    model.peft_config[name] = config
    for module, pair in pairs.items():
        layer = layers[module]
        layer.r[name], layer.lora_alpha[name] = r, alpha
        layer.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        layer.use_rslora[name], layer.use_dora[name], layer.lora_bias[name] = (
            config.use_rslora, False, False)
        layer.lora_dropout[name] = torch.nn.Identity()  # inference only
        base_dtype = layer.get_base_layer().weight.dtype
        for modules, weight in ((layer.lora_A, pair["A"]), (layer.lora_B, pair["B"])):
            if weight.dtype == torch.float32 and base_dtype.is_floating_point:
                weight = weight.to(base_dtype)  # as PEFT does; 16-bit adapters stay 16-bit
            modules[name] = _linear(weight)
    return True


def _linear(weight: Any) -> Any:
    """A bias-free ``nn.Linear`` holding ``weight`` as it is (no initialisation, no copy)."""
    import torch

    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta",
                             dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear
