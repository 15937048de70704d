#!/usr/bin/env bash
# GPU validation in one call. Sections run in order; each one's output goes to the terminal and to
# $LOG_DIR/<section>.log; a summary table comes last (with the kernel benchmark table just before it).
#
#   bash scripts/gpu_check.sh                          # every section
#   bash scripts/gpu_check.sh kernel-tests kernel-bench # chosen sections, in the order given
#   bash scripts/gpu_check.sh kernel-sweep              # optional sections are run only when named
#   bash scripts/gpu_check.sh gpu-tests profile-decode bench-one-batch bench-serving bench-overlap   # the H100 bar
#
# LOG_DIR is $OUT when set (the device tool brings back what lands there), else /tmp/gpu_check.
# Where msgspec is missing (the GPU image), the wheels carried in .whl/ are installed to /tmp/site first.
# To add a section: write a function section_<name> (dashes in the name become underscores) and add the name to ALL.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
ALL=(env kernel-tests kernel-bench)
OPTIONAL=(kernel-sweep gpu-tests profile-decode bench-one-batch bench-serving bench-overlap
          parallel-allreduce parallel-tp parallel-dp)  # parallel-*: 2 GPUs (nvidia-h200-x2), issue 13
# The H100 bar runs on the Llama-3-8B architecture with dummy weights (config + real tokenizer, an ignored folder).
MODEL="${GPU_MODEL:-.models/llama-3-8b-dummy}"
SERVE_PROMPTS="${SERVE_PROMPTS:-500}"        # bench-serving at request rate inf
SERVE_RATE_PROMPTS="${SERVE_RATE_PROMPTS:-200}"  # bench-serving at request rate 4 (0: skip)
SERVE_FLAGS="${SERVE_FLAGS:-}"               # extra server flags for bench-serving (experiments)

section_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
}

section_kernel_tests() {
  # The kernel tests pick CUDA when present: fp32, bf16 and fp16 against the torch references.
  local parallel=()
  python3 -c "import xdist" 2>/dev/null && parallel=(-n 4)
  python3 -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/kernels/
}

section_kernel_bench() {
  python3 scripts/gpu_kernels_bench.py --table "$LOG_DIR/kernels_bench.md"
}

section_kernel_sweep() {
  # The benchmark plus other tile shapes and split counts of the attention kernels, to choose their defaults.
  python3 scripts/gpu_kernels_bench.py --sweep --table "$LOG_DIR/kernels_bench.md"
}

section_gpu_tests() {
  # Model vs transformers on CUDA (bf16/fp16; every family, so minutes), Triton vs torch attention, CUDA-graph vs
  # eager decode, sampler kernel path, the 8B-dummy server answering curl and the openai client.
  timeout 900 python3 -m pytest -q -p no:cacheprovider tests/models/test_gpu_models.py tests/worker/test_gpu_sampling.py tests/e2e/test_gpu_server.py tests/worker/test_cuda_graph_runner.py
}

section_profile_decode() {
  timeout 600 python3 scripts/gpu_profile_decode.py --model-path "$MODEL" --batch-size 1 64 --input-len 128
}

section_bench_one_batch() {
  timeout 600 python3 -m runtime.bench_one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --batch-size 1 --input-len 128 --output-len 256 --compare-hf --output "$LOG_DIR/one_batch_bs1.json" &&
  timeout 600 python3 -m runtime.bench_one_batch --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --batch-size 64 --input-len 1024 --output-len 128 --compare-hf --output "$LOG_DIR/one_batch_bs64.json"
}

section_bench_serving() {
  # One server (started here, stopped at the end); random prompts, input = output = 1024 tokens.
  local port=30123 status=0
  # shellcheck disable=SC2086
  python3 -m runtime --model-path "$MODEL" --load-format dummy --port $port $SERVE_FLAGS >"$LOG_DIR/server.log" 2>&1 &
  local server=$!
  gpu_wait_ready "$LOG_DIR/server.log" $server
  grep -E "Ready: serving|captured|model loaded" "$LOG_DIR/server.log"
  local common=(--port $port --dataset-name random --random-input-len 1024 --random-output-len 1024
                --random-range-ratio 1.0 --disable-tqdm --output-file "$LOG_DIR/serving.jsonl")
  timeout 400 python3 -m runtime.bench_serving "${common[@]}" --num-prompts "$SERVE_PROMPTS" --request-rate inf ||
    status=1
  if [ "$SERVE_RATE_PROMPTS" -gt 0 ]; then
    timeout 300 python3 -m runtime.bench_serving "${common[@]}" --num-prompts "$SERVE_RATE_PROMPTS" --request-rate 4 \
      --seed 2 || status=1
  fi
  kill -TERM $server
  wait $server || status=1
  return $status
}

section_parallel_allreduce() {
  # The collectives of one TP=2 decode step, eager and captured in a CUDA graph (~1 min).
  python3 scripts/bench_parallel.py allreduce
}

section_parallel_tp() {
  # Batch-1 decode tok/s, TP=1 vs TP=2 on the 8B dummy model (~4 min; target >= 1.6x).
  python3 scripts/bench_parallel.py tp --model-path "$MODEL" --log-dir "$LOG_DIR"
}

section_parallel_dp() {
  # 1000 x 1024/1024 at rate inf, DP=1 vs DP=2 on the 8B dummy model (~7 min; target >= 1.9x).
  python3 scripts/bench_parallel.py dp --model-path "$MODEL" --log-dir "$LOG_DIR"
}

section_bench_overlap() {
  timeout 500 python3 scripts/bench_overlap.py --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --num-prompts 64 --max-running-requests 64 --input-len 1024 --output-len 256 --vocab-limit 120000 \
    --output "$LOG_DIR/overlap.json"
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=("${ALL[@]}")

# shellcheck source=scripts/gpu_sections.sh
source scripts/gpu_sections.sh
gpu_install_wheels
gpu_run_sections "${ALL[*]} ${OPTIONAL[*]}" -- "${sections[@]}"

if [ -f "$LOG_DIR/kernels_bench.md" ]; then
  echo
  cat "$LOG_DIR/kernels_bench.md"
fi
for name in profile-decode bench-one-batch bench-overlap parallel-allreduce parallel-tp parallel-dp; do
  [ -f "$LOG_DIR/$name.log" ] && { echo; echo "--- $name"; grep -E '^\||^model|^runner|greedy|^target' "$LOG_DIR/$name.log"; }
done
if [ -f "$LOG_DIR/bench-serving.log" ]; then
  echo; echo "--- bench-serving"
  grep -E "rate|throughput|Successful|Duration|Mean|Median|P99" "$LOG_DIR/bench-serving.log" | grep -v "E2E"
fi
gpu_print_summary
exit "$GPU_FAILED"
