"""Show where a running server's actor processes sit: role, pid, cores, GPU, NUMA node.

    python scripts/show_placement.py            # every server on this machine
    python scripts/show_placement.py --pid 1234 # the server whose launcher has this pid

Actors are found by their process title (`runtime: <role>`, e.g. `runtime: worker 0`, set at boot);
the role is the actor name (`worker0`). GPUs come from NVML (nvidia-ml-py) when it is installed and
a driver is present.
"""

from __future__ import annotations

import argparse
import os
import sys

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.affinity import read_topology  # noqa: E402

TITLE_PREFIX = "runtime: "


def actor_processes(launcher_pid: int | None) -> list[tuple[psutil.Process, str]]:
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        title = (proc.info["cmdline"] or [""])[0]
        if not title.startswith(TITLE_PREFIX) or title == TITLE_PREFIX + "launcher":
            continue
        if launcher_pid is not None and proc.info["ppid"] != launcher_pid:
            continue
        found.append((proc, title.removeprefix(TITLE_PREFIX).replace(" ", "")))
    return sorted(found, key=lambda item: item[1])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, default=None, help="the launcher's pid (default: all servers)")
    args = parser.parse_args()
    topo = read_topology(n_gpus=0)
    node_of = {c: n for n, cores in topo.numa_nodes.items() for c in cores}
    gpus = gpus_by_pid()
    rows = [("role", "pid", "launcher", "cores", "gpu", "numa")]
    for proc, role in actor_processes(args.pid):
        try:
            cores = sorted(proc.cpu_affinity())
        except psutil.Error:
            continue
        nodes = sorted({node_of.get(c, 0) for c in cores})
        pinned = "all" if set(cores) == set(topo.cpus) else ",".join(map(str, cores))
        rows.append((role, str(proc.pid), str(proc.info["ppid"]), pinned,
                     ",".join(map(str, gpus.get(proc.pid, []))) or "-", ",".join(map(str, nodes))))
    if len(rows) == 1:
        print("no actor processes found")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
