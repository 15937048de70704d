"""OpenAI's /v1/batches: create (from an uploaded file of requests), retrieve, list, cancel. The work itself is
the BatchRunner's (runtime/ingress/api/batch_runner.py)."""

from __future__ import annotations

import asyncio
import time

import msgspec
from msgspec import Struct

from httpd import HttpError, Request, Response, json_response, path_segment
from runtime.ingress.api.batch_runner import BATCH_ENDPOINTS, BatchRunner
from runtime.ingress.api.files import int_param, query_params
from runtime.ingress.api.protocol import decode_body
from runtime.ingress.store.batches import BatchRecord, new_batch_id

COMPLETION_WINDOWS = {"24h": 24 * 3600}
LIST_LIMIT_MAX = 100  # OpenAI's
METADATA_MAX_KEYS = 16


class CreateBatchBody(Struct):
    input_file_id: str | None = None
    endpoint: str | None = None
    completion_window: str | None = None
    metadata: dict[str, str] | None = None


class BatchesApi:
    def __init__(self, runner: BatchRunner):
        self.runner = runner

    async def create(self, request: Request) -> Response:
        body: CreateBatchBody = decode_body(request.body, CreateBatchBody)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if getattr(body, name) is None:
                raise HttpError(400, f"{name}: required", name)
        if body.endpoint not in BATCH_ENDPOINTS:
            raise HttpError(400, f"endpoint: must be one of {', '.join(BATCH_ENDPOINTS)}, got {body.endpoint!r}",
                            "endpoint")
        if body.completion_window not in COMPLETION_WINDOWS:
            raise HttpError(400, f"completion_window: must be one of {', '.join(COMPLETION_WINDOWS)}, got "
                                 f"{body.completion_window!r}", "completion_window")
        if body.metadata is not None and len(body.metadata) > METADATA_MAX_KEYS:
            raise HttpError(400, f"metadata: at most {METADATA_MAX_KEYS} keys", "metadata")
        input_file = await asyncio.to_thread(self.runner.files.get, body.input_file_id)
        if input_file is None:
            raise HttpError(400, f"input_file_id: no file with id {body.input_file_id!r}", "input_file_id")
        if input_file.purpose != "batch":
            raise HttpError(400, f"input_file_id: the file's purpose is {input_file.purpose!r}, not 'batch'",
                            "input_file_id")
        now = int(time.time())
        record = BatchRecord(id=new_batch_id(), endpoint=body.endpoint, input_file_id=body.input_file_id,
                             completion_window=body.completion_window, created_at=now,
                             expires_at=now + COMPLETION_WINDOWS[body.completion_window], metadata=body.metadata)
        await asyncio.to_thread(self.runner.batches.create, record, self.runner.owner)
        self.runner.submit(record.id)
        return _batch_response(record)

    def retrieve(self, request: Request) -> Response:
        return _batch_response(self._record(path_segment(request, 3)))

    async def list(self, request: Request) -> Response:
        query = query_params(request)
        limit = int_param(query, "limit", 20, 1, LIST_LIMIT_MAX)
        records, has_more = await asyncio.to_thread(self.runner.batches.list, limit, query.get("after"))
        data = [msgspec.to_builtins(r) for r in records]
        return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": has_more})

    def cancel(self, request: Request) -> Response:
        batch_id = path_segment(request, 3)
        record = self._record(batch_id)
        if record.status in ("cancelling", "cancelled"):
            return _batch_response(record)
        cancelled = self.runner.cancel(batch_id)
        if cancelled is None:
            raise HttpError(409, f"batch {batch_id} is {self._record(batch_id).status}: it can no longer be "
                                 "cancelled", "batch_id")
        return _batch_response(cancelled)

    def _record(self, batch_id: str) -> BatchRecord:
        record = self.runner.batches.get(batch_id)
        if record is None:
            raise HttpError(404, f"no batch with id {batch_id!r}", "batch_id")
        return record


def _batch_response(record: BatchRecord) -> Response:
    return json_response(msgspec.to_builtins(record))
