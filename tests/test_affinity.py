import os

import pytest

from runtime.affinity import Roles, Topology, parse_cpu_list, plan_affinity, read_topology
from runtime.distributed.layout import Layout


def two_socket_topology() -> Topology:
    # Two NUMA nodes of 8 cores; GPU 0 and 1 on node 0, GPU 2 and 3 on node 1.
    return Topology(cpus=list(range(16)), numa_nodes={0: list(range(8)), 1: list(range(8, 16))},
                    gpu_numa=[0, 0, 1, 1])


def roles(n_workers: int) -> Roles:
    return Roles.for_node(Layout(tp_size=n_workers), node=0)


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


def test_auto_keeps_workers_and_scheduler_on_their_gpu_node_and_apart_from_frontends():
    topo = two_socket_topology()
    plan = plan_affinity("auto", topo, roles(4))
    node_of = {c: n for n, cores in topo.numa_nodes.items() for c in cores}
    for rank, gpu_node in enumerate(topo.gpu_numa):
        assert all(node_of[c] == gpu_node for c in plan[f"worker{rank}"])
    assert node_of[plan["scheduler"][0]] == topo.gpu_numa[0]
    dedicated = [c for role in ("scheduler", "worker0", "worker1", "worker2", "worker3") for c in plan[role]]
    assert len(dedicated) == len(set(dedicated)), "each worker and the scheduler get a core of their own"
    assert not set(dedicated) & set(plan["ingress"]) and not set(dedicated) & set(plan["detokenizer"])


def test_auto_on_a_small_machine_pins_nothing():
    assert plan_affinity("auto", Topology(cpus=[0, 1], numa_nodes={0: [0, 1]}), roles(1)) == {}


def test_off_pins_nothing():
    assert plan_affinity("off", two_socket_topology(), roles(4)) == {}


def test_explicit_list():
    plan = plan_affinity("ingress=0;detokenizer=0;scheduler=1;worker0=2-4,7", two_socket_topology(), roles(1))
    assert plan == {"ingress": [0], "detokenizer": [0], "scheduler": [1], "worker0": [2, 3, 4, 7]}


@pytest.mark.parametrize("bad", ["ingres=0", "scheduler", "worker5=1", "scheduler=99", "scheduler=a-b"])
def test_explicit_list_errors_name_the_problem(bad):
    with pytest.raises(ValueError, match="--cpu-affinity"):
        plan_affinity(bad, two_socket_topology(), roles(1))



def test_read_topology_of_this_machine():
    topo = read_topology(n_gpus=0)
    assert topo.cpus == sorted(os.sched_getaffinity(0))
    for cores in topo.numa_nodes.values():
        assert cores and set(cores) <= set(topo.cpus)
    assert topo.gpu_numa == []


def test_auto_pins_every_rank_of_every_replica_next_to_its_gpu():
    from runtime.distributed.layout import Layout

    topo = two_socket_topology()
    plan = plan_affinity("auto", topo, Roles.for_node(Layout(dp_size=2, tp_size=2), 0))
    node_of = {c: n for n, cores in topo.numa_nodes.items() for c in cores}
    for rank in range(4):
        assert [node_of[c] for c in plan[f"worker{rank}"]] == [topo.gpu_numa[rank]]
    assert node_of[plan["scheduler0"][0]] == 0 and node_of[plan["scheduler1"][0]] == 1
    dedicated = [plan[role][0] for role in ("worker0", "worker1", "worker2", "worker3", "scheduler0", "scheduler1")]
    assert len(set(dedicated)) == 6 and not set(dedicated) & set(plan["ingress"])
