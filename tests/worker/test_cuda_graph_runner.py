"""CudaGraphRunner's host-side choices (which sizes are captured, how a batch is padded, which steps replay) and the
CPU runner without graphs. Capture and replay themselves run on CUDA: tests/models/test_gpu_models.py."""

from __future__ import annotations

import pytest

from runtime.worker.cuda_graph_runner import (
    IDS,
    OUT_SLOTS,
    ROWS,
    SEQ_LENS,
    CudaGraphRunner,
    capture_batch_sizes,
    padded_inputs,
)


def test_capture_sizes():
    assert capture_batch_sizes(160) == [1, 2, 4, 8, 12, 16, 24] + list(range(32, 161, 8))
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 12, 16, 20]
    sizes = capture_batch_sizes(512)
    assert len(sizes) == 52 and sizes[-17:] == list(range(256, 513, 16))
    assert capture_batch_sizes(600)[-4:] == [512, 544, 576, 600]
    with pytest.raises(ValueError, match="max_batch_size"):
        capture_batch_sizes(0)


def test_padding_rows_use_the_padding_slot_and_the_dummy_row():
    inputs = padded_inputs([-3, 7, 9], [11, 12, 13], [0, 5, 2], [4, 9, 1], size=8, dummy_row=16)
    assert inputs[IDS] == [-3, 7, 9] + [0] * 5
    assert inputs[OUT_SLOTS] == [11, 12, 13] + [0] * 5
    assert inputs[ROWS] == [0, 5, 2] + [16] * 5
    assert inputs[SEQ_LENS] == [4, 9, 1] + [1] * 5
    with pytest.raises(ValueError, match="does not fit"):
        padded_inputs([1, 2], [1, 2], [0, 1], [1, 1], size=1, dummy_row=4)


def test_batches_go_to_the_smallest_graph_that_holds_them():
    runner = CudaGraphRunner(model=None, attention=None, req_to_token=_FakeTable(), future_tokens=None, dummy_row=40,
                             batch_sizes=capture_batch_sizes(40), context_length=64)
    assert [runner.size_for[b] for b in (1, 2, 3, 4, 5, 8, 9, 13, 17, 33, 40)] == [1, 2, 4, 4, 8, 8, 12, 16, 24, 40, 40]
    assert runner.can_run([1] * 40) and runner.can_run([1])
    assert not runner.can_run([1] * 41)  # larger than the largest graph: eager
    assert not runner.can_run([1, 2])  # not a decode batch
    assert not runner.can_run([])
    # SGLang's --cuda-graph-bs list, unsorted with a duplicate
    runner = CudaGraphRunner(model=None, attention=None, req_to_token=_FakeTable(), future_tokens=None, dummy_row=40,
                             batch_sizes=[32, 1, 8, 8], context_length=64)
    assert runner.sizes == [1, 8, 32] and runner.size_for[9] == 32 and not runner.can_run([1] * 33)


def test_cpu_runner_has_no_graphs_and_no_dummy_row(tmp_path):
    from runtime.worker.model_runner import ModelRunner, ModelRunnerConfig
    from tests.model_fixtures import save_tiny_model

    save_tiny_model("LlamaForCausalLM", str(tmp_path))
    runner = ModelRunner(ModelRunnerConfig(model_path=str(tmp_path), device="cpu", max_total_tokens=64,
                                           max_running_requests=4))
    assert runner.graph_runner is None
    assert runner.req_to_token.shape[0] == 4


class _FakeTable:
    device = "cpu"
