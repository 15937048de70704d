"""BatchRunner: runs /v1/batches jobs inside the ingress, through the same handlers and scheduler as interactive
requests, at BATCH_PRIORITY (below them).

One batch: read the input file, validate every line (a malformed one becomes a result in the error file, not a
failed batch), then run the lines that have no result yet, `window` at a time across all batches, committing each
result the moment it finishes (runtime/ingress/store/batches.py). Finalising writes the output file (successes)
and the error file (failures) in input order, under ids reserved in the batch row first, so a finalisation cut
short by a crash rewrites the same files.

Restarts: a batch is owned by the server process that runs it. Every server scans the store at start and every
ORPHAN_SCAN_S for unfinished batches whose owner is gone (SIGKILL, a crash, a shutdown mid-batch) and takes them
over; they resume without rerunning the lines that finished. Cancelling is seen by the owner within
CANCEL_POLL_S, whichever server received it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator

import msgspec
import psutil

from httpd import HttpError, Request, Response, error_response
from runtime.ingress.api.embeddings import EmbeddingsApi
from runtime.ingress.api.openai import OpenAIApi
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.ingress.store import Store
from runtime.ingress.store.batches import BatchError, BatchErrors, BatchRecord, BatchStore, RequestCounts
from runtime.ingress.store.files import FileStore, new_file_id
from runtime.messages import BATCH_PRIORITY

log = logging.getLogger(__name__)

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ORPHAN_SCAN_S = 10.0
CANCEL_POLL_S = 1.0
RETRIES = 3  # a line the engine could not serve for a passing reason (429, 503, an abort) is tried this often
RETRY_DELAY_S = 1.0
RESULT_PAGE = 1000

Handler = Callable[[Request], Awaitable[Response]]


class BatchLine(msgspec.Struct):
    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


class LineJob(msgspec.Struct):
    line: int
    custom_id: str
    body: bytes


class LineError(msgspec.Struct):
    line: int
    custom_id: str | None
    code: str
    message: str


class PriorityFrontend:
    """The Frontend as the batch runner's API handlers see it: every generation request at `priority`."""

    def __init__(self, frontend: Frontend, priority: int):
        self._frontend = frontend
        self._priority = priority

    def __getattr__(self, name: str):
        return getattr(self._frontend, name)

    def generate(self, rid, input_ids, sampling, logprobs, stream, deadline=None, group=None, images=None):
        return self._frontend.generate(rid, input_ids, sampling, logprobs, stream, deadline, group,
                                       priority=self._priority, images=images)


def process_owner() -> str:
    process = psutil.Process()
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.3f}"


def owner_alive(owner: str | None) -> bool:
    """Whether the server process named by `owner` still runs (one on another host is assumed to)."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return True
    pid, _, started = rest.partition(":")
    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" == started
    except (psutil.NoSuchProcess, ValueError):
        return False


class BatchRunner:
    def __init__(self, frontend: Frontend, store: Store, max_requests: int, window: int):
        self.files = FileStore(store)
        self.batches = BatchStore(store)
        self.max_requests = max_requests
        self.owner = process_owner()
        low = PriorityFrontend(frontend, BATCH_PRIORITY)
        openai = OpenAIApi(low, None)
        embeddings = EmbeddingsApi(frontend, BATCH_PRIORITY)
        self.handlers: dict[str, Handler] = {"/v1/chat/completions": openai.chat_completions,
                                             "/v1/completions": openai.completions,
                                             "/v1/embeddings": embeddings.embeddings}
        self.window = window
        self._slots: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._scanner: asyncio.Task | None = None
        self.closing = False

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """On the event loop: take over orphaned batches now and every ORPHAN_SCAN_S."""
        self._slots = asyncio.Semaphore(self.window)
        swept = self.files.sweep_orphans()
        if swept:
            log.info("removed %d file bodies without a record (a crash while writing them)", swept)
        self._scanner = asyncio.create_task(self._scan_orphans())

    async def close(self) -> None:
        """Stop every batch where it is (unfinished lines stay unfinished: the next server resumes them)."""
        self.closing = True
        tasks = [t for t in [self._scanner, *self._tasks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, batch_id: str) -> None:
        if batch_id in self._tasks or self.closing:
            return
        task = asyncio.create_task(self._run(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    def cancel(self, batch_id: str) -> BatchRecord | None:
        """Start cancelling a validating or running batch; None when it is past that."""
        record = self.batches.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
        if record is None:
            return None
        task = self._tasks.get(batch_id)
        if task is not None:
            task.cancel()  # _run finalises it as cancelled
        return record

    async def _scan_orphans(self) -> None:
        while True:
            for batch_id, owner in await asyncio.to_thread(self.batches.unfinished):
                if batch_id in self._tasks or (owner != self.owner and owner_alive(owner)):
                    continue
                if owner == self.owner or self.batches.claim(batch_id, owner, self.owner):
                    if owner != self.owner:
                        log.info("batch %s: taking it over from %s, which is gone", batch_id, owner)
                    self.submit(batch_id)
            await asyncio.sleep(ORPHAN_SCAN_S)

    # ---------------------------------------------------------------- one batch

    async def _run(self, batch_id: str) -> None:
        watcher = asyncio.create_task(self._watch_cancel(batch_id, asyncio.current_task()))
        try:
            await self._work(batch_id)
        except asyncio.CancelledError:
            watcher.cancel()  # it must not cancel the finalisation too
            record = self.batches.get(batch_id)
            if self.closing or record is None or record.status != "cancelling":
                raise
            await self._finalize(record, "cancelled")
        except Exception as err:  # a bug or the store failing: the batch fails, the server goes on
            log.exception("batch %s failed", batch_id)
            self.batches.set_status(batch_id, "failed", errors=BatchErrors([BatchError("internal_error", str(err))]))
        finally:
            watcher.cancel()

    async def _watch_cancel(self, batch_id: str, task: asyncio.Task) -> None:
        """A cancel received by another server sharing the store reaches the batch through its status."""
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            record = await asyncio.to_thread(self.batches.get, batch_id)
            if record is not None and record.status == "cancelling":
                task.cancel()
                return

    async def _work(self, batch_id: str) -> None:
        record = self.batches.get(batch_id)
        if record.status in ("finalizing", "cancelling"):
            await self._finalize(record, "completed" if record.status == "finalizing" else "cancelled")
            return
        try:
            jobs = await asyncio.to_thread(self._read_input, record)
        except FileNotFoundError:
            self._fail(record, "file_not_found", f"the input file {record.input_file_id} no longer exists")
            return
        if record.status == "validating":
            if not jobs:
                self._fail(record, "empty_file", f"the input file {record.input_file_id} holds no request")
                return
            if len(jobs) > self.max_requests:
                self._fail(record, "too_many_requests", f"the input file holds {len(jobs)} requests; a batch may hold "
                                                        f"at most {self.max_requests} (--batch-max-requests)")
                return
            record = self.batches.set_status(batch_id, "in_progress", request_counts=RequestCounts(total=len(jobs)))
        done = await asyncio.to_thread(self.batches.finished_lines, batch_id)
        todo = iter([job for job in jobs if job.line not in done])
        handler = self.handlers[record.endpoint]
        workers = [asyncio.create_task(self._drain(batch_id, handler, todo)) for _ in range(self.window)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if self.closing:
            return
        await self._finalize(self.batches.set_status(batch_id, "finalizing"), "completed")

    def _fail(self, record: BatchRecord, code: str, message: str) -> None:
        log.info("batch %s failed: %s", record.id, message)
        self.batches.set_status(record.id, "failed", errors=BatchErrors([BatchError(code, message)]))

    def _read_input(self, record: BatchRecord) -> list[LineJob | LineError]:
        """Every non-empty line of the input file, as a job or (malformed, wrong url, duplicate custom_id) an
        error; lines are numbered from 0 in the file, blank lines skipped."""
        if self.files.get(record.input_file_id) is None:
            raise FileNotFoundError(record.input_file_id)
        raw = self.files.read(record.input_file_id)
        out: list[LineJob | LineError] = []
        seen: set[str] = set()
        for text in raw.splitlines():
            if not text.strip():
                continue
            out.append(_parse_line(len(out), text, record.endpoint, seen))
        return out

    async def _drain(self, batch_id: str, handler: Handler, todo: Iterator[LineJob | LineError]) -> None:
        for job in todo:
            if isinstance(job, LineError):
                self._record(batch_id, job.line, False, _error_line(job))
                continue
            async with self._slots:
                outcome = await self._run_line(handler, job)
            if outcome is not None:
                self._record(batch_id, job.line, *outcome)

    def _record(self, batch_id: str, line: int, ok: bool, result: bytes) -> None:
        self.batches.record_result(batch_id, line, ok, result)

    async def _run_line(self, handler: Handler, job: LineJob) -> tuple[bool, bytes] | None:
        """The line's result (ok, output line), or None when the server is stopping (the line stays unfinished)."""
        request_id = os.urandom(12).hex()
        for attempt in range(RETRIES):
            request = Request("POST", "", "", [(b"content-type", b"application/json")], job.body, "1.1", True)
            try:
                response = await handler(request)
                status, body = response.status, response.body
            except HttpError as err:
                status, body = err.status, error_response(err.status, err.message, err.param).body
            except RequestError as err:
                status, body = err.status, error_response(err.status, err.message).body
            except Exception as err:  # as the HTTP dispatcher answers a handler's bug
                log.exception("batch line %d failed", job.line)
                status, body = 500, error_response(500, f"internal error: {type(err).__name__}: {err}").body
            if self.closing:
                return None
            passing = status in (429, 503) or (status == 500 and b"aborted by the engine" in body)
            if not passing or attempt == RETRIES - 1:
                break
            await asyncio.sleep(RETRY_DELAY_S)
        line = (b'{"id":"batch_req_%s","custom_id":%s,"response":{"status_code":%d,"request_id":"%s","body":%s},'
                b'"error":null}' % (request_id.encode(), msgspec.json.encode(job.custom_id), status,
                                    request_id.encode(), body))
        return 200 <= status < 300, line

    async def _finalize(self, record: BatchRecord, final_status: str) -> None:
        """Write the output and error files (ids reserved in the batch row first), then the final status."""
        counts = record.request_counts
        output_id = record.output_file_id or (new_file_id() if counts.completed else None)
        error_id = record.error_file_id or (new_file_id() if counts.failed else None)
        status = "finalizing" if final_status == "completed" else "cancelling"
        record = self.batches.set_status(record.id, status, output_file_id=output_id, error_file_id=error_id)
        for file_id, ok, kind in ((output_id, True, "output"), (error_id, False, "error")):
            if file_id is not None:
                await asyncio.to_thread(self.files.create, f"{record.id}_{kind}.jsonl", "batch_output",
                                        self._result_chunks(record.id, ok), file_id)
        self.batches.set_status(record.id, final_status)
        log.info("batch %s %s: %d completed, %d failed of %d", record.id, final_status, counts.completed,
                 counts.failed, counts.total)

    def _result_chunks(self, batch_id: str, ok: bool) -> Iterator[bytes]:
        after = -1
        while True:
            page = self.batches.results(batch_id, ok, after, RESULT_PAGE)
            if not page:
                return
            yield b"".join(result + b"\n" for _, result in page)
            after = page[-1][0]


def _parse_line(line: int, text: bytes, endpoint: str, seen: set[str]) -> LineJob | LineError:
    try:
        parsed = msgspec.json.decode(text, type=BatchLine)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        custom_id = _custom_id(text)
        return LineError(line, custom_id, "invalid_request", f"line {line + 1}: {err}")
    if parsed.method.upper() != "POST":
        return LineError(line, parsed.custom_id, "invalid_request",
                         f"line {line + 1}: method must be POST, got {parsed.method!r}")
    if parsed.url != endpoint:
        return LineError(line, parsed.custom_id, "invalid_request",
                         f"line {line + 1}: url {parsed.url!r} differs from the batch's endpoint {endpoint}")
    if parsed.custom_id in seen:
        return LineError(line, parsed.custom_id, "duplicate_custom_id",
                         f"line {line + 1}: custom_id {parsed.custom_id!r} is used by an earlier line")
    seen.add(parsed.custom_id)
    body = bytes(parsed.body)
    if b'"stream"' in body:  # a batch answers whole responses: drop a stream flag
        try:
            fields = msgspec.json.decode(body)
        except msgspec.DecodeError:
            fields = None
        if isinstance(fields, dict):
            fields.pop("stream", None)
            fields.pop("stream_options", None)
            body = msgspec.json.encode(fields)
    return LineJob(line, parsed.custom_id, body)


def _custom_id(text: bytes) -> str | None:
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    custom_id = value.get("custom_id") if isinstance(value, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _error_line(error: LineError) -> bytes:
    return msgspec.json.encode({"id": f"batch_req_{os.urandom(12).hex()}", "custom_id": error.custom_id,
                                "response": None,
                                "error": {"code": error.code, "message": error.message, "line": error.line + 1}})
