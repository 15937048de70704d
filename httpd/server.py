"""The listening server: the live connections, and one ticker that checks
every connection's deadline and refreshes the cached Date header.

Shutdown in two steps: drain() keeps listening but answers every new request with 503 and
`Connection: close` (a load balancer sees a clear refusal, not a refused connection), while
responses in progress finish; close(grace_s) then stops listening and cuts what is left."""

from __future__ import annotations

import asyncio
import socket
import time
from email.utils import formatdate

from httpd.config import ServerConfig
from httpd.connection import HttpConnection
from httpd.dispatch import Dispatcher
from httpd.log_limit import LogLimiter
from httpd.response import status_line
from httpd.router import Router

_PLAIN_HEADS_CACHED = 256  # response heads kept per second (keyed by status, content type, length)


class HttpServer:
    def __init__(self, router: Router, config: ServerConfig = ServerConfig()):
        self.config = config
        self.log_limiter = LogLimiter()
        self.dispatcher = Dispatcher(router, config, self.log_limiter)
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.date_header = b""
        self._date_second = -1
        self._head_prefixes: dict[tuple[int, bytes | None], bytes] = {}
        self._plain_heads: dict[tuple[int, bytes | None, int], bytes] = {}
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.TimerHandle | None = None
        # Deadlines are checked this often: a fraction of the shortest timeout, within [20 ms, 1 s].
        shortest = min(config.header_timeout, config.read_timeout, config.keepalive_timeout)
        self._tick_s = min(1.0, max(0.02, shortest / 4))

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port (port 0: any free port; see .port), or on an already bound socket."""
        self.loop = asyncio.get_running_loop()
        self._refresh_date()
        factory = lambda: HttpConnection(self)  # noqa: E731
        if sock is not None:
            self._server = await self.loop.create_server(factory, sock=sock, backlog=self.config.backlog)
        else:
            self._server = await self.loop.create_server(factory, host, port, backlog=self.config.backlog,
                                                         reuse_address=True)
        self._ticker = self.loop.call_later(self._tick_s, self._tick)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    def drain(self) -> None:
        """Refuse new requests (503, then close) and close idle connections; responses in progress go on."""
        self.draining = True
        for connection in list(self.connections):
            connection.close_if_idle()

    @property
    def busy_connections(self) -> int:
        return sum(1 for connection in self.connections if connection.busy)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting; close idle connections; give responses in progress up to grace_s."""
        if self._server is None:
            return
        self._server.close()
        if self._ticker is not None:
            self._ticker.cancel()
        deadline = self.loop.time() + grace_s
        while True:
            for connection in list(self.connections):
                connection.close_if_idle()
            if not self.connections or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            if connection.task is not None:
                connection.task.cancel()
            if connection.transport is not None:
                connection.transport.abort()
        await self._server.wait_closed()
        self._server = None

    def _tick(self) -> None:
        now = self.loop.time()
        self._refresh_date()
        for connection in list(self.connections):
            connection.check_deadline(now)
        self._ticker = self.loop.call_later(self._tick_s, self._tick)

    def _refresh_date(self) -> None:
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self.date_header = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
            self._head_prefixes.clear()
            self._plain_heads.clear()

    def plain_head(self, status: int, content_type: bytes | None, length: int) -> bytes:
        """The whole head of a keep-alive HTTP/1.1 response without extra headers, cached (for
        bodies of a few distinct lengths) until the Date changes."""
        key = (status, content_type, length)
        head = self._plain_heads.get(key)
        if head is None:
            head = self.head_prefix(status, content_type) + b"Content-Length: %d\r\n\r\n" % length
            if len(self._plain_heads) < _PLAIN_HEADS_CACHED:
                self._plain_heads[key] = head
        return head

    def head_prefix(self, status: int, content_type: bytes | None) -> bytes:
        """Status line, Date and Content-Type of a response, cached until the Date changes."""
        key = (status, content_type)
        prefix = self._head_prefixes.get(key)
        if prefix is None:
            prefix = status_line(status) + self.date_header
            if content_type is not None:
                prefix += b"Content-Type: " + content_type + b"\r\n"
            self._head_prefixes[key] = prefix
        return prefix
