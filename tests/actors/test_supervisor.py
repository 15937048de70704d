"""Supervisor with real child processes: start order and Ready info, start failures, crashes,
graceful and forced stops; every test checks that the run's shared memory is gone afterwards."""

from __future__ import annotations

import io
import logging
import time

import msgspec
import psutil
import pytest

from actors.spec import ActorSpec
from actors.supervisor import ActorStartError, Supervisor
from shm import list_segments
from tests.actors_fixtures import FROM_ECHO, TO_ECHO, Crash, Ping, Pong, Result, start_echo_pair, unique_prefix

ECHO = "tests.actors_fixtures:EchoActor"


@pytest.fixture
def sup():
    supervisor = Supervisor(prefix=unique_prefix(), ready_timeout=30.0, exit_slack_s=2.0, term_timeout_s=2.0)
    yield supervisor
    supervisor.stop(0.0)
    assert list_segments(supervisor.prefix) == []


def echo_spec(sup: Supervisor, name: str, **config) -> ActorSpec:
    return ActorSpec(
        name,
        ECHO,
        config=msgspec.Raw(msgspec.json.encode(config)),
        inbound=[sup.channel(f"{name}.in", TO_ECHO, 1 << 16)],
        outbound=[msgspec.structs.replace(sup.channel(f"{name}.out", FROM_ECHO, 1 << 16), name="from_echo")],
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_echo_pair_exchanges_typed_messages_over_rings(sup):
    results = start_echo_pair(sup, count=300, ring_bytes=1 << 12)  # small rings: frames wrap around many times
    result = results.get(timeout=20.0)
    assert result == Result(300, True, "")
    assert sup.stop(1.0) == 0
    assert sup.exit_codes == {"echo": 0, "pinger": 0}


def test_start_is_stepwise_and_returns_each_ready_info(sup):
    first = msgspec.json.decode(sup.start(echo_spec(sup, "first", greeting="one")))
    # the launcher builds a later actor's config from an earlier actor's Ready info
    second = msgspec.json.decode(sup.start(echo_spec(sup, "second", greeting=first["greeting"] + "+two")))
    assert first["greeting"] == "one" and second["greeting"] == "one+two"
    assert second["built_at"] > first["ready_at"]  # the second process was built after the first was ready
    assert sup.pids() == {"first": first["pid"], "second": second["pid"]}

    tx = sup.connect(sup.channel("second.in", TO_ECHO, 1 << 16), writer=True)
    rx = sup.connect(sup.channel("second.out", FROM_ECHO, 1 << 16))
    tx.put(Ping(5, "x"))
    assert rx.get(timeout=10.0) == Pong(5, "second:x")
    assert sup.stop(0.5) == 0


def test_actor_failing_at_start_is_named_and_the_run_is_torn_down(sup):
    sup.start(echo_spec(sup, "good"))
    good_pid = sup.pids()["good"]
    with pytest.raises(ActorStartError) as info:
        sup.start(echo_spec(sup, "broken", fail_at_start=True))
    message = str(info.value)
    assert info.value.name == "broken"
    assert "actor 'broken' did not start: FileNotFoundError: weights not found" in message
    assert "--- traceback from broken ---" in message and "in __init__" in message
    assert "actor 'broken' failed to start" in info.value.stderr_tail  # the child's own log line
    assert sup.wait(timeout=5.0) == 1
    assert gone(good_pid) and gone(sup.pids()["broken"])
    assert list_segments(sup.prefix) == []
    with pytest.raises(RuntimeError, match="stopped"):
        sup.start(echo_spec(sup, "late"))


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"exit_at_start": 7}, "exited with code 7 before reporting Ready"),
        ({"greeting": 42}, "invalid config: Expected `str`, got `int` - at `$.greeting`"),
        ({"start_delay_s": 30.0}, "no Ready within 1 s"),
    ],
    ids=["dies-silently", "bad-config", "too-slow"],
)
def test_start_failures_name_the_actor_and_the_cause(sup, config, expected):
    with pytest.raises(ActorStartError, match="actor 'echo' did not start") as info:
        sup.start(echo_spec(sup, "echo", **config), timeout=1.0)
    assert expected in str(info.value)
    assert sup.wait(timeout=5.0) == 1
    assert gone(sup.pids()["echo"])


def test_unknown_actor_class_is_reported(sup):
    spec = msgspec.structs.replace(echo_spec(sup, "echo"), actor_class="tests.actors_fixtures:NoSuchActor")
    with pytest.raises(ActorStartError, match="has no attribute 'NoSuchActor'"):
        sup.start(spec)


@pytest.mark.parametrize(
    "how, expected",
    [("sigkill", "was killed by signal SIGKILL"), ("exit3", "exited with code 3"), ("raise", "exited with code 1")],
)
def test_crash_stops_the_others_logs_why_and_cleans_shared_memory(sup, caplog, how, expected):
    failures = []
    sup.on_failure = failures.append
    sup.start(echo_spec(sup, "first"))
    sup.start(echo_spec(sup, "victim"))
    sup.start(echo_spec(sup, "last"))
    pids = sup.pids()
    with caplog.at_level(logging.ERROR, logger="actors.supervisor"):
        sup.connect(sup.channel("victim.in", TO_ECHO, 1 << 16), writer=True).put(Crash(how))
        assert sup.wait(timeout=15.0) == 1
    reason = f"actor 'victim' (pid {pids['victim']}) {expected}"
    assert sup.failure == reason and failures == [reason]
    assert any(reason in r.getMessage() for r in caplog.records)
    assert all(gone(pid) for pid in pids.values())
    assert sup.exit_codes["first"] is not None and sup.exit_codes["last"] is not None
    assert list_segments(sup.prefix) == []


def test_a_clean_stop_exits_0_even_if_exit_time_teardown_would_abort(sup):
    """After run() returns the child ends with os._exit: interpreter and library teardown (atexit, C++ static
    destructors) cannot turn a drained, closed actor into SIGABRT."""
    sup.start(echo_spec(sup, "aborter", abort_at_exit=True))
    assert sup.stop(1.0) == 0
    assert sup.exit_codes == {"aborter": 0}


def test_a_stop_returns_only_after_the_actors_last_stderr_lines_are_copied(sup):
    """The launcher exits right after stop(): whatever an actor wrote just before exiting must be in the sink by
    then, not still in the pipe behind a daemon tee thread (a slow sink, as a terminal or a busy disk can be,
    leaves most of a pipe's worth behind when the actor exits)."""

    class SlowSink(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(0.001)
            return super().write(text)

    sup.stderr_sink = sink = SlowSink()
    sup.start(echo_spec(sup, "chatty", lines_at_shutdown=1000))
    assert sup.stop(1.0) == 0
    assert "chatty line 999 " in sink.getvalue()


def test_stop_escalates_to_sigterm_for_an_actor_that_ignores_shutdown(sup):
    sup.exit_slack_s = 0.3
    sup.start(echo_spec(sup, "polite"))
    sup.start(echo_spec(sup, "stubborn", ignore_shutdown=True))
    assert sup.stop(0.1) == 1
    assert sup.exit_codes == {"polite": 0, "stubborn": -15}
    assert sup.stop(0.1) == 1  # idempotent
