"""IPC benchmark: our shared-memory Ring vs multiprocessing.Pipe vs pyzmq (PAIR over ipc://).

Two processes; every message is a msgspec Struct carrying the payload, encoded by the sender and
decoded by the receiver, so the numbers include the serialisation a real actor pays.
  round trip: ping-pong (the echo side decodes and re-encodes), p50/p99 in microseconds
  one way:    the sender streams N messages, the receiver decodes them all and acks; msgs/s, GB/s,
              and the sender's CPU time per message (encode + send; what it costs when cores are
              shared: on an oversubscribed machine wall-clock rates say more about the neighbours)
"ring-batch" is the Ring with send_many() (batches of up to 64 messages / 64 KiB, one cursor
publish and fence per 16 KiB instead of per message).

    python scripts/bench_ipc.py [--quick] [--rounds 3] [--no-pin] [--output results.json]

The two processes are pinned to two different CPUs (as the launcher pins actors) unless --no-pin:
otherwise where the kernel happens to place them (same core or not) decides the small-message
round trip more than the transport does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shm import Ring, run_prefix, sweep  # noqa: E402

SIZES = [64, 1024, 64 * 1024, 1024 * 1024]
RING_CAPACITY = 16 << 20  # 1 MiB messages stay whole frames (streaming starts above capacity / 2)
BATCH = 64  # ring-batch: messages per send_many() call, and at most BATCH_BYTES of them
BATCH_BYTES = 64 * 1024


class Payload(msgspec.Struct, array_like=True):
    seq: int
    data: bytes


def plan_for(quick: bool) -> list[tuple[int, int, int]]:
    """(payload size, round trips, one-way messages) per size."""
    scale = 0.1 if quick else 1.0
    counts = {64: (20000, 400000), 1024: (20000, 200000), 65536: (4000, 20000), 1048576: (400, 2000)}
    return [(s, max(50, int(counts[s][0] * scale)), max(100, int(counts[s][1] * scale))) for s in SIZES]


# ------------------------------------------------------------------------------------ transports
# Each endpoint offers send(bytes), recv() -> bytes-like, and send_batch(list of bytes).


class RingEnd:
    def __init__(self, out_name: str, in_name: str):
        self.out = Ring.attach(out_name)
        self.inp = Ring.attach(in_name)
        self.send = self.out.send
        self.recv = self.inp.recv_view  # decode straight from the ring: no copy of the frame
        self.send_batch = self.out.send_many

    def close(self):
        self.out.close()
        self.inp.close()


class PipeEnd:
    def __init__(self, conn):
        self.send = conn.send_bytes
        self.recv = conn.recv_bytes
        self.conn = conn

    def send_batch(self, frames):
        for f in frames:
            self.send(f)

    def close(self):
        self.conn.close()


class ZmqEnd:
    def __init__(self, address: str, bind: bool):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        (self.sock.bind if bind else self.sock.connect)(address)

    def send(self, data):
        self.sock.send(data, copy=len(data) < 65536)

    def recv(self):
        frame = self.sock.recv(copy=False)
        return frame.buffer

    def send_batch(self, frames):
        for f in frames:
            self.send(f)

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


def open_end(transport: str, spec, parent: bool):
    if transport in ("ring", "ring-batch"):
        a, b = spec
        return RingEnd(a, b) if parent else RingEnd(b, a)
    if transport == "pipe":
        return PipeEnd(spec[0] if parent else spec[1])
    return ZmqEnd(spec, bind=parent)


# ------------------------------------------------------------------------------------ the two sides


def child_main(transport: str, spec, plan: list[tuple[int, int, int]], cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    end = open_end(transport, spec, parent=False)
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(Payload).decode
    for _, round_trips, one_way in plan:
        for _ in range(round_trips):
            end.send(encode(decode(end.recv())))
        total = 0
        for _ in range(one_way):
            total += len(decode(end.recv()).data)
        end.send(encode(Payload(total, b"")))
    end.close()


def run_transport(transport: str, plan: list[tuple[int, int, int]], cpus: tuple[int, int] | None) -> list[dict]:
    ctx = mp.get_context("spawn")
    prefix = run_prefix()
    rings = []
    if transport in ("ring", "ring-batch"):
        names = (f"{prefix}bench.up", f"{prefix}bench.down")
        rings = [Ring.create(n, RING_CAPACITY) for n in names]
        spec, child_spec = names, names
    elif transport == "pipe":
        a, b = ctx.Pipe(duplex=True)
        spec, child_spec = (a, b), (a, b)
    else:
        spec = child_spec = f"ipc://{tempfile.gettempdir()}/bench_ipc_{os.getpid()}.sock"
    end = open_end(transport, spec, parent=True)
    child = ctx.Process(target=child_main, args=(transport, child_spec, plan, cpus and cpus[1]), daemon=True)
    child.start()
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(Payload).decode
    rows = []
    try:
        for size, round_trips, one_way in plan:
            data = os.urandom(size)
            latencies = []
            warmup = max(10, round_trips // 10)
            for i in range(round_trips):
                t0 = time.perf_counter_ns()
                end.send(encode(Payload(i, data)))
                reply = decode(end.recv())
                t1 = time.perf_counter_ns()
                if i >= warmup:
                    latencies.append(t1 - t0)
                assert reply.seq == i and len(reply.data) == size
            latencies.sort()
            p50 = latencies[len(latencies) // 2] / 1e3
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1e3

            t0, cpu0 = time.perf_counter(), time.process_time()
            if transport == "ring-batch":
                batch = max(1, min(BATCH, BATCH_BYTES // size))
                for start in range(0, one_way, batch):
                    end.send_batch([encode(Payload(i, data)) for i in range(start, min(one_way, start + batch))])
            else:
                for i in range(one_way):
                    end.send(encode(Payload(i, data)))
            send_cpu = time.process_time() - cpu0
            ack = decode(end.recv())
            elapsed = time.perf_counter() - t0
            assert ack.seq == one_way * size, "the receiver lost payload bytes"
            rows.append({
                "transport": transport, "size": size,
                "rtt_p50_us": round(p50, 2), "rtt_p99_us": round(p99, 2),
                "msgs_per_s": round(one_way / elapsed), "gb_per_s": round(one_way * size / elapsed / 1e9, 3),
                "send_cpu_us_per_msg": round(send_cpu / one_way * 1e6, 3),
                "round_trips": round_trips, "one_way_messages": one_way,
            })
            print(f"  {transport:10s} {human(size):>6s} done", file=sys.stderr, flush=True)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
        end.close()
        for r in rings:
            r.close()
            r.unlink()
    return rows


def median_rows(runs: list[dict]) -> list[dict]:
    """One row per (transport, size): the median of every measured figure over the rounds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in runs:
        groups.setdefault((row["transport"], row["size"]), []).append(row)
    rows = []
    for group in groups.values():
        row = dict(group[0], rounds=len(group))
        for key in ("rtt_p50_us", "rtt_p99_us", "msgs_per_s", "gb_per_s", "send_cpu_us_per_msg"):
            row[key] = statistics.median(r[key] for r in group)
        row["msgs_per_s"] = round(row["msgs_per_s"])
        rows.append(row)
    return rows


def human(size: int) -> str:
    return f"{size // 1048576} MiB" if size >= 1048576 else f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def print_table(rows: list[dict]) -> None:
    print(f"{'transport':10s} {'size':>7s} {'rtt p50 us':>11s} {'rtt p99 us':>11s} {'msgs/s':>12s} {'GB/s':>8s} "
          f"{'send cpu us/msg':>16s}")
    for r in sorted(rows, key=lambda r: (r["size"], r["transport"])):
        print(f"{r['transport']:10s} {human(r['size']):>7s} {r['rtt_p50_us']:11.2f} {r['rtt_p99_us']:11.2f} "
              f"{r['msgs_per_s']:12,d} {r['gb_per_s']:8.3f} {r['send_cpu_us_per_msg']:16.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations (smoke run)")
    parser.add_argument("--transports", default="ring,ring-batch,pipe,zmq",
                        help="comma-separated subset of ring, ring-batch, pipe, zmq")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every transport this many times, alternating, and report medians")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the two processes to two different CPUs (the launcher pins actors)")
    args = parser.parse_args(argv)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(transports) - {"ring", "ring-batch", "pipe", "zmq"}
    if unknown:
        parser.error(f"--transports: unknown transport(s) {sorted(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    plan = plan_for(args.quick)
    available = sorted(os.sched_getaffinity(0))
    cpus = None if args.no_pin or len(available) < 2 else (available[0], available[1])
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    load_before = os.getloadavg()[0]
    runs: list[dict] = []
    try:
        for _ in range(args.rounds):
            for transport in transports:
                runs += run_transport(transport, plan, cpus)
    finally:
        sweep(run_prefix())
    rows = median_rows(runs)
    print_table(rows)
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    placement = f"processes pinned to CPUs {cpus}" if cpus else "processes not pinned"
    print(f"load average (1 min) before/after: {load[0]} / {load[1]} on {os.cpu_count()} CPUs; {placement}")
    if args.output:
        info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                "loadavg_before_after": load, "pinned_cpus": cpus,
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        Path(args.output).write_text(json.dumps({"info": info, "results": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
