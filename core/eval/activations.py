"""Where a persona acts: the relative size of its LoRA update, per layer and token.

For every LoRA ``Linear`` PEFT computes ``base_layer(x) + lora_B(lora_A(dropout(x))) *
scaling``. During one forward pass with the persona active, forward hooks on the layer's
``base_layer`` and on the persona's ``lora_B`` capture both terms exactly as PEFT computes
them (same dtypes, eval mode so dropout is the identity, nothing recomputed), and each token
gets the ratio ``||LoRA Δ|| / ||base output||`` (norms over the projection's output features).

Aggregation, per decoder layer ``model.layers.{i}``: the mean of the ratios of the
projections the persona adapts there (q, k, v, o, gate, up, down). Each ratio is scale-free,
so projections of different widths weigh the same; summing the raw updates instead would
mix different output spaces (q and gate do not even write to the residual stream), and the
update written to the residual stream also includes the knock-on effect of the earlier
projections, so it would not isolate the adapter's own term. Upstream activations are the
persona's own (the adapter is active in every layer), i.e. the ratio is measured in the
forward pass the persona really runs.

Torch, matplotlib: imported inside the functions that need them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlex.errors import HyperlexError
from hyperlex.persona.prompt import system_message

RATIO_LABEL = "||LoRA Δ|| / ||base||"
_LAYER_NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
_EPS = 1e-12


@dataclass
class InspectReport:
    """The ratios measured for one persona on one text.

    ``ratio[l][t]``: layer ``layers[l]``, token ``tokens[t]``, mean over the projections the
    persona adapts in that layer. ``cells[l][p][t]``: the same for projection
    ``projections[p]`` alone (0 where the persona has no LoRA on that projection).
    ``projection_mean[l][p]``: ``cells`` averaged over the tokens.
    """

    persona: str | None
    text: str
    tokens: list[str]
    token_ids: list[int]
    layers: list[int]
    projections: list[str]
    cells: list[list[list[float]]]
    adapted: list[list[bool]]
    system: bool = True
    first_token: int = 0  # index of tokens[0] in the whole encoded prompt
    prompt_tokens: int = 0  # length of the whole encoded prompt
    base: str | None = None
    ratio: list[list[float]] = field(init=False)
    projection_mean: list[list[float]] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        self.ratio = []
        for row, mask in zip(self.cells, self.adapted, strict=True):
            used = [cells for cells, on in zip(row, mask, strict=True) if on]
            self.ratio.append([sum(c[t] for c in used) / len(used) if used else 0.0
                               for t in range(n)])
        self.projection_mean = [[_mean(cells) for cells in row] for row in self.cells]

    @property
    def layer_mean(self) -> list[float]:
        """Per layer: the ratio averaged over the tokens."""
        return [_mean(row) for row in self.ratio]

    @property
    def token_mean(self) -> list[float]:
        """Per token: the ratio averaged over the layers."""
        if not self.ratio:
            return [0.0] * len(self.tokens)
        return [_mean([row[t] for row in self.ratio]) for t in range(len(self.tokens))]

    @property
    def projection_summary(self) -> dict[str, float]:
        """Per projection: the ratio averaged over the tokens and the layers where the persona
        adapts it."""
        summary = {}
        for p, name in enumerate(self.projections):
            values = [row[p] for row, mask in zip(self.projection_mean, self.adapted,
                                                    strict=True) if mask[p]]
            summary[name] = _mean(values)
        return summary

    @property
    def mean(self) -> float:
        """The ratio averaged over every layer and token."""
        return _mean(self.layer_mean)

    def as_dict(self) -> dict[str, Any]:
        return {
            "persona": self.persona,
            "base": self.base,
            "text": self.text,
            "system": self.system,
            "measure": RATIO_LABEL,
            "prompt_tokens": self.prompt_tokens,
            "first_token": self.first_token,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "layers": self.layers,
            "projections": self.projections,
            "mean": _r(self.mean),
            "layer_mean": [_r(v) for v in self.layer_mean],
            "token_mean": [_r(v) for v in self.token_mean],
            "projection_summary": {k: _r(v) for k, v in self.projection_summary.items()},
            "ratio": [[_r(v) for v in row] for row in self.ratio],
            "projection_mean": [[_r(v) for v in row] for row in self.projection_mean],
            "ratio_by_projection": [[[_r(v) for v in cells] for cells in row]
                                    for row in self.cells],
        }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _r(value: float) -> float:
    return float(f"{value:.6g}")


# measuring -----------------------------------------------------------------------------------


def inspect_persona(engine: Any, persona: str | None, text: str, *, system: bool = True,
                    all_tokens: bool = False) -> InspectReport:
    """Run ``text`` as a user message through ``engine`` with ``persona`` active and measure,
    per layer and token, its LoRA update relative to the base output.

    ``persona``: a persona of the engine (a prompt-only persona, or ``None`` for the bare base,
    measures zero everywhere) or a mood (measured alone, at weight 1). ``system``: put the
    persona's system message before the text, as in a real turn. The report covers the
    text's tokens and the generation prompt after them (the whole prompt with ``all_tokens``).
    """
    import torch

    if not text.strip():
        raise HyperlexError("nothing to inspect: the text is empty")
    if not hasattr(engine, "lora_modules") or not hasattr(engine, "activate"):
        raise HyperlexError("inspecting adapters needs the torch engine")
    bundle = None if persona is None else engine.persona(persona, moods=True)
    mood = bundle is not None and bundle.is_mood
    messages = []
    if system and bundle is not None and not mood:
        messages.append({"role": "system", "content": system_message(bundle)})
    messages.append({"role": "user", "content": text})
    ids, start = _encode(engine.tokenizer, messages, text)
    if len(ids) > engine.context_length:
        raise HyperlexError(f"the prompt has {len(ids)} tokens, more than the model's context "
                            f"of {engine.context_length}")
    if all_tokens:
        start = 0

    modules = _modules(engine)
    if not modules:
        raise HyperlexError("no LoRA adapter is attached to the engine: nothing to inspect")
    adapter = persona if bundle is not None and bundle.adapter_dir is not None else None
    layers = sorted({layer for layer, _, _ in modules})
    adapted_names = [proj for _, proj, module in modules
                     if adapter is not None and adapter in module.lora_B]
    pool = adapted_names or [proj for _, proj, _ in modules]
    projections = list(dict.fromkeys(p for p in _PROJECTION_ORDER if p in pool))
    projections += [p for p in dict.fromkeys(pool) if p not in projections]

    base_norms: dict[int, Any] = {}
    delta_norms: dict[int, Any] = {}
    handles = []

    def on_base(key: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            base_norms[key] = output[0].float().norm(dim=-1)
        return hook

    def on_lora(key: int, layer: Any) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            delta = output[0] * layer.scaling[adapter]  # as PEFT: lora_B(lora_A(x)) * scaling
            delta_norms[key] = delta.float().norm(dim=-1)
        return hook

    tokens = torch.tensor([ids])
    composition = (None, ((persona, 1.0),)) if mood else (persona, ())
    with engine.activate(*composition) as model, torch.inference_mode():
        try:
            for key, (_, _, module) in enumerate(modules):
                handles.append(module.base_layer.register_forward_hook(on_base(key)))
                if adapter is not None and adapter in module.lora_B:
                    handles.append(module.lora_B[adapter].register_forward_hook(
                        on_lora(key, module)))
            model(input_ids=tokens, attention_mask=torch.ones_like(tokens))
        finally:
            for handle in handles:
                handle.remove()

    index = {(layer, proj): key for key, (layer, proj, _) in enumerate(modules)}
    zeros = [0.0] * (len(ids) - start)
    cells: list[list[list[float]]] = []
    adapted: list[list[bool]] = []
    for layer in layers:
        row, mask = [], []
        for proj in projections:
            key = index.get((layer, proj))
            on = key is not None and key in delta_norms
            mask.append(on)
            if not on or key not in base_norms:
                row.append(list(zeros))
                continue
            ratio = delta_norms[key] / base_norms[key].clamp_min(_EPS)
            row.append([float(v) for v in ratio[start:].tolist()])
        cells.append(row)
        adapted.append(mask)
    shown = ids[start:]
    return InspectReport(
        persona=persona, text=text, tokens=[engine.tokenizer.decode([i]) for i in shown],
        token_ids=shown, layers=layers, projections=projections, cells=cells,
        adapted=adapted, system=system, first_token=start, prompt_tokens=len(ids),
        base=getattr(engine, "base_name", None))


def compare(engine: Any, personas: Sequence[str], text: str, *, system: bool = True,
            all_tokens: bool = False) -> list[InspectReport]:
    """One report per persona on the same text (each with its own system message)."""
    return [inspect_persona(engine, persona, text, system=system, all_tokens=all_tokens)
            for persona in personas]


_PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")


def _modules(engine: Any) -> list[tuple[int, str, Any]]:
    """(decoder layer index, projection name, LoRA layer) for every LoRA linear layer."""
    found: list[tuple[int, str, Any]] = []
    wanted = {id(m) for m in engine.lora_modules}
    for name, module in engine.inner_model.named_modules():
        if id(module) not in wanted or not hasattr(module, "base_layer") \
                or not hasattr(module, "lora_B"):
            continue
        match = _LAYER_NAME.match(name)
        if match is None:
            continue
        found.append((int(match.group(1)), match.group(2), module))
    short = {rest.rsplit(".", 1)[-1] for _, rest, _ in found}
    if len(short) == len({rest for _, rest, _ in found}):  # last names are unambiguous
        found = [(layer, rest.rsplit(".", 1)[-1], m) for layer, rest, m in found]
    return found


def _encode(tokenizer: Any, messages: list[dict[str, str]], text: str) -> tuple[list[int], int]:
    """The chat-templated prompt's token ids (as the engine encodes it) and the index of the
    first token of the user's ``text`` in it."""
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    at = rendered.rfind(text)
    if at < 0:
        return ids, 0
    try:
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # slow tokenizers have no offsets
        return ids, 0
    if list(encoded["input_ids"]) != ids:
        return ids, 0
    for i, (_, end) in enumerate(encoded["offset_mapping"]):
        if end > at:
            return ids, i
    return ids, 0


# text output ---------------------------------------------------------------------------------


def token_label(token: str) -> str:
    """A token as a short printable label: newlines escaped, surrounding spaces trimmed."""
    label = token.replace("\n", "\\n").replace("\t", "\\t").strip()
    return label or "␣"


def format_report(report: InspectReport, width: int = 40, top: int = 8) -> str:
    """Per-layer bars of the mean ratio, the tokens and projections where it is largest."""
    means = report.layer_mean
    peak = max(means, default=0.0)
    lines = [f"{report.persona or '(bare base)'}: {RATIO_LABEL}, mean over {len(report.tokens)}"
             f" tokens and each layer's adapted projections (overall {report.mean:.4f})",
             "layer    mean"]
    for layer, value in zip(report.layers, means, strict=True):
        bar = "#" * (round(width * value / peak) if peak > 0 else 0)
        lines.append(f"{layer:>5}  {value:.4f}  {bar}")
    order = sorted(range(len(report.tokens)), key=lambda t: -report.token_mean[t])[:top]
    lines.append("top tokens: " + ", ".join(
        f"'{token_label(report.tokens[t])}' {report.token_mean[t]:.4f}" for t in order))
    summary = report.projection_summary
    lines.append("projections: " + ", ".join(f"{name} {value:.4f}"
                                             for name, value in summary.items()))
    return "\n".join(lines)


def format_compare(reports: Sequence[InspectReport], top: int = 3) -> str:
    """A layers x personas table of the mean ratio, then each persona's strongest layers."""
    names = [r.persona or "(base)" for r in reports]
    widths = [max(len(n), 6) for n in names]
    layers = sorted({layer for r in reports for layer in r.layers})
    lines = [f"{RATIO_LABEL}, mean over the text's tokens and each layer's adapted projections",
             "layer  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))]
    means = [dict(zip(r.layers, r.layer_mean, strict=True)) for r in reports]
    for layer in layers:
        cells = [f"{m.get(layer, 0.0):.4f}".rjust(w)
                 for m, w in zip(means, widths, strict=True)]
        lines.append(f"{layer:>5}  " + "  ".join(cells))
    lines.append("  all  " + "  ".join(f"{r.mean:.4f}".rjust(w)
                                       for r, w in zip(reports, widths, strict=True)))
    for name, r in zip(names, reports, strict=True):
        strongest = sorted(zip(r.layers, r.layer_mean, strict=True), key=lambda x: -x[1])[:top]
        proj = max(r.projection_summary.items(), key=lambda x: x[1], default=("-", 0.0))
        lines.append(f"{name}: strongest layers "
                     + ", ".join(f"{layer} ({v:.4f})" for layer, v in strongest)
                     + f"; strongest projection {proj[0]} ({proj[1]:.4f})")
    return "\n".join(lines)


# plots ----------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tick_step(n: int, most: int) -> int:
    return max(1, math.ceil(n / most))


def plot_heatmap(report: InspectReport, path: str | Path, max_labels: int = 80) -> Path:
    """Layers (y) x tokens (x) heatmap of the ratio, with the per-layer mean beside it."""
    plt = _pyplot()
    path = Path(path)
    n_tokens, n_layers = len(report.tokens), len(report.layers)
    fig = plt.figure(figsize=(min(4 + 0.28 * n_tokens, 30), max(3.5, 1.5 + 0.22 * n_layers)),
                     layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[max(n_tokens, 4), max(n_tokens, 4) * 0.18, 0.6])
    ax = fig.add_subplot(grid[0])
    side = fig.add_subplot(grid[1], sharey=ax)
    image = ax.imshow(report.ratio or [[0.0]], aspect="auto", origin="lower",
                      interpolation="nearest", cmap="magma", vmin=0.0,
                      extent=(-0.5, n_tokens - 0.5, -0.5, n_layers - 0.5))
    step = _tick_step(n_tokens, max_labels)
    ticks = list(range(0, n_tokens, step))
    ax.set_xticks(ticks, [token_label(report.tokens[t]) for t in ticks], rotation=90,
                  fontsize=8)
    lstep = _tick_step(n_layers, 30)
    ax.set_yticks(range(0, n_layers, lstep), [str(report.layers[i])
                                              for i in range(0, n_layers, lstep)], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_xlabel("token")
    who = report.persona or "bare base"
    ax.set_title(f"{who}: {RATIO_LABEL} per layer and token", fontsize=10)
    side.barh(range(n_layers), report.layer_mean, color="#b5367a", height=0.8)
    side.set_xlabel("mean", fontsize=8)
    side.tick_params(labelleft=False, labelsize=7)
    side.set_xlim(left=0)
    fig.colorbar(image, cax=fig.add_subplot(grid[2]), label=RATIO_LABEL)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_compare(reports: Sequence[InspectReport], path: str | Path) -> Path:
    """Which layers carry each persona: a layers x personas heatmap of the mean ratio, each
    persona's depth profile as a share of its own total, and projections x personas."""
    plt = _pyplot()
    path = Path(path)
    names = [r.persona or "bare base" for r in reports]
    layers = sorted({layer for r in reports for layer in r.layers})
    means = [dict(zip(r.layers, r.layer_mean, strict=True)) for r in reports]
    matrix = [[m.get(layer, 0.0) for m in means] for layer in layers]
    projections = list(dict.fromkeys(p for r in reports for p in r.projections))
    proj_matrix = [[r.projection_summary.get(p, 0.0) for r in reports] for p in projections]
    fig = plt.figure(figsize=(max(10.0, 3 + 1.4 * len(reports)), 11), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[3.0, 0.5 + 0.15 * len(projections)])
    heat = fig.add_subplot(grid[0, 0])
    image = heat.imshow(matrix, aspect="auto", origin="lower", interpolation="nearest",
                        cmap="magma", vmin=0.0)
    heat.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=9)
    step = _tick_step(len(layers), 30)
    heat.set_yticks(range(0, len(layers), step),
                    [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    heat.set_ylabel("layer")
    heat.set_title("mean over tokens and projections", fontsize=10)
    fig.colorbar(image, ax=heat, label=RATIO_LABEL)
    profile = fig.add_subplot(grid[0, 1], sharey=heat)
    for name, row in zip(names, zip(*matrix, strict=True), strict=True):
        total = sum(row)
        shares = [100 * v / total if total > 0 else 0.0 for v in row]
        profile.plot(shares, range(len(layers)), marker="o", markersize=3, label=name)
    profile.set_xlabel("share of the persona's total (%)")
    profile.set_title("depth profile (each persona normalised)", fontsize=10)
    profile.tick_params(labelleft=False)
    profile.grid(alpha=0.3)
    profile.legend(fontsize=8)
    projs = fig.add_subplot(grid[1, :])
    pimage = projs.imshow(proj_matrix or [[0.0]], aspect="auto", interpolation="nearest",
                          cmap="magma", vmin=0.0)
    projs.set_xticks(range(len(names)), names, fontsize=9)
    projs.set_yticks(range(len(projections)), projections, fontsize=8)
    peak = max((v for row in proj_matrix for v in row), default=0.0)
    for i, row in enumerate(proj_matrix):
        for j, value in enumerate(row):
            projs.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                       color="black" if value > 0.6 * peak else "white")
    projs.set_title("per projection, mean over layers and tokens", fontsize=10)
    fig.colorbar(pimage, ax=projs, label=RATIO_LABEL)
    fig.suptitle(f"{RATIO_LABEL}: which layers carry each persona", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_adapters(engine: Any, personas: Sequence[str]) -> None:
    """Raise a clear error for a name the engine does not know or one with no adapter."""
    for name in personas:
        if engine.persona(name, moods=True).adapter_dir is None:
            raise HyperlexError(f"persona {name!r} has no adapter (it is prompt-only): there is "
                                "no LoRA contribution to inspect")
