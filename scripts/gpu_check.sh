#!/usr/bin/env bash
# GPU validation in one call. Sections run in order; each one's output goes to the terminal and to
# $LOG_DIR/<section>.log; a summary table comes last (with the kernel benchmark table just before it).
#
#   bash scripts/gpu_check.sh                          # every section
#   bash scripts/gpu_check.sh kernel-tests kernel-bench # chosen sections, in the order given
#   bash scripts/gpu_check.sh kernel-sweep              # optional sections are run only when named
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
OPTIONAL=(kernel-sweep)

section_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
}

section_kernel_tests() {
  # The kernel tests pick CUDA when present: fp32, bf16 and fp16 against the torch references.
  local parallel=()
  python3 -c "import xdist" 2>/dev/null && parallel=(-n 4)
  python3 -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_kernels_*.py
}

section_kernel_bench() {
  python3 scripts/gpu_kernels_bench.py --table "$LOG_DIR/kernels_bench.md"
}

section_kernel_sweep() {
  # The benchmark plus other tile shapes and split counts of the attention kernels, to choose their defaults.
  python3 scripts/gpu_kernels_bench.py --sweep --table "$LOG_DIR/kernels_bench.md"
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=("${ALL[@]}")
for name in "${sections[@]}"; do
  if ! declare -F "section_${name//-/_}" >/dev/null; then
    echo "unknown section '$name'; known: ${ALL[*]} ${OPTIONAL[*]}" >&2
    exit 2
  fi
done

if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import msgspec" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

summary=()
failed=0
for name in "${sections[@]}"; do
  echo "=== $name ==="
  start=$(date +%s)
  "section_${name//-/_}" 2>&1 | tee "$LOG_DIR/$name.log"
  status=${PIPESTATUS[0]}
  [ "$status" -ne 0 ] && failed=1
  summary+=("| $name | $([ "$status" -eq 0 ] && echo ok || echo "FAILED ($status)") | $(( $(date +%s) - start )) s |")
done

if [ -f "$LOG_DIR/kernels_bench.md" ]; then
  echo
  cat "$LOG_DIR/kernels_bench.md"
fi
echo
echo "| section | result | time |"
echo "| --- | --- | --- |"
printf '%s\n' "${summary[@]}"
exit "$failed"
