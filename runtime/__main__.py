"""`python -m runtime [flags]`: serve a model over HTTP (flags: runtime/server_args.py, docs/flags.md)."""

from __future__ import annotations

import sys

from runtime.server_args import parse_args


def main(argv: list[str] | None = None) -> int:
    from runtime.launcher import serve

    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
