"""Child entry point: `python -m actors.boot <boot segment>` turns a fresh interpreter into an actor.

Steps: read the BootSpec JSON from the 0600 shared-memory segment named on the command line and
remove the segment (the spec may hold secrets: it never appears in argv or the environment), die
with the parent (PR_SET_PDEATHSIG=SIGKILL, then check the parent is still the one that started us,
closing the race where it died before prctl), take the parent's sys.path, set the process title,
block the imports the spec forbids, configure logging with the actor's name, pin cores, build the
actor, report Ready (with the actor's info bytes) or Failed (error and traceback) on the control
ring, then run it.
Exit status: 0 when run() returns, 1 when building or running the actor raised, 2 for a bad spec; the process ends
with os._exit (exit_now) once the actor is closed.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import traceback

import msgspec

PR_SET_PDEATHSIG = 1
READY_SEND_TIMEOUT_S = 10.0


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def set_process_title(title: str) -> None:
    """What ps and top show instead of the command line (setproctitle rewrites argv's memory)."""
    import setproctitle

    setproctitle.setproctitle(title)


def read_boot_segment(name: str) -> bytes:
    """The BootSpec JSON, and the segment gone: nobody else may read it later."""
    from shm.segment import attach_segment, unlink_segment

    mm = attach_segment(name)
    try:
        return bytes(mm)
    finally:
        mm.close()
        unlink_segment(name)


def block_imports(modules: list[str]) -> None:
    """`import torch` raises ImportError and importlib.util.find_spec("torch") is None, so libraries that
    import it only when present (transformers) leave it out."""
    for module in modules:
        sys.modules[module] = None


def configure_logging(name: str, level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s [{name} %(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def main(argv: list[str]) -> int:
    from actors.spec import BootSpec

    if len(argv) != 2:
        print("usage: python -m actors.boot <boot segment name>", file=sys.stderr)
        return 2
    try:
        boot = msgspec.json.decode(read_boot_segment(argv[1]), type=BootSpec)
    except Exception as e:  # a missing segment or a bad spec
        print(f"actors.boot: cannot read the BootSpec from {argv[1]!r}: {e}", file=sys.stderr)
        return 2
    die_with_parent(boot.parent_pid)
    sys.path[:0] = [p for p in boot.sys_path if p not in sys.path]
    spec = boot.actor
    set_process_title(spec.title or f"actors.boot {spec.name}")
    block_imports(spec.blocked_imports)
    configure_logging(spec.name, spec.log_level)
    faulthandler.enable(all_threads=True)  # a crash (SIGSEGV, SIGABRT, ...) prints every thread's Python stack
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)

    from actors.actor import Actor, open_context
    from actors.channel import Channel
    from actors.control import ControlUp, Failed, Ready
    from shm import Ring

    log = logging.getLogger(__name__)
    control_up = Channel(f"{spec.name}.control_up", Ring.attach(boot.control_up.segment), ControlUp)
    try:
        try:
            from actors.spec import resolve

            actor_class = resolve(spec.actor_class)
            if not (isinstance(actor_class, type) and issubclass(actor_class, Actor)):
                raise TypeError(f"{spec.actor_class!r} is not a subclass of actors.actor.Actor")
            actor = actor_class(open_context(spec, actor_class.config_type, boot.control_down))
            info = actor.ready_info()
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            log.error("actor %r failed to start: %s", spec.name, error)
            control_up.put(Failed(spec.name, error, traceback.format_exc()), READY_SEND_TIMEOUT_S)
            return 1
        control_up.put(Ready(spec.name, bytes(info)), READY_SEND_TIMEOUT_S)
        try:
            actor.run()
        except Exception:
            log.exception("actor %r crashed", spec.name)
            return 1
        finally:
            actor.close()
        log.debug("actor %r exited", spec.name)
        return 0
    finally:
        control_up.close()
        logging.shutdown()


def exit_now(status: int) -> None:
    """End the child without the interpreter's and the C libraries' exit-time teardown: the actor has answered and
    closed everything already, and a C++ library's static destructors racing its own pool threads (seen as
    `terminate called without an active exception` after a clean drain) must not turn a clean stop into SIGABRT."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main(sys.argv))
