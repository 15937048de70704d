"""Perplexity of the served model on a fixed text, through ModelRunner (the paged KV cache, the attention backend
and any quantization exactly as a server runs them): `python -m runtime.bench.perplexity`. scripts/quant_quality.py
runs it for every quantization option against the model's own dtype (tests/bench/test_perplexity.py asserts the
bounds of QUALITY_OPTIONS).

The text is prefilled in chunks with prompt logprobs on (the torch backend reads every key and value back from the
KV cache, fp8 or not, whatever the chunk size; the Triton one reads the earlier chunks' from it); perplexity =
exp(-mean log p(token | previous tokens)) over every token but the first. The default text (perplexity_text.txt,
1,743 SmolLM2 tokens) was written for this project.

    python -m runtime.bench.perplexity --quantization fp8 --kv-cache-dtype fp8_e4m3
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from runtime.messages import BatchPlan, LogprobOptions, NewRow, SamplingParams
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig

DEFAULT_TEXT = Path(__file__).with_name("perplexity_text.txt")


@dataclass(frozen=True)
class QualityOption:
    """A quantization option and the most its perplexity may rise over the model's own dtype."""

    name: str
    runner_options: dict
    max_rise: float | None  # None: measured, not bounded


QUALITY_OPTIONS = [
    QualityOption("fp8 weights", {"quantization": "fp8"}, 0.03),
    QualityOption("fp8 weights + LM head", {"quantization": "fp8", "quantize_lm_head": True}, 0.05),  # +3.7% here
    QualityOption("fp8_e4m3 KV", {"kv_cache_dtype": "fp8_e4m3"}, 0.03),
    QualityOption("fp8_e5m2 KV", {"kv_cache_dtype": "fp8_e5m2"}, 0.05),  # 2 mantissa bits: see docs/quantization.md
    QualityOption("int4wo-128", {"torchao_config": "int4wo-128"}, 0.10),
    QualityOption("fp8 weights + fp8_e4m3 KV", {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"}, None),
    QualityOption("int4wo-64", {"torchao_config": "int4wo-64"}, None),
    QualityOption("int8wo", {"torchao_config": "int8wo"}, None),
    QualityOption("fp8wo", {"torchao_config": "fp8wo"}, None),
]
# The SRT page's quick-start prompts (greedy), and what a correct answer contains.
QUICK_START = [("The capital of France is", "Paris"), ("Once upon a time,", None)]


def perplexity(runner: ModelRunner, token_ids: list[int], chunk_size: int = 512) -> float:
    """Perplexity of `token_ids` (at least 2) under the runner's model; uses request row 0 and slots 1..n."""
    n = len(token_ids)
    if n < 2 or n > runner.max_total_tokens or n > runner.context_length:
        raise ValueError(f"need 2..{min(runner.max_total_tokens, runner.context_length)} tokens, got {n}")
    logprobs: list[float] = []
    new_rows = [NewRow(row=0, prefix_slots=[], sampling=SamplingParams(temperature=0.0),
                       logprobs=LogprobOptions(logprob_start_len=0))]
    for batch_id, start in enumerate(range(0, n, chunk_size)):
        end = min(n, start + chunk_size)
        last = end == n
        plan = BatchPlan(batch_id=batch_id, rows=[0], prefix_lens=[start], extend_lens=[end - start],
                         input_ids=token_ids[start:end], out_slots=list(range(start + 1, end + 1)), sample=[last],
                         future_slots=[0 if last else -1], new_rows=new_rows, freed_rows=[0] if last else [])
        new_rows = []
        result = runner.step(plan)
        logprobs += result.prompt_logprobs[0].logprobs
    if len(logprobs) != n - 1:
        raise RuntimeError(f"got {len(logprobs)} prompt logprobs for {n} tokens")
    return math.exp(-sum(logprobs) / len(logprobs))


def greedy(runner: ModelRunner, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` through the runner (row 0, slots from 1), one step at a time."""
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    tokens, out = list(prompt), []
    new_rows = [NewRow(row=0, prefix_slots=[], sampling=sampling)]
    prefix, extend = 0, len(prompt)
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        plan = BatchPlan(batch_id=step, rows=[0], prefix_lens=[prefix], extend_lens=[extend],
                         input_ids=tokens[prefix:], out_slots=list(range(prefix + 1, prefix + extend + 1)),
                         sample=[True], future_slots=[0], new_rows=new_rows, freed_rows=[0] if last else [])
        new_rows = []
        token = runner.step(plan).next_token_ids[0]
        out.append(token)
        tokens.append(token)
        prefix, extend = prefix + extend, 1
    return out


def encode_text(runner_config: ModelRunnerConfig, text: str) -> list[int]:
    from runtime.server_args import ServerArgs
    from runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ServerArgs(model_path=runner_config.model_path))
    return tokenizer.encode(text, add_special_tokens=False)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.perplexity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: the SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e5m2", "fp8_e4m3"))
    parser.add_argument("--torchao-config", default="")
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the text")
    parser.add_argument("--chunk-size", type=int, default=512)
    args = parser.parse_args(argv)
    config = ModelRunnerConfig(model_path=args.model_path, dtype=args.dtype, device=args.device,
                               attention_backend=args.attention_backend, quantization=args.quantization,
                               kv_cache_dtype=args.kv_cache_dtype, torchao_config=args.torchao_config,
                               max_running_requests=1, max_total_tokens=8192)
    token_ids = encode_text(config, Path(args.text_file).read_text())[:args.max_tokens]
    value = perplexity(ModelRunner(config), token_ids, args.chunk_size)
    print(f"perplexity {value:.4f} over {len(token_ids)} tokens")
    return value


if __name__ == "__main__":
    main()
