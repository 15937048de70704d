"""Store: one SQLite connection (WAL, foreign keys, a busy timeout) shared by the ingress's threads,
named per-component schema migrations, and a blob folder for bodies too large for a row."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

DATABASE_FILE = "store.sqlite3"
BLOB_DIR = "blobs"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class StoreError(RuntimeError):
    """The store cannot be opened or used (bad folder, a newer schema than this code knows, ...)."""


def default_storage_dir() -> Path:
    """$XDG_CACHE_HOME/runtime/store, else ~/.cache/runtime/store (the user's cache directory)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "runtime" / "store"


class Store:
    """The database and blob folder under one storage directory. Thread-safe: calls are serialised
    by a lock (SQLite calls here are short; large bodies go to blobs, written outside the lock)."""

    def __init__(self, root: Path, connection: sqlite3.Connection):
        self.root = root
        self._db = connection
        self._lock = threading.RLock()

    @classmethod
    def open(cls, storage_dir: str | os.PathLike | None = None) -> Store:
        root = Path(storage_dir) if storage_dir else default_storage_dir()
        try:
            (root / BLOB_DIR).mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(root / DATABASE_FILE, timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(f"--storage-dir {root}: cannot open the store: {err}") from None
        connection.row_factory = sqlite3.Row
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"--storage-dir {root}: the file system does not support SQLite's WAL mode")
        # NORMAL in WAL mode: a committed transaction survives a process crash (SIGKILL); only a power
        # loss may lose the last commits, never corrupt the database.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, "
                           "version INTEGER NOT NULL)")
        return cls(root, connection)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- schema

    def migrate(self, component: str, steps: Sequence[str]) -> None:
        """Bring `component`'s tables to len(steps): run the SQL steps it has not run yet, each once,
        in order, in one transaction. Steps are append-only: never edit a step that has shipped."""
        _check_name(component)
        with self.transaction() as db:
            row = db.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
            done = row[0] if row else 0
            if done > len(steps):
                raise StoreError(f"{self.root}: the '{component}' tables are at version {done}, newer than this "
                                 f"server's {len(steps)}; use a newer server or another --storage-dir")
            for step in steps[done:]:
                db.execute(step)
            db.execute("INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                       "ON CONFLICT(component) DO UPDATE SET version = excluded.version", (component, len(steps)))

    # ---------------------------------------------------------------- queries

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock up front: no deadlock between two writers upgrading), COMMIT
        when the block ends, ROLLBACK if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: Sequence | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence | dict = ()) -> int:
        """One write statement in its own transaction; returns the number of rows it changed."""
        with self._lock:
            return self._db.execute(sql, params).rowcount

    # ---------------------------------------------------------------- blobs

    def blob_path(self, component: str, name: str) -> Path:
        """Where `component` keeps the body called `name` (a file id, ...); its folder exists."""
        _check_name(component)
        _check_name(name)
        folder = self.root / BLOB_DIR / component
        folder.mkdir(exist_ok=True)
        return folder / name


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"store names are 1-128 characters of [A-Za-z0-9_.-], got {name!r}")
