#!/usr/bin/env bash
# fp8 on one H200 (or H100), about 5 minutes: correctness on CUDA, the fp8 GEMM and fp8-KV decode against bf16 in
# the kernel bench, bench_one_batch bf16 vs --quantization fp8, and a short bench_serving of bf16 against fp8 weights
# + fp8 KV cache. Llama-3-8B's shape with dummy weights. Logs and tables land in $OUT (else /tmp/gpu_quant).
#
#   bash scripts/gpu_quant.sh                     # every section
#   bash scripts/gpu_quant.sh one-batch serving   # chosen sections
#   bash scripts/gpu_quant.sh fp8-gemm            # the weight-only fp8 GEMM alone, about 3 minutes (one table)
#   FP8_GEMM_SWEEP=1 bash scripts/gpu_quant.sh fp8-gemm   # and its tile sweep, about a minute more
#   bash scripts/gpu_quant.sh timeline            # batch-1 decode step by kernel group, bf16 and fp8 (~1 minute)
#
# Env: GPU_MODEL (the llama-3-8b-dummy folder), SERVE_PROMPTS (128), SERVE_LEN (1024 in and out), FP8_GEMM_SWEEP (0).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_quant}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ALL=(tests kernels one-batch serving)  # fp8-gemm and timeline run when named
MODEL="${GPU_MODEL:-}"
for candidate in shared/models/llama-3-8b-dummy ../shared/models/llama-3-8b-dummy /work/shared/models/llama-3-8b-dummy \
                 .models/llama-3-8b-dummy; do
  [ -z "$MODEL" ] && [ -f "$candidate/config.json" ] && MODEL="$candidate"
done
SERVE_PROMPTS="${SERVE_PROMPTS:-128}"
SERVE_LEN="${SERVE_LEN:-1024}"

# shellcheck source=scripts/gpu_sections.sh
source scripts/gpu_sections.sh
gpu_install_wheels

section_tests() {
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/layers/test_gpu_quantization.py \
    tests/kernels/test_fp8_kv_cache.py tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_quant.py
}

section_kernels() {
  timeout 240 python3 scripts/gpu_kernels_bench.py --only fp8 --table "$LOG_DIR/fp8_kernels.md"
}

one_batch() {  # name, batch, input, output, extra flags...
  local name=$1 batch=$2 input=$3 output=$4
  shift 4
  timeout 240 python3 -m runtime.bench.one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --batch-size "$batch" --input-len "$input" --output-len "$output" --output "$LOG_DIR/one_batch_$name.json" "$@"
}

section_one_batch() {
  local status=0
  one_batch bs1_bf16 1 128 256 || status=1
  one_batch bs1_fp8 1 128 256 --quantization fp8 || status=1
  one_batch bs64_bf16 64 1024 128 || status=1
  one_batch bs64_fp8 64 1024 128 --quantization fp8 || status=1
  python3 - "$LOG_DIR" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
print("| run | prefill tok/s | decode tok/s | decode step ms | fp8 / bf16 decode |")
print("| --- | ---: | ---: | ---: | ---: |")
for bs in ("bs1", "bs64"):
    rows = {kind: json.loads((d / f"one_batch_{bs}_{kind}.json").read_text())[0] for kind in ("bf16", "fp8")
            if (d / f"one_batch_{bs}_{kind}.json").exists()}
    for kind, r in rows.items():
        ratio = r["decode_tok_s"] / rows["bf16"]["decode_tok_s"] if "bf16" in rows else float("nan")
        print(f"| {bs} {kind} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | {r['decode_median_ms']:.2f} | "
              f"{ratio:.2f}x |")
PY
  return $status
}

# The weight-only fp8 GEMM (kernels/fp8_gemm.py): its tests in bf16 on CUDA, the kernel against cuBLAS bf16 and the
# previous fp8 path (_scaled_mm) at Llama-3-8B's decode shapes, bench_one_batch bf16 vs fp8 at batch 1 and 64
# (128 in / 256 out, one model load each), and with FP8_GEMM_SWEEP=1 the tile sweep (about a minute more), in one table.
section_fp8_gemm() {
  local status=0
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_quant.py \
    tests/kernels/test_fp8_convert.py tests/kernels/test_fp8_kv_cache.py tests/kernels/test_fused_moe.py \
    tests/layers/test_gpu_quantization.py || status=1
  timeout 150 python3 scripts/gpu_kernels_bench.py --only fp8_gemm --json "$LOG_DIR/fp8_gemm.json" \
    >"$LOG_DIR/fp8_gemm_bench.log" 2>&1 || status=1
  grep -vE '^\|' "$LOG_DIR/fp8_gemm_bench.log" | tail -5
  for kind in bf16 fp8; do
    timeout 200 python3 -m runtime.bench.one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
      --batch-size 1 64 --input-len 128 --output-len 256 --output "$LOG_DIR/fp8_gemm_one_batch_$kind.json" \
      $([ $kind = fp8 ] && echo --quantization fp8) >"$LOG_DIR/fp8_gemm_one_batch_$kind.log" 2>&1 || status=1
    grep -vE '^\|' "$LOG_DIR/fp8_gemm_one_batch_$kind.log" | tail -3
  done
  if [ "${FP8_GEMM_SWEEP:-0}" = 1 ]; then
    timeout 150 python3 scripts/gpu_kernels_bench.py --only fp8_gemm --sweep --json "$LOG_DIR/fp8_gemm_sweep.json" \
      >"$LOG_DIR/fp8_gemm_sweep.log" 2>&1 || status=1
    grep -vE '^\|' "$LOG_DIR/fp8_gemm_sweep.log" | tail -5
  fi
  python3 scripts/fp8_gemm_report.py "$LOG_DIR" || status=1
  return $status
}

# Where a batch-1 decode step goes, bf16 and fp8 weights: device time per kernel group (scripts/gpu_step_timeline.py
# at one row of 256 tokens).
section_timeline() {
  local status=0
  for kind in bf16 fp8; do
    timeout 150 python3 scripts/gpu_step_timeline.py --model-path "$MODEL" --rows 1 --context 256 --chunks \
      --low-rows 0 --top-kernels 16 $([ $kind = fp8 ] && echo --quantization fp8) \
      --output "$LOG_DIR/timeline_bs1_$kind.json" || status=1
  done
  return $status
}

section_serving() {
  local status=0
  gpu_serve_and_bench bf16 "$MODEL" "$SERVE_PROMPTS" "$SERVE_LEN" "$SERVE_LEN" || status=1
  gpu_serve_and_bench fp8 "$MODEL" "$SERVE_PROMPTS" "$SERVE_LEN" "$SERVE_LEN" --quantization fp8 \
    --kv-cache-dtype fp8_e4m3 || status=1
  return $status
}

[ -z "$MODEL" ] && { echo "no llama-3-8b-dummy folder found; set GPU_MODEL" >&2; exit 2; }
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=("${ALL[@]}")
gpu_run_sections "${ALL[*]} fp8-gemm timeline" -- "${sections[@]}"
[ -f "$LOG_DIR/fp8_kernels.md" ] && { echo; cat "$LOG_DIR/fp8_kernels.md"; }
[ -f "$LOG_DIR/one-batch.log" ] && { echo; grep -E '^\|' "$LOG_DIR/one-batch.log" | tail -6; }
[ -f "$LOG_DIR/fp8-gemm.log" ] && { echo; grep -E '^\|' "$LOG_DIR/fp8-gemm.log"; }
if [ -f "$LOG_DIR/serving.log" ]; then
  echo; grep -E "KV cache:|Output token throughput|Request throughput|Median TPOT|Median TTFT" "$LOG_DIR/serving.log"
fi
gpu_print_summary
exit "$GPU_FAILED"
