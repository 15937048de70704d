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

Where each rank runs (replica, tp rank, node, GPU) is runtime.distributed.layout's. Node 0 runs its ranks of
every replica, every replica's scheduler, the detokenizer, the ingress, and with --nnodes > 1 a relay; the other
nodes run their ranks and a relay (runtime.distributed.actor), which writes node 0's plans into their plan ring.

Start-up, everything at once: `python -m runtime` binds the HTTP port first (a busy port fails
in well under a second, before anything loads), then starts every actor together, so the model
load, the tokenizer loads and the imports overlap (the ranks of a replica must start together anyway:
they meet in a process group and agree on one KV pool size). Only the schedulers need the model's
facts: each waits for its replica's rank 0's WorkerReady on its ring, and tells the ingress with
EngineReady (the ingress waits for every replica's; rank 0's Ready info is the msgspec-encoded
ModelInfo too, for the launcher's log and the Engine).
`runtime.Engine` starts the same actors minus the ingress and plays the ingress itself.

Processes are titled `runtime: <role>` (ps, top); their configs (which hold the API key) travel in
0600 shared memory, never on argv. The actors that need no torch (scheduler, detokenizer,
ingress) block its import: transformers would load it for nothing (seconds and ~200 MB each).
Every actor but the ingress beats a slot of the run's heartbeat segment, which /health reads.

Stop: SIGTERM/SIGINT start a graceful drain of --graceful-shutdown-timeout seconds (see
runtime.ingress.actor); the launcher exits 0 when every actor exited cleanly.
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
from httpd import ServerConfig
from httpd.listen import ListenError, open_listener
from runtime.affinity import Roles, plan_affinity, read_topology
from runtime.default_model import DEFAULT_MODEL_NAME
from runtime.distributed.layout import Layout, RankSlot
from runtime.messages import ModelInfo
from runtime.model_loader.hub import HubError, resolve_model_paths
from runtime.multimodal.architectures import is_vision_language_folder
from runtime.server_args import ServerArgs
from shm import Arena, Heartbeats, segment_name, sweep_stale

log = logging.getLogger(__name__)

# Frames larger than a ring stream through it in chunks, so these bound memory, not message size.
REQUEST_RING_BYTES = 4 << 20  # ingress -> scheduler: prompts
PLAN_RING_BYTES = 8 << 20  # scheduler -> workers: one BatchPlan carries every new token's id and slot
RESULT_RING_BYTES = 4 << 20  # worker -> scheduler, scheduler -> detokenizer, -> ingress
NO_TORCH = ["torch"]  # blocked in the actors that need no torch (their tokenizer libraries would import it)

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
    """The actor processes of one engine on this node. Node 0: every replica's local workers and scheduler, the
    detokenizer, the HTTP ingress when `with_http` (on `listener`, a bound socket it inherits; None: it binds
    --host/--port itself), and the relay with --nnodes > 1; other nodes: their workers and their relay. Call
    start() from a thread that outlives the run (children die with it)."""

    def __init__(self, args: ServerArgs, with_http: bool, prefix: str | None = None,
                 on_failure: Callable[[str], None] | None = None, listener: socket.socket | None = None):
        self.args = args
        self.with_http = with_http
        self.listener = listener
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
        slots = [slot.name for slot in self.layout.node_ranks(self.node)]
        if self.node == 0:
            slots += [self.layout.scheduler_name(r) for r in range(self.layout.dp_size)] + ["detokenizer"]
        slots += ["relay"] if self.relayed else []
        self.heartbeats = Heartbeats.create(segment_name(self.sup.prefix, "heartbeat"), slots)
        # images of requests in flight, written by the ingress, read by the workers, released by the scheduler
        # one per replica (its scheduler releases the blocks in its order): written by the ingress, read by the workers
        self.image_arenas = [Arena.create(segment_name(self.sup.prefix, f"images{r}"), args.image_arena_mb << 20)
                             for r in range(self.layout.dp_size)] \
            if self.layout.nnodes == 1 and is_vision_language_folder(args.model_path) else []
        self.model_info: ModelInfo | None = None
        self.port: int | None = None  # where the ingress listens, once started

    def _spec(self, name: str, title: str, actor_class: str, config: msgspec.Struct, inbound: list[ChannelSpec],
              outbound: list[ChannelSpec], blocked_imports: list[str] = ()) -> ActorSpec:
        return ActorSpec(name=name, actor_class=actor_class, config=msgspec.Raw(msgspec.json.encode(config)),
                         inbound=inbound, outbound=outbound, log_level=self.args.log_level,
                         cpus=self.cpus.get(name, []), title=f"runtime: {title}", blocked_imports=list(blocked_imports))

    @property
    def parallel(self) -> bool:
        """More than one rank, replica or node: process titles carry the placement (scripts/show_placement.py)."""
        return len(self.layout.ranks) > 1 or self.relayed

    def worker_spec(self, global_rank: int) -> ActorSpec:
        from runtime.worker.actor import WorkerActorConfig

        slot: RankSlot = self.layout.ranks[global_rank]
        local = self.layout.replica_ranks(slot.dp_rank, slot.node)
        channels = self.replicas[slot.dp_rank]
        config = WorkerActorConfig(args=self.args, tp_rank=slot.tp_rank, heartbeat_segment=self.heartbeats.name,
                                   dp_rank=slot.dp_rank, gpu_id=slot.gpu,
                                   dist_init_method=self.worker_init_methods[slot.dp_rank],
                                   p2p_check_gpus=[s.gpu for s in local] if self.args.enable_p2p_check else [],
                                   cpu_threads=self.cpu_threads_per_worker())
        title = f"worker {global_rank}"
        if self.parallel:
            title += f" [dp {slot.dp_rank} tp {slot.tp_rank} node {slot.node} gpu {slot.gpu}]"
        return self._spec(slot.name, title, WORKER_CLASS, config, [channels.plans_for(local.index(slot))],
                          [channels.worker_to_scheduler] if slot.tp_rank == 0 else [])

    def cpu_threads_per_worker(self) -> int:
        """Several workers on one node share its cores: each gets its share of torch threads (more would
        oversubscribe the cores, and a rank waiting in a collective would wait for a descheduled peer)."""
        workers = len(self.layout.node_ranks(self.node))
        return max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else 0

    def relay_spec(self) -> ActorSpec:
        from runtime.distributed.actor import RelayConfig

        channels = self.replicas[0]  # --nnodes > 1 needs --dp-size 1
        config = RelayConfig(args=self.args, init_method=self.relay_init_method, heartbeat_segment=self.heartbeats.name)
        title = f"relay [node {self.node}]"
        if self.node == 0:
            reader = len(self.layout.replica_ranks(0, 0))  # after the local ranks
            return self._spec("relay", title, RELAY_CLASS, config, [channels.plans_for(reader)], [])
        return self._spec("relay", title, RELAY_CLASS, config, [], [channels.scheduler_to_worker])

    def scheduler_spec(self, model_info: ModelInfo | None = None, dp_rank: int = 0) -> ActorSpec:
        """model_info None: the scheduler waits for its rank 0's WorkerReady (it starts while the model loads)."""
        from runtime.scheduler.actor import SchedulerActorConfig

        c = self.replicas[dp_rank]
        config = SchedulerActorConfig(args=self.args, model_info=model_info, heartbeat_segment=self.heartbeats.name,
                                      dp_rank=dp_rank)
        title = "scheduler" if self.layout.dp_size == 1 else f"scheduler {dp_rank} [dp {dp_rank} node 0]"
        return self._spec(self.layout.scheduler_name(dp_rank), title, SCHEDULER_CLASS, config,
                          [c.ingress_to_scheduler, c.worker_to_scheduler],
                          [c.scheduler_to_worker, c.scheduler_to_detokenizer, c.scheduler_to_ingress], NO_TORCH)

    def detokenizer_spec(self) -> ActorSpec:
        from runtime.detokenizer.actor import DetokenizerConfig

        config = DetokenizerConfig(args=self.args, to_ingress=self.detokenizer_to_ingress.name,
                                   heartbeat_segment=self.heartbeats.name)
        return self._spec("detokenizer", "detokenizer", DETOKENIZER_CLASS, config,
                          [c.scheduler_to_detokenizer for c in self.replicas], [self.detokenizer_to_ingress], NO_TORCH)

    def ingress_spec(self, model_info: ModelInfo | None = None) -> ActorSpec:
        """model_info None: the ingress waits for every scheduler's EngineReady."""
        from runtime.ingress.actor import IngressConfig

        to_schedulers = [c.ingress_to_scheduler for c in self.replicas]
        config = IngressConfig(args=self.args, model_info=model_info, to_schedulers=[c.name for c in to_schedulers],
                               listen_fd=-1 if self.listener is None else self.listener.fileno(),
                               heartbeat_segment=self.heartbeats.name,
                               image_arenas=[arena.name for arena in self.image_arenas])
        return self._spec("ingress", "ingress", INGRESS_CLASS, config,
                          [self.detokenizer_to_ingress, *(c.scheduler_to_ingress for c in self.replicas)],
                          to_schedulers, NO_TORCH)

    def start(self) -> ModelInfo:
        """Start every actor of this node at once; returns the ModelInfo of replica 0's rank 0 (on nodes > 0: of
        this node's first rank). On failure every actor is stopped and ActorStartError (naming the actor, with its
        stderr tail) is raised."""
        local = self.layout.node_ranks(self.node)
        log.info("this is node %d of the layout %s", self.node, self.layout.describe())
        specs = [self.worker_spec(slot.global_rank) for slot in local]
        specs += [self.relay_spec()] if self.relayed else []
        pass_fds = {}
        if self.node == 0:
            specs += [self.scheduler_spec(dp_rank=r) for r in range(self.layout.dp_size)]
            specs.append(self.detokenizer_spec())
            if self.with_http:
                specs.append(self.ingress_spec())
                if self.listener is not None:
                    pass_fds["ingress"] = (self.listener.fileno(),)
        infos = self.sup.start_many(specs, pass_fds=pass_fds)
        self.model_info = msgspec.msgpack.decode(infos[0], type=ModelInfo)
        log.info("model loaded: %s", msgspec.json.encode(self.model_info).decode())
        if self.node == 0 and self.with_http:
            from runtime.ingress.actor import IngressInfo

            self.port = msgspec.msgpack.decode(infos[-1], type=IngressInfo).port
        return self.model_info

    def connect_as_ingress(self) -> tuple[list[Channel], list[Channel]]:
        """For an in-process ingress (the Engine): the channel to each replica's scheduler, and the channels it
        reads (detokenizer's text, each scheduler's replies). The caller closes them."""
        to_schedulers = [self.sup.connect(c.ingress_to_scheduler, writer=True) for c in self.replicas]
        inbound = [self.sup.connect(self.detokenizer_to_ingress),
                   *(self.sup.connect(c.scheduler_to_ingress) for c in self.replicas)]
        return to_schedulers, inbound

    def stop(self, grace_s: float = 0.0) -> int:
        status = self.sup.stop(grace_s)
        self.close()
        return status

    def close(self) -> None:
        """Once the run is over: our own mappings (the supervisor's sweep removed the segments)."""
        if self.heartbeats is not None:
            self.heartbeats.close()
            self.heartbeats = None
        for arena in self.image_arenas:
            arena.close()
        self.image_arenas = []
        if self.listener is not None:
            self.listener.close()
            self.listener = None


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


def warm_up(args: ServerArgs, url: str, timeout: float, is_embedding: bool = False) -> dict:
    """One real generation (an embedding model: one embedding) through the HTTP server (compiles, fills caches,
    proves the path works)."""
    body: dict = {} if is_embedding else {"sampling_params": {"temperature": 0.0, "max_new_tokens": WARMUP_TOKENS}}
    if args.skip_tokenizer_init:
        body["input_ids"] = [1, 2, 3, 4]
    else:
        body["text"] = WARMUP_PROMPT
    path = "/encode" if is_embedding else "/generate"
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def set_launcher_title() -> None:
    """`runtime: launcher` in ps instead of the command line, which may hold --api-key."""
    import setproctitle

    setproctitle.setproctitle("runtime: launcher")


def serve(args: ServerArgs) -> int:
    """Run the server until SIGTERM/SIGINT or an actor's death; the exit status."""
    started = time.monotonic()
    configure_logging(args.log_level)
    set_launcher_title()
    listener = None
    try:  # first of all: a busy port must fail before anything loads (only node 0 serves HTTP)
        if args.node_rank == 0:
            listener = open_listener(args.host, args.port, ServerConfig.backlog)
    except ListenError as err:
        log.error("--%s %s: %s", err.what, args.host if err.what == "host" else args.port, err)
        return 1
    try:  # after the port (a busy one fails at once), before any actor: they all see a local folder
        args = resolve_model_paths(args)
    except HubError as err:
        listener.close()
        log.error("%s", err)
        return 1
    stale = sweep_stale()
    if stale:
        log.info("removed %d shared-memory segments of server runs that died", len(stale))
    try:
        deployment = Deployment(args, with_http=True, listener=listener)
    except ValueError as err:  # --cpu-affinity
        if listener is not None:
            listener.close()
        log.error("%s", err)
        return 2
    deployment.sup.handle_signals(args.graceful_shutdown_timeout)
    try:
        deployment.start()
    except ActorStartError as err:
        deployment.close()
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
    deployment.listener = None
    listener.close()  # the ingress has its own copy now
    url = server_url(args.host, deployment.port)
    try:
        reply = warm_up(args, url, timeout=args.ready_timeout, is_embedding=deployment.model_info.is_embedding)
    except (urllib.error.URLError, OSError, ValueError) as err:
        status = deployment.sup.wait(STOP_SETTLE_S)
        if status is not None:  # the run ended meanwhile (a signal, an actor's death): that is why
            deployment.close()
            return status
        log.error("the warm-up request to %s failed: %s; stopping", url, err)
        deployment.stop()
        return 1
    log.debug("warm-up reply: %s", reply)
    log.info("Ready: serving %s at %s (started in %.1f s)", model_name(args), url, time.monotonic() - started)
    return wait_until_stopped(deployment)


def wait_until_stopped(deployment: Deployment) -> int:
    status = deployment.sup.wait()
    deployment.close()
    if deployment.sup.failure:
        log.error("server stopped: %s", deployment.sup.failure)
    else:
        log.info("server stopped (%s)", "clean" if status == 0 else f"actor exit codes {deployment.sup.exit_codes}")
    return status

