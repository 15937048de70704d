"""Embedding pooling: from a request's final hidden states to one vector.

What to pool comes from the checkpoint (`read_pooling`):
- an embedding checkpoint with a sentence-transformers layout (modules.json listing a Transformer, a Pooling module
  whose config.json picks last-token, mean or CLS pooling, and optionally a Normalize module) is pooled as it says;
- anything else (no such config, GGUF files, every generation model) pools the last token and L2-normalises it.
config.json's `is_matryoshka` / `matryoshka_dimensions` say whether the vector may be truncated (`dimensions`).

`Pooler` runs in the model runner: rows of embedding requests (NewRow.embed) accumulate over their prefill chunks
(a sum for mean pooling, the first token for CLS) and the chunk named in BatchPlan.pool yields the vector. Mean
and CLS pooling need every token's hidden state, so the scheduler never serves those requests from the prefix
cache (SchedulerConfig.pool_from_cache)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.messages import BatchPlan, Pooling

TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# 1_Pooling/config.json flag -> our method
POOLING_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_cls_token": "cls"}
UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens")


class PoolingConfigError(ValueError):
    pass


def read_pooling(folder: str | None, hidden_size: int, is_embedding: bool) -> Pooling:
    """The pooling of the checkpoint in `folder` (None or a GGUF file's folder: the default, last + normalise).
    A generation server (`is_embedding` false) always pools last + normalise, whatever the folder holds."""
    config = _read_json(os.path.join(folder, "config.json")) if folder else None
    matryoshka_dimensions = [int(d) for d in (config or {}).get("matryoshka_dimensions") or []]
    matryoshka = bool((config or {}).get("is_matryoshka")) or bool(matryoshka_dimensions)
    default = Pooling("last", True, hidden_size, matryoshka, matryoshka_dimensions)
    modules_path = os.path.join(folder, "modules.json") if folder else None
    if not is_embedding or modules_path is None or not os.path.isfile(modules_path):
        return default
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise PoolingConfigError(f"{modules_path}: expected a list of modules")
    method, normalize = None, False
    for module in modules:
        kind = module.get("type")
        if kind == TRANSFORMER_MODULE:
            continue
        if kind == POOLING_MODULE:
            method = _pooling_method(os.path.join(folder, module.get("path", ""), "config.json"))
        elif kind == NORMALIZE_MODULE:
            normalize = True
        else:
            raise PoolingConfigError(f"{modules_path}: module {kind!r} is not supported (only Transformer, Pooling "
                                     "and Normalize)")
    if method is None:
        raise PoolingConfigError(f"{modules_path}: no {POOLING_MODULE} module")
    return Pooling(method, normalize, hidden_size, matryoshka, matryoshka_dimensions)


def _pooling_method(path: str) -> str:
    config = _read_json(path)
    if config.get("include_prompt") is False:
        raise PoolingConfigError(f"{path}: include_prompt false (pooling without the instruction) is not supported")
    for flag in UNSUPPORTED_MODES:
        if config.get(flag):
            raise PoolingConfigError(f"{path}: {flag} is not supported (only last-token, mean and CLS pooling)")
    chosen = [method for flag, method in POOLING_MODES.items() if config.get(flag)]
    if len(chosen) != 1:
        raise PoolingConfigError(f"{path}: expected exactly one of {', '.join(POOLING_MODES)} to be true")
    return chosen[0]


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise PoolingConfigError(f"cannot read {path}: {err}") from None


@dataclass
class _RowState:
    total: torch.Tensor | None = None  # mean: sum of the hidden states so far (float32)
    count: int = 0
    first: torch.Tensor | None = None  # cls: the first token's hidden state


class Pooler:
    """Per request-table row pooling state of embedding requests; see the module docstring."""

    def __init__(self, pooling: Pooling):
        self.pooling = pooling
        self.rows: dict[int, _RowState] = {}

    def add_row(self, row: int) -> None:
        self.rows[row] = _RowState()

    def free_row(self, row: int) -> None:
        self.rows.pop(row, None)

    def step(self, plan: BatchPlan, hidden: torch.Tensor, starts: list[int]) -> dict[int, torch.Tensor]:
        """Fold this step's hidden states [T, H] into the rows' state; the vectors (float32, on the device) of
        the plan indices in plan.pool."""
        if not self.rows:
            return {}
        method = self.pooling.method
        finishing = set(plan.pool)
        out: dict[int, torch.Tensor] = {}
        for i, row in enumerate(plan.rows):
            state = self.rows.get(row)
            if state is None:
                continue
            start, count = starts[i], plan.extend_lens[i]
            if method == "mean":
                chunk_sum = hidden[start:start + count].float().sum(0)
                state.total = chunk_sum if state.total is None else state.total + chunk_sum
                state.count += count
            elif method == "cls" and plan.prefix_lens[i] == 0:
                state.first = hidden[start].float()
            if i not in finishing:
                continue
            if method == "last":
                vector = hidden[start + count - 1].float()
            elif method == "mean":
                vector = state.total / state.count
            else:
                vector = state.first
            out[i] = F.normalize(vector, dim=-1) if self.pooling.normalize else vector
            del self.rows[row]
        return out


def vectors_to_bytes(vectors: dict[int, torch.Tensor]) -> dict[int, bytes]:
    """One host copy for all of a step's vectors; float32 little-endian bytes per plan index."""
    if not vectors:
        return {}
    keys = list(vectors)
    host = torch.stack([vectors[k] for k in keys]).cpu().numpy().astype("<f4", copy=False)
    return {k: host[j].tobytes() for j, k in enumerate(keys)}
