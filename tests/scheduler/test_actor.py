"""The scheduler actor's loop over real shared-memory rings: the test plays the ingress and the
detokenizer, a thread plays worker rank 0 with the worker double. Covers the overlap loop,
rejections, flush and server info round trips, graceful shutdown, and the watchdog."""

import itertools
import threading
import time

import msgspec
import pytest

from actors.actor import ActorContext, ActorRef
from actors.channel import Channel
from actors.mailbox import Mailbox
from runtime.messages import (
    BatchPlan,
    EngineReady,
    FlushCacheReply,
    FlushCacheRequest,
    IngressToScheduler,
    ModelInfo,
    RequestRejected,
    SchedulerToDetokenizer,
    SchedulerToIngress,
    SchedulerToWorker,
    ServerInfoReply,
    ServerInfoRequest,
    Shutdown,
    TokenUpdates,
    WorkerToScheduler,
)
from runtime.scheduler.actor import (
    TO_DETOKENIZER,
    TO_INGRESS,
    TO_WORKERS,
    SchedulerActor,
    SchedulerActorConfig,
)
from runtime.server_args import ServerArgs
from shm import BroadcastRing, Heartbeats, Ring, run_prefix, segment_name
from shm.segment import unlink_segment
from tests.scheduler_fixtures import EOS, FakeRunner, make_request, reference_generate

_names = itertools.count()
TOTAL, ROWS, CONTEXT = 256, 4, 128


class Harness:
    def __init__(self, args: ServerArgs, answer: bool = True, heartbeat_segment: str = ""):
        prefix = run_prefix()
        tag = f"schedtest{next(_names)}"
        self.rings = []

        def ring(name, n_readers=0):
            seg = segment_name(prefix, tag, name)
            r = BroadcastRing.create(seg, 1 << 20, n_readers) if n_readers else Ring.create(seg, 1 << 20)
            self.rings.append(r)
            return seg

        segs = {n: ring(n) for n in ("in", "results", "detok", "ingress")}
        segs["plans"] = ring("plans", n_readers=1)
        # the test's ends
        self.to_scheduler = Channel("in", Ring.attach(segs["in"]), IngressToScheduler)
        self.detok = Channel("detok", Ring.attach(segs["detok"]), SchedulerToDetokenizer)
        self.ingress = Channel("ingress", Ring.attach(segs["ingress"]), SchedulerToIngress)
        self.plans = Channel("plans", BroadcastRing.attach(segs["plans"], 0), SchedulerToWorker)
        self.results = Channel("results", Ring.attach(segs["results"]), WorkerToScheduler)
        # the actor's ends
        mailbox = Mailbox([Channel("in", Ring.attach(segs["in"]), IngressToScheduler),
                           Channel("results", Ring.attach(segs["results"]), WorkerToScheduler)])
        refs = {TO_WORKERS: ActorRef(Channel(TO_WORKERS, BroadcastRing.attach(segs["plans"], 0), SchedulerToWorker)),
                TO_DETOKENIZER: ActorRef(Channel(TO_DETOKENIZER, Ring.attach(segs["detok"]), SchedulerToDetokenizer)),
                TO_INGRESS: ActorRef(Channel(TO_INGRESS, Ring.attach(segs["ingress"]), SchedulerToIngress))}
        info = ModelInfo(architecture="double", vocab_size=64, context_length=CONTEXT, eos_token_ids=[EOS],
                         max_total_tokens=TOTAL, max_running_requests=ROWS, dtype="float32", device="cpu")
        config = msgspec.json.decode(msgspec.json.encode(SchedulerActorConfig(args=args, model_info=info,
                                                                         heartbeat_segment=heartbeat_segment)),
                                     type=SchedulerActorConfig)
        self.actor = SchedulerActor(ActorContext("scheduler", config, mailbox, refs))
        self.error: BaseException | None = None
        self.worker_plans: list[BatchPlan] = []
        self.worker_got_shutdown = threading.Event()
        self.stop_worker = threading.Event()
        self.answering = threading.Event()  # the fake worker answers plans (set: from the start, or later)
        self.actor_thread = threading.Thread(target=self._run_actor, daemon=True)
        self.worker_thread = threading.Thread(target=self._run_worker, args=(answer,), daemon=True)
        self.actor_thread.start()
        self.worker_thread.start()
        assert self.ingress.get(timeout=10) == EngineReady(info)  # the scheduler's first word to the ingress

    def _run_actor(self):
        try:
            self.actor.run()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.error = e

    def _run_worker(self, answer):
        runner = FakeRunner(TOTAL, ROWS, CONTEXT)
        if answer:
            self.answering.set()
        answered = 0
        while not self.stop_worker.is_set():
            msg = self.plans.get(timeout=0.1)
            if isinstance(msg, Shutdown):
                self.worker_got_shutdown.set()
                return
            if msg is not None:
                self.worker_plans.append(msg)
            while self.answering.is_set() and answered < len(self.worker_plans):  # in order, the backlog first
                self.results.put(runner.step(self.worker_plans[answered]))
                answered += 1

    def collect(self, rids, timeout=20.0):
        outcomes = {rid: [] for rid in rids}
        finish = {}
        deadline = time.monotonic() + timeout
        while len(finish) < len(rids):
            assert time.monotonic() < deadline, f"timed out; finished so far: {sorted(finish)}"
            msg = self.detok.get(timeout=0.5)
            if isinstance(msg, TokenUpdates):
                for u in msg.updates:
                    outcomes[u.rid].extend(u.new_token_ids)
                    if u.finish is not None:
                        finish[u.rid] = u
        return outcomes, finish

    def close(self):
        self.to_scheduler.put(Shutdown(grace_s=0.0))
        self.actor_thread.join(10)
        if self.error is None:
            self.worker_got_shutdown.wait(2)
        self.stop_worker.set()
        self.worker_thread.join(10)
        for ch in (self.to_scheduler, self.detok, self.ingress, self.plans, self.results):
            ch.close()
        self.actor.close()
        for r in self.rings:
            r.close()
            r.unlink()


@pytest.mark.parametrize("overlap", [True, False])
def test_actor_serves_requests_over_rings(overlap):
    args = ServerArgs(skip_tokenizer_init=True, disable_overlap_schedule=not overlap, chunked_prefill_size=16,
                      decode_log_interval=5)
    h = Harness(args)
    try:
        reqs = [make_request(f"r{i}", [1 + i, 2, 3, 4, 5] * (i + 1), 12, stream=i % 2 == 0) for i in range(6)]
        reqs.append(make_request("too-long", [1] * CONTEXT, 4))
        for req in reqs:
            h.to_scheduler.put(req)
        rejected = h.ingress.get(timeout=10)
        assert isinstance(rejected, RequestRejected) and rejected.rid == "too-long" and rejected.status == 400
        outcomes, finish = h.collect([r.rid for r in reqs[:-1]])
        for req in reqs[:-1]:
            assert outcomes[req.rid] == reference_generate(req.input_ids, req.sampling, CONTEXT)
        if overlap:  # batch N+1 went out before batch N's result was processed
            assert any(p.input_ids and min(p.input_ids) < 0 for p in h.worker_plans)
        else:
            assert all(min(p.input_ids) >= 0 for p in h.worker_plans)

        h.to_scheduler.put(ServerInfoRequest(token=7))
        reply = h.ingress.get(timeout=10)
        assert isinstance(reply, ServerInfoReply) and reply.token == 7
        info = {k: msgspec.msgpack.decode(v) for k, v in reply.info.items()}
        assert info["running"] == 0 and info["max_total_tokens"] == TOTAL and info["cached_tokens"] > 0
        h.to_scheduler.put(FlushCacheRequest(token=8))
        reply = h.ingress.get(timeout=10)
        assert reply == FlushCacheReply(token=8, ok=True, message="")
        h.actor.core.check_invariants()
    finally:
        h.close()
    assert h.error is None
    assert h.worker_got_shutdown.is_set()
    assert isinstance(h.detok.ring, Ring)


def test_graceful_shutdown_finishes_running_and_refuses_new():
    h = Harness(ServerArgs(skip_tokenizer_init=True))
    try:
        h.to_scheduler.put(make_request("long", [1, 2, 3], 40, ignore_eos=True))
        time.sleep(0.2)
        h.to_scheduler.put(Shutdown(grace_s=30.0))
        h.to_scheduler.put(make_request("late", [1, 2, 3], 4))
        rejected = h.ingress.get(timeout=10)
        assert isinstance(rejected, RequestRejected) and rejected.status == 503
        outcomes, finish = h.collect(["long"])
        assert finish["long"].finish.type == "length" and len(outcomes["long"]) == 40
        h.actor_thread.join(10)
        assert not h.actor_thread.is_alive() and h.error is None
        assert isinstance(h.detok.get(timeout=5), Shutdown)
    finally:
        h.close()


def test_a_hung_worker_makes_health_fail_and_health_recovers_when_it_answers(caplog):
    """The watchdog no longer kills the server: /health says what is wrong while it lasts."""
    from runtime.ingress.health import HealthCheck

    segment = segment_name(run_prefix(), f"beats{next(_names)}")
    beats = Heartbeats.create(segment, ["scheduler"])
    h = Harness(ServerArgs(skip_tokenizer_init=True, watchdog_timeout=0.5), answer=False, heartbeat_segment=segment)
    health = HealthCheck(segment, watchdog_timeout=0.5)
    try:
        assert health() is None
        h.to_scheduler.put(make_request("stuck", [1, 2, 3], 4))
        deadline = time.monotonic() + 10
        while health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        reason = health()
        assert reason is not None and "batch 0 has been on the workers" in reason and "--watchdog-timeout" in reason
        assert h.actor_thread.is_alive() and h.error is None
        h.answering.set()  # the device comes back
        deadline = time.monotonic() + 10
        while health() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health() is None
    finally:
        h.close()
        health.close()
        beats.close()
        unlink_segment(segment)
    assert h.error is None


def test_the_queue_is_bounded_with_429():
    h = Harness(ServerArgs(skip_tokenizer_init=True, max_queued_requests=2), answer=False)
    try:
        for i in range(ROWS + 3):  # the rows fill (they wait on the silent worker), then the queue
            h.to_scheduler.put(make_request(f"r{i}", [1, 2, 3], 4))
            time.sleep(0.05)
        rejected = h.ingress.get(timeout=10)
        assert isinstance(rejected, RequestRejected) and rejected.status == 429
        assert "--max-queued-requests 2" in rejected.message
    finally:
        h.close()


def test_worker_actor_answers_errors_and_keeps_serving(tmp_path):
    """The worker actor over real rings with a tiny model: a bad plan gets a WorkerError naming its
    batch, the next plan still gets its BatchResult, Shutdown(0) ends the loop. Ready info is the
    msgpack ModelInfo."""
    from runtime.messages import BatchResult, NewRow, SamplingParams, WorkerError, WorkerReady
    from runtime.worker.actor import TO_SCHEDULER, WorkerActor, WorkerActorConfig, decode_model_info
    from tests.model_fixtures import save_tiny_model

    save_tiny_model("LlamaForCausalLM", str(tmp_path))
    prefix, tag = run_prefix(), f"workertest{next(_names)}"
    plans_seg, results_seg = segment_name(prefix, tag, "plans"), segment_name(prefix, tag, "results")
    rings = [BroadcastRing.create(plans_seg, 1 << 20, 1), Ring.create(results_seg, 1 << 20)]
    to_worker = Channel("plans", BroadcastRing.attach(plans_seg, 0), SchedulerToWorker)
    results = Channel("results", Ring.attach(results_seg), WorkerToScheduler)
    args = ServerArgs(model_path=str(tmp_path), device="cpu", max_total_tokens=64, max_running_requests=2)
    mailbox = Mailbox([Channel("plans", BroadcastRing.attach(plans_seg, 0), SchedulerToWorker)])
    refs = {TO_SCHEDULER: ActorRef(Channel(TO_SCHEDULER, Ring.attach(results_seg), WorkerToScheduler))}
    actor = WorkerActor(ActorContext("worker0", WorkerActorConfig(args=args), mailbox, refs))
    thread = threading.Thread(target=actor.run, daemon=True)
    try:
        info = decode_model_info(actor.ready_info())
        assert info.max_total_tokens == 64 and info.max_running_requests == 2
        thread.start()
        greedy = SamplingParams(temperature=0.0)
        bad = BatchPlan(batch_id=0, rows=[5], prefix_lens=[0], extend_lens=[3], input_ids=[4, 5, 6],
                        out_slots=[1, 2, 3], sample=[True], future_slots=[0])
        good = BatchPlan(batch_id=1, rows=[0], prefix_lens=[0], extend_lens=[3], input_ids=[4, 5, 6],
                         out_slots=[1, 2, 3], sample=[True], future_slots=[0],
                         new_rows=[NewRow(row=0, prefix_slots=[], sampling=greedy)])
        to_worker.put(bad)
        to_worker.put(good)
        assert results.get(timeout=30) == WorkerReady(info)  # rank 0 first tells the scheduler the model
        error = results.get(timeout=30)
        assert isinstance(error, WorkerError) and error.batch_id == 0 and "row 5" in error.message
        result = results.get(timeout=30)
        assert isinstance(result, BatchResult) and result.batch_id == 1 and len(result.next_token_ids) == 1
        to_worker.put(Shutdown(grace_s=0.0))
        thread.join(10)
        assert not thread.is_alive()
    finally:
        for ch in (to_worker, results):
            ch.close()
        actor.close()
        for r in rings:
            r.close()
            r.unlink()
