"""A listening TCP socket, opened before anything slow happens (so a busy port fails at once), that
can be handed to another process (it is inheritable on request: subprocess pass_fds)."""

from __future__ import annotations

import socket


class ListenError(OSError):
    """`what` is "host" (no such address) or "port" (cannot bind/listen there)."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


def open_listener(host: str, port: int, backlog: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ListenError("host", f"cannot listen on {host}: {err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise ListenError("port", f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def adopt_listener(fd: int) -> socket.socket:
    """The listening socket a parent passed down as descriptor `fd`."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
