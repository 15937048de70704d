"""The node relay: carries the scheduler's plans to the workers of the other nodes (--nnodes > 1).

One relay per node, the nodes' relays forming one gloo process group (group rank = node rank) that meets at
--dist-init-addr's PORT + 1. Node 0's relay reads the scheduler's plan ring like one more worker and broadcasts each
plan: a header [PLAN, length] (int64), then the plan's msgspec bytes as a uint8 tensor. The relay of every other node
writes those bytes, unchanged, into its node's plan ring, which that node's workers read exactly as if the scheduler
were local. No pickle and no wire format of our own: the frames are the ring's frames. Results need no relay: rank 0,
the only rank that answers, is on node 0.

Liveness: node 0's relay sends a heartbeat (a header, then an all-reduce every relay joins, so node 0 hears back) every
HEARTBEAT_S, and the group's collectives time out after PEER_TIMEOUT_S. A node that dies or a network that drops thus
fails every other relay within PEER_TIMEOUT_S (a closed connection fails it at once): the relay logs which node it
lost and exits non-zero, and its supervisor stops the node. A node stopped on purpose (SIGTERM, a failed actor) is
seen the same way by the others. A clean stop of the server (a Shutdown reaching node 0's relay) is broadcast as STOP:
the other relays then ask their launcher to stop (SIGTERM to it, the path of a user's signal) and, once that stop
has begun (their own Shutdown), tell their workers to exit at once (Shutdown(0) on the plan ring, as the scheduler
does on node 0): those nodes stop cleanly too. Node 0's relay beats its heartbeat slot (/health) at least every
HEARTBEAT_S.
"""

from __future__ import annotations

import datetime
import os
import signal
import time

import msgspec
import torch
import torch.distributed as dist

from actors.actor import Actor
from runtime.messages import BatchPlan, CompileGrammars, Shutdown
from runtime.server_args import ServerArgs
from shm import Heartbeat

TO_WORKERS = "scheduler_to_worker"  # nodes > 0: the outbound plan channel of this node's workers
HEARTBEAT_S = 1.0
PEER_TIMEOUT_S = 5.0
GRACE_SLACK_S = 2.0  # as the worker's: beyond the grace period, for the scheduler's own Shutdown to arrive
PLAN, BEAT, STOP = 0, 1, 2


class RelayConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    init_method: str  # tcp://HOST:PORT+1 of --dist-init-addr
    heartbeat_segment: str = ""  # the run's Heartbeats segment ("": none)


class NodeLost(RuntimeError):
    pass


class RelayActor(Actor):
    config_type = RelayConfig

    def __init__(self, context):
        super().__init__(context)
        args: ServerArgs = self.config.args
        self.node_rank, self.nnodes = args.node_rank, args.nnodes
        self.log.info("relay of node %d/%d joining the node group at %s", self.node_rank, self.nnodes,
                      self.config.init_method)
        dist.init_process_group("gloo", init_method=self.config.init_method, rank=self.node_rank,
                                world_size=self.nnodes, timeout=datetime.timedelta(seconds=args.ready_timeout))
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PEER_TIMEOUT_S))
        self.header = torch.zeros(2, dtype=torch.int64)
        self.beat = torch.zeros(1, dtype=torch.int64)
        self.plans_out = self.ref(TO_WORKERS).channel.ring if self.node_rank else None
        self.heartbeat = Heartbeat(self.config.heartbeat_segment, self.name) if self.config.heartbeat_segment \
            else None
        self.log.info("relay of node %d: all %d nodes joined", self.node_rank, self.nnodes)

    def run(self) -> None:
        try:
            if self.node_rank == 0:
                self.run_head()
            else:
                self.run_member()
        except RuntimeError as err:  # gloo: a peer closed its connection, or timed out
            lost = "a node of the group" if self.node_rank == 0 else "node 0"
            message = (f"node {self.node_rank} lost contact with {lost} ({type(err).__name__}: {err}); stopping this "
                       f"node")
            self.log.error(message)
            raise NodeLost(message) from None
        finally:
            if self.heartbeat is not None:
                self.heartbeat.close()

    # ------------------------------------------------------------------ node 0
    def run_head(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_S
        deadline = None  # while a graceful Shutdown lets the scheduler finish
        while deadline is None or time.monotonic() < deadline:
            if self.heartbeat is not None:
                self.heartbeat.beat()
            now = time.monotonic()
            if now >= next_beat:
                self._send_header(BEAT, 0)
                dist.all_reduce(self.beat, group=self.group)
                next_beat = now + HEARTBEAT_S
            wake = next_beat if deadline is None else min(next_beat, deadline)
            match self.receive(max(0.0, wake - time.monotonic())):
                case BatchPlan() | CompileGrammars() as plan:  # the other nodes' workers compile grammars too
                    data = msgspec.msgpack.encode(plan)
                    self._send_header(PLAN, len(data))
                    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)
                case Shutdown(grace_s=grace_s) if grace_s > 0:
                    deadline = deadline or time.monotonic() + grace_s + GRACE_SLACK_S
                case Shutdown():
                    break
        self._send_header(STOP, 0)
        self.log.info("relay of node 0: told the other nodes to stop")

    def _send_header(self, kind: int, length: int) -> None:
        self.header[0], self.header[1] = kind, length
        dist.broadcast(self.header, src=0, group=self.group)

    # ------------------------------------------------------------------ nodes > 0
    def run_member(self) -> None:
        while True:
            dist.broadcast(self.header, src=0, group=self.group)
            kind, length = int(self.header[0]), int(self.header[1])
            if kind == PLAN:
                payload = torch.empty(length, dtype=torch.uint8)
                dist.broadcast(payload, src=0, group=self.group)
                self.plans_out.send(memoryview(payload.numpy()))
            elif kind == BEAT:
                dist.all_reduce(self.beat, group=self.group)
            elif kind == STOP:
                self.log.info("node 0 stopped the server; stopping node %d", self.node_rank)
                os.kill(os.getppid(), signal.SIGTERM)  # the launcher stops this node as on a user's SIGTERM
                break
            if self.heartbeat is not None:
                self.heartbeat.beat()
            if isinstance(self.mailbox.try_get(), Shutdown):  # this node stops: the others see it leave
                return
        while not isinstance(self.receive(), Shutdown):  # the launcher's stop has begun
            pass
        self.plans_out.send(msgspec.msgpack.encode(Shutdown(grace_s=0.0)))  # no plan will come: workers exit now
