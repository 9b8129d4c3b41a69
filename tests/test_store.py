"""The SQLite session store: schema migrations, round trips, concurrency and crash safety,
and the ``sessions`` commands."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import hyperlex.agent.store as store_module
from hyperlex.agent.store import SCHEMA_VERSION, Store
from hyperlex.cli.sessions import sessions
from hyperlex.errors import HyperlexError


def make_turn(index: int, persona: str = "poet", user: str = "hello", **extra) -> dict:
    turn = {
        "index": index,
        "persona": persona,
        "reason": "addressed as @" + persona,
        "user": user,
        "reply": f"reply {index} from {persona}",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 10 + index, "completion_tokens": 5},
        "seconds": 0.25,
        "annotations": {"note": index},
    }
    turn.update(extra)
    return turn


SCENE = json.dumps({"focus": ["sea"], "version": 2, "hyperlexemes": [], "links": []},
                   sort_keys=True)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


# -- schema --------------------------------------------------------------------------------

def test_migrations_create_schema_and_reopen_is_noop(db: Path):
    with Store(db) as store:
        assert store.schema_version == SCHEMA_VERSION
        store.open_session("a")
    raw = sqlite3.connect(db)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "turns", "scenes", "schema_migrations"} <= tables
    applied = raw.execute("SELECT version, description, applied_at FROM schema_migrations")
    rows = applied.fetchall()
    raw.close()
    assert [r[0] for r in rows] == [m[0] for m in store_module.MIGRATIONS]
    assert all(r[2] for r in rows)
    with Store(db) as store:  # re-opening neither fails nor re-applies anything
        assert store.schema_version == SCHEMA_VERSION
        assert [s.name for s in store.sessions()] == ["a"]
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(rows)
    raw.close()


def test_a_version_1_database_keeps_its_sessions_as_the_default_tenants(db: Path):
    raw = sqlite3.connect(db)  # what hyperlex before tenants wrote
    raw.executescript(store_module.MIGRATIONS[0][2] + """;
        INSERT INTO sessions (id, name, created_at, updated_at, persona) VALUES
            (7, 'kept', 't0', 't1', 'poet');
        INSERT INTO turns (session_id, idx, persona, user, reply, created_at) VALUES
            (7, 0, 'poet', 'hello', 'reply 0 from poet', 't1');
        INSERT INTO scenes (session_id, version, turn_idx, scene, created_at) VALUES
            (7, 2, 0, '""" + SCENE + """', 't1');
        PRAGMA user_version = 1;""")
    raw.close()
    with Store(db) as store:
        assert store.schema_version == SCHEMA_VERSION
        record = store.session("kept")
        assert record.info.tenant == "" and record.persona == "poet"
        assert [t["reply"] for t in record.turns] == ["reply 0 from poet"]
        assert record.latest_scene() == SCENE
        store.delete_session("kept")  # the turns and scenes still hang off the session
        assert store.conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0


def test_tenants_have_their_own_sessions_under_the_same_names(db: Path):
    with Store(db) as store:
        ada, bob = store.for_tenant("ada"), store.for_tenant("bob")
        ada.open_session("plans", persona="poet")
        bob.open_session("plans")
        ada.record_turn("plans", make_turn(0))
        assert ada.session("plans").info.turns == 1 and bob.session("plans").info.turns == 0
        with pytest.raises(HyperlexError, match="unknown session 'plans'"):
            store.session("plans")  # the default tenant has none
        assert [s.name for s in ada.sessions()] == ["plans"]
        assert sorted(s.tenant for s in store.sessions(all_tenants=True)) == ["ada", "bob"]
        bob.delete_session("plans")
        assert ada.has_session("plans") and not bob.has_session("plans")


def test_newer_database_is_refused(db: Path):
    Store(db).close()
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    raw.commit()
    raw.close()
    with pytest.raises(HyperlexError) as info:
        Store(db)
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 5}" in message
    assert "upgrade hyperlex" in message


def test_not_a_database_is_a_clean_error(db: Path):
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HyperlexError, match="cannot use the session database"):
        Store(db)


def test_wal_mode_and_pragmas(db: Path):
    with Store(db) as store:
        conn = store.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    raw = sqlite3.connect(db)  # WAL is persistent: a fresh connection sees it too
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_default_path_is_in_hyperlex_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "custom-home" / "nested"
    monkeypatch.setenv("HYPERLEX_HOME", str(home))
    with Store() as store:
        assert store.path == home / "hyperlex.db"
        store.open_session("x")
    assert (home / "hyperlex.db").exists()


# -- sessions and turns ----------------------------------------------------------------------

def test_record_and_resume_round_trip(db: Path):
    with Store(db) as store:
        record = store.open_session("chat-1", persona="poet", mood="calm")
        assert record.name == "chat-1" and record.persona == "poet" and record.mood == "calm"
        assert record.turns == [] and record.latest_scene() is None
        route = {"chosen": "poet", "scores": {"poet": 0.9, "philosopher": 0.4}}
        assert store.record_turn("chat-1", make_turn(0, route=route), SCENE, 1) == 0
        assert store.record_turn("chat-1", make_turn(1, "philosopher", "why?"), None, None) == 1
        scene2 = json.dumps({"focus": ["moon"], "version": 3})
        assert store.record_turn("chat-1", make_turn(2), scene2, 3) == 2

    with Store(db) as store:  # a new process resuming
        record = store.open_session("chat-1", persona="other")  # existing: returned unchanged
        assert record.persona == "poet"
        assert [t["index"] for t in record.turns] == [0, 1, 2]
        first = record.turns[0]
        expected = make_turn(0, route=route)
        for key, value in expected.items():
            assert first[key] == value, key
        assert record.turns[1]["route"] is None
        assert record.turns[1]["persona"] == "philosopher"
        assert record.latest_scene() == scene2
        assert record.scene_version == 3
        info = store.sessions()[0]
        assert (info.name, info.turns, info.last_persona) == ("chat-1", 3, "poet")
        assert info.updated_at >= info.created_at


def test_record_turn_appends_and_is_atomic(db: Path):
    with Store(db) as store:
        store.open_session("s")
        # The turn's own index is ignored: turns are appended at the next free index.
        assert store.record_turn("s", make_turn(7), SCENE, 1) == 0
        assert store.record_turn("s", make_turn(0), SCENE, 1) == 1  # scene version bumped
        record = store.session("s")
        assert [t["index"] for t in record.turns] == [0, 1]
        assert record.scene_version == 2
        # A turn that cannot be stored leaves no scene version behind either.
        with pytest.raises(KeyError):
            store.record_turn("s", {"user": "no persona"}, SCENE, 10)
        record = store.session("s")
        assert len(record.turns) == 2 and record.scene_version == 2
        with pytest.raises(HyperlexError, match="unknown session"):
            store.record_turn("nope", make_turn(0), None, None)


def test_generated_names_are_unique_and_sortable(db: Path):
    with Store(db) as store:
        names = [store.open_session().name for _ in range(20)]
    assert len(set(names)) == 20
    for name in names:
        store_module.check_name(name)
        assert name[:4].isdigit() and name[4] == "-"


@pytest.mark.parametrize("bad", ["", "a" * 65, "has space", "semi;colon", "../up", "ümlaut"])
def test_bad_session_names(db: Path, bad: str):
    with Store(db) as store, pytest.raises(HyperlexError) as info:
        store.open_session(bad)
    assert repr(bad) in str(info.value)


def test_unknown_session_lists_close_matches(db: Path):
    with Store(db) as store:
        with pytest.raises(HyperlexError, match="no sessions yet"):
            store.session("x")
        store.open_session("poetry-night")
        store.open_session("work")
        with pytest.raises(HyperlexError) as info:
            store.session("poetry-nite")
        assert "poetry-night" in str(info.value)
        assert "work" not in str(info.value)


def test_update_and_delete_and_ordering(db: Path):
    with Store(db) as store:
        store.open_session("old", persona="poet")
        store.open_session("new")
        store.record_turn("new", make_turn(0), None, None)
        assert [s.name for s in store.sessions()] == ["new", "old"]
        time.sleep(0.002)
        info = store.update_session("old", mood="gloomy")
        assert info.persona == "poet" and info.mood == "gloomy"
        info = store.update_session("old", persona=None)
        assert info.persona is None and info.mood == "gloomy"
        time.sleep(0.002)  # timestamps have microsecond resolution; make the order certain
        assert [s.name for s in store.sessions()] == ["old", "new"]
        store.delete_session("new")
        assert [s.name for s in store.sessions()] == ["old"]
        raw = store.conn
        assert raw.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0  # cascaded
        with pytest.raises(HyperlexError):
            store.delete_session("new")


def test_export_json_and_markdown(db: Path):
    with Store(db) as store:
        store.open_session("ex", persona="poet")
        store.record_turn("ex", make_turn(0, user="line one\nline two"), SCENE, 2)
        store.record_turn("ex", make_turn(1, "philosopher"), None, None)
        doc = json.loads(store.export("ex", "json"))
        assert store.export("ex", "json") == store.export("ex", "json")
        markdown = store.export("ex", "markdown")
        with pytest.raises(HyperlexError, match="unknown export format"):
            store.export("ex", "yaml")
    assert doc["session"]["name"] == "ex" and doc["session"]["turns"] == 2
    assert [t["persona"] for t in doc["turns"]] == ["poet", "philosopher"]
    assert doc["scene"] == json.loads(SCENE)
    assert "# Session ex" in markdown
    assert "### 0 · poet — routed: addressed as @poet" in markdown
    assert "### 1 · philosopher — routed: addressed as @philosopher" in markdown
    assert "> line one\n> line two" in markdown
    assert "reply 1 from philosopher" in markdown
    assert "```json" in markdown and '"sea"' in markdown


# -- concurrency and crashes ---------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hyperlex.agent.store import Store

    db, worker, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = Store(db)
    store.open_session("shared")
    store.open_session("own-" + worker)
    Path(str(go) + "-ready-" + worker).touch()
    while not go.exists():
        time.sleep(0.001)
    for i in range(50):
        time.sleep(0.002)  # let the other process in between turns, as chats would
        for session in ("shared", "own-" + worker):
            turn = {"index": i, "persona": "w" + worker, "reason": "test", "user": f"{i}",
                    "reply": "r", "usage": {}, "annotations": {}}
            store.record_turn(session, turn, '{"v": %d}' % i, i)
    store.close()
    """
)


def test_two_processes_writing_lose_nothing(db: Path, tmp_path: Path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(n), str(go)],
                         stderr=subprocess.PIPE, text=True)
        for n in (1, 2)
    ]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}-ready-{n}").exists() for n in (1, 2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with Store(db) as store:
        shared = store.session("shared")
        assert [t["index"] for t in shared.turns] == list(range(100))
        writers = [t["persona"] for t in shared.turns]
        switches = sum(a != b for a, b in zip(writers, writers[1:], strict=False))
        assert switches > 1  # the two processes really did write at the same time
        for worker in ("1", "2"):
            mine = [t for t in shared.turns if t["persona"] == "w" + worker]
            assert [t["user"] for t in mine] == [str(i) for i in range(50)]  # in order
            own = store.session("own-" + worker)
            assert [t["index"] for t in own.turns] == list(range(50))
            assert own.latest_scene() == '{"v": 49}'
        total = store.conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
        assert total == 200
        versions = [r[0] for r in store.conn.execute(
            "SELECT version FROM scenes s JOIN sessions n ON n.id = s.session_id "
            "WHERE n.name = 'shared' ORDER BY version")]
        assert len(versions) == len(set(versions)) == 100


def test_writer_waits_for_another_connection(db: Path):
    with Store(db) as first, Store(db) as second:
        first.open_session("s")
        holding = threading.Event()

        def hold() -> None:
            with first.transaction():
                holding.set()
                time.sleep(0.5)

        thread = threading.Thread(target=hold)
        thread.start()
        holding.wait(5)
        start = time.monotonic()
        assert second.record_turn("s", make_turn(0), None, None) == 0
        assert time.monotonic() - start >= 0.3  # it waited for the lock instead of failing
        thread.join()


CRASHER = textwrap.dedent(
    """
    import sys, time
    from hyperlex.agent.store import Store

    store = Store(sys.argv[1])
    store.open_session("crash")
    for i in range(3):
        turn = {"index": i, "persona": "poet", "reason": "test", "user": f"u{i}",
                "reply": "r", "usage": {}, "annotations": {}}
        store.record_turn("crash", turn, '{"v": %d}' % i, i)
    # The 4th turn: take the write lock, write more than the page cache holds (so uncommitted
    # pages spill into the WAL file), then hang until killed.
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO turns (session_id, idx, persona, user, reply, created_at) "
            "VALUES (1, 3, 'poet', 'u3', ?, 'now')", ("x" * 8_000_000,))
        print("ready", flush=True)
        time.sleep(120)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_mid_turn_keeps_earlier_turns(db: Path):
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        with Store(db) as reader:  # readers are not blocked by the open write transaction
            assert len(reader.session("crash").turns) == 3
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    start = time.monotonic()
    with Store(db) as store:
        record = store.session("crash")
        assert [t["user"] for t in record.turns] == ["u0", "u1", "u2"]
        assert record.latest_scene() == '{"v": 2}'
        assert store.record_turn("crash", make_turn(3), '{"v": 3}', 3) == 3
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert time.monotonic() - start < 5  # the dead process's lock did not linger
    with Store(db) as store:
        assert len(store.session("crash").turns) == 4


# -- CLI -----------------------------------------------------------------------------------

@pytest.fixture
def populated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cli-home"
    monkeypatch.setenv("HYPERLEX_HOME", str(home))
    with Store() as store:
        store.open_session("alpha", persona="poet")
        store.record_turn("alpha", make_turn(0), SCENE, 1)
        store.record_turn("alpha", make_turn(1, "philosopher", "what is time?"), None, None)
        store.open_session("beta")
    return home


def test_cli_list(populated: Path):
    runner = CliRunner()
    result = runner.invoke(sessions, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TURNS", "LAST", "PERSONA", "UPDATED"]
    assert lines[1].split()[:3] == ["beta", "0", "-"]
    assert lines[2].split()[:3] == ["alpha", "2", "philosopher"]
    result = runner.invoke(sessions, ["list", "--json"])
    data = json.loads(result.stdout)
    assert [(d["name"], d["turns"], d["last_persona"]) for d in data] == [
        ("beta", 0, None), ("alpha", 2, "philosopher")]


def test_cli_list_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HYPERLEX_HOME", str(tmp_path / "empty"))
    result = CliRunner().invoke(sessions, ["list"])
    assert result.exit_code == 0 and result.stdout == ""
    assert "No sessions" in result.stderr


def test_cli_show(populated: Path):
    runner = CliRunner()
    result = runner.invoke(sessions, ["show", "alpha"])
    assert result.exit_code == 0, result.output
    assert "#0 poet (addressed as @poet)" in result.stdout
    assert "#1 philosopher (addressed as @philosopher)" in result.stdout
    assert "what is time?" in result.stdout
    result = runner.invoke(sessions, ["show", "alpha", "--json"])
    doc = json.loads(result.stdout)
    assert doc["session"]["persona"] == "poet" and len(doc["turns"]) == 2


def test_cli_export(populated: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(sessions, ["export", "alpha"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scene"] == json.loads(SCENE)
    result = runner.invoke(sessions, ["export", "alpha", "--format", "markdown"])
    assert "### 1 · philosopher — routed: addressed as @philosopher" in result.stdout
    out = tmp_path / "alpha.md"
    result = runner.invoke(sessions, ["export", "alpha", "--format", "markdown", "-o", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    assert "# Session alpha" in out.read_text(encoding="utf-8")


def test_cli_delete(populated: Path):
    runner = CliRunner()
    result = runner.invoke(sessions, ["delete", "alpha"], input="n\n")
    assert result.exit_code != 0
    with Store() as store:
        assert {s.name for s in store.sessions()} == {"alpha", "beta"}
    result = runner.invoke(sessions, ["delete", "alpha"], input="y\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(sessions, ["delete", "beta", "--yes"])
    assert result.exit_code == 0 and "Deleted session beta" in result.stderr
    with Store() as store:
        assert store.sessions() == []


def test_cli_unknown_session(populated: Path):
    runner = CliRunner()
    for args in (["show", "alpah"], ["export", "alpah"], ["delete", "alpah", "--yes"]):
        result = runner.invoke(sessions, args)
        assert result.exit_code == 1
        assert "Error: unknown session 'alpah'; did you mean alpha?" in result.stderr
        assert "Traceback" not in result.output
        assert result.stdout == ""
