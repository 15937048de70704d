"""ModelRunner: what a GPU-rank worker runs. It owns the model, the KV pool, the request table
(req_to_token), the future-token buffer and the sampler, and turns a BatchPlan into a BatchResult.

No process or channel is involved: tests and benchmarks drive it directly with hand-built plans.

One step (docs/architecture.md, "Scheduler <-> worker"):
  1. register plan.new_rows: write their cached prefix slots into req_to_token, reset their sampler state;
  2. resolve placeholder ids (< 0 -> future_tokens[-id - 1]) on the device, with no host sync;
  3. write out_slots into req_to_token[row, prefix_len : prefix_len + extend_len];
  4. run the model; logits only for the last token of each sampling row (and for every new token of
     rows that still owe prompt logprobs);
  5. sample (constrained rows through their grammar's token mask, runtime/constrained/row_matchers.py), store
     the samples in future_tokens[future_slots], free plan.freed_rows.
`launch(plan)` does all of that and starts the copy of the sampled ids to the host; `collect(pending)`
waits for it and builds the BatchResult. `step` is both. A worker that overlaps launches plan N+1
before collecting N, so the GPU never waits for the host round trip.

CUDA graphs (runtime/worker/cuda_graph_runner.py): on CUDA with the Triton attention backend, decode steps of up to
the largest captured size (by default the running-request cap) replay graphs captured at start-up that run steps
2-4 up to the logits, when every row samples and none owes prompt logprobs; other steps run eagerly. With graphs the
request table has one row more than max_running_requests: the dummy row of the graphs' padding rows.

Sizing from memory: the KV pool takes what mem_fraction_static leaves after the weights; the running-request cap
gives every request room for min(context, TOKENS_PER_RUNNING_REQUEST) tokens (the scheduler's admission keeps the
requests actually running within the pool); the graphs cover every batch up to that cap.

torch.compile (--enable-torch-compile): decode forwards of up to torch_compile_max_bs rows run a torch.compile'd
model (inductor, default mode: fused elementwise kernels around cuBLAS GEMMs); the attention backend stays outside
the compiled code (a graph break per layer), and the layers trace their torch code instead of their Triton kernels.
On CUDA the compiled forward is what the small graphs capture.

Embeddings: rows of embedding requests (NewRow.embed) sample nothing; runtime/worker/pooling.py folds their final
hidden states chunk by chunk, and the chunk named in plan.pool returns the pooled vector in BatchResult.embeddings.
With is_embedding the model is the bare decoder (no LM head, no CUDA graphs): every request is an embedding one.

Prompt logprobs: a row asks with logprobs.logprob_start_len >= 0 (only for a fresh request, not a
re-admitted one with prior_output_ids). Each extend step of the row until its first sample returns,
in BatchResult.prompt_logprobs[i], the logprobs of the prompt tokens whose predicting logits it
computed: tokens at positions max(logprob_start_len, 1, P + 1) .. prompt_len - 1 over all chunks,
P being the cached prefix length of the row's first chunk (the logits at the last position of a
chunk are kept until the next chunk, whose first token they score). Concatenating the chunks'
runs in order gives the whole list.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import psutil
import torch

from runtime.constrained.compile_cache import GrammarCompileCache
from runtime.constrained.row_matchers import RowMatchers
from runtime.layers.parallel import TensorParallel
from runtime.layers.quantization.kv_cache import KVCacheScales, resolve_kv_cache_dtype
from runtime.layers.vocab import ParallelLMHead
from runtime.messages import (
    IMAGE_PAD_BASE,
    BatchPlan,
    BatchResult,
    GrammarReady,
    GrammarSpec,
    LogprobOptions,
    ModelInfo,
    NewRow,
    TokenLogprobs,
)
from runtime.model_loader.loader import load_model, locate_checkpoint, read_model_config, resolve_dtype
from runtime.models.config import EMBEDDING_ARCHITECTURES
from runtime.server_args import ServerArgs, model_override
from runtime.worker.attention import create_attention_backend
from runtime.worker.cuda_graph_runner import CudaGraphRunner, capture_batch_sizes
from runtime.worker.distributed import agree_min, check_model_shards, join_tp_group
from runtime.worker.forward_batch import ForwardBatch, ForwardMode
from runtime.worker.image_encoder import ImageEncoder
from runtime.worker.kv_pool import KVPool
from runtime.worker.pooling import Pooler, read_pooling, vectors_to_bytes
from runtime.worker.sampling import Sampler

DEFAULT_MEM_FRACTION_STATIC = 0.85
# CPU pool: a quarter of the available RAM, at most this much, at most CPU_MAX_POOL_TOKENS slots.
CPU_POOL_BYTES_CAP = 2 << 30
CPU_MAX_POOL_TOKENS = 1 << 20
DEFAULT_MAX_RUNNING = {"cuda": 1024, "cpu": 64}
# The default running-request cap gives every request room for this many tokens. Admission (the scheduler) keeps the
# requests actually running within the pool, so the cap only needs to be large enough: on an H200 with Llama-3-8B
# (845k slots) it is 825 rows, and a 1k/1k workload settles near 550 running requests.
TOKENS_PER_RUNNING_REQUEST = 1024

log = logging.getLogger(__name__)


@dataclass
class ModelRunnerConfig:
    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct GGUF)
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tp_rank: int = 0
    tp_size: int = 1
    gpu_id: int | None = None  # with device cuda: the GPU index; None: tp_rank
    # tp_size > 1: where the ranks meet (tcp://host:port; None: the caller joined them) and which GPUs of this node
    # must reach each other peer to peer (--enable-p2p-check; empty: not checked)
    dist_init_method: str | None = None
    dist_timeout_s: float = 600.0
    p2p_check_gpus: list[int] = field(default_factory=list)
    context_length: int | None = None  # None: the model's max_position_embeddings
    max_total_tokens: int | None = None  # KV slots; None: sized from memory
    max_running_requests: int | None = None
    mem_fraction_static: float | None = None  # CUDA only
    attention_backend: str = "auto"
    random_seed: int = 0
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # None: the running-request cap
    cuda_graph_bs: list[int] | None = None  # explicit captured sizes (SGLang's --cuda-graph-bs)
    enable_torch_compile: bool = False
    torch_compile_max_bs: int = 32
    torch_compile_backend: str = "inductor"  # tests use "aot_eager": the same capture, without code generation
    is_embedding: bool = False  # serve the bare decoder: embedding requests only
    quantization: str | None = None  # --quantization (None: the checkpoint's own, if any)
    kv_cache_dtype: str = "auto"  # auto | fp8_e5m2 | fp8_e4m3
    torchao_config: str = ""
    quantize_lm_head: bool = False  # the LM head in fp8 (per vocabulary row)
    # Constrained decoding: "none" disables it; the tokenizer (for the grammars' vocabulary) is loaded by the first
    # grammar compile.
    grammar_backend: str = "xgrammar"
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    model_override: dict = field(default_factory=dict)  # --json-model-override-args: keys over config.json's

    @classmethod
    def from_server_args(cls, args, tp_rank: int = 0, gpu_id: int | None = None) -> ModelRunnerConfig:
        return cls(model_path=args.model_path, load_format=args.load_format, dtype=args.dtype, device=args.device,
                   tp_rank=tp_rank, tp_size=args.tp_size, gpu_id=gpu_id, context_length=args.context_length,
                   max_total_tokens=args.max_total_tokens, max_running_requests=args.max_running_requests,
                   mem_fraction_static=args.mem_fraction_static, attention_backend=args.attention_backend,
                   random_seed=args.random_seed, disable_cuda_graph=args.disable_cuda_graph,
                   cuda_graph_max_bs=args.cuda_graph_max_bs, cuda_graph_bs=args.cuda_graph_bs,
                   enable_torch_compile=args.enable_torch_compile, torch_compile_max_bs=args.torch_compile_max_bs,
                   is_embedding=args.is_embedding, quantization=args.quantization,
                   kv_cache_dtype=args.kv_cache_dtype, torchao_config=args.torchao_config,
                   quantize_lm_head=args.quantize_lm_head,
                   grammar_backend="none" if args.skip_tokenizer_init else args.grammar_backend,
                   tokenizer_path=args.tokenizer_path, trust_remote_code=args.trust_remote_code,
                   model_override=model_override(args.json_model_override_args))


@dataclass
class PendingStep:
    """A launched step whose sampled ids may still be on their way to the host."""

    batch_id: int
    token_ids: torch.Tensor  # host tensor (pinned on CUDA), valid once `done` has fired
    done: torch.cuda.Event | None
    started: torch.cuda.Event | None
    forward_ms: float
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    embeddings: dict[int, torch.Tensor] = field(default_factory=dict)  # pooled vectors by plan index, on the device


class ModelRunner:
    def __init__(self, config: ModelRunnerConfig):
        self.config = config
        self.device = _resolve_device(config.device, config.tp_rank if config.gpu_id is None else config.gpu_id)
        self.tp = TensorParallel(config.tp_rank, config.tp_size)
        checkpoint = locate_checkpoint(config.model_path, config.load_format)
        self.model_config = read_model_config(checkpoint, config.model_override)
        if config.trust_remote_code and config.tp_rank == 0:
            log.info("--trust-remote-code: %s is built from its config.json; no repository code is run",
                     self.model_config.architecture)
        if config.is_embedding and self.model_config.architecture in EMBEDDING_ARCHITECTURES:
            bare = EMBEDDING_ARCHITECTURES[self.model_config.architecture]
            self.model_config = dataclasses.replace(self.model_config, architecture=bare)
        # A bare checkpoint (no LM head) is an embedding model with or without the flag.
        self.is_embedding = self.model_config.architecture in EMBEDDING_ARCHITECTURES.values()
        if config.is_embedding and not self.is_embedding:
            raise ValueError(f"--is-embedding: {self.model_config.architecture} has no embedding form (supported: "
                             f"{', '.join(EMBEDDING_ARCHITECTURES)} and their bare decoders)")
        folder = checkpoint.path if checkpoint.format == "safetensors" else None
        self.pooler = Pooler(read_pooling(folder, self.model_config.hidden_size, self.is_embedding))
        check_model_shards(self.model_config, config.tp_size)
        if self.tp.size > 1:
            join_tp_group(config.dist_init_method, self.tp, self.device, config.dist_timeout_s,
                          config.p2p_check_gpus)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.context_length = self._context_length()
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        kv_scales = KVCacheScales.ones(self.model_config.num_layers)
        self.model = load_model(checkpoint, self.model_config, config.load_format, self.dtype, self.device,
                                self.context_length, self.tp, config.random_seed, quantization_flag=config.quantization,
                                torchao_config=config.torchao_config, kv_scales=kv_scales)
        if config.quantize_lm_head:
            heads = [m for m in self.model.modules() if isinstance(m, ParallelLMHead)]
            if not heads:
                raise ValueError(f"--quantize-lm-head: {type(self.model).__name__} has no LM head to quantize")
            for head in heads:
                head.quantize_fp8(keep_weight=self.model_config.tie_word_embeddings)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the freed 16-bit head goes to the KV pool's sizing
        self.attention_spec = self.model.attention_spec()

        self.max_total_tokens = self._pool_size()
        if self.tp.size > 1:  # every rank holds its share of the same slots
            self.max_total_tokens = agree_min(self.max_total_tokens, self.device)
        spec = self.attention_spec
        self.kv_pool = KVPool(self.max_total_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                              self.kv_cache_dtype, self.device, kv_scales.k, kv_scales.v,
                              keys_only=spec.latent_value_dim is not None)
        log.info("KV cache: %d tokens of %s%s", self.max_total_tokens, str(self.kv_cache_dtype).removeprefix("torch."),
                 f", weights quantized with {config.quantization or config.torchao_config or 'the checkpoint config'}"
                 f"{' (the LM head too)' if config.quantize_lm_head else ''}"
                 if config.quantization or config.torchao_config else "")
        self.attention = create_attention_backend(config.attention_backend, self.attention_spec, self.kv_pool)
        use_cuda_graphs = self._cuda_graphs_possible() and not self.is_embedding  # graphs cover decode steps
        self.max_running_requests = config.max_running_requests or self._default_max_running(use_cuda_graphs)
        # with CUDA graphs, row max_running_requests is the dummy row of their padding rows (never handed out)
        self.req_to_token = torch.zeros(self.max_running_requests + use_cuda_graphs, self.context_length,
                                        dtype=torch.int32, device=self.device)
        # The scheduler recycles future slots in a ring of this size.
        self.future_tokens = torch.zeros(2 * self.max_running_requests + 2, dtype=torch.int64, device=self.device)
        self.sampler = Sampler(self.max_running_requests, self.model_config.vocab_size,
                               list(self.model_config.eos_token_ids), self.device, seed=config.random_seed)
        # Rows that still owe prompt logprobs, and the last-position logits of their previous chunk.
        self.prompt_logprob_rows: dict[int, LogprobOptions] = {}
        self.prompt_carry: dict[int, torch.Tensor] = {}
        self._grammar_refusals: list[GrammarReady] = []
        self.compiled_forward = self._compile() if config.enable_torch_compile else None
        self.graph_runner = self._capture_cuda_graphs() if use_cuda_graphs else None
        eos = list(self.model_config.eos_token_ids)
        self.grammar_cache = GrammarCompileCache(self._load_tokenizer, self.model_config.vocab_size, eos) \
            if config.grammar_backend == "xgrammar" else None
        self.row_matchers = RowMatchers(self.model_config.vocab_size, eos, self.device)
        self.image_encoder = ImageEncoder(self.model, self.device)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(architecture=self.model_config.architecture, vocab_size=self.model_config.vocab_size,
                         context_length=self.context_length, eos_token_ids=list(self.model_config.eos_token_ids),
                         max_total_tokens=self.max_total_tokens, max_running_requests=self.max_running_requests,
                         dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                         is_embedding=self.is_embedding, pooling=self.pooler.pooling)

    # ---------------------------------------------------------------------------------------------
    # Sizing
    # ---------------------------------------------------------------------------------------------

    def _context_length(self) -> int:
        model_max = self.model_config.max_position_embeddings
        longest = self.model_config.longest_context_length
        wanted = self.config.context_length
        if wanted is None:
            return model_max
        if wanted > longest:
            scaled = f" (its rope scaling allows up to {longest})" if longest > model_max else ""
            raise ValueError(f"context_length {wanted} exceeds the model's max_position_embeddings {model_max}{scaled}")
        return wanted

    def _pool_size(self) -> int:
        """KV slots: on CUDA what fits in mem_fraction_static of the GPU after the weights (as SGLang:
        free memory minus the (1 - fraction) share kept for activations); on the CPU a quarter of the
        available RAM, capped. An explicit max_total_tokens is used as given on the CPU and as a cap on CUDA."""
        spec = self.attention_spec
        per_token = KVPool.bytes_per_token(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.kv_cache_dtype,
                                           keys_only=spec.latent_value_dim is not None)
        wanted = self.config.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = self.config.mem_fraction_static or DEFAULT_MEM_FRACTION_STATIC
            budget = free - total * (1 - fraction)
            fits = int(budget // per_token)
            if fits < 1:
                raise MemoryError(f"no GPU memory left for the KV cache after the weights ({free / 2**30:.1f} GiB free "
                                  f"of {total / 2**30:.1f}); raise --mem-fraction-static")
            return min(wanted, fits) if wanted else fits
        if wanted:
            return wanted
        budget = min(psutil.virtual_memory().available // 4, CPU_POOL_BYTES_CAP)
        return max(1, min(CPU_MAX_POOL_TOKENS, budget // per_token))

    def _default_max_running(self, use_cuda_graphs: bool) -> int:
        """As many requests as can each hold min(context, TOKENS_PER_RUNNING_REQUEST) tokens (at least 16, at
        most half the slots), within the device's cap; when the graphs are limited by --cuda-graph-max-bs or
        --cuda-graph-bs, no more than the largest of them, so that every decode step replays a graph (an eager
        step of 200 rows ran at half the speed of a replayed one on the H100)."""
        per_request = min(self.context_length, TOKENS_PER_RUNNING_REQUEST)
        running = max(self.max_total_tokens // per_request, min(16, self.max_total_tokens // 2))
        running = min(running, DEFAULT_MAX_RUNNING[self.device.type])
        if use_cuda_graphs and self.config.cuda_graph_bs:
            running = min(running, max(self.config.cuda_graph_bs))
        elif use_cuda_graphs and self.config.cuda_graph_max_bs:
            running = min(running, self.config.cuda_graph_max_bs)
        return max(1, running)

    def graph_batch_sizes(self) -> list[int]:
        """The decode batch sizes to capture: --cuda-graph-bs, else the ladder up to --cuda-graph-max-bs, else up
        to the running-request cap; never above that cap."""
        cap = self.max_running_requests
        if self.config.cuda_graph_bs:
            return [s for s in self.config.cuda_graph_bs if s <= cap] or [cap]
        return capture_batch_sizes(min(self.config.cuda_graph_max_bs or cap, cap))

    def _load_tokenizer(self):
        from runtime.tokenizer import load_tokenizer

        config = self.config
        return load_tokenizer(ServerArgs(model_path=config.model_path, tokenizer_path=config.tokenizer_path,
                                         trust_remote_code=config.trust_remote_code))

    def _cuda_graphs_possible(self) -> bool:
        if self.device.type != "cuda" or self.config.disable_cuda_graph:
            return False
        from runtime.worker.attention.mla_backend import MlaAttentionBackend
        from runtime.worker.attention.triton_backend import TritonAttentionBackend

        if not isinstance(self.attention, (TritonAttentionBackend, MlaAttentionBackend)):
            log.info("CUDA graphs off: the %s attention backend is not capturable", type(self.attention).__name__)
            return False
        return True

    def _capture_cuda_graphs(self) -> CudaGraphRunner:
        runner = CudaGraphRunner(self.model, self.attention, self.req_to_token, self.future_tokens,
                                 dummy_row=self.max_running_requests, batch_sizes=self.graph_batch_sizes(),
                                 context_length=self.context_length, compiled_forward=self.compiled_forward,
                                 compile_max_bs=self.config.torch_compile_max_bs)
        runner.capture()
        return runner

    def _compile(self):
        """The model forward under torch.compile, with the attention backend left out of the compiled code."""
        self.attention.forward = torch.compiler.disable(self.attention.forward)
        # One compiled variant per batch size (static shapes): let every captured size have its own.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                    2 * len(capture_batch_sizes(self.config.torch_compile_max_bs)))
        return torch.compile(self.model, backend=self.config.torch_compile_backend, dynamic=False)

    # ---------------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------------

    def step(self, plan: BatchPlan) -> BatchResult:
        return self.collect(self.launch(plan))

    def compile_grammars(self, specs: list[GrammarSpec]) -> None:
        """Start compiling in the background; `grammar_replies()` answers each spec once it is done."""
        if self.grammar_cache is None:
            self._grammar_refusals.extend(GrammarReady(spec.key, "constrained decoding is disabled on the worker")
                                          for spec in specs)
            return
        self.grammar_cache.submit(specs)

    @property
    def compiling_grammars(self) -> bool:
        return self.grammar_cache is not None and self.grammar_cache.busy

    def grammar_replies(self) -> list[GrammarReady]:
        replies, self._grammar_refusals = self._grammar_refusals, []
        if self.grammar_cache is not None:
            replies += self.grammar_cache.replies()
        return replies

    @torch.inference_mode()
    def launch(self, plan: BatchPlan) -> PendingStep:
        self._check_plan(plan)
        on_cuda = self.device.type == "cuda"
        started = None
        if on_cuda:
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        wall_start = time.perf_counter()
        for new_row in plan.new_rows:
            self._register(new_row)
        pending = PendingStep(plan.batch_id, torch.empty(0, dtype=torch.int64), None, started, 0.0)
        if self._graph_step(plan):
            logits = self.graph_runner.replay(plan.input_ids, plan.out_slots, plan.rows,
                                              [p + 1 for p in plan.prefix_lens])
            self._sample(plan, logits, list(range(len(plan.rows))), pending)
        else:
            self._eager_step(plan, pending)
        self._free_rows(plan)
        if on_cuda:
            pending.done = torch.cuda.Event(enable_timing=True)
            pending.done.record()
        else:
            pending.forward_ms = (time.perf_counter() - wall_start) * 1e3
        return pending

    def _graph_step(self, plan: BatchPlan) -> bool:
        """Decode steps the captured graphs cover: every row samples and none owes prompt logprobs."""
        return (self.graph_runner is not None and self.graph_runner.can_run(plan.extend_lens) and all(plan.sample)
                and not any(row in self.prompt_logprob_rows for row in plan.rows)
                and not self.image_encoder.needs(plan))

    def _eager_step(self, plan: BatchPlan, pending: PendingStep) -> None:
        num_tokens = len(plan.input_ids)
        ids_and_slots = torch.tensor([plan.input_ids, plan.out_slots], dtype=torch.int64).to(self.device,
                                                                                               non_blocking=True)
        input_ids, out_slots = ids_and_slots[0], ids_and_slots[1]
        if num_tokens and min(plan.input_ids) < 0:
            input_ids = torch.where(input_ids < 0, self.future_tokens[(-input_ids - 1).clamp_(min=0)], input_ids)
        batch = ForwardBatch.build(input_ids=input_ids, out_slots=out_slots, rows=plan.rows,
                                   prefix_lens=plan.prefix_lens, extend_lens=plan.extend_lens,
                                   req_to_token=self.req_to_token)
        batch.input_embeds = self.image_encoder.input_embeds(plan, input_ids)
        batch.rope_positions = self.image_encoder.rope_positions(plan)
        self.req_to_token[batch.rows[batch.token_batch_index], batch.positions] = out_slots.to(torch.int32)
        if batch.batch_size:
            self._forward_and_sample(plan, batch, pending)

    def _free_rows(self, plan: BatchPlan) -> None:
        reused = {new_row.row for new_row in plan.new_rows}
        for row in plan.freed_rows:
            if row in reused:  # freed and taken again by a new request in the same plan: keep the new state
                continue
            self.sampler.free_row(row)
            self.row_matchers.free_row(row)
            self.prompt_logprob_rows.pop(row, None)
            self.prompt_carry.pop(row, None)
            self.pooler.free_row(row)
            self.image_encoder.free_row(row)

    def collect(self, pending: PendingStep) -> BatchResult:
        if pending.done is not None:
            pending.done.synchronize()
            pending.forward_ms = pending.started.elapsed_time(pending.done)
        return BatchResult(batch_id=pending.batch_id, next_token_ids=pending.token_ids.tolist(),
                           logprobs=pending.logprobs, prompt_logprobs=pending.prompt_logprobs,
                           forward_ms=pending.forward_ms, embeddings=vectors_to_bytes(pending.embeddings))

    def _forward_and_sample(self, plan: BatchPlan, batch: ForwardBatch, pending: PendingStep) -> None:
        self.attention.prepare(batch)
        compiled = (self.compiled_forward is not None and batch.mode == ForwardMode.DECODE
                    and batch.batch_size <= self.config.torch_compile_max_bs and batch.input_embeds is None
                    and batch.rope_positions is None)
        hidden = (self.compiled_forward if compiled else self.model)(batch, self.attention)
        starts = _running_sum(plan.extend_lens)
        pending.embeddings = self.pooler.step(plan, hidden, starts)

        # Which token positions need logits: the last token of sampling rows, and every new token of
        # rows owing prompt logprobs (those come first in `wanted`, then the sampling rows' last tokens).
        prompt_rows = [i for i, row in enumerate(plan.rows) if row in self.prompt_logprob_rows]
        sample_rows = [i for i, s in enumerate(plan.sample) if s]
        wanted = [t for i in prompt_rows for t in range(starts[i], starts[i] + plan.extend_lens[i])]
        wanted += [starts[i] + plan.extend_lens[i] - 1 for i in sample_rows]
        if not wanted:
            return
        index = torch.tensor(wanted, dtype=torch.int64).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden.index_select(0, index))

        offset = 0
        for i in prompt_rows:
            count = plan.extend_lens[i]
            pending.prompt_logprobs[i] = self._prompt_logprobs(plan, i, starts[i], logits[offset:offset + count])
            offset += count
        if sample_rows:
            self._sample(plan, logits[offset:], sample_rows, pending)

    def _sample(self, plan: BatchPlan, logits: torch.Tensor, sample_rows: list[int], pending: PendingStep) -> None:
        """Sample the rows `sample_rows` (plan indices; logits [len(sample_rows), vocab] in that order), store the
        samples in future_tokens and start their copy to the host. Constrained rows get their grammar mask
        (runtime/constrained/row_matchers.py: filled here, while the device runs this step's forward pass)."""
        rows = [plan.rows[i] for i in sample_rows]
        token_mask = self.row_matchers.mask(rows) if len(self.row_matchers) else None
        sampled = self.sampler.sample(logits, rows, token_mask)
        future_slots = [plan.future_slots[i] for i in sample_rows]
        keep = [j for j, slot in enumerate(future_slots) if slot >= 0]
        if keep:
            slots = torch.tensor([future_slots[j] for j in keep], dtype=torch.int64).to(self.device, non_blocking=True)
            values = sampled.token_ids if len(keep) == len(sample_rows) else sampled.token_ids[keep]
            self.future_tokens[slots] = values
        pending.logprobs = {j: lp for j, lp in enumerate(sampled.logprobs) if lp is not None}
        if self.device.type == "cuda":
            pending.token_ids = torch.empty(len(sample_rows), dtype=torch.int64, pin_memory=True)
            pending.token_ids.copy_(sampled.token_ids, non_blocking=True)
        else:
            pending.token_ids = sampled.token_ids
        if token_mask is not None:
            self.row_matchers.record(rows, pending)
        for i in sample_rows:
            self.prompt_logprob_rows.pop(plan.rows[i], None)
            self.prompt_carry.pop(plan.rows[i], None)

    def _prompt_logprobs(self, plan: BatchPlan, i: int, start: int, logits: torch.Tensor) -> TokenLogprobs:
        """Logprobs of the prompt tokens scored by this chunk (see the module docstring)."""
        row, prefix, count = plan.rows[i], plan.prefix_lens[i], plan.extend_lens[i]
        # image tokens are scored as the model's image token
        image_token = getattr(self.model, "image_token_id", 0)
        image_token = image_token if 0 <= image_token < self.model_config.vocab_size else 0
        chunk_ids = [t if t < IMAGE_PAD_BASE else image_token for t in plan.input_ids[start:start + count]]
        carry = self.prompt_carry.pop(row, None)
        # logits[j] scores the token at position prefix + j + 1
        scoring, next_ids, first_position = logits[:-1], chunk_ids[1:], prefix + 1
        if carry is not None:
            scoring, next_ids, first_position = torch.cat([carry[None], scoring]), chunk_ids, prefix
        if not plan.sample[i]:
            self.prompt_carry[row] = logits[-1]
        options = self.prompt_logprob_rows[row]
        skip = max(0, max(options.logprob_start_len, 1) - first_position)
        return self.sampler.prompt_logprobs(scoring[skip:], next_ids[skip:], options.top_logprobs_num,
                                            options.token_ids_logprob)

    def _register(self, new_row: NewRow) -> None:
        if new_row.prefix_slots:
            slots = torch.tensor(new_row.prefix_slots, dtype=torch.int32).to(self.device, non_blocking=True)
            self.req_to_token[new_row.row, :len(new_row.prefix_slots)] = slots
        self.sampler.add_row(new_row.row, new_row.sampling, new_row.logprobs, new_row.prior_output_ids)
        self.row_matchers.free_row(new_row.row)
        grammar = new_row.sampling.grammar
        if grammar is not None:
            if self.grammar_cache is None:
                raise ValueError("a request with a grammar reached a worker started with --grammar-backend none")
            self.row_matchers.add_row(new_row.row, self.grammar_cache.get(grammar), new_row.prior_output_ids)
        self.prompt_carry.pop(new_row.row, None)
        self.prompt_logprob_rows.pop(new_row.row, None)
        self.pooler.free_row(new_row.row)
        if new_row.embed:
            self.pooler.add_row(new_row.row)
        self.image_encoder.add_row(new_row.row, new_row.images)
        if new_row.logprobs.logprob_start_len >= 0 and not new_row.prior_output_ids:
            self.prompt_logprob_rows[new_row.row] = new_row.logprobs

    def _check_plan(self, plan: BatchPlan) -> None:
        """Cheap consistency checks (O(rows)), so a scheduler bug surfaces as a clear error, not a device fault."""
        n = len(plan.rows)
        for name in ("prefix_lens", "extend_lens", "sample", "future_slots"):
            if len(getattr(plan, name)) != n:
                raise ValueError(f"BatchPlan.{name} has {len(getattr(plan, name))} entries for {n} rows")
        total = sum(plan.extend_lens)
        if len(plan.input_ids) != total or len(plan.out_slots) != total:
            raise ValueError(f"BatchPlan.input_ids ({len(plan.input_ids)}) and out_slots ({len(plan.out_slots)}) "
                             f"must both hold sum(extend_lens) = {total} entries")
        for row, prefix, extend in zip(plan.rows, plan.prefix_lens, plan.extend_lens):
            if not 0 <= row < self.max_running_requests:
                raise ValueError(f"BatchPlan.rows: row {row} is outside 0..{self.max_running_requests - 1}")
            if extend < 1 or prefix < 0 or prefix + extend > self.context_length:
                raise ValueError(f"BatchPlan row {row}: prefix_len {prefix} + extend_len {extend} must be within "
                                 f"1..context_length {self.context_length}")
        if plan.pool and not 0 <= min(plan.pool) <= max(plan.pool) < n:
            raise ValueError(f"BatchPlan.pool must hold plan indices in 0..{n - 1}")
        if self.is_embedding and any(plan.sample):
            raise ValueError("BatchPlan.sample: an embedding model samples no tokens")
        if total and not 0 < min(plan.out_slots) <= max(plan.out_slots) <= self.max_total_tokens:
            raise ValueError(f"BatchPlan.out_slots must lie in 1..{self.max_total_tokens}")
        vocab, futures = self.model_config.vocab_size, len(self.future_tokens)
        if total and not -futures <= min(plan.input_ids) <= max(plan.input_ids) < vocab:
            if min(plan.input_ids) < -futures or any(vocab <= t < IMAGE_PAD_BASE for t in plan.input_ids):
                raise ValueError(f"BatchPlan.input_ids must be token ids below {vocab}, image tokens from "
                                 f"{IMAGE_PAD_BASE} or placeholders down to -{futures}")
            # the rows that hold images once this plan's new rows are registered
            with_images = (set(self.image_encoder.rows) - {new_row.row for new_row in plan.new_rows}) | {
                new_row.row for new_row in plan.new_rows if new_row.images}
            for row, start, extend in zip(plan.rows, _running_sum(plan.extend_lens), plan.extend_lens):
                if row not in with_images and max(plan.input_ids[start:start + extend]) >= IMAGE_PAD_BASE:
                    raise ValueError(f"BatchPlan row {row}: image tokens in a row that has no images")


def _running_sum(lengths: list[int]) -> list[int]:
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length
    return starts


def _resolve_device(device: str, gpu_id: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but no CUDA device is available")
        if resolved.index is None:
            if gpu_id >= torch.cuda.device_count():
                raise ValueError(f"GPU {gpu_id} is not visible: {torch.cuda.device_count()} GPUs are (--base-gpu-id "
                                 f"+ dp-size x tp-size ranks per node must fit)")
            resolved = torch.device("cuda", gpu_id)
        torch.cuda.set_device(resolved)
    elif resolved.type != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda[:N]; got {device!r}")
    return resolved
