#!/usr/bin/env bash
# Set up, lint, check the import contracts, then run the whole test suite.
# pytest's exit 5 (no tests collected) counts as failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
python3 -m ruff check . || { echo "ruff found lint errors: failing" >&2; exit 1; }
lint-imports || { echo "an import contract is broken: failing" >&2; exit 1; }
python3 -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
