"""The durable store: state that outlives a request and a restart (files, batches, responses).

One SQLite database in WAL mode plus a folder of blobs, both under `--storage-dir`:

    store = Store.open(storage_dir)                    # creates the folder and the database
    store.migrate("files", ["CREATE TABLE ...", ...])  # a component's schema, step by step
    with store.transaction() as db:                    # BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error)
        db.execute("INSERT ...", (...))
    rows = store.query("SELECT ...", (...))            # list of sqlite3.Row (by name or index)
    path = store.blob_path("files", file_id)           # where a component keeps a body on disk

Every component (files, batches, /v1/responses) owns its tables and migrates them by name, so
components evolve independently in one database file."""

from runtime.ingress.store.database import Store, StoreError, default_storage_dir

__all__ = ["Store", "StoreError", "default_storage_dir"]
