"""Errors the Frontend raises to its callers (the HTTP API, the Engine API)."""

from __future__ import annotations


class RequestError(Exception):
    """The request was refused: `status` is the HTTP status to answer with (400: it can never be
    served, e.g. longer than the KV pool; 503: the engine is overloaded or shutting down)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault, if the refusal names one

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.message!r})"
