"""Static-batch latency benchmark of the model runner, without a server (SGLang's bench_one_batch).

For every (batch size, input length, output length): one prefill step of the whole batch, then
output_len - 1 decode steps, all through ModelRunner.step (paged KV cache, sampler, greedy).
Reports prefill latency and throughput, median decode step latency and decode throughput.
With --compare-hf, transformers' generate runs the same prompts (greedy, min_new_tokens =
max_new_tokens) in the same process as a reference row; its step times are taken by a logits
processor, which generate calls once per new token.

    python -m runtime.bench.one_batch --device cpu --batch-size 1 16 --input-len 128 --output-len 32 --compare-hf \
        --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from runtime.messages import BatchPlan, NewRow, SamplingParams
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 30)


@dataclass
class BenchRow:
    engine: str
    batch_size: int
    input_len: int
    output_len: int
    prefill_ms: float
    prefill_tok_s: float
    decode_median_ms: float
    decode_tok_s: float
    decode_cpu_ms: float  # median process CPU time of a decode step (all threads): robust on a shared machine
    total_s: float


def random_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab_size - 100, (batch_size, input_len), generator=generator)
    return ids.tolist()


def run_ours(runner: ModelRunner, prompts: list[list[int]], output_len: int) -> tuple[BenchRow, list[list[int]]]:
    batch_size, input_len = len(prompts), len(prompts[0])
    rows = list(range(batch_size))
    slot = 1
    prefill = BatchPlan(batch_id=0, rows=rows, prefix_lens=[0] * batch_size, extend_lens=[input_len] * batch_size,
                        input_ids=[t for p in prompts for t in p],
                        out_slots=list(range(slot, slot + batch_size * input_len)), sample=[True] * batch_size,
                        future_slots=rows, new_rows=[NewRow(row=r, prefix_slots=[], sampling=GREEDY) for r in rows])
    slot += batch_size * input_len
    start = time.perf_counter()
    tokens = [[t] for t in runner.step(prefill).next_token_ids]
    prefill_s = time.perf_counter() - start
    step_times, step_cpu = [], []
    for step in range(1, output_len):
        plan = BatchPlan(batch_id=step, rows=rows, prefix_lens=[input_len + step - 1] * batch_size,
                         extend_lens=[1] * batch_size, input_ids=[-(r + 1) for r in rows],  # overlap placeholders
                         out_slots=list(range(slot, slot + batch_size)), sample=[True] * batch_size,
                         future_slots=rows, freed_rows=rows if step == output_len - 1 else [])
        slot += batch_size
        begin, begin_cpu = time.perf_counter(), time.process_time()
        for out, token in zip(tokens, runner.step(plan).next_token_ids):
            out.append(token)
        step_times.append(time.perf_counter() - begin)
        step_cpu.append(time.process_time() - begin_cpu)
    return summarize("ours", batch_size, input_len, output_len, prefill_s, step_times, step_cpu), tokens


def summarize(engine: str, batch_size: int, input_len: int, output_len: int, prefill_s: float,
              step_times: list[float], step_cpu: list[float]) -> BenchRow:
    median = statistics.median(step_times) if step_times else float("nan")
    decode_s = sum(step_times)
    return BenchRow(engine=engine, batch_size=batch_size, input_len=input_len, output_len=output_len,
                    prefill_ms=prefill_s * 1e3, prefill_tok_s=batch_size * input_len / prefill_s,
                    decode_median_ms=median * 1e3,
                    decode_tok_s=batch_size * len(step_times) / decode_s if step_times else float("nan"),
                    decode_cpu_ms=statistics.median(step_cpu) * 1e3 if step_cpu else float("nan"),
                    total_s=prefill_s + decode_s)


def median_row(rounds: list[BenchRow]) -> BenchRow:
    """Per-metric median over rounds of one engine and shape."""
    first = rounds[0]
    metrics = {name: statistics.median(getattr(r, name) for r in rounds)
               for name in ("prefill_ms", "prefill_tok_s", "decode_median_ms", "decode_tok_s", "decode_cpu_ms",
                            "total_s")}
    return BenchRow(engine=first.engine, batch_size=first.batch_size, input_len=first.input_len,
                    output_len=first.output_len, **metrics)


def load_hf_model(runner: ModelRunner, config: ModelRunnerConfig):
    """The same checkpoint in transformers, on the same device and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.model_loader.loader import locate_checkpoint

    checkpoint = locate_checkpoint(config.model_path, config.load_format)
    if config.load_format == "dummy":
        if checkpoint.format == "gguf":
            raise SystemExit("--compare-hf with --load-format dummy needs a config.json folder")
        # random init straight on the device in the model dtype: an 8B model built in float32 on the CPU takes minutes
        with torch.device(runner.device):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint.path),
                                                    dtype=runner.dtype).eval()
    elif checkpoint.format == "gguf":
        model = _hf_from_gguf(checkpoint.path)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path)
    return model.to(device=runner.device, dtype=runner.dtype).eval()


def _hf_from_gguf(path: str):
    # transformers' own GGUF reader, without the accelerate package its from_pretrained path wants
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    fields = load_gguf_checkpoint(path)["config"]
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model


class _StepClock:
    """A transformers logits processor that only records when generate asks for the next token's scores."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        return scores


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], output_len: int, device: torch.device
           ) -> tuple[BenchRow, list[list[int]]]:
    from transformers import LogitsProcessorList

    input_ids = torch.tensor(prompts, device=device)
    clock = _StepClock()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len,
                         logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    sync()
    end = time.perf_counter()
    # the clock ticks before each token is chosen: tick 0 ends the prefill, tick i the i-th decode step
    end_cpu = time.process_time()
    ticks, cpu_ticks = clock.times + [end], clock.cpu_times + [end_cpu]
    step_times = [b - a for a, b in zip(ticks[1:-1], ticks[2:])]
    step_cpu = [b - a for a, b in zip(cpu_ticks[1:-1], cpu_ticks[2:])]
    row = summarize("transformers", len(prompts), len(prompts[0]), output_len, ticks[0] - start, step_times,
                    step_cpu)
    return row, out[:, input_ids.shape[1]:].tolist()


def print_table(rows: list[BenchRow]) -> None:
    header = ["engine", "batch", "input", "output", "prefill ms", "prefill tok/s", "decode median ms",
              "decode tok/s", "decode CPU ms", "total s"]
    lines = [header] + [[r.engine, str(r.batch_size), str(r.input_len), str(r.output_len), f"{r.prefill_ms:.1f}",
                         f"{r.prefill_tok_s:.0f}", f"{r.decode_median_ms:.2f}", f"{r.decode_tok_s:.1f}",
                         f"{r.decode_cpu_ms:.2f}", f"{r.total_s:.2f}"] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("| " + " | ".join(cell.rjust(w) for cell, w in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.one_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: the SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--disable-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    parser.add_argument("--cuda-graph-bs", type=int, nargs="+", default=None,
                        help="batch sizes to capture (default: up to the largest --batch-size)")
    parser.add_argument("--enable-torch-compile", action="store_true",
                        help="decode steps of up to --torch-compile-max-bs rows run a torch.compile'd model")
    parser.add_argument("--torch-compile-max-bs", type=int, default=32)
    parser.add_argument("--quantization", default=None, help="as the server's flag (e.g. fp8)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e5m2", "fp8_e4m3"))
    parser.add_argument("--torchao-config", default="", help="as the server's flag (e.g. int4wo-128)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="as the server's flag (with --quantization)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, nargs="+", default=[16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both engines (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per shape (engines alternate); medians reported")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers' generate")
    parser.add_argument("--check-outputs", action="store_true",
                        help="with --compare-hf, report whether the greedy tokens agree")
    parser.add_argument("--output", default=None, help="write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    for name in ("batch_size", "input_len", "output_len"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} values must be positive")
    return args


def main(argv: list[str] | None = None) -> list[BenchRow]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_batch = max(args.batch_size)
    max_tokens = max(b * (i + o) for b in args.batch_size for i in args.input_len for o in args.output_len)
    config = ModelRunnerConfig(model_path=args.model_path, load_format=args.load_format, dtype=args.dtype,
                               device=args.device, attention_backend=args.attention_backend,
                               max_total_tokens=max_tokens, max_running_requests=max_batch, random_seed=args.seed,
                               context_length=None, disable_cuda_graph=args.disable_cuda_graph,
                               cuda_graph_bs=args.cuda_graph_bs, enable_torch_compile=args.enable_torch_compile,
                               torch_compile_max_bs=args.torch_compile_max_bs,
                               quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                               torchao_config=args.torchao_config, quantize_lm_head=args.quantize_lm_head)
    start = time.perf_counter()
    runner = ModelRunner(config)
    print(f"runner ready in {time.perf_counter() - start:.1f} s (CUDA graphs captured in "
          f"{runner.graph_runner.capture_s if runner.graph_runner else 0:.1f} s"
          f"{', torch.compile up to ' + str(args.torch_compile_max_bs) if args.enable_torch_compile else ''})")
    if max(args.input_len) + max(args.output_len) > runner.context_length:
        raise SystemExit(f"input_len + output_len exceeds the context length {runner.context_length}")
    hf_model = load_hf_model(runner, config) if args.compare_hf else None
    vocab = runner.info.vocab_size

    # warm-up: one small batch through both engines (allocator, kernels, lazy initialisation), and one prompt of the
    # longest input through ours, so kernel variants chosen by token count (the fused MoE's wide tiles) are
    # compiled before a timed prefill
    warm = random_prompts(min(2, max_batch), min(8, min(args.input_len)), vocab, args.seed + 1)
    run_ours(runner, warm, 3)
    run_ours(runner, random_prompts(1, max(args.input_len), vocab, args.seed + 2), 2)
    if hf_model is not None:
        run_hf(hf_model, warm, 3, runner.device)

    rows = []
    for batch_size in args.batch_size:
        for input_len in args.input_len:
            for output_len in args.output_len:
                prompts = random_prompts(batch_size, input_len, vocab, args.seed)
                ours_rounds, hf_rounds = [], []
                for _ in range(args.rounds):  # engines alternate, so a burst of load hits both
                    row, ours = run_ours(runner, prompts, output_len)
                    ours_rounds.append(row)
                    if hf_model is not None:
                        hf_row, theirs = run_hf(hf_model, prompts, output_len, runner.device)
                        hf_rounds.append(hf_row)
                rows.append(median_row(ours_rounds))
                if hf_model is not None:
                    rows.append(median_row(hf_rounds))
                    if args.check_outputs:
                        same = sum(a == b for a, b in zip(ours, theirs))
                        print(f"batch {batch_size} input {input_len} output {output_len}: "
                              f"{same}/{batch_size} greedy outputs identical to transformers")
    print(f"model {runner.info.architecture} ({config.model_path or 'default SmolLM2-135M-Instruct GGUF'}), "
          f"device {runner.info.device}, dtype {runner.info.dtype}, attention {type(runner.attention).__name__}, "
          f"weights {args.quantization or args.torchao_config or 'as loaded'}, KV cache {runner.kv_cache_dtype}, "
          f"CUDA graphs {'off' if runner.graph_runner is None else runner.graph_runner.sizes[-1]}, "
          f"torch.compile {'up to ' + str(args.torch_compile_max_bs) if args.enable_torch_compile else 'off'}, "
          f"torch threads {torch.get_num_threads()}")
    print_table(rows)
    if args.output:
        with open(args.output, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return rows


if __name__ == "__main__":
    main()
