#!/usr/bin/env bash
# Set up and serve the default model (SmolLM2-135M-Instruct) on http://127.0.0.1:30000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m runtime "$@"
