"""The one table of scripts/gpu_saturation.sh: every measurement of issue 20 against its target, from the logs and
JSON files the sections leave in LOG_DIR. Missing inputs (a skipped or failed section) show as "not measured".

    python3 scripts/gpu_saturation_report.py LOG_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NOT_MEASURED = "not measured"


def load_json(path: Path):
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    try:
        return json.loads(text.splitlines()[-1]) if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError:
        return None


def retractions(info: dict | None) -> int | None:
    if not info:
        return None
    state = (info.get("internal_states") or [{}])[0]
    return state.get("retractions")


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def serving_rows(log: Path) -> list[tuple]:
    rows = []
    before = retractions(load_json(log / "info_start_server.json")) or 0
    runs = [("inf_1k", "1000 x 1024/1024, rate inf",
             "--num-prompts 1000 --random-input-len 1024 --random-output-len 1024 --random-range-ratio 1.0"),
            ("inf_4k", "500 x <=4096/<=2048 (range ratio 0), rate inf",
             "--num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"),
            ("rate4_1k", "200 x 1024/1024 at 4 requests/s",
             "--num-prompts 200 --random-input-len 1024 --random-output-len 1024 --random-range-ratio 1.0 "
             "--request-rate 4")]
    for name, what, flags in runs:
        command = f"bench_serving --dataset-name random {flags}"
        result = load_json(log / f"serving_{name}.jsonl")
        after = retractions(load_json(log / f"info_{name}.json"))
        if result is None:
            rows.append((what, command, NOT_MEASURED, "", ""))
            before = after if after is not None else before
            continue
        retracted = None if after is None else after - before
        before = after if after is not None else before
        share = f"; retractions {retracted} ({retracted / max(result['completed'], 1):.1%} of requests)" \
            if retracted is not None else ""
        if name == "rate4_1k":
            text = (f"median TPOT {result['median_tpot_ms']:.2f} ms, P99 ITL {result['p99_itl_ms']:.1f} ms, median "
                    f"TTFT {result['median_ttft_ms']:.0f} ms, median ITL {result['median_itl_ms']:.2f} ms{share}")
            ok = result["median_tpot_ms"] <= 6.5 and result["p99_itl_ms"] <= 20 and result["median_ttft_ms"] <= 70
            rows.append((what, command, text, "TPOT <= 6.5, P99 ITL <= 20, TTFT <= 70 ms", verdict(ok)))
        else:
            target = 12000 if name == "inf_1k" else 5000
            text = (f"{result['output_throughput']:,.0f} out tok/s (median TPOT {result['median_tpot_ms']:.1f} ms, "
                    f"median ITL {result['median_itl_ms']:.2f} ms, P99 ITL {result['p99_itl_ms']:.0f} ms, "
                    f"{result['failed']} failed){share}")
            rows.append((what, command, text, f">= {target:,} tok/s", verdict(result["output_throughput"] >= target)))
        if retracted is not None:
            rows.append((f"retractions, {what}", "server info", f"{retracted}", "< 1% of requests",
                         verdict(retracted < 0.01 * max(result["completed"], 1))))
        gaps = result.get("token_gaps")
        if gaps:
            text = "; ".join(f"{stage} {g['median_gap_ms']:.2f} ms ({g['under_1ms']:.0%} < 1 ms)"
                             for stage, g in gaps.items())
            rows.append((f"inter-token gaps by stage, {what}", "server stamps (--enable-token-timestamps)",
                         "median gap: " + text, "bursts located", ""))
    mixed_off = load_json(log / "serving_rate4_1k_mixed_off.jsonl")
    if mixed_off is not None:
        rows.append(("200 x 1024/1024 at 4 requests/s, --no-enable-mixed-chunk",
                     "the same against a server with --no-enable-mixed-chunk",
                     f"median TPOT {mixed_off['median_tpot_ms']:.2f} ms, P99 ITL {mixed_off['p99_itl_ms']:.1f} ms, "
                     f"median TTFT {mixed_off['median_ttft_ms']:.0f} ms", "compare with mixed chunks", ""))
    server_log = log / "server.log"
    text = server_log.read_text() if server_log.exists() else ""
    capture = re.search(r"captured (\d+) CUDA graphs \(batch sizes ([^)]*)\) in ([\d.]+) s", text)
    sched = re.search(r"scheduler: (\d+) KV slots, (\d+) request rows", text)
    if capture:
        seconds = float(capture.group(3))
        rows.append(("CUDA graph capture at server start", "server log",
                     f"{capture.group(1)} graphs ({capture.group(2)}) in {seconds:.1f} s", "< 20 s",
                     verdict(seconds < 20)))
    if sched:
        rows.append(("sizing from memory", "server log", f"{int(sched.group(1)):,} KV slots, "
                     f"{sched.group(2)} request rows", ">= 512 rows on an H200", verdict(int(sched.group(2)) >= 512)))
    return rows


def one_batch_rows(log: Path) -> list[tuple]:
    eager = load_json(log / "one_batch.json")
    compiled = load_json(log / "one_batch_compile.json")
    command = "bench_one_batch --batch-size 1 8 --input-len 128 --output-len 256"
    rows = []
    by_batch = {r["batch_size"]: r for r in eager or []}
    if 1 in by_batch:
        tok_s = by_batch[1]["decode_tok_s"]
        rows.append(("batch-1 decode", command, f"{tok_s:.1f} tok/s ({by_batch[1]['decode_median_ms']:.2f} ms/step)",
                     ">= 250 tok/s", verdict(tok_s >= 250)))
    else:
        rows.append(("batch-1 decode", command, NOT_MEASURED, ">= 250 tok/s", ""))
    compiled_by_batch = {r["batch_size"]: r for r in compiled or []}
    for batch in (1, 8):
        if batch in by_batch and batch in compiled_by_batch:
            a, b = by_batch[batch]["decode_tok_s"], compiled_by_batch[batch]["decode_tok_s"]
            rows.append((f"--enable-torch-compile, batch {batch}", command + " --enable-torch-compile",
                         f"{b:.1f} tok/s compiled vs {a:.1f} eager ({b / a:.2f}x)", "report", ""))
        else:
            rows.append((f"--enable-torch-compile, batch {batch}", command + " --enable-torch-compile", NOT_MEASURED,
                         "report", ""))
    return rows


def timeline_rows(log: Path) -> list[tuple]:
    table = load_json(log / "timeline.json")
    command = "gpu_step_timeline.py --rows 256 512 --context 1536"
    if not table:
        return [("per-step timeline at 256 / 512 rows", command, NOT_MEASURED, "", "")]
    rows = []
    decode = {r["rows"]: r for r in table if r["part"] == "decode"}
    for r in table:
        if r["part"] == "decode":
            rows.append((f"decode step, {r['rows']} rows x 1536 tokens", command,
                         f"{r['wall_ms']:.2f} ms (device {r['device_ms']:.2f}, worker host {r['host_us']:.0f} µs); "
                         f"{r['note']}", "the bound", ""))
        elif r["part"] == "kernels":
            rows.append((f"decode step kernels, {r['rows']} rows", command, r["note"], "", ""))
        elif r["part"] == "scheduler CPU per step":
            step = decode.get(r["rows"], {}).get("wall_ms")
            ok = None if step is None else r["wall_ms"] < step
            rows.append((f"scheduler CPU per step, {r['rows']} running", command,
                         f"{r['wall_ms']:.2f} ms ({r['host_us']:.1f} µs per request)", "< the GPU step", verdict(ok)))
        elif r["part"].startswith("mixed"):
            low = r["rows"] <= 64
            chunk = r["tokens"] - r["rows"]
            ok = r["wall_ms"] <= 20 if low and chunk == 512 else None
            rows.append((f"mixed step: {r['rows']} decode rows + {chunk}-token chunk", command,
                         f"{r['wall_ms']:.2f} ms; {r['note']}", "<= 20 ms at 32 rows, chunk 512" if low else "",
                         verdict(ok)))
    return rows


def kernel_rows(log: Path) -> list[tuple]:
    path = log / "kernels.md"
    command = "gpu_kernels_bench.py --only decode --decode-shapes saturation"
    if not path.exists():
        return [("decode attention, saturation shapes", command, NOT_MEASURED, ">= 85% of copy", "")]
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 10 and cells[0] == "decode_attention" and cells[9].endswith("%"):
            share = int(cells[9].rstrip("%"))
            rows.append((f"decode attention {cells[1]}", command, f"{cells[2]} µs, {cells[8]} GB/s, {cells[9]} of copy",
                         ">= 85% of copy", verdict(share >= 85)))
    return rows or [("decode attention, saturation shapes", command, "FAILED (see kernels.log)", "", "")]


def main() -> None:
    log = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_saturation")
    env = (log / "env.txt").read_text().strip().replace("\n", "; ") if (log / "env.txt").exists() else ""
    print(f"Serving at saturation (issue 20): {env}; Llama-3-8B shape, bf16, --load-format dummy, default flags")
    print()
    print("| what | command | result | target | |")
    print("| --- | --- | --- | --- | --- |")
    for row in serving_rows(log) + one_batch_rows(log) + timeline_rows(log) + kernel_rows(log):
        print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    sections = log / "sections.txt"
    if sections.exists():
        print()
        print(sections.read_text().strip())


if __name__ == "__main__":
    main()
