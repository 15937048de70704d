"""Output-token penalties: per-row token counts and the logit transform that uses them.

Which tokens count: only the tokens a request has generated (its output), never its prompt. This is
what SGLang's penalizers do today (`BatchedRepetitionPenalizer`: "penalizes tokens based on their
presence in the generated output"; frequency and presence likewise). HF transformers' repetition
penalty also covers the prompt; we do not, so a long prompt never silently suppresses its own words.

Order, applied to the raw logits of rows that use penalties:
  1. repetition_penalty r (CTRL paper): a token seen in the output has its logit divided by r when
     positive, multiplied by r when negative;
  2. frequency_penalty f and presence_penalty p (OpenAI): logit -= f * count + p * (count > 0).
A row with r = 1, f = 0, p = 0 is left bit-for-bit unchanged.
"""

from __future__ import annotations

import torch


class PenaltyCounts:
    """How many times each token occurs in each row's output: a [max_rows, vocab] float32 tensor on
    the device, allocated on the first `reset_row(..., allocate=True)` (a row that uses penalties),
    so a server that never sees a penalty never pays max_rows * vocab * 4 bytes."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.counts: torch.Tensor | None = None

    @property
    def allocated(self) -> bool:
        return self.counts is not None

    def reset_row(self, row: int, prior_output_ids: torch.Tensor | None, allocate: bool) -> None:
        """Start `row` over, counting `prior_output_ids` (int64 token ids on the device, generated
        before a retraction)."""
        if self.counts is None:
            if not allocate:
                return
            self.counts = torch.zeros(self.max_rows, self.vocab_size, dtype=torch.float32, device=self.device)
        self.counts[row].zero_()
        if prior_output_ids is not None and prior_output_ids.numel() > 0:
            ones = torch.ones(prior_output_ids.numel(), dtype=torch.float32, device=self.device)
            self.counts[row].index_add_(0, prior_output_ids, ones)

    def record(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one new token per row (rows are distinct, so a plain indexed add is exact)."""
        if self.counts is not None:
            self.counts[rows, token_ids] += 1.0

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        assert self.counts is not None, "no row uses penalties"
        return self.counts.index_select(0, rows)


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float32
    counts: torch.Tensor,  # [B, V] float32 output-token counts
    repetition: torch.Tensor,  # [B]
    frequency: torch.Tensor,  # [B]
    presence: torch.Tensor,  # [B]
) -> torch.Tensor:
    """Return penalised logits (a new tensor; `logits` is not modified)."""
    seen = counts > 0
    rep = repetition[:, None]
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    penalised = torch.where(seen, scaled, logits)
    return penalised - frequency[:, None] * counts - presence[:, None] * seen
