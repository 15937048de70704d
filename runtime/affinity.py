"""CPU placement of the actor processes (`--cpu-affinity auto|off|LIST`).

Roles are the actor names of this node (`Roles.for_node`): "ingress", "detokenizer", "scheduler" ("scheduler<r>"
per replica with --dp-size > 1), "worker<g>" for global rank g of every replica (runtime.distributed.layout), and
"relay" with --nnodes > 1. `auto` keeps each scheduler and each worker on the NUMA node of its GPU, each on a core of
its own, and puts the ingress, the detokenizer and the relay on the cores left over (they are I/O and tokenizer bound
and must not steal a scheduler's core). With too few usable cores for that (fewer than the dedicated roles + 2 on
node 0) there is nothing to separate: auto pins nothing.

The plan is applied by the actors themselves: the launcher puts each role's cores in its ActorSpec.cpus
and actors.boot pins the process before building the actor.

LIST gives the cores per role explicitly: "ingress=0;detokenizer=0;scheduler=1;worker0=2-7"
(ranges and commas allowed: "worker1=8-11,16"). Roles not named are not pinned.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from runtime.distributed.layout import Layout


@dataclass
class Topology:
    cpus: list[int]  # usable cores of this process
    numa_nodes: dict[int, list[int]] = field(default_factory=dict)  # node -> cores (usable ones only)
    gpu_numa: list[int | None] = field(default_factory=list)  # per GPU rank: its NUMA node, if known


@dataclass(frozen=True)
class Roles:
    """This node's actors to place: each worker and each scheduler with the GPU it sits next to, and the roles that
    share the cores left over."""

    workers: dict[str, int]  # actor name -> GPU index on this node
    schedulers: dict[str, int]  # actor name -> GPU of its replica's first rank
    shared: tuple[str, ...] = ("ingress", "detokenizer")

    @classmethod
    def for_node(cls, layout: Layout, node: int) -> Roles:
        workers = {slot.name: slot.gpu for slot in layout.node_ranks(node)}
        relay = ("relay",) if layout.nnodes > 1 else ()
        if node != 0:
            return cls(workers, {}, relay)
        schedulers = {layout.scheduler_name(r): layout.replica_ranks(r)[0].gpu for r in range(layout.dp_size)}
        return cls(workers, schedulers, ("ingress", "detokenizer", *relay))

    @property
    def names(self) -> set[str]:
        return set(self.workers) | set(self.schedulers) | set(self.shared)


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's cpulist syntax: "0-3,8,10-11"."""
    cores: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    return cores


def read_topology(n_gpus: int) -> Topology:
    cpus = sorted(os.sched_getaffinity(0))
    nodes: dict[int, list[int]] = {}
    for path in glob.glob("/sys/devices/system/node/node[0-9]*/cpulist"):
        node = int(path.split("/node")[-1].split("/")[0])
        with open(path) as f:
            usable = [c for c in parse_cpu_list(f.read()) if c in cpus]
        if usable:
            nodes[node] = usable
    return Topology(cpus=cpus, numa_nodes=nodes, gpu_numa=[gpu_numa_node(i) for i in range(n_gpus)])


def gpu_numa_node(index: int) -> int | None:
    """The NUMA node of GPU `index`, through NVML (nvidia-ml-py) so that no CUDA context is made."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        bus_id = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).busId
        bus_id = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
        with open(f"/sys/bus/pci/devices/{bus_id.lower()[-12:]}/numa_node") as f:
            node = int(f.read())
        return node if node >= 0 else None
    except (pynvml.NVMLError, OSError, ValueError):
        return None


def plan_affinity(mode: str, topo: Topology, roles: Roles) -> dict[str, list[int]]:
    """Cores per role; a role missing from the result is not pinned."""
    if mode == "off":
        return {}
    if mode == "auto":
        return plan_auto(topo, roles)
    return parse_affinity_list(mode, topo, roles)


def plan_auto(topo: Topology, roles: Roles) -> dict[str, list[int]]:
    dedicated = {**roles.workers, **roles.schedulers}
    if len(topo.cpus) < len(dedicated) + (2 if roles.schedulers else 1):
        return {}
    free_by_node = {node: list(cores) for node, cores in topo.numa_nodes.items()} or {0: list(topo.cpus)}
    plan: dict[str, list[int]] = {}

    def take(gpu: int) -> int:
        node = topo.gpu_numa[gpu] if gpu < len(topo.gpu_numa) else None
        if node not in free_by_node or not free_by_node[node]:
            node = max(free_by_node, key=lambda n: len(free_by_node[n]))
        return free_by_node[node].pop(0)

    for name, gpu in dedicated.items():
        plan[name] = [take(gpu)]
    rest = sorted(c for cores in free_by_node.values() for c in cores)
    for name in roles.shared:
        plan[name] = rest
    return plan


def parse_affinity_list(text: str, topo: Topology, roles: Roles) -> dict[str, list[int]]:
    roles = roles.names
    plan: dict[str, list[int]] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        role, sep, cores = item.partition("=")
        role = role.strip()
        if not sep or role not in roles:
            raise ValueError(f"--cpu-affinity: {item!r} must be ROLE=CORES with ROLE one of {', '.join(sorted(roles))}")
        try:
            parsed = parse_cpu_list(cores)
        except ValueError:
            raise ValueError(f"--cpu-affinity: cannot read the cores in {item!r}") from None
        missing = [c for c in parsed if c not in topo.cpus]
        if not parsed or missing:
            raise ValueError(f"--cpu-affinity: cores {missing or cores!r} for {role} are not usable here "
                             f"(usable: {topo.cpus})")
        plan[role] = parsed
    return plan

