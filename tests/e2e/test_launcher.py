"""The launcher's wiring (channel names and types each actor expects, the broadcast ring, configs
that decode into each actor's config Struct, cores from --cpu-affinity) and its failure paths as a
user sees them (`python -m runtime` with a bad flag or a missing model)."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import psutil
import pytest

from actors.spec import resolve
from runtime.launcher import Deployment, server_url
from runtime.messages import ModelInfo
from runtime.scheduler import actor as scheduler
from runtime.server_args import ServerArgs
from runtime.worker import actor as worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_INFO = ModelInfo(architecture="LlamaForCausalLM", vocab_size=100, context_length=64, eos_token_ids=[2],
                       max_total_tokens=1024, max_running_requests=4, dtype="float32", device="cpu")


@pytest.fixture
def deployment():
    d = Deployment(ServerArgs(tp_size=2, cpu_affinity="off"), with_http=True)
    yield d
    d.stop()


def config_of(spec):
    return msgspec.json.decode(spec.config, type=resolve(spec.actor_class).config_type)


def test_every_actor_gets_the_channels_it_reads_and_writes(deployment):
    w0, w1 = deployment.worker_spec(0), deployment.worker_spec(1)
    sched = deployment.scheduler_spec(MODEL_INFO)
    detok = deployment.detokenizer_spec()
    ingr = deployment.ingress_spec(MODEL_INFO)

    # Each actor finds its outbound channels by these names.
    assert [c.name for c in w0.outbound] == [worker.TO_SCHEDULER] and w1.outbound == []
    assert {c.name for c in sched.outbound} == {scheduler.TO_WORKERS, scheduler.TO_DETOKENIZER, scheduler.TO_INGRESS}
    assert [c.name for c in detok.outbound] == [config_of(detok).to_ingress]
    assert [c.name for c in ingr.outbound] == config_of(ingr).to_schedulers

    # Every channel has exactly one writer and its reader(s); plans are broadcast to both ranks.
    specs = [w0, w1, sched, detok, ingr]
    writers = [c.ring.segment for s in specs for c in s.outbound]
    assert len(writers) == len(set(writers))
    readers = {c.ring.segment for s in specs for c in s.inbound}
    assert readers == set(writers)
    plans = [c for s in (w0, w1) for c in s.inbound]
    assert {c.ring.segment for c in plans} == {next(c.ring.segment for c in sched.outbound
                                                   if c.name == scheduler.TO_WORKERS)}
    assert [c.reader_index for c in plans] == [0, 1] and plans[0].ring.n_readers == 2

    # Writer and reader of each ring agree on the message union, which exists in runtime.messages.
    types: dict[str, set[str]] = {}
    for s in specs:
        for c in s.inbound + s.outbound:
            types.setdefault(c.ring.segment, set()).add(c.message_type)
            resolve(c.message_type)
    assert all(len(t) == 1 for t in types.values()), types


def test_configs_decode_into_each_actor_config(deployment):
    assert config_of(deployment.worker_spec(1)).tp_rank == 1
    assert config_of(deployment.scheduler_spec(MODEL_INFO)).model_info == MODEL_INFO
    assert config_of(deployment.detokenizer_spec()).args.tp_size == 2
    assert config_of(deployment.ingress_spec(MODEL_INFO)).model_info.vocab_size == 100
    for spec in (deployment.worker_spec(0), deployment.scheduler_spec(MODEL_INFO)):
        assert spec.log_level == "info" and spec.cpus == []


def test_explicit_cpu_affinity_reaches_the_specs():
    core = sorted(os.sched_getaffinity(0))[0]
    d = Deployment(ServerArgs(cpu_affinity=f"scheduler={core};worker0={core}"), with_http=False)
    try:
        assert d.scheduler_spec(MODEL_INFO).cpus == [core] and d.worker_spec(0).cpus == [core]
        assert d.detokenizer_spec().cpus == []
    finally:
        d.stop()


def test_server_url_for_wildcard_and_ipv6_hosts():
    assert server_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert server_url("::1", 8000) == "http://[::1]:8000"


def run_launcher(*flags: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "runtime", *flags], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def test_bad_cpu_affinity_fails_before_starting_anything():
    out = run_launcher("--cpu-affinity", "sheduler=0")
    assert out.returncode == 2
    assert "--cpu-affinity" in out.stderr and "sheduler" in out.stderr


def test_bad_flag_value_is_refused_by_the_parser():
    out = run_launcher("--schedule-policy", "random")
    assert out.returncode == 2 and "--schedule-policy" in out.stderr


def test_missing_model_names_the_actor_and_the_path_and_leaves_nothing_behind():
    before = set(os.listdir("/dev/shm"))
    out = run_launcher("--model-path", "/nonexistent/model.gguf", "--port", "1")
    assert out.returncode == 1
    assert "worker0" in out.stderr and "/nonexistent/model.gguf" in out.stderr
    leftover = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("rt")
                and not psutil.pid_exists(int(n[2:].split("_")[0]))]
    assert not leftover
