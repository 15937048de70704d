"""Every message that crosses a process boundary, as msgspec Structs.

Messages are grouped into tagged unions, one per mailbox (Rust-enum style): a receiver decodes
with the union's typed decoder and dispatches with `match msg:`. Encoding is msgpack. Nothing
here is pickled, and a malformed frame decodes to a `msgspec.DecodeError`, never to code (a custom logit
processor travels as an opaque string; only a worker loads it, and only when the server enables them).

Flow:   ingress --IngressToScheduler--> scheduler --SchedulerToWorker (broadcast)--> workers
        worker rank 0 --WorkerToScheduler--> scheduler --SchedulerToDetokenizer--> detokenizer
        detokenizer --DetokenizerToIngress--> ingress;  scheduler --SchedulerToIngress--> ingress
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from actors.control import Shutdown
from shm.arena import ArenaBlock

# --------------------------------------------------------------------------------------------
# Request-level data shared by several mailboxes
# --------------------------------------------------------------------------------------------


class GrammarSpec(Struct, frozen=True):
    """A grammar that constrains a request's output (runtime/constrained/). `kind` is "json_schema",
    "json_object", "regex", "ebnf", "structural_tag", or one the ingress composes: "tool_calls" (forced calls
    in a family's format), "reasoning" (a grammar after a think block); `source` its text (JSON for all but
    regex and EBNF; empty for json_object). `key` names the pair: the compile cache of the workers and the
    scheduler's readiness set are keyed by it. `field` is the request field it came from, for the 400 that
    quotes the compiler when the workers cannot compile it (not part of the key)."""

    key: str
    kind: str
    source: str
    field: str = ""


class SamplingParams(Struct, frozen=True, forbid_unknown_fields=True):
    """Validated sampling parameters (the ingress validates; everyone downstream trusts them)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # < 1e-6 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    logit_bias: dict[int, float] = {}
    stop_regex: list[str] = []  # validated patterns; a match in the output's tail ends the request
    stream_interval: int | None = None  # tokens between streamed updates; None: the server's --stream-interval
    grammar: GrammarSpec | None = None  # constrained decoding: the sampler masks what the grammar forbids
    # SGLang's serialized processor (runtime/worker/custom_logit_processor.py), passed untouched to the worker, which
    # loads and runs it on the row's logits with `custom_params`; only with --enable-custom-logit-processor.
    custom_logit_processor: str | None = None
    custom_params: dict[str, Any] | None = None


class LogprobOptions(Struct, frozen=True):
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs, only generated tokens
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] = []  # also the logprobs of these ids at every position (SGLang's)


class FinishReason(Struct, frozen=True):
    """SGLang's finish_reason: type is "stop" | "length" | "abort"; matched is a token id or a
    stop string (for type "stop"), length the limit reached (for type "length")."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    matched_text: str | None = None  # for a stop_regex finish (matched is the pattern): the text it matched
    # An abort that is the engine failing the request: the HTTP status its caller gets (as SGLang's FINISH_ABORT).
    # None for an abort someone asked for (/abort_request): the caller gets the output so far, finish type abort.
    status_code: int | None = None


class TokenLogprobs(Struct):
    """Logprobs for a run of tokens, computed from raw logits (before penalties/temperature).

    token_ids may be longer than the other lists: its leading entries then have no logprob (the
    first prompt token, which nothing predicts)."""

    token_ids: list[int] = []
    logprobs: list[float] = []
    top_ids: list[list[int]] = []  # per position, top_logprobs_num alternatives
    top_logprobs: list[list[float]] = []
    ids_logprobs: list[list[float]] = []  # per position, the logprobs of LogprobOptions.token_ids_logprob


class ArenaTensor(Struct, frozen=True):
    """A tensor whose bytes lie in a shared-memory arena (shm/arena.py), passed by handle: the rings carry only this."""

    arena: str  # the arena's segment name
    block: ArenaBlock
    shape: list[int]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"


class ImageItem(Struct, frozen=True):
    """One image of a prompt, preprocessed by the ingress with the checkpoint's HF image processor.

    Its `length` tokens start at prompt position `offset`; the ingress wrote them as ids from IMAGE_PAD_BASE on, drawn
    from a hash of the pixels (runtime/multimodal/inputs.py), so the radix cache shares a prefix only between prompts
    that hold the same image there. The worker replaces their embeddings with the vision tower's output. `tensors` are
    the processor's outputs for this image by name (pixel_values, image_sizes, ...); all of a request's tensors lie
    in one arena block (ArenaTensor.block names the tensor's bytes inside it and the block's end)."""

    offset: int
    length: int
    tensors: dict[str, ArenaTensor]


# Token ids from here up stand for image tokens (ImageItem.pad_id); vocabularies stay far below it.
IMAGE_PAD_BASE = 1 << 30


# --------------------------------------------------------------------------------------------
# ingress -> scheduler
# --------------------------------------------------------------------------------------------


class GenerateRequest(Struct, tag="generate"):
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    logprobs: LogprobOptions = LogprobOptions()
    stream: bool = False
    arrival_time: float = 0.0  # time.time() at the ingress, for latency metrics
    # Prefill only: no token is sampled; the final hidden states are pooled (ModelInfo.pooling) and the
    # vector comes back to the ingress as an EmbeddingResult.
    embed: bool = False
    # Higher runs first. Interactive requests are 0; /v1/batches requests run below them (BATCH_PRIORITY).
    priority: int = 0
    images: list[ImageItem] = []  # in prompt order; their arena blocks are released by the scheduler when it finishes


BATCH_PRIORITY = -1


class AbortRequest(Struct, tag="abort"):
    rid: str


class FlushCacheRequest(Struct, tag="flush_cache"):
    token: int  # echoed in FlushCacheReply


class ServerInfoRequest(Struct, tag="server_info"):
    token: int  # echoed in ServerInfoReply


IngressToScheduler = GenerateRequest | AbortRequest | FlushCacheRequest | ServerInfoRequest | Shutdown


# --------------------------------------------------------------------------------------------
# scheduler -> workers (broadcast ring: every rank receives every message; only rank 0 answers)
# --------------------------------------------------------------------------------------------


class NewRow(Struct):
    """A request that occupies a request-table row for the first time (or again, after retraction).

    The worker resets the row's sampling state and writes `prefix_slots` (KV slots of the cached
    prefix, from the radix cache) into req_to_token[row, :len(prefix_slots)]."""

    row: int
    prefix_slots: list[int]
    sampling: SamplingParams
    logprobs: LogprobOptions = LogprobOptions()
    # Output tokens generated before a retraction: they seed the penalty counters and seed-based
    # sampling step counter, so a retracted request samples exactly as if it had never left.
    prior_output_ids: list[int] = []
    embed: bool = False  # the row pools its hidden states from its first token on (an embedding request)
    images: list[ImageItem] = []  # the request's images (a vision language model encodes them when a chunk needs them)


class BatchPlan(Struct, tag="plan"):
    """One forward step, columnar over the rows of the batch (decode rows and extend rows mixed).

    For row i: the request sits in request-table row `rows[i]`; `prefix_lens[i]` tokens of it are
    already in the KV cache; `extend_lens[i]` new tokens are computed now (1 for decode). Their ids
    are input_ids[offset_i : offset_i + extend_lens[i]] and their KV slots
    out_slots[offset_i : offset_i + extend_lens[i]], offsets being the running sum of extend_lens.

    Overlap: an input id < 0 is a placeholder for a token the worker sampled in an earlier batch
    and the scheduler has not seen yet; it reads future_tokens[-id - 1] on the device. When
    `sample[i]` is true the worker samples a token for row i and stores it in
    future_tokens[future_slots[i]] (future_slots[i] is -1 when sample[i] is false, for example
    for a prefill chunk that is not the last one).
    """

    batch_id: int
    rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    input_ids: list[int]
    out_slots: list[int]
    sample: list[bool]
    future_slots: list[int]
    new_rows: list[NewRow] = []
    # Rows whose requests ended: the worker drops their sampling state (after this batch).
    freed_rows: list[int] = []
    # Plan indices (into rows) whose chunk completes an embedding request: the worker returns its pooled vector.
    pool: list[int] = []


class CompileGrammars(Struct, tag="compile_grammars"):
    """Grammars of queued requests that the workers have not reported ready: compile them in the
    background (a request is admitted only once its grammar is ready, so no step waits for a compile)."""

    specs: list[GrammarSpec]


SchedulerToWorker = BatchPlan | CompileGrammars | Shutdown


# --------------------------------------------------------------------------------------------
# worker rank 0 -> scheduler
# --------------------------------------------------------------------------------------------


class BatchResult(Struct, tag="result"):
    """Sampled tokens of one BatchPlan, one entry per row with sample[i] true, in row order."""

    batch_id: int
    next_token_ids: list[int]
    # Present only for rows that asked for logprobs, keyed by position in next_token_ids.
    logprobs: dict[int, TokenLogprobs] = {}
    # Prompt logprobs for extend rows that asked (logprob_start_len >= 0), keyed by batch row index.
    prompt_logprobs: dict[int, TokenLogprobs] = {}
    forward_ms: float = 0.0  # device time of the step, for logs and the overlap benchmark
    # Pooled vectors of the plan's `pool` indices, keyed by plan index: float32, little-endian, hidden_size values.
    embeddings: dict[int, bytes] = {}


class WorkerError(Struct, tag="worker_error"):
    """A step failed (e.g. CUDA OOM). The scheduler aborts the batch's requests with this message."""

    batch_id: int
    message: str


class WorkerReady(Struct, tag="worker_ready"):
    """Rank 0's first message: the model facts the scheduler sizes itself by (it starts while the model loads)."""

    model_info: ModelInfo


class GrammarReady(Struct, tag="grammar_ready"):
    """Rank 0 compiled (or failed to compile: `error` quotes the compiler) the grammar named `key`."""

    key: str
    error: str | None = None


WorkerToScheduler = BatchResult | WorkerError | WorkerReady | GrammarReady


# --------------------------------------------------------------------------------------------
# scheduler -> detokenizer
# --------------------------------------------------------------------------------------------


class RequestMeta(Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class TokenUpdate(Struct):
    rid: str
    new_token_ids: list[int]
    meta: RequestMeta
    finish: FinishReason | None = None  # set on the request's last update
    logprobs: TokenLogprobs | None = None  # for new_token_ids
    prompt_logprobs: TokenLogprobs | None = None  # once, with the first update
    # Needed by the detokenizer for a request it has not seen yet (first update of the request).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop: list[str] = []  # the request's stop strings: the detokenizer holds back text that may start one
    stop_regex: list[str] = []  # the request's stop patterns (same hold-back, by their longest match)


class TokenUpdates(Struct, tag="tokens"):
    updates: list[TokenUpdate]
    sent_at: float = 0.0  # with --enable-token-timestamps: time.monotonic() when the scheduler sent the batch


SchedulerToDetokenizer = TokenUpdates | Shutdown


# --------------------------------------------------------------------------------------------
# detokenizer -> ingress, scheduler -> ingress
# --------------------------------------------------------------------------------------------


class TextUpdate(Struct):
    rid: str
    text_delta: str  # new text since the previous update (stop string already trimmed)
    new_token_ids: list[int]
    meta: RequestMeta
    finish: FinishReason | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    # with --enable-token-timestamps: time.monotonic() when the scheduler, then the detokenizer, sent these tokens
    timestamps: list[float] = []


class TextUpdates(Struct, tag="text"):
    updates: list[TextUpdate]


DetokenizerToIngress = TextUpdates


class FlushCacheReply(Struct, tag="flush_reply"):
    token: int
    ok: bool
    message: str = ""


class ServerInfoReply(Struct, tag="info_reply"):
    token: int
    info: dict[str, msgspec.Raw]  # scheduler state: pool sizes, running, queued, cache stats


class RequestRejected(Struct, tag="rejected"):
    """The scheduler refused a request it cannot ever serve (e.g. longer than the KV pool)."""

    rid: str
    status: int  # HTTP status to answer with (400 or 503)
    message: str
    param: str | None = None  # the request field at fault, when one is (a grammar the compiler refused)


class EngineReady(Struct, tag="engine_ready"):
    """The scheduler's first message to the ingress: the engine serves this model (the ingress starts while it
    loads, and validates requests with these facts)."""

    model_info: ModelInfo




class EmbeddingResult(Struct):
    rid: str
    embedding: bytes  # float32 little-endian, ModelInfo.pooling.dimensions values (normalised if pooling says so)
    prompt_tokens: int
    cached_tokens: int


class EmbeddingResults(Struct, tag="embeddings"):
    results: list[EmbeddingResult]


SchedulerToIngress = FlushCacheReply | ServerInfoReply | RequestRejected | EmbeddingResults | EngineReady


# --------------------------------------------------------------------------------------------
# Start-up facts reported with a worker's Ready message
# --------------------------------------------------------------------------------------------


class Pooling(Struct, frozen=True):
    """How a sequence's final hidden states become one embedding vector."""

    method: str = "last"  # last | mean | cls
    normalize: bool = True  # L2-normalise the pooled vector
    dimensions: int = 0  # length of the vector (the hidden size)
    # Matryoshka models (config.json is_matryoshka / matryoshka_dimensions) may be truncated to `dimensions`
    # chosen by the request; empty `matryoshka_dimensions` with `matryoshka` true: any length up to `dimensions`.
    matryoshka: bool = False
    matryoshka_dimensions: list[int] = []


class ModelInfo(Struct):
    """What rank 0 reports once the model is loaded and the KV pool allocated. The launcher hands
    it to the scheduler (pool sizes) and the ingress (context length, vocab for validation)."""

    architecture: str
    vocab_size: int
    context_length: int
    eos_token_ids: list[int]
    max_total_tokens: int  # KV slots in the pool (slot 0 is reserved as padding, not counted)
    max_running_requests: int  # rows of the request table
    dtype: str
    device: str
    # --is-embedding: only embedding requests are served. Every server pools `pooling` for embedding requests.
    is_embedding: bool = False
    pooling: Pooling = Pooling()
