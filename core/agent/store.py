"""The session store: chat sessions, their turns and scene versions in one SQLite database.

The database lives in the user data dir (``HYPERLEX_HOME`` overrides) as ``hyperlex.db``. It runs
in WAL mode with a busy timeout, so several ``agent`` processes can read and write one database
at once: a writer waits for another writer's transaction instead of failing. Every turn is
committed on its own (the turn, its scene version and the session's ``updated_at`` in one
transaction), so a process killed mid-turn loses at most that turn.

The schema is versioned: ``MIGRATIONS`` are applied in order, each in its own transaction, and
the version reached is kept in ``PRAGMA user_version`` (with a row per migration in
``schema_migrations`` for people inspecting the file). A database written by a newer hyperlex is
refused rather than misread.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hyperlex import paths
from hyperlex.errors import HyperlexError

DB_NAME = "hyperlex.db"
BUSY_TIMEOUT_S = 10.0
EXPORT_FORMATS = ("json", "markdown")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_TENANT = ""
"""The tenant of every session made outside a multi-tenant ``agent serve`` (``agent chat``,
LangChain, a server with one ``--api-key`` or none)."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of :meth:`Store.update_session` arguments: leave that field as it is."""


# (version, description, SQL). Append only: never edit a migration that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "sessions, turns and scene versions",
        """
        CREATE TABLE schema_migrations (
            version     INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at  TEXT NOT NULL
        );
        CREATE TABLE sessions (
            id          INTEGER PRIMARY KEY,
            name        TEXT NOT NULL UNIQUE,
            created_at  TEXT NOT NULL,
            updated_at  TEXT NOT NULL,
            persona     TEXT,
            mood        TEXT,
            meta        TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX sessions_updated_at ON sessions (updated_at);
        CREATE TABLE turns (
            id                INTEGER PRIMARY KEY,
            session_id        INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            idx               INTEGER NOT NULL,
            persona           TEXT NOT NULL,
            reason            TEXT NOT NULL DEFAULT '',
            user              TEXT NOT NULL,
            reply             TEXT NOT NULL DEFAULT '',
            finish_reason     TEXT,
            prompt_tokens     INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            seconds           REAL NOT NULL DEFAULT 0,
            route             TEXT,
            mood              TEXT,
            annotations       TEXT NOT NULL DEFAULT '{}',
            created_at        TEXT NOT NULL,
            UNIQUE (session_id, idx)
        );
        CREATE TABLE scenes (
            id          INTEGER PRIMARY KEY,
            session_id  INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            version     INTEGER NOT NULL,
            turn_idx    INTEGER,
            scene       TEXT NOT NULL,
            created_at  TEXT NOT NULL,
            UNIQUE (session_id, version)
        );
        """,
    ),
    (
        2,
        "sessions belong to a tenant: names are unique per tenant",
        # SQLite cannot drop a UNIQUE constraint: rebuild the table (foreign keys are off
        # while migrations run, so the turns and scenes that point at it are kept).
        """
        CREATE TABLE sessions_v2 (
            id          INTEGER PRIMARY KEY,
            tenant      TEXT NOT NULL DEFAULT '',
            name        TEXT NOT NULL,
            created_at  TEXT NOT NULL,
            updated_at  TEXT NOT NULL,
            persona     TEXT,
            mood        TEXT,
            meta        TEXT NOT NULL DEFAULT '{}',
            UNIQUE (tenant, name)
        );
        INSERT INTO sessions_v2 (id, tenant, name, created_at, updated_at, persona, mood, meta)
            SELECT id, '', name, created_at, updated_at, persona, mood, meta FROM sessions;
        DROP TABLE sessions;
        ALTER TABLE sessions_v2 RENAME TO sessions;
        CREATE INDEX sessions_updated_at ON sessions (updated_at);
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def default_path() -> Path:
    return paths.home() / DB_NAME


def now() -> str:
    """UTC timestamp, ISO 8601 with microseconds: sorts as text in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_session_name() -> str:
    """A readable, sortable, practically unique name: local date and time + 4 hex digits."""
    return f"{datetime.now().strftime('%Y-%m-%d-%H%M')}-{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise HyperlexError(
            f"invalid session name {name!r}: use 1-64 letters, digits, '-', '_' or '.'"
        )
    return name


@dataclass(frozen=True)
class SessionInfo:
    name: str
    created_at: str
    updated_at: str
    turns: int
    last_persona: str | None
    persona: str | None = None
    mood: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SessionRecord:
    """A session as stored: its info, its turns in order and its latest scene."""

    info: SessionInfo
    turns: list[dict[str, Any]]
    scene_json: str | None = None
    scene_version: int | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def persona(self) -> str | None:
        return self.info.persona

    @property
    def mood(self) -> str | None:
        return self.info.mood

    def latest_scene(self) -> str | None:
        """JSON of the session's highest scene version, None if it has none."""
        return self.scene_json


class Store:
    """One SQLite connection to the session database, safe to share between threads.

    A store sees the sessions of one tenant (``tenant``; :meth:`for_tenant` gives another
    tenant's view over the same connection): a name is unique within a tenant, and a
    session of another tenant is unknown to it, exactly as if it did not exist."""

    def __init__(self, path: Path | str | None = None, tenant: str = DEFAULT_TENANT):
        self.tenant = tenant
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise HyperlexError(f"cannot open the session database {self.path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            mode = _enable_wal(conn)
            if str(mode).lower() != "wal":
                raise HyperlexError(
                    f"the session database {self.path} cannot use WAL mode (got {mode!r})"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
            self._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._conn = None
            raise HyperlexError(f"cannot use the session database {self.path}: {exc}") from None
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # -- plumbing ---------------------------------------------------------------------------

    def for_tenant(self, tenant: str) -> Store:
        """This store's connection seen as ``tenant`` (its sessions only)."""
        scoped = copy.copy(self)
        scoped.tenant = tenant
        return scoped

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HyperlexError("the session store is closed")
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run one transaction on the yielded connection: BEGIN IMMEDIATE
        for writes (takes the write lock up front, so reads inside see the state the writes
        apply to), BEGIN for reads (one consistent snapshot). It commits when the block ends
        and rolls back if it raises. Every method here writes through it; use it for a
        statement of your own that must be atomic with the database's other writers (while
        it is held, other processes' writers wait up to ``BUSY_TIMEOUT_S``)."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def _migrate(self) -> None:
        version = self._user_version()
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        if version == SCHEMA_VERSION:
            return
        # SQLite's procedure for schema changes: foreign keys off (it cannot change inside a
        # transaction), the migrations, a foreign key check before the commit, keys back on.
        self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            self._apply_migrations()
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")

    def _apply_migrations(self) -> None:
        with self.transaction() as conn:
            version = self._user_version()  # another process may have migrated meanwhile
            if version > SCHEMA_VERSION:
                raise self._too_new(version)
            for number, description, sql in MIGRATIONS:
                if number <= version:
                    continue
                # executescript would COMMIT first; run the statements one by one instead.
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) "
                    "VALUES (?, ?, ?)",
                    (number, description, now()),
                )
                conn.execute(f"PRAGMA user_version = {int(number)}")
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise HyperlexError(f"migrating the session database {self.path} would break "
                                    f"{len(broken)} references; it was left unchanged")

    def _user_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _too_new(self, version: int) -> HyperlexError:
        return HyperlexError(
            f"the session database {self.path} has schema version {version}, but this hyperlex "
            f"knows versions up to {SCHEMA_VERSION}; upgrade hyperlex to use it"
        )

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._user_version()

    def _session_id(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT id FROM sessions WHERE tenant = ? AND name = ?",
                           (self.tenant, name)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM sessions WHERE tenant = ?",
                                                (self.tenant,))]
            raise _unknown(name, names)
        return int(row[0])

    # -- sessions ---------------------------------------------------------------------------

    def open_session(
        self, name: str | None = None, *, persona: str | None = None, mood: str | None = None
    ) -> SessionRecord:
        """Create the session ``name`` (None: a new generated name) or return it if it exists.

        ``persona`` and ``mood`` are stored only when the session is created; change an existing
        session's with :meth:`update_session`.
        """
        if name is not None:
            check_name(name)
        for _ in range(100):
            candidate = name if name is not None else new_session_name()
            stamp = now()
            with self.transaction() as conn:
                cursor = conn.execute(
                    "INSERT INTO sessions (tenant, name, created_at, updated_at, persona, mood, "
                    "meta) VALUES (?, ?, ?, ?, ?, ?, '{}') ON CONFLICT (tenant, name) DO NOTHING",
                    (self.tenant, candidate, stamp, stamp, persona, mood),
                )
                created = cursor.rowcount == 1
            if created or name is not None:
                return self.session(candidate)
        raise HyperlexError("could not generate a unique session name")  # pragma: no cover

    def update_session(
        self,
        name: str,
        *,
        persona: str | None = UNSET,
        mood: str | None = UNSET,
        meta: dict[str, Any] | None = UNSET,
    ) -> SessionInfo:
        """Change a session's pinned persona, mood or meta (None clears; omitted: unchanged)."""
        changes: dict[str, Any] = {}
        if persona is not UNSET:
            changes["persona"] = persona
        if mood is not UNSET:
            changes["mood"] = mood
        if meta is not UNSET:
            changes["meta"] = _dumps(meta or {})
        with self.transaction() as conn:
            session_id = self._session_id(conn, name)
            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(
                f"UPDATE sessions SET {assignments}{', ' if changes else ''}updated_at = ? "
                "WHERE id = ?",
                (*changes.values(), now(), session_id),
            )
            return self._info(conn, session_id)

    def sessions(self, all_tenants: bool = False) -> list[SessionInfo]:
        """This tenant's sessions (``all_tenants``: every tenant's), most recently updated
        first."""
        where, args = ("", ()) if all_tenants else ("WHERE s.tenant = ? ", (self.tenant,))
        with self.transaction(write=False) as conn:
            rows = conn.execute(f"{_INFO_SELECT} {where}ORDER BY s.updated_at DESC, s.id DESC",
                                args).fetchall()
        return [_info_from_row(row) for row in rows]

    def has_session(self, name: str) -> bool:
        with self.transaction(write=False) as conn:
            return conn.execute("SELECT 1 FROM sessions WHERE tenant = ? AND name = ?",
                                (self.tenant, name)).fetchone() is not None

    def session(self, name: str) -> SessionRecord:
        """The session with its turns and latest scene; unknown names list close matches."""
        with self.transaction(write=False) as conn:
            session_id = self._session_id(conn, name)
            info = self._info(conn, session_id)
            turns = [
                _turn_from_row(row)
                for row in conn.execute(
                    f"SELECT {_TURN_COLUMNS} FROM turns WHERE session_id = ? ORDER BY idx",
                    (session_id,),
                )
            ]
            scene = conn.execute(
                "SELECT scene, version FROM scenes WHERE session_id = ? "
                "ORDER BY version DESC LIMIT 1",
                (session_id,),
            ).fetchone()
        return SessionRecord(
            info=info,
            turns=turns,
            scene_json=None if scene is None else scene[0],
            scene_version=None if scene is None else int(scene[1]),
        )

    def scenes(self, name: str) -> list[dict[str, Any]]:
        """Every scene version of the session, oldest first: ``version``, ``turn`` (the index
        of the turn that left it), ``scene`` (the scene's dict) and ``created_at``."""
        with self.transaction(write=False) as conn:
            session_id = self._session_id(conn, name)
            rows = conn.execute(
                "SELECT version, turn_idx, scene, created_at FROM scenes WHERE session_id = ? "
                "ORDER BY version", (session_id,)).fetchall()
        return [{"version": int(version), "turn": turn, "scene": json.loads(scene),
                 "created_at": created} for version, turn, scene, created in rows]

    def delete_session(self, name: str) -> None:
        """Delete a session with its turns and scenes."""
        with self.transaction() as conn:
            session_id = self._session_id(conn, name)
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def _info(self, conn: sqlite3.Connection, session_id: int) -> SessionInfo:
        row = conn.execute(f"{_INFO_SELECT} WHERE s.id = ?", (session_id,)).fetchone()
        return _info_from_row(row)

    # -- turns ------------------------------------------------------------------------------

    def record_turn(
        self,
        session: str,
        turn: dict[str, Any],
        scene_json: str | None = None,
        scene_version: int | None = None,
    ) -> int:
        """Append a finished turn (``Turn.as_dict()``, optionally with a ``"route"`` dict) and,
        if given, the scene after it, in one transaction. Returns the index the turn got.

        Append semantics: the turn is stored at the session's next free index (the turn's own
        ``index`` is ignored), so two processes appending to one session never collide. The
        same goes for the scene: it is stored as ``scene_version`` unless the session already
        has that version or a higher one, in which case it gets the next free version.
        """
        usage = turn.get("usage") or {}
        route = turn.get("route")
        with self.transaction() as conn:
            session_id = self._session_id(conn, session)
            stamp = now()
            idx = conn.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE session_id = ?", (session_id,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO turns (session_id, idx, persona, reason, user, reply, finish_reason, "
                "prompt_tokens, completion_tokens, seconds, route, mood, annotations, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    idx,
                    str(turn["persona"]),
                    str(turn.get("reason") or ""),
                    str(turn["user"]),
                    str(turn.get("reply") or ""),
                    turn.get("finish_reason"),
                    int(usage.get("prompt_tokens") or turn.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or turn.get("completion_tokens") or 0),
                    float(turn.get("seconds") or 0.0),
                    None if route is None else _dumps(route),
                    turn.get("mood"),
                    _dumps(turn.get("annotations") or {}),
                    stamp,
                ),
            )
            if scene_json is not None:
                next_version = conn.execute(
                    "SELECT COALESCE(MAX(version) + 1, 0) FROM scenes WHERE session_id = ?",
                    (session_id,),
                ).fetchone()[0]
                version = next_version if scene_version is None else max(
                    int(scene_version), next_version
                )
                conn.execute(
                    "INSERT INTO scenes (session_id, version, turn_idx, scene, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (session_id, version, idx, scene_json, stamp),
                )
            conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (stamp, session_id))
        return int(idx)

    # -- export -----------------------------------------------------------------------------

    def export(self, name: str, fmt: str = "json") -> str:
        """The session as one JSON document (sorted keys) or as Markdown."""
        if fmt not in EXPORT_FORMATS:
            raise HyperlexError(
                f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}"
            )
        record = self.session(name)
        if fmt == "json":
            return export_json(record)
        return export_markdown(record)


def export_document(record: SessionRecord) -> dict[str, Any]:
    scene = record.latest_scene()
    return {
        "format": "hyperlex-session",
        "schema_version": SCHEMA_VERSION,
        "session": record.info.as_dict(),
        "turns": record.turns,
        "scene": None if scene is None else json.loads(scene),
        "scene_version": record.scene_version,
    }


def export_json(record: SessionRecord) -> str:
    return json.dumps(export_document(record), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def export_markdown(record: SessionRecord) -> str:
    info = record.info
    lines = [f"# Session {info.name}", ""]
    lines.append(f"- created: {info.created_at}")
    lines.append(f"- updated: {info.updated_at}")
    lines.append(f"- turns: {info.turns}")
    if info.persona:
        lines.append(f"- pinned persona: {info.persona}")
    if info.mood:
        lines.append(f"- mood: {info.mood}")
    lines.append("")
    for turn in record.turns:
        reason = turn["reason"] or "no reason recorded"
        lines.append(f"### {turn['index']} · {turn['persona']} — routed: {reason}")
        lines.append("")
        lines.extend(f"> {line}".rstrip() for line in (turn["user"] or "").splitlines() or [""])
        lines.append("")
        lines.append(turn["reply"] or "*(no reply)*")
        lines.append("")
    scene = record.latest_scene()
    if scene is not None:
        lines.append(f"## Scene (version {record.scene_version})")
        lines.append("")
        lines.append("```json")
        lines.append(json.dumps(json.loads(scene), sort_keys=True, indent=2, ensure_ascii=False))
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------------

_INFO_SELECT = """
    SELECT s.name, s.created_at, s.updated_at,
           (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id),
           (SELECT t.persona FROM turns t WHERE t.session_id = s.id ORDER BY t.idx DESC LIMIT 1),
           s.persona, s.mood, s.meta, s.tenant
    FROM sessions s
"""
_TURN_COLUMNS = (
    "idx, persona, reason, user, reply, finish_reason, prompt_tokens, completion_tokens, "
    "seconds, route, mood, annotations, created_at"
)


def _info_from_row(row: tuple[Any, ...]) -> SessionInfo:
    name, created, updated, count, last, persona, mood, meta, tenant = row
    return SessionInfo(
        name=name,
        created_at=created,
        updated_at=updated,
        turns=int(count),
        last_persona=last,
        persona=persona,
        mood=mood,
        meta=json.loads(meta or "{}"),
        tenant=tenant,
    )


def _turn_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    (idx, persona, reason, user, reply, finish, prompt, completion, seconds, route, mood,
     annotations, created) = row
    return {
        "index": int(idx),
        "persona": persona,
        "reason": reason,
        "user": user,
        "reply": reply,
        "finish_reason": finish,
        "usage": {"prompt_tokens": int(prompt), "completion_tokens": int(completion)},
        "seconds": float(seconds),
        "annotations": json.loads(annotations or "{}"),
        "route": None if route is None else json.loads(route),
        "mood": mood,
        "created_at": created,
    }


def _enable_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL mode (persistent: a no-op once the file is in WAL mode).

    The switch needs an exclusive lock and SQLite does not call the busy handler for it, so
    when several processes open a new database at once, some get "database is locked" at
    once: retry until the busy timeout has passed.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (migrations hold no ';' inside literals)."""
    return [s.strip() for s in sql.split(";") if s.strip()]


def _unknown(name: str, names: list[str]) -> HyperlexError:
    if not names:
        return HyperlexError(f"unknown session {name!r}; there are no sessions yet")
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "agent sessions list shows them all"
    return HyperlexError(f"unknown session {name!r}; {hint}")
