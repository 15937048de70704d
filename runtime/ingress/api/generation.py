"""Running the sequences of one HTTP request through the Frontend.

One HTTP request may need several sequences (a batch of prompts, n > 1): each is one
Frontend.generate call with its own rid. A `Generation` drives them and folds each update into
its `Sequence`. Leaving early (client gone, an error) closes every generate iterator, which
aborts the requests in the scheduler."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from httpd import HttpError, StreamingResponse
from httpd.response import error_type
from httpd.sse import DONE, sse_event
from runtime.ingress.api.metrics import Metrics
from runtime.ingress.api.sequence import Job, Sequence
from runtime.ingress.errors import RequestError
from runtime.ingress.frontend import Frontend
from runtime.messages import TextUpdate

logger = logging.getLogger(__name__)

RETRY_AFTER_S = b"1"  # seconds, in the Retry-After of a 429
START_BATCH = 64  # sequences of one request started per event-loop turn


class Generation:
    """The sequences of one HTTP request, and their updates as they arrive.

    `updates()` gives the Frontend's own iterator for a single sequence (no extra layer on the
    per-token path) or a merge of several; `fold(update)` files an update under its sequence
    (by rid) and returns the sequence's index."""

    def __init__(self, frontend: Frontend, sequences: list[Sequence], metrics: Metrics | None):
        self.frontend = frontend
        self.sequences = sequences
        self.metrics = metrics
        self._index = {s.job.rid: i for i, s in enumerate(sequences)}
        self.unfinished = len(sequences)  # sequences whose last update has not been folded yet

    def updates(self, stream: bool) -> AsyncIterator[TextUpdate]:
        if len(self.sequences) == 1:
            job = self.sequences[0].job
            return self.frontend.generate(job.rid, job.input_ids, job.sampling, job.logprobs, stream, job.deadline,
                                          images=job.images)
        return self._merged(stream)

    def fold(self, update: TextUpdate) -> int:
        index = self._index[update.rid]
        sequence = self.sequences[index]
        now = time.perf_counter()
        first = sequence.first_token_time is None
        sequence.add(update, now)
        metrics = self.metrics
        if metrics is not None and first and sequence.first_token_time is not None:
            metrics.observe_first_token(now - sequence.arrival)
        if update.finish is not None:
            self.unfinished -= 1
            if metrics is not None:
                metrics.observe_finished(sequence)
        return index

    async def run_to_end(self) -> None:
        """Non-streamed: until every sequence has finished. Raises the first sequence's error (a
        RequestError), after aborting the others."""
        async with aclosing(self.updates(False)) as updates:
            async for update in updates:
                self.fold(update)

    async def _merged(self, stream: bool) -> AsyncIterator[TextUpdate]:
        queue: asyncio.Queue = asyncio.Queue()
        finished = object()

        async def pump(job: Job) -> None:
            try:
                async with aclosing(self.frontend.generate(job.rid, job.input_ids, job.sampling, job.logprobs,
                                                           stream, job.deadline, job.group,
                                                           images=job.images)) as updates:
                    async for update in updates:
                        queue.put_nowait(update)
            except Exception as err:
                queue.put_nowait(err)
            else:
                queue.put_nowait(finished)

        tasks = []
        try:
            for i, sequence in enumerate(self.sequences):
                tasks.append(asyncio.create_task(pump(sequence.job)))
                if i % START_BATCH == START_BATCH - 1:
                    await asyncio.sleep(0)  # let other requests in: a big fan-out must not hold the loop
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is finished:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def start_sse(generation: Generation, render: Callable[[int, TextUpdate], bytes],
                    epilogue: Callable[[], bytes], done: bytes = DONE,
                    error_event: Callable[[int, str], bytes] | None = None) -> StreamingResponse:
    """An SSE response for `generation`: render(index, update) gives the events of each update
    (bytes, maybe empty), epilogue() those after the last update, then `done` (`data: [DONE]`;
    APIs without such a line pass b""). Waits for the first update before answering, so a refusal
    still gets its HTTP status; later errors become error_event(status, message) (OpenAI's error
    event by default)."""
    body = _sse_body(generation, render, epilogue, done, error_event or stream_error)
    try:
        await anext(body)  # runs up to the first update (or the refusal)
    except RequestError as err:
        raise http_error(err) from None
    return StreamingResponse(body, headers=[(b"Cache-Control", b"no-cache")])


async def _sse_body(generation: Generation, render, epilogue, done: bytes, error_event) -> AsyncIterator[bytes]:
    async with aclosing(generation.updates(True)) as updates:
        try:
            first = await anext(updates)
        except StopAsyncIteration:
            first = None
        # Primed: the caller holds a started generator, so closing it (client gone before the
        # first byte went out) closes `updates`, which aborts the requests.
        yield b""
        fold = generation.fold
        last = b""  # the last update's events go out with the epilogue (or an error) and [DONE], in one write
        try:
            if first is not None:
                last = render(fold(first), first)
                if generation.unfinished:
                    yield last
                    last = b""
                    async for update in updates:
                        piece = render(fold(update), update)
                        if not generation.unfinished:
                            last = piece
                            break
                        yield piece
            last += epilogue()
        except (RequestError, HttpError) as err:
            last += error_event(err.status, err.message)
        except Exception as err:
            logger.exception("a streamed response failed")
            last += error_event(500, f"internal error: {type(err).__name__}: {err}")
        yield last + done


def http_error(err: RequestError) -> HttpError:
    """A Frontend refusal as the HTTP error to answer; an overloaded server (429) says when to retry."""
    headers = [(b"Retry-After", RETRY_AFTER_S)] if err.status == 429 else None
    return HttpError(err.status, err.message, err.param, headers=headers)


def stream_error(status: int, message: str) -> bytes:
    return sse_event({"error": {"message": message, "type": error_type(status), "param": None, "code": status}})


def abort_error(sequence: Sequence) -> HttpError | None:
    """The HTTP error of an abort that is the engine failing the request. An abort someone asked for
    (/abort_request) is no error: its caller gets the output so far with finish type "abort", as in SGLang."""
    finish = sequence.finish
    if finish is not None and finish.type == "abort" and finish.status_code is not None:
        return HttpError(finish.status_code, f"the request was aborted by the engine: "
                                             f"{finish.message or 'no reason given'}")
    return None
