"""P4: resident memory of the base alone and with 1, 8 and N personas attached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.cast import Cast
from bench.common import Config, Row, collect, rss_bytes


def tensor_bytes(model: Any) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once):
    deterministic, unlike the process RSS."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def adapter_file_bytes(adapter_dir: Path) -> int:
    """Bytes of the weights stored in an adapter's safetensors file (header excluded)."""
    from safetensors import safe_open

    from hyperlex.persona.bundle import ADAPTER_WEIGHTS

    total = 0
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = weights.get_tensor(key)
            total += tensor.numel() * tensor.element_size()
    return total


def memory(config: Config, cast: Cast) -> list[Row]:
    n = config.personas
    counts = sorted({0, 1, min(8, n) if not config.quick else min(2, n), n})
    personas = cast.personas(n)
    file_bytes = [adapter_file_bytes(p.adapter_dir) for p in personas]
    measured: dict[int, dict[str, int]] = {}
    for count in counts:
        cast.release()
        collect()
        before = rss_bytes()
        engine, _, _ = cast.build(count)
        measured[count] = {"tensor_bytes": tensor_bytes(engine.model),
                           "rss_delta_bytes": rss_bytes() - before,
                           "adapter_file_bytes": sum(file_bytes[:count])}
        del engine
    base = measured[0]["tensor_bytes"]
    for count, m in measured.items():
        m["added_bytes"] = m["tensor_bytes"] - base
        m["added_per_persona"] = m["added_bytes"] // count if count else 0
    added_n = measured[n]["added_bytes"] / n
    file_n = sum(file_bytes) / n
    per_ratio = max(m["added_bytes"] / m["adapter_file_bytes"]
                    for c, m in measured.items() if c)
    total_ratio = measured[n]["tensor_bytes"] / base
    details = {"by_count": {str(c): m for c, m in measured.items()},
               "rss_note": "RSS delta of one in-process construction each; noisy, allocator "
                           "may keep freed memory"}
    return [
        Row("P4a", "memory added per persona (vs adapter file weights)", added_n, file_n,
            unit="B", alt_label="file weights", ratio=per_ratio, target="<= 1.1x",
            met=per_ratio <= 1.1, details=details),
        Row("P4b", f"memory with {n} personas (vs base alone)",
            float(measured[n]["tensor_bytes"]), float(base), unit="B", alt_label="base",
            ratio=total_ratio, target="<= 1.25x", met=total_ratio <= 1.25,
            details={"rss_delta_bytes": {str(c): m["rss_delta_bytes"]
                                         for c, m in measured.items()}}),
    ]
