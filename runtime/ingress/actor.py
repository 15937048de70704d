"""The ingress actor: the HTTP server (runtime.ingress.api) over a Frontend, on uvloop.

It binds the listening socket while being built, so the Ready it reports means "listening"
(connections made right after Ready wait in the kernel's backlog until the loop runs), and a port
already in use fails the start with a message naming --port. Ready carries an IngressInfo with the
real port (useful with --port 0).

Mailbox: SchedulerToIngress and DetokenizerToIngress channels plus the control channel. Shutdown
stops accepting connections and gives responses in progress grace_s seconds to finish."""

from __future__ import annotations

import asyncio
import gc
import socket

import msgspec

from actors.aio import AsyncActor, AsyncMailbox
from httpd import ServerConfig
from runtime.ingress.api.app import create_server
from runtime.ingress.frontend import Frontend
from runtime.messages import ModelInfo, Shutdown
from runtime.server_args import ServerArgs
from runtime.tokenizer import load_tokenizer


class IngressConfig(msgspec.Struct, forbid_unknown_fields=True):
    args: ServerArgs
    model_info: ModelInfo
    # names of the outbound channels in the ActorSpec: one per data-parallel replica's scheduler
    to_schedulers: list[str] = msgspec.field(default_factory=lambda: ["ingress_to_scheduler"])


class IngressInfo(msgspec.Struct):
    """The ingress's Ready info (msgpack): where it listens."""

    host: str
    port: int


def listen(host: str, port: int, backlog: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise OSError(f"--host {host}: cannot listen there: {err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise OSError(f"--port {port}: cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class IngressActor(AsyncActor):
    config_type = IngressConfig

    def __init__(self, context):
        super().__init__(context)
        args = self.config.args
        self.tokenizer = load_tokenizer(args)
        self.to_schedulers = [self.ref(name).channel for name in self.config.to_schedulers]
        self.server_config = ServerConfig.from_args(args)
        self.sock = listen(args.host, args.port, self.server_config.backlog)  # last: nothing fails after it

    def ready_info(self) -> bytes:
        return msgspec.msgpack.encode(IngressInfo(self.config.args.host, self.sock.getsockname()[1]))

    async def main(self) -> None:
        args = self.config.args
        frontend = Frontend(args, self.config.model_info, self.tokenizer, self.to_schedulers)
        shutdown: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_message(msg) -> None:
            if isinstance(msg, Shutdown):
                if not shutdown.done():
                    shutdown.set_result(msg.grace_s)
            else:
                frontend.on_message(msg)

        mailbox = AsyncMailbox(self.mailbox, on_message).start()
        server = create_server(frontend, self.server_config)
        try:
            await server.start(args.host, args.port, sock=self.sock)
            # Start-up objects (tokenizer, modules) never die: keep the collector from re-scanning them
            # on every request (about 2.5% of the ingress CPU when streaming).
            gc.freeze()
            self.log.info("serving %s on http://%s:%d", frontend.served_model_name, args.host, server.port)
            await asyncio.wait([shutdown, mailbox.finished], return_when=asyncio.FIRST_COMPLETED)
            if mailbox.finished.done():
                mailbox.finished.result()  # the reader's error, if it failed
                raise RuntimeError("the ingress mailbox stopped before a Shutdown")
            # The mailbox keeps reading while responses in progress finish.
            await server.close(shutdown.result())
        finally:
            frontend.close()
            await mailbox.close()
            await server.close()
