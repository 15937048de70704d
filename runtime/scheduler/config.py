"""SchedulerConfig: the scheduler's limits and policies, from the server args and the worker's ModelInfo."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.messages import ModelInfo


@dataclass
class SchedulerConfig:
    max_total_tokens: int  # usable KV slots (1..max_total_tokens)
    max_running_requests: int  # request-table rows
    context_length: int
    eos_token_ids: list[int]
    chunked_prefill_size: int = 2048  # at most this many prefill tokens per step while requests decode; -1: no chunking
    max_prefill_tokens: int = 16384  # prefill tokens per step while none decodes (and the budget without chunking)
    enable_mixed_chunk: bool = True  # decode rows ride in the prefill chunk's batch (else prefill steps run alone)
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    stream_interval: int = 1
    pool_from_cache: bool = True  # embedding requests may start from a cached prefix (last-token pooling)
    low_priority_prefill_tokens: int = 512  # per step, for requests below the priority of a decoding request

    @classmethod
    def from_args(cls, args, info: ModelInfo) -> SchedulerConfig:
        """The worker sized its pool and table from the same args; never exceed what it has."""
        total = info.max_total_tokens if args.max_total_tokens is None else min(args.max_total_tokens,
                                                                                 info.max_total_tokens)
        running = info.max_running_requests if args.max_running_requests is None else min(
            args.max_running_requests, info.max_running_requests)
        return cls(max_total_tokens=total, max_running_requests=running, context_length=info.context_length,
                   eos_token_ids=list(info.eos_token_ids), chunked_prefill_size=args.chunked_prefill_size,
                   max_prefill_tokens=args.max_prefill_tokens, enable_mixed_chunk=args.enable_mixed_chunk,
                   schedule_policy=args.schedule_policy, disable_radix_cache=args.disable_radix_cache,
                   stream_interval=args.stream_interval, pool_from_cache=info.pooling.method == "last",
                   low_priority_prefill_tokens=args.low_priority_prefill_tokens)
