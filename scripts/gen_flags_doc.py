"""Rewrite the flag tables of docs/flags.md from runtime/server_args.py's FLAG_DOCS (the same text as --help)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from runtime.server_args import flags_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "flags.md"
BLOCK = re.compile(r"(<!-- flags:begin -->\n).*?(<!-- flags:end -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + flags_markdown() + m.group(2), text)


if __name__ == "__main__":
    old = DOC.read_text()
    new = render(old)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if new == old else "docs/flags.md is out of date: run python scripts/gen_flags_doc.py")
    DOC.write_text(new)
