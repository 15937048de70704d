#!/usr/bin/env bash
# Structured output on one GPU (about 3 minutes on an H200): the cost of JSON-schema constrained decoding against
# the same requests unconstrained, at 32 and 128 concurrent requests, and the grammar compile cache.
#
#   bash scripts/gpu_structured.sh
#
# One server (Llama-3-8B architecture, dummy weights, overlap and CUDA graphs on); bench_serving with
# --json-schema vs without, random prompts of 256 tokens, 256 output tokens (ignore_eos, greedy), two waves of
# requests per setting. Before the runs: one request with the schema cold (the workers compile it: tokenizer
# info + grammar) and once warm (a cache hit), with the compile and hit counters of /get_server_info.
# Prints one table; logs and results go to $OUT (or /tmp/gpu_structured).
# A dry run on the CPU with the default model: MODEL_FLAGS="--device cpu" LENS="16 8" CONCURRENCY="4 8" bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_structured}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
MODEL_FLAGS="${MODEL_FLAGS:---model-path ${GPU_MODEL:-.models/llama-3-8b-dummy} --load-format dummy}"
LENS="${LENS:-256 256}"  # input and output tokens per request
CONCURRENCY="${CONCURRENCY:-32 128}"
PORT="${PORT:-30124}"

if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import msgspec, xgrammar" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# shellcheck disable=SC2086
python3 -m runtime $MODEL_FLAGS --port "$PORT" >"$LOG_DIR/server.log" 2>&1 &
server=$!
for _ in $(seq 600); do
  grep -q "Ready: serving" "$LOG_DIR/server.log" && break
  kill -0 $server 2>/dev/null || { tail -40 "$LOG_DIR/server.log"; exit 1; }
  sleep 0.5
done
grep -E "Ready: serving|captured" "$LOG_DIR/server.log"

timeout 420 python3 - "$PORT" "$LOG_DIR" "$LENS" "$CONCURRENCY" <<'EOF'
import json, sys, time, urllib.request

from runtime.bench import serving

port, log_dir = sys.argv[1], sys.argv[2]
input_len, output_len = sys.argv[3].split()
concurrencies = [int(c) for c in sys.argv[4].split()]
url = f"http://127.0.0.1:{port}"
schema = json.dumps({"type": "object", "properties": {
    "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "summary": {"type": "string"}}, "required": ["title", "tags", "summary"]})


def post(body):
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        json.load(response)
    return (time.perf_counter() - start) * 1e3


def grammar_counters():
    with urllib.request.urlopen(url + "/get_server_info", timeout=60) as response:
        state = json.load(response)["internal_states"][0]
    return state["grammar_compiles"], state["grammar_cache_hits"]


probe = {"text": "Describe a book.", "sampling_params": {"json_schema": schema, "max_new_tokens": 1}}
before = grammar_counters()
cold_ms = post(probe)
warm_ms = post(probe)
after = grammar_counters()

rows = []
for concurrency in concurrencies:
    results = {}
    # One unmeasured wave of each kind first: the first wave at a new concurrency pays for Triton compiles at new
    # shapes (seconds), which would otherwise land on whichever kind runs first.
    for name, extra in (("warm-up", []), ("warm-up", ["--json-schema", schema]), ("free", []),
                        ("json_schema", ["--json-schema", schema])):
        args = ["--port", port, "--dataset-name", "random", "--random-input-len", input_len, "--random-output-len",
                output_len,
                "--random-range-ratio", "1.0", "--num-prompts", str(2 * concurrency), "--max-concurrency",
                str(concurrency), "--disable-tqdm", "--output-file", f"{log_dir}/{name}.jsonl", *extra]
        results[name] = serving.main(args)
        assert results[name]["failed"] == 0, results[name].get("errors")
    free, constrained = results["free"]["output_throughput"], results["json_schema"]["output_throughput"]
    rows.append((concurrency, free, constrained, results["free"]["median_itl_ms"],
                 results["json_schema"]["median_itl_ms"]))
end = grammar_counters()

print()
print("| concurrency | free tok/s | json_schema tok/s | ratio | free ITL ms | json ITL ms |")
print("| --- | --- | --- | --- | --- | --- |")
for concurrency, free, constrained, itl_free, itl_json in rows:
    print(f"| {concurrency} | {free:.0f} | {constrained:.0f} | {constrained / free:.3f} | {itl_free:.2f} | "
          f"{itl_json:.2f} |")
print()
print(f"compile cache: cold request {cold_ms:.0f} ms (compiles {before[0]} -> {after[0]}), warm {warm_ms:.0f} ms "
      f"(hits {before[1]} -> {after[1]}); benchmark requests: {end[1] - after[1]} hits, {end[0] - after[0]} compiles")
ok = all(c / f >= 0.9 for _, f, c, _, _ in rows) and end[0] == after[0] and after[1] == before[1] + 1
print("target (constrained >= 0.9x free, repeated schema = cache hit):", "met" if ok else "NOT met")
EOF
status=$?
kill -TERM $server
wait $server
exit $status
