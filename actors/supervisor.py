"""Supervisor: starts actor processes (together or one by one), watches them, and stops them all together.

    sup = Supervisor()                       # run prefix rt<pid>_ for every segment of this run
    infos = sup.start_many([worker_spec, detokenizer_spec])  # all at once; each one's Ready info bytes
    sup.start(scheduler_spec_using(infos[0]))                # later specs may use earlier infos
    sup.handle_signals(grace_s=5.0)          # SIGTERM/SIGINT: graceful stop
    sys.exit(sup.wait())                     # 0 after a graceful stop, 1 if an actor died

Rings: the supervisor creates every ring named in a spec (the first time a segment appears) and
owns its name; actors attach. Each child also gets two private control rings: up (Ready/Failed)
and down (Shutdown, read through the actor's mailbox).

Failure policy (fail fast, everything or nothing): if any actor dies while running, or one fails
to start, the others are stopped in reverse start order (SIGTERM, then SIGKILL), the run's shared
memory is swept, and wait() returns 1. A graceful stop(grace_s) sends Shutdown(grace_s) to every
actor, waits for them to exit, then SIGTERMs and finally SIGKILLs stragglers.

Children die with their parent through PR_SET_PDEATHSIG, which fires when the *thread* that
started them exits: call start() from a thread that lives as long as the run (the main thread).
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec

from actors.channel import Channel
from actors.control import CONTROL_DOWN_TYPE, CONTROL_RING_BYTES, ControlDown, ControlUp, Failed, Ready, Shutdown
from actors.process import ChildProcess, describe_exit
from actors.rings import attach_reader, attach_writer, create_ring
from actors.spec import ActorSpec, BootSpec, ChannelSpec, RingSpec, resolve
from shm import run_prefix, segment_name, sweep
from shm.segment import create_segment, unlink_segment

log = logging.getLogger(__name__)

_ACTOR_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
POLL_WITHOUT_PIDFD_S = 0.2
STDERR_DRAIN_S = 2.0  # at a stop, how long all children together get for their last stderr lines to be copied


def write_boot_segment(name: str, data: bytes) -> None:
    """A child's BootSpec in a 0600 segment it reads and removes at boot (never on argv: `ps` shows argv)."""
    mm = create_segment(name, len(data))
    try:
        mm[:] = data
    finally:
        mm.close()


class ActorStartError(RuntimeError):
    """An actor did not come up: it reported Failed, died, or timed out. Names it and carries its
    stderr tail (and the traceback it reported, if any)."""

    def __init__(self, name: str, reason: str, traceback: str = "", stderr_tail: str = ""):
        parts = [f"actor {name!r} did not start: {reason}"]
        if traceback:
            parts.append(f"--- traceback from {name} ---\n{traceback.rstrip()}")
        if stderr_tail:
            parts.append(f"--- last stderr lines of {name} ---\n{stderr_tail}")
        super().__init__("\n".join(parts))
        self.name = name
        self.reason = reason
        self.stderr_tail = stderr_tail


@dataclass
class _Child:
    spec: ActorSpec
    process: ChildProcess
    control_up: Channel
    control_down: Channel
    ready: bool = False
    returncode: int | None = None
    watched: bool = False


class Supervisor:
    def __init__(
        self,
        prefix: str | None = None,
        ready_timeout: float = 600.0,
        exit_slack_s: float = 5.0,
        term_timeout_s: float = 3.0,
        on_failure: Callable[[str], None] | None = None,
        stderr_sink: TextIO | None = None,
    ):
        """prefix: the run's segment prefix (default rt<this pid>_). exit_slack_s: how long past
        grace_s a stop waits for actors to exit by themselves before SIGTERM; term_timeout_s: how
        long after SIGTERM before SIGKILL. on_failure(reason) runs (on the watcher thread) after
        the teardown that follows an actor's death, e.g. to fail an in-process Engine's requests."""
        self.prefix = prefix or run_prefix()
        self.ready_timeout = ready_timeout
        self.exit_slack_s = exit_slack_s
        self.term_timeout_s = term_timeout_s
        self.on_failure = on_failure
        self.stderr_sink = stderr_sink
        self.exit_codes: dict[str, int | None] = {}  # filled as children exit
        self.failure: str | None = None  # why the run was torn down, if an actor died or failed
        self._children: list[_Child] = []
        self._rings: dict[str, tuple[RingSpec, Any]] = {}  # segment -> (spec, owner handle)
        self._lock = threading.RLock()
        self._state = "running"  # running -> stopping -> stopped
        self._status: int | None = None
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watcher: threading.Thread | None = None
        self._fds_closed = False

    # ------------------------------------------------------------------ specs
    def ring(self, name: str, capacity: int, n_readers: int = 0) -> RingSpec:
        """A RingSpec for a segment of this run, e.g. sup.ring("sched.in", 1 << 20)."""
        return RingSpec(segment_name(self.prefix, name), capacity, n_readers)

    def channel(self, name: str, message_type: str, capacity: int, n_readers: int = 0) -> ChannelSpec:
        """A ChannelSpec whose ring segment is `<prefix><name>`. For a broadcast channel give
        readers their end with `msgspec.structs.replace(spec, reader_index=i)`."""
        return ChannelSpec(name, self.ring(name, capacity, n_readers), message_type)

    def pids(self) -> dict[str, int]:
        """Process id of every actor started so far, by name."""
        with self._lock:
            return {c.spec.name: c.process.pid for c in self._children}

    def connect(self, cs: ChannelSpec, writer: bool = False) -> Channel:
        """Open one end of a channel in this process, for a launcher or Engine that talks to the
        actors itself (creating the ring if no actor declared it yet). The caller closes it."""
        with self._lock:
            self._ensure_ring(cs)
        ring = attach_writer(cs) if writer else attach_reader(cs)
        return Channel(cs.name, ring, resolve(cs.message_type))

    # ------------------------------------------------------------------ start
    def start(self, spec: ActorSpec, timeout: float | None = None, pass_fds: tuple[int, ...] = ()) -> bytes:
        """Start one actor and wait for its Ready; returns its info bytes. Raises ActorStartError
        (after stopping every actor of the run) if it fails, dies or is not ready in time."""
        return self.start_many([spec], timeout, {spec.name: pass_fds})[0]

    def start_many(self, specs: list[ActorSpec], timeout: float | None = None,
                   pass_fds: dict[str, tuple[int, ...]] | None = None) -> list[bytes]:
        """Start every actor at once (their start-ups overlap) and wait until all reported Ready; their
        info bytes in `specs` order. `pass_fds`: descriptors each named actor inherits. Any failure,
        death or timeout stops the whole run and raises ActorStartError naming that actor."""
        timeout = self.ready_timeout if timeout is None else timeout
        pass_fds = pass_fds or {}
        children = []
        with self._lock:
            if self._state != "running":
                names = ", ".join(repr(spec.name) for spec in specs)
                raise RuntimeError(f"cannot start {names}: the supervisor is {self._state} ({self.failure})")
            for spec in specs:
                self._check_new_actor(spec)
                for cs in list(spec.inbound) + list(spec.outbound):
                    self._ensure_ring(cs)
            for spec in specs:
                child = self._spawn(spec, pass_fds.get(spec.name, ()))
                self._children.append(child)
                children.append(child)
                log.info("starting actor %r (pid %d)", spec.name, child.process.pid)
        infos = self._await_ready(children, time.monotonic() + timeout, timeout)
        with self._lock:
            for child in children:
                child.ready = True
            self._ensure_watcher()
        self._wake_watcher()
        return infos

    def _check_new_actor(self, spec: ActorSpec) -> None:
        if not _ACTOR_NAME_RE.match(spec.name):
            raise ValueError(f"actor name {spec.name!r}: use 1-64 characters from [A-Za-z0-9_-]")
        if any(c.spec.name == spec.name for c in self._children):
            raise ValueError(f"an actor named {spec.name!r} was already started")

    def _ensure_ring(self, cs: ChannelSpec) -> None:
        known = self._rings.get(cs.ring.segment)
        if known is None:
            self._rings[cs.ring.segment] = (cs.ring, create_ring(cs.ring))
        elif known[0] != cs.ring:
            raise ValueError(f"channel {cs.name!r}: ring {cs.ring.segment!r} was already declared as {known[0]}")

    def _spawn(self, spec: ActorSpec, pass_fds: tuple[int, ...]) -> _Child:
        up = self.ring(f"ctl.{spec.name}.up", CONTROL_RING_BYTES)
        down = ChannelSpec("control", self.ring(f"ctl.{spec.name}.down", CONTROL_RING_BYTES), CONTROL_DOWN_TYPE)
        up_ring = create_ring(up)
        try:
            down_ring = create_ring(down.ring)
        except BaseException:
            up_ring.unlink()
            raise
        boot = BootSpec(spec, up, down, os.getpid(), list(sys.path))
        boot_segment = segment_name(self.prefix, f"boot.{spec.name}")
        write_boot_segment(boot_segment, msgspec.json.encode(boot))
        process = ChildProcess(spec.name, boot_segment, self.stderr_sink, pass_fds)
        return _Child(
            spec,
            process,
            Channel(f"{spec.name}.control_up", up_ring, ControlUp),
            Channel(f"{spec.name}.control_down", down_ring, ControlDown),
        )

    def _await_ready(self, children: list[_Child], deadline: float, timeout: float) -> list[bytes]:
        infos: dict[str, bytes] = {}
        poll_s = 0.05 / len(children)
        while len(infos) < len(children):
            for child in children:
                if child.spec.name in infos:
                    continue
                msg = child.control_up.get(timeout=poll_s)
                if msg is None and child.process.poll() is not None:
                    msg = child.control_up.try_get()  # it may have reported just before exiting
                    if msg is None:
                        self._fail_start(child, f"its process {describe_exit(child.process.poll())} before "
                                                "reporting Ready")
                match msg:
                    case Ready(info=info):
                        infos[child.spec.name] = info
                        log.info("actor %r is ready", child.spec.name)
                    case Failed(error=error, traceback=tb):
                        child.process.wait(self.term_timeout_s)
                        self._fail_start(child, error, tb)
                if self._state != "running":
                    self._fail_start(child, f"the run is stopping ({self.failure or 'stop requested'})")
                if time.monotonic() > deadline and child.spec.name not in infos:
                    self._fail_start(child, f"no Ready within {timeout:g} s")
        return [infos[child.spec.name] for child in children]

    def _fail_start(self, child: _Child, reason: str, traceback: str = ""):
        name = child.spec.name
        self._teardown(grace_s=0.0, send_shutdown=False, failure=f"actor {name!r} did not start: {reason}")
        raise ActorStartError(name, reason, traceback, child.process.tail())

    # ------------------------------------------------------------------ watch
    def _ensure_watcher(self) -> None:
        if self._watcher is None and self._state == "running":
            self._watcher = threading.Thread(target=self._watch, name="actors-supervisor", daemon=True)
            self._watcher.start()

    def _wake_watcher(self) -> None:
        with self._lock:
            if self._fds_closed:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # already signalled

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd: dict[int, _Child] = {}
        while not self._done.is_set():
            with self._lock:
                children = [c for c in self._children if c.ready and not c.watched]
                polled = [c for c in self._children if c.ready and c.returncode is None and c.process.pidfd is None]
            for child in children:
                child.watched = True
                if child.process.pidfd is not None:
                    by_fd[child.process.pidfd] = child
                    poller.register(child.process.pidfd, select.POLLIN)
            events = poller.poll(POLL_WITHOUT_PIDFD_S * 1000 if polled else None)
            exited: list[_Child] = [c for c in polled if c.process.poll() is not None]
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd in by_fd:
                    poller.unregister(fd)
                    exited.append(by_fd.pop(fd))
            for child in exited:
                self._on_exit(child, child.process.wait())
        self._close_fds()

    def _close_fds(self) -> None:
        """Once the run is over: the pidfds and the wake pipe (by the watcher, or by the teardown
        when no watcher ever started)."""
        with self._lock:
            if self._fds_closed:
                return
            self._fds_closed = True
            for child in self._children:
                child.process.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_exit(self, child: _Child, returncode: int) -> None:
        with self._lock:
            child.returncode = returncode
            self.exit_codes[child.spec.name] = returncode
            unexpected = self._state == "running"
        if not unexpected:
            return
        reason = f"actor {child.spec.name!r} (pid {child.process.pid}) {describe_exit(returncode)}"
        log.error("%s; stopping the other actors", reason)
        self._teardown(grace_s=0.0, send_shutdown=False, failure=reason, notify=True)

    # ------------------------------------------------------------------ stop
    def stop(self, grace_s: float = 0.0) -> int:
        """Graceful stop: Shutdown(grace_s) to every actor (reverse start order), wait up to
        grace_s + exit_slack_s for them to exit, SIGTERM, then SIGKILL. Returns the run's status:
        0 if every actor exited with 0, else 1. Idempotent; a second caller waits for the first."""
        self._teardown(grace_s, send_shutdown=True, failure=None)
        return self.wait()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the run is over (stopped, or torn down after a failure); its status, or
        None on timeout. From the main thread, signal handlers still run while it waits."""
        if not self._done.wait(timeout):
            return None
        return self._status

    def handle_signals(self, grace_s: float, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
        """Install handlers (main thread only) that start a graceful stop(grace_s) on a thread."""

        stop_requested = threading.Event()

        def on_signal(signum, frame):
            if stop_requested.is_set() or self._state != "running":
                log.info("got %s: already stopping", signal.Signals(signum).name)
                return
            stop_requested.set()
            log.info("got %s: stopping the actors (grace %.1f s)", signal.Signals(signum).name, grace_s)
            threading.Thread(target=self.stop, args=(grace_s,), name="actors-stop", daemon=True).start()

        for sig in signals:
            signal.signal(sig, on_signal)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(0.0)

    def _teardown(self, grace_s: float, send_shutdown: bool, failure: str | None, notify: bool = False) -> None:
        """Stop every actor and free the run's shared memory. With `notify`, on_failure(failure) runs
        before wait() returns, so whoever waits sees its effects."""
        with self._lock:
            if self._state != "running":
                first = False
            else:
                first = True
                self._state = "stopping"
                self.failure = failure
                children = list(reversed(self._children))
        if not first:
            self._done.wait()
            return
        try:
            self._stop_children(children, grace_s, send_shutdown)
        finally:
            self._release_shared_memory(children)
            bad = {c.spec.name: c.returncode for c in children if c.returncode != 0}
            if failure is None and bad:
                log.warning("actors that did not exit cleanly: %s", bad)
            with self._lock:
                self._status = 1 if failure is not None or bad else 0
                self._state = "stopped"
                watcher = self._watcher
            if notify and self.on_failure is not None:
                try:
                    self.on_failure(failure)
                except Exception:  # noqa: BLE001 - a failing callback must not leave wait() hanging
                    log.exception("on_failure callback failed")
            self._done.set()
            if watcher is None:
                self._close_fds()
            else:
                self._wake_watcher()

    def _stop_children(self, children: list[_Child], grace_s: float, send_shutdown: bool) -> None:
        if send_shutdown:
            for child in children:
                if child.process.poll() is None:
                    try:
                        child.control_down.put(Shutdown(grace_s=grace_s), timeout=0.5)
                    except Exception as e:  # a wedged child: SIGTERM will follow
                        log.warning("could not send Shutdown to %r: %s", child.spec.name, e)
            self._wait_all(children, time.monotonic() + grace_s + self.exit_slack_s)
        for sig, wait_s in ((signal.SIGTERM, self.term_timeout_s), (signal.SIGKILL, self.term_timeout_s)):
            alive = [c for c in children if c.process.poll() is None]
            if not alive:
                break
            for child in alive:
                log.warning("sending %s to actor %r (pid %d)", sig.name, child.spec.name, child.process.pid)
                child.process.signal(sig)
            self._wait_all(alive, time.monotonic() + wait_s)
        deadline = time.monotonic() + STDERR_DRAIN_S
        for child in children:
            child.returncode = child.process.poll()
            self.exit_codes[child.spec.name] = child.returncode
            child.process.drain_stderr(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _wait_all(children: list[_Child], deadline: float) -> None:
        for child in children:
            child.process.wait(max(0.0, deadline - time.monotonic()))

    def _release_shared_memory(self, children: list[_Child]) -> None:
        with self._lock:
            rings = list(self._rings.values())
            self._rings.clear()
        for spec, ring in rings:
            ring.close()
            unlink_segment(spec.segment)
        # Control rings are only unlinked: a start() on another thread may still be reading its
        # child's; they are unmapped when the Supervisor is dropped.
        for child in children:
            unlink_segment(child.control_up.ring.name)
            unlink_segment(child.control_down.ring.name)
        leftovers = sweep(self.prefix)  # segments the actors made themselves (arenas, ...)
        if leftovers:
            log.debug("swept %d segments of %s", len(leftovers), self.prefix)
