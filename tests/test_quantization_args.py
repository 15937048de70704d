"""The quantization flags at argument parsing: accepted values, and combinations refused naming both flags."""

import pytest

from runtime.layers.quantization import QUANTIZATION_METHODS
from runtime.layers.quantization.torchao import FIXED_VALUES, INT4_GROUP_SIZES
from runtime.server_args import QUANTIZATION_CHOICES, TORCHAO_INT4_GROUPS, TORCHAO_VALUES, parse_args


def test_server_args_lists_agree_with_the_quantization_package():
    # server_args must not import torch (the scheduler imports it), so it keeps its own copies
    assert QUANTIZATION_CHOICES == QUANTIZATION_METHODS
    assert TORCHAO_VALUES == FIXED_VALUES and TORCHAO_INT4_GROUPS == INT4_GROUP_SIZES


def test_quantization_flags_are_accepted():
    args = parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8_e5m2"])
    assert (args.quantization, args.kv_cache_dtype, args.torchao_config) == ("fp8", "fp8_e5m2", "")
    assert parse_args(["--torchao-config", "int4wo-128"]).torchao_config == "int4wo-128"
    assert parse_args([]).quantization is None and parse_args([]).kv_cache_dtype == "auto"


@pytest.mark.parametrize("argv, words", [
    (["--quantization", "awq"], ["--quantization must be one of"]),
    (["--kv-cache-dtype", "int8"], ["--kv-cache-dtype"]),
    (["--torchao-config", "int4wo-100"], ["--torchao-config", "int4wo-<group>"]),
    (["--torchao-config", "int2"], ["--torchao-config"]),
    (["--quantization", "fp8", "--torchao-config", "int8wo"], ["--quantization fp8", "--torchao-config int8wo"]),
    (["--torchao-config", "fp8dq-per_row", "--device", "cpu"], ["--torchao-config fp8dq-per_row", "--device cpu"]),
    (["--quantize-lm-head"], ["--quantize-lm-head needs --quantization"]),
])
def test_impossible_values_and_combinations_are_refused(argv, words, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_the_flags_reach_the_worker_config():
    from runtime.worker.model_runner import ModelRunnerConfig

    args = parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"])
    config = ModelRunnerConfig.from_server_args(args)
    assert (config.quantization, config.kv_cache_dtype, config.torchao_config) == ("fp8", "fp8_e4m3", "")
    assert ModelRunnerConfig.from_server_args(parse_args(["--torchao-config", "int8wo"])).torchao_config == "int8wo"
    assert not config.quantize_lm_head
    with_head = parse_args(["--quantization", "fp8", "--quantize-lm-head"])
    assert ModelRunnerConfig.from_server_args(with_head).quantize_lm_head
