"""Show where a server's actors run: the dp x tp x node layout, and per process its role, replica, tp rank, node,
pid, cores, GPU and NUMA node.

    python scripts/show_placement.py                 # every server on this machine
    python scripts/show_placement.py --pid 1234      # the server whose launcher has this pid
    python scripts/show_placement.py --plan --dp 2 --tp 4 --cpu-affinity auto
                                                     # the plan for these server flags, without starting anything

Actors are found by their process title (`runtime: <role> [<placement>]`, e.g. `runtime: worker 3 [dp 1 tp 1 node 0
gpu 3]`, set at boot); the role is the actor name (`worker3`), replica, tp rank, node and planned GPU come from the
bracket (runtime.distributed.layout). GPUs in use come from NVML (nvidia-ml-py) when it is installed and a driver is
present.
"""

from __future__ import annotations

import argparse
import os
import sys

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.affinity import Roles, plan_affinity, read_topology  # noqa: E402
from runtime.distributed.layout import Layout  # noqa: E402
from runtime.server_args import parse_args  # noqa: E402

TITLE_PREFIX = "runtime: "


def parse_title(title: str) -> tuple[str, dict[str, str]] | None:
    """`runtime: worker 3 [dp 1 tp 1 node 0 gpu 3]` -> ("worker3", {"dp": "1", "tp": "1", "node": "0", "gpu": "3"});
    None for anything but an actor's title."""
    if not title.startswith(TITLE_PREFIX) or title == TITLE_PREFIX + "launcher":
        return None
    role, _, bracket = title.removeprefix(TITLE_PREFIX).partition(" [")
    words = bracket.rstrip("]").split()
    return role.replace(" ", ""), dict(zip(words[::2], words[1::2]))


def actor_processes(launcher_pid: int | None) -> list[tuple[psutil.Process, str, dict[str, str]]]:
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        parsed = parse_title((proc.info["cmdline"] or [""])[0])
        if parsed is None or (launcher_pid is not None and proc.info["ppid"] != launcher_pid):
            continue
        found.append((proc, *parsed))
    return sorted(found, key=lambda item: (item[0].info["ppid"], item[1]))


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
    for proc, role, placement in actor_processes(launcher_pid):
        try:
            cores = sorted(proc.cpu_affinity())
        except psutil.Error:
            continue
        numa = sorted({node_of.get(c, 0) for c in cores})
        pinned = "all" if set(cores) == set(topo.cpus) else ",".join(map(str, cores))
        rows.append((role, *(placement.get(key, "-") for key in ("dp", "tp", "node")), str(proc.pid),
                     str(proc.info["ppid"]), pinned, placement.get("gpu", "-"),
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
