"""Start-up checks of tensor parallelism: a model that does not shard over tp_size is refused naming the dimension;
--enable-p2p-check names the GPU pair without peer access."""

import pytest

from runtime.models.config import ModelConfig
from runtime.worker.distributed import ShardingError, check_model_shards, check_peer_access

SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)


def config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf({**SMOLLM2_135M, **overrides})


@pytest.mark.parametrize("overrides, tp_size, dimension", [
    ({}, 2, "num_attention_heads 9"),
    (dict(num_attention_heads=8, num_key_value_heads=3, hidden_size=512), 2, "num_key_value_heads 3"),
    (dict(intermediate_size=1537), 3, "intermediate_size 1537"),
    (dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=512, moe_intermediate_size=100), 8,
     "moe_intermediate_size 100"),
])
def test_a_model_that_does_not_shard_is_refused_naming_the_dimension(overrides, tp_size, dimension):
    with pytest.raises(ShardingError, match=f"--tp-size {tp_size}: {dimension}"):
        check_model_shards(config(**overrides), tp_size)


@pytest.mark.parametrize("overrides, tp_size", [
    ({}, 1), ({}, 3),  # the default model: 9 heads, 3 KV heads
    (dict(num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, intermediate_size=14336), 8),
    (dict(num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, intermediate_size=14336), 16),  # KV x2
])
def test_models_that_shard_pass(overrides, tp_size):
    check_model_shards(config(**overrides), tp_size)


def test_p2p_check_names_the_pair_without_peer_access():
    check_peer_access([0, 1, 2], lambda a, b: True)
    with pytest.raises(RuntimeError, match="GPU 2 has no peer-to-peer access to GPU 1"):
        check_peer_access([0, 1, 2], lambda a, b: (a, b) != (2, 1))


def test_the_runner_refuses_the_default_model_at_tp_2_before_joining_any_group():
    from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig

    # no process group exists: the refusal comes first, naming the dimension
    with pytest.raises(ShardingError, match="--tp-size 2: num_attention_heads 9"):
        ModelRunner(ModelRunnerConfig(device="cpu", tp_size=2, tp_rank=1, dist_init_method="tcp://127.0.0.1:1"))
