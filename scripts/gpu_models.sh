#!/usr/bin/env bash
# Model families on one GPU, in one call. Sections run in order; each one's output goes to the terminal and to
# $LOG_DIR/<section>.log; a summary table comes last.
#
#   bash scripts/gpu_models.sh                  # mixtral: bench_one_batch batch 1 and 64, Mixtral-8x7B dummy weights
#   bash scripts/gpu_models.sh families moe-kernel mixtral qwen2-moe   # sections in the order given
#
# Sections:
#   mixtral    configs/Mixtral-8x7B (93 GB bf16): bench_one_batch, batch 1 and 64, input 1024, output 128 (~3 min)
#   qwen2-moe  configs/Qwen2-57B-A14B (115 GB bf16, ~12 GB left for the KV cache on an H200), same shapes
#   qwen2-moe-fp8  the same with --quantization fp8 (experts and dense layers fp8 after loading: ~58 GB of weights)
#   serving    bench_serving, 256 x 1024 in / 256 out at rate inf, on Mixtral-8x7B, DeepSeek-V2-Lite and
#              Qwen2-57B-A14B (dummy weights, default flags; ~2 min each)
#   families   every tiny family against transformers on the GPU (tests/models/test_gpu_models.py, fused MoE and
#              attention kernel tests)
#   moe-kernel the fused MoE kernel at Mixtral-8x7B shapes against the per-expert torch loop (gpu_kernels_bench)
#   deepseek   configs/DeepSeek-V2-Lite (31 GB bf16, MLA + 64 experts): the MLA decode kernel against the torch
#              latent SDPA and copy bandwidth (gpu_kernels_bench --only mla), then bench_one_batch batch 1 and 64,
#              input 1024, output 128 (~3 min)
#
# LOG_DIR is $OUT when set (the device tool brings back what lands there), else /tmp/gpu_models.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_models}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
# shellcheck source=scripts/gpu_sections.sh
source scripts/gpu_sections.sh

section_mixtral() {
  gpu_bench_one_batch configs/Mixtral-8x7B one_batch_mixtral
}

section_qwen2_moe() {
  gpu_bench_one_batch configs/Qwen2-57B-A14B one_batch_qwen2_moe
}

section_qwen2_moe_fp8() {
  gpu_bench_one_batch configs/Qwen2-57B-A14B one_batch_qwen2_moe_fp8 --quantization fp8
}

section_serving() {  # bench_serving on each MoE shape: 256 x 1024 in / 256 out at rate inf (~2 min each)
  # configs/ hold no tokenizer: the Llama-3 one, with the vocabulary widened to it where the model's is smaller
  local status=0 name tokenizer=.models/llama-3-8b-dummy
  [ -d "$tokenizer" ] || tokenizer=/work/shared/models/llama-3-8b-dummy
  gpu_serve_and_bench Mixtral-8x7B configs/Mixtral-8x7B 256 1024 256 --tokenizer-path "$tokenizer" \
    --json-model-override-args '{"vocab_size": 128256}' || status=1
  gpu_serve_and_bench DeepSeek-V2-Lite configs/DeepSeek-V2-Lite 256 1024 256 --tokenizer-path "$tokenizer" \
    --json-model-override-args '{"vocab_size": 128256}' || status=1
  gpu_serve_and_bench Qwen2-57B-A14B configs/Qwen2-57B-A14B 256 1024 256 --tokenizer-path "$tokenizer" || status=1
  return $status
}

section_families() {
  timeout 900 python3 -m pytest -q -p no:cacheprovider tests/models/test_gpu_models.py tests/kernels/test_fused_moe.py \
    tests/kernels/test_attention.py tests/kernels/test_triton_backend.py tests/kernels/test_mla_decode.py
}

section_moe_kernel() {
  python3 scripts/gpu_kernels_bench.py --only moe --table "$LOG_DIR/moe_kernel.md"
}

section_deepseek() {
  python3 scripts/gpu_kernels_bench.py --only mla --table "$LOG_DIR/mla_kernel.md" || return
  gpu_bench_one_batch configs/DeepSeek-V2-Lite one_batch_deepseek_v2_lite
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(mixtral)

gpu_install_wheels
gpu_run_sections "mixtral qwen2-moe qwen2-moe-fp8 families moe-kernel deepseek serving" -- "${sections[@]}"

for name in mixtral qwen2-moe qwen2-moe-fp8 deepseek; do
  [ -f "$LOG_DIR/$name.log" ] && { echo; echo "--- $name"; grep -E '^\||^model' "$LOG_DIR/$name.log"; }
done
if [ -f "$LOG_DIR/serving.log" ]; then
  echo; grep -E "Ready: serving|Output token throughput|Median TPOT|Median TTFT" "$LOG_DIR/serving.log"
fi
[ -f "$LOG_DIR/moe_kernel.md" ] && { echo; cat "$LOG_DIR/moe_kernel.md"; }
[ -f "$LOG_DIR/mla_kernel.md" ] && { echo; cat "$LOG_DIR/mla_kernel.md"; }
gpu_print_summary
exit "$GPU_FAILED"
