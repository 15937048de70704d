"""The dp x tp x node layout: which worker holds which rank on which node and GPU, and the roles each node pins."""

from runtime.affinity import Roles
from runtime.distributed.layout import Layout


def test_replicas_take_consecutive_gpus_from_the_base():
    layout = Layout(dp_size=2, tp_size=2, base_gpu_id=4)
    assert [(s.name, s.dp_rank, s.tp_rank, s.node, s.gpu) for s in layout.ranks] == [
        ("worker0", 0, 0, 0, 4), ("worker1", 0, 1, 0, 5), ("worker2", 1, 0, 0, 6), ("worker3", 1, 1, 0, 7)]
    assert [s.name for s in layout.replica_ranks(1)] == ["worker2", "worker3"]
    assert [layout.scheduler_name(r) for r in range(2)] == ["scheduler0", "scheduler1"]
    assert Layout().scheduler_name(0) == "scheduler"


def test_tensor_parallel_ranks_split_evenly_over_nodes():
    layout = Layout(tp_size=16, nnodes=2)
    assert layout.ranks_per_node == 8
    node1 = layout.node_ranks(1)
    assert [s.tp_rank for s in node1] == list(range(8, 16)) and [s.gpu for s in node1] == list(range(8))
    assert layout.describe().splitlines()[1] == ("  replica 0 (scheduler on node 0): node 0: tp 0-7 = worker0-7 on gpu "
                                                 "0-7; node 1: tp 8-15 = worker8-15 on gpu 0-7")


def test_each_node_pins_its_own_roles():
    layout = Layout(tp_size=4, nnodes=2)
    head, member = Roles.for_node(layout, 0), Roles.for_node(layout, 1)
    assert head.workers == {"worker0": 0, "worker1": 1} and head.schedulers == {"scheduler": 0}
    assert set(head.shared) == {"ingress", "detokenizer", "relay"}
    assert member.workers == {"worker2": 0, "worker3": 1} and member.schedulers == {} and member.shared == ("relay",)
    replicas = Roles.for_node(Layout(dp_size=2, tp_size=2), 0)
    assert replicas.schedulers == {"scheduler0": 0, "scheduler1": 2} and "relay" not in replicas.shared


def test_show_placement_prints_the_plan_of_server_flags(capsys):
    from scripts.show_placement import main

    main(["--plan", "--dp", "2", "--tp", "2", "--base-gpu-id", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("dp 2 x tp 2 over 1 node\n")
    assert "replica 1 (scheduler1 on node 0): node 0: tp 0-1 = worker2-3 on gpu 4-5" in out
