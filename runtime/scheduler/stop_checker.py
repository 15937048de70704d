"""Finish conditions of a request, checked by the scheduler after every received token.

Order (SGLang's): the max_new_tokens length limit, then the context limit, then (once
min_new_tokens are out) EOS / stop token ids, then stop strings, then stop_regex patterns
(runtime/stop_regex.py). Stop strings and patterns are matched on text:
only the tail of the output is decoded, enough tokens to hold the longest stop string (a token decodes to at least one
character except for partial UTF-8 bytes, hence the slack), so the cost per token does not grow with the output.
"""

from __future__ import annotations

from collections.abc import Callable

from runtime import stop_regex
from runtime.messages import FinishReason, SamplingParams

# Tail tokens decoded beyond the longest stop string's length in characters: covers tokens that
# decode to nothing on their own (parts of a multi-byte character).
STOP_TAIL_SLACK_TOKENS = 8

Decode = Callable[[list[int]], str]


def make_decode(tokenizer) -> Decode | None:
    """A decode function for stop strings from an HF tokenizer (None when there is none)."""
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class StopChecker:
    def __init__(self, eos_token_ids: list[int], context_limit: int, decode: Decode | None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_limit = context_limit  # total tokens (prompt + output) a request may reach
        self.decode = decode  # None (skip_tokenizer_init): stop strings cannot be checked

    def check(self, sampling: SamplingParams, prompt_len: int, output_ids: list[int]) -> FinishReason | None:
        """Whether the request finishes with its newest token output_ids[-1]."""
        if len(output_ids) >= sampling.max_new_tokens:
            return FinishReason(type="length", length=sampling.max_new_tokens)
        if prompt_len + len(output_ids) >= self.context_limit:
            return FinishReason(type="length", length=len(output_ids))
        if len(output_ids) < sampling.min_new_tokens:
            return None  # the sampler masks EOS and stop ids until then; stop strings wait too
        token = output_ids[-1]
        if not sampling.ignore_eos and token in self.eos_token_ids:
            return FinishReason(type="stop", matched=token)
        if token in sampling.stop_token_ids:
            return FinishReason(type="stop", matched=token)
        if sampling.stop and self.decode is not None:
            longest = max(len(s) for s in sampling.stop)
            tail = self.decode(output_ids[-(longest + STOP_TAIL_SLACK_TOKENS):])
            # The newest token can only complete a stop string that ends in its own text, but a
            # stop string wholly inside the tail was already found on an earlier token; checking
            # the tail as a whole is simpler and equally correct.
            for stop in sampling.stop:
                if stop and stop in tail:
                    return FinishReason(type="stop", matched=stop)
        if sampling.stop_regex and self.decode is not None:
            tail = self.decode(output_ids[-(stop_regex.window(sampling.stop_regex) + STOP_TAIL_SLACK_TOKENS):])
            found = stop_regex.search(sampling.stop_regex, tail)
            if found is not None:
                return FinishReason(type="stop", matched=found[0], matched_text=found[1])
        return None

    def tokens_left(self, sampling: SamplingParams, prompt_len: int, generated: int) -> int:
        """How many more tokens the request may produce at most (length and context limits)."""
        return max(0, min(sampling.max_new_tokens - generated, self.context_limit - prompt_len - generated))
