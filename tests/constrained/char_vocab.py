"""A character-level vocabulary for grammar tests without a model: token i is one character (plus a few
words and the family markers as single tokens), and the last token is the stop token. `sample_grammar`
walks a grammar by picking random allowed tokens, so a test can check what any output it allows looks like."""

from __future__ import annotations

import random

import torch
import xgrammar as xgr

from runtime.constrained import backend
from runtime.constrained.tool_parsers.deepseekv3 import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from runtime.messages import GrammarSpec

MARKERS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "<|python_tag|>", CALLS_BEGIN,
           CALLS_END, CALL_BEGIN, CALL_END, SEP, "```json"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "é", "ü", "｜", "▁"]  # every character of the markers
VOCAB = CHARS + ["Paris", "name", "true", "false"] + MARKERS + ["</s>"]
STOP = len(VOCAB) - 1


def char_compiler() -> xgr.GrammarCompiler:
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[STOP])
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def matches(compiler: xgr.GrammarCompiler, spec: GrammarSpec, text: str) -> bool:
    matcher = xgr.GrammarMatcher(backend.compile_grammar(compiler, spec))
    return matcher.accept_string(text) and matcher.is_completed()


def sample_grammar(compiler: xgr.GrammarCompiler, spec: GrammarSpec, rng: random.Random, max_tokens: int = 400,
                   stop_bias: float = 0.5) -> str | None:
    """A random text the grammar accepts (None if it did not end within max_tokens). Once the grammar may
    end, it ends with probability `stop_bias` per step."""
    matcher = xgr.GrammarMatcher(backend.compile_grammar(compiler, spec))
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    out = []
    for _ in range(max_tokens):
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0].tolist()
        allowed = [t for t in range(len(VOCAB)) if (words[t // 32] >> (t % 32)) & 1]
        if STOP in allowed and (len(allowed) == 1 or rng.random() < stop_bias):
            return "".join(out)
        token = rng.choice([t for t in allowed if t != STOP])
        assert matcher.accept_token(token)
        out.append(VOCAB[token])
    return None


def allowed_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    words = bitmask_row.tolist()
    return [t for t in range(vocab_size) if (words[t // 32] >> (t % 32)) & 1]
