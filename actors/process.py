"""ChildProcess: one `python -m actors.boot` interpreter, its stderr tee and its exit description."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from typing import TextIO

import actors

STDERR_TAIL_LINES = 40


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class ChildProcess:
    """Starts the child in its own session, so a terminal's Ctrl-C reaches only the launcher (which
    then stops the children in order) and not every actor at once. The child's stderr is copied
    line by line to `stderr_sink` by a thread that also keeps the last lines for error messages."""

    def __init__(self, name: str, boot_segment: str, stderr_sink: TextIO | None = None,
                 pass_fds: tuple[int, ...] = ()):
        """`boot_segment`: the shared-memory segment holding the child's BootSpec (argv carries only its name);
        `pass_fds`: file descriptors the child inherits (a listening socket)."""
        self.name = name
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(actors.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._sink = stderr_sink
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.boot", boot_segment],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        try:
            self.pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel or sandbox): the watcher polls instead
            self.pidfd = None
        self._tee = threading.Thread(target=self._copy_stderr, name=f"stderr-{self.name}", daemon=True)
        self._tee.start()

    def _copy_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            self.stderr_tail.append(line.rstrip("\n"))
            sink = self._sink or sys.stderr
            try:
                sink.write(line)
                sink.flush()
            except (ValueError, OSError):  # the sink was closed (interpreter exit): keep draining
                pass
        self.proc.stderr.close()

    def tail(self, wait_s: float = 1.0) -> str:
        """The child's last stderr lines (waits briefly for the tee to reach the end if it exited)."""
        self.drain_stderr(wait_s)
        return "\n".join(self.stderr_tail)

    def drain_stderr(self, wait_s: float) -> None:
        """If the child exited, wait up to wait_s for its last stderr lines to reach the sink (a child that ends
        with os._exit is gone before the tee has copied what it wrote last)."""
        if self.proc.poll() is not None:
            self._tee.join(wait_s)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
