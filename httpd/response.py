"""What handlers return (Response, StreamingResponse), the HttpError they raise, and the
serialisation of status lines and headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus

import msgspec

_json_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes | None = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class StreamingResponse:
    """A body produced piece by piece; each piece is sent (as one HTTP chunk) as soon as it is
    yielded. Closing the iterator early (client gone) runs its cleanup."""

    body: AsyncIterator[bytes]
    status: int = 200
    content_type: bytes = b"text/event-stream"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class HttpError(Exception):
    """Raised by a handler to answer with an error. `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or []


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(status: int, message: str, param: str | None = None,
                   headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    """Every error, from the server itself or from a handler, in OpenAI's shape."""
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}
    return Response(status, _json_encode(body), b"application/json", headers or [])


def json_response(obj, status: int = 200) -> Response:
    return Response(status, _json_encode(obj))


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), b"text/plain; charset=utf-8")


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


STATUS_LINES = {status.value: _status_line(status.value) for status in HTTPStatus}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else _status_line(status)
