"""The ingress actor: the HTTP server (runtime.ingress.api) over a Frontend, on uvloop.

Start-up, overlapped with the model's loading: take the listening socket first (inherited from the
launcher, which bound it before starting anything; or bound here, naming --port if it is busy),
load the tokenizer, then wait for the scheduler's EngineReady (the model facts requests are
checked against) unless the config carries them. Connections made meanwhile wait in the kernel's
backlog. Ready carries an IngressInfo with the real port (useful with --port 0).

It also opens the durable store (--storage-dir) while being built, so an unusable folder fails the start, and runs
the BatchRunner of /v1/batches, which resumes the batches a previous server left unfinished.

Mailbox: SchedulerToIngress and DetokenizerToIngress channels plus the control channel.
Shutdown(grace_s), the graceful drain: the batches stop where they are (the next server resumes them), new requests
get 503 with `Connection: close` (the socket keeps listening, so clients see a clear refusal), requests in progress
get grace_s seconds to finish, then every one still running is answered 503 (or an SSE error event), and the actor
exits. SIGTERM (the supervisor tearing the run down after another actor died, or a stop that ran late): every request
in progress is answered 503 at once, then the actor exits."""

from __future__ import annotations

import asyncio
import gc
import signal
import time

import msgspec

from actors.aio import AsyncActor, AsyncMailbox
from httpd import ServerConfig
from httpd.listen import ListenError, adopt_listener, open_listener
from runtime.ingress.api.app import create_server
from runtime.ingress.api.batch_runner import BatchRunner
from runtime.ingress.frontend import Frontend
from runtime.ingress.store import Store
from runtime.ingress.store.responses import ResponseStore
from runtime.messages import EngineReady, ModelInfo, Shutdown
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer
from shm import Arena

FINAL_ANSWERS_S = 2.0  # after the drain: time for the last answers (503s) to be written
DRAIN_POLL_S = 0.05
MULTIPART_SLACK_BYTES = 1 << 20


class IngressConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    model_info: ModelInfo | None = None  # None: wait for every scheduler's EngineReady
    # names of the outbound channels in the ActorSpec: one per data-parallel replica's scheduler
    to_schedulers: list[str] = msgspec.field(default_factory=lambda: ["ingress_to_scheduler"])
    listen_fd: int = -1  # a listening socket inherited from the launcher; -1: bind args.host:args.port here
    heartbeat_segment: str = ""  # the run's Heartbeats segment, read by /health ("": no heartbeat checks)
    # the image arenas, one per replica (a vision language model); none: the model takes no images
    image_arenas: list[str] = []


class IngressInfo(msgspec.Struct):
    """The ingress's Ready info (msgpack): where it listens."""

    host: str
    port: int


class IngressStartError(RuntimeError):
    pass


def listen(args: ServerArgs, backlog: int):
    """The listening socket for --host/--port, or an OSError naming the flag."""
    try:
        return open_listener(args.host, args.port, backlog)
    except ListenError as err:
        raise OSError(f"--{err.what} {args.host if err.what == 'host' else args.port}: {err}") from None


class IngressActor(AsyncActor):
    config_type = IngressConfig

    def __init__(self, context):
        super().__init__(context)
        args = self.config.args
        # A file upload may be as large as --file-max-bytes plus its multipart framing.
        self.server_config = ServerConfig.from_args(
            args, max_body_bytes=max(args.max_body_bytes, args.file_max_bytes + MULTIPART_SLACK_BYTES))
        self.store = Store.open(args.storage_dir)
        fd = self.config.listen_fd
        self.sock = adopt_listener(fd) if fd >= 0 else listen(args, self.server_config.backlog)
        self.tokenizer = load_tokenizer(args)
        self.vision = None
        if self.config.image_arenas:
            from runtime.multimodal.inputs import VisionInputs

            self.vision = VisionInputs(args, [Arena.attach(name) for name in self.config.image_arenas])
        self.to_schedulers = [self.ref(name).channel for name in self.config.to_schedulers]
        self.model_info = self.config.model_info or self._wait_for_engine(args.ready_timeout)

    def _wait_for_engine(self, timeout: float) -> ModelInfo:
        """Every replica's scheduler greets with EngineReady once its model is loaded; the first one's facts."""
        deadline = time.monotonic() + timeout
        infos: list[ModelInfo] = []
        while len(infos) < len(self.to_schedulers):
            if time.monotonic() >= deadline:
                raise IngressStartError(f"{len(infos)} of {len(self.to_schedulers)} schedulers sent EngineReady "
                                        f"within {timeout:g} s")
            match self.receive(min(1.0, max(0.0, deadline - time.monotonic()))):
                case EngineReady(model_info=info):
                    infos.append(info)
                case Shutdown():
                    raise IngressStartError("stopped before the engine was ready")
                case None:
                    pass
                case other:
                    raise IngressStartError(f"expected the scheduler's EngineReady first, got {type(other).__name__}")
        return infos[0]

    def ready_info(self) -> bytes:
        return msgspec.msgpack.encode(IngressInfo(self.config.args.host, self.sock.getsockname()[1]))

    async def main(self) -> None:
        args = self.config.args
        loop = asyncio.get_running_loop()
        frontend = Frontend(args, self.model_info, self.tokenizer, self.to_schedulers, self.vision)
        health = None
        if self.config.heartbeat_segment:
            from runtime.ingress.health import HealthCheck

            health = HealthCheck(self.config.heartbeat_segment, args.watchdog_timeout)
            frontend.health_check = health
        shutdown: asyncio.Future = loop.create_future()
        terminated: asyncio.Future = loop.create_future()

        def on_message(msg) -> None:
            if isinstance(msg, Shutdown):
                if not shutdown.done():
                    shutdown.set_result(msg.grace_s)
            elif not isinstance(msg, EngineReady):
                frontend.on_message(msg)

        def on_sigterm() -> None:
            if not terminated.done():
                terminated.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        mailbox = AsyncMailbox(self.mailbox, on_message).start()
        # Batch requests may fill every replica's running rows twice over: each scheduler always has the next ones
        # queued.
        batches = BatchRunner(frontend, self.store, args.batch_max_requests,
                              window=2 * self.model_info.max_running_requests * frontend.dispatcher.size)
        server = create_server(frontend, self.server_config, batches, ResponseStore(self.store))
        try:
            await server.start(args.host, args.port, sock=self.sock)
            batches.start()
            # Start-up objects (tokenizer, modules) never die: keep the collector from re-scanning them
            # on every request (about 2.5% of the ingress CPU when streaming).
            gc.freeze()
            self.log.info("serving %s on http://%s:%d", frontend.served_model_name, args.host, server.port)
            await asyncio.wait([shutdown, mailbox.finished, terminated], return_when=asyncio.FIRST_COMPLETED)
            await batches.close()  # first: a batch request cut off by the stop stays unfinished, not failed
            if terminated.done():
                self.log.warning("SIGTERM: answering the %d requests in progress with 503", frontend.unfinished)
                await self._final_answers(server, frontend, "the server stopped while the request was running")
            elif shutdown.done():
                await self._drain(server, frontend, shutdown.result(), terminated)
            else:
                mailbox.finished.result()  # the reader's error, if it failed
                raise RuntimeError("the ingress mailbox stopped before a Shutdown")
        finally:
            await batches.close()
            frontend.close()
            await mailbox.close()
            await server.close()
            if health is not None:
                health.close()
            self.store.close()

    async def _drain(self, server, frontend: Frontend, grace_s: float, terminated: asyncio.Future) -> None:
        """Refuse new requests, give the running ones grace_s, then answer the rest with 503."""
        self.log.info("shutdown: draining %d requests in progress (grace %.1f s)", frontend.unfinished, grace_s)
        frontend.draining = True
        server.drain()
        deadline = asyncio.get_running_loop().time() + grace_s
        while (frontend.unfinished or server.busy_connections) and not terminated.done():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await asyncio.wait([terminated], timeout=min(DRAIN_POLL_S, remaining))
        if frontend.unfinished:
            self.log.warning("shutdown: %d requests did not finish within %.1f s; answering them with 503",
                             frontend.unfinished, grace_s)
        await self._final_answers(server, frontend, "the server is shutting down")

    @staticmethod
    async def _final_answers(server, frontend: Frontend, message: str) -> None:
        frontend.close(message)  # every waiting request fails with 503: its handler answers it
        server.drain()
        await server.close(FINAL_ANSWERS_S)
