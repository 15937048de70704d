"""Show where a server's actors run: the dp x tp x node layout, and per process its role, replica, rank, node,
pid, cores, GPU and NUMA node.

    python scripts/show_placement.py                 # every server on this machine
    python scripts/show_placement.py --pid 1234      # the server whose launcher has this pid
    python scripts/show_placement.py --plan --dp 2 --tp 4 --cpu-affinity auto
                                                     # the plan for these server flags, without starting anything

Actors are found by their command line (`python -m actors.boot <spec>`): the role is the actor name in that spec,
replica, tp rank, node and planned GPU come from its config. GPUs in use come from NVML (nvidia-ml-py) when it is
installed and a driver is present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.affinity import Roles, plan_affinity, read_topology  # noqa: E402
from runtime.distributed.layout import Layout  # noqa: E402
from runtime.server_args import parse_args  # noqa: E402


def actor_processes(launcher_pid: int | None) -> list[tuple[psutil.Process, dict]]:
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "actors.boot" not in cmd or cmd.index("actors.boot") + 1 >= len(cmd):
            continue
        if launcher_pid is not None and proc.info["ppid"] != launcher_pid:
            continue
        try:
            actor = json.loads(cmd[cmd.index("actors.boot") + 1])["actor"]
        except (ValueError, KeyError, TypeError):
            actor = {"name": "?"}
        found.append((proc, actor))
    return sorted(found, key=lambda item: (item[0].info["ppid"], item[1]["name"]))


def placement_of(actor: dict) -> tuple[str, str, str, str]:
    """(replica, tp rank, node, planned GPU) from the actor's config; "-" where it has none."""
    config = actor.get("config") or {}
    args = config.get("args") or {}
    is_worker = "tp_rank" in config
    replica = str(config["dp_rank"]) if "dp_rank" in config else "-"
    return (replica, str(config["tp_rank"]) if is_worker else "-", str(args.get("node_rank", "-")),
            str(config.get("gpu_id", "-")) if is_worker else "-")


def gpus_by_pid() -> dict[int, list[int]]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML or no driver: no GPU column
        return {}
    owners: dict[int, list[int]] = {}
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            owners.setdefault(p.pid, []).append(index)
    return owners


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def show_plan(server_flags: list[str]) -> None:
    args = parse_args(server_flags)
    layout = Layout.from_args(args)
    print(layout.describe())
    for node in range(layout.nnodes):
        gpus = [slot.gpu for slot in layout.node_ranks(node)]
        topo = read_topology(0 if args.device == "cpu" else max(gpus) + 1)
        cores = plan_affinity(args.cpu_affinity, topo, Roles.for_node(layout, node))
        print(f"node {node} cores (--cpu-affinity {args.cpu_affinity}, this machine's topology): "
              + ("; ".join(f"{role}={','.join(map(str, c))}" for role, c in cores.items()) or "not pinned"))


def show_running(launcher_pid: int | None) -> None:
    topo = read_topology(n_gpus=0)
    node_of = {c: n for n, cores in topo.numa_nodes.items() for c in cores}
    gpus = gpus_by_pid()
    rows = [("role", "dp", "tp", "node", "pid", "launcher", "cores", "gpu plan", "gpu used", "numa")]
    for proc, actor in actor_processes(launcher_pid):
        try:
            cores = sorted(proc.cpu_affinity())
        except psutil.Error:
            continue
        numa = sorted({node_of.get(c, 0) for c in cores})
        pinned = "all" if set(cores) == set(topo.cpus) else ",".join(map(str, cores))
        replica, tp_rank, node, gpu = placement_of(actor)
        rows.append((actor["name"], replica, tp_rank, node, str(proc.pid), str(proc.info["ppid"]), pinned, gpu,
                     ",".join(map(str, gpus.get(proc.pid, []))) or "-", ",".join(map(str, numa))))
    if len(rows) == 1:
        print("no actor processes found")
        return
    print_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, default=None, help="the launcher's pid (default: all servers)")
    parser.add_argument("--plan", action="store_true",
                        help="print the layout and pinning the other (server) flags would give, start nothing")
    args, server_flags = parser.parse_known_args(argv)
    if args.plan:
        show_plan(server_flags)
    elif server_flags:
        parser.error(f"unrecognized arguments: {' '.join(server_flags)} (server flags go with --plan)")
    else:
        show_running(args.pid)


if __name__ == "__main__":
    main()
