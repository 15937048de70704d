"""Grammar state of the request-table rows on a worker, and the token mask of each step.

A constrained row has an xgrammar matcher: which tokens the grammar allows next. The mask for a row's
step N+1 depends on the token sampled at step N, and with overlap step N+1 is launched before step N's
tokens have reached the host. So the matcher is advanced lazily, on the worker, right where the mask is
needed: `record()` notes, after sampling, which step holds each row's new token (no sync); `mask()` for
the next step first waits for those tokens (the host copy that step already started), feeds them to the
matchers and fills the bitmask. By then the next step's forward pass is queued on the device, so the
matcher work runs on the host while the device computes: the device waits only if that work takes longer
than a forward pass. Batches without constrained rows skip all of this.

Retraction: a re-admitted row gets a fresh matcher fed with the tokens it had produced (prior_output_ids).
A matcher that has accepted a stop token is terminated: its row may still be in the next batch (the
scheduler learns of the finish one step late), and only the stop tokens are allowed there.

xgrammar (about a second of imports, transformers' tokenizer code with it) is imported by the first constrained
row, not at the worker's start: a server that never sees a grammar never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

log = logging.getLogger(__name__)


class StepTokens:
    """The sampled ids of one step, read on the host once, when a matcher first needs them. `step` is
    the runner's PendingStep: `token_ids` (a host tensor) is valid once its `done` event has fired."""

    __slots__ = ("step", "_values")

    def __init__(self, step):
        self.step = step
        self._values: list[int] | None = None

    def values(self) -> list[int]:
        if self._values is None:
            if self.step.done is not None:
                self.step.done.synchronize()
            self._values = self.step.token_ids.tolist()
        return self._values


@dataclass
class _RowState:
    matcher: xgr.GrammarMatcher
    unaccepted: list[tuple[StepTokens, int]] = field(default_factory=list)  # sampled, not fed to the matcher


@dataclass
class TokenMask:
    """A step's bitmask on the device: bit t of row i set = token t allowed; only `indices` are masked."""

    bitmask: torch.Tensor  # int32 [B, ceil(vocab / 32)]
    indices: list[int]
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        """Set the forbidden tokens' logits to -inf, in place (float32 [B, vocab])."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.vocab_size, indices=self.indices)


class RowMatchers:
    def __init__(self, vocab_size: int, stop_token_ids: list[int], device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self._pin = device.type == "cuda"
        self.stop_token_ids = list(stop_token_ids)
        self._rows: dict[int, _RowState] = {}
        self._filler: xgr.BatchGrammarMatcher | None = None  # with the first row
        self._stop_only: torch.Tensor | None = None  # a terminated matcher's row: only the stop tokens

    def __len__(self) -> int:
        return len(self._rows)

    def add_row(self, row: int, compiled: xgr.CompiledGrammar, prior_output_ids: Sequence[int] = ()) -> None:
        import xgrammar as xgr

        if self._filler is None:
            self._filler = xgr.BatchGrammarMatcher()
            self._stop_only = torch.zeros(xgr.get_bitmask_shape(1, self.vocab_size), dtype=torch.int32)
            for token in self.stop_token_ids:
                self._stop_only[0, token // 32] |= 1 << (token % 32)
        matcher = xgr.GrammarMatcher(compiled)
        for token in prior_output_ids:
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
        self._rows[row] = _RowState(matcher)

    def free_row(self, row: int) -> None:
        self._rows.pop(row, None)

    def mask(self, rows: Sequence[int]) -> TokenMask | None:
        """The mask of a step that samples `rows` (request-table rows, in sampling order), or None when
        none of them is constrained."""
        positions = [i for i, row in enumerate(rows) if row in self._rows]
        if not positions:
            return None
        import xgrammar as xgr

        states = [self._rows[rows[i]] for i in positions]
        _catch_up(states)
        bitmask = torch.empty(xgr.get_bitmask_shape(len(rows), self.vocab_size), dtype=torch.int32,
                              pin_memory=self._pin)
        live = [(i, s.matcher) for i, s in zip(positions, states) if not s.matcher.is_terminated()]
        if live:
            self._filler.batch_fill_next_token_bitmask([m for _, m in live], bitmask, [i for i, _ in live])
        for i, state in zip(positions, states):
            if state.matcher.is_terminated():
                bitmask[i] = self._stop_only[0]
        return TokenMask(bitmask.to(self.device, non_blocking=True), positions, self.vocab_size)

    def record(self, rows: Sequence[int], step) -> None:
        """After sampling `rows` (in the order of step.token_ids): their tokens come from `step`."""
        tokens = None
        for i, row in enumerate(rows):
            state = self._rows.get(row)
            if state is not None:
                tokens = tokens or StepTokens(step)
                state.unaccepted.append((tokens, i))


def _catch_up(states: list[_RowState]) -> None:
    """Feed each row's sampled tokens to its matcher, all rows in one call (every sampling step of a row is
    masked first, so a row has one token waiting; the rounds only keep the order if it had more)."""
    for round_ in range(max(len(s.unaccepted) for s in states)):
        matchers, tokens = [], []
        for state in states:
            if round_ < len(state.unaccepted) and not state.matcher.is_terminated():
                step_tokens, index = state.unaccepted[round_]
                values = step_tokens.values()
                if index < len(values):  # else the step failed before its tokens were copied: nothing to feed
                    matchers.append(state.matcher)
                    tokens.append(values[index])
        if matchers:
            import xgrammar as xgr

            for token, accepted in zip(tokens, xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)):
                if not accepted:
                    log.warning("grammar matcher rejected token %d, which its own mask allowed", token)
    for state in states:
        state.unaccepted.clear()
