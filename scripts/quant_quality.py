"""Quality of every quantization option on the CPU with the default model (SmolLM2-135M-Instruct): perplexity on
runtime/bench/perplexity_text.txt against the model's own dtype, and the SRT page's quick-start prompts, greedy.
Prints a markdown table; exits 1 if a bounded option rises past its bound.

    python scripts/quant_quality.py [--max-tokens N] [--only "fp8 weights,int4wo-128"]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.bench.perplexity import DEFAULT_TEXT, QUALITY_OPTIONS, QUICK_START, greedy, perplexity  # noqa: E402
from runtime.server_args import ServerArgs  # noqa: E402
from runtime.tokenizer import load_tokenizer  # noqa: E402
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the text")
    parser.add_argument("--only", default=None, help="comma-separated option names")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per quick-start prompt")
    args = parser.parse_args()
    tokenizer = load_tokenizer(ServerArgs())
    ids = tokenizer.encode(DEFAULT_TEXT.read_text(), add_special_tokens=False)[:args.max_tokens]
    options = [o for o in QUALITY_OPTIONS if args.only is None or o.name in args.only.split(",")]
    rows, failed, base = [], False, None
    for name, runner_options, bound in [("model dtype (float32)", {}, None)] + [
            (o.name, o.runner_options, o.max_rise) for o in options]:
        runner = ModelRunner(ModelRunnerConfig(device="cpu", max_running_requests=1, max_total_tokens=len(ids) + 64,
                                               **runner_options))
        value = perplexity(runner, ids)
        base = base or value
        rise = value / base - 1
        answers = []
        for prompt, expected in QUICK_START:
            text = tokenizer.decode(greedy(runner, tokenizer.encode(prompt, add_special_tokens=False),
                                           args.new_tokens))
            ok = expected is None or expected in text
            failed |= not ok
            answers.append(repr(text) + ("" if ok else " WRONG"))
        over = bound is not None and rise >= bound
        failed |= over
        bound_text = "" if bound is None else f"< {bound:.0%}" + (" FAILED" if over else "")
        rows.append(f"| {name} | {value:.3f} | {rise:+.2%} | {bound_text} | " + " | ".join(answers) + " |")
        print(rows[-1], flush=True)
    print(f"\nperplexity over {len(ids)} tokens, chunks of 512 through the paged KV cache (torch backend, CPU)\n")
    print("| option | perplexity | rise | bound | " + " | ".join(p for p, _ in QUICK_START) + " |")
    print("| --- | ---: | ---: | --- | " + " | ".join("---" for _ in QUICK_START) + " |")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
