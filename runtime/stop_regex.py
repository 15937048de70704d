"""stop_regex (SGLang's sampling parameter): a request ends once one of its patterns matches the
output text. Shared by the ingress (validation), the scheduler (matching the output's tail) and
the detokenizer (holding back streamed text a match may still cover).

Only the tail of the output is searched after each token, as for stop strings: a match must lie
within the last `window(patterns)` characters when its last token arrives, which is always the
case for patterns of bounded width (the width of `a{2,5}` is 5) and, for unbounded ones (`a.*b`),
means a match of at most MAX_WINDOW_CHARS characters."""

from __future__ import annotations

import functools
import re

MAX_PATTERNS = 32  # SGLang's limits
MAX_PATTERN_BYTES = 256
MAX_WINDOW_CHARS = 256


def check(patterns: list[str]) -> str | None:
    """Why `patterns` cannot be used, or None."""
    if len(patterns) > MAX_PATTERNS:
        return f"at most {MAX_PATTERNS} patterns, got {len(patterns)}"
    for i, pattern in enumerate(patterns):
        if not pattern:
            return f"entry {i} is empty"
        if len(pattern.encode()) > MAX_PATTERN_BYTES:
            return f"entry {i} is longer than {MAX_PATTERN_BYTES} bytes"
        try:
            compiled(pattern)
        except (re.error, RecursionError, OverflowError) as err:
            return f"entry {i} ({pattern!r}) is not a valid regular expression: {err}"
        if compiled(pattern).match("") is not None:
            return f"entry {i} ({pattern!r}) matches the empty string, so it would stop every request at once"
    return None


@functools.lru_cache(maxsize=1024)
def compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@functools.lru_cache(maxsize=1024)
def width(pattern: str) -> int:
    """The most characters one match can span, capped at MAX_WINDOW_CHARS."""
    try:
        _, most = re._parser.parse(pattern).getwidth()  # noqa: SLF001 (the stdlib's own width analysis)
    except (re.error, RecursionError, OverflowError):
        return MAX_WINDOW_CHARS
    return max(1, min(most, MAX_WINDOW_CHARS))


def window(patterns: list[str]) -> int:
    """Characters of output tail to search: the widest pattern's width."""
    return max((width(p) for p in patterns), default=0)


def search(patterns: list[str], text: str) -> tuple[str, str] | None:
    """The first pattern that matches `text`, and the text it matched."""
    for pattern in patterns:
        match = compiled(pattern).search(text)
        if match is not None:
            return pattern, match.group(0)
    return None
