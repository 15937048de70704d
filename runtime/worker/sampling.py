"""Next-token sampling for a batch of request-table rows, vectorized over the batch, with logprobs.

Semantics follow SGLang. Per row, on the raw logits:
  1. penalties on output tokens (runtime/worker/penalties.py: repetition, then frequency and presence);
  2. logit_bias (token id -> additive bias);
  3. min_new_tokens: while the row has produced fewer tokens, its EOS ids and stop_token_ids are -inf
     (not for a row with a grammar: the grammar decides when the output may end);
  3b. a grammar's token mask (runtime/constrained/row_matchers.py): the tokens it forbids are -inf;
  3c. a custom logit processor (runtime/worker/custom_logit_processor.py), called once per distinct processor on its
      rows' logits with their custom_params (one dict per request, the same object every step, so a processor
      may keep per-request state in it);
  4. temperature < 1e-6: greedy argmax, no randomness. Otherwise divide by the temperature and keep
     the tokens that pass all of top-k, top-p and min-p, each judged on the temperature-scaled
     distribution over the whole vocabulary (SGLang's joint filter): top-k keeps the k most likely;
     top-p keeps a token when the mass strictly before it, in descending order, is <= top_p; min-p
     keeps a token whose probability is >= min_p * the largest probability. Then sample.
Logprobs are log_softmax of the RAW logits (before any of the above), as SGLang returns them.

Filtering cost: when every sampled row has top_k <= TOPK_PATH_MAX_K, only the top max(top_k) logits
are taken (torch.topk) and top-p/min-p run inside them; that is exact, because top-k already bounds
the kept set and the probabilities are normalised over the whole vocabulary (logsumexp). Otherwise a
full sort. With no filter at all, no sort or topk. A batch of greedy rows only does an argmax.

Randomness: the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) is a sample from p), done
in log space as argmax(scaled_logit_i - log E_i) over the kept tokens. Rows without a seed draw E
from the sampler's generator. A seeded row draws E_i from a counter-based hash of
(seed, step, token id), step being the number of tokens the request has produced (prior outputs
included). So a seeded request samples the same tokens whatever else shares the batch, at any
batch position, whichever filtering path the batch takes, and after a retraction: the noise of a
token never depends on anything but those three numbers.

On CUDA (`use_kernels`) stochastic rows go through kernels/sampling.py instead: softmax, then one Triton
program per row finds the top-k/top-p/min-p threshold by bisection (no sort) and runs the same race with
the same hash, p_i / E_i = exp(scaled_logit_i - logsumexp) / E_i: a seeded row samples the same token on
both paths. Rows without a seed get a fresh random 32-bit key per step from the sampler's generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from runtime.messages import LogprobOptions, SamplingParams, TokenLogprobs
from runtime.worker.penalties import PenaltyCounts, apply_penalties

if TYPE_CHECKING:
    from runtime.constrained.row_matchers import TokenMask

try:  # Triton is needed on CUDA only (pyproject's gpu extra)
    from kernels.sampling import sample_from_probs
except ImportError:
    sample_from_probs = None

GREEDY_TEMPERATURE = 1e-6
# Above this many candidates a full sort of the vocabulary is about as cheap as torch.topk.
TOPK_PATH_MAX_K = 1024
CUSTOM_PROCESSOR_CACHE = 64  # distinct custom logit processors kept loaded

# Columns of the per-row parameter table (one float32 tensor, one gather per step).
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _REPETITION, _FREQUENCY, _PRESENCE, _GREEDY = range(8)
_N_COLUMNS = 8

_MASK32 = 0xFFFFFFFF
_MIX32 = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**63 in int64


def mix32(x):
    """A bijective 32-bit integer hash. Works on Python ints and on int64 tensors holding values in
    [0, 2**32) with the same operators, so host-side keys and device-side noise agree."""
    x = (((x >> 16) ^ x) * _MIX32) & _MASK32
    x = (((x >> 16) ^ x) * _MIX32) & _MASK32
    return (x >> 16) ^ x


def seed_key(seed: int) -> int:
    """Fold an arbitrary Python int seed into 32 bits."""
    seed &= (1 << 64) - 1
    return mix32((seed & _MASK32) ^ mix32(seed >> 32))


def step_key(key: int, step: int) -> int:
    return mix32(key ^ mix32(step & _MASK32))


def seeded_log_exponential(step_keys: torch.Tensor, token_hashes: torch.Tensor) -> torch.Tensor:
    """log E for E ~ Exp(1), a pure function of (step key, token): step_keys [S] int64,
    token_hashes [S, K] int64 (mix32 of the token ids) -> [S, K] float32."""
    h = mix32(step_keys[:, None] ^ token_hashes)
    uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exact in float32
    return torch.log(-torch.log(uniform))


def filter_sorted_candidates(
    candidates: torch.Tensor,  # [B, K] scaled logits in descending order
    log_normalizer: torch.Tensor,  # [B] logsumexp of the scaled logits over the whole vocabulary
    top_k: torch.Tensor,  # [B] float (vocab size when disabled)
    top_p: torch.Tensor,  # [B] float (inf when disabled)
    min_p: torch.Tensor,  # [B] float (0 when disabled)
) -> torch.Tensor:
    """Set the candidates that top-k, top-p or min-p drop to -inf."""
    probs = torch.exp(candidates - log_normalizer[:, None])
    position = torch.arange(candidates.shape[1], device=candidates.device)
    keep = position[None, :] < top_k[:, None]
    keep &= (torch.cumsum(probs, dim=-1) - probs) <= top_p[:, None]
    keep &= probs >= probs[:, :1] * min_p[:, None]
    return candidates.masked_fill(~keep, float("-inf"))


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # int64 [B] on the sampler's device
    logprobs: list[TokenLogprobs | None]  # per batch entry; None where the request did not ask


@dataclass
class _Row:
    """Host-side state of one occupied row: what a step must decide without touching the device."""

    greedy: bool
    filtered: bool  # top-k, top-p or min-p active
    top_k: int  # effective: vocab size when disabled
    uses_penalties: bool
    seed_key: int | None
    steps: int  # tokens the request has produced so far (prior outputs included)
    min_new_tokens: int
    banned_until_min: list[int]  # EOS ids + stop_token_ids, masked while steps < min_new_tokens
    bias_ids: list[int]
    bias_values: list[float]
    logprobs: LogprobOptions
    custom_processor: Callable | None = None
    custom_params: dict[str, Any] | None = None


class Sampler:
    """Samples one token per row of a batch. Rows are request-table rows; the scheduler says when a
    request takes a row (add_row) and when it leaves (free_row)."""

    def __init__(
        self,
        max_rows: int,
        vocab_size: int,
        eos_token_ids: list[int],
        device: torch.device | str,
        seed: int = 0,
        use_kernels: bool | None = None,
    ):
        """use_kernels: sample stochastic rows with the Triton kernels; None = on CUDA when Triton is there."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        for token in eos_token_ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"eos_token_ids: {token} is outside the vocabulary [0, {vocab_size})")
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # compare as cuda:N with the logits
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._pin = self.device.type == "cuda"
        if use_kernels and sample_from_probs is None:
            raise ValueError("use_kernels needs Triton, which is not installed")
        self.use_kernels = self._pin and sample_from_probs is not None if use_kernels is None else use_kernels
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.params = torch.zeros(max_rows, _N_COLUMNS, dtype=torch.float32, device=self.device)
        self.penalty_counts = PenaltyCounts(max_rows, vocab_size, self.device)
        self.token_hashes = mix32(torch.arange(vocab_size, dtype=torch.int64, device=self.device))
        self._rows: list[_Row | None] = [None] * max_rows
        self._custom_processors: dict[str, Callable] = {}  # serialized form -> loaded processor

    # ---------------------------------------------------------------------------------------------
    # Row lifecycle
    # ---------------------------------------------------------------------------------------------

    def add_row(
        self,
        row: int,
        params: SamplingParams,
        logprobs: LogprobOptions = LogprobOptions(),
        prior_output_ids: Sequence[int] = (),
    ) -> None:
        """A request takes `row` (or takes one again after a retraction, with the tokens it had
        produced as prior_output_ids: they seed the penalty counts and the seeded step counter)."""
        self._check_row_index(row, "row")
        self._validate(params, logprobs, prior_output_ids)
        vocab = self.vocab_size
        greedy = params.temperature < GREEDY_TEMPERATURE
        top_k = vocab if params.top_k == -1 or params.top_k >= vocab else params.top_k
        top_p = math.inf if params.top_p >= 1.0 else params.top_p
        filtered = not greedy and (top_k < vocab or top_p != math.inf or params.min_p > 0.0)
        uses_penalties = (
            params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        )
        # Greedy rows get neutral sampling columns so a mixed batch can run them through the
        # stochastic path harmlessly (their result is replaced by the argmax).
        columns = [0.0] * _N_COLUMNS
        columns[_TEMPERATURE] = 1.0 if greedy else params.temperature
        columns[_TOP_K] = 1.0 if greedy else float(top_k)
        columns[_TOP_P] = math.inf if greedy else top_p
        columns[_MIN_P] = 0.0 if greedy else params.min_p
        columns[_REPETITION] = params.repetition_penalty
        columns[_FREQUENCY] = params.frequency_penalty
        columns[_PRESENCE] = params.presence_penalty
        columns[_GREEDY] = 1.0 if greedy else 0.0
        self.params[row] = self._upload(columns, torch.float32)
        if uses_penalties or self.penalty_counts.allocated:
            prior = self._upload(list(prior_output_ids), torch.int64) if len(prior_output_ids) else None
            self.penalty_counts.reset_row(row, prior, allocate=uses_penalties)
        self._rows[row] = _Row(
            greedy=greedy,
            filtered=filtered,
            top_k=1 if greedy else top_k,
            uses_penalties=uses_penalties,
            seed_key=None if params.seed is None or greedy else seed_key(params.seed),
            steps=len(prior_output_ids),
            min_new_tokens=params.min_new_tokens,
            banned_until_min=[] if params.grammar else sorted(set(self.eos_token_ids) | set(params.stop_token_ids)),
            bias_ids=list(params.logit_bias.keys()),
            bias_values=[float(v) for v in params.logit_bias.values()],
            logprobs=logprobs,
            custom_processor=self._custom_processor(params.custom_logit_processor),
            custom_params=dict(params.custom_params or {}),
        )

    def _custom_processor(self, serialized: str | None) -> Callable | None:
        if serialized is None:
            return None
        if serialized not in self._custom_processors:
            from runtime.worker.custom_logit_processor import load_processor  # dill: an optional dependency

            if len(self._custom_processors) >= CUSTOM_PROCESSOR_CACHE:
                del self._custom_processors[next(iter(self._custom_processors))]  # rows keep their own reference
            self._custom_processors[serialized] = load_processor(serialized)
        return self._custom_processors[serialized]

    def free_row(self, row: int) -> None:
        """The row's request ended; freeing a row that is not occupied does nothing."""
        self._check_row_index(row, "row")
        self._rows[row] = None

    # ---------------------------------------------------------------------------------------------
    # Sampling
    # ---------------------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, rows: Sequence[int] | torch.Tensor,
               token_mask: TokenMask | None = None) -> SampleOutput:
        """Sample one token per batch entry; entry i belongs to request-table row rows[i].

        `logits` ([B, vocab], raw model logits) is not modified. No host sync happens unless some
        row asked for logprobs. `rows` should be a list (a device tensor costs a sync to read).
        `token_mask`: the grammar mask of the constrained entries (its `apply` sets forbidden logits to -inf)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        states = self._batch_rows(rows)
        batch = len(states)
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must have shape [{batch}, {self.vocab_size}] (batch, vocab), got {list(logits.shape)}"
            )
        if batch == 0:
            return SampleOutput(torch.empty(0, dtype=torch.int64, device=self.device), [])
        if logits.dtype != torch.float32:
            logits = logits.float()
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")

        rows_t = self._upload(rows, torch.int64)
        table = self.params.index_select(0, rows_t)
        x = logits
        if any(s.uses_penalties for s in states):
            counts = self.penalty_counts.gather(rows_t)
            x = apply_penalties(x, counts, table[:, _REPETITION], table[:, _FREQUENCY], table[:, _PRESENCE])
        x = self._apply_bias_and_min_tokens(x, states)
        if token_mask is not None:
            if x is logits:
                x = logits.clone()
            token_mask.apply(x)
        if any(s.custom_processor is not None for s in states):
            x = self._apply_custom_processors(logits.clone() if x is logits else x, states)

        if all(s.greedy for s in states):
            token_ids = torch.argmax(x, dim=-1)
        else:
            token_ids = self._sample_stochastic(x, table, states)
            if any(s.greedy for s in states):
                token_ids = torch.where(table[:, _GREEDY] > 0, torch.argmax(x, dim=-1), token_ids)

        logprobs = self._chosen_logprobs(logits, token_ids, states)
        self.penalty_counts.record(rows_t, token_ids)
        for s in states:
            s.steps += 1
        return SampleOutput(token_ids, logprobs)

    def _apply_custom_processors(self, x: torch.Tensor, states: list[_Row]) -> torch.Tensor:
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            if s.custom_processor is not None:
                groups.setdefault(id(s.custom_processor), []).append(i)
        for entries in groups.values():
            processor = states[entries[0]].custom_processor
            index = self._upload(entries, torch.int64)
            out = processor(x.index_select(0, index), [states[i].custom_params for i in entries])
            if not isinstance(out, torch.Tensor) or out.shape != (len(entries), x.shape[1]):
                raise ValueError(f"custom_logit_processor {type(processor).__name__} must return logits of shape "
                                 f"[{len(entries)}, {x.shape[1]}]")
            x.index_copy_(0, index, out.to(x.dtype))
        return x

    def _apply_bias_and_min_tokens(self, x: torch.Tensor, states: list[_Row]) -> torch.Tensor:
        batch_index: list[int] = []
        token_index: list[int] = []
        values: list[float] = []
        for i, s in enumerate(states):
            if s.bias_ids:
                batch_index.extend([i] * len(s.bias_ids))
                token_index.extend(s.bias_ids)
                values.extend(s.bias_values)
            if s.steps < s.min_new_tokens and s.banned_until_min:
                batch_index.extend([i] * len(s.banned_until_min))
                token_index.extend(s.banned_until_min)
                values.extend([-math.inf] * len(s.banned_until_min))
        if not batch_index:
            return x
        index = self._upload([batch_index, token_index], torch.int64)
        # accumulate: a biased token that is also banned stays -inf (bias values are finite)
        return x.index_put((index[0], index[1]), self._upload(values, torch.float32), accumulate=True)

    def _sample_stochastic(self, x: torch.Tensor, table: torch.Tensor, states: list[_Row]) -> torch.Tensor:
        scaled = x / table[:, _TEMPERATURE, None]
        if self.use_kernels:
            return sample_from_probs(torch.softmax(scaled, dim=-1), table[:, _TOP_K], table[:, _TOP_P],
                                     table[:, _MIN_P], self._step_keys(states))
        sampled = [s for s in states if not s.greedy]
        if not any(s.filtered for s in sampled):
            log_noise = self._log_noise(states, None)
            return torch.argmax(scaled - log_noise, dim=-1)
        max_top_k = max(s.top_k for s in sampled)
        if max_top_k <= TOPK_PATH_MAX_K:
            candidates, candidate_ids = torch.topk(scaled, max_top_k, dim=-1, sorted=True)
        else:
            candidates, candidate_ids = torch.sort(scaled, dim=-1, descending=True)
        candidates = filter_sorted_candidates(
            candidates, torch.logsumexp(scaled, dim=-1), table[:, _TOP_K], table[:, _TOP_P], table[:, _MIN_P]
        )
        choice = torch.argmax(candidates - self._log_noise(states, candidate_ids), dim=-1, keepdim=True)
        return torch.gather(candidate_ids, 1, choice).squeeze(1)

    def _step_keys(self, states: list[_Row]) -> torch.Tensor:
        """The kernel path's noise keys, int64 [B] in [0, 2**32): step_key(seed, steps) for seeded rows, fresh
        random keys from the generator (drawn on the device, no host sync) for the others."""
        seeded = [i for i, s in enumerate(states) if s.seed_key is not None]
        if len(seeded) == len(states):
            return self._upload([step_key(s.seed_key, s.steps) for s in states], torch.int64)
        keys = torch.randint(0, 1 << 32, (len(states),), dtype=torch.int64, device=self.device,
                             generator=self.generator)
        if seeded:
            keys[self._upload(seeded, torch.int64)] = self._upload(
                [step_key(states[i].seed_key, states[i].steps) for i in seeded], torch.int64)
        return keys

    def _log_noise(self, states: list[_Row], candidate_ids: torch.Tensor | None) -> torch.Tensor:
        """log E, E ~ Exp(1), per batch entry and candidate ([B, K]; K = vocab when candidate_ids is None)."""
        batch = len(states)
        width = self.vocab_size if candidate_ids is None else candidate_ids.shape[1]
        seeded = [i for i, s in enumerate(states) if s.seed_key is not None]
        log_noise = torch.empty(batch, width, dtype=torch.float32, device=self.device)
        if len(seeded) < batch:
            log_noise.exponential_(generator=self.generator)
            log_noise.clamp_min_(torch.finfo(torch.float32).tiny).log_()
        if seeded:
            keys = self._upload([step_key(states[i].seed_key, states[i].steps) for i in seeded], torch.int64)
            index = self._upload(seeded, torch.int64)
            if candidate_ids is None:
                token_hashes = self.token_hashes.expand(len(seeded), width)
            else:
                token_hashes = self.token_hashes[candidate_ids.index_select(0, index)]
            log_noise[index] = seeded_log_exponential(keys, token_hashes)
        return log_noise

    # ---------------------------------------------------------------------------------------------
    # Logprobs
    # ---------------------------------------------------------------------------------------------

    def _chosen_logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, states: list[_Row]
    ) -> list[TokenLogprobs | None]:
        wanted = [i for i, s in enumerate(states) if s.logprobs.return_logprob]
        result: list[TokenLogprobs | None] = [None] * len(states)
        if not wanted:
            return result
        index = self._upload(wanted, torch.int64)
        ids, chosen, top_ids, top_values, ids_values = token_logprobs(
            logits.index_select(0, index),
            token_ids.index_select(0, index),
            [states[i].logprobs.top_logprobs_num for i in wanted],
            [states[i].logprobs.token_ids_logprob for i in wanted],
        )
        for j, i in enumerate(wanted):
            by_id = [ids_values[j]] if states[i].logprobs.token_ids_logprob else []
            result[i] = TokenLogprobs([ids[j]], [chosen[j]], [top_ids[j]], [top_values[j]], by_id)
        return result

    def prompt_logprobs(
        self, logits: torch.Tensor, next_ids: torch.Tensor | Sequence[int], top_k: int,
        token_ids_logprob: Sequence[int] = (),
    ) -> TokenLogprobs:
        """Logprobs of a run of prompt tokens: logits [N, vocab] at positions whose next tokens are
        next_ids [N]; top_k alternatives per position (0: none), and the logprobs of the ids
        token_ids_logprob at every position. One TokenLogprobs for the run."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must have shape [N, {self.vocab_size}], got {list(logits.shape)}")
        if not isinstance(next_ids, torch.Tensor):
            next_ids = torch.tensor(list(next_ids), dtype=torch.int64, device=logits.device)
        if next_ids.shape != (logits.shape[0],):
            raise ValueError(f"next_ids must have shape [{logits.shape[0]}], got {list(next_ids.shape)}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        rows = logits.shape[0]
        return TokenLogprobs(*token_logprobs(logits, next_ids.to(logits.device), [top_k] * rows,
                                             [list(token_ids_logprob)] * rows if token_ids_logprob else None))

    # ---------------------------------------------------------------------------------------------
    # Checks and transfers
    # ---------------------------------------------------------------------------------------------

    def _batch_rows(self, rows: Sequence[int]) -> list[_Row]:
        states = []
        for i, row in enumerate(rows):
            self._check_row_index(row, f"rows[{i}]")
            state = self._rows[row]
            if state is None:
                raise ValueError(f"rows[{i}] = {row} is not an occupied row (add_row first)")
            states.append(state)
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows must be distinct, got {list(rows)}")
        return states

    def _check_row_index(self, row: int, name: str) -> None:
        if not isinstance(row, int) or not 0 <= row < self.max_rows:
            raise ValueError(f"{name} must be an int in [0, {self.max_rows}), got {row!r}")

    def _validate(self, params: SamplingParams, logprobs: LogprobOptions, prior_output_ids: Sequence[int]) -> None:
        vocab = self.vocab_size

        def fail(field: str, why: str, value) -> None:
            raise ValueError(f"{field} {why}, got {value!r}")

        if not (math.isfinite(params.temperature) and params.temperature >= 0.0):
            fail("temperature", "must be a finite number >= 0", params.temperature)
        if not 0.0 < params.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]", params.top_p)
        if params.top_k != -1 and params.top_k < 1:
            fail("top_k", "must be -1 (whole vocabulary) or >= 1", params.top_k)
        if not 0.0 <= params.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]", params.min_p)
        if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0.0):
            fail("repetition_penalty", "must be a finite number > 0", params.repetition_penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(params, name)):
                fail(name, "must be finite", getattr(params, name))
        if params.min_new_tokens < 0:
            fail("min_new_tokens", "must be >= 0", params.min_new_tokens)
        for token, bias in params.logit_bias.items():
            if not 0 <= token < vocab:
                fail("logit_bias", f"keys must be token ids in [0, {vocab})", token)
            if not math.isfinite(bias):
                fail("logit_bias", f"values must be finite (token {token})", bias)
        for token in params.stop_token_ids:
            if not 0 <= token < vocab:
                fail("stop_token_ids", f"must be token ids in [0, {vocab})", token)
        for token in prior_output_ids:
            if not 0 <= token < vocab:
                fail("prior_output_ids", f"must be token ids in [0, {vocab})", token)
        for token in logprobs.token_ids_logprob:
            if not 0 <= token < vocab:
                fail("token_ids_logprob", f"must be token ids in [0, {vocab})", token)
        if logprobs.top_logprobs_num < 0:
            fail("top_logprobs_num", "must be >= 0", logprobs.top_logprobs_num)

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Host list -> device tensor without blocking the host (pinned staging on CUDA)."""
        host = torch.tensor(values, dtype=dtype, pin_memory=self._pin)
        return host.to(self.device, non_blocking=True)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_nums: list[int], id_lists: list[list[int]] | None = None
) -> tuple[list[int], list[float], list[list[int]], list[list[float]], list[list[float]]]:
    """Per row of raw logits [N, V]: the logprob of token_ids[i], the top_nums[i] most likely
    alternatives in descending order, and the logprobs of the ids id_lists[i], as host lists (token
    ids, logprobs, top ids, top logprobs, logprobs of id_lists; the last empty without id_lists).
    One device-to-host transfer per tensor for the whole batch."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = torch.gather(logprobs, 1, token_ids[:, None].to(torch.int64)).squeeze(1)
    max_top = min(max(top_nums, default=0), logits.shape[1])
    top_ids: list[list[int]] = [[] for _ in top_nums]
    top_values: list[list[float]] = [[] for _ in top_nums]
    if max_top > 0:
        values_t, ids_t = torch.topk(logprobs, max_top, dim=-1)
        all_values, all_ids = values_t.tolist(), ids_t.tolist()
        for i, num in enumerate(top_nums):
            top_ids[i], top_values[i] = all_ids[i][:num], all_values[i][:num]
    by_id: list[list[float]] = []
    if id_lists and any(id_lists):
        width = max(len(ids) for ids in id_lists)
        padded = torch.tensor([ids + [0] * (width - len(ids)) for ids in id_lists], dtype=torch.int64)
        values = torch.gather(logprobs, 1, padded.to(logprobs.device)).tolist()
        by_id = [row[:len(ids)] for row, ids in zip(values, id_lists)]
    return token_ids.tolist(), chosen.tolist(), top_ids, top_values, by_id
