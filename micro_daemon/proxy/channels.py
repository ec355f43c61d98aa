"""One reusable ``grpc.aio`` channel per node address, and which nodes recently failed to connect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
import grpc.aio

__all__ = ["ChannelPool"]

log = logging.getLogger("micro.proxy")

DEAD_FOR = 3.0
DRAIN_GRACE = 30.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ChannelPool:
    """Channels to nodes, opened on first use and closed when their node disappears.

    ``dead`` maps an address to the monotonic time until which it is skipped
    after a failed connection. A discarded channel drains its in-flight calls
    for up to ``grace`` seconds before it closes: a node that deregisters
    while serving (a hot reload) finishes what it started.
    """

    def __init__(
        self,
        *,
        dead_for: float = DEAD_FOR,
        grace: float = DRAIN_GRACE,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.dead: dict[str, float] = {}
        self._dead_for = dead_for
        self._grace = grace
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._draining: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to ``address``, opened if needed."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return channel

    def mark_dead(self, address: str) -> None:
        """Skip ``address`` for a few seconds: a connection to it just failed."""
        log.debug("node %s unreachable; skipping it for %.0fs", address, self._dead_for)
        self.dead[address] = time.monotonic() + self._dead_for

    def discard(self, address: str) -> None:
        """Forget ``address``: its node left the registry. Its channel drains, then closes."""
        self.dead.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.create_task(channel.close(self._grace), name=f"proxy-drain-{address}")
            self._draining[channel] = task
            task.add_done_callback(lambda _: self._draining.pop(channel, None))

    async def close(self) -> None:
        """Close every channel now, cancelling what is still in flight. Never raises."""
        channels = [*self._channels.values(), *self._draining]
        draining = list(self._draining.values())
        for task in draining:
            task.cancel()
        self._channels.clear()
        self.dead.clear()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()
        await asyncio.gather(*draining, return_exceptions=True)
