"""One parsed HTTP request, as handlers see it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Request:
    method: str  # "GET", "POST", ...
    path: str  # without the query string, not percent-decoded
    query: str  # the raw query string after "?", or ""
    headers: list[tuple[bytes, bytes]]  # (lower-cased name, value) in arrival order
    body: bytes
    http_version: str  # "1.1" or "1.0"
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case bytes), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None
