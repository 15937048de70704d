"""Files of /v1/files: a row per file in the store's database, the body as a blob on disk.

A body is written to a temporary name, synced and renamed before its row is committed, so a row always names a
complete body; a crash between the two leaves a blob without a row, which `sweep_orphans` removes at start-up."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from runtime.ingress.store.database import Store

COMPONENT = "files"
SCHEMA = [
    "CREATE TABLE files (id TEXT PRIMARY KEY, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, "
    "filename TEXT NOT NULL, purpose TEXT NOT NULL)",
    "CREATE INDEX files_by_age ON files (created_at, id)",
]
TMP_SUFFIX = ".tmp"
ORPHAN_MIN_AGE_S = 3600.0


class FileRecord(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileStore:
    def __init__(self, store: Store):
        self.store = store
        store.migrate(COMPONENT, SCHEMA)

    def create(self, filename: str, purpose: str, chunks: Iterable[bytes], file_id: str | None = None) -> FileRecord:
        """Write a file from `chunks`; `file_id` given: (re)write that id (the batch runner's output files, whose
        ids are reserved before they are written, so a finalisation cut short rewrites the same file)."""
        file_id = file_id or new_file_id()
        path = self.path(file_id)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        size = 0
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        record = FileRecord(file_id, size, int(time.time()), filename, purpose)
        with self.store.transaction() as db:
            db.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET bytes = excluded.bytes", msgspec.structs.astuple(record))
        return record

    def get(self, file_id: str) -> FileRecord | None:
        rows = self.store.query("SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ?", (file_id,))
        return FileRecord(*rows[0]) if rows else None

    def list(self, purpose: str | None, limit: int, after: str | None, newest_first: bool) -> tuple[list[FileRecord],
                                                                                                      bool]:
        """A page of files in creation order (or its reverse), starting after the file `after`; and whether more
        follow."""
        clauses, params = [], []
        if purpose is not None:
            clauses.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            anchor = self.get(after)
            if anchor is not None:
                op = "<" if newest_first else ">"
                clauses.append(f"(created_at, id) {op} (?, ?)")
                params += [anchor.created_at, anchor.id]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        rows = self.store.query(f"SELECT id, bytes, created_at, filename, purpose FROM files {where} "
                                f"ORDER BY created_at {order}, id {order} LIMIT ?", (*params, limit + 1))
        return [FileRecord(*row) for row in rows[:limit]], len(rows) > limit

    def delete(self, file_id: str) -> bool:
        with self.store.transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:
            self.path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    def path(self, file_id: str) -> Path:
        return self.store.blob_path(COMPONENT, file_id)

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def sweep_orphans(self, min_age_s: float = ORPHAN_MIN_AGE_S) -> int:
        """Remove bodies that have no row (a crash between writing a body and committing its row), once they are
        `min_age_s` old: another server sharing the storage directory may be writing one right now."""
        folder = self.store.blob_path(COMPONENT, "x").parent
        known = {row[0] for row in self.store.query("SELECT id FROM files")}
        cutoff = time.time() - min_age_s
        removed = 0
        for entry in folder.iterdir():
            if entry.name not in known and entry.stat().st_mtime < cutoff:
                entry.unlink(missing_ok=True)
                removed += 1
        return removed
