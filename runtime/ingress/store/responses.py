"""Responses of /v1/responses kept for retrieval and `previous_response_id` chaining: a row per
response with the response object as served and the conversation it continued (the messages that
were rendered, instructions excepted, since OpenAI does not carry them over to the next turn)."""

from __future__ import annotations

import msgspec

from runtime.ingress.store.database import Store

COMPONENT = "responses"
SCHEMA = [
    "CREATE TABLE responses (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, body TEXT NOT NULL, "
    "conversation TEXT NOT NULL)",
]


class StoredResponse(msgspec.Struct):
    id: str
    created_at: int
    body: dict  # the response object, as GET /v1/responses/{id} answers it
    conversation: list[dict]  # chat messages (role, content) before the response's output


class ResponseStore:
    def __init__(self, store: Store):
        self.store = store
        store.migrate(COMPONENT, SCHEMA)

    def put(self, record: StoredResponse) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO responses (id, created_at, body, conversation) VALUES (?, ?, ?, ?)",
                       (record.id, record.created_at, msgspec.json.encode(record.body).decode(),
                        msgspec.json.encode(record.conversation).decode()))

    def get(self, response_id: str) -> StoredResponse | None:
        rows = self.store.query("SELECT id, created_at, body, conversation FROM responses WHERE id = ?",
                                (response_id,))
        if not rows:
            return None
        row = rows[0]
        return StoredResponse(row["id"], row["created_at"], msgspec.json.decode(row["body"]),
                              msgspec.json.decode(row["conversation"]))

    def delete(self, response_id: str) -> bool:
        with self.store.transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
