"""Actors that run an asyncio loop (the HTTP ingress): their rings are read on a helper thread.

The reader thread blocks in the mailbox (a futex wait, which releases the GIL), then hands every
message already waiting, as one batch, to the loop with call_soon_threadsafe. It waits for the
loop to have handled that batch before reading the next one, so a slow loop leaves messages in
the ring (back-pressure on the sender) instead of piling them up in memory.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from actors.actor import Actor
from actors.mailbox import Mailbox


class AsyncMailbox:
    """Feeds a Mailbox's messages to `on_message(msg)`, called on the loop's thread in arrival order.

    `finished` (a future of the loop) completes when reading stops: with None after close() or
    stop_reading(), or with the exception raised by the reader (e.g. ChannelDecodeError) or by
    on_message. Create and start it on the loop's thread."""

    def __init__(
        self,
        mailbox: Mailbox,
        on_message: Callable[[Any], None],
        loop: asyncio.AbstractEventLoop | None = None,
        max_batch: int = 256,
        stop_poll_s: float = 0.1,
    ):
        self.mailbox = mailbox
        self.on_message = on_message
        self.loop = loop or asyncio.get_running_loop()
        self.max_batch = max_batch
        self.stop_poll_s = stop_poll_s  # how often an idle reader checks whether it should stop
        self.finished: asyncio.Future = self.loop.create_future()
        self._stopping = threading.Event()
        self._handled = threading.Event()
        self._thread = threading.Thread(target=self._read, name="mailbox-reader", daemon=True)

    def start(self) -> AsyncMailbox:
        self._thread.start()
        return self

    def stop_reading(self) -> None:
        """Stop after the current batch (e.g. from on_message on Shutdown); `finished` then completes."""
        self._stopping.set()

    async def close(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)
        self._finish(None)

    def _read(self) -> None:
        try:
            while not self._stopping.is_set():
                msg = self.mailbox.get(timeout=self.stop_poll_s)
                if msg is None:
                    continue
                batch = [msg, *self.mailbox.drain(self.max_batch - 1)]
                self._handled.clear()
                if not self._call_soon(self._deliver, batch):
                    return
                while not self._handled.wait(self.stop_poll_s):
                    if self.loop.is_closed():
                        return
        except BaseException as e:
            self._stopping.set()
            self._call_soon(self._finish, e)
        else:
            self._call_soon(self._finish, None)

    def _call_soon(self, callback: Callable, *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the loop is closed: nobody is left to tell
            return False

    def _deliver(self, batch: list[Any]) -> None:
        try:
            for msg in batch:
                self.on_message(msg)
        except BaseException as e:
            self._stopping.set()
            self._finish(e)
        finally:
            self._handled.set()

    def _finish(self, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)


class AsyncActor(Actor):
    """An Actor whose run() drives `main()` on uvloop (asyncio's default loop without uvloop)."""

    def run(self) -> None:
        try:
            import uvloop
        except ImportError:
            asyncio.run(self.main())
        else:
            uvloop.run(self.main())

    async def main(self) -> None:
        raise NotImplementedError
