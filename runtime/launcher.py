"""The launcher: builds the ring topology, starts the actor processes step by step under one
Supervisor, and (for `python -m runtime`) warms the server up and supervises it until a signal.

Topology of one replica (names are ChannelSpec names; the segment of each is `<run prefix><name>`,
`<name>.<r>` for replica r when --dp-size > 1):

    ingress_to_scheduler      Ring           ingress -> scheduler
    scheduler_to_worker       BroadcastRing  scheduler -> every worker rank of this node (reader index = local rank),
                                             and node 0's relay with --nnodes > 1 (the last reader index)
    worker_to_scheduler       Ring           worker rank 0 -> scheduler
    scheduler_to_detokenizer  Ring           scheduler -> detokenizer
    scheduler_to_ingress      Ring           scheduler -> ingress
and once per run:
    detokenizer_to_ingress    Ring           detokenizer -> ingress

Where each rank runs (replica, tp rank, node, GPU) is runtime.distributed.layout's. Start order on
node 0: every local worker at once (the ranks of a replica become ready only together: they meet in a
process group and agree on one KV pool size; Ready info of each replica's rank 0 is the msgspec-encoded
ModelInfo), the relay with --nnodes > 1, each replica's scheduler (it sizes its pools from its replica's
ModelInfo), the detokenizer, and last the ingress (Ready once it listens). Nodes > 0 start only their
workers and their relay (runtime.distributed.actor), which writes node 0's plans into their plan ring.
`runtime.Engine` starts node 0's actors minus the ingress and plays the ingress itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from actors.channel import Channel
from actors.spec import ActorSpec, ChannelSpec
from actors.supervisor import ActorStartError, Supervisor
from runtime.affinity import Roles, plan_affinity, read_topology
from runtime.default_model import DEFAULT_MODEL_NAME
from runtime.distributed.layout import Layout, RankSlot
from runtime.messages import ModelInfo
from runtime.server_args import ServerArgs
from shm import sweep_stale

log = logging.getLogger(__name__)

# Frames larger than a ring stream through it in chunks, so these bound memory, not message size.
REQUEST_RING_BYTES = 4 << 20  # ingress -> scheduler: prompts
PLAN_RING_BYTES = 8 << 20  # scheduler -> workers: one BatchPlan carries every new token's id and slot
RESULT_RING_BYTES = 4 << 20  # worker -> scheduler, scheduler -> detokenizer, -> ingress
SHUTDOWN_GRACE_S = 0.0  # SIGTERM/SIGINT: running requests are aborted, every actor exits cleanly

WORKER_CLASS = "runtime.worker:WorkerActor"
SCHEDULER_CLASS = "runtime.scheduler:SchedulerActor"
DETOKENIZER_CLASS = "runtime.detokenizer:DetokenizerActor"
INGRESS_CLASS = "runtime.ingress:IngressActor"
RELAY_CLASS = "runtime.distributed:RelayActor"

WARMUP_PROMPT = "The capital city of France is"
WARMUP_TOKENS = 4
STOP_SETTLE_S = 10.0  # after a failed warm-up: time for a stop already under way to finish


@dataclass(frozen=True)
class ReplicaChannels:
    """The channels of one replica. The scheduler's outbound names are the ones runtime.scheduler.actor reads."""

    ingress_to_scheduler: ChannelSpec
    scheduler_to_worker: ChannelSpec  # reader_index 0; each local rank reads with its own index, the relay last
    worker_to_scheduler: ChannelSpec
    scheduler_to_detokenizer: ChannelSpec
    scheduler_to_ingress: ChannelSpec

    @classmethod
    def build(cls, sup: Supervisor, dp_rank: int, dp_size: int, plan_readers: int) -> ReplicaChannels:
        def channel(name: str, union: str, capacity: int, n_readers: int = 0, named_by_segment: bool = False):
            segment = name if dp_size == 1 else f"{name}.{dp_rank}"
            return ChannelSpec(segment if named_by_segment else name, sup.ring(segment, capacity, n_readers),
                               f"runtime.messages:{union}")

        return cls(
            # the ingress writes one of these per replica: each needs a name of its own there
            ingress_to_scheduler=channel("ingress_to_scheduler", "IngressToScheduler", REQUEST_RING_BYTES,
                                         named_by_segment=True),
            scheduler_to_worker=channel("scheduler_to_worker", "SchedulerToWorker", PLAN_RING_BYTES, plan_readers),
            worker_to_scheduler=channel("worker_to_scheduler", "WorkerToScheduler", RESULT_RING_BYTES),
            scheduler_to_detokenizer=channel("scheduler_to_detokenizer", "SchedulerToDetokenizer", RESULT_RING_BYTES),
            scheduler_to_ingress=channel("scheduler_to_ingress", "SchedulerToIngress", RESULT_RING_BYTES),
        )

    def plans_for(self, reader_index: int) -> ChannelSpec:
        return msgspec.structs.replace(self.scheduler_to_worker, reader_index=reader_index)


def model_name(args: ServerArgs) -> str:
    return args.served_model_name or args.model_path or DEFAULT_MODEL_NAME


def plan_cpus(args: ServerArgs, layout: Layout) -> dict[str, list[int]]:
    """Cores per actor of this node (runtime.affinity); raises ValueError naming --cpu-affinity."""
    local = layout.node_ranks(args.node_rank)
    n_gpus = 0 if args.device == "cpu" else max(slot.gpu for slot in local) + 1
    return plan_affinity(args.cpu_affinity, read_topology(n_gpus), Roles.for_node(layout, args.node_rank))


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_init_methods(args: ServerArgs, layout: Layout) -> tuple[list[str | None], str | None]:
    """Where the ranks of each replica meet (tcp://HOST:PORT+r with --dist-init-addr HOST:PORT, else a free local
    port; None with tp_size 1), and where the nodes' relays meet (HOST:PORT+dp_size, with --nnodes > 1)."""
    if args.dist_init_addr is None:
        return [f"tcp://127.0.0.1:{free_local_port()}" if layout.tp_size > 1 else None
                for _ in range(layout.dp_size)], None
    host, _, port = args.dist_init_addr.rpartition(":")
    host = host.strip("[]")
    host = f"[{host}]" if ":" in host else host
    replicas = [f"tcp://{host}:{int(port) + r}" if layout.tp_size > 1 else None for r in range(layout.dp_size)]
    return replicas, f"tcp://{host}:{int(port) + layout.dp_size}" if layout.nnodes > 1 else None


class Deployment:
    """The actor processes of one engine on this node: node 0 runs every replica's local workers and scheduler,
    the detokenizer, the HTTP ingress when `with_http`, and the relay with --nnodes > 1; other nodes run their
    workers and their relay. Call start() from a thread that outlives the run (children die with it)."""

    def __init__(self, args: ServerArgs, with_http: bool, prefix: str | None = None,
                 on_failure: Callable[[str], None] | None = None):
        self.args = args
        self.with_http = with_http
        self.layout = Layout.from_args(args)
        self.node = args.node_rank
        self.cpus = plan_cpus(args, self.layout)
        self.sup = Supervisor(prefix=prefix, ready_timeout=args.ready_timeout, on_failure=on_failure)
        self.relayed = self.layout.nnodes > 1
        self.replicas = [ReplicaChannels.build(self.sup, r, self.layout.dp_size,
                                               len(self.layout.replica_ranks(r, self.node)) + self.relayed)
                         for r in range(self.layout.dp_size)]
        self.detokenizer_to_ingress = self.sup.channel("detokenizer_to_ingress",
                                                       "runtime.messages:DetokenizerToIngress", RESULT_RING_BYTES)
        self.worker_init_methods, self.relay_init_method = dist_init_methods(args, self.layout)
        self.model_info: ModelInfo | None = None
        self.port: int | None = None  # where the ingress listens, once started

    def _spec(self, name: str, actor_class: str, config: msgspec.Struct, inbound: list[ChannelSpec],
              outbound: list[ChannelSpec]) -> ActorSpec:
        return ActorSpec(name=name, actor_class=actor_class, config=msgspec.Raw(msgspec.json.encode(config)),
                         inbound=inbound, outbound=outbound, log_level=self.args.log_level,
                         cpus=self.cpus.get(name, []))

    def worker_spec(self, global_rank: int) -> ActorSpec:
        from runtime.worker.actor import WorkerActorConfig

        slot: RankSlot = self.layout.ranks[global_rank]
        local = self.layout.replica_ranks(slot.dp_rank, slot.node)
        channels = self.replicas[slot.dp_rank]
        config = WorkerActorConfig(args=self.args, tp_rank=slot.tp_rank, dp_rank=slot.dp_rank, gpu_id=slot.gpu,
                                   dist_init_method=self.worker_init_methods[slot.dp_rank],
                                   p2p_check_gpus=[s.gpu for s in local] if self.args.enable_p2p_check else [],
                                   cpu_threads=self.cpu_threads_per_worker())
        return self._spec(slot.name, WORKER_CLASS, config, [channels.plans_for(local.index(slot))],
                          [channels.worker_to_scheduler] if slot.tp_rank == 0 else [])

    def cpu_threads_per_worker(self) -> int:
        """Several workers on one node share its cores: each gets its share of torch threads (more would
        oversubscribe the cores, and a rank waiting in a collective would wait for a descheduled peer)."""
        workers = len(self.layout.node_ranks(self.node))
        return max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else 0

    def relay_spec(self) -> ActorSpec:
        from runtime.distributed.actor import RelayConfig

        channels = self.replicas[0]  # --nnodes > 1 needs --dp-size 1
        config = RelayConfig(args=self.args, init_method=self.relay_init_method)
        if self.node == 0:
            reader = len(self.layout.replica_ranks(0, 0))  # after the local ranks
            return self._spec("relay", RELAY_CLASS, config, [channels.plans_for(reader)], [])
        return self._spec("relay", RELAY_CLASS, config, [], [channels.scheduler_to_worker])

    def scheduler_spec(self, model_info: ModelInfo, dp_rank: int = 0) -> ActorSpec:
        from runtime.scheduler.actor import SchedulerActorConfig

        c = self.replicas[dp_rank]
        config = SchedulerActorConfig(args=self.args, model_info=model_info, dp_rank=dp_rank)
        return self._spec(self.layout.scheduler_name(dp_rank), SCHEDULER_CLASS, config,
                          [c.ingress_to_scheduler, c.worker_to_scheduler],
                          [c.scheduler_to_worker, c.scheduler_to_detokenizer, c.scheduler_to_ingress])

    def detokenizer_spec(self) -> ActorSpec:
        from runtime.detokenizer.actor import DetokenizerConfig

        return self._spec("detokenizer", DETOKENIZER_CLASS,
                          DetokenizerConfig(args=self.args, to_ingress=self.detokenizer_to_ingress.name),
                          [c.scheduler_to_detokenizer for c in self.replicas], [self.detokenizer_to_ingress])

    def ingress_spec(self, model_info: ModelInfo) -> ActorSpec:
        from runtime.ingress.actor import IngressConfig

        to_schedulers = [c.ingress_to_scheduler for c in self.replicas]
        return self._spec("ingress", INGRESS_CLASS,
                          IngressConfig(args=self.args, model_info=model_info,
                                        to_schedulers=[c.name for c in to_schedulers]),
                          [self.detokenizer_to_ingress, *(c.scheduler_to_ingress for c in self.replicas)],
                          to_schedulers)

    def start(self) -> ModelInfo:
        """Start every actor of this node in order; returns the ModelInfo of replica 0's rank 0 (on nodes > 0: of
        this node's first rank). On failure every actor is stopped and ActorStartError (naming the actor, with its
        stderr tail) is raised."""
        local = self.layout.node_ranks(self.node)
        log.info("this is node %d of the layout %s", self.node, self.layout.describe())
        if self.node != 0:
            infos = self.sup.start_together([self.worker_spec(s.global_rank) for s in local] + [self.relay_spec()])
            self.model_info = msgspec.msgpack.decode(infos[0], type=ModelInfo)
            return self.model_info
        infos = self.sup.start_together([self.worker_spec(s.global_rank) for s in local])
        replica_infos = [msgspec.msgpack.decode(infos[local.index(self.layout.replica_ranks(r)[0])], type=ModelInfo)
                         for r in range(self.layout.dp_size)]
        self.model_info = replica_infos[0]
        log.info("model loaded: %s", msgspec.json.encode(self.model_info).decode())
        if self.relayed:
            self.sup.start(self.relay_spec())
        for r, info in enumerate(replica_infos):
            self.sup.start(self.scheduler_spec(info, r))
        self.sup.start(self.detokenizer_spec())
        if self.with_http:
            from runtime.ingress.actor import IngressInfo

            info = self.sup.start(self.ingress_spec(self.model_info))
            self.port = msgspec.msgpack.decode(info, type=IngressInfo).port
        return self.model_info

    def connect_as_ingress(self) -> tuple[list[Channel], list[Channel]]:
        """For an in-process ingress (the Engine): the channel to each replica's scheduler, and the channels it
        reads (detokenizer's text, each scheduler's replies). The caller closes them."""
        to_schedulers = [self.sup.connect(c.ingress_to_scheduler, writer=True) for c in self.replicas]
        inbound = [self.sup.connect(self.detokenizer_to_ingress),
                   *(self.sup.connect(c.scheduler_to_ingress) for c in self.replicas)]
        return to_schedulers, inbound

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> int:
        return self.sup.stop(grace_s)


# ------------------------------------------------------------------------------------------------
# python -m runtime
# ------------------------------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format="%(asctime)s [launcher %(process)d] %(levelname)s %(name)s: %(message)s")


def server_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def warm_up(args: ServerArgs, url: str, timeout: float) -> dict:
    """One real generation through the HTTP server (compiles, fills caches, proves the path works)."""
    body: dict = {"sampling_params": {"temperature": 0.0, "max_new_tokens": WARMUP_TOKENS}}
    if args.skip_tokenizer_init:
        body["input_ids"] = [1, 2, 3, 4]
    else:
        body["text"] = WARMUP_PROMPT
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def serve(args: ServerArgs) -> int:
    """Run the server until SIGTERM/SIGINT or an actor's death; the exit status."""
    configure_logging(args.log_level)
    stale = sweep_stale()
    if stale:
        log.info("removed %d shared-memory segments of server runs that died", len(stale))
    try:
        deployment = Deployment(args, with_http=True)
    except ValueError as err:  # --cpu-affinity
        log.error("%s", err)
        return 2
    deployment.sup.handle_signals(SHUTDOWN_GRACE_S)
    started = time.monotonic()
    try:
        deployment.start()
    except ActorStartError as err:
        if deployment.sup.failure is None:  # SIGTERM/SIGINT while starting: a requested stop, not a failure
            log.info("stopped before the server was ready")
            return deployment.sup.wait()
        log.error("%s", err)
        return 1
    if args.node_rank != 0:
        log.info("Ready: node %d runs workers %s for node 0 at %s (started in %.1f s)", args.node_rank,
                 ", ".join(s.name for s in deployment.layout.node_ranks(args.node_rank)), args.dist_init_addr,
                 time.monotonic() - started)
        return wait_until_stopped(deployment)
    url = server_url(args.host, deployment.port)
    try:
        reply = warm_up(args, url, timeout=args.ready_timeout)
    except (urllib.error.URLError, OSError, ValueError) as err:
        status = deployment.sup.wait(STOP_SETTLE_S)
        if status is not None:  # the run ended meanwhile (a signal, an actor's death): that is why
            return status
        log.error("the warm-up request to %s/generate failed: %s; stopping", url, err)
        deployment.stop()
        return 1
    log.debug("warm-up reply: %s", reply)
    log.info("Ready: serving %s at %s (started in %.1f s)", model_name(args), url, time.monotonic() - started)
    return wait_until_stopped(deployment)


def wait_until_stopped(deployment: Deployment) -> int:
    status = deployment.sup.wait()
    if deployment.sup.failure:
        log.error("server stopped: %s", deployment.sup.failure)
    else:
        log.info("server stopped (%s)", "clean" if status == 0 else f"actor exit codes {deployment.sup.exit_codes}")
    return status

