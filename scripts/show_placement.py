"""Show where a server's actors run: the dp x tp x node layout, and per process its role, replica, rank, node,
pid, cores, GPU and NUMA node.

    python scripts/show_placement.py                 # every server on this machine
    python scripts/show_placement.py --pid 1234      # the server whose launcher has this pid
    python scripts/show_placement.py --plan --dp 2 --tp 4 --cpu-affinity auto
                                                     # the plan for these server flags, without starting anything

Actors are found by their command line (`python -m actors.boot <spec>`) or, with setproctitle installed, their
process title (`actors.boot <name>`); replica, tp rank, node and planned GPU follow from the name and the layout of
their launcher's flags (runtime.distributed.layout). GPUs in use come from NVML (nvidia-ml-py) when it is installed
and a driver is present.
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


def actor_name(cmdline: list[str]) -> str | None:
    """The actor name of an `actors.boot` process: from the spec on its command line, or from its process title
    (`actors.boot <name>`, which replaces the command line when setproctitle is installed)."""
    if "actors.boot" in cmdline and cmdline.index("actors.boot") + 1 < len(cmdline):
        try:
            return json.loads(cmdline[cmdline.index("actors.boot") + 1])["actor"]["name"]
        except (ValueError, KeyError, TypeError):
            return "?"
    if cmdline and cmdline[0].startswith("actors.boot "):
        return cmdline[0].split()[1]
    return None


def launcher_layout(pid: int) -> tuple[Layout, int] | None:
    """The layout and node rank of a `python -m runtime` launcher, from its flags (None for an Engine's process)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
        module = cmdline.index("-m")
    except (psutil.Error, ValueError):
        return None
    if cmdline[module + 1:module + 2] != ["runtime"]:
        return None
    flags = cmdline[module + 2:]
    try:
        server_args = parse_args(flags)
    except SystemExit:
        return None
    return Layout.from_args(server_args), server_args.node_rank


def actor_processes(launcher_pid: int | None) -> list[tuple[psutil.Process, str]]:
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        name = actor_name(proc.info["cmdline"] or [])
        if name is None or (launcher_pid is not None and proc.info["ppid"] != launcher_pid):
            continue
        found.append((proc, name))
    return sorted(found, key=lambda item: (item[0].info["ppid"], item[1]))


def placement_of(name: str, launcher: tuple[Layout, int] | None) -> tuple[str, str, str, str]:
    """(replica, tp rank, node, planned GPU) of the actor `name` in its launcher's layout; "-" where none."""
    if launcher is None:
        return "-", "-", "-", "-"
    layout, node = launcher
    if name.startswith("worker") and name[6:].isdigit() and int(name[6:]) < len(layout.ranks):
        slot = layout.ranks[int(name[6:])]
        return str(slot.dp_rank), str(slot.tp_rank), str(slot.node), str(slot.gpu)
    if name == "scheduler" or (name.startswith("scheduler") and name[9:].isdigit()):
        return name[9:] or "0", "-", str(node), "-"
    return "-", "-", str(node), "-"


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
    layouts: dict[int, tuple[Layout, int] | None] = {}
    for proc, name in actor_processes(launcher_pid):
        try:
            cores = sorted(proc.cpu_affinity())
        except psutil.Error:
            continue
        numa = sorted({node_of.get(c, 0) for c in cores})
        pinned = "all" if set(cores) == set(topo.cpus) else ",".join(map(str, cores))
        ppid = proc.info["ppid"]
        if ppid not in layouts:
            layouts[ppid] = launcher_layout(ppid)
        replica, tp_rank, node, gpu = placement_of(name, layouts[ppid])
        rows.append((name, replica, tp_rank, node, str(proc.pid), str(ppid), pinned, gpu,
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
