"""Turns a Request into a result: CORS preflight, bearer-token auth, routing (404 / 405 with
Allow), and handler errors mapped to error responses. Plain-function handlers are answered
inline (no task); coroutine handlers come back as a coroutine for the connection to run."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Coroutine

from httpd.request import Request
from httpd.response import HttpError, Response, error_response
from httpd.router import Endpoint, Result, Router

logger = logging.getLogger(__name__)

_DEFAULT_ALLOWED_HEADERS = b"Authorization, Content-Type"


class Dispatcher:
    def __init__(self, router: Router, api_key: str | None = None, public_paths: frozenset[str] = frozenset()):
        self.router = router
        self.api_key = api_key.encode() if api_key else None
        self.public_paths = public_paths

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
        if endpoint.is_async:
            return self._run_async(endpoint, request)
        try:
            return endpoint.handler(request)
        except HttpError as err:
            return error_response(err.status, err.message, err.param, err.headers)
        except Exception as err:  # a bug in a handler must not take the connection down
            logger.exception("handler for %s %s failed", request.method, request.path)
            return error_response(500, f"internal error: {type(err).__name__}: {err}")

    async def _run_async(self, endpoint: Endpoint, request: Request) -> Result:
        try:
            return await endpoint.handler(request)
        except HttpError as err:
            return error_response(err.status, err.message, err.param, err.headers)
        except Exception as err:
            logger.exception("handler for %s %s failed", request.method, request.path)
            return error_response(500, f"internal error: {type(err).__name__}: {err}")

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
        if request.header(b"origin") is not None:
            requested = request.header(b"access-control-request-headers")
            headers += [
                (b"Access-Control-Allow-Methods", allow),
                (b"Access-Control-Allow-Headers", requested if requested else _DEFAULT_ALLOWED_HEADERS),
                (b"Access-Control-Max-Age", b"600"),
            ]
        return Response(204, b"", None, headers)
