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
    report = run(config, only=["P1", "P1b", "P2", "P3", "P4", "P6", "P7", "L", "G", "V"])

    rows = {r["id"]: r for r in report["rows"]}
    llama = ["L1", "L2", "L2t", "L6", "L7", "L5"]
    grammar = ["G1"] if rows["L2"]["note"] else ["G1", "G2"]
    best_of = ["V3"] if rows["L2"]["note"] else ["V1", "V2", "V3"]
    assert list(rows) == ["P1", "P1n", "P1b", "P2", "P2m", "P3", "P4a", "P4b", "P6f32",
                          "P6bf16", "P6nf4", "P7", "P7m", "P7q", "P7qc", "P7q3", *llama, *grammar,
                          *best_of]
    for pid, row in rows.items():
        if pid in ("L1", "L5") or (pid in llama and row["note"]):
            continue
        assert row["hyperlex"] > 0 and row["alternative"] > 0 and row["ratio"] > 0, row
        assert row["target"], pid
    if not rows["L2"]["note"]:  # llama-cpp-python installed
        assert rows["L1"]["hyperlex"] > 0
        assert rows["L5"]["note"].startswith("skipped")
    assert sum(isinstance(rows[p]["met"], bool) for p in ("P6f32", "P6bf16", "P6nf4")) == 1
    assert rows["P2"]["details"]["merge_s"] > 0
    assert rows["P7"]["details"]["runs"]["hand"]["steps"] == 2
    assert rows["V3"]["details"]["references"] > 0

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
    assert all(pid in table for pid in rows)

    out = tmp_path / "bench.json"
    write_json(report, out)
    loaded = json.loads(out.read_text())
    assert loaded["quick"] is True and loaded["machine"]["cpus"]
    assert [Row(**r).id for r in loaded["rows"]] == list(rows)


def test_agent_bench_runs_the_checkouts_benchmark(runner, tiny_base: Path, tmp_path: Path):
    from hyperlex.cli import cli

    shown = runner.invoke(cli, ["bench", "--help"])
    assert shown.exit_code == 0 and "agent bench" in shown.output and "--quick" in shown.output
    out = tmp_path / "p1.json"
    result = runner.invoke(cli, ["bench", "--quick", "--only", "P1", "--base", str(tiny_base),
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(out.read_text())["rows"]] == ["P1", "P1n"]


def test_serve_load_rows_check_every_reply_against_its_persona(tiny_base: Path,
                                                               tiny_bundles: dict[str, Path],
                                                               tmp_path: Path):
    config = Config.quick_config(base=str(tiny_base), bundles=list(tiny_bundles.values()),
                                 workdir=tmp_path / "work", max_new_tokens=6)
    rows = {r["id"]: r for r in run(config, only=["S"])["rows"]}
    assert list(rows) == ["S1", "S2", "S3"]
    details = rows["S1"]["details"]
    assert details["errors"] == [] and details["mixed"] == []
    assert rows["S1"]["hyperlex"] == rows["S1"]["alternative"] == details["requests"] == 12
    assert rows["S1"]["met"] is True
    assert details["completion_tokens"] == 12 * 6
    assert details["prompts_where_every_persona_differs"] != "0/10"
    assert rows["S2"]["hyperlex"] > 0 and rows["S2"]["alternative"] > 0
    assert 0 < details["ttft_s"]["p50"] <= details["ttft_s"]["p95"] <= details["latency_s"]["p99"]
