#!/usr/bin/env bash
# Vision language models on one GPU (about 3 minutes on an H200): LLaVA-OneVision-7B's shape (SigLIP so400m/14-384
# tower, anyres, Qwen2-7B; 384x384 images of 1485 tokens) with dummy weights (SHAPE=llava-1.5-7b: CLIP ViT-L/14-336
# and Llama-2-7B). Two tables: image prefill through the ModelRunner (vision tower batched, 1 / 8 / 32 images per
# step), and a server answering 128 chat requests with one distinct image each (data URLs, preprocessed by the
# ingress, pixels through the shared-memory arena) at 16 and 64 concurrent requests. Logs, the built checkpoint
# folder and gpu_vision.md go to $OUT (or /tmp/gpu_vision).
#
#   bash scripts/gpu_vision.sh
#   SHAPE=qwen2-vl-7b bash scripts/gpu_vision.sh   # Qwen2-VL-7B's shape (448x448 images, 256 tokens each)
#   SHAPE=tiny-onevision DEVICE=cpu EXTRA="--requests 8 --concurrency 4 --batch-sizes 1 2" bash scripts/gpu_vision.sh  # dry run
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_vision}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import msgspec, xgrammar" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# shellcheck disable=SC2086
timeout 420 python3 scripts/gpu_vision.py --shape "${SHAPE:-llava-onevision-7b}" --device "${DEVICE:-cuda}" \
  --out "$LOG_DIR" ${EXTRA:-} 2>&1 | tee "$LOG_DIR/gpu_vision.log" | grep -v "Warning\|^W[0-9]"
