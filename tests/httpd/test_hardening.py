"""The HTTP server against hostile clients (issue 11): trickled headers and bodies, oversized
chunked bodies, CONNECT, log flooding, cross-origin browsers (CORS off by default, JSON bodies
only), and draining for shutdown."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time

import pytest

from httpd import HttpServer, Response, Router, ServerConfig
from tests.fake_frontend import ServerThread
from tests.httpd.test_server import ResponseReader, closed_by_peer

CONFIG = ServerConfig(max_body_bytes=4096, header_timeout=1.0, body_grace=0.5, body_min_rate=2048,
                      read_timeout=5.0, keepalive_timeout=10.0, require_json_body=True)


def make_router() -> Router:
    router = Router()
    router.add("GET", "/health", lambda request: Response(200, b"", None))

    async def echo(request):
        return Response(200, request.body)

    async def slow(request):
        await asyncio.sleep(float(request.query.partition("=")[2]))
        return Response(200, b"done", b"text/plain")

    router.add("POST", "/echo", echo)
    router.add("GET", "/slow", slow)
    return router


@pytest.fixture(scope="module")
def server():
    with ServerThread(lambda: HttpServer(make_router(), CONFIG)) as running:
        yield running


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def trickle(sock: socket.socket, data: bytes, every_s: float, for_s: float) -> float:
    """Send `data` one byte every `every_s` until the server answers or `for_s` passed; the time it took."""
    start = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([sock], [], [], every_s)[0] or time.monotonic() - start > for_s:
            break
    return time.monotonic() - start


def test_trickled_headers_hit_an_absolute_deadline(server):
    """One byte every 0.2 s restarts no clock: 408 within header_timeout of the first byte."""
    with connect(server) as sock:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
        start = time.monotonic()
        sock.setblocking(True)
        trickle(sock, head, 0.2, for_s=4.0)
        replies = ResponseReader(sock).read(1, timeout=2)
        waited = time.monotonic() - start
    assert replies and replies[0].status == 408, "the trickling client still holds the connection"
    assert "headers not received within 1 s" in replies[0].json()["error"]["message"]
    assert waited < 3.0


def test_a_body_slower_than_the_minimum_rate_gets_408(server):
    """100 bytes/s is under the 2 KiB/s floor: cut after the grace period, although it never pauses long."""
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 4000\r\n\r\n")
        took = trickle(sock, b"x" * 4000, 0.01, for_s=4.0)
        replies = ResponseReader(sock).read(1, timeout=2)
    assert replies and replies[0].status == 408
    assert "slower than 2 KiB/s" in replies[0].json()["error"]["message"]
    assert took < 3.0


def test_a_fast_body_is_not_cut_by_the_rate_rule(server):
    body = b'"' + b"y" * 3000 + b'"'
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 1000):  # 1000 bytes every 0.2 s: 5 KB/s, over the floor
            sock.sendall(body[i:i + 1000])
            time.sleep(0.2)
        reply = ResponseReader(sock).read(1)[0]
    assert (reply.status, reply.body) == (200, body)


def test_a_chunked_body_past_the_limit_gets_413_while_the_client_is_still_sending(server):
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):  # 5 KiB in 1 KiB chunks; the body limit is 4 KiB; the body never ends
            sock.sendall(b"400\r\n" + b"z" * 1024 + b"\r\n")
        start = time.monotonic()
        replies = ResponseReader(sock).read(1, timeout=5)
        assert replies and replies[0].status == 413
        assert time.monotonic() - start < 1.0
        assert closed_by_peer(sock)


def test_connect_gets_405_without_a_traceback(server, caplog):
    caplog.set_level(logging.DEBUG)
    with connect(server) as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        reply = ResponseReader(sock).read(1)[0]
    assert reply.status == 405
    assert "CONNECT" in reply.json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_an_invalid_absolute_target_gets_400(server):
    with connect(server) as sock:
        sock.sendall(b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = ResponseReader(sock).read(1)[0]
    assert reply.status == 400


def test_clients_cannot_flood_the_log():
    from httpd.log_limit import LogLimiter

    limiter = LogLimiter(burst=3, period_s=60)
    logger = logging.getLogger("test.flood")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        for i in range(1000):
            limiter.log(logger, logging.ERROR, "client error %d", i)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 3


@pytest.mark.parametrize("content_type", [None, b"text/plain", b"application/x-www-form-urlencoded",
                                          b"multipart/form-data; boundary=x"])
def test_post_bodies_that_are_not_json_get_415(server, content_type):
    """A browser posts these cross-origin without a preflight: they must never run."""
    header = b"" if content_type is None else b"Content-Type: " + content_type + b"\r\n"
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + header + b'Content-Length: 2\r\n\r\n{}')
        reply = ResponseReader(sock).read(1)[0]
    assert reply.status == 415
    assert reply.json()["error"]["param"] == "Content-Type"
    assert "application/json" in reply.json()["error"]["message"]


def test_json_bodies_with_parameters_and_empty_posts_are_accepted(server):
    for head, body in ((b"Content-Type: Application/JSON; charset=utf-8\r\n", b"{}"), (b"", b"")):
        with connect(server) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + head + b"Content-Length: %d\r\n\r\n%b" % (len(body),
                                                                                                         body))
            assert ResponseReader(sock).read(1)[0].status == 200


def test_no_cors_headers_by_default(server):
    with connect(server) as sock:
        sock.sendall(b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n"
                     b"Access-Control-Request-Method: POST\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        replies = ResponseReader(sock).read(2)
    assert [r.status for r in replies] == [204, 200]
    assert not [k for r in replies for k in r.headers if k.startswith("access-control")]


def test_any_origin_with_a_star():
    config = ServerConfig(allowed_origins=("*",))
    with ServerThread(lambda: HttpServer(make_router(), config)) as running, connect(running) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nOrigin: http://anywhere.example\r\n\r\n")
        assert ResponseReader(sock).read(1)[0].headers["access-control-allow-origin"] == "*"


def test_drain_refuses_new_requests_with_503_and_close_but_finishes_running_ones():
    with ServerThread(lambda: HttpServer(make_router(), CONFIG)) as running:
        with connect(running) as busy:
            busy.sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            running.call(running.server.drain)
            fresh = connect(running)  # still listening: a clear 503, not a refused connection
            fresh.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            refused = ResponseReader(fresh).read(1)[0]
            assert refused.status == 503 and refused.headers["connection"] == "close"
            assert "shutting down" in refused.json()["error"]["message"]
            assert closed_by_peer(fresh)
            fresh.close()
            done = ResponseReader(busy).read(1)[0]
            assert (done.status, done.body) == (200, b"done")
            assert done.headers["connection"] == "close"
            assert closed_by_peer(busy)
