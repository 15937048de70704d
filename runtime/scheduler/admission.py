"""Admission control: admit a request only if the KV pool can hold, at every future step, what the running
requests and the new one will still write.

Per running request r we estimate `growth[r]`, the KV slots its decode still needs, and `freed[r]`, the slots
that become free (or evictable in the radix cache) when it finishes. If each request adds one slot per step
and finishes after growth[r] steps, the extra slots needed t steps from now are

    D(t) = t * #{r : growth[r] >= t}  -  sum of freed[r] over {r : growth[r] < t}

(running requests grow; finished ones gave their slots back). D rises between two finishes and drops at
each, so its maximum is at one of the growth values. A request is admitted when its own prompt slots now plus
max D with it included (plus a small margin per request for results still in flight) fit in the free and
evictable slots. The check is a sort and a cumulative sum over arrays, not a loop per request.

Growth estimates:
- a request that cannot stop early (ignore_eos, no stop ids) writes exactly min(max_new_tokens, context) more
  tokens: growth = tokens left. On a workload of such requests (every benchmark) no retraction ever happens.
- any other request: growth = max(tokens still owed by min_new_tokens, ceil(ratio * tokens left)), where the
  new-token ratio starts at 0.7, decays every decode step towards a floor (SGLang's numbers: 0.7 to 0.098 over
  600 steps), and the floor learns from finished requests: the mean share of their token budget they used.
  When the estimate was too low, decode runs out of slots and retracts (the safety net, counted and logged);
  the ratio is then reset to its start.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.messages import SamplingParams

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = INIT_NEW_TOKEN_RATIO * 0.14
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
# Weight of one finished request in the running mean of the budget share used (about the last 50 requests).
LEARN_WEIGHT = 0.02
# Slots kept per admitted request beyond the estimate: with overlap a finished request's slots come back a
# batch or two after its last step, while the others keep growing.
RESERVE_PER_REQUEST = 2


def stops_only_at_length(sampling: SamplingParams) -> bool:
    """A request that ignores EOS and has no stop ids or strings runs to its length limit: its growth is exact."""
    return sampling.ignore_eos and not sampling.stop_token_ids and not sampling.stop


class NewTokenRatio:
    """The share of its remaining token budget a request that may stop early is expected to use."""

    def __init__(self, init: float = INIT_NEW_TOKEN_RATIO, minimum: float = MIN_NEW_TOKEN_RATIO,
                 decay: float = NEW_TOKEN_RATIO_DECAY):
        self.init, self.minimum, self.decay_per_step = init, minimum, decay
        self.value = init
        self.learned: float | None = None  # mean share of the budget used by finished requests

    @property
    def floor(self) -> float:
        return min(1.0, max(self.minimum, self.learned or 0.0))

    def decay(self) -> None:
        """One decode step without running out of slots."""
        self.value = max(self.floor, self.value - self.decay_per_step)

    def reset(self) -> None:
        """Decode ran out of slots (a retraction): the estimate was too low."""
        self.value = max(self.init, self.floor)

    def observe_finished(self, generated: int, budget: int) -> None:
        """A request that could have stopped early finished after `generated` of its `budget` tokens."""
        if budget <= 0:
            return
        share = min(1.0, generated / budget)
        self.learned = share if self.learned is None else self.learned + LEARN_WEIGHT * (share - self.learned)
        self.value = max(self.value, self.floor)

    def growth(self, tokens_left: int, min_tokens_left: int, exact: bool) -> int:
        """Expected KV slots the request still writes while decoding."""
        if exact:
            return tokens_left
        return min(tokens_left, max(min_tokens_left, math.ceil(tokens_left * self.value)))


def peak_demand(growth: np.ndarray, freed: np.ndarray) -> int:
    """max over t >= 0 of D(t) (module docstring), for `growth` sorted ascending and `freed` in the same order."""
    n = len(growth)
    if n == 0:
        return 0
    first = np.searchsorted(growth, growth, side="left")  # requests that finish before t = growth[k]
    freed_before = np.concatenate(([0], np.cumsum(freed)))[first]
    return max(0, int((growth * (n - first) - freed_before).max()))


class Reservation:
    """The running requests' future demand, built once per planning step; `try_admit` adds requests to it."""

    def __init__(self, available: int, growth: list[int], freed: list[int]):
        order = np.argsort(np.asarray(growth, dtype=np.int64), kind="stable")
        self.growth = np.asarray(growth, dtype=np.int64)[order]
        self.freed = np.asarray(freed, dtype=np.int64)[order]
        self.available = available  # free + evictable slots not yet promised to prefill work

    def try_admit(self, need_now: int, growth: int, freed: int, force: bool = False) -> bool:
        """Admit a request needing `need_now` slots at once and `growth` more while it decodes, freeing `freed`
        when it finishes, if that fits at every future step; False (and nothing changed) otherwise. `force`
        admits it regardless (a request alone always fits: its length is bounded by the pool)."""
        if need_now > self.available and not force:
            return False
        at = np.searchsorted(self.growth, growth, side="right")
        g, f = np.insert(self.growth, at, growth), np.insert(self.freed, at, freed)
        if not force and need_now + peak_demand(g, f) + RESERVE_PER_REQUEST * len(g) > self.available:
            return False
        self.growth, self.freed = g, f
        self.available -= need_now
        return True
