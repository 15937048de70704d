"""One HTTP/1.1 connection: an asyncio Protocol driving httptools' parser.

Requests are parsed as bytes arrive and queued; they are answered strictly one at a time, in
order (pipelining). A plain-function handler is answered inline, without a task; a coroutine
handler or a streaming body runs in one task per request, which is cancelled when the client
goes away (that is how a disconnect aborts a generation at once).

Limits: header bytes (431), body bytes (413, from Content-Length before reading, or counted for
chunked bodies, at once when the count passes the limit), an absolute deadline for the request
line and headers, a minimum average rate and a longest pause for the body (408), an idle
keep-alive deadline (silent close), a cap on queued pipelined requests (reading pauses), a write
timeout for clients that stop reading a response (cut off).
Deadlines are plain floats checked by the server's ticker, so requests cost no timer handles.
While the server drains (shutdown), every new request gets 503 and the connection closes after
each response.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import Protocol

import httptools

from httpd.config import ServerConfig
from httpd.dispatch import Dispatcher
from httpd.log_limit import LogLimiter
from httpd.request import Request
from httpd.response import Response, StreamingResponse, error_response

logger = logging.getLogger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer with an error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Fatal:
    """Queued after the last good request of a connection that must answer an error (status 0:
    nothing) and close."""

    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message


class ConnectionHost(Protocol):
    """What a connection needs of the server that accepted it (httpd.server.HttpServer)."""

    config: ServerConfig
    loop: asyncio.AbstractEventLoop
    dispatcher: Dispatcher
    connections: set[HttpConnection]
    draining: bool
    log_limiter: LogLimiter

    def plain_head(self, status: int, content_type: bytes | None, length: int) -> bytes: ...

    def head_prefix(self, status: int, content_type: bytes | None) -> bytes: ...


async def _awaited(result):
    """The handler's awaitable, or whatever else it returned (a bug, answered with a 500)."""
    return await result if inspect.isawaitable(result) else result


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: ConnectionHost):
        self.server = server
        self.config = server.config
        self.loop = server.loop
        self.dispatch = server.dispatcher
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.queue: deque[Request | _Fatal] = deque()
        self.busy = False  # a response is being produced
        self.task: asyncio.Task | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future | None = None
        self.out: list[bytes] = []  # streamed bytes not yet handed to the transport
        self.flush_scheduled = False
        self.deadline: float | None = None
        self.deadline_status = 0  # 408 when the deadline ends a partly read request; 0: close silently
        self.deadline_message = ""
        self.body_started = 0.0  # loop time the headers of the request being read were complete
        # The request being parsed.
        self.in_message = False
        self.in_headers = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.header_size = 0
        self.carried_header_bytes = 0
        self.content_length: int | None = None
        self.expect_continue = False
        self.continue_owed = False

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport
        if len(self.server.connections) >= self.config.max_connections:
            self.closed = True
            body = error_response(503, "too many connections; retry later").body
            transport.write(self._head(None, 503, b"application/json", len(body), (), close=True) + body)
            transport.close()
            return
        self.server.connections.add(self)
        self._set_deadline(self.config.keepalive_timeout, 0)

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        self.parser = None
        if self.task is not None:
            self.task.cancel()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: bytes):
        parser = self.parser
        if parser is None:
            return
        carried = self.in_headers  # headers of one request spread over several reads
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop_reading(_Fatal(0, ""))  # we do not switch protocols: answer what came, then close
        except httptools.HttpParserCallbackError as err:
            reject = err.__context__
            if isinstance(reject, _Reject):
                self._stop_reading(_Fatal(reject.status, reject.message))
            else:
                self.server.log_limiter.log(logger, logging.ERROR, "HTTP parser callback failed", exc_info=True)
                self._stop_reading(_Fatal(500, "internal error while reading the request"))
        except httptools.HttpParserError as err:
            self._stop_reading(_Fatal(400, f"malformed HTTP request: {err}"))
        else:
            if self.in_message and not self.busy:
                if not self.in_headers:
                    self._set_body_deadline()
                elif carried:
                    self.carried_header_bytes += len(data)
                    if self.carried_header_bytes > self.config.max_header_bytes:
                        self._stop_reading(_Fatal(431, self._header_limit_message()))
        if not self.busy:
            self._process_queue()

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self):
        self.in_message = True
        self.in_headers = True
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0
        self.header_size = 0
        self.carried_header_bytes = 0
        self.content_length = None
        self.expect_continue = False
        self._set_head_deadline()  # absolute: later bytes do not move it

    def on_url(self, url: bytes):
        self.url += url
        self.header_size += len(url)
        if self.header_size > self.config.max_header_bytes:
            raise _Reject(431, self._header_limit_message())

    def on_header(self, name: bytes, value: bytes):
        self.header_size += len(name) + len(value) + 4
        if self.header_size > self.config.max_header_bytes:
            raise _Reject(431, self._header_limit_message())
        name = name.lower()
        if name == b"content-length":
            self.content_length = int(value)  # llhttp has checked it is a number
        elif name == b"expect":
            self.expect_continue = value.strip().lower() == b"100-continue"
        self.headers.append((name, value))

    def on_headers_complete(self):
        self.in_headers = False
        self.body_started = self.loop.time()
        if self.content_length is not None and self.content_length > self.config.max_body_bytes:
            raise _Reject(413, self._body_limit_message())
        if self.expect_continue and self.content_length != 0:
            if self.busy or self.queue:
                self.continue_owed = True  # sent once the responses before this request are out
            else:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes):
        self.body_size += len(body)
        if self.body_size > self.config.max_body_bytes:
            raise _Reject(413, self._body_limit_message())
        self.body.append(body)

    def on_message_complete(self):
        self.in_message = False
        self.continue_owed = False
        url = self.url
        method = self.parser.get_method()
        if method == b"CONNECT":
            raise _Reject(405, "method CONNECT is not supported: this server is not a proxy")
        if url[:1] != b"/" and url != b"*":
            try:
                url = httptools.parse_url(url).path or b"/"  # absolute form, as sent to proxies
            except httptools.HttpParserInvalidURLError:
                raise _Reject(400, "malformed HTTP request: invalid request target") from None
        path, _, query = url.partition(b"?")
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.queue.append(Request(method.decode(), path.decode("latin-1"), query.decode("latin-1"),
                                  self.headers, body, self.parser.get_http_version(), self.parser.should_keep_alive()))
        self.deadline = None
        if len(self.queue) >= self.config.max_pipelined and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    # ---------------------------------------------------------------- answering

    def _process_queue(self, answered: bool = False):
        """Answer the queued requests in order: inline for a plain handler, else in a task (busy
        until it ends). Then, if a response went out (`answered`: one just did), start the clock
        of what comes next."""
        queue = self.queue
        while queue and not self.busy and not self.closed:
            request = queue.popleft()
            answered = True
            if self.reading_paused and self.parser is not None and len(queue) < self.config.max_pipelined // 2:
                self.reading_paused = False
                self.transport.resume_reading()
            if request.__class__ is _Fatal:
                if request.status:
                    self._write_response(None, error_response(request.status, request.message), close=True)
                self._close()
                return
            if self.server.draining:
                self._write_response(request, error_response(503, "the server is shutting down"), close=True)
                self._close()
                return
            self.busy = True
            result = self.dispatch(request)
            if isinstance(result, Response):
                close = not request.keep_alive or self.server.draining
                self._write_response(request, result, close=close)
                self.busy = False
                if close:
                    self._close()
            elif isinstance(result, StreamingResponse):
                self.task = self.loop.create_task(self._stream(request, result))
            else:
                self.task = self.loop.create_task(self._run(request, _awaited(result)))
        if answered and not self.busy and not self.closed:  # (reading alone must not move a deadline)
            if self.in_message:
                self._after_response()
            else:  # idle: the keep-alive clock starts
                self.deadline = self.loop.time() + self.config.keepalive_timeout
                self.deadline_status = 0

    async def _run(self, request: Request, coroutine):
        try:
            result = await coroutine
        except asyncio.CancelledError:
            return  # the client went away
        if not isinstance(result, (Response, StreamingResponse)):
            logger.error("handler for %s %s returned %r, not a response", request.method, request.path, result)
            result = error_response(500, "internal error: the handler returned no response")
        if isinstance(result, StreamingResponse):
            await self._stream(request, result)
            return
        if self.closed:
            return
        self._write_response(request, result, close=not request.keep_alive or self.server.draining)
        self._finish(request)

    async def _stream(self, request: Request, response: StreamingResponse):
        body = response.body
        chunked = request.http_version != "1.0"  # HTTP/1.0 has no chunks: the end is the close
        keep_alive = request.keep_alive and chunked and not self.server.draining
        try:
            if self.closed:
                return
            self._send(self._head(request, response.status, response.content_type, None, response.headers,
                                  close=not keep_alive, chunked=chunked))
            if request.method != "HEAD":
                async for piece in body:
                    if self.closed:
                        break
                    if piece:
                        self._send(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                        if self.write_paused:
                            await self._drain()
                            if self.closed:
                                break
                else:
                    if chunked and not self.closed:
                        self._send(_LAST_CHUNK)
        except asyncio.CancelledError:
            keep_alive = False  # the client went away
        except Exception:
            # Headers are out: the only honest signal left is an unterminated body.
            logger.exception("streaming body of %s %s failed", request.method, request.path)
            keep_alive = False
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        self._flush()
        if not keep_alive:
            self._close()
        self._finish(request)

    def _send(self, data: bytes):
        """Queue streamed bytes; they leave at the end of this loop iteration, so pieces produced
        in one go (headers and the first event, the last event and the end) take one syscall,
        and nothing waits for more data."""
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self):
        self.flush_scheduled = False
        if self.out:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out.clear()
            if not self.closed:
                self.transport.write(data)

    def _finish(self, request: Request):
        """After an asynchronous response: move on to the next queued request."""
        self.task = None
        self.busy = False
        if not request.keep_alive or self.server.draining:
            self._close()
        if not self.closed:
            self._process_queue(answered=True)

    def _after_response(self):
        """Idle again: owe a 100 Continue to the request being read, or start the idle clock."""
        if self.in_message:
            if self.continue_owed and not self.in_headers:
                self.continue_owed = False
                self.transport.write(_CONTINUE)
            if self.in_headers:
                self._set_head_deadline()  # the clock ran only while we were answering
            else:
                self.body_started = self.loop.time()
                self._set_body_deadline()
        else:
            self._set_deadline(self.config.keepalive_timeout, 0)

    async def _drain(self):
        """Wait until the transport's buffer drains; a client that stops reading for
        write_timeout is cut off (its request is then aborted like any disconnect)."""
        self.drain_waiter = self.loop.create_future()
        try:
            await asyncio.wait_for(self.drain_waiter, self.config.write_timeout)
        except asyncio.TimeoutError:
            self.server.log_limiter.log(logger, logging.INFO, "closing a connection whose client stopped reading "
                                        "for %g s", self.config.write_timeout)
            self.closed = True
            self.transport.abort()
        finally:
            self.drain_waiter = None

    def _write_response(self, request: Request | None, response: Response, close: bool):
        body = response.body
        if (not close and request is not None and not response.headers and request.http_version == "1.1"
                and request.method != "HEAD" and response.status not in _NO_BODY_STATUSES
                and (not self.config.allowed_origins or request.header(b"origin") is None)):
            # The common case (keep-alive, no extra headers): the whole head comes from a cache.
            head = self.server.plain_head(response.status, response.content_type, len(body))
        else:
            no_body = response.status in _NO_BODY_STATUSES
            head = self._head(request, response.status, None if no_body else response.content_type,
                              None if no_body else len(body), response.headers, close)
            if no_body or (request is not None and request.method == "HEAD"):
                self.transport.write(head)
                return
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))

    def _head(self, request: Request | None, status: int, content_type: bytes | None, length: int | None,
              headers, close: bool, chunked: bool = False) -> bytes:
        parts = [self.server.head_prefix(status, content_type)]
        if length is not None:
            parts += (b"Content-Length: ", b"%d" % length, b"\r\n")
        elif chunked:
            parts.append(_CHUNKED)
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if request is not None and self.config.allowed_origins:
            allowed = self.dispatch.allowed_origin(request)
            if allowed is not None:
                parts += (b"Access-Control-Allow-Origin: ", allowed, b"\r\nVary: Origin\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        elif request is not None and request.http_version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # ---------------------------------------------------------------- limits and closing

    def _set_deadline(self, seconds: float, status: int, message: str = ""):
        self.deadline = self.loop.time() + seconds
        self.deadline_status = status
        self.deadline_message = message

    def _set_head_deadline(self):
        self._set_deadline(self.config.header_timeout, 408,
                           f"request line and headers not received within {self.config.header_timeout:g} s")

    def _set_body_deadline(self):
        """The earlier of: the body falling behind the minimum rate (after the grace period), and a pause
        longer than read_timeout."""
        config = self.config
        now = self.loop.time()
        by_rate = self.body_started + config.body_grace + self.body_size / config.body_min_rate
        by_pause = now + config.read_timeout
        if by_rate < by_pause:
            self.deadline = by_rate
            self.deadline_message = (f"request body arriving slower than {config.body_min_rate / 1024:g} KiB/s "
                                     f"(after the first {config.body_grace:g} s)")
        else:
            self.deadline = by_pause
            self.deadline_message = f"request body paused for more than {config.read_timeout:g} s"
        self.deadline_status = 408

    def check_deadline(self, now: float):
        """Called by the server's ticker."""
        if self.deadline is None or now < self.deadline or self.busy or self.closed:
            return
        if self.deadline_status and self.in_message:
            self._write_response(None, error_response(self.deadline_status, self.deadline_message), close=True)
        self._close()

    def _stop_reading(self, fatal: _Fatal):
        """The byte stream is unusable from here: answer the queued requests, then `fatal`, then close."""
        self.parser = None
        self.in_message = False
        self.queue.append(fatal)
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _close(self):
        if not self.closed:
            self.closed = True
            self.deadline = None
            self.transport.close()

    def close_if_idle(self) -> bool:
        """For shutdown: close now unless a response is in progress."""
        if self.busy or self.closed:
            return False
        self._close()
        return True

    def _header_limit_message(self) -> str:
        return f"request headers exceed {self.config.max_header_bytes} bytes"

    def _body_limit_message(self) -> str:
        return f"request body exceeds {self.config.max_body_bytes} bytes"
