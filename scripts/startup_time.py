"""How long `python -m runtime` takes to start, phase by phase, and how fast a busy port fails.

    python scripts/startup_time.py                     # the default model on CPU, 3 runs
    python scripts/startup_time.py --runs 5 -- --model-path /models/x --device cuda
    python scripts/startup_time.py --repo /path/to/other/checkout   # the same table for another tree (A/B)

Each run starts a server on a free port, then stops it with SIGTERM. Phases come from the
launcher's log (its lines carry timestamps): the port bound (the first connect that succeeds),
each actor ready, the engine ready (the scheduler knows the model), the warm-up generation done
("Ready: serving"). The busy-port row starts the server on a port that is already taken and
times its exit. Prints one table (seconds since the command started) and the machine's load
average, which weighs on every number on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
PHASES = [
    ("worker0 ready", "actor 'worker0' is ready"),
    ("scheduler ready", "actor 'scheduler' is ready"),
    ("detokenizer ready", "actor 'detokenizer' is ready"),
    ("ingress ready", "actor 'ingress' is ready"),
    ("warm-up done (Ready)", "Ready: serving"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(repo: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def log_times(text: str, started_wall: float) -> dict[str, float]:
    """Seconds from the start to the first line holding each phase's needle."""
    import datetime

    out = {}
    for line in text.splitlines():
        match = LINE_TIME.match(line)
        if not match:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for phase, needle in PHASES:
            if phase not in out and needle in line:
                out[phase] = stamp - started_wall
    return out


def one_run(repo: str, server_flags: list[str], timeout: float) -> dict[str, float]:
    port = free_port()
    started_wall, started = time.time(), time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "--port", str(port), *server_flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(repo), cwd=repo, text=True)
    times: dict[str, float] = {}
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while time.monotonic() - started < timeout:
        if "port bound" not in times:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                times["port bound"] = time.monotonic() - started
            except OSError:
                pass
        if any("Ready: serving" in line for line in list(output)) or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    reader.join(10)
    times.update(log_times("".join(output), started_wall))
    if "warm-up done (Ready)" not in times:
        sys.stderr.write("".join(output[-30:]))
        raise SystemExit(f"the server did not become ready within {timeout:g} s")
    return times


def busy_port_exit(repo: str, server_flags: list[str]) -> float:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "runtime", "--port", str(busy.getsockname()[1]), *server_flags],
                       capture_output=True, env=env(repo), cwd=repo, timeout=120)
        return time.monotonic() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--repo", default=REPO, help="the checkout whose `python -m runtime` is measured")
    parser.add_argument("server_flags", nargs="*", help="flags for python -m runtime (after --)")
    args = parser.parse_args(argv)
    flags = args.server_flags or ["--device", "cpu"]
    runs = [one_run(args.repo, flags, args.timeout) for _ in range(args.runs)]
    busy = [busy_port_exit(args.repo, flags) for _ in range(args.runs)]
    print(f"{args.repo}: python -m runtime {' '.join(flags)}: {args.runs} runs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"{'phase':<24} {'median s':>9} {'min s':>7} {'max s':>7}")
    for phase in ["port bound", *(p for p, _ in PHASES)]:
        values = [r[phase] for r in runs if phase in r]
        if values:
            print(f"{phase:<24} {statistics.median(values):>9.1f} {min(values):>7.1f} {max(values):>7.1f}")
    print(f"{'busy port: exit':<24} {statistics.median(busy):>9.2f} {min(busy):>7.2f} {max(busy):>7.2f}")


if __name__ == "__main__":
    main()
