"""Messages between the supervisor and its children on their private control rings.

Up (child -> supervisor): `Ready` once the actor is built, or `Failed` if building it raised.
Down (supervisor -> child): `Shutdown`, delivered through the actor's mailbox like
any other message, so actors handle it in the same `match msg:` as their work.
"""

from __future__ import annotations

import msgspec


class Shutdown(msgspec.Struct, tag="shutdown"):
    """Stop accepting work; finish running requests for up to `grace_s`, then exit. Application mailboxes
    include it in their own unions (runtime.messages re-exports it), so one tag means the same everywhere."""

    grace_s: float = 0.0


class Ready(msgspec.Struct, tag="ready"):
    name: str
    info: bytes = b""  # actor-defined, e.g. a msgspec-encoded ModelInfo from worker rank 0


class Failed(msgspec.Struct, tag="failed"):
    name: str
    error: str  # "ExceptionType: message"
    traceback: str = ""


ControlUp = Ready | Failed
ControlDown = Shutdown

CONTROL_DOWN_TYPE = "actors.control:ControlDown"
CONTROL_RING_BYTES = 64 * 1024
