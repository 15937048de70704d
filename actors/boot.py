"""Child entry point: `python -m actors.boot '<BootSpec JSON>'` turns a fresh interpreter into an actor.

Steps: die with the parent (PR_SET_PDEATHSIG=SIGKILL, then check the parent is still the one that
started us, closing the race where it died before prctl), take the parent's sys.path, name the
process, configure logging with the actor's name, pin cores, build the actor, report Ready (with
the actor's info bytes) or Failed (error and traceback) on the control ring, then run it.
Exit status: 0 when run() returns, 1 when building or running the actor raised, 2 for a bad spec.
"""

from __future__ import annotations

import ctypes
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


def set_process_title(name: str) -> None:
    try:
        import setproctitle  # optional dependency
    except ImportError:
        return
    setproctitle.setproctitle(f"actors.boot {name}")  # keeps "actors.boot" findable in ps/psutil


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
        print("usage: python -m actors.boot '<BootSpec JSON>'", file=sys.stderr)
        return 2
    try:
        boot = msgspec.json.decode(argv[1], type=BootSpec)
    except msgspec.DecodeError as e:
        print(f"actors.boot: invalid BootSpec: {e}", file=sys.stderr)
        return 2
    die_with_parent(boot.parent_pid)
    sys.path[:0] = [p for p in boot.sys_path if p not in sys.path]
    spec = boot.actor
    set_process_title(spec.name)
    configure_logging(spec.name, spec.log_level)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
