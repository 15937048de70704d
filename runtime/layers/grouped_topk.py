"""DeepSeek's expert routing: scores, optional group-limited choice, top-k, renormalization and a scaling factor.

- scoring: "softmax" (DeepSeek V2) or "sigmoid" (V3) of the float32 router logits;
- `topk_method`:
  - "greedy": the k best scores;
  - "group_limited_greedy" (V2): the experts form `n_group` groups, a group scores its best expert, only the
    `topk_group` best groups are eligible;
  - "noaux_tc" (V3): choice by score + `e_score_correction_bias` (the load-balancing bias), a group scoring the sum
    of its two best biased scores; the weights are the unbiased scores of the chosen experts;
- `norm_topk_prob`: the k weights renormalized to sum to one; then every weight times `routed_scaling_factor`.
This matches transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter (and vLLM's and SGLang's grouped top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GroupedTopk:
    top_k: int
    num_experts: int
    scoring: str = "softmax"
    topk_method: str = "greedy"
    num_groups: int = 1
    topk_groups: int = 1
    renormalize: bool = False
    scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORING_FUNCS:
            raise ValueError(f"scoring_func {self.scoring!r} is not supported (supported: {', '.join(SCORING_FUNCS)})")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not supported (supported: "
                             f"{', '.join(TOPK_METHODS)})")
        if self.num_experts % self.num_groups:
            raise ValueError(f"{self.num_experts} experts do not split into n_group {self.num_groups} groups")

    def select(self, router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
        logits = router_logits.float()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores
        if self.topk_method == "noaux_tc":
            choice = scores + correction_bias.float()[None, :]
        if self.topk_method != "greedy" and self.topk_groups < self.num_groups:
            grouped = choice.view(-1, self.num_groups, self.num_experts // self.num_groups)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            groups = group_scores.topk(self.topk_groups, dim=-1).indices
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
            choice = grouped.masked_fill(~eligible[:, :, None], float("-inf")).view(-1, self.num_experts)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling_factor, ids
