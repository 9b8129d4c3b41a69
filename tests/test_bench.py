"""Smoke test of the benchmark's quick mode on the tiny model: it must run and report, not be
fast (nothing here asserts a timing)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import Config, Row, render_table, run
from bench.common import rows_of, write_json

COLUMNS = ("id", "what", "hyperlex", "alternative", "ratio", "target", "met?")


def test_quick_bench_reports_every_row(tiny_base: Path, tiny_bundles: dict[str, Path],
                                       tmp_path: Path):
    config = Config.quick_config(base=str(tiny_base), bundles=list(tiny_bundles.values()),
                                 workdir=tmp_path / "work", switches=10)
    report = run(config, only=["P1", "P1b", "P3", "P4", "P2", "P6", "P7"])

    rows = {r["id"]: r for r in report["rows"]}
    assert list(rows) == ["P1", "P1n", "P1b", "P2", "P3", "P4a", "P4b", "P6", "P7"]
    for pid in ("P1", "P1n", "P1b", "P3", "P4a", "P4b"):
        row = rows[pid]
        assert row["hyperlex"] > 0 and row["alternative"] > 0 and row["ratio"] > 0, row
        assert isinstance(row["met"], bool) and row["target"]
    for pid in ("P2", "P6", "P7"):
        assert rows[pid]["note"] == "not measured yet" and rows[pid]["met"] is None

    p1 = rows["P1"]["details"]
    assert p1["identical_logits"] is True
    assert p1["load_adapter_s"] > 0 and p1["reload_model_s"] > 0
    p3 = rows["P3"]["details"]
    assert p3["identical_texts"] is True, (p3["batch_texts"], p3["sequential_texts"])
    assert len(set(p3["personas"])) == 4
    memory = rows["P4a"]["details"]["by_count"]
    assert set(memory) == {"0", "1", "2", "4"}
    assert memory["4"]["tensor_bytes"] > memory["1"]["tensor_bytes"] > memory["0"]["tensor_bytes"]

    table = render_table(rows_of(report))
    header = table.splitlines()[0]
    assert [c.strip() for c in header.split("|")] == list(COLUMNS)
    assert "not measured yet" in table and all(pid in table for pid in rows)

    out = tmp_path / "bench.json"
    write_json(report, out)
    loaded = json.loads(out.read_text())
    assert loaded["quick"] is True and loaded["machine"]["cpus"]
    assert [Row(**r).id for r in loaded["rows"]] == list(rows)
