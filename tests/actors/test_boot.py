"""How children are started (issue 11): the spec travels in a 0600 segment, not on argv or in the
environment (ps shows argv to every local user), processes carry readable titles, forbidden
imports stay out, descriptors are inherited on request, and start_many overlaps start-ups."""

from __future__ import annotations

import socket

import msgspec
import psutil
import pytest

from actors.spec import ActorSpec
from actors.supervisor import Supervisor
from shm import list_segments
from tests.actors.test_supervisor import echo_spec
from tests.actors_fixtures import unique_prefix

SECRET = "sk-very-secret-api-key"


@pytest.fixture
def sup():
    supervisor = Supervisor(prefix=unique_prefix(), ready_timeout=60.0, exit_slack_s=2.0, term_timeout_s=2.0)
    yield supervisor
    supervisor.stop(0.0)
    assert list_segments(supervisor.prefix) == []


def probe_spec(sup: Supervisor, name: str, **config) -> ActorSpec:
    return ActorSpec(name, "tests.actors_fixtures:ProbeActor", config=msgspec.Raw(msgspec.json.encode(config)),
                     inbound=[sup.channel(f"{name}.in", "tests.actors_fixtures:ToEcho", 1 << 12)],
                     title=f"runtime: {name}", blocked_imports=["torch"])


def test_the_config_is_in_no_argv_or_environment_and_the_title_is_readable(sup):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    try:
        (info,) = sup.start_many([probe_spec(sup, "probe", secret=SECRET, fd=listener.fileno())],
                                 pass_fds={"probe": (listener.fileno(),)})
    finally:
        listener.close()
    report = msgspec.json.decode(info)
    assert report == {"title": "runtime: probe", "has_fd": True, "torch_blocked": True, "secret_seen": SECRET}
    process = psutil.Process(sup.pids()["probe"])
    assert process.cmdline()[0] == "runtime: probe"
    with open(f"/proc/{process.pid}/cmdline", "rb") as f:
        assert SECRET.encode() not in f.read()
    with open(f"/proc/{process.pid}/environ", "rb") as f:
        assert SECRET.encode() not in f.read()
    # The boot segment was read and removed at boot; only the rings remain.
    assert not list_segments(sup.prefix + "boot.")


def test_a_descriptor_is_inherited_only_when_passed(sup):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    try:
        (info,) = sup.start_many([probe_spec(sup, "nofd", fd=listener.fileno())])
    finally:
        listener.close()
    assert msgspec.json.decode(info)["has_fd"] is False


def test_start_many_overlaps_the_start_ups(sup):
    infos = [msgspec.json.decode(i) for i in sup.start_many([echo_spec(sup, f"slow{i}", start_delay_s=1.0)
                                                             for i in range(3)])]
    # Started one after another, each would be built only after the previous one was ready.
    assert max(i["built_at"] for i in infos) < min(i["ready_at"] for i in infos)
    assert len({i["pid"] for i in infos}) == 3
