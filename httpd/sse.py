"""Server-sent events: one `data:` line per event, as SGLang and OpenAI stream."""

from __future__ import annotations

import msgspec

_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"


def sse_event(payload) -> bytes:
    """`payload` is JSON-encoded on one line (JSON escapes newlines inside strings)."""
    return b"data: " + _encode(payload) + b"\n\n"
