"""fp8 on CUDA (skipped without it; scripts/gpu_quant.sh runs it): the row-wise scaled GEMM, per-channel, per-tensor
and block layers in bf16 against the unquantized product (at a decode size, through the weight-only kernel, and
above it), and the fp8-weight + fp8-KV runner against the bf16 one."""

from __future__ import annotations

import pytest
import torch

from runtime.layers.linear import MergedColumnParallelLinear
from runtime.layers.parallel import TensorParallel
from runtime.layers.quantization.fp8_linear import Fp8BlockMethod, Fp8PerChannelMethod, Fp8PerTensorMethod
from runtime.layers.quantization.fp8_ops import (
    WEIGHT_ONLY_MAX_TOKENS,
    quantize_blocks,
    quantize_per_channel,
    quantize_per_token,
    scaled_mm,
)
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import runner_logits, save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_rowwise_scaled_mm_on_cuda_is_the_dequantized_product():
    x, w = torch.randn(33, 4096, device="cuda") * 2, torch.randn(1024, 4096, device="cuda") * 0.02
    x_fp8, x_scale = quantize_per_token(x)
    w_fp8, w_scale = quantize_per_channel(w)
    out = scaled_mm(x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale[:, None]).t()
    assert rel(out, expected) < 1e-2


@pytest.mark.parametrize("tokens", [7, WEIGHT_ONLY_MAX_TOKENS + 36])  # the weight-only kernel; quantized x + _scaled_mm
@pytest.mark.parametrize("method", [Fp8PerChannelMethod(), Fp8PerTensorMethod(static_activations=False),
                                    Fp8BlockMethod((128, 128))])
def test_fp8_layers_on_cuda(method, tokens):
    with torch.device("cuda"):
        layer = MergedColumnParallelLinear(512, [256, 256], False, TensorParallel(), torch.bfloat16)
    layer.set_quant_method(method)
    params = dict(layer.named_parameters())
    full = []
    for shard in range(2):
        w = torch.randn(256, 512, device="cuda") * 0.05
        full.append(w)
        if isinstance(method, Fp8BlockMethod):
            q, s = quantize_blocks(w, (128, 128))
            tensors = {"weight": q, "weight_scale_inv": s}
        elif isinstance(method, Fp8PerTensorMethod):
            s = w.abs().max() / 448
            tensors = {"weight": (w / s).to(torch.float8_e4m3fn), "weight_scale": s}
        else:
            q, s = quantize_per_channel(w)
            tensors = {"weight": q, "weight_scale": s[:, None]}
        for name, tensor in tensors.items():
            params[name].weight_loader(params[name], tensor, name, shard)
    method.process_weights_after_loading(layer)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    assert rel(layer(x), x.float() @ torch.cat(full).t()) < 0.06


def test_fp8_weights_and_kv_cache_on_cuda(tmp_path):
    save_tiny_model("LlamaForCausalLM", str(tmp_path))
    prompts = [[5, 17, 33, 2, 90, 41, 7, 8, 100, 3]]
    config = dict(model_path=str(tmp_path), device="cuda", dtype="bfloat16", max_total_tokens=256,
                  max_running_requests=4)
    plain = runner_logits(ModelRunner(ModelRunnerConfig(**config)), prompts)[0]
    fp8 = ModelRunner(ModelRunnerConfig(**config, quantization="fp8", kv_cache_dtype="fp8_e4m3"))
    assert fp8.kv_pool.k[0].dtype == torch.float8_e4m3fn
    assert rel(runner_logits(fp8, prompts)[0], plain) < 0.3  # the tiny random model is sensitive (see the CPU test)
