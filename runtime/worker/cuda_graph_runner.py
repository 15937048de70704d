"""CudaGraphRunner: decode steps replayed from CUDA graphs captured at start-up.

A decode step of B rows (every row one new token) runs from the graph captured for the smallest size >= B among
the captured sizes (`capture_batch_sizes`: 1, 2, 4, 8, 12, 16, 24, then steps of 8 to 256, of 16 to 512 and of 32
beyond, up to the running-request cap; or SGLang's `--cuda-graph-bs` list). The graph holds everything from the raw
input ids to the float32 logits of every row:
  placeholder ids resolved from future_tokens -> req_to_token[row, seq_len - 1] = out_slot -> model forward ->
  LM head -> one logits buffer shared by all graphs.
Sizes up to `compile_max_bs` capture a torch.compile'd forward instead of the eager one (--enable-torch-compile).
Its inputs are one int64 [4, size] device tensor per graph (input ids, out slots, request rows, sequence lengths),
filled by one host-to-device copy from pinned memory before the replay: no host sync in the replay path. Padding
rows take input id 0, the padding KV slot 0, the dummy request-table row `dummy_row` and sequence length 1, so they
write only the padding slot and the dummy row; their logits are dropped.

Sampling stays outside the graph (it depends on per-row parameters and host-side choices).

Capture order is largest first: all graphs share one memory pool, and the attention backend's decode scratch, sized
for every graph before the first capture, is never reallocated under a captured graph (each graph also holds a
reference to the scratch views it was captured with, so their memory outlives any later growth). The logits buffer
[largest size, vocab] is allocated once outside the pool: a buffer per graph would cost sum(sizes) x vocab x 4 bytes
(5 GB for sizes up to 512 at Llama-3's 128k vocabulary). Capture is fast: one warm-up forward per size (two for the
first, which compiles the Triton kernels), and no garbage collection in between.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from dataclasses import dataclass

import torch

from runtime.worker.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger(__name__)

# Inputs rows of a graph's int64 [4, size] input tensor.
IDS, OUT_SLOTS, ROWS, SEQ_LENS = range(4)


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, then steps of 8 up to 256, of 16 up to 512, of 32 beyond, and max_batch_size itself
    (ascending): padding wastes at most 1/16 of a large batch, and 512 takes 52 graphs."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    ladder = [1, 2, 4, 8, 12, 16, 24, *range(32, 257, 8), *range(272, 513, 16), *range(544, max_batch_size + 1, 32)]
    sizes = [s for s in ladder if s <= max_batch_size]
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def padded_inputs(input_ids: list[int], out_slots: list[int], rows: list[int], seq_lens: list[int], size: int,
                  dummy_row: int) -> list[list[int]]:
    """The four input rows of a graph of `size`, the batch's entries followed by padding entries."""
    pad = size - len(rows)
    if pad < 0:
        raise ValueError(f"a batch of {len(rows)} rows does not fit a graph of {size}")
    return [input_ids + [0] * pad, out_slots + [0] * pad, rows + [dummy_row] * pad, seq_lens + [1] * pad]


@dataclass
class CapturedGraph:
    size: int
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # int64 [4, size], rows IDS, OUT_SLOTS, ROWS, SEQ_LENS
    logits: torch.Tensor  # float32 [size, vocab]: the front of the shared logits buffer, written by each replay
    scratch: tuple  # the attention backend's decode scratch views used by the graph (kept alive)


class CudaGraphRunner:
    def __init__(self, model, attention, req_to_token: torch.Tensor, future_tokens: torch.Tensor, dummy_row: int,
                 batch_sizes: list[int], context_length: int, compiled_forward=None, compile_max_bs: int = 0):
        self.model = model
        self.attention = attention
        self.req_to_token = req_to_token
        self.future_tokens = future_tokens
        self.dummy_row = dummy_row
        self.context_length = context_length
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive sizes, got {batch_sizes}")
        self.sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.sizes[-1]
        self.compiled_forward = compiled_forward  # torch.compile'd model forward, for sizes <= compile_max_bs
        self.compile_max_bs = compile_max_bs if compiled_forward is not None else 0
        self.device = req_to_token.device
        # graph size for each batch size 0..max
        self.size_for = [self.sizes[bisect.bisect_left(self.sizes, b)] for b in range(self.max_batch_size + 1)]
        self.graphs: dict[int, CapturedGraph] = {}
        self.logits: torch.Tensor | None = None  # shared by every graph's output; allocated by the first warm-up
        self.capture_s = 0.0

    def can_run(self, extend_lens: list[int]) -> bool:
        """A decode batch (every row one new token) no larger than the largest graph."""
        return 0 < len(extend_lens) <= self.max_batch_size and all(e == 1 for e in extend_lens)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        # Size the decode scratch for every graph first: no capture may reallocate it.
        for size in self.sizes:
            self.attention.prepare(self._batch(self._fresh_inputs(size), size))
        pool = torch.cuda.graph_pool_handle()
        # No garbage collection while capturing: freeing an unreachable CUDA graph (of an earlier runner, say)
        # destroys it, an operation that invalidates the capture in progress.
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for i, size in enumerate(reversed(self.sizes)):
                inputs = self._fresh_inputs(size)
                for _ in range(2 if i == 0 else 1):  # warm-up: Triton compilation, cuBLAS workspaces, lazy state
                    self._forward(inputs, size)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(inputs, size)
                self.graphs[size] = CapturedGraph(size, graph, inputs, logits,
                                                  (self.attention.part_o, self.attention.part_lse,
                                                   getattr(self.attention, "merge_counters", None)))
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        log.info("captured %d CUDA graphs (batch sizes %s%s) in %.2f s", len(self.sizes), _ranges(self.sizes),
                 f"; compiled up to {self.compile_max_bs}" if self.compile_max_bs else "", self.capture_s)

    def replay(self, input_ids: list[int], out_slots: list[int], rows: list[int], seq_lens: list[int]
               ) -> torch.Tensor:
        """Run one decode step of len(rows) rows -> float32 logits [len(rows), vocab] (a view of the graph's output
        buffer: valid until the next replay of that graph, which stream order puts after the current readers)."""
        batch_size = len(rows)
        captured = self.graphs[self.size_for[batch_size]]
        host = torch.tensor(padded_inputs(input_ids, out_slots, rows, seq_lens, captured.size, self.dummy_row),
                            dtype=torch.int64, pin_memory=True)
        captured.inputs.copy_(host, non_blocking=True)
        captured.graph.replay()
        return captured.logits[:batch_size]

    def _fresh_inputs(self, size: int) -> torch.Tensor:
        inputs = torch.zeros(4, size, dtype=torch.int64, device=self.device)
        inputs[ROWS] = self.dummy_row
        inputs[SEQ_LENS] = 1
        return inputs

    def _batch(self, inputs: torch.Tensor, size: int) -> ForwardBatch:
        """The step's ForwardBatch over the graph's inputs. max_seq_len is the context length: the attention backend
        picks its split count for the longest sequence a replay may see."""
        ids = inputs[IDS]
        ids = torch.where(ids < 0, self.future_tokens[(-ids - 1).clamp_(min=0)], ids)
        seq_lens = inputs[SEQ_LENS].to(torch.int32)
        positions = inputs[SEQ_LENS] - 1
        index = torch.arange(size, device=self.device)
        return ForwardBatch(mode=ForwardMode.DECODE, batch_size=size, num_tokens=size, input_ids=ids,
                            positions=positions, token_batch_index=index, rows=inputs[ROWS],
                            prefix_lens=seq_lens - 1,
                            extend_lens=torch.ones(size, dtype=torch.int32, device=self.device),
                            seq_lens=seq_lens, extend_start_loc=index.to(torch.int32), out_slots=inputs[OUT_SLOTS],
                            req_to_token=self.req_to_token, prefix_lens_cpu=[], extend_lens_cpu=[1] * size,
                            seq_lens_cpu=[], max_seq_len=self.context_length, max_extend_len=1)

    def _forward(self, inputs: torch.Tensor, size: int) -> torch.Tensor:
        batch = self._batch(inputs, size)
        self.req_to_token[batch.rows, batch.positions] = batch.out_slots.to(torch.int32)
        self.attention.prepare(batch)
        forward = self.compiled_forward if size <= self.compile_max_bs else self.model
        logits = self.model.compute_logits(forward(batch, self.attention))
        if self.logits is None:
            self.logits = torch.empty(self.max_batch_size, logits.shape[1], dtype=logits.dtype, device=logits.device)
        out = self.logits[:size]
        out.copy_(logits)
        return out


def _ranges(sizes: list[int]) -> str:
    return ", ".join(str(s) for s in sizes[:4]) + (f", ..., {sizes[-1]}" if len(sizes) > 4 else "")
