"""The records of one generation job and what has come back for it, shared by the API handlers
(generation.py) and the metrics that observe finished sequences (metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.messages import FinishReason, LogprobOptions, RequestMeta, SamplingParams, TextUpdate, TokenLogprobs

if TYPE_CHECKING:
    from runtime.multimodal.inputs import ProcessedPrompt


@dataclass(slots=True)
class Job:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    logprobs: LogprobOptions
    deadline: float | None = None  # time.monotonic() past which the request is aborted (504)
    group: str | None = None  # the n samples of one prompt share a group: one data-parallel replica serves them
    images: ProcessedPrompt | None = None  # a vision language model's prompt: input_ids are its ids


@dataclass(slots=True)
class Sequence:
    """Everything received so far for one job."""

    job: Job
    arrival: float  # time.perf_counter() when the HTTP request arrived
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    meta: RequestMeta | None = None
    finish: FinishReason | None = None
    logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)
    prompt_logprobs: TokenLogprobs | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    timestamps: list[float] = field(default_factory=list)  # of the latest update (--enable-token-timestamps)

    def add(self, update: TextUpdate, now: float) -> None:
        self.text += update.text_delta
        if update.new_token_ids:
            self.output_ids += update.new_token_ids
            if self.first_token_time is None:
                self.first_token_time = now
        self.meta = update.meta
        if update.timestamps:
            self.timestamps = update.timestamps
        if update.logprobs is not None:
            self.logprobs.token_ids += update.logprobs.token_ids
            self.logprobs.logprobs += update.logprobs.logprobs
            self.logprobs.top_ids += update.logprobs.top_ids
            self.logprobs.top_logprobs += update.logprobs.top_logprobs
            self.logprobs.ids_logprobs += update.logprobs.ids_logprobs
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs
        if update.finish is not None:
            self.finish = update.finish
            self.finish_time = now

    @property
    def prompt_tokens(self) -> int:
        return self.meta.prompt_tokens if self.meta else len(self.job.input_ids)

    @property
    def completion_tokens(self) -> int:
        return self.meta.completion_tokens if self.meta else len(self.output_ids)

    @property
    def cached_tokens(self) -> int:
        return self.meta.cached_tokens if self.meta else 0
