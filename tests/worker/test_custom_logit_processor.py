"""Custom logit processors in the sampler: SGLang's wire form loads (its base class mapped to ours), runs on
its own rows only, sees each request's custom_params (the same dict every step), and its result feeds the
greedy and the stochastic paths; a processor that returns the wrong shape is an error."""

from __future__ import annotations

import importlib
import json
import sys

import dill
import pytest
import torch

from runtime.messages import SamplingParams
from runtime.worker.custom_logit_processor import CustomLogitProcessor, load_processor
from runtime.worker.sampling import Sampler

VOCAB = 32


class ForceToken(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list):
        for i, params in enumerate(custom_param_list):
            logits[i, :] = -float("inf")
            logits[i, params["token_id"]] = 0.0
        return logits


class CountUp(CustomLogitProcessor):
    """Stateful: forces start, start + 1, ... keeping its counter in custom_params."""

    def __call__(self, logits, custom_param_list):
        for i, params in enumerate(custom_param_list):
            logits[i, :] = -float("inf")
            logits[i, params["start"] + params.setdefault("step", 0)] = 0.0
            params["step"] += 1
        return logits


class WrongShape(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list):
        return logits[:, :2]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on CUDA stochastic rows take the kernels


def sampler(device: str = "cpu") -> Sampler:
    return Sampler(max_rows=4, vocab_size=VOCAB, eos_token_ids=[], device=device, seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_processor_applies_to_its_rows_only_greedy_and_sampled(device):
    s = sampler(device)
    logits = torch.zeros(3, VOCAB, device=device)
    logits[:, 7] = 5.0  # what an unprocessed greedy row picks
    s.add_row(0, SamplingParams(temperature=0.0, custom_logit_processor=ForceToken.to_str(),
                                custom_params={"token_id": 3}))
    s.add_row(1, SamplingParams(temperature=0.0))
    s.add_row(2, SamplingParams(temperature=1.0, top_p=0.9, custom_logit_processor=ForceToken.to_str(),
                                custom_params={"token_id": 11}))
    for _ in range(3):
        out = s.sample(logits, [0, 1, 2])
        assert out.token_ids.tolist() == [3, 7, 11]
    assert logits[0, 7] == 5.0 and logits[0, 3] == 0.0  # the caller's logits are untouched


def test_custom_params_persist_per_request():
    s = sampler()
    s.add_row(0, SamplingParams(temperature=0.0, custom_logit_processor=CountUp.to_str(), custom_params={"start": 4}))
    s.add_row(1, SamplingParams(temperature=0.0, custom_logit_processor=CountUp.to_str(), custom_params={"start": 20}))
    tokens = [s.sample(torch.zeros(2, VOCAB), [0, 1]).token_ids.tolist() for _ in range(3)]
    assert tokens == [[4, 20], [5, 21], [6, 22]]


def test_wrong_shape_is_an_error():
    s = sampler()
    s.add_row(0, SamplingParams(custom_logit_processor=WrongShape.to_str()))
    with pytest.raises(ValueError, match="must return logits of shape"):
        s.sample(torch.zeros(1, VOCAB), [0])


CLIENT_SCRIPT = """
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


def make():
    class AddOne(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list):
            return logits + float(len(custom_param_list))

    return AddOne
"""


def test_sglang_clients_processors_load_without_sglang(tmp_path, monkeypatch):
    """SGLang's tests define processors inside their test files: dill sends the class by value, its base class
    (sglang's) and its methods' module namespace by name. Neither sglang (a stand-in package here) nor the
    client's file is importable on the server: the base maps to ours, the namespace to builtins only."""
    package = tmp_path / "sglang" / "srt" / "sampling"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "custom_logit_processor.py").write_text("class CustomLogitProcessor:\n    pass\n")
    (tmp_path / "client_script.py").write_text(CLIENT_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    client_modules = lambda: [m for m in sys.modules if m.split(".")[0] in ("sglang", "client_script")]  # noqa: E731
    for name in client_modules():
        monkeypatch.delitem(sys.modules, name)
    serialized = json.dumps({"callable": dill.dumps(importlib.import_module("client_script").make()).hex()})
    for name in client_modules():
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    processor = load_processor(serialized)
    assert isinstance(processor, CustomLogitProcessor) and not client_modules()
    assert processor(torch.zeros(1, 2), [{}]).tolist() == [[1.0, 1.0]]
