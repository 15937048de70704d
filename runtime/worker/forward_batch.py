"""ForwardBatch: everything one forward step needs, as device tensors plus a few host-side facts.

The ModelRunner builds one per BatchPlan; the model layers read positions from it and hand it to the
attention backend, which reads the paging metadata. Token-major tensors ([T]) list the new tokens of
row 0, then row 1, ...; row-major tensors ([B]) follow the order of the plan's rows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # at least one row computes more than one new token (prefill chunks, maybe mixed with decode)
    DECODE = "decode"  # every row computes exactly one new token


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int  # B, rows in the step
    num_tokens: int  # T, new tokens in the step (sum of extend_lens)
    input_ids: torch.Tensor  # int64 [T], placeholders already resolved
    positions: torch.Tensor  # int64 [T], position of each new token in its sequence
    token_batch_index: torch.Tensor  # int64 [T], batch row (0..B-1) each new token belongs to
    rows: torch.Tensor  # int64 [B], request-table rows
    prefix_lens: torch.Tensor  # int32 [B], tokens already in the KV cache
    extend_lens: torch.Tensor  # int32 [B], new tokens per row
    seq_lens: torch.Tensor  # int32 [B], prefix_lens + extend_lens
    extend_start_loc: torch.Tensor  # int32 [B], offset of each row's first new token in the [T] tensors
    out_slots: torch.Tensor  # int64 [T], KV slots where the new tokens' k/v are stored
    req_to_token: torch.Tensor  # int32 [R, C], the request table: KV slot of every cached token of every row
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_seq_len: int
    max_extend_len: int
    # [T, hidden]: the new tokens' input embeddings when some are image tokens (runtime/worker/image_encoder.py);
    # None: the model embeds input_ids itself
    input_embeds: torch.Tensor | None = None
    # [3, T]: M-RoPE position ids (Qwen2-VL) when a row of the step holds images; None: `positions` everywhere
    rope_positions: torch.Tensor | None = None

    @classmethod
    def build(cls, *, input_ids: torch.Tensor, out_slots: torch.Tensor, rows: list[int], prefix_lens: list[int],
              extend_lens: list[int], req_to_token: torch.Tensor) -> ForwardBatch:
        """Derive positions and the per-row metadata from the host lists. `input_ids` and `out_slots` are already
        on the device (the runner resolves placeholders there); everything else is copied over in one transfer."""
        device = input_ids.device
        batch_size = len(rows)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        starts, offset = [], 0
        for e in extend_lens:
            starts.append(offset)
            offset += e
        meta = torch.tensor([rows, prefix_lens, extend_lens, seq_lens, starts], dtype=torch.int64).to(
            device, non_blocking=True)
        prefix_lens_t = meta[1].to(torch.int32)
        extend_lens_t = meta[2].to(torch.int32)
        # positions: prefix_len of the token's row + index of the token within the row's new tokens
        token_batch_index = torch.repeat_interleave(torch.arange(batch_size, device=device), meta[2],
                                                    output_size=offset)
        positions = torch.arange(offset, device=device) - meta[4][token_batch_index] + meta[1][token_batch_index]
        is_decode = all(e == 1 for e in extend_lens)
        return cls(
            mode=ForwardMode.DECODE if is_decode else ForwardMode.EXTEND,
            batch_size=batch_size,
            num_tokens=offset,
            input_ids=input_ids,
            positions=positions,
            token_batch_index=token_batch_index,
            rows=meta[0],
            prefix_lens=prefix_lens_t,
            extend_lens=extend_lens_t,
            seq_lens=meta[3].to(torch.int32),
            extend_start_loc=meta[4].to(torch.int32),
            out_slots=out_slots,
            req_to_token=req_to_token,
            prefix_lens_cpu=list(prefix_lens),
            extend_lens_cpu=list(extend_lens),
            seq_lens_cpu=seq_lens,
            max_seq_len=max(seq_lens, default=0),
            max_extend_len=max(extend_lens, default=0),
        )
