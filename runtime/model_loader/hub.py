"""Model ids on a hub (`Qwen/Qwen2-7B-Instruct`) into local folders, once, in the launcher, before
any actor starts: every actor then sees a plain HF folder.

The hub is Hugging Face (huggingface_hub: HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN) unless
SGLANG_USE_MODELSCOPE or RUNTIME_USE_MODELSCOPE is true, then ModelScope (the optional `modelscope`
library: MODELSCOPE_CACHE). --download-dir picks the cache of either, --revision the branch, tag or
commit. Only what serving reads is fetched: configs, tokenizer files and safetensors weights (our
loader reads no `.bin` pickles, so they are never downloaded, and runs no repository Python, so no `*.py` either,
whatever --trust-remote-code says). Any failure is a HubError whose
message is one line naming the id, the hub and the cause.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import msgspec

from runtime.server_args import ServerArgs

MODELSCOPE_ENV = ("SGLANG_USE_MODELSCOPE", "RUNTIME_USE_MODELSCOPE")
TRUE_VALUES = ("1", "true", "yes", "on")

CONFIG_PATTERNS = ["*.json"]  # config, generation_config, the safetensors index, tokenizer.json and its config
TOKENIZER_PATTERNS = ["*.model", "*.tiktoken", "tokenizer*", "vocab*", "merges.txt", "*.jinja"]
WEIGHT_PATTERNS = ["*.safetensors"]


class HubError(RuntimeError):
    """One line: the id, the hub, the cause."""


def use_modelscope(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name, "").strip().lower() in TRUE_VALUES for name in MODELSCOPE_ENV)


def is_hub_id(path: str | None) -> bool:
    """`org/name` (or `name`) that is no local file or folder. Paths that look local (absolute, ./, ~,
    a .gguf file) are never sent to a hub: the loader then reports them missing."""
    if not path or os.path.exists(path):
        return False
    if path.startswith(("/", ".", "~")) or path.endswith(".gguf"):
        return False
    return path.count("/") <= 1 and all(part for part in path.split("/"))


def allow_patterns(load_format: str, tokenizer_only: bool = False) -> list[str]:
    patterns = CONFIG_PATTERNS + TOKENIZER_PATTERNS
    if not tokenizer_only and load_format != "dummy":  # dummy weights need only the config
        patterns = patterns + WEIGHT_PATTERNS
    return patterns


def describe_cause(err: BaseException) -> str:
    """The innermost cause (a refused connection hides under two or three wrappers), on one line."""
    chain = [err]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    messages = [f"{type(e).__name__}: {' '.join(str(e).split())}" for e in (chain[0], chain[-1])]
    text = messages[0] if chain[-1] is chain[0] else f"{messages[0]} (caused by {messages[1]})"
    return text if len(text) <= 400 else text[:397] + "..."


def download_huggingface(repo_id: str, revision: str | None, cache_dir: str | None, patterns: list[str],
                         environ: Mapping[str, str]) -> str:
    import huggingface_hub

    offline = environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES
    # Online, huggingface_hub falls back to a cached snapshot of the revision when the hub cannot be reached.
    return huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                             local_files_only=offline, endpoint=environ.get("HF_ENDPOINT") or None)


def download_modelscope(flag: str, model_id: str, revision: str | None, cache_dir: str | None,
                        patterns: list[str]) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as err:
        raise HubError(f"{flag} {model_id}: SGLANG_USE_MODELSCOPE is set but the `modelscope` library is not "
                       f"installed (pip install 'runtime[modelscope]'): {err}") from None
    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)


def download(flag: str, repo_id: str, patterns: list[str], revision: str | None, cache_dir: str | None,
             environ: Mapping[str, str]) -> str:
    """The local folder of `repo_id` (from the cache when there); HubError on any failure."""
    hub = "ModelScope" if use_modelscope(environ) else "Hugging Face"
    try:
        if hub == "ModelScope":
            folder = download_modelscope(flag, repo_id, revision, cache_dir, patterns)
        else:
            folder = download_huggingface(repo_id, revision, cache_dir, patterns, environ)
    except HubError:
        raise
    except Exception as err:  # the hub libraries raise many types (HTTP, offline, not found, gated, OS)
        at = f"@{revision}" if revision else ""
        raise HubError(f"{flag} {repo_id}{at}: cannot fetch it from {hub}: {describe_cause(err)}") from None
    if not os.path.isdir(folder):
        raise HubError(f"{flag} {repo_id}: {hub} gave {folder!r}, which is not a folder")
    return str(folder)


def resolve_model_paths(args: ServerArgs, environ: Mapping[str, str] | None = None) -> ServerArgs:
    """args with hub ids in --model-path / --tokenizer-path replaced by local folders. The served
    name stays the id (what clients asked for), as in SGLang. Raises HubError."""
    environ = os.environ if environ is None else environ
    changes: dict[str, str] = {}
    if is_hub_id(args.model_path):
        folder = download("--model-path", args.model_path,
                          allow_patterns(args.load_format), args.revision,
                          args.download_dir, environ)
        if args.load_format != "dummy" and not glob.glob(os.path.join(folder, "*.safetensors")):
            raise HubError(f"--model-path {args.model_path}: the repository has no *.safetensors weights (only "
                           f"safetensors are loaded; .bin pickles never are)")
        changes["model_path"] = folder
        if args.served_model_name is None:
            changes["served_model_name"] = args.model_path
    if is_hub_id(args.tokenizer_path):
        changes["tokenizer_path"] = download("--tokenizer-path", args.tokenizer_path,
                                             allow_patterns(args.load_format, True),
                                             args.revision, args.download_dir, environ)
    return msgspec.structs.replace(args, **changes) if changes else args
