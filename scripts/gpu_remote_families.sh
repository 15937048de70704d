#!/usr/bin/env bash
# The families whose code lives in their checkpoint repositories, on one GPU, in one call. Each section's output goes
# to the terminal and to $LOG_DIR/<section>.log; a summary table comes last.
#
#   bash scripts/gpu_remote_families.sh                      # check baichuan2-13b minicpm3-4b (~8 min)
#   bash scripts/gpu_remote_families.sh check                # sections in the order given
#
# Sections:
#   check          every remote family's tiny checkpoint on CUDA in bfloat16 against its float32 reference
#                  (tests/models/test_remote_families.py -k cuda), the ALiBi attention kernels and the GeGLU fused MoE
#                  (~3 min, mostly Triton compiles)
#   baichuan2-13b  configs/Baichuan2-13B-Chat (28 GB bf16, ALiBi through the Triton kernels and CUDA graphs):
#                  bench_one_batch batch 1 and 64, input 1024, output 128 (~2 min)
#   minicpm3-4b    configs/MiniCPM3-4B (8 GB bf16, MLA: latent cache, MLA decode kernel, CUDA graphs), same shapes
#
# LOG_DIR is $OUT when set (the device tool brings back what lands there), else /tmp/gpu_remote_families.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/gpu_remote_families}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
# shellcheck source=scripts/gpu_sections.sh
source scripts/gpu_sections.sh

section_check() {
  timeout 900 python3 -m pytest -q -p no:cacheprovider tests/models/test_remote_families.py -k cuda \
    && timeout 600 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention.py \
      tests/kernels/test_triton_backend.py tests/kernels/test_fused_moe.py -k "alibi or gelu"
}

section_baichuan2_13b() {
  gpu_bench_one_batch configs/Baichuan2-13B-Chat one_batch_baichuan2_13b
}

section_minicpm3_4b() {
  gpu_bench_one_batch configs/MiniCPM3-4B one_batch_minicpm3_4b
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(check baichuan2-13b minicpm3-4b)

gpu_install_wheels
gpu_run_sections "check baichuan2-13b minicpm3-4b" -- "${sections[@]}"

for name in baichuan2-13b minicpm3-4b; do
  [ -f "$LOG_DIR/$name.log" ] && { echo; echo "--- $name"; grep -E '^\||^model' "$LOG_DIR/$name.log"; }
done
gpu_print_summary
exit "$GPU_FAILED"
