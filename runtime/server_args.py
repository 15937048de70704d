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


# Flags accepted by SGLang that a later issue implements. Until they work they are refused with
# this message rather than silently ignored.
NOT_YET_SUPPORTED = {
    "--quantization": "quantization is not implemented yet",
    "--kv-cache-dtype": "a KV cache dtype other than the model dtype is not implemented yet",
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
}


class ServerArgsError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="Serve an LLM over HTTP.")
    defaults = ServerArgs()
    for name in ServerArgs.__struct_fields__:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        aliases = {"tp_size": ["--tp"], "dp_size": ["--dp"]}.get(name, [])
        if isinstance(default, bool):
            parser.add_argument(flag, *aliases, dest=name, action="store_true", default=default)
            continue
        field_type = ServerArgs.__annotations__[name]
        kind = int if "int" in field_type else float if "float" in field_type else str
        parser.add_argument(flag, *aliases, dest=name, type=kind, default=default, choices=CHOICES.get(name))
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
    return args
