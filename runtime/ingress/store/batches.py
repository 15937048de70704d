"""Batches of /v1/batches: the batch object (OpenAI's shape) and one row per finished request.

A request's result is committed the moment it finishes, together with the batch's counts, so after a crash the
batch resumes with exactly the lines that have no result yet: nothing finished runs twice, nothing is lost.
`owner` names the server process running the batch (host:pid:start time); a batch whose owner is gone is
resumed by the next server that opens the store (BatchRunner.resume_orphans)."""

from __future__ import annotations

import secrets
import time

import msgspec

from runtime.ingress.store.database import Store

COMPONENT = "batches"
SCHEMA = [
    "CREATE TABLE batches (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, owner TEXT, "
    "object TEXT NOT NULL)",
    "CREATE INDEX batches_by_age ON batches (created_at, id)",
    "CREATE INDEX batches_by_status ON batches (status)",
    "CREATE TABLE batch_results (batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE, "
    "line INTEGER NOT NULL, ok INTEGER NOT NULL, result BLOB NOT NULL, PRIMARY KEY (batch_id, line))",
]
# Statuses in which a batch still needs a server to work on it.
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


class RequestCounts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct):
    data: list[BatchError]
    object: str = "list"


class BatchRecord(msgspec.Struct, kw_only=True):
    """OpenAI's Batch object, field for field."""

    id: str
    object: str = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(BatchRecord).decode


class BatchStore:
    def __init__(self, store: Store):
        self.store = store
        store.migrate(COMPONENT, SCHEMA)

    def create(self, record: BatchRecord, owner: str) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO batches (id, created_at, status, owner, object) VALUES (?, ?, ?, ?, ?)",
                       (record.id, record.created_at, record.status, owner, _encode(record)))

    def get(self, batch_id: str) -> BatchRecord | None:
        rows = self.store.query("SELECT object FROM batches WHERE id = ?", (batch_id,))
        return _decode(rows[0][0]) if rows else None

    def save(self, record: BatchRecord) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE batches SET status = ?, object = ? WHERE id = ?",
                       (record.status, _encode(record), record.id))

    def set_status(self, batch_id: str, status: str, only_from: tuple[str, ...] | None = None,
                   **fields) -> BatchRecord | None:
        """Move the batch to `status`, stamping `<status>_at` (when the object has it) and setting `fields`; with
        `only_from`, only from one of those statuses (else None, nothing changed)."""
        with self.store.transaction() as db:
            record = _decode(db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            if only_from is not None and record.status not in only_from:
                return None
            record = msgspec.structs.replace(record, status=status, **fields)
            stamp = f"{status}_at"
            if stamp in BatchRecord.__struct_fields__ and getattr(record, stamp) is None:
                record = msgspec.structs.replace(record, **{stamp: int(time.time())})
            db.execute("UPDATE batches SET status = ?, object = ? WHERE id = ?", (status, _encode(record), batch_id))
        return record

    def list(self, limit: int, after: str | None) -> tuple[list[BatchRecord], bool]:
        """Newest first, starting after the batch `after`; and whether more follow."""
        params: list = []
        where = ""
        if after is not None:
            anchor = self.store.query("SELECT created_at, id FROM batches WHERE id = ?", (after,))
            if anchor:
                where = "WHERE (created_at, id) < (?, ?)"
                params = [anchor[0][0], anchor[0][1]]
        rows = self.store.query(f"SELECT object FROM batches {where} ORDER BY created_at DESC, id DESC LIMIT ?",
                                (*params, limit + 1))
        return [_decode(row[0]) for row in rows[:limit]], len(rows) > limit

    # ---------------------------------------------------------------- results

    def record_result(self, batch_id: str, line: int, ok: bool, result: bytes) -> bool:
        """Commit one request's result line and count it; False if that line already had one."""
        with self.store.transaction() as db:
            inserted = db.execute("INSERT OR IGNORE INTO batch_results (batch_id, line, ok, result) "
                                  "VALUES (?, ?, ?, ?)", (batch_id, line, int(ok), result)).rowcount
            if inserted:
                record = _decode(db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
                counts = record.request_counts
                if ok:
                    counts.completed += 1
                else:
                    counts.failed += 1
                db.execute("UPDATE batches SET object = ? WHERE id = ?", (_encode(record), batch_id))
        return bool(inserted)

    def finished_lines(self, batch_id: str) -> set[int]:
        return {row[0] for row in self.store.query("SELECT line FROM batch_results WHERE batch_id = ?", (batch_id,))}

    def results(self, batch_id: str, ok: bool, after_line: int = -1, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Result lines of successes (ok) or failures, in input order, a page at a time."""
        rows = self.store.query("SELECT line, result FROM batch_results WHERE batch_id = ? AND ok = ? AND line > ? "
                                "ORDER BY line LIMIT ?", (batch_id, int(ok), after_line, limit))
        return [(row[0], bytes(row[1])) for row in rows]

    # ---------------------------------------------------------------- ownership

    def unfinished(self) -> list[tuple[str, str | None]]:
        """(batch id, owner) of every batch that still needs work."""
        marks = ", ".join("?" for _ in UNFINISHED)
        return [(row[0], row[1]) for row in self.store.query(
            f"SELECT id, owner FROM batches WHERE status IN ({marks}) ORDER BY created_at, id", UNFINISHED)]

    def claim(self, batch_id: str, previous_owner: str | None, owner: str) -> bool:
        """Take over a batch from `previous_owner` (gone); False if someone else took it first."""
        with self.store.transaction() as db:
            return db.execute("UPDATE batches SET owner = ? WHERE id = ? AND owner IS ?",
                              (owner, batch_id, previous_owner)).rowcount == 1
