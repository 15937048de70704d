"""CPU placement of the actor processes (`--cpu-affinity auto|off|LIST`).

Roles are "ingress", "detokenizer", "scheduler" and "worker<rank>". `auto` keeps the scheduler and
each worker on the NUMA node of its GPU, each on cores of its own, and puts the ingress and the
detokenizer on the cores left over (they are I/O and tokenizer bound and must not steal the
scheduler's core). With fewer than 4 usable cores there is nothing to separate: auto pins nothing.

The plan is applied by the actors themselves: the launcher puts each role's cores in its ActorSpec.cpus
and actors.boot pins the process before building the actor.

LIST gives the cores per role explicitly: "ingress=0;detokenizer=0;scheduler=1;worker0=2-7"
(ranges and commas allowed: "worker1=8-11,16"). Roles not named are not pinned.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

ROLES_FIXED = ("ingress", "detokenizer", "scheduler")


@dataclass
class Topology:
    cpus: list[int]  # usable cores of this process
    numa_nodes: dict[int, list[int]] = field(default_factory=dict)  # node -> cores (usable ones only)
    gpu_numa: list[int | None] = field(default_factory=list)  # per GPU rank: its NUMA node, if known


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


def plan_affinity(mode: str, topo: Topology, n_workers: int) -> dict[str, list[int]]:
    """Cores per role; a role missing from the result is not pinned."""
    if mode == "off":
        return {}
    if mode == "auto":
        return plan_auto(topo, n_workers)
    return parse_affinity_list(mode, topo, n_workers)


def plan_auto(topo: Topology, n_workers: int) -> dict[str, list[int]]:
    if len(topo.cpus) < n_workers + 3:
        return {}
    free_by_node = {node: list(cores) for node, cores in topo.numa_nodes.items()} or {0: list(topo.cpus)}
    plan: dict[str, list[int]] = {}

    def take(node: int | None) -> int:
        if node not in free_by_node or not free_by_node[node]:
            node = max(free_by_node, key=lambda n: len(free_by_node[n]))
        return free_by_node[node].pop(0)

    for rank in range(n_workers):
        node = topo.gpu_numa[rank] if rank < len(topo.gpu_numa) else None
        plan[f"worker{rank}"] = [take(node)]
    plan["scheduler"] = [take(topo.gpu_numa[0] if topo.gpu_numa else None)]
    rest = sorted(c for cores in free_by_node.values() for c in cores)
    plan["ingress"] = rest
    plan["detokenizer"] = rest
    return plan


def parse_affinity_list(text: str, topo: Topology, n_workers: int) -> dict[str, list[int]]:
    roles = set(ROLES_FIXED) | {f"worker{r}" for r in range(n_workers)}
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

