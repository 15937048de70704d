"""ServerConfig: the limits and timeouts of the HTTP server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    max_header_bytes: int = 64 * 1024  # request line + headers; beyond: 431
    max_body_bytes: int = 64 * 1024 * 1024  # beyond: 413
    max_connections: int = 4096  # beyond: 503 and close
    # A request's line and headers must be complete this long after their first byte (absolute: a client that
    # trickles one byte at a time cannot hold a connection), else 408.
    header_timeout: float = 10.0
    # A body must arrive at body_min_rate bytes/s on average once body_grace seconds have passed since the
    # headers, and never pause longer than read_timeout, else 408.
    body_grace: float = 10.0
    body_min_rate: float = 10 * 1024
    read_timeout: float = 30.0
    keepalive_timeout: float = 75.0  # an idle connection is closed after this long
    write_timeout: float = 60.0  # a client that reads nothing for this long while output waits is cut off
    max_pipelined: int = 32  # queued requests per connection before reading pauses
    api_key: str | None = None  # when set, "Authorization: Bearer <key>" is required ...
    public_paths: frozenset[str] = frozenset({"/health"})  # ... except on these paths
    # CORS: origins whose pages may read responses (exact "scheme://host[:port]", or "*" for any). Empty: no
    # CORS headers at all, so a browser page of another origin cannot read anything.
    allowed_origins: tuple[str, ...] = ()
    # POST/PUT/PATCH bodies must be `Content-Type: application/json` (415 otherwise): a browser sends text/plain
    # or form bodies cross-origin without a preflight, application/json never.
    require_json_body: bool = False
    backlog: int = 2048

    @classmethod
    def from_args(cls, args, **overrides) -> ServerConfig:
        """From runtime.server_args.ServerArgs (--api-key, --max-body-bytes, --max-connections,
        --allowed-origins); the serving API takes JSON bodies only."""
        values = dict(api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_connections=args.max_connections,
                      allowed_origins=tuple(args.allowed_origins), require_json_body=True)
        values.update(overrides)
        return cls(**values)
