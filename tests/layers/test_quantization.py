"""fp8 quantization: the primitives, each checkpoint format against the same weights dequantized, online fp8, the
per-rank shards of quantized parameters under tensor parallelism, torchao, and every wrong config refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from runtime.layers.linear import QKVParallelLinear, RowParallelLinear
from runtime.layers.parallel import TensorParallel
from runtime.layers.quantization import QuantizationConfigError, quant_config_for
from runtime.layers.quantization.fp8_linear import Fp8BlockMethod, Fp8PerChannelMethod, Fp8PerTensorMethod
from runtime.layers.quantization.fp8_ops import (
    FP8,
    WEIGHT_ONLY_MAX_TOKENS,
    expand_blocks,
    quantize_blocks,
    quantize_per_channel,
    quantize_per_tensor,
    quantize_per_token,
    quantize_per_token_group,
    scaled_mm,
    to_fp8,
    weight_only_kernel_applies,
)
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.layers.quant_fixtures import CONFIGS, KV_SCALES, write_quantized
from tests.model_fixtures import runner_logits, save_tiny_model

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8, 100, 3], [8, 8, 21, 60]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def runner(folder: str, **options) -> ModelRunner:
    return ModelRunner(ModelRunnerConfig(model_path=folder, device="cpu", max_total_tokens=256,
                                         max_running_requests=4, **options))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_model("LlamaForCausalLM", path)
    return path


def test_scaled_mm_on_the_cpu_is_the_dequantized_product():
    x, w = torch.randn(7, 64) * 3, torch.randn(48, 64)
    x_fp8, x_scale = quantize_per_token(x)
    w_fp8, w_scale = quantize_per_channel(w)
    expected = (x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale[:, None]).t()
    assert rel(scaled_mm(x_fp8, x_scale, w_fp8, w_scale, torch.float32), expected) < 1e-6
    assert rel(w_fp8.float() * w_scale[:, None], w) < 0.05  # e4m3 keeps 3 mantissa bits


def test_saturation_instead_of_nan():
    assert torch.equal(to_fp8(torch.tensor([1e6, -1e6]), torch.tensor(1.0)).float(), torch.tensor([448.0, -448.0]))
    q, scale = quantize_per_channel(torch.zeros(4, 16))  # all-zero rows: no division by zero
    assert not q.float().isnan().any() and (scale > 0).all()


@pytest.mark.parametrize("method", [Fp8PerChannelMethod(), Fp8PerTensorMethod(static_activations=True),
                                    Fp8BlockMethod((16, 16))])
def test_a_quantized_layer_computes_the_dequantized_matmul(method):
    """One qkv layer, each part with its own scales, against the hand-written dequantized product."""
    layer = QKVParallelLinear(64, 16, 4, 2, False, TensorParallel(), torch.float32)
    parts = {"q": torch.randn(64, 64), "k": torch.randn(32, 64) * 4, "v": torch.randn(32, 64) * 0.1}
    layer.set_quant_method(method)
    params = dict(layer.named_parameters())
    dequantized = []
    for shard, w in parts.items():
        if isinstance(method, Fp8PerChannelMethod):
            q, s = quantize_per_channel(w)
            tensors, deq = {"weight": q, "weight_scale": s[:, None]}, q.float() * s[:, None]
        elif isinstance(method, Fp8PerTensorMethod):
            s = w.abs().max() / 448
            q = (w / s).to(FP8)
            scales = {"q": 0.01, "k": 0.02, "v": 0.03}
            tensors = {"weight": q, "weight_scale": s, "input_scale": torch.tensor(scales[shard])}
            deq = q.float() * s
        else:
            q, s = quantize_blocks(w, (16, 16))
            tensors, deq = {"weight": q, "weight_scale_inv": s}, q.float() * expand_blocks(s, (16, 16), q.shape)
        for name, tensor in tensors.items():
            params[name].weight_loader(params[name], tensor, f"{shard}_proj.{name}", shard)
        dequantized.append(deq)
    method.process_weights_after_loading(layer)
    x = torch.randn(5, 64)
    if isinstance(method, Fp8PerChannelMethod):
        x_q, x_s = quantize_per_token(x)
        x_deq = x_q.float() * x_s
    elif isinstance(method, Fp8PerTensorMethod):
        x_deq = (x / 0.03).clamp(-448, 448).to(FP8).float() * 0.03  # the largest of the three input scales
    else:
        groups = x.view(5, 4, 16)
        s = groups.abs().amax(dim=2, keepdim=True) / 448
        x_deq = ((groups / s).to(FP8).float() * s).view(5, 64)
    expected = x_deq @ torch.cat(dequantized).t()
    assert rel(layer(x), expected) < 1e-5


@pytest.mark.parametrize("method", [Fp8PerChannelMethod(), Fp8PerTensorMethod(static_activations=True)])
def test_decode_sized_batches_take_the_weight_only_kernel(method, monkeypatch):
    """On CUDA, up to WEIGHT_ONLY_MAX_TOKENS tokens, per-channel and per-tensor layers multiply the unquantized x by
    the fp8 weight (kernels/fp8_gemm.py); more tokens quantize x for torch._scaled_mm. The CPU keeps _scaled_mm
    always, so the dispatch is opened to the CPU here and the kernel runs in Triton's interpreter."""
    pytest.importorskip("triton")
    from runtime.layers.quantization import fp8_linear

    assert not weight_only_kernel_applies(torch.randn(1, 64))  # the CPU path is unchanged
    layer = QKVParallelLinear(64, 16, 4, 2, False, TensorParallel(), torch.float32)
    layer.set_quant_method(method)
    params = dict(layer.named_parameters())
    dequantized = []
    for shard, rows in (("q", 64), ("k", 32), ("v", 32)):
        w = torch.randn(rows, 64)
        if isinstance(method, Fp8PerChannelMethod):
            q, s = quantize_per_channel(w)
            tensors, deq = {"weight": q, "weight_scale": s[:, None]}, q.float() * s[:, None]
        else:  # one scale per part, broadcast over its rows
            s = w.abs().max() / 448
            q = (w / s).to(FP8)
            tensors, deq = {"weight": q, "weight_scale": s, "input_scale": torch.tensor(0.05)}, q.float() * s
        for name, tensor in tensors.items():
            params[name].weight_loader(params[name], tensor, f"{shard}_proj.{name}", shard)
        dequantized.append(deq)
    method.process_weights_after_loading(layer)
    weight = torch.cat(dequantized)
    calls = []
    kernel = fp8_linear.weight_only_mm
    monkeypatch.setattr(fp8_linear, "weight_only_kernel_applies", lambda x: x.shape[0] <= WEIGHT_ONLY_MAX_TOKENS)
    monkeypatch.setattr(fp8_linear, "weight_only_mm", lambda *args: calls.append(1) or kernel(*args))
    decode = torch.randn(3, 64)
    assert rel(layer(decode), decode @ weight.t()) < 1e-5  # x unquantized: the exact dequantized product
    assert len(calls) == 1
    prefill = torch.randn(WEIGHT_ONLY_MAX_TOKENS + 1, 64)
    exact = prefill @ weight.t()
    assert 1e-4 < rel(layer(prefill), exact) < 0.1  # x quantized to fp8: close, not exact
    assert len(calls) == 1


def test_the_weight_only_kernel_reduces_k_splits_on_the_layers_own_counters(monkeypatch):
    """A decode-sized call splits K = 4096 and reduces the splits in the kernel: on counters the layer
    allocated at load (no memset per call), which the kernel leaves zero for the next call and CUDA-graph replay."""
    pytest.importorskip("triton")
    from kernels.fp8_gemm import default_fp8_gemm_tiles
    from runtime.layers.quantization import fp8_linear

    tiles = default_fp8_gemm_tiles(2, 128, 4096)
    assert tiles.reduce_in_kernel and tiles.split_k > 1
    layer = RowParallelLinear(4096, 128, False, TensorParallel(), torch.float32)
    layer.set_quant_method(Fp8PerChannelMethod(online=True))
    w = torch.randn(128, 4096)
    layer.weight.weight_loader(layer.weight, w, "o_proj.weight", None)
    layer.quant_method.process_weights_after_loading(layer)
    counters = layer.split_counters
    assert counters.dtype == torch.int32 and counters.numel() >= 128 // tiles.block_n and not counters.any()
    passed = []
    kernel = fp8_linear.weight_only_mm
    monkeypatch.setattr(fp8_linear, "weight_only_kernel_applies", lambda x: x.shape[0] <= WEIGHT_ONLY_MAX_TOKENS)
    monkeypatch.setattr(fp8_linear, "weight_only_mm", lambda *args: passed.append(args[3]) or kernel(*args))
    dequantized = layer.weight.float() * layer.weight_scale[:, None]
    for seed in range(2):
        x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(seed))
        assert rel(layer(x), x @ dequantized.t()) < 1e-5
        assert passed[-1] is counters and not counters.any()


def test_scales_follow_their_rows_under_tensor_parallelism():
    """Column (qkv) and row (o) layers at tp 2: each rank's weight rows and block/channel scales are the slices of
    the full tensors, and the ranks' partial results add up to the unsharded layer's."""
    w_qkv = {"q": torch.randn(64, 64), "k": torch.randn(32, 64), "v": torch.randn(32, 64)}
    w_o = torch.randn(64, 64)
    x = torch.randn(3, 64)

    def build(tp: TensorParallel, method_factory):
        qkv = QKVParallelLinear(64, 16, 4, 2, False, tp, torch.float32)
        o = RowParallelLinear(64, 64, False, tp, torch.float32)
        for layer in (qkv, o):
            layer.set_quant_method(method_factory())
        for layer, items in ((qkv, w_qkv.items()), (o, [(None, w_o)])):
            params = dict(layer.named_parameters())
            for shard, w in items:
                q, s = quantize_blocks(w, (16, 16)) if "weight_scale_inv" in params else quantize_per_channel(w)
                tensors = {"weight": q, "weight_scale_inv": s} if "weight_scale_inv" in params else \
                    {"weight": q, "weight_scale": s[:, None]}
                for name, tensor in tensors.items():
                    params[name].weight_loader(params[name], tensor, name, shard)
            layer.quant_method.process_weights_after_loading(layer)
        return qkv, o

    for factory in (lambda: Fp8BlockMethod((16, 16)), Fp8PerChannelMethod):
        full_qkv, full_o = build(TensorParallel(), factory)
        ranks = [build(TensorParallel(rank, 2), factory) for rank in range(2)]
        q_parts = [qkv.split(qkv.matmul(x)) for qkv, _ in ranks]
        full_q, full_k, full_v = full_qkv.split(full_qkv.matmul(x))
        assert rel(torch.cat([p[0] for p in q_parts], dim=1), full_q) < 1e-5
        assert rel(torch.cat([p[1] for p in q_parts], dim=1), full_k) < 1e-5
        x_o = torch.randn(3, 64)
        if factory is Fp8PerChannelMethod:  # per-token activation scales differ per shard: compare to a tolerance
            partial = sum(o.matmul(x_o[:, r * 32:(r + 1) * 32]) for r, (_, o) in enumerate(ranks))
            assert rel(partial, full_o.matmul(x_o)) < 0.05
        else:  # 1 x 16 activation groups do not straddle the 32-column shards: exact
            partial = sum(o.matmul(x_o[:, r * 32:(r + 1) * 32]) for r, (_, o) in enumerate(ranks))
            assert rel(partial, full_o.matmul(x_o)) < 1e-5


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fake_quantized_activations(method, quantized_layer):
    """What a quantized layer's GEMM sees of its input, as the method's recipe says (for the reference model)."""
    if isinstance(method, Fp8PerChannelMethod):
        ub = method.activation_scale_ub
        return lambda x: dequantize(*quantize_per_token(x, None if ub is None else torch.tensor(ub)))
    if isinstance(method, Fp8PerTensorMethod):
        scale = quantized_layer.input_scale if method.static_activations else None
        return lambda x: dequantize(*quantize_per_tensor(x, scale))
    return None  # block-wise: see emulate_quantization


def emulate_quantization(reference: ModelRunner, quantized: ModelRunner) -> int:
    """Make the reference (dequantized weights) quantize the inputs of the layers the quantized model quantizes."""
    layers = dict(quantized.model.named_modules())
    count = 0
    for name, module in reference.model.named_modules():
        method = getattr(layers[name], "quant_method", None)
        if method is None:
            continue
        fake = fake_quantized_activations(method, layers[name])
        if isinstance(method, Fp8BlockMethod):
            def matmul(x, module=module, group=method.block[1]):
                q, s = quantize_per_token_group(x, group)
                return F.linear(q.float() * s.repeat_interleave(group, dim=1)[:, :x.shape[1]], module.weight)
        else:
            def matmul(x, module=module, fake=fake):
                return F.linear(fake(x), module.weight)
        module.matmul = matmul
        count += 1
    return count


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_checkpoint_format_matches_its_dequantized_weights(fmt, tiny, tmp_path):
    quantized, reference = str(tmp_path / "q"), str(tmp_path / "ref")
    write_quantized(tiny, fmt, quantized, reference)
    ours, ref = runner(quantized), runner(reference)
    assert emulate_quantization(ref, ours) > 0
    for got, expected in zip(runner_logits(ours, PROMPTS), runner_logits(ref, PROMPTS)):
        assert rel(got, expected) < 1e-4, fmt
    if fmt == "compressed-tensors":
        assert runner(quantized, kv_cache_dtype="fp8_e4m3").kv_pool.k_scales == [KV_SCALES[0]] * 2
        assert ours.kv_pool.k_scales == [1.0] * 2  # a pool in the model dtype stores values unscaled
        ours = runner(quantized, kv_cache_dtype="fp8_e4m3")
        assert ours.kv_pool.k_scales == [KV_SCALES[0]] * 2 and ours.kv_pool.v_scales == [KV_SCALES[1]] * 2
        assert ours.model.model.layers[1].self_attn.o_proj.quant_method is None  # the "re:" ignore
    if fmt == "fbgemm_fp8":
        assert ours.model.model.layers[0].self_attn.qkv_proj.quant_method is None
        assert ours.model.model.layers[0].self_attn.o_proj.quant_method is not None
    if fmt == "fp8-dynamic":
        assert ours.model.model.layers[1].mlp.gate_up_proj.quant_method is None


def test_online_fp8_and_torchao_stay_close_to_the_full_precision_model(tiny):
    """Bounds for this random model (its large init makes it sensitive); the default model's perplexity test is
    the quality check."""
    expected = runner_logits(runner(tiny), PROMPTS)
    for options, bound in (({"quantization": "fp8"}, 0.3), ({"torchao_config": "int8wo"}, 0.1),
                           ({"torchao_config": "int4wo-32"}, 1.0), ({"kv_cache_dtype": "fp8_e4m3"}, 0.2)):
        quantized = runner(tiny, **options)
        error = max(rel(got, ref) for got, ref in zip(runner_logits(quantized, PROMPTS), expected))
        assert 0 < error < bound, (options, error)
    online = runner(tiny, quantization="fp8").model.model.layers[0].mlp.down_proj
    assert online.weight.dtype == FP8 and online.weight_scale.shape == (64,)


@pytest.mark.parametrize("tied", [False, True])
def test_the_lm_head_in_fp8_computes_its_dequantized_product(tied):
    """--quantize-lm-head: logits from the fp8 copy equal the product with the dequantized weight (the CPU path:
    per-token activations, torch._scaled_mm), close to the 16-bit head's; an untied head frees its weight, a tied
    one (the embedding reads it) keeps it."""
    from runtime.layers.vocab import ParallelLMHead

    head = ParallelLMHead(300, 64, TensorParallel(0, 1), torch.bfloat16)
    head.weight.data.copy_(torch.randn(300, 64) * 0.05)
    weight = head.weight.data.clone()
    hidden = torch.randn(5, 64, dtype=torch.bfloat16)
    exact = head(hidden)
    head.quantize_fp8(keep_weight=tied)
    logits = head(hidden)
    assert logits.shape == (5, 300) and logits.dtype == torch.float32
    x_fp8, x_scale = quantize_per_token(hidden)
    dequantized = (x_fp8.float() * x_scale) @ (head.weight_fp8.float() * head.weight_scale[:, None]).t()
    assert rel(logits, dequantized.to(torch.bfloat16).float()) < 0.01
    assert 0 < rel(logits, exact) < 0.1
    assert head.weight_fp8.dtype == FP8 and head.weight_scale.shape == (300,)
    assert torch.equal(head.weight.data, weight) if tied else head.weight.numel() == 0


def test_a_model_through_the_weight_only_kernel_is_closer_to_full_precision(tiny, monkeypatch):
    """The whole tiny model with online fp8, its decode-sized linears through the weight-only kernel (the dispatch
    opened to the CPU, the kernel in Triton's interpreter): unquantized activations make it closer to the
    full-precision model than the quantized-activation path, and it still differs from it (fp8 weights)."""
    pytest.importorskip("triton")
    from runtime.layers.quantization import fp8_linear

    expected = runner_logits(runner(tiny), PROMPTS)

    def error(model: ModelRunner) -> float:
        return max(rel(got, ref) for got, ref in zip(runner_logits(model, PROMPTS), expected))

    scaled_mm_error = error(runner(tiny, quantization="fp8"))
    monkeypatch.setattr(fp8_linear, "weight_only_kernel_applies", lambda x: x.shape[0] <= WEIGHT_ONLY_MAX_TOKENS)
    weight_only_error = error(runner(tiny, quantization="fp8"))
    assert 0 < weight_only_error < scaled_mm_error, (weight_only_error, scaled_mm_error)


def test_fp8_kv_cache_holds_more_tokens(tiny, monkeypatch):
    import runtime.worker.model_runner as model_runner

    monkeypatch.setattr(model_runner, "CPU_POOL_BYTES_CAP", 1 << 20)
    config = dict(model_path=tiny, device="cpu", max_running_requests=4, dtype="bfloat16")
    plain = ModelRunner(ModelRunnerConfig(**config))
    fp8 = ModelRunner(ModelRunnerConfig(**config, kv_cache_dtype="fp8_e5m2"))
    assert fp8.kv_pool.k[0].dtype == torch.float8_e5m2
    assert fp8.max_total_tokens == 2 * plain.max_total_tokens
    expected = runner_logits(plain, PROMPTS)
    for got, ref in zip(runner_logits(fp8, PROMPTS), expected):
        assert rel(got, ref) < 0.2  # e5m2's 2 mantissa bits on this sensitive random model (see above)


def _write_config(folder: str, quantization_config: dict | None) -> None:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("flag, config, message", [
    ("awq", None, "--quantization must be one of"),
    ("fbgemm_fp8", None, "needs a checkpoint quantized with fbgemm_fp8"),
    ("fp8", {"quant_method": "fbgemm_fp8"}, "does not match the checkpoint"),
    (None, {"quant_method": "gptq"}, "'gptq' is not supported"),
    (None, {"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme 'sometimes'"),
    (None, {"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    (None, {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "dynamic"),
    (None, {"quant_method": "fp8", "surprise": 1}, "surprise"),
    (None, {"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, "positive"),
    (None, {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}, "pack-quantized"),
    (None, {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
     "int 4-bit"),
])
def test_wrong_or_unknown_configs_are_refused(flag, config, message):
    with pytest.raises(QuantizationConfigError, match=message):
        quant_config_for(flag, config)


def test_a_checkpoint_lacking_scales_or_mixing_a_packed_layer_is_refused(tiny, tmp_path):
    quantized, reference = str(tmp_path / "q"), str(tmp_path / "ref")
    write_quantized(tiny, "fbgemm_fp8", quantized, reference)
    tensors = load_file(os.path.join(quantized, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, os.path.join(quantized, "model.safetensors"))
    with pytest.raises(ValueError, match="lacks tensors for: model.layers.1.mlp.down_proj.weight_scale"):
        runner(quantized)
    _write_config(quantized, {"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["self_attn.q_proj"]})
    with pytest.raises(QuantizationConfigError, match="which run as one matmul"):
        runner(quantized)


def test_torchao_refuses_what_it_cannot_run_on_the_cpu(tiny, tmp_path):
    write_quantized(tiny, "fbgemm_fp8", str(tmp_path / "q"), str(tmp_path / "ref"))
    with pytest.raises(QuantizationConfigError, match="already quantized .fbgemm_fp8 from its checkpoint"):
        runner(str(tmp_path / "q"), torchao_config="int8wo")
    with pytest.raises(QuantizationConfigError, match="compute capability >= 8.9"):
        runner(tiny, torchao_config="fp8dq-per_row")
    with pytest.raises(QuantizationConfigError, match="int4wo-<group>"):
        runner(tiny, torchao_config="int3wo")


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_online_fp8_quantizes_moe_experts_and_stays_close(architecture, tmp_path):
    """--quantization fp8 on a MoE model: the experts become fp8 with a scale per expert and output channel (the
    16-bit weights gone as parameters), each expert layer computes its unquantized output to fp8's precision, and
    the logits stay near the unquantized model's (measured: 0.21 Mixtral, 0.17 Qwen2-MoE, dense fp8 included)."""
    from runtime.layers.moe import FusedMoE

    folder = str(tmp_path / "moe")
    save_tiny_model(architecture, folder)
    plain = runner(folder)
    expected = runner_logits(plain, PROMPTS)
    quantized = runner(folder, quantization="fp8")
    plain_layers = dict(plain.model.named_modules())
    experts = [(name, m) for name, m in quantized.model.named_modules() if isinstance(m, FusedMoE)]
    assert experts
    for name, layer in experts:
        num_experts, two_inter, hidden = layer.w13_weight.shape
        assert [p.dtype for p in layer.parameters()] == [FP8, FP8]
        assert layer.w13_scale.shape == (num_experts, two_inter) and layer.w2_scale.shape == (num_experts, hidden)
        assert layer.w13_scale.dtype == torch.float32 and layer.w2_scale.dtype == torch.float32
        x, router_logits = torch.randn(6, hidden), torch.randn(6, num_experts)
        reference = plain_layers[name](x, router_logits)
        assert 0 < rel(layer(x, router_logits), reference) < 0.1, name  # e4m3 weights (measured <= 0.053)
    error = max(rel(got, ref) for got, ref in zip(runner_logits(quantized, PROMPTS), expected))
    assert 0 < error < 0.3, error


def test_quantized_checkpoint_of_a_moe_model_is_refused(tmp_path):
    folder = str(tmp_path / "moe")
    save_tiny_model("MixtralForCausalLM", folder)
    _write_config(folder, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(QuantizationConfigError, match="mixture-of-experts.*--quantization fp8"):
        runner(folder)
