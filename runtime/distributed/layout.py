"""Where every rank of every replica runs: `--dp-size` replicas of `--tp-size` ranks over `--nnodes` nodes.

Rank t of replica r has the global rank g = r * tp_size + t and is the actor `worker<g>`. The ranks fill the nodes
in order, `ranks_per_node` each (all of them on one node; tp_size / nnodes with several nodes, where dp_size is 1),
and take that node's GPUs from `--base-gpu-id` on: replica r uses GPUs base_gpu_id + r*tp .. base_gpu_id + (r+1)*tp - 1
on one node. Node 0 runs the ingress, the detokenizer and every scheduler; with several nodes each node also runs
one relay (runtime.distributed.actor). Plain Python: the launcher, runtime.affinity and scripts/show_placement use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankSlot:
    dp_rank: int
    tp_rank: int
    global_rank: int  # dp_rank * tp_size + tp_rank
    node: int
    gpu: int  # device index on its node

    @property
    def name(self) -> str:
        return f"worker{self.global_rank}"


@dataclass(frozen=True)
class Layout:
    dp_size: int = 1
    tp_size: int = 1
    nnodes: int = 1
    base_gpu_id: int = 0

    @classmethod
    def from_args(cls, args) -> Layout:
        return cls(dp_size=args.dp_size, tp_size=args.tp_size, nnodes=args.nnodes, base_gpu_id=args.base_gpu_id)

    @property
    def ranks_per_node(self) -> int:
        return self.dp_size * self.tp_size // self.nnodes

    @property
    def ranks(self) -> list[RankSlot]:
        per_node = self.ranks_per_node
        return [RankSlot(dp_rank=g // self.tp_size, tp_rank=g % self.tp_size, global_rank=g, node=g // per_node,
                         gpu=self.base_gpu_id + g % per_node) for g in range(self.dp_size * self.tp_size)]

    def node_ranks(self, node: int) -> list[RankSlot]:
        return [slot for slot in self.ranks if slot.node == node]

    def replica_ranks(self, dp_rank: int, node: int | None = None) -> list[RankSlot]:
        return [slot for slot in self.ranks if slot.dp_rank == dp_rank and (node is None or slot.node == node)]

    def scheduler_name(self, dp_rank: int) -> str:
        return "scheduler" if self.dp_size == 1 else f"scheduler{dp_rank}"

    def describe(self) -> str:
        """One line per replica: where its scheduler runs, and per node which ranks, workers and GPUs it holds."""
        def span(first: int, last: int) -> str:
            return str(first) if first == last else f"{first}-{last}"

        lines = [f"dp {self.dp_size} x tp {self.tp_size} over {self.nnodes} node{'s' * (self.nnodes > 1)}"]
        for r in range(self.dp_size):
            parts = []
            for node in range(self.nnodes):
                ranks = self.replica_ranks(r, node)
                if ranks:
                    a, b = ranks[0], ranks[-1]
                    parts.append(f"node {node}: tp {span(a.tp_rank, b.tp_rank)} = worker"
                                 f"{span(a.global_rank, b.global_rank)} on gpu {span(a.gpu, b.gpu)}")
            lines.append(f"  replica {r} ({self.scheduler_name(r)} on node 0): {'; '.join(parts)}")
        return "\n".join(lines)
