"""One table from scripts/gpu_quant.sh's fp8-gemm section: the weight-only fp8 GEMM against cuBLAS bf16 and the
previous fp8 path (_scaled_mm) per Llama-3-8B decode shape, with the sweep's best tiles, then bench_one_batch's
decode throughput bf16 vs --quantization fp8. Reads what the section wrote to its log folder; missing parts are
left out.

    python3 scripts/fp8_gemm_report.py LOG_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def main(log_dir: Path) -> int:
    lines = ["| part | case | fp8 | bf16 | fp8 speedup | _scaled_mm fp8 | weight GB/s | of copy | rel err | "
             "sweep best |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    bench = load(log_dir / "fp8_gemm.json")
    sweep = load(log_dir / "fp8_gemm_sweep.json")
    best = {}
    if sweep:
        for row in sweep["rows"]:
            if row["kernel"].startswith("fp8_gemm sweep"):
                best[row["case"]] = f"{row['triton_graph_us']:.1f} us, {row['note'].split(';')[0]}"
    if bench:
        bandwidth = bench["copy_bandwidth"]
        for row in bench["rows"]:
            if row["kernel"] != "fp8_gemm weight-only":
                continue
            us, bf16_us, scaled_us = row["triton_graph_us"], row["torch_graph_us"], row["other_graph_us"]
            rate = row["bytes_moved"] / (us * 1e-6)
            lines.append(f"| GEMM us (CUDA graph) | {row['case']} | {us:.1f} | {bf16_us:.1f} | {bf16_us / us:.2f}x | "
                         f"{scaled_us:.1f} | {rate / 1e9:.0f} | {rate / bandwidth:.0%} | {row['rel_err']:.1e} | "
                         f"{best.get(row['case'], '')} |")
    runs = {kind: load(log_dir / f"fp8_gemm_one_batch_{kind}.json") for kind in ("bf16", "fp8")}
    if runs["bf16"] and runs["fp8"]:
        for fp8 in runs["fp8"]:
            bf16 = next((r for r in runs["bf16"] if r["batch_size"] == fp8["batch_size"]), None)
            if bf16 is None:
                continue
            case = f"batch {fp8['batch_size']} ({fp8['input_len']} in / {fp8['output_len']} out)"
            ratio = fp8["decode_tok_s"] / bf16["decode_tok_s"] if bf16["decode_tok_s"] else math.nan
            lines.append(f"| bench_one_batch decode tok/s | {case} | {fp8['decode_tok_s']:.0f} | "
                         f"{bf16['decode_tok_s']:.0f} | {ratio:.2f}x | | | | | step {fp8['decode_median_ms']:.2f} ms "
                         f"vs {bf16['decode_median_ms']:.2f} ms |")
    if bench:
        lines.insert(0, f"copy bandwidth {bench['copy_bandwidth'] / 1e12:.2f} TB/s; GEMM rows: graph-replayed device "
                        "time per call, weights cycled past L2; fp8 speedup = bf16 time / fp8 time (GEMM) or "
                        "fp8 tok/s / bf16 tok/s (bench_one_batch)\n")
    print("\n".join(lines))
    return 0 if len(lines) > 3 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
