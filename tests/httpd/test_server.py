"""The raw HTTP/1.1 server over real sockets: keep-alive, pipelining, chunked bodies,
Expect: 100-continue, limits (431, 413, 408, 503), routing (404, 405 + Allow), HEAD, CORS
preflight, API keys, streaming and client disconnects."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httptools
import pytest

from httpd import HttpError, HttpServer, Request, Response, Router, ServerConfig, StreamingResponse, path_segment
from httpd.sse import DONE, sse_event
from tests.fake_frontend import ServerThread, wait_until

CONFIG = ServerConfig(max_header_bytes=4096, max_body_bytes=1024, header_timeout=0.5, read_timeout=0.5,
                      keepalive_timeout=1.0, allowed_origins=("http://app.example",),
                      write_timeout=0.5)


class StreamProbe:
    """Records what the streaming handler's body went through."""

    def __init__(self):
        self.events_sent = 0
        self.closed = threading.Event()


def make_router(probe: StreamProbe) -> Router:
    router = Router()
    router.add("GET", "/health", lambda request: Response(200, b"", None))

    async def echo(request):
        return Response(200, request.body, b"application/octet-stream", [(b"X-Method", request.method.encode())])

    async def slow(request):
        ms = int(request.query.partition("=")[2])
        await asyncio.sleep(ms / 1000)
        return Response(200, f"slow {ms}".encode(), b"text/plain")

    async def stream(request):
        count = int(request.query.partition("=")[2] or 5)

        async def events():
            try:
                for i in range(count):
                    probe.events_sent += 1
                    yield sse_event({"i": i})
                    await asyncio.sleep(0.05)
                yield DONE
            finally:
                probe.closed.set()

        return StreamingResponse(events())

    async def flood(request):
        async def pieces():
            try:
                while True:
                    probe.events_sent += 1
                    yield b"x" * 65536
                    await asyncio.sleep(0)
            finally:
                probe.closed.set()

        return StreamingResponse(pieces(), content_type=b"application/octet-stream")

    def broken(request):
        raise RuntimeError("boom")

    def refuses(request):
        raise HttpError(409, "conflict here", "field_x")

    def forgets(request):
        return None

    router.add("POST", "/echo", echo)
    router.add(["GET", "POST"], "/slow", slow)
    router.add("GET", "/stream", stream)
    router.add("GET", "/flood", flood)
    router.add("GET", "/broken", broken)
    router.add("GET", "/refuses", refuses)
    router.add("GET", "/forgets", forgets)
    return router


@pytest.fixture(scope="module")
def probe():
    return StreamProbe()


@pytest.fixture(scope="module")
def server(probe):
    with ServerThread(lambda: HttpServer(make_router(probe), CONFIG)) as running:
        yield running


class Reply:
    def __init__(self):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False

    def json(self):
        return json.loads(self.body)


class ResponseReader:
    """Parses the responses arriving on a socket (httptools' response parser)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.replies: list[Reply] = []
        self.parser = httptools.HttpResponseParser(self)
        self.eof = False

    def on_message_begin(self):
        self.replies.append(Reply())

    def on_status(self, status):
        self.replies[-1].status = self.parser.get_status_code()

    def on_header(self, name, value):
        self.replies[-1].headers[name.decode().lower()] = value.decode()

    def on_body(self, body):
        self.replies[-1].body += body

    def on_message_complete(self):
        self.replies[-1].complete = True

    def read(self, count: int = 1, timeout: float = 5.0) -> list[Reply]:
        """Until `count` complete responses (or the peer closes)."""
        self.sock.settimeout(timeout)
        while sum(r.complete for r in self.replies) < count and not self.eof:
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                break
            self.parser.feed_data(data)
        return [r for r in self.replies if r.complete]


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def request(server, raw: bytes) -> Reply:
    with connect(server) as sock:
        sock.sendall(raw)
        replies = ResponseReader(sock).read(1)
        assert replies, "no response"
        return replies[0]


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_serves_several_requests_on_one_connection(server):
    with connect(server) as sock:
        reader = ResponseReader(sock)
        for i in range(3):
            body = f"body {i}".encode()
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            reply = reader.read(i + 1)[-1]
            assert (reply.status, reply.body) == (200, body)
            assert reply.headers["x-method"] == "POST"
            assert reply.headers["content-length"] == str(len(body))
            assert "date" in reply.headers


def test_pipelined_requests_are_answered_in_order(server):
    with connect(server) as sock:
        # The first is the slowest: answers must still come back in request order.
        sock.sendall(b"GET /slow?ms=150 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /slow?ms=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        replies = ResponseReader(sock).read(4)
    assert [(r.status, r.body) for r in replies] == [(200, b"slow 150"), (200, b"slow 1"), (200, b""), (200, b"abc")]


def test_chunked_request_body_arriving_in_pieces(server):
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"1\r\n \r\n", b"6\r\nchunks\r\n", b"0\r\n\r\n"):
            sock.sendall(piece)
            time.sleep(0.01)
        reply = ResponseReader(sock).read(1)[0]
    assert (reply.status, reply.body) == (200, b"hello chunks")


def test_expect_100_continue_is_answered_before_the_body(server):
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        sock.settimeout(5)
        interim = sock.recv(64)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"ping")
        reply = ResponseReader(sock).read(1)[0]
    assert (reply.status, reply.body) == (200, b"ping")


def test_expect_100_continue_with_a_too_large_body_gets_413_without_continue(server):
    reply = request(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    assert reply.status == 413
    assert "1024 bytes" in reply.json()["error"]["message"]


def test_oversized_headers_get_431(server):
    big = b"X-Big: " + b"a" * 5000 + b"\r\n"
    reply = request(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert reply.status == 431
    assert reply.headers["connection"] == "close"
    assert "4096 bytes" in reply.json()["error"]["message"]


def test_headers_that_never_end_get_431(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        reply = None
        for _ in range(20):  # keep feeding one endless header line, read after read
            try:
                sock.sendall(b"X-Drip: " + b"b" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.01)
        replies = ResponseReader(sock).read(1)
        reply = replies[0]
    assert reply.status == 431


def test_oversized_bodies_get_413(server):
    reply = request(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
    assert reply.status == 413
    chunked = b"".join(b"100\r\n" + b"z" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    reply = request(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert reply.status == 413
    assert reply.json()["error"]["code"] == 413


def test_slow_client_gets_408_and_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")  # then nothing
        start = time.monotonic()
        reply = ResponseReader(sock).read(1, timeout=5)[0]
        waited = time.monotonic() - start
        assert reply.status == 408
        assert closed_by_peer(sock)
    assert 0.3 < waited < 3.0


def test_a_stalled_body_gets_408(server):
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        reply = ResponseReader(sock).read(1, timeout=5)[0]
    assert reply.status == 408


def test_idle_keep_alive_connection_is_closed_silently(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(sock)
        assert reader.read(1)[0].status == 200
        start = time.monotonic()
        assert closed_by_peer(sock)
        assert 0.5 < time.monotonic() - start < 4.0


def test_unknown_route_is_404_and_wrong_method_is_405_with_allow(server):
    reply = request(server, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 404
    assert reply.json()["error"]["message"] == "no route for /nowhere"
    reply = request(server, b"DELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 405
    assert reply.headers["allow"] == "OPTIONS, POST"
    assert "DELETE" in reply.json()["error"]["message"]


def test_head_answers_headers_of_get_without_body(server):
    with connect(server) as sock:
        sock.sendall(b"HEAD /slow?ms=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /slow?ms=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        data = b""
        while b"slow 2" not in data:
            data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: 6" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body between the two responses


def test_cors_preflight_and_allow_origin_for_an_allowed_origin(server):
    reply = request(server, b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nOrigin: http://app.example\r\n"
                            b"Access-Control-Request-Method: POST\r\n"
                            b"Access-Control-Request-Headers: content-type, authorization\r\n\r\n")
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == "http://app.example"
    assert reply.headers["vary"] == "Origin"
    assert reply.headers["access-control-allow-methods"] == "OPTIONS, POST"
    assert reply.headers["access-control-allow-headers"] == "content-type, authorization"
    reply = request(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nOrigin: http://app.example\r\n"
                            b"Content-Length: 0\r\n\r\n")
    assert reply.headers["access-control-allow-origin"] == "http://app.example"
    # Any other origin gets no CORS header: the browser keeps its page from reading the answer.
    reply = request(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n"
                            b"Content-Length: 0\r\n\r\n")
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers


def test_malformed_request_gets_400_and_close(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        reply = ResponseReader(sock).read(1)[0]
        assert reply.status == 400
        assert "malformed HTTP request" in reply.json()["error"]["message"]
        assert closed_by_peer(sock)


def test_handler_errors_become_error_responses(server):
    reply = request(server, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 500
    assert "boom" in reply.json()["error"]["message"]
    reply = request(server, b"GET /refuses HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 409
    assert reply.json()["error"] == {"message": "conflict here", "type": "invalid_request_error",
                                     "param": "field_x", "code": 409}
    reply = request(server, b"GET /forgets HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 500 and "no response" in reply.json()["error"]["message"]


def test_http10_request_is_answered_then_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /slow?ms=1 HTTP/1.0\r\n\r\n")
        reply = ResponseReader(sock).read(1)[0]
        assert (reply.status, reply.body) == (200, b"slow 1")
        assert closed_by_peer(sock)


def test_stream_is_chunked_and_ends_with_done(server):
    reply = request(server, b"GET /stream?n=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 200
    assert reply.headers["transfer-encoding"] == "chunked"
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.body == b'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\ndata: [DONE]\n\n'


def test_client_disconnect_mid_stream_closes_the_body_at_once(server, probe):
    probe.closed.clear()
    probe.events_sent = 0
    sock = connect(server)
    sock.sendall(b"GET /stream?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    assert b"data: " in sock.recv(4096)
    sock.close()
    assert probe.closed.wait(2), "the body was not closed after the client left"
    assert probe.events_sent < 100


def test_a_client_that_stops_reading_is_cut_off(server, probe):
    probe.closed.clear()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        assert probe.closed.wait(5), "the response was not abandoned"
        assert closed_by_peer_eventually(sock)
    finally:
        sock.close()


def closed_by_peer_eventually(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except ConnectionResetError:
        return True


def test_too_many_connections_get_503():
    config = ServerConfig(max_connections=2, read_timeout=2, keepalive_timeout=5)
    with ServerThread(lambda: HttpServer(make_router(StreamProbe()), config)) as limited:
        first, second = connect(limited), connect(limited)
        for sock in (first, second):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ResponseReader(sock).read(1)[0].status == 200
        with connect(limited) as third:
            reply = ResponseReader(third).read(1)[0]
            assert reply.status == 503
            assert "too many connections" in reply.json()["error"]["message"]
        first.close()
        assert wait_until(lambda: limited.call(lambda: len(limited.server.connections)) < 2)
        with connect(limited) as fourth:
            fourth.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ResponseReader(fourth).read(1)[0].status == 200
        second.close()


def test_api_key_is_required_except_on_health():
    config = ServerConfig(api_key="s3cret", read_timeout=2, keepalive_timeout=5)
    with ServerThread(lambda: HttpServer(make_router(StreamProbe()), config)) as secured:
        reply = request(secured, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert reply.status == 401
        assert reply.json()["error"]["type"] == "authentication_error"
        assert reply.headers["www-authenticate"] == "Bearer"
        reply = request(secured, b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                                 b"Content-Length: 0\r\n\r\n")
        assert reply.status == 401
        reply = request(secured, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 401  # no route probing without the key
        reply = request(secured, b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                                 b"Content-Length: 2\r\n\r\nok")
        assert (reply.status, reply.body) == (200, b"ok")
        assert request(secured, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").status == 200


def test_router_rejects_duplicate_and_relative_routes():
    router = Router()
    router.add("GET", "/a", lambda r: Response())
    with pytest.raises(ValueError, match="registered twice"):
        router.add("GET", "/a", lambda r: Response())
    with pytest.raises(ValueError, match="must start with"):
        router.add("GET", "b", lambda r: Response())


def test_router_templates_match_one_segment_and_exact_paths_win():
    router = Router()
    router.add("GET", "/v1/files", lambda r: None)
    router.add("GET", "/v1/files/{file_id}", lambda r: None)
    router.add("DELETE", "/v1/files/{file_id}", lambda r: None)
    router.add("GET", "/v1/files/{file_id}/content", lambda r: None)
    router.add("GET", "/v1/files/special", lambda r: None)
    assert set(router.endpoints("/v1/files/file-1")) == {"GET", "DELETE"}
    assert set(router.endpoints("/v1/files/file-1/content")) == {"GET"}
    assert router.endpoints("/v1/files/special") is not router.endpoints("/v1/files/x")
    assert router.endpoints("/v1/files/") is None and router.endpoints("/v1/files/a/b") is None
    request = Request("GET", "/v1/files/file%2D1/content", "", [], b"", "1.1", True)
    assert path_segment(request, 3) == "file-1"


def test_form_uploads_only_where_a_route_takes_them_and_never_from_a_foreign_page():
    from httpd.dispatch import Dispatcher

    router = Router()
    router.add("POST", "/upload", lambda r: Response(200, b"ok"), accepts_form=True)
    router.add("POST", "/json", lambda r: Response(200, b"ok"))
    dispatch = Dispatcher(router, ServerConfig(require_json_body=True, allowed_origins=("https://app.example",)))
    form = (b"content-type", b"multipart/form-data; boundary=x")

    def status(path, *headers):
        return dispatch(Request("POST", path, "", list(headers), b"--x--", "1.1", True)).status

    assert status("/upload", form) == 200  # curl -F, the openai client
    assert status("/upload", form, (b"origin", b"https://app.example")) == 200
    assert status("/upload", form, (b"origin", b"https://evil.example")) == 415
    assert status("/upload", (b"content-type", b"text/plain")) == 415
    assert status("/json", form) == 415
