"""Custom logit processors (SGLang's `custom_logit_processor`, behind --enable-custom-logit-processor).

A client subclasses CustomLogitProcessor and sends `MyProcessor.to_str()` as the request's
`custom_logit_processor`, with per-request `custom_params` in its sampling parameters. The string is
SGLang's wire form, JSON {"callable": "<hex of dill.dumps(the class)>"}, so processors written for SGLang
(subclasses of sglang.srt.sampling.custom_logit_processor.CustomLogitProcessor) load here unchanged:
that base class is mapped to this module's, and the sglang package is not needed on the server.

Trust: loading one runs arbitrary Python code from the request, in the worker process. Enable the flag only
for clients you would let run code on the server.

Names the processor's methods take from their module resolve if the server can import that module; if it
cannot (a client's script or test file), the methods see builtins only.

The worker loads each distinct string once (dill needs to be installed: the `custom-logit-processor` extra)
and calls the instance as processor(logits [rows, vocab], [custom_params of each row]) -> logits."""

from __future__ import annotations

import builtins
import io
import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import dill

if TYPE_CHECKING:
    import torch

SGLANG_BASE = ("sglang.srt.sampling.custom_logit_processor", "CustomLogitProcessor")


class CustomLogitProcessor(ABC):
    """The base class of a custom logit processor; the same interface as SGLang's."""

    @abstractmethod
    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        """Return logits of the same shape (it may modify `logits` in place and return it)."""

    @classmethod
    def to_str(cls) -> str:
        return json.dumps({"callable": dill.dumps(cls).hex()})


class _Unpickler(dill.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == SGLANG_BASE:
            return CustomLogitProcessor
        try:
            return super().find_class(module, name)
        except ImportError:
            if name != "__dict__":
                raise
            # dill refers to the global namespace of the module that defined the class's methods by the module's
            # name: a client's test file or script that the server cannot import. The methods then get one of
            # their own, builtins only (SGLang's tests define their processors that way).
            return {"__builtins__": builtins, "__name__": module}


def load_processor(serialized: str) -> CustomLogitProcessor:
    """The processor instance a `custom_logit_processor` string describes (this runs the client's code)."""
    payload = json.loads(serialized)["callable"]
    loaded = _Unpickler(io.BytesIO(bytes.fromhex(payload))).load()
    processor = loaded() if isinstance(loaded, type) else loaded
    if not callable(processor):
        raise ValueError(f"custom_logit_processor: {type(processor).__name__} is not callable")
    return processor
