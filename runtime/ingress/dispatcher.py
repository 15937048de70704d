"""Dispatcher: which data-parallel replica (one scheduler and its workers) serves each request.

The ingress holds one ring to each replica's scheduler. A request goes to one replica, by --load-balance-method:
`round_robin` takes the replicas in turn; `shortest_queue` takes the one with the fewest unfinished requests,
counted here exactly (sent and not yet finished), so no replica has to report its queue and no report is stale.
The requests of one group (the `n` samples of one prompt) go to the replica of the group's first request while any
of them is unfinished: they share the prompt's KV cache through that replica's radix cache. An abort goes where its
request went; flush_cache and server_info go to every replica. With one replica it is a plain pass-through.

The dispatcher lives in the ingress process (no process and no ring hop of its own, unlike a separate controller).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime.messages import AbortRequest, GenerateRequest

# server_info keys that are ratios: merged as a mean over the replicas, where every other number is summed
RATIO_KEYS = ("token_usage", "cache_hit_rate", "new_token_ratio")


class Dispatcher:
    def __init__(self, senders: list[Any], method: str = "round_robin"):
        """senders: one per replica, each with send(msg) (the Frontend's OrderedSender over the replica's ring)."""
        if not senders:
            raise ValueError("a dispatcher needs at least one replica")
        if method not in ("round_robin", "shortest_queue"):
            raise ValueError(f"load balance method must be round_robin or shortest_queue, got {method!r}")
        self.senders = senders
        self.method = method
        self.unfinished = [0] * len(senders)
        self.dispatched = [0] * len(senders)
        self._replica_of: dict[str, int] = {}  # rid -> replica, while unfinished
        self._group_of: dict[str, str] = {}  # rid -> its group
        self._groups: dict[str, list[int]] = {}  # group -> [replica, unfinished requests of the group]
        self._turn = 0

    @property
    def size(self) -> int:
        return len(self.senders)

    def submit(self, request: GenerateRequest, group: str | None = None,
               prepare: Callable[[int, GenerateRequest], GenerateRequest] | None = None) -> int:
        """Send the request to a replica; which one. `prepare(replica, request)`, when given, makes the request that is
        sent, once the replica is chosen (its images go into that replica's arena)."""
        sticky = self._groups.get(group) if group is not None else None
        replica = sticky[0] if sticky is not None else self._pick()
        if group is not None:
            if sticky is None:
                self._groups[group] = [replica, 0]
            self._groups[group][1] += 1
            self._group_of[request.rid] = group
        self._replica_of[request.rid] = replica
        self.unfinished[replica] += 1
        self.dispatched[replica] += 1
        if prepare is not None:
            request = prepare(replica, request)
        self.senders[replica].send(request)
        return replica

    def _pick(self) -> int:
        if self.size == 1:
            return 0
        replica = self._turn
        if self.method == "shortest_queue":  # ties go round the replicas too
            replica = min(range(self.size), key=lambda r: (self.unfinished[r], (r - self._turn) % self.size))
        self._turn = (replica + 1) % self.size
        return replica

    def abort(self, rid: str) -> None:
        replica = self._replica_of.get(rid)
        if replica is not None:
            self.senders[replica].send(AbortRequest(rid))

    def finished(self, rid: str) -> None:
        """The request has its final answer (or its caller left, after abort())."""
        replica = self._replica_of.pop(rid, None)
        if replica is None:
            return
        self.unfinished[replica] -= 1
        group = self._group_of.pop(rid, None)
        if group is not None:
            sticky = self._groups[group]
            sticky[1] -= 1
            if sticky[1] == 0:
                del self._groups[group]

    def broadcast(self, msg) -> None:
        for sender in self.senders:
            sender.send(msg)

    def load(self, replica: int) -> dict:
        return {"dispatched": self.dispatched[replica], "unfinished": self.unfinished[replica]}


def merge_states(states: list[dict]) -> dict:
    """One server_info over all replicas: numbers summed (ratios averaged), anything else replica 0's."""
    if len(states) == 1:
        return states[0]
    merged = dict(states[0])
    for key, value in states[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [state.get(key, 0) for state in states]
            merged[key] = sum(values) / len(values) if key in RATIO_KEYS else sum(values)
    merged.pop("dp_rank", None)
    merged["dp_size"] = len(states)
    return merged
