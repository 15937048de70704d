"""ServerConfig: the limits and timeouts of the HTTP server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    max_header_bytes: int = 64 * 1024  # request line + headers; beyond: 431
    max_body_bytes: int = 64 * 1024 * 1024  # beyond: 413
    max_connections: int = 4096  # beyond: 503 and close
    read_timeout: float = 30.0  # headers must arrive within it; the body may pause at most this long: else 408
    keepalive_timeout: float = 75.0  # an idle connection is closed after this long
    write_timeout: float = 60.0  # a client that reads nothing for this long while output waits is cut off
    max_pipelined: int = 32  # queued requests per connection before reading pauses
    api_key: str | None = None  # when set, "Authorization: Bearer <key>" is required ...
    public_paths: frozenset[str] = frozenset({"/health"})  # ... except on these paths
    backlog: int = 2048

    @classmethod
    def from_args(cls, args, **overrides) -> ServerConfig:
        """From runtime.server_args.ServerArgs (--api-key, --max-body-bytes, --max-connections)."""
        values = dict(api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_connections=args.max_connections)
        values.update(overrides)
        return cls(**values)
