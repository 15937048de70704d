"""Turns a Request into a result: CORS preflight, bearer-token auth, routing (404 / 405 with
Allow), the JSON content-type rule (415), and handler errors mapped to error responses.
Plain-function handlers are answered inline (no task); coroutine handlers come back as a
coroutine for the connection to run."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Coroutine

from httpd.config import ServerConfig
from httpd.log_limit import LogLimiter
from httpd.request import Request
from httpd.response import HttpError, Response, error_response
from httpd.router import Endpoint, Result, Router

logger = logging.getLogger(__name__)

_DEFAULT_ALLOWED_HEADERS = b"Authorization, Content-Type"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_json_content_type(value: bytes | None) -> bool:
    """`application/json`, with or without parameters (`; charset=utf-8`)."""
    if value is None:
        return False
    return value.partition(b";")[0].strip().lower() == b"application/json"


class Dispatcher:
    def __init__(self, router: Router, config: ServerConfig, log_limiter: LogLimiter | None = None):
        self.router = router
        self.api_key = config.api_key.encode() if config.api_key else None
        self.public_paths = config.public_paths
        self.any_origin = "*" in config.allowed_origins
        self.origins = frozenset(o.encode() for o in config.allowed_origins)
        self.require_json_body = config.require_json_body
        self.log_limiter = log_limiter or LogLimiter()

    def __call__(self, request: Request) -> Result | Coroutine:
        method = request.method
        endpoints = self.router.endpoints(request.path)
        if method == "OPTIONS":
            return self._preflight(request, endpoints)
        if self.api_key is not None and request.path not in self.public_paths and not self._authorized(request):
            return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  headers=[(b"WWW-Authenticate", b"Bearer")])
        if endpoints is None:
            return error_response(404, f"no route for {request.path}")
        endpoint = endpoints.get(method)
        if endpoint is None:
            endpoint = self.router.resolve(method, endpoints)
        if endpoint is None:
            allow = ", ".join(self.router.allowed_methods(endpoints))
            return error_response(405, f"method {request.method} is not allowed for {request.path}; allowed: {allow}",
                                  headers=[(b"Allow", allow.encode())])
        if self.require_json_body and method in _BODY_METHODS and request.body:
            content_type = request.header(b"content-type")
            if not is_json_content_type(content_type) and not self._form_allowed(endpoint, request, content_type):
                got = "none" if content_type is None else repr(content_type.decode("latin-1"))
                return error_response(415, f"Content-Type must be application/json (got {got}); with curl, add "
                                           "-H 'Content-Type: application/json'", "Content-Type")
        if endpoint.is_async:
            return self._run_async(endpoint, request)
        try:
            return endpoint.handler(request)
        except HttpError as err:
            return error_response(err.status, err.message, err.param, err.headers)
        except Exception as err:  # a bug in a handler must not take the connection down
            self._log_failure(request)
            return error_response(500, f"internal error: {type(err).__name__}: {err}")

    async def _run_async(self, endpoint: Endpoint, request: Request) -> Result:
        try:
            return await endpoint.handler(request)
        except HttpError as err:
            return error_response(err.status, err.message, err.param, err.headers)
        except Exception as err:
            self._log_failure(request)
            return error_response(500, f"internal error: {type(err).__name__}: {err}")

    def _log_failure(self, request: Request) -> None:
        self.log_limiter.log(logger, logging.ERROR, "handler for %s %s failed", request.method, request.path,
                             exc_info=True)

    def _form_allowed(self, endpoint: Endpoint, request: Request, content_type: bytes | None) -> bool:
        """A form upload to a route that takes one, from a client that is not a browser page of a foreign origin
        (browsers send such a POST without a preflight, but always with its Origin)."""
        if not endpoint.accepts_form or content_type is None:
            return False
        if content_type.partition(b";")[0].strip().lower() != b"multipart/form-data":
            return False
        return request.header(b"origin") is None or self.allowed_origin(request) is not None

    def allowed_origin(self, request: Request) -> bytes | None:
        """The Access-Control-Allow-Origin value for this request, or None (no CORS header)."""
        origin = request.header(b"origin")
        if origin is None:
            return None
        if self.any_origin:
            return b"*"
        return origin if origin in self.origins else None

    def _authorized(self, request: Request) -> bool:
        value = request.header(b"authorization")
        if value is None:
            return False
        scheme, _, token = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _preflight(self, request: Request, endpoints) -> Response:
        if endpoints is None:
            return error_response(404, f"no route for {request.path}")
        allow = ", ".join(self.router.allowed_methods(endpoints)).encode()
        headers = [(b"Allow", allow)]
        if self.allowed_origin(request) is not None:
            requested = request.header(b"access-control-request-headers")
            headers += [
                (b"Access-Control-Allow-Methods", allow),
                (b"Access-Control-Allow-Headers", requested if requested else _DEFAULT_ALLOWED_HEADERS),
                (b"Access-Control-Max-Age", b"600"),
            ]
        return Response(204, b"", None, headers)
