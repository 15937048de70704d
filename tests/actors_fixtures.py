"""Actor classes and a launcher script for the actors/ tests (they run in child processes).

`python -m tests.actors_fixtures <prefix or -> <grace_s>` is a tiny launcher: it starts an echo actor and
a pinger under a Supervisor, prints one JSON line (pids, prefix), handles SIGTERM/SIGINT with a
graceful stop, and exits with the supervisor's status after printing the exit codes.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import sys
import time
import uuid

import msgspec

from actors.actor import Actor
from actors.aio import AsyncActor, AsyncMailbox
from actors.spec import ActorSpec
from actors.supervisor import Supervisor
from runtime.messages import Shutdown
from shm import run_prefix


class Ping(msgspec.Struct, tag="ping"):
    n: int
    text: str = ""


class Pong(msgspec.Struct, tag="pong"):
    n: int
    by: str


class Crash(msgspec.Struct, tag="crash"):
    how: str  # "exit3" | "sigkill" | "raise"


class Result(msgspec.Struct, tag="result"):
    count: int
    ok: bool
    detail: str = ""


ToEcho = Ping | Crash
FromEcho = Pong | Result

TO_ECHO = "tests.actors_fixtures:ToEcho"
FROM_ECHO = "tests.actors_fixtures:FromEcho"


def unique_prefix() -> str:
    """A run prefix of this process that no other test uses (sweep-able: rt<pid>_<token>_)."""
    return f"{run_prefix()}{uuid.uuid4().hex[:8]}_"


class EchoConfig(msgspec.Struct, forbid_unknown_fields=True):
    greeting: str = "hi"
    start_delay_s: float = 0.0
    fail_at_start: bool = False
    exit_at_start: int | None = None  # os._exit(code) while building: dies without reporting
    ignore_shutdown: bool = False
    abort_at_exit: bool = False  # an exit-time hook that aborts, as C++ static destructors racing their threads do
    lines_at_shutdown: int = 0  # stderr lines written on Shutdown, just before returning


class EchoActor(Actor):
    """Answers Ping(n, text) with Pong(n, "<name>:<text>") on "from_echo"; Crash makes it die."""

    config_type = EchoConfig

    def __init__(self, context):
        super().__init__(context)
        self.built_at = time.time()
        time.sleep(self.config.start_delay_s)
        if self.config.fail_at_start:
            raise FileNotFoundError("weights not found: /nonexistent/model.gguf")
        if self.config.exit_at_start is not None:
            os._exit(self.config.exit_at_start)
        if self.config.abort_at_exit:
            atexit.register(os.abort)

    def ready_info(self) -> bytes:
        return msgspec.json.encode(
            {"greeting": self.config.greeting, "built_at": self.built_at, "ready_at": time.time(), "pid": os.getpid()}
        )

    def run(self) -> None:
        out = self.ref("from_echo")
        while True:
            match self.receive():
                case Ping(n=n, text=text):
                    out.send(Pong(n, f"{self.name}:{text}"))
                case Crash(how="exit3"):
                    os._exit(3)
                case Crash(how="sigkill"):
                    os.kill(os.getpid(), signal.SIGKILL)
                case Crash(how="raise"):
                    raise RuntimeError("crash requested")
                case Shutdown(grace_s=grace_s):
                    self.log.info("got Shutdown(grace_s=%s)", grace_s)
                    for i in range(self.config.lines_at_shutdown):
                        print(f"{self.name} line {i} " + "x" * 100, file=sys.stderr)
                    if not self.config.ignore_shutdown:
                        return


class ProbeConfig(msgspec.Struct, forbid_unknown_fields=True):
    secret: str = ""
    fd: int = -1  # a descriptor it should have inherited


class ProbeActor(Actor):
    """Reports, as its Ready info, what its process looks like from the inside."""

    config_type = ProbeConfig

    def ready_info(self) -> bytes:
        import setproctitle

        try:
            os.fstat(self.config.fd)
            has_fd = True
        except OSError:
            has_fd = False
        return msgspec.json.encode({"title": setproctitle.getproctitle(), "has_fd": has_fd,
                                    "torch_blocked": "torch" in sys.modules and sys.modules["torch"] is None,
                                    "secret_seen": self.config.secret})

    def run(self) -> None:
        while not isinstance(self.receive(), Shutdown):
            pass


class PingConfig(msgspec.Struct, forbid_unknown_fields=True):
    count: int


class PingActor(Actor):
    """Sends `count` Pings on "to_echo", checks every Pong from its mailbox, then reports a Result on
    "results" and waits for Shutdown."""

    config_type = PingConfig

    def run(self) -> None:
        errors = []
        for n in range(self.config.count):
            self.ref("to_echo").send(Ping(n, f"p{n}"))
            reply = self.receive(timeout=10.0)
            if not isinstance(reply, Pong) or reply.n != n or not reply.by.endswith(f":p{n}"):
                errors.append(f"ping {n}: got {reply!r}")
        self.ref("results").send(Result(self.config.count, not errors, "; ".join(errors[:3])))
        while True:
            match self.receive():
                case Shutdown(grace_s=grace_s):
                    self.log.info("got Shutdown(grace_s=%s)", grace_s)
                    return


class AsyncEchoActor(AsyncActor):
    """Echo on an asyncio loop: Pong.by carries how many 5 ms timer ticks the loop had run."""

    async def main(self) -> None:
        ticks = 0
        out = self.ref("from_echo")

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        def on_message(msg):
            match msg:
                case Ping(n=n):
                    out.send(Pong(n, f"ticks={ticks}"))
                case Shutdown():
                    self.log.info("got Shutdown")
                    mailbox.stop_reading()

        ticker = asyncio.create_task(tick())
        mailbox = AsyncMailbox(self.mailbox, on_message).start()
        await mailbox.finished
        ticker.cancel()


def start_echo_pair(sup, count: int, ring_bytes: int):
    """Start an echo actor and a pinger that sends it `count` pings; returns the channel (opened in
    this process) on which the pinger reports its Result."""
    to_echo = sup.channel("to_echo", TO_ECHO, ring_bytes)
    from_echo = sup.channel("from_echo", FROM_ECHO, ring_bytes)
    results = sup.channel("results", FROM_ECHO, ring_bytes)
    sup.start(ActorSpec("echo", "tests.actors_fixtures:EchoActor", inbound=[to_echo], outbound=[from_echo]))
    config = msgspec.Raw(msgspec.json.encode({"count": count}))
    sup.start(ActorSpec("pinger", "tests.actors_fixtures:PingActor", config=config, inbound=[from_echo],
                        outbound=[to_echo, results]))
    return sup.connect(results)


def launch(prefix: str | None, grace_s: float) -> int:
    logging.basicConfig(level="INFO", stream=sys.stderr)
    sup = Supervisor(prefix=prefix, ready_timeout=30.0)  # None: rt<this pid>_
    result = start_echo_pair(sup, count=20, ring_bytes=1 << 16).get(timeout=30.0)
    sup.handle_signals(grace_s)  # before telling the test we are up: it signals us right after
    pids = sup.pids()
    print(json.dumps({"pids": pids, "prefix": sup.prefix, "pinged": msgspec.to_builtins(result)}), flush=True)
    status = sup.wait()
    print(json.dumps({"exit_codes": sup.exit_codes, "status": status}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(launch(None if sys.argv[1] == "-" else sys.argv[1], float(sys.argv[2])))
