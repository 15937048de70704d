import pytest

from runtime.server_args import NOT_YET_SUPPORTED, ServerArgs, parse_args


def test_defaults_are_sglangs():
    args = parse_args([])
    assert (args.host, args.port, args.schedule_policy) == ("127.0.0.1", 30000, "fcfs")
    assert args.cuda_graph_max_bs is None and not args.disable_radix_cache and not args.disable_overlap_schedule
    assert args.enable_mixed_chunk and not args.enable_torch_compile and args.torch_compile_max_bs == 32


def test_saturation_flags():
    args = parse_args(["--cuda-graph-bs", "16", "1", "8", "8", "--no-enable-mixed-chunk", "--enable-torch-compile",
                       "--torch-compile-max-bs", "8", "--chunked-prefill-size", "2048"])
    assert args.cuda_graph_bs == [1, 8, 16] and not args.enable_mixed_chunk
    assert args.enable_torch_compile and args.torch_compile_max_bs == 8 and args.chunked_prefill_size == 2048
    assert parse_args(["--enable-mixed-chunk"]).enable_mixed_chunk


def test_prefix_abbreviations_and_aliases_keep_working():
    args = parse_args(["--mem-frac", "0.7", "--context-len", "2048", "--dtype", "bf16", "--tp", "1"])
    assert args.mem_fraction_static == 0.7 and args.context_length == 2048 and args.dtype == "bfloat16"
    assert args.tp_size == 1


@pytest.mark.parametrize("flag", sorted(NOT_YET_SUPPORTED))
def test_flags_of_later_issues_are_refused_not_ignored(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, "x"])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
    (["--chunked-prefill-size", "0"], "--chunked-prefill-size"),
    (["--max-running-requests", "0"], "--max-running-requests"),
    (["--port", "70000"], "--port"),
    (["--tp", "0"], "--tp-size"),
    (["--dp", "0"], "--dp-size"),
    (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:5000"], "--node-rank"),
    (["--nnodes", "2", "--tp", "2"], "--dist-init-addr"),
    (["--nnodes", "2", "--tp", "3", "--nccl-init-addr", "h:5000"], "--nnodes"),
    (["--nnodes", "2", "--tp", "2", "--dp", "2", "--nccl-init", "h:5000"], "--dp-size"),
    (["--dist-init-addr", "nohost"], "--dist-init-addr"),
    (["--base-gpu-id", "-1"], "--base-gpu-id"),
    (["--load-balance-method", "random"], "--load-balance-method"),
    (["--schedule-policy", "lifo"], "--schedule-policy"),
    (["--stream-interval", "0"], "--stream-interval"),
    (["--cuda-graph-bs", "0", "4"], "--cuda-graph-bs"),
    (["--torch-compile-max-bs", "0"], "--torch-compile-max-bs"),
    (["--low-priority-prefill-tokens", "0"], "--low-priority-prefill-tokens"),
    (["--batch-max-requests", "0"], "--batch-max-requests"),
    (["--allowed-origins", "evil.example"], "--allowed-origins"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--max-seqs-per-request", "0"], "--max-seqs-per-request"),
    (["--graceful-shutdown-timeout", "-1"], "--graceful-shutdown-timeout"),
    (["--json-model-override-args", "{vocab_size: 1}"], "--json-model-override-args"),
    (["--json-model-override-args", "[1]"], "--json-model-override-args"),
])
def test_bad_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert flag in capsys.readouterr().err


def test_parallel_flags_take_sglangs_spellings():
    args = parse_args(["--tp", "4", "--nccl-init", "sgl-dev-0:50000", "--nnodes", "2", "--node-rank", "1"])
    assert (args.tp_size, args.dist_init_addr, args.nnodes, args.node_rank) == (4, "sgl-dev-0:50000", 2, 1)
    args = parse_args(["--tensor-parallel-size", "2", "--data-parallel-size", "2", "--nccl-init-addr", "[::1]:20000",
                       "--load-balance-method", "shortest_queue", "--base-gpu-id", "4", "--enable-p2p-check"])
    assert (args.tp_size, args.dp_size, args.dist_init_addr) == (2, 2, "[::1]:20000")
    assert args.load_balance_method == "shortest_queue" and args.base_gpu_id == 4 and args.enable_p2p_check


def test_server_args_round_trip_as_json():
    import msgspec

    args = parse_args(["--port", "31000", "--disable-radix-cache"])
    assert msgspec.json.decode(msgspec.json.encode(args), type=ServerArgs) == args


def test_every_flag_has_one_documented_line_in_help_and_docs(capsys):
    from runtime.server_args import FLAG_DOCS, build_parser
    from scripts.gen_flags_doc import DOC, render

    assert list(FLAG_DOCS) == list(ServerArgs.__struct_fields__)
    build_parser().print_help()
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (at hyphens too)
    for name, doc in FLAG_DOCS.items():
        assert "--" + name.replace("_", "-") in help_text
        assert "".join(f"{doc.meaning} (default: {doc.default})".split()) in help_text
    assert render(DOC.read_text()) == DOC.read_text(), "docs/flags.md is stale: python scripts/gen_flags_doc.py"


def test_sglangs_default_kv_cache_dtype_is_accepted():
    assert parse_args(["--kv-cache-dtype", "auto"]) == ServerArgs()


def test_hardening_flags():
    args = parse_args(["--allowed-origins", "https://a.example", "http://b.example:8080", "--request-timeout", "30",
                       "--max-queued-requests", "10", "--graceful-shutdown-timeout", "0"])
    assert args.allowed_origins == ["https://a.example", "http://b.example:8080"]
    assert (args.request_timeout, args.max_queued_requests, args.graceful_shutdown_timeout) == (30.0, 10, 0.0)
    assert parse_args(["--allowed-origins", "*"]).allowed_origins == ["*"]
    assert ServerArgs().allowed_origins == [] and ServerArgs().max_seqs_per_request == 1024
