"""How many prompt tokens may ride with the decode rows of one step.

Every running stream waits for a step that also prefills, so a prefill chunk beside decode rows is paid by all of
them. The chunk is sized from the worker's measured step times (BatchResult.forward_ms): a mixed step should cost
at most MIXED_STEP_FACTOR decode steps of the current batch. After a mixed step that took longer the chunk shrinks;
after one that used its whole chunk and stayed under the target it grows; between MIN_MIXED_CHUNK and
--chunked-prefill-size. Few decode rows (a step of ~6 ms on an H200 for Llama-3-8B) keep chunks at the 512-token
floor, so a stream's gap stays near twice its decode step; a large batch (a 30-40 ms step at 500 rows) lets
chunks grow towards the cap, so prompts fill the batch quickly when every stream's step is long anyway.

The rule only trades the running streams' gaps against each other while the queue is short. When at least as many
requests wait as decode (a burst, a batch that is still filling), the waiting ones get no tokens at all until they
are prefilled, and the floor admits a 1k prompt every two steps: the whole --chunked-prefill-size goes to them.
"""

from __future__ import annotations

MIXED_STEP_FACTOR = 2.0  # a mixed step may cost this many decode steps
# A 1k prompt in at most two steps, however short the decode step: on the H200 at 4 requests/s of 1k prompts a
# floor of 256 (four mixed steps per arrival) gave a median TPOT of 11.8 ms and TTFT of 183 ms, a fixed 512-token
# chunk 9.9 ms and 126 ms (docs/perf.md, saturation run 2).
MIN_MIXED_CHUNK = 512
START_CHUNK = 512
SHRINK, GROW = 0.8, 1.25
DECODE_EMA = 0.2  # weight of the newest decode-only step in the decode step time


class MixedChunkSize:
    def __init__(self, max_chunk: int):
        self.max_chunk = max_chunk
        self.size = min(max_chunk, START_CHUNK)
        self.decode_ms: float | None = None  # recent decode-only step time

    def budget(self, num_decode: int, num_waiting: int) -> int:
        """Prompt tokens for a step beside num_decode decode rows while num_waiting requests wait for admission."""
        return self.max_chunk if num_waiting >= num_decode else self.size

    def observe(self, num_decode: int, prefill_tokens: int, forward_ms: float) -> None:
        """A step's result: how many decode rows and prompt tokens it computed, in how many ms."""
        if forward_ms <= 0 or num_decode == 0:
            return
        if prefill_tokens == 0:
            self.decode_ms = forward_ms if self.decode_ms is None else (
                self.decode_ms + DECODE_EMA * (forward_ms - self.decode_ms))
        elif self.decode_ms is not None:
            if forward_ms > MIXED_STEP_FACTOR * self.decode_ms:
                self.size = max(min(MIN_MIXED_CHUNK, self.max_chunk), int(self.size * SHRINK))
            elif prefill_tokens >= self.size:  # the chunk was the limit, and it was cheap enough
                self.size = min(self.max_chunk, int(self.size * GROW) + 1)
