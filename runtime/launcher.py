"""The launcher: builds the ring topology, starts the actor processes step by step under one
Supervisor, and (for `python -m runtime`) warms the server up and supervises it until a signal.

Topology (names are ChannelSpec names; the segment of each is `<run prefix><name>`):

    ingress_to_scheduler      Ring           ingress -> scheduler
    scheduler_to_worker       BroadcastRing  scheduler -> every worker rank (reader index = rank)
    worker_to_scheduler       Ring           worker rank 0 -> scheduler
    scheduler_to_detokenizer  Ring           scheduler -> detokenizer
    detokenizer_to_ingress    Ring           detokenizer -> ingress
    scheduler_to_ingress      Ring           scheduler -> ingress

Start order: the workers (rank 0's Ready info is the msgspec-encoded ModelInfo), then the scheduler
(it sizes its pools from ModelInfo), the detokenizer, and last the ingress (Ready once it listens).
`runtime.Engine` starts the same actors minus the ingress and plays the ingress itself.
"""

from __future__ import annotations

import json
import logging
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
from runtime.affinity import plan_affinity, read_topology
from runtime.default_model import DEFAULT_MODEL_NAME
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
    when `with_http`. Call start() from a thread that outlives the run (children die with it)."""

    def __init__(self, args: ServerArgs, with_http: bool, prefix: str | None = None,
                 on_failure: Callable[[str], None] | None = None):
        self.args = args
        self.with_http = with_http
        self.cpus = plan_cpus(args)
        self.sup = Supervisor(prefix=prefix, ready_timeout=args.ready_timeout, on_failure=on_failure)
        self.topology = Topology.build(self.sup, args.tp_size)
        self.model_info: ModelInfo | None = None
        self.port: int | None = None  # where the ingress listens, once started

    def _spec(self, name: str, actor_class: str, config: msgspec.Struct, inbound: list[ChannelSpec],
              outbound: list[ChannelSpec]) -> ActorSpec:
        return ActorSpec(name=name, actor_class=actor_class, config=msgspec.Raw(msgspec.json.encode(config)),
                         inbound=inbound, outbound=outbound, log_level=self.args.log_level,
                         cpus=self.cpus.get(name, []))

    def worker_spec(self, rank: int) -> ActorSpec:
        from runtime.worker.actor import WorkerActorConfig

        t = self.topology
        return self._spec(f"worker{rank}", WORKER_CLASS, WorkerActorConfig(args=self.args, tp_rank=rank),
                          [t.worker_plans(rank)], [t.worker_to_scheduler] if rank == 0 else [])

    def scheduler_spec(self, model_info: ModelInfo) -> ActorSpec:
        from runtime.scheduler.actor import SchedulerActorConfig

        t = self.topology
        return self._spec("scheduler", SCHEDULER_CLASS, SchedulerActorConfig(args=self.args, model_info=model_info),
                          [t.ingress_to_scheduler, t.worker_to_scheduler],
                          [t.scheduler_to_worker, t.scheduler_to_detokenizer, t.scheduler_to_ingress])

    def detokenizer_spec(self) -> ActorSpec:
        from runtime.detokenizer.actor import DetokenizerConfig

        t = self.topology
        return self._spec("detokenizer", DETOKENIZER_CLASS,
                          DetokenizerConfig(args=self.args, to_ingress=t.detokenizer_to_ingress.name),
                          [t.scheduler_to_detokenizer], [t.detokenizer_to_ingress])

    def ingress_spec(self, model_info: ModelInfo) -> ActorSpec:
        from runtime.ingress.actor import IngressConfig

        t = self.topology
        return self._spec("ingress", INGRESS_CLASS,
                          IngressConfig(args=self.args, model_info=model_info,
                                        to_scheduler=t.ingress_to_scheduler.name),
                          [t.detokenizer_to_ingress, t.scheduler_to_ingress], [t.ingress_to_scheduler])

    def start(self) -> ModelInfo:
        """Start every actor in order; returns rank 0's ModelInfo. On failure every actor is
        stopped and ActorStartError (naming the actor, with its stderr tail) is raised."""
        infos = [self.sup.start(self.worker_spec(rank)) for rank in range(self.args.tp_size)]
        self.model_info = msgspec.msgpack.decode(infos[0], type=ModelInfo)
        log.info("model loaded: %s", msgspec.json.encode(self.model_info).decode())
        self.sup.start(self.scheduler_spec(self.model_info))
        self.sup.start(self.detokenizer_spec())
        if self.with_http:
            from runtime.ingress.actor import IngressInfo

            info = self.sup.start(self.ingress_spec(self.model_info))
            self.port = msgspec.msgpack.decode(info, type=IngressInfo).port
        return self.model_info

    def connect_as_ingress(self) -> tuple[Channel, list[Channel]]:
        """For an in-process ingress (the Engine): the channel to the scheduler, and the channels
        it reads (detokenizer's text, scheduler's replies). The caller closes them."""
        t = self.topology
        to_scheduler = self.sup.connect(t.ingress_to_scheduler, writer=True)
        inbound = [self.sup.connect(t.detokenizer_to_ingress), self.sup.connect(t.scheduler_to_ingress)]
        return to_scheduler, inbound

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
    url = server_url(args.host, deployment.port)
    try:
        reply = warm_up(args, url, timeout=args.ready_timeout, is_embedding=deployment.model_info.is_embedding)
    except (urllib.error.URLError, OSError, ValueError) as err:
        status = deployment.sup.wait(STOP_SETTLE_S)
        if status is not None:  # the run ended meanwhile (a signal, an actor's death): that is why
            return status
        log.error("the warm-up request to %s failed: %s; stopping", url, err)
        deployment.stop()
        return 1
    log.debug("warm-up reply: %s", reply)
    log.info("Ready: serving %s at %s (started in %.1f s)", model_name(args), url, time.monotonic() - started)
    status = deployment.sup.wait()
    if deployment.sup.failure:
        log.error("server stopped: %s", deployment.sup.failure)
    else:
        log.info("server stopped (%s)", "clean" if status == 0 else f"actor exit codes {deployment.sup.exit_codes}")
    return status

