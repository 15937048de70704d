"""Method + exact path -> handler. HEAD falls back to the GET handler; OPTIONS is answered by the
dispatcher (CORS preflight) from the methods a path allows.

A path may hold `{name}` segments ("/v1/files/{file_id}/content"): each matches one non-empty segment, exact
paths win over such templates, and the handler reads the values with `path_segment(request, i)`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from httpd.request import Request
from httpd.response import Response, StreamingResponse

Result = Response | StreamingResponse
Handler = Callable[[Request], Result | Awaitable[Result]]


@dataclass(slots=True, frozen=True)
class Endpoint:
    handler: Handler
    is_async: bool  # a coroutine function: run as a task; a plain function: answered inline
    # Also takes multipart/form-data bodies (file uploads), except from a browser page of an origin that is not
    # allowed (ServerConfig.require_json_body otherwise asks for JSON).
    accepts_form: bool = False


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Endpoint]] = {}
        self._templates: list[tuple[list[str], dict[str, Endpoint]]] = []  # split template, its endpoints

    def add(self, methods: str | Iterable[str], path: str, handler: Handler, accepts_form: bool = False) -> None:
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        endpoints = self._routes.setdefault(path, {})
        if "{" in path and not any(e is endpoints for _, e in self._templates):
            self._templates.append((path.split("/"), endpoints))
        for method in [methods] if isinstance(methods, str) else methods:
            method = method.upper()
            if method in endpoints:
                raise ValueError(f"route {method} {path} is registered twice")
            endpoints[method] = Endpoint(handler, inspect.iscoroutinefunction(handler), accepts_form)

    def endpoints(self, path: str) -> dict[str, Endpoint] | None:
        found = self._routes.get(path)
        if found is not None or not self._templates:
            return found
        parts = path.split("/")
        for template, endpoints in self._templates:
            if len(template) == len(parts) and all(
                    t == p or (t.startswith("{") and t.endswith("}") and p) for t, p in zip(template, parts)):
                return endpoints
        return None

    def resolve(self, method: str, endpoints: dict[str, Endpoint]) -> Endpoint | None:
        endpoint = endpoints.get(method)
        if endpoint is None and method == "HEAD":
            endpoint = endpoints.get("GET")
        return endpoint

    @staticmethod
    def allowed_methods(endpoints: dict[str, Endpoint]) -> list[str]:
        methods = set(endpoints)
        if "GET" in methods:
            methods.add("HEAD")
        methods.add("OPTIONS")
        return sorted(methods)

    def paths(self) -> list[str]:
        return sorted(self._routes)


def path_segment(request: Request, index: int) -> str:
    """Segment `index` of the request path ("/v1/files/abc" -> 1: "v1", 3: "abc"), percent-decoded."""
    return unquote(request.path.split("/")[index])
