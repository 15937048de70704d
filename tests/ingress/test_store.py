"""The durable store base: WAL database, named migrations, transactions, blobs; survives reopening."""

import sqlite3
import subprocess
import sys

import pytest

from runtime.ingress.store import Store, StoreError, default_storage_dir

STEPS = ["CREATE TABLE things (id TEXT PRIMARY KEY, n INTEGER NOT NULL)",
         "ALTER TABLE things ADD COLUMN note TEXT"]


def test_open_is_wal_and_migrations_run_once(tmp_path):
    store = Store.open(tmp_path)
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    store.migrate("things", STEPS[:1])
    store.migrate("things", STEPS[:1])  # already there: nothing runs (a second CREATE would fail)
    store.migrate("things", STEPS)
    store.execute("INSERT INTO things (id, n, note) VALUES (?, ?, ?)", ("a", 1, "x"))
    assert store.query("SELECT version FROM schema_versions WHERE component = 'things'")[0]["version"] == 2
    store.close()
    with pytest.raises(StoreError, match="newer than this server"):
        Store.open(tmp_path).migrate("things", STEPS[:1])


def test_transaction_rolls_back_on_error(tmp_path):
    store = Store.open(tmp_path)
    store.migrate("things", STEPS[:1])
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction() as db:
            db.execute("INSERT INTO things VALUES ('a', 1)")
            db.execute("INSERT INTO things VALUES ('a', 2)")
    assert store.query("SELECT * FROM things") == []


def test_commit_survives_sigkill_of_the_writer(tmp_path):
    code = ("import os, signal, sys; from runtime.ingress.store import Store\n"
            f"s = Store.open({str(tmp_path)!r}); s.migrate('things', {STEPS[:1]!r})\n"
            "with s.transaction() as db: db.execute(\"INSERT INTO things VALUES ('kept', 1)\")\n"
            "s._db.execute('BEGIN IMMEDIATE'); s._db.execute(\"INSERT INTO things VALUES ('lost', 2)\")\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    assert [r["id"] for r in Store.open(tmp_path).query("SELECT id FROM things")] == ["kept"]


def test_blob_paths_are_confined(tmp_path):
    store = Store.open(tmp_path)
    path = store.blob_path("files", "file-abc")
    assert path.parent.is_dir() and path.parent.parent == tmp_path / "blobs"
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(ValueError):
            store.blob_path("files", bad)


def test_default_dir_is_in_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_storage_dir() == tmp_path / "runtime" / "store"


def test_unusable_dir_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="--storage-dir"):
        Store.open(tmp_path / "file")
