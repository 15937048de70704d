# Sourced by the scripts/gpu_*.sh runners: the copied wheels on PYTHONPATH, and the loop that runs named sections.
# A runner defines section_<name> functions (dashes in names become underscores), sets LOG_DIR, then calls
#   gpu_install_wheels
#   gpu_run_sections "known names..." -- "$@"
# which checks every asked name first (exit 2 on an unknown one), runs each section with its output in
# $LOG_DIR/<name>.log and on the terminal, and leaves GPU_SUMMARY (markdown rows) and GPU_FAILED (0 or 1).

gpu_install_wheels() {  # the device machine lacks msgspec, httptools, gguf...: install the carried .whl/ into /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import msgspec" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

gpu_run_sections() {  # gpu_run_sections "<known names>" -- <asked names...>
  local known=$1 name start status
  shift 2
  for name in "$@"; do
    if ! declare -F "section_${name//-/_}" >/dev/null; then
      echo "unknown section '$name'; known: $known" >&2
      exit 2
    fi
  done
  GPU_SUMMARY=()
  GPU_FAILED=0
  for name in "$@"; do
    echo "=== $name ==="
    start=$(date +%s)
    "section_${name//-/_}" 2>&1 | tee "$LOG_DIR/$name.log"
    status=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] && GPU_FAILED=1
    GPU_SUMMARY+=("| $name | $([ "$status" -eq 0 ] && echo ok || echo "FAILED ($status)") | $(( $(date +%s) - start )) s |")
  done
}

gpu_print_summary() {
  echo
  echo "| section | result | time |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${GPU_SUMMARY[@]}"
}

gpu_bench_one_batch() {  # gpu_bench_one_batch <config folder> <json name> [flags...]: batch 1 and 64, 1024 in, 128 out, dummy weights
  timeout 600 python3 -m runtime.bench.one_batch --model-path "$1" --load-format dummy --dtype bfloat16 \
    --batch-size 1 64 --input-len 1024 --output-len 128 --output "$LOG_DIR/$2.json" "${@:3}"
  local status=$?
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
  return $status
}

gpu_wait_ready() {  # gpu_wait_ready <server log> <server pid>: until the ready line, the server's exit, or 300 s
  for _ in $(seq 600); do
    grep -q "Ready: serving" "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

gpu_serve_and_bench() {  # gpu_serve_and_bench <name> <model> <prompts> <input len> <output len> [server flags...]
  # a server on dummy weights, bench_serving random prompts at rate inf against it, then a clean stop
  local name=$1 model=$2 prompts=$3 input_len=$4 output_len=$5 port=30157 status=0
  shift 5
  python3 -m runtime --model-path "$model" --load-format dummy --dtype bfloat16 --port $port "$@" \
    >"$LOG_DIR/server_$name.log" 2>&1 &
  local server=$!
  gpu_wait_ready "$LOG_DIR/server_$name.log" $server
  grep -E "Ready: serving|KV cache:" "$LOG_DIR/server_$name.log"
  timeout 300 python3 -m runtime.bench.serving --port $port --dataset-name random --random-input-len "$input_len" \
    --random-output-len "$output_len" --random-range-ratio 1.0 --num-prompts "$prompts" --request-rate inf \
    --disable-tqdm --output-file "$LOG_DIR/serving_$name.jsonl" || status=1
  kill -TERM $server
  wait $server || status=1
  return $status
}
