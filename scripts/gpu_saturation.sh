#!/usr/bin/env bash
# Serving at saturation on one H200 (issue 20), in one call of about 8 minutes; prints one table at the end.
#
#   bash scripts/gpu_saturation.sh
#
# Model: Llama-3-8B's config and tokenizer with dummy weights (bf16), from $GPU_MODEL, else .models/llama-3-8b-dummy
# (an ignored folder; copied from shared/models/llama-3-8b-dummy when missing). The server runs with its default
# flags plus $SERVE_FLAGS, by default --enable-token-timestamps (observability only: three numbers more in each
# streamed chunk, so the table can say where inter-token gaps form; SERVE_FLAGS= for the bare defaults).
# Sections, most important first; one is skipped (and says so) when it would end past $BUDGET_S:
#   serving      one server; bench_serving: 1000 x 1024/1024 at rate inf, 500 x <=4096/<=2048 (range ratio 0) at
#                rate inf, 200 x 1024/1024 at 4 requests/s; server info (retractions) after each     ~5 min
#   mixed-off    the rate-4 workload again on a server with --no-enable-mixed-chunk                 ~2 min
#   one-batch    bench_one_batch, batch 1 and 8, 128 in / 256 out (the batch-1 decode target)       ~25 s
#   timeline     scripts/gpu_step_timeline.py: decode steps at 256 and 512 rows, kernel groups, scheduler
#                CPU per step, prefill chunks alone and mixed (and at 32 rows, for the chunk size)  ~45 s
#   kernels      gpu_kernels_bench decode attention at batch 256/512 x 1k/4k/16k and batch 1 x 32k   ~30 s
#   compile      bench_one_batch batch 1 and 8 with --enable-torch-compile (compile time included)  <= 150 s
# Logs and JSON land in $OUT (the device tool brings them back), else /tmp/gpu_saturation.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_saturation}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
BUDGET_S="${BUDGET_S:-470}"
MODEL="${GPU_MODEL:-.models/llama-3-8b-dummy}"
SERVE_FLAGS="${SERVE_FLAGS---enable-token-timestamps}"
if [ ! -d "$MODEL" ] && [ -d shared/models/llama-3-8b-dummy ]; then
  mkdir -p "$(dirname "$MODEL")" && cp -r shared/models/llama-3-8b-dummy "$MODEL"
fi
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import msgspec" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PORT=30123
URL="http://127.0.0.1:$PORT"

# serve LOG_NAME EXTRA_FLAGS RUN...: one server (its log in $LOG_DIR/LOG_NAME.log), one bench_serving per RUN
# ("name prompts input_len output_len range_ratio rate"), the server info after each, then the server is stopped.
serve() {
  local log="$LOG_DIR/$1.log" extra=$2
  shift 2
  # shellcheck disable=SC2086
  python3 -m runtime --model-path "$MODEL" --load-format dummy --port $PORT $SERVE_FLAGS $extra >"$log" 2>&1 &
  local server=$! status=0
  for _ in $(seq 400); do
    grep -q "Ready: serving" "$log" && break
    kill -0 $server 2>/dev/null || break
    sleep 0.5
  done
  grep -E "Ready: serving|captured|scheduler:" "$log"
  curl -s "$URL/get_server_info" >"$LOG_DIR/info_start_$1.json"
  local bench=(python3 -m runtime.bench.serving --port $PORT --dataset-name random --disable-tqdm)
  for run in "$@"; do
    read -r name prompts input_len output_len ratio rate <<<"$run"
    timeout 200 "${bench[@]}" --num-prompts "$prompts" --random-input-len "$input_len" \
      --random-output-len "$output_len" --random-range-ratio "$ratio" --request-rate "$rate" \
      --output-file "$LOG_DIR/serving_$name.jsonl" || status=1
    curl -s "$URL/get_server_info" >"$LOG_DIR/info_$name.json"
  done
  grep -E "Decode batch|retracted" "$log" | tail -n 5
  kill -TERM $server
  wait $server || status=1
  return $status
}

section_serving() {
  serve server "" "inf_1k 1000 1024 1024 1.0 inf" "inf_4k 500 4096 2048 0.0 inf" "rate4_1k 200 1024 1024 1.0 4"
}

section_mixed_off() {
  # The rate-4 workload with prefill steps apart from decode steps (SGLang's default), against mixed chunks.
  serve server_mixed_off --no-enable-mixed-chunk "rate4_1k_mixed_off 200 1024 1024 1.0 4"
}

section_one_batch() {
  timeout 150 python3 -m runtime.bench.one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --batch-size 1 8 --input-len 128 --output-len 256 --cuda-graph-bs 1 8 --output "$LOG_DIR/one_batch.json"
}

section_timeline() {
  timeout 200 python3 scripts/gpu_step_timeline.py --model-path "$MODEL" --rows 256 512 --context 1536 \
    --chunks 512 2048 8192 --low-rows 32 --low-chunks 256 512 1024 --output "$LOG_DIR/timeline.json"
}

section_kernels() {
  timeout 150 python3 scripts/gpu_kernels_bench.py --only decode --decode-shapes saturation \
    --table "$LOG_DIR/kernels.md"
}

section_compile() {
  timeout 150 python3 -m runtime.bench.one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --batch-size 1 8 --input-len 128 --output-len 256 --cuda-graph-bs 1 8 --enable-torch-compile \
    --torch-compile-max-bs 8 --output "$LOG_DIR/one_batch_compile.json"
}

# name:estimated seconds; arguments choose sections (in the order given), e.g. bash scripts/gpu_saturation.sh serving
SECTIONS=(serving:330 mixed-off:110 one-batch:25 timeline:45 kernels:30 compile:90)
if [ $# -gt 0 ]; then
  chosen=()
  for name in "$@"; do
    match=$(printf '%s\n' "${SECTIONS[@]}" | grep "^$name:") || { echo "unknown section $name" >&2; exit 2; }
    chosen+=("$match")
  done
  SECTIONS=("${chosen[@]}")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG_DIR/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" \
  | tee -a "$LOG_DIR/env.txt"
: >"$LOG_DIR/sections.txt"
for entry in "${SECTIONS[@]}"; do
  name=${entry%%:*} estimate=${entry##*:}
  if (( SECONDS + estimate > BUDGET_S )); then
    echo "$name skipped: ${SECONDS} s spent, ~${estimate} s more would pass the ${BUDGET_S} s budget" \
      | tee -a "$LOG_DIR/sections.txt"
    continue
  fi
  echo "=== $name ($SECONDS s) ==="
  start=$SECONDS
  "section_${name//-/_}" 2>&1 | tee "$LOG_DIR/$name.log"
  echo "$name exit ${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$LOG_DIR/sections.txt"
done
echo
python3 scripts/gpu_saturation_report.py "$LOG_DIR"
