"""The launcher: builds the ring topology, starts the actor processes step by step under one
Supervisor, and (for `python -m runtime`) warms the server up and supervises it until a signal.

Topology (names are ChannelSpec names; the segment of each is `<run prefix><name>`):

    ingress_to_scheduler      Ring           ingress -> scheduler
    scheduler_to_worker       BroadcastRing  scheduler -> every worker rank (reader index = rank)
    worker_to_scheduler       Ring           worker rank 0 -> scheduler
    scheduler_to_detokenizer  Ring           scheduler -> detokenizer
    detokenizer_to_ingress    Ring           detokenizer -> ingress
    scheduler_to_ingress      Ring           scheduler -> ingress

Start-up, everything at once: `python -m runtime` binds the HTTP port first (a busy port fails
in well under a second, before anything loads), then starts every actor together, so the model
load, the tokenizer loads and the imports overlap. Only the scheduler needs the model's facts: it
waits for rank 0's WorkerReady on its ring, and tells the ingress with EngineReady (rank 0's
Ready info is the msgspec-encoded ModelInfo too, for the launcher's log and the Engine).
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
from runtime.affinity import plan_affinity, read_topology
from runtime.default_model import DEFAULT_MODEL_NAME
from runtime.messages import ModelInfo
from runtime.server_args import ServerArgs
from shm import Heartbeats, segment_name, sweep_stale

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

WARMUP_PROMPT = "The capital city of France is"
WARMUP_TOKENS = 4
STOP_SETTLE_S = 10.0  # after a failed warm-up: time for a stop already under way to finish


@dataclass(frozen=True)
class Topology:
    """Every channel of one run. The scheduler's outbound names are the ones runtime.scheduler.actor reads."""

    ingress_to_scheduler: ChannelSpec
    scheduler_to_worker: ChannelSpec  # reader_index 0; each rank reads with its own index
    worker_to_scheduler: ChannelSpec
    scheduler_to_detokenizer: ChannelSpec
    detokenizer_to_ingress: ChannelSpec
    scheduler_to_ingress: ChannelSpec

    @classmethod
    def build(cls, sup: Supervisor, tp_size: int) -> Topology:
        return cls(
            ingress_to_scheduler=sup.channel("ingress_to_scheduler", "runtime.messages:IngressToScheduler",
                                             REQUEST_RING_BYTES),
            scheduler_to_worker=sup.channel("scheduler_to_worker", "runtime.messages:SchedulerToWorker",
                                            PLAN_RING_BYTES, n_readers=tp_size),
            worker_to_scheduler=sup.channel("worker_to_scheduler", "runtime.messages:WorkerToScheduler",
                                            RESULT_RING_BYTES),
            scheduler_to_detokenizer=sup.channel("scheduler_to_detokenizer", "runtime.messages:SchedulerToDetokenizer",
                                                 RESULT_RING_BYTES),
            detokenizer_to_ingress=sup.channel("detokenizer_to_ingress", "runtime.messages:DetokenizerToIngress",
                                               RESULT_RING_BYTES),
            scheduler_to_ingress=sup.channel("scheduler_to_ingress", "runtime.messages:SchedulerToIngress",
                                             RESULT_RING_BYTES),
        )

    def worker_plans(self, rank: int) -> ChannelSpec:
        return msgspec.structs.replace(self.scheduler_to_worker, reader_index=rank)


def model_name(args: ServerArgs) -> str:
    return args.served_model_name or args.model_path or DEFAULT_MODEL_NAME


def plan_cpus(args: ServerArgs) -> dict[str, list[int]]:
    """Cores per actor role (runtime.affinity); raises ValueError naming --cpu-affinity."""
    n_gpus = 0 if args.device == "cpu" else args.tp_size
    return plan_affinity(args.cpu_affinity, read_topology(n_gpus), args.tp_size)


class Deployment:
    """The actor processes of one engine: workers, scheduler, detokenizer, and the HTTP ingress
    when `with_http` (on `listener`, a bound socket it inherits; None: it binds --host/--port
    itself). Call start() from a thread that outlives the run (children die with it)."""

    def __init__(self, args: ServerArgs, with_http: bool, prefix: str | None = None,
                 on_failure: Callable[[str], None] | None = None, listener: socket.socket | None = None):
        self.args = args
        self.with_http = with_http
        self.listener = listener
        self.cpus = plan_cpus(args)
        self.sup = Supervisor(prefix=prefix, ready_timeout=args.ready_timeout, on_failure=on_failure)
        self.topology = Topology.build(self.sup, args.tp_size)
        slots = ["scheduler", "detokenizer", *(f"worker{rank}" for rank in range(args.tp_size))]
        self.heartbeats = Heartbeats.create(segment_name(self.sup.prefix, "heartbeat"), slots)
        self.model_info: ModelInfo | None = None
        self.port: int | None = None  # where the ingress listens, once started

    def _spec(self, name: str, title: str, actor_class: str, config: msgspec.Struct, inbound: list[ChannelSpec],
              outbound: list[ChannelSpec], blocked_imports: list[str] = ()) -> ActorSpec:
        return ActorSpec(name=name, actor_class=actor_class, config=msgspec.Raw(msgspec.json.encode(config)),
                         inbound=inbound, outbound=outbound, log_level=self.args.log_level,
                         cpus=self.cpus.get(name, []), title=f"runtime: {title}", blocked_imports=list(blocked_imports))

    def worker_spec(self, rank: int) -> ActorSpec:
        from runtime.worker.actor import WorkerActorConfig

        t = self.topology
        config = WorkerActorConfig(args=self.args, tp_rank=rank, heartbeat_segment=self.heartbeats.name)
        return self._spec(f"worker{rank}", f"worker {rank}", WORKER_CLASS, config, [t.worker_plans(rank)],
                          [t.worker_to_scheduler] if rank == 0 else [])

    def scheduler_spec(self, model_info: ModelInfo | None = None) -> ActorSpec:
        """model_info None: the scheduler waits for rank 0's WorkerReady (it starts while the model loads)."""
        from runtime.scheduler.actor import SchedulerActorConfig

        t = self.topology
        config = SchedulerActorConfig(args=self.args, model_info=model_info, heartbeat_segment=self.heartbeats.name)
        return self._spec("scheduler", "scheduler", SCHEDULER_CLASS, config,
                          [t.ingress_to_scheduler, t.worker_to_scheduler],
                          [t.scheduler_to_worker, t.scheduler_to_detokenizer, t.scheduler_to_ingress], NO_TORCH)

    def detokenizer_spec(self) -> ActorSpec:
        from runtime.detokenizer.actor import DetokenizerConfig

        t = self.topology
        config = DetokenizerConfig(args=self.args, to_ingress=t.detokenizer_to_ingress.name,
                                   heartbeat_segment=self.heartbeats.name)
        return self._spec("detokenizer", "detokenizer", DETOKENIZER_CLASS, config, [t.scheduler_to_detokenizer],
                          [t.detokenizer_to_ingress], NO_TORCH)

    def ingress_spec(self, model_info: ModelInfo | None = None) -> ActorSpec:
        """model_info None: the ingress waits for the scheduler's EngineReady."""
        from runtime.ingress.actor import IngressConfig

        t = self.topology
        config = IngressConfig(args=self.args, model_info=model_info, to_scheduler=t.ingress_to_scheduler.name,
                               listen_fd=-1 if self.listener is None else self.listener.fileno(),
                               heartbeat_segment=self.heartbeats.name)
        return self._spec("ingress", "ingress", INGRESS_CLASS, config,
                          [t.detokenizer_to_ingress, t.scheduler_to_ingress], [t.ingress_to_scheduler], NO_TORCH)

    def start(self) -> ModelInfo:
        """Start every actor at once; returns rank 0's ModelInfo. On failure every actor is
        stopped and ActorStartError (naming the actor, with its stderr tail) is raised."""
        specs = [self.worker_spec(rank) for rank in range(self.args.tp_size)]
        specs += [self.scheduler_spec(), self.detokenizer_spec()]
        pass_fds = {}
        if self.with_http:
            specs.append(self.ingress_spec())
            if self.listener is not None:
                pass_fds["ingress"] = (self.listener.fileno(),)
        infos = self.sup.start_many(specs, pass_fds=pass_fds)
        self.model_info = msgspec.msgpack.decode(infos[0], type=ModelInfo)
        log.info("model loaded: %s", msgspec.json.encode(self.model_info).decode())
        if self.with_http:
            from runtime.ingress.actor import IngressInfo

            self.port = msgspec.msgpack.decode(infos[-1], type=IngressInfo).port
        return self.model_info

    def connect_as_ingress(self) -> tuple[Channel, list[Channel]]:
        """For an in-process ingress (the Engine): the channel to the scheduler, and the channels
        it reads (detokenizer's text, scheduler's replies). The caller closes them."""
        t = self.topology
        to_scheduler = self.sup.connect(t.ingress_to_scheduler, writer=True)
        inbound = [self.sup.connect(t.detokenizer_to_ingress), self.sup.connect(t.scheduler_to_ingress)]
        return to_scheduler, inbound

    def stop(self, grace_s: float = 0.0) -> int:
        status = self.sup.stop(grace_s)
        self.close()
        return status

    def close(self) -> None:
        """Once the run is over: our own mappings (the supervisor's sweep removed the segments)."""
        if self.heartbeats is not None:
            self.heartbeats.close()
            self.heartbeats = None
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
    try:  # first of all: a busy port must fail before anything loads
        listener = open_listener(args.host, args.port, ServerConfig.backlog)
    except ListenError as err:
        log.error("--%s %s: %s", err.what, args.host if err.what == "host" else args.port, err)
        return 1
    stale = sweep_stale()
    if stale:
        log.info("removed %d shared-memory segments of server runs that died", len(stale))
    try:
        deployment = Deployment(args, with_http=True, listener=listener)
    except ValueError as err:  # --cpu-affinity
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
    status = deployment.sup.wait()
    deployment.close()
    if deployment.sup.failure:
        log.error("server stopped: %s", deployment.sup.failure)
    else:
        log.info("server stopped (%s)", "clean" if status == 0 else f"actor exit codes {deployment.sup.exit_codes}")
    return status

